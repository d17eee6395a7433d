"""LoRA, IA3 and prefix-tuning adapters interchanged with Hugging Face PEFT, for T5.

`import_adapter(adapter_dir, config)` reads a PEFT adapter directory (`adapter_config.json` and
`adapter_model.safetensors`) of a `LORA`, `IA3` or `PREFIX_TUNING` adapter for the T5 `config`
describes, and returns the matching `methods.Method` with its trainable parameters: flat `/`-joined
paths (one `layers_{i}` per layer), what `Method.fold` gives after training. `export_adapter`
writes such parameters back as an adapter that `peft.PeftModel.from_pretrained` loads on the
Hugging Face T5. Prompt-tuning adapters are `peft_interchange`'s.

How PEFT's adapters map onto ours (peft 0.21, `T5ForConditionalGeneration`, task type
`SEQ_2_SEQ_LM`):
  - Tensors are named `base_model.model.{module}.{lora_A.weight|lora_B.weight|ia3_l}`, where
    `{module}` (e.g. `decoder.block.1.layer.1.EncDecAttention.q`) is the Hugging Face name of our
    projection (`decoder/layers_1/encoder_decoder_attention/query`; `hf_checkpoint`'s); PEFT's
    module names `q`, `k`, `v`, `o`, `wi`, `wi_0`, `wi_1`, `wo` are our `query`, `key`, `value`,
    `out`, `wi`, `wi_0`, `wi_1`, `wo`. Our adapters go on a projection in every layer and every
    attention of both stacks, so an adapter must cover all modules of each name it targets.
    `task_type` may also be unset (a plain PeftModel: the same tensors).
  - `LORA`: `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` are our `lora_a` `[in, r]` and
    `lora_b` `[r, out]` transposed; both scale the update by `lora_alpha / r`. `lora_dropout` is a
    training setting our LoRA does not have: it is dropped (export writes 0).
  - `IA3`: `ia3_l` `[out, 1]` scales a module's outputs and `[1, in]` (a `feedforward_modules`
    module) its inputs: our `ia3_scale` `[out]` or `[in]` (`IA3.feedforward`).
  - `PREFIX_TUNING`: one table `prompt_embeddings` `[P, num_layers * 2 * token_dim]`, slots
    `[P, heads, kv]` (`token_dim = heads * kv`). A seq2seq PeftModel hands it to T5 as the
    decoder's past keys and values, so it enters the decoder's self-attention only (not the
    encoder, not the cross-attention), and T5's relative-position bias places it at the P positions
    before the sequence: `methods.prefix_tuning(stacks=("decoder",), position_bias="before")`.
    Which slots a layer reads is not the obvious pair: with `num_transformer_submodules=2`,
    `get_prompt` concatenates the `2L` slots with themselves and gives decoder layer j slots `4j`
    and `4j + 1` (mod `2L`) as its self-attention keys and values (`4j + 2`, `4j + 3` go to the
    cross-attention cache, which it then empties). With L odd that is a permutation of the slots;
    with L even (T5 Base and XXL) layers j and j + L/2 read the same two slots and the slots at
    2 and 3 (mod 4) are never read. Import copies the shared slots to both layers; export writes
    zeros into unread slots and refuses prefixes whose layers j and j + L/2 differ (ours train
    them apart). `prefix_projection=True` adapters store the projection's output in this same
    table (PEFT drops the MLP on save), so they import as plain prefixes.
"""
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from prompt_tuning_jax import checkpoints, hf_checkpoint, methods
from prompt_tuning_jax.adapters import PROJECTIONS
from prompt_tuning_jax.config import T5Config
from prompt_tuning_jax.peft_interchange import (CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_KEY,
                                                AdapterError, read_adapter_config,
                                                read_adapter_weights, write_atomically)

PEFT_TYPES = ("LORA", "IA3", "PREFIX_TUNING")
TASK_TYPE = "SEQ_2_SEQ_LM"
# Prefix of every LoRA and IA3 tensor name in an adapter file (the adapter's own name is dropped).
TENSOR_PREFIX = "base_model.model."
# Config settings our adapters do not have, by PEFT type: each must be left at a falsy default
# (`bias`: "none"), or import refuses the adapter naming it and why.
UNSUPPORTED = {
    "LORA": {
        "use_rslora": "rsLoRA scales by lora_alpha / sqrt(r); ours by lora_alpha / r",
        "use_dora": "DoRA adds magnitude vectors we do not have",
        "bias": "it trains biases, which T5's projections do not have",
        "lora_bias": "it trains a bias on lora_B, which ours does not have",
        "fan_in_fan_out": "it stores transposed (Conv1D) weights, which T5 does not use",
        "rank_pattern": "our LoRA has one rank for every module",
        "alpha_pattern": "our LoRA has one alpha for every module",
        "layers_to_transform": "our LoRA is on every layer",
        "exclude_modules": "our LoRA is on every module of the names it targets",
        "layer_replication": "it duplicates layers of the base model",
        "target_parameters": "it adapts parameters, not modules",
        "modules_to_save": "it also trains whole modules of the base model",
        "trainable_token_indices": "it also trains token embeddings",
        "alora_invocation_tokens": "activated LoRA switches on per token",
        "use_qalora": "QALoRA pools the inputs of quantized layers",
        "use_bdlora": "block-diagonal LoRA shards the update",
        "megatron_config": "it targets Megatron's parallel layers",
    },
    "IA3": {
        "fan_in_fan_out": "it stores transposed (Conv1D) weights, which T5 does not use",
        "exclude_modules": "our IA3 is on every module of the names it targets",
        "modules_to_save": "it also trains whole modules of the base model",
    },
    "PREFIX_TUNING": {
        "modules_to_save": "it also trains whole modules of the base model",
    },
}
# The ends of PEFT's tensor names -> our parameter names, by PEFT type.
_TENSOR_NAMES = {"LORA": {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b"},
                 "IA3": {"ia3_l": "ia3_scale"}}


def import_adapter(adapter_dir: str,
                   config: T5Config) -> tuple[methods.Method, dict[str, np.ndarray]]:
  """The method and trainable parameters of a PEFT LoRA, IA3 or prefix-tuning adapter for `config`.

  Returns:
    `(method, params)`: `methods.lora(...)`, `methods.ia3(...)` or `methods.prefix_tuning(...,
    stacks=("decoder",), position_bias="before")`, and its parameters as float32 arrays under flat
    `/`-joined paths: `{stack}/layers_{i}/{module}/{projection}/{lora_a [in, r], lora_b [r, out],
    ia3_scale}` or `decoder/prefix/{key,value}` `[layers, P, heads, kv]`.
  Raises:
    FileNotFoundError: `adapter_dir` lacks `adapter_config.json` or `adapter_model.safetensors`.
    AdapterError: a setting or tensor our methods cannot represent (named), or a malformed adapter.
  """
  config_path = os.path.join(adapter_dir, CONFIG_FILE)
  weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No PEFT adapter at {adapter_dir!r}: {os.path.basename(path)} is "
                              "missing (save it with save_pretrained(safe_serialization=True)).")
  peft_config = read_adapter_config(config_path)
  peft_type = peft_config.get("peft_type")
  if peft_type not in PEFT_TYPES:
    hint = (" (a prompt-tuning adapter: read it with peft_interchange.import_peft_adapter)"
            if peft_type == "PROMPT_TUNING" else "")
    raise AdapterError(f"{config_path}: peft_type is {peft_type!r}{hint}; supported: "
                       f"{', '.join(PEFT_TYPES)}.")
  task_types = (TASK_TYPE,) if peft_type == "PREFIX_TUNING" else (TASK_TYPE, None)
  if peft_config.get("task_type") not in task_types:
    raise AdapterError(f"{config_path}: task_type {peft_config.get('task_type')!r} is not T5's "
                       f"encoder-decoder; supported: {task_types}.")
  for key, reason in UNSUPPORTED[peft_type].items():
    value = peft_config.get(key)
    if value not in (None, "none") if key == "bias" else bool(value):
      raise AdapterError(f"{config_path}: {key}={value!r} is not supported: {reason}. Train the "
                         f"adapter without {key}.")
  tensors = read_adapter_weights(weights_path)
  bad = sorted(name for name, array in tensors.items()
               if not jnp.issubdtype(array.dtype, jnp.floating))  # bfloat16 included
  if bad:
    raise AdapterError(f"{weights_path}: {', '.join(bad[:3])} hold no floats.")
  if peft_type == "PREFIX_TUNING":
    method, params = _import_prefix(peft_config, tensors, config, config_path)
  else:
    method, params = _import_projections(peft_type, peft_config, tensors, config, weights_path)
  mismatch = _shape_mismatch(_expected_shapes(method, config), params)
  if mismatch:
    raise AdapterError(f"{weights_path} does not hold {method.name} on every "
                       f"{', '.join(_targets(method))} of this T5 with the shapes its config "
                       f"implies: {mismatch}. Our adapters go on every layer and attention; is "
                       "the T5 config the adapter's base model's?")
  return method, params


def export_adapter(method: methods.Method, params: Mapping[str, Any], config: T5Config,
                   output_dir: str, base_model_name_or_path: str, *,
                   overwrite: bool = False) -> None:
  """Writes `method`'s trained `params` as a PEFT adapter in `output_dir`.

  Args:
    method: `methods.lora(...)`, `methods.ia3(...)` or `methods.prefix_tuning(...)` with
      `stacks=("decoder",)` and `position_bias="before"` (PEFT's placement; a prefix MLP is folded).
    params: the trained parameters under flat `/`-joined paths, one `layers_{i}` per layer or
      stacked `layers` (`ExecutionConfig.scan_layers`): what the run's trainable state flattens to.
    config: the T5 they were trained on.
    output_dir: created if missing; receives `adapter_config.json` and `adapter_model.safetensors`.
    base_model_name_or_path: the Hugging Face T5 they belong to (hub id or directory).
    overwrite: replace existing adapter files instead of raising `FileExistsError`.
  Raises:
    ValueError: a method PEFT has no adapter for, or `params` that are not that method's.
  """
  peft_type, peft_config = _peft_config(method, config)
  flat = checkpoints.unstack_layers(method.fold(
      {path: np.asarray(value, np.float32) for path, value in params.items()}, config))
  method = method.folded()
  mismatch = _shape_mismatch(_expected_shapes(method, config), flat)
  if mismatch:
    raise ValueError(f"These are not the trained parameters of {method.name} on this T5: "
                     f"{mismatch}.")
  if peft_type == "PREFIX_TUNING":
    tensors = {WEIGHTS_KEY: _prefix_table(flat["decoder/prefix/key"], flat["decoder/prefix/value"])}
  else:
    ours_to_peft = {ours: peft for peft, ours in _TENSOR_NAMES[peft_type].items()}
    modules = {ours: hf for hf, ours in _modules(config).items()}
    tensors = {}
    for path, value in flat.items():
      module, name = path.rsplit("/", 1)
      if name == "ia3_scale":
        value = value[None, :] if _ia3_side(method, module) == "inputs" else value[:, None]
      else:
        value = value.T  # ours [in, r] / [r, out]; torch's Linear [out, in]
      tensors[f"{TENSOR_PREFIX}{modules[module]}.{ours_to_peft[name]}"] = value
  paths = [os.path.join(output_dir, name) for name in (WEIGHTS_FILE, CONFIG_FILE)]
  existing = [path for path in paths if os.path.exists(path)]
  if existing and not overwrite:
    raise FileExistsError(f"Adapter files already exist: {', '.join(existing)}; pass "
                          "overwrite=True to replace them.")
  peft_config.update(peft_type=peft_type, task_type=TASK_TYPE, inference_mode=True,
                     base_model_name_or_path=base_model_name_or_path, revision=None,
                     modules_to_save=None)
  os.makedirs(output_dir, exist_ok=True)
  tensors = {name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()}
  # The weights first: a config never points at missing or partly written weights.
  write_atomically(paths[0], lambda f: f.write(safetensors.numpy.save(
      tensors, metadata={"format": "pt"})))
  write_atomically(paths[1], lambda f: f.write(
      json.dumps(peft_config, indent=2, sort_keys=True).encode() + b"\n"))


def _modules(config: T5Config) -> dict[str, str]:
  """`{Hugging Face module name: our module path}` of every projection in `config`'s layers, e.g.
  `encoder.block.0.layer.0.SelfAttention.q` -> `encoder/layers_0/attention/query`."""
  names = hf_checkpoint.name_map(config)
  return {hf_name[:-len(".weight")]: name[:-len("/kernel")] for name, hf_name in names.items()
          if "/layers_" in name and name.endswith("/kernel")}


def _peft_names(config: T5Config) -> dict[str, str]:
  """`{our projection name: PEFT's}`: `query` -> `q`, ..., `wo` -> `wo` (those `config` has)."""
  return {ours.rsplit("/", 1)[1]: hf.rsplit(".", 1)[1] for hf, ours in _modules(config).items()}


def _targets(method: methods.Method) -> tuple[str, ...]:
  """What `method`'s adapter goes on, for error messages."""
  config = method.adapters.lora or method.adapters.ia3
  return config.targets if config is not None else ("decoder self-attention",)


def _ia3_side(method: methods.Method, module: str) -> str:
  """`"inputs"` or `"outputs"`: which side of the projection at `module` IA3 scales."""
  return method.adapters.projection(module.rsplit("/", 1)[1])["ia3"]


def _expected_shapes(method: methods.Method, config: T5Config) -> dict[str, tuple[int, ...]]:
  """Flat `{path: shape}` of the trainable parameters of `method` (LoRA, IA3 or a plain prefix) on
  `config`, one `layers_{i}` per layer (`layers.Dense` and `adapters.PrefixKeysValues` shapes)."""
  prefix = method.adapters.prefix
  if prefix is not None:
    shape = (config.num_decoder_layers, prefix.length, config.num_heads, config.head_dim)
    return {"decoder/prefix/key": shape, "decoder/prefix/value": shape}
  kernels = checkpoints.param_shapes(config)
  shapes = {}
  for module in _modules(config).values():
    fan_in, fan_out = kernels[f"{module}/kernel"]
    projection = method.adapters.projection(module.rsplit("/", 1)[1])
    if projection["lora"] is not None:
      rank = projection["lora"].rank
      shapes.update({f"{module}/lora_a": (fan_in, rank), f"{module}/lora_b": (rank, fan_out)})
    if projection["ia3"] is not None:
      shapes[f"{module}/ia3_scale"] = (fan_in if projection["ia3"] == "inputs" else fan_out,)
  return shapes


def _shape_mismatch(expected: Mapping[str, tuple[int, ...]],
                    params: Mapping[str, np.ndarray]) -> str:
  """What of `params` differs from `expected` `{path: shape}` (missing, extra, misshapen paths, a
  few of each), or `""`."""
  listed = lambda paths: ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3
                                                 else "")
  problems = [f"{listed(paths)} {what}" for paths, what in (
      (sorted(set(expected) - set(params)), "missing"),
      (sorted(set(params) - set(expected)), "unexpected"),
      ([f"{path} {params[path].shape} (not {expected[path]})" for path in sorted(expected)
        if path in params and params[path].shape != expected[path]], "misshapen")) if paths]
  return "; ".join(problems)


def _import_projections(peft_type: str, peft_config: dict[str, Any],
                        tensors: dict[str, np.ndarray], config: T5Config,
                        weights_path: str) -> tuple[methods.Method, dict[str, np.ndarray]]:
  """A LoRA or IA3 adapter's method (targets, rank, alpha, feedforward: from its tensors and
  config) and its parameters under our names, before their shapes are checked."""
  modules, names = _modules(config), _TENSOR_NAMES[peft_type]
  params, sides = {}, {}
  for tensor_name, array in tensors.items():
    kind = next((k for k in names if tensor_name.endswith(f".{k}")), "")
    module = tensor_name[len(TENSOR_PREFIX):-len(kind) - 1]
    if not tensor_name.startswith(TENSOR_PREFIX) or module not in modules or array.ndim != 2:
      raise AdapterError(f"{weights_path} holds {tensor_name} {array.shape}, not a {peft_type} "
                         f"tensor ({', '.join(names)}) of one of this T5's projections (e.g. "
                         f"{TENSOR_PREFIX}{next(iter(modules))}.{next(iter(names))}).")
    ours = modules[module]
    array = np.asarray(array, np.float32)
    if kind == "ia3_l":
      # [out, 1] scales outputs, [1, in] (feedforward_modules) inputs.
      side = "inputs" if array.shape[0] == 1 and array.shape[1] != 1 else "outputs"
      sides.setdefault(ours.rsplit("/", 1)[1], set()).add(side)
      array = array.reshape(-1)
    else:
      array = array.T
    params[f"{ours}/{names[kind]}"] = array
  if not params:
    raise AdapterError(f"{weights_path} holds no {peft_type} tensors.")
  targets = tuple(p for p in PROJECTIONS if any(k.endswith(f"/{p}/{n}") for k in params
                                                for n in names.values()))
  if peft_type == "IA3":
    mixed = sorted(p for p, s in sides.items() if len(s) > 1)
    if mixed:
      raise AdapterError(f"{weights_path}: IA3 scales the inputs of some {mixed[0]} modules and "
                         "the outputs of others; ours scales one side of every module of a name.")
    feedforward = tuple(p for p in targets if sides[p] == {"inputs"})
    return methods.ia3(targets, feedforward), params
  ranks = {array.shape[1] for path, array in params.items() if path.endswith("/lora_a")}
  rank = peft_config.get("r", 8)
  if ranks != {rank}:
    raise AdapterError(f"{weights_path}: lora_A has ranks {sorted(ranks)}, but the config says "
                       f"r={rank}; our LoRA has one rank.")
  alpha = peft_config.get("lora_alpha", 8)
  return methods.lora(rank, float(alpha), targets), params


def _prefix_slots(num_layers: int) -> list[tuple[int, int]]:
  """(key slot, value slot) of PEFT's seq2seq prefix table that decoder layer j reads, for each j:
  `get_prompt` splits the table's `2L` slots, repeated twice, into groups of 4 per layer (self
  key, self value, cross key, cross value) and drops the cross ones."""
  return [((4 * j) % (2 * num_layers), (4 * j + 1) % (2 * num_layers)) for j in range(num_layers)]


def _import_prefix(peft_config: dict[str, Any], tensors: dict[str, np.ndarray], config: T5Config,
                   config_path: str) -> tuple[methods.Method, dict[str, np.ndarray]]:
  """A PREFIX_TUNING adapter's method and `decoder/prefix/{key,value}` `[layers, P, heads, kv]`."""
  length = peft_config.get("num_virtual_tokens")
  if not isinstance(length, int) or isinstance(length, bool) or length < 1:
    raise AdapterError(f"{config_path}: num_virtual_tokens is {length!r}, not a positive integer.")
  layers, heads, kv = config.num_decoder_layers, config.num_heads, config.head_dim
  expected = {"num_transformer_submodules": 2, "num_layers": layers, "num_attention_heads": heads,
              "token_dim": heads * kv}
  for key, value in expected.items():
    # PEFT's seq2seq default for num_transformer_submodules is 2; the others it fills in on save.
    found = peft_config.get(key) or (2 if key == "num_transformer_submodules" else None)
    if found != value:
      raise AdapterError(
          f"{config_path}: {key}={found!r}, but prefixes in this T5's decoder need {key}={value} "
          f"({layers} decoder layers of {heads} heads of {kv}; PEFT puts the prefix in the "
          "decoder's self-attention only, with one table of both keys and values).")
  if set(tensors) != {WEIGHTS_KEY}:
    raise AdapterError(f"{config_path}: the adapter holds {sorted(tensors)[:4]}; a prefix-tuning "
                       f"adapter holds only {WEIGHTS_KEY!r}.")
  table = np.asarray(tensors[WEIGHTS_KEY], np.float32)
  if table.shape != (length, 2 * layers * heads * kv):
    raise AdapterError(f"{config_path}: {WEIGHTS_KEY} has shape {table.shape}, but its config "
                       f"implies {(length, 2 * layers * heads * kv)} ([num_virtual_tokens, "
                       "num_layers * 2 * token_dim]).")
  slots = table.reshape(length, 2 * layers, heads, kv)
  key, value = (np.stack([slots[:, pair[i]] for pair in _prefix_slots(layers)]) for i in (0, 1))
  method = methods.prefix_tuning(length, stacks=("decoder",), position_bias="before")
  return method, {"decoder/prefix/key": key, "decoder/prefix/value": value}


def _prefix_table(key: np.ndarray, value: np.ndarray) -> np.ndarray:
  """PEFT's `prompt_embeddings` `[P, layers * 2 * heads * kv]` from our decoder prefix `key` and
  `value` `[layers, P, heads, kv]`: each layer's pair in its slots, zeros in unread slots."""
  layers, length, heads, kv = key.shape
  slots = np.zeros((length, 2 * layers, heads, kv), np.float32)
  owner = {}
  for layer, pair in enumerate(_prefix_slots(layers)):
    for slot, array in zip(pair, (key[layer], value[layer])):
      if slot in owner and not np.array_equal(slots[:, slot], array):
        raise ValueError(
            f"Decoder prefix layers {owner[slot]} and {layer} differ, but PEFT's seq2seq prefix "
            f"tuning gives both the same slots of its table (with {layers} decoder layers, layers "
            f"j and j + {layers // 2} share; see peft_adapters). Only prefixes equal there export.")
      owner[slot] = layer
      slots[:, slot] = array
  return slots.reshape(length, -1)


def _peft_config(method: methods.Method, config: T5Config) -> tuple[str, dict[str, Any]]:
  """(PEFT type, adapter_config.json fields of that type) of `method`, or a ValueError saying why
  PEFT has no adapter for it."""
  adapters = method.adapters
  present = [name for name in ("lora", "ia3", "prefix", "layer_prompts")
             if getattr(adapters, name) is not None]
  if method.input_prompt or method.residual_hidden is not None or len(present) != 1 or (
      present[0] == "layer_prompts"):
    hint = (" (export a prompt with peft_interchange.export_peft_adapter)"
            if method.input_prompt and not present else "")
    raise ValueError(f"PEFT has no adapter for {method.name} (an input prompt: "
                     f"{method.input_prompt}, in the layers: {present or 'nothing'}){hint}; "
                     "export LoRA, IA3 or decoder prefix tuning alone.")
  peft_names = _peft_names(config)
  if adapters.lora is not None:
    lora = adapters.lora
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return "LORA", dict(
        r=lora.rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
        use_rslora=False, use_dora=False, init_lora_weights=True, rank_pattern={},
        alpha_pattern={}, layers_to_transform=None, layers_pattern=None,
        target_modules=sorted(peft_names[t] for t in lora.targets if t in peft_names))
  if adapters.ia3 is not None:
    ia3 = adapters.ia3
    return "IA3", dict(
        fan_in_fan_out=False, init_ia3_weights=True,
        target_modules=sorted(peft_names[t] for t in ia3.targets if t in peft_names),
        feedforward_modules=sorted(peft_names[t] for t in ia3.feedforward if t in peft_names))
  prefix = adapters.prefix
  if prefix.stacks != ("decoder",) or prefix.position_bias != "before":
    raise ValueError(f"PEFT's prefix tuning on T5 puts the prefix in the decoder's self-attention "
                     f"only, right before the sequence; this prefix is in {prefix.stacks} with "
                     f"position_bias={prefix.position_bias!r}. Train methods.prefix_tuning("
                     "stacks=('decoder',), position_bias='before') to export it.")
  token_dim = config.num_heads * config.head_dim
  return "PREFIX_TUNING", dict(
      num_virtual_tokens=prefix.length, token_dim=token_dim, encoder_hidden_size=token_dim,
      num_attention_heads=config.num_heads, num_layers=config.num_decoder_layers,
      num_transformer_submodules=2, prefix_projection=False, init_weights=None)
