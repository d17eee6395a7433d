"""Hugging Face decoder-only checkpoints read by `hf_causal_lm`: configs, logits against
transformers' PyTorch Llama, Gemma 2 and Gemma 3 (float32, GQA, sliding windows shorter than the
sequence, left padding), sharded files, older config.json files and the errors."""
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import causal_lm, checkpoints, hf_causal_lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_causal_reference import BOS, VOCAB, WINDOW, random_causal_lm  # noqa: E402  (needs torch)

LENGTH = 12
FAMILIES = ("llama", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """`saved(family)`: (HF model, its directory, our config, our params, jitted apply), each
  family's made once."""
  cache = {}

  def get(family):
    if family not in cache:
      model = random_causal_lm(family, seed=len(family))
      path = tmp_path_factory.mktemp(family)
      model.save_pretrained(path)
      config, params = hf_causal_lm.load_checkpoint(str(path))
      cache[family] = model, path, config, params, jax.jit(causal_lm.CausalLM(config).apply)
    return cache[family]
  return get


def _batch():
  """Tokens `[3, LENGTH]` and their mask: a full row starting with BOS, the same row's first 8
  tokens left-padded by 4, and another row's 5 left-padded by 7."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, VOCAB, (3, LENGTH))
  tokens[:, 0] = BOS
  tokens[1, 4:] = tokens[0, :8]
  tokens[2, 7:] = tokens[2, :5]
  mask = np.ones((3, LENGTH), bool)
  mask[1, :4] = mask[2, :7] = False
  tokens[~mask] = 0
  return tokens, mask


def _transformers_logits(model, tokens, mask):
  """transformers' logits, with the positions its `generate` gives left-padded rows."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_config_from_config_json(saved, family):
  _, _, config, _, _ = saved(family)
  assert (config.vocab_size, config.emb_dim, config.num_heads, config.num_kv_heads,
          config.head_dim, config.mlp_dim) == (VOCAB, 16, 4, 2, 6, 24)
  if family == "llama":
    assert (config.family, config.activation, config.tie_embeddings, config.norm_plus_one) == (
        "llama", "silu", False, False)
    assert config.rope_scaling == causal_lm.RopeScaling("llama3", 8.0, 1.0, 4.0, 256)
    assert config.sliding_window is None and config.sliding_layers == ()
  elif family == "gemma2":
    assert (config.family, config.activation, config.tie_embeddings, config.post_norms) == (
        "gemma2", "gelu", True, True)
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (3.0, 4.0)
    assert (config.sliding_window, config.sliding_layers, config.query_pre_attn_scalar) == (
        WINDOW, (0,), 8.0)
  else:
    assert (config.family, config.num_layers, config.qk_norm, config.scale_embeddings) == (
        "gemma3_text", 3, True, True)
    assert (config.sliding_window, config.sliding_layers) == (WINDOW, (0, 2))
    assert (config.rope_theta, config.local_rope_theta) == (1e4, 100.0)
    assert config.rope_scaling == causal_lm.RopeScaling("linear", 2.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_pytorch_with_left_padding(saved, family):
  model, _, _, params, apply = saved(family)
  tokens, mask = _batch()
  expected = _transformers_logits(model, tokens, mask)
  logits = np.asarray(apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)))
  assert logits.shape == expected.shape == (3, LENGTH, VOCAB)
  np.testing.assert_array_less(np.abs(logits[mask] - expected[mask]).max(), 1e-4)
  assert np.abs(expected[mask]).max() > 1.0  # the comparison is not between near-zero logits
  # Left padding changes nothing: the padded copy of row 0 has row 0's logits.
  np.testing.assert_allclose(logits[1, 4:], logits[0, :8], atol=1e-5)
  # Without a mask every position is real.
  full = np.asarray(apply({"params": params}, jnp.asarray(tokens[:1])))
  np.testing.assert_allclose(full, logits[:1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_are_transposed(saved, family):
  model, _, _, params, _ = saved(family)
  hf = model.state_dict()
  np.testing.assert_array_equal(params["decoder"]["layers_1"]["self_attention"]["key"]["kernel"],
                                hf["model.layers.1.self_attn.k_proj.weight"].numpy().T)
  np.testing.assert_array_equal(params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"],
                                hf["model.layers.0.mlp.gate_proj.weight"].numpy().T)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_bfloat16_checkpoints(saved, family, tmp_path):
  model, _, config, params, _ = saved(family)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  sharded_config, sharded = hf_causal_lm.load_checkpoint(str(tmp_path / "sharded"))
  assert sharded_config == config
  jax.tree.map(np.testing.assert_array_equal, sharded, params)
  if family == "gemma3":  # computed in bfloat16: the float32 logits, roughly
    bf16_config, bf16_params = hf_causal_lm.load_checkpoint(str(tmp_path / "sharded"), jnp.bfloat16)
    assert bf16_config.dtype == jnp.bfloat16
    assert bf16_params["token_embedder"]["embedding"].dtype == jnp.bfloat16
    tokens, mask = _batch()
    logits = jax.jit(causal_lm.CausalLM(bf16_config).apply)({"params": bf16_params}, tokens, mask)
    reference = saved(family)[4]({"params": params}, tokens, mask)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(reference)[mask], atol=0.25)


def test_qwen2_and_mistral_configs(tmp_path):
  """Qwen2's query/key/value biases load (and change the logits as transformers'); Mistral slides
  on every layer."""
  torch.manual_seed(0)
  config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.normal_(0.0, 0.3)
  model.save_pretrained(tmp_path / "qwen2")
  ours, params = hf_causal_lm.load_checkpoint(str(tmp_path / "qwen2"))
  assert ours.qkv_bias and ours.head_dim == 4 and ours.sliding_layers == ()
  tokens, mask = _batch()
  logits = jax.jit(causal_lm.CausalLM(ours).apply)({"params": params}, tokens, mask)
  expected = _transformers_logits(model, tokens, mask)
  np.testing.assert_array_less(np.abs(np.asarray(logits)[mask] - expected[mask]).max(), 1e-4)

  mistral = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, sliding_window=WINDOW)
  transformers.MistralForCausalLM(mistral).save_pretrained(tmp_path / "mistral")
  ours = hf_causal_lm.read_config(str(tmp_path / "mistral"))
  assert (ours.family, ours.sliding_window, ours.sliding_layers) == ("mistral", WINDOW, (0, 1))


def _rewrite_config(path, **changes):
  config = json.loads((path / "config.json").read_text())
  for key, value in changes.items():
    if value is None:
      config.pop(key, None)
    else:
      config[key] = value
  (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_older_config_json_gives_the_same_config(saved, family, tmp_path):
  """transformers 4's keys (rope_theta, rope_scaling, rope_local_base_freq, sliding_window_pattern,
  no layer_types) describe the same model."""
  model, _, config, _, _ = saved(family)
  model.save_pretrained(tmp_path)
  if family == "gemma3":
    _rewrite_config(tmp_path, rope_parameters=None, layer_types=None, rope_theta=1e4,
                    rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=100.0,
                    sliding_window_pattern=2, _sliding_window_pattern=None)
  else:
    _rewrite_config(tmp_path, rope_parameters=None, layer_types=None, rope_theta=1e4)
  assert hf_causal_lm.read_config(str(tmp_path)) == config


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "RoPE scaling 'yarn' is not supported"),
    (dict(mlp_bias=True), "sets mlp_bias=True"),
    (dict(hidden_act="relu"), "activation 'relu' is not supported"),
    (dict(model_type="gemma3"), "multimodal Gemma 3"),
    (dict(hidden_size=None), "lacks hidden_size"),
])
def test_unsupported_configs_are_one_clear_error(saved, tmp_path, changes, message):
  saved("llama")[0].save_pretrained(tmp_path)
  _rewrite_config(tmp_path, **changes)
  with pytest.raises(checkpoints.CheckpointError, match=message) as error:
    hf_causal_lm.load_checkpoint(str(tmp_path))
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_that_differs_is_refused_naming_the_fields(saved, family):
  _, path, config, _, _ = saved(family)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"it has num_kv_heads=2 where the config has num_kv_heads=4"):
    hf_causal_lm.load_checkpoint(str(path), config=config.replace(num_kv_heads=4))


def test_missing_and_corrupt_weights(saved, tmp_path):
  model = saved("gemma2")[0]
  model.save_pretrained(tmp_path)
  weights = tmp_path / "model.safetensors"
  data = weights.read_bytes()
  # A header length larger than the file: refused before anything that large is read.
  weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
  with pytest.raises(checkpoints.CheckpointError, match="header claims"):
    hf_causal_lm.load_checkpoint(str(tmp_path))
  # A tensor the config does not have.
  transformers.Gemma2ForCausalLM(model.config).save_pretrained(tmp_path)
  _rewrite_config(tmp_path, num_hidden_layers=1, layer_types=None)
  with pytest.raises(checkpoints.CheckpointError, match="does not have: model.layers.1"):
    hf_causal_lm.load_checkpoint(str(tmp_path))
