"""Logits parity with Hugging Face's PyTorch T5 for checkpoints read by `checkpoints.load_checkpoint`."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import checkpoints
from prompt_tuning_jax import decoding
from prompt_tuning_jax import network

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_reference import VERSIONS, VOCAB, random_t5  # noqa: E402  (needs torch)

LENGTH = 24


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def saved(request, tmp_path_factory):
  """(version, HF model, our config, our params, jitted apply) per T5 version."""
  version = request.param
  model = random_t5(version, seed=len(version))
  path = tmp_path_factory.mktemp(version)
  model.save_pretrained(path)
  config, params = checkpoints.load_checkpoint(str(path))
  apply = jax.jit(network.T5(config).apply)
  return version, model, path, config, params, apply


def _batch():
  """Inputs and targets `[3, LENGTH]` with 0-padding; decoder inputs are targets shifted right."""
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, VOCAB, (3, LENGTH))
  targets = rng.integers(2, VOCAB, (3, LENGTH))
  for row, (n_in, n_out) in enumerate([(LENGTH, LENGTH), (17, 13), (9, 5)]):
    inputs[row, n_in:] = 0
    targets[row, n_out:] = 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


def test_config_from_config_json(saved):
  version, model, _, config, _, _ = saved
  hf = model.config
  assert (config.vocab_size, config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim,
          config.num_encoder_layers, config.num_decoder_layers) == (
              VOCAB, hf.d_model, hf.num_heads, hf.d_kv, hf.d_ff, 2, 3)
  assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (8, 20)
  if version == "t5_1_0":
    assert config.mlp_activations == ("relu",) and config.logits_via_embedding
  else:
    assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding


def test_logits_match_pytorch(saved):
  _, model, _, _, params, apply = saved
  inputs, decoder_inputs, targets = _batch()
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                     decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()
  logits = np.asarray(apply({"params": params}, jnp.asarray(inputs), jnp.asarray(decoder_inputs),
                            jnp.asarray(targets)))
  real = targets > 0
  assert logits.shape == expected.shape == (3, LENGTH, VOCAB)
  np.testing.assert_array_less(np.abs(logits[real] - expected[real]).max(), 1e-4)
  assert np.abs(expected[real]).max() > 0.1  # the comparison is not between near-zero logits


def test_kernels_are_transposed(saved):
  _, model, _, _, params, _ = saved
  hf = model.state_dict()
  np.testing.assert_array_equal(params["encoder"]["layers_1"]["attention"]["query"]["kernel"],
                                hf["encoder.block.1.layer.0.SelfAttention.q.weight"].numpy().T)
  np.testing.assert_array_equal(params["decoder"]["relpos_bias"]["rel_embedding"],
                                hf["decoder.block.0.layer.0.SelfAttention.relative_attention_bias."
                                   "weight"].numpy().T)


def test_pytorch_bin_and_bfloat16(saved, tmp_path):
  """`pytorch_model.bin` (tied copies share storage) and bfloat16 safetensors load like the original."""
  _, model, path, config, params, _ = saved
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((path / "config.json").read_text())
  torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  bin_config, bin_params = checkpoints.load_checkpoint(str(tmp_path / "bin"))
  assert bin_config == config
  jax.tree.map(np.testing.assert_array_equal, bin_params, params)

  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  model.to(torch.float32)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  bf16_config, bf16_params = checkpoints.load_checkpoint(str(tmp_path / "bf16"))
  assert bf16_config == config
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
  jax.tree.map(np.testing.assert_array_equal, bf16_params, rounded)
  assert bf16_params["token_embedder"]["embedding"].dtype == np.float32
  _, as_bf16 = checkpoints.load_checkpoint(str(tmp_path / "bf16"), dtype=jnp.bfloat16)
  assert as_bf16["token_embedder"]["embedding"].dtype == jnp.bfloat16


def test_greedy_decoding_equals_hf_generate(saved):
  """Our cached greedy decoding returns the tokens of HF's `generate` (greedy) on the same inputs."""
  _, model, _, config, params, _ = saved
  inputs, _, _ = _batch()
  steps = 12
  with torch.no_grad():
    hf_tokens = model.generate(
        input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
        max_new_tokens=steps, min_new_tokens=0, do_sample=False, num_beams=1, eos_token_id=1,
        pad_token_id=0, decoder_start_token_id=0,
        # transformers 5 sizes its KV cache by num_layers, which breaks a deeper decoder.
        use_cache=False).numpy()[:, 1:]  # drop the start token
  expected = np.zeros((inputs.shape[0], steps), np.int64)
  expected[:, :hf_tokens.shape[1]] = hf_tokens
  greedy = jax.jit(functools.partial(decoding.greedy_decode, network.T5(config),
                                     max_decode_length=steps))
  tokens, _ = greedy(params, inputs)
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  assert len(np.unique(expected)) > 3  # a real sequence, not one repeated token
