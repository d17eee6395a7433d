"""Reads Hugging Face checkpoints of decoder-only models (`LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`) into a `causal_lm.CausalLMConfig` and
the T5X-named parameters of `causal_lm.CausalLM`.

A checkpoint is a `save_pretrained` directory: `config.json` and `model.safetensors`, or shards
listed by `model.safetensors.index.json` (or `pytorch_model.bin`), read by `hf_checkpoint`'s readers
(a safetensors header is bounded before it is read, and every tensor's byte range checked). torch
`Linear` weights `[out, in]` become our `[in, out]` kernels. config.json may be transformers 5's
(`rope_parameters`, `layer_types`) or an older one's (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`, `sliding_window_pattern`). What the model cannot reproduce (another RoPE
scaling, biases on the output or MLP projections, bidirectional Gemma 3, the multimodal Gemma 3) is
refused with the reason. Every failure is one `checkpoints.CheckpointError`.
"""
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax import checkpoints, hf_checkpoint
from prompt_tuning_jax.causal_lm import (FAMILIES, CausalLM, CausalLMConfig, RopeScaling,
                                         param_shapes)
from prompt_tuning_jax.trees import flatten, unflatten

GEMMA = ("gemma2", "gemma3_text")
# config.json keys without a default: the architecture.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
_ATTENTION = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj"))
_MLP = (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj"))
# (our norm, HF's) in each layer: Llama's post-attention norm is the MLP's pre-norm; Gemma has four.
_NORMS = {
    "llama": (("pre_self_attention_layer_norm", "input_layernorm"),
              ("pre_mlp_layer_norm", "post_attention_layernorm")),
    "gemma": (("pre_self_attention_layer_norm", "input_layernorm"),
              ("post_self_attention_layer_norm", "post_attention_layernorm"),
              ("pre_mlp_layer_norm", "pre_feedforward_layernorm"),
              ("post_mlp_layer_norm", "post_feedforward_layernorm")),
}
# Defaults of the transformers config classes, for keys an older config.json leaves out.
_GEMMA_DEFAULTS = {"gemma2": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                   "gemma3_text": dict(attn_logit_softcapping=None, final_logit_softcapping=None)}


def model_type(path: str) -> Optional[str]:
  """config.json's `model_type` of the Hugging Face directory `path`, or None where there is none
  (no checkpoint, or a config.json that is not a JSON object)."""
  if not hf_checkpoint.is_checkpoint(path):
    return None
  try:
    return hf_checkpoint.read_json(os.path.join(path, hf_checkpoint.CONFIG_FILE)).get("model_type")
  except (OSError, ValueError):
    return None


def is_checkpoint(path: str) -> bool:
  """Whether `path` is a Hugging Face checkpoint of a decoder-only model family we read (or of the
  multimodal Gemma 3, which `read_config` refuses with the fix)."""
  return model_type(path) in FAMILIES + ("gemma3",)


def read_config(path: str) -> CausalLMConfig:
  """The architecture in `path`'s config.json."""
  with checkpoints.as_checkpoint_error(path):
    return _config(path, hf_checkpoint.read_json(os.path.join(path, hf_checkpoint.CONFIG_FILE)))


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Flat `{our param path: shape}` of the checkpoint in `path`, reading no array."""
  with checkpoints.as_checkpoint_error(path):
    return {name: shape for name, (shape, _) in _our_tensors(path, read_config(path)).items()}


def load_checkpoint(path: str, dtype: Any = jnp.float32, *,
                    config: Optional[CausalLMConfig] = None
                    ) -> tuple[CausalLMConfig, dict[str, Any]]:
  """(config, nested params of `causal_lm.CausalLM(config)`) of the checkpoint in `path`, the
  arrays cast to `dtype`, in which the returned config computes too.

  Args:
    config: the architecture the caller expects; one that differs from the checkpoint's (other
      than in dtype) is refused, naming the fields.
  Raises:
    checkpoints.CheckpointError: a missing or unreadable checkpoint, an architecture we do not
      reproduce, a config that differs, or tensors missing, extra or misshapen for config.json.
  """
  own = read_config(path).replace(dtype=dtype)
  if config is not None:
    _check_same(path, own, config)
    own = config
  with checkpoints.as_checkpoint_error(path):
    tensors = _our_tensors(path, own)
  checkpoints.check_params(param_shapes(own), {name: shape for name, (shape, _) in tensors.items()},
                           checkpoint=path)
  with checkpoints.as_checkpoint_error(path):
    return own, unflatten({name: read().astype(dtype, copy=False)
                           for name, (_, read) in tensors.items()})


def check_checkpoint_matches(path: str, config: CausalLMConfig) -> None:
  """Raises a `CheckpointError` naming the fields where the checkpoint's config.json is not
  `config` (dtype aside); reads no array."""
  _check_same(path, read_config(path), config)


def _check_same(path: str, own: CausalLMConfig, config: CausalLMConfig) -> None:
  differ = {name: (getattr(own, name), getattr(config, name))
            for name in own.__dataclass_fields__ if name != "dtype"
            and getattr(own, name) != getattr(config, name)}
  if differ:
    raise checkpoints.CheckpointError(
        f"Checkpoint {path} does not match the config: it has "
        + ", ".join(f"{name}={theirs!r}" for name, (theirs, _) in differ.items())
        + " where the config has " + ", ".join(f"{name}={ours!r}" for name, (_, ours) in
                                               differ.items())
        + ". Fix: use the checkpoint's own architecture, hf_causal_lm.read_config(path).")


def causal_lm_config(checkpoint: Optional[str], families: Sequence[str] = FAMILIES,
                     dtype: Any = jnp.float32) -> CausalLMConfig:
  """The architecture of the Hugging Face checkpoint `checkpoint` (a gin model file binds it to
  INITIAL_CHECKPOINT_PATH: `models/llama_prompt.gin`), computing in `dtype`; one of another family
  than `families` is refused, naming the model file that reads it."""
  if checkpoint is None:
    raise ValueError("The decoder-only model files (models/llama_prompt.gin, "
                     "models/gemma_prompt.gin) read the architecture from "
                     "INITIAL_CHECKPOINT_PATH's config.json: set it to a Hugging Face directory.")
  checkpoints.check_initial_checkpoint(checkpoint)
  config = read_config(checkpoint)
  if config.family not in families:
    other = "gemma" if config.family in GEMMA else "llama"
    raise ValueError(f"INITIAL_CHECKPOINT_PATH {checkpoint} is a {config.family!r} model, not one "
                     f"of {', '.join(families)}: use models/{other}_prompt.gin.")
  return config.replace(dtype=jnp.dtype(dtype))


def load_frozen_params(config: CausalLMConfig, initial_checkpoint_path: Optional[str],
                       rng: Optional[jax.Array] = None) -> dict[str, np.ndarray]:
  """The frozen decoder-only model's flat `{path: array}` params: the checkpoint's, which must be
  `config`'s, or with no path a random model from the initialisers with `rng` (tests)."""
  if initial_checkpoint_path is None:
    tokens = jnp.ones((1, 1), jnp.int32)
    init = jax.jit(lambda key: nn.unbox(CausalLM(config).init(key, tokens))["params"])
    key = jax.random.PRNGKey(0) if rng is None else rng
    return {path: np.asarray(value) for path, value in flatten(init(key)).items()}
  checkpoints.check_initial_checkpoint(initial_checkpoint_path)
  return flatten(load_checkpoint(initial_checkpoint_path, config.dtype, config=config)[1])


def _config(path: str, hf: Mapping[str, Any]) -> CausalLMConfig:
  where = f"{path}/{hf_checkpoint.CONFIG_FILE}"
  family = hf.get("model_type")
  if family == "gemma3":
    raise ValueError(f"{where} is the multimodal Gemma 3 (Gemma3ForConditionalGeneration); save "
                     "its text model: Gemma3ForCausalLM.from_pretrained(path).save_pretrained(d).")
  if family not in FAMILIES:
    raise ValueError(f"{where} is a {family!r} model; decoder-only models of the families "
                     f"{', '.join(FAMILIES)} are read.")
  missing = [key for key in _REQUIRED_KEYS if type(hf.get(key)) is not int or hf[key] <= 0]
  if missing:
    raise ValueError(f"{where} lacks {', '.join(missing)} (positive integers). Save it again with "
                     "save_pretrained.")
  gemma = family in GEMMA
  refused = [(hf.get("attention_bias") and family != "qwen2",
              "attention_bias=True (biases on the query, key, value and output projections)"),
             (hf.get("mlp_bias"), "mlp_bias=True"),
             (hf.get("use_bidirectional_attention"), "use_bidirectional_attention=True"),
             (hf.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor != 1")]
  refused = [what for is_set, what in refused if is_set]
  if refused:
    raise ValueError(f"{where} sets {refused[0]}, which the decoder-only model does not compute.")
  activation_name = (hf.get("hidden_activation") if gemma else None) or hf.get("hidden_act", "silu")
  activation = _ACTIVATIONS.get(activation_name)
  if activation is None:
    raise ValueError(f"{where}: activation {activation_name!r} is not supported; use silu or "
                     "gelu_pytorch_tanh.")
  num_heads, num_layers = hf["num_attention_heads"], hf["num_hidden_layers"]
  rope_theta, local_rope_theta, rope_scaling = _rope(where, family, hf)
  window, sliding_layers = _sliding(where, family, hf, num_layers)
  defaults = _GEMMA_DEFAULTS.get(family, {})
  bos_id, eos_id = _special_tokens(where, gemma, hf)
  return CausalLMConfig(
      family=family,
      vocab_size=hf["vocab_size"],
      emb_dim=hf["hidden_size"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      mlp_dim=hf["intermediate_size"],
      num_layers=num_layers,
      activation=activation,
      rope_theta=float(rope_theta),
      local_rope_theta=None if local_rope_theta is None else float(local_rope_theta),
      rope_scaling=rope_scaling,
      norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
      norm_plus_one=gemma,
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      scale_embeddings=gemma,
      qkv_bias=family == "qwen2",
      qk_norm=family == "gemma3_text",
      post_norms=gemma,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
      attn_logit_softcap=hf.get("attn_logit_softcapping", defaults.get("attn_logit_softcapping")),
      final_logit_softcap=hf.get("final_logit_softcapping",
                                 defaults.get("final_logit_softcapping")),
      sliding_window=window,
      sliding_layers=sliding_layers,
      bos_id=bos_id,
      eos_id=eos_id)


def _special_tokens(where: str, gemma: bool, hf: Mapping[str, Any]) -> tuple[int, int]:
  """(BOS, EOS) ids from `bos_token_id` and `eos_token_id` (the first, where it lists several, as
  Llama 3's does), with the families' defaults (Gemma: 2 and 1; others: 1 and 2)."""
  bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) and eos else eos
  bos = (2 if gemma else 1) if bos is None else bos
  eos = (1 if gemma else 2) if eos is None else eos
  if type(bos) is not int or type(eos) is not int or min(bos, eos) < 0:
    raise ValueError(f"{where}: bos_token_id={bos!r} and eos_token_id={eos!r} must be token ids "
                     "(non-negative integers).")
  return bos, eos


def _rope(where: str, family: str, hf: Mapping[str, Any]
          ) -> tuple[float, Optional[float], Optional[RopeScaling]]:
  """(rope_theta, local_rope_theta, rope_scaling) from `rope_parameters` (transformers 5) or
  `rope_theta`, `rope_scaling` and Gemma 3's `rope_local_base_freq` (earlier)."""
  params = hf.get("rope_parameters")
  old_style = {"rope_theta": hf.get("rope_theta"), **(hf.get("rope_scaling") or {})}
  if family == "gemma3_text":
    if isinstance(params, dict) and "full_attention" in params:
      full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
      full, local = old_style, {"rope_theta": hf.get("rope_local_base_freq")}
    if _scaling(where, local) is not None:
      raise ValueError(f"{where}: the sliding layers' RoPE is scaled, which Gemma 3 does not do.")
    return (full.get("rope_theta") or 1_000_000.0, local.get("rope_theta") or 10_000.0,
            _scaling(where, full))
  params = params if isinstance(params, dict) else old_style
  return params.get("rope_theta") or 10_000.0, None, _scaling(where, params)


def _scaling(where: str, params: Mapping[str, Any]) -> Optional[RopeScaling]:
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return None
  if kind == "linear":
    return RopeScaling("linear", float(params["factor"]))
  if kind == "llama3":
    return RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                       float(params["high_freq_factor"]),
                       int(params["original_max_position_embeddings"]))
  raise ValueError(f"{where}: RoPE scaling {kind!r} is not supported; supported: default, linear, "
                   "llama3.")


def _sliding(where: str, family: str, hf: Mapping[str, Any], num_layers: int
             ) -> tuple[Optional[int], tuple[int, ...]]:
  """(sliding_window, the sliding layers' indices): `layer_types` where config.json lists them,
  else each family's rule (Gemma 2: even layers; Gemma 3: all but every `sliding_window_pattern`-th;
  Mistral: all; Qwen2: from `max_window_layers` on, with `use_sliding_window`)."""
  window = hf.get("sliding_window")
  if family == "llama" or (family == "qwen2" and not hf.get("use_sliding_window")) or not window:
    return None, ()
  types = hf.get("layer_types")
  if family == "mistral" or types is None:
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    sliding = {"mistral": lambda i: True, "gemma2": lambda i: i % 2 == 0,
               "gemma3_text": lambda i: (i + 1) % pattern != 0,
               "qwen2": lambda i: i >= hf.get("max_window_layers", 28)}[family]
    return window, tuple(i for i in range(num_layers) if sliding(i))
  unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
  if unknown or len(types) != num_layers:
    raise ValueError(f"{where}: layer_types must list sliding_attention or full_attention for each "
                     f"of the {num_layers} layers, got {types!r:.120}.")
  return window, tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")


def _name_map(config: CausalLMConfig) -> dict[str, str]:
  """`{our param path: HF tensor name}` of every parameter of `CausalLM(config)` (no prompt)."""
  names = {"token_embedder/embedding": "model.embed_tokens.weight",
           "decoder/decoder_norm/scale": "model.norm.weight"}
  if not config.tie_embeddings:
    names["decoder/logits_dense/kernel"] = "lm_head.weight"
  for i in range(config.num_layers):
    ours, theirs = f"decoder/layers_{i}", f"model.layers.{i}"
    for norm, hf_norm in _NORMS["gemma" if config.post_norms else "llama"]:
      names[f"{ours}/{norm}/scale"] = f"{theirs}.{hf_norm}.weight"
    for name, hf_name in _ATTENTION:
      names[f"{ours}/self_attention/{name}/kernel"] = f"{theirs}.self_attn.{hf_name}.weight"
      if config.qkv_bias and name != "out":
        names[f"{ours}/self_attention/{name}_bias"] = f"{theirs}.self_attn.{hf_name}.bias"
    if config.qk_norm:
      names[f"{ours}/self_attention/query_norm/scale"] = f"{theirs}.self_attn.q_norm.weight"
      names[f"{ours}/self_attention/key_norm/scale"] = f"{theirs}.self_attn.k_norm.weight"
    for name, hf_name in _MLP:
      names[f"{ours}/mlp/{name}/kernel"] = f"{theirs}.mlp.{hf_name}.weight"
  return names


def _our_tensors(path: str, config: CausalLMConfig) -> dict[str, Any]:
  """`{our name: (shape, read)}` of the checkpoint's tensors, kernels transposed lazily."""
  tensors = hf_checkpoint.read_tensors(path)
  names = _name_map(config)
  # Copies transformers may store beside the weights: a tied head, RoPE's frequency buffers.
  ignored = {name for name in tensors if name.endswith("rotary_emb.inv_freq")
             or (config.tie_embeddings and name == "lm_head.weight")}
  return hf_checkpoint.renamed_tensors(path, tensors, names, ignored,
                                       f"a {config.family} model of this config.json")
