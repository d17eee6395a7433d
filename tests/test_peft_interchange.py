"""Prompt interchange with Hugging Face PEFT on tiny random T5s, and the released prompts."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

from prompt_tuning_jax import checkpoints
from prompt_tuning_jax import config as config_lib
from prompt_tuning_jax import decoding
from prompt_tuning_jax import network
from prompt_tuning_jax import peft_interchange
from prompt_tuning_jax import prompts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_reference import COMMON, VERSIONS, VOCAB, random_t5  # noqa: E402  (needs torch)

PROMPT_LENGTH = 5
RELEASED = ("sst2", "mrpc", "rte")

peft = pytest.importorskip("peft")

@pytest.fixture(scope="module", params=sorted(VERSIONS))
def saved(request, tmp_path_factory):
  """(HF model directory, our config, our frozen params, jitted prompted apply) per T5 version."""
  path = tmp_path_factory.mktemp(request.param)
  random_t5(request.param, seed=len(request.param)).save_pretrained(path)
  config, params = checkpoints.load_checkpoint(str(path))
  apply = jax.jit(network.T5(config, prompts.PromptConfig(PROMPT_LENGTH)).apply)
  return path, config, params, apply


def _batch():
  """Inputs `[3, 12]` and targets `[3, 7]` with 0-padding; decoder inputs are targets shifted right."""
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, VOCAB, (3, 12))
  targets = rng.integers(2, VOCAB, (3, 7))
  for row, (n_in, n_out) in enumerate([(12, 7), (8, 4), (3, 2)]):
    inputs[row, n_in:] = 0
    targets[row, n_out:] = 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


def _our_logits(apply, params, prompt):
  inputs, decoder_inputs, targets = _batch()
  params = {**params, "encoder": {**params["encoder"], "prompt": {"prompt": {"prompt": prompt}}}}
  return np.asarray(apply({"params": params}, jnp.asarray(inputs), jnp.asarray(decoder_inputs),
                          jnp.asarray(targets)))


def _peft_logits(peft_model):
  inputs, decoder_inputs, targets = _batch()
  with torch.no_grad():
    return peft_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                      decoder_input_ids=torch.tensor(decoder_inputs),
                      labels=torch.tensor(np.where(targets > 0, targets, -100))).logits.numpy()


def _assert_close_on_targets(ours, theirs):
  real = _batch()[2] > 0
  assert ours.shape == theirs.shape
  np.testing.assert_array_less(np.abs(ours[real] - theirs[real]).max(), 1e-4)
  assert np.abs(theirs[real]).max() > 0.1


def _random_prompt(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(0.0, 1.0, (PROMPT_LENGTH, COMMON["d_model"])).astype(
      np.float32)


def test_exported_adapter_gives_our_logits_in_peft(saved, tmp_path):
  path, _, params, apply = saved
  prompt = _random_prompt(1)
  peft_interchange.export_peft_adapter(prompt, str(tmp_path), str(path))
  adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert adapter_config["peft_type"] == "PROMPT_TUNING"
  assert (adapter_config["num_virtual_tokens"], adapter_config["token_dim"],
          adapter_config["num_transformer_submodules"]) == (PROMPT_LENGTH, 16, 1)

  model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path))
  assert isinstance(peft_model, peft.PeftModelForSeq2SeqLM)
  np.testing.assert_array_equal(
      peft_model.prompt_encoder["default"].embedding.weight.detach().numpy(), prompt)
  ours = _our_logits(apply, params, prompt)
  _assert_close_on_targets(ours, _peft_logits(peft_model))
  # The prompt matters: another prompt moves the logits well beyond the tolerance.
  assert np.abs(ours - _our_logits(apply, params, _random_prompt(2))).max() > 1e-2


def test_peft_generate_equals_our_greedy_decoding(saved, tmp_path):
  path, config, params, _ = saved
  prompt = _random_prompt(8)
  peft_interchange.export_peft_adapter(prompt, str(tmp_path), str(path))
  model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path))
  inputs, steps = _batch()[0], 8
  with torch.no_grad():
    hf_tokens = peft_model.generate(
        input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
        max_new_tokens=steps, min_new_tokens=0, do_sample=False, num_beams=1, eos_token_id=1,
        pad_token_id=0, decoder_start_token_id=0,
        use_cache=False).numpy()[:, 1:]  # (see test_hf_parity) and without the start token
  expected = np.zeros((inputs.shape[0], steps), np.int64)
  expected[:, :hf_tokens.shape[1]] = hf_tokens
  params = {**params, "encoder": {**params["encoder"], "prompt": {"prompt": {"prompt": prompt}}}}
  greedy = jax.jit(functools.partial(decoding.greedy_decode,
                                     network.T5(config, prompts.PromptConfig(PROMPT_LENGTH)),
                                     max_decode_length=steps))
  tokens, _ = greedy(params, jnp.asarray(inputs))
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  assert len(np.unique(expected)) > 3


def test_feature_extraction_adapter_gives_our_encoding(saved, tmp_path):
  path, config, params, _ = saved
  prompt = _random_prompt(3)
  peft_interchange.export_peft_adapter(prompt, str(tmp_path), str(path),
                                       task_type="FEATURE_EXTRACTION")
  encoder = peft.PeftModel.from_pretrained(transformers.T5EncoderModel.from_pretrained(path).eval(),
                                           str(tmp_path))
  inputs = _batch()[0]
  with torch.no_grad():
    theirs = encoder(input_ids=torch.tensor(inputs),
                     attention_mask=torch.tensor(inputs > 0)).last_hidden_state.numpy()
  params = {**params, "encoder": {**params["encoder"], "prompt": {"prompt": {"prompt": prompt}}}}
  ours, mask = network.T5(config, prompts.PromptConfig(PROMPT_LENGTH)).apply(
      {"params": params}, jnp.asarray(inputs), method="encode")
  mask = np.asarray(mask)
  assert mask.shape == (3, PROMPT_LENGTH + inputs.shape[1]) and mask[:, :PROMPT_LENGTH].all()
  np.testing.assert_array_less(np.abs(np.asarray(ours)[mask] - theirs[mask]).max(), 1e-4)


def test_round_trip_is_exact(tmp_path):
  prompt = _random_prompt(4)
  peft_interchange.export_peft_adapter(prompt, str(tmp_path), "google/t5-v1_1-base")
  imported = peft_interchange.import_peft_adapter(str(tmp_path))
  assert imported.dtype == np.float32
  np.testing.assert_array_equal(imported, prompt)
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


def test_bfloat16_prompts_travel_as_float32(tmp_path):
  """A bfloat16 prompt exports, and a bfloat16 adapter (saved from a bfloat16 model) imports."""
  prompt = jnp.asarray(_random_prompt(9), jnp.bfloat16)
  peft_interchange.export_peft_adapter(prompt, str(tmp_path), "t5", overwrite=True)
  np.testing.assert_array_equal(peft_interchange.import_peft_adapter(str(tmp_path)),
                                np.asarray(prompt, np.float32))
  safetensors.flax.save_file({"prompt_embeddings": prompt}, str(tmp_path / "adapter_model.safetensors"))
  np.testing.assert_array_equal(peft_interchange.import_peft_adapter(str(tmp_path)),
                                np.asarray(prompt, np.float32))


def test_adapter_trained_by_peft_imports_with_its_logits(saved, tmp_path):
  """PEFT's own seq2seq adapter (a `[2P, E]` table by default) gives the same logits in our model."""
  path, _, params, apply = saved
  model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  peft_model = peft.get_peft_model(
      model, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=PROMPT_LENGTH))
  table = peft_model.prompt_encoder["default"].embedding.weight
  assert tuple(table.shape) == (2 * PROMPT_LENGTH, 16)
  with torch.no_grad():
    table.normal_(0.0, 1.0)
  peft_model.save_pretrained(tmp_path)

  prompt = peft_interchange.import_peft_adapter(str(tmp_path))
  np.testing.assert_array_equal(prompt, table.detach().numpy()[:PROMPT_LENGTH])
  _assert_close_on_targets(_our_logits(apply, params, prompt), _peft_logits(peft_model.eval()))


def test_export_refuses_to_overwrite(tmp_path):
  peft_interchange.export_peft_adapter(_random_prompt(5), str(tmp_path), "t5")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    peft_interchange.export_peft_adapter(_random_prompt(6), str(tmp_path), "t5")
  np.testing.assert_array_equal(peft_interchange.import_peft_adapter(str(tmp_path)), _random_prompt(5))
  peft_interchange.export_peft_adapter(_random_prompt(6), str(tmp_path), "t5", overwrite=True)
  np.testing.assert_array_equal(peft_interchange.import_peft_adapter(str(tmp_path)), _random_prompt(6))


@pytest.mark.parametrize("prompt, task_type, message", [
    (np.zeros(16, np.float32), "SEQ_2_SEQ_LM", "shape \\(16,\\)"),
    (np.zeros((5, 16), np.int32), "SEQ_2_SEQ_LM", "int32"),
    (np.zeros((5, 16), np.float32), "CAUSAL_LM", "CAUSAL_LM"),
])
def test_export_rejects_bad_arguments(tmp_path, prompt, task_type, message):
  with pytest.raises(ValueError, match=message):
    peft_interchange.export_peft_adapter(prompt, str(tmp_path), "t5", task_type=task_type)
  assert not list(tmp_path.iterdir())


def _write_adapter(directory, config_changes=None, table_shape=(PROMPT_LENGTH, 16), extra=None):
  """An exported adapter with its config fields or its table replaced."""
  peft_interchange.export_peft_adapter(_random_prompt(7), str(directory), "t5")
  config_path = directory / "adapter_config.json"
  config = {**json.loads(config_path.read_text()), **(config_changes or {})}
  config_path.write_text(json.dumps(config))
  tensors = {"prompt_embeddings": np.zeros(table_shape, np.float32), **(extra or {})}
  (directory / "adapter_model.safetensors").write_bytes(safetensors.numpy.save(tensors))
  return str(directory)


@pytest.mark.parametrize("changes, message", [
    (dict(config_changes={"peft_type": "LORA"}), "peft_type is 'LORA'"),
    (dict(config_changes={"task_type": "CAUSAL_LM"}), "task_type 'CAUSAL_LM'"),
    (dict(config_changes={"num_transformer_submodules": 3}), "num_transformer_submodules is 3"),
    (dict(config_changes={"task_type": "FEATURE_EXTRACTION", "num_transformer_submodules": 2},
          table_shape=(2 * PROMPT_LENGTH, 16)), "only 1 is supported"),
    (dict(table_shape=(PROMPT_LENGTH, 8)), "implies \\(5, 16\\)"),
    # PEFT's seq2seq default (2) when the config leaves it out: the table must be [2P, E].
    (dict(config_changes={"num_transformer_submodules": None}), "implies \\(10, 16\\)"),
    (dict(extra={"other": np.zeros(2, np.float32)}), "holds \\['other', 'prompt_embeddings'\\]"),
])
def test_import_rejects_unsupported_adapters(tmp_path, changes, message):
  with pytest.raises(peft_interchange.AdapterError, match=message):
    peft_interchange.import_peft_adapter(_write_adapter(tmp_path, **changes))


def test_import_reports_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
    peft_interchange.import_peft_adapter(str(tmp_path / "nowhere"))
  directory = _write_adapter(tmp_path)
  (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
  with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
    peft_interchange.import_peft_adapter(directory)
  (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08not safetensors")
  with pytest.raises(peft_interchange.AdapterError, match="not a readable safetensors file"):
    peft_interchange.import_peft_adapter(directory)
  (tmp_path / "adapter_config.json").write_text("{")
  with pytest.raises(peft_interchange.AdapterError, match="not valid JSON"):
    peft_interchange.import_peft_adapter(directory)


@pytest.mark.parametrize("name", RELEASED)
def test_released_prompts_load_with_the_base_config(shared_dir, name):
  path = shared_dir / "prompts" / "t5_1_1_lm100k_base" / f"{name}.npy"
  base = config_lib.t5_config("t5_1_1_lm100k", "base")
  prompt = peft_interchange.load_released_prompt(str(path), base)
  assert prompt.shape == (100, base.emb_dim) and prompt.dtype == np.float32
  assert np.isfinite(prompt).all() and prompt.std() > 0
  with pytest.raises(ValueError, match=rf"{name}\.npy.*\(100, 768\).*emb_dim=512"):
    peft_interchange.load_released_prompt(str(path), config_lib.t5_config("t5_1_1_lm100k", "small"))


def test_released_prompt_errors_name_the_file(tmp_path):
  base = config_lib.t5_config("t5_1_1_lm100k", "base")
  with pytest.raises(FileNotFoundError, match="missing.npy"):
    peft_interchange.load_released_prompt(str(tmp_path / "missing.npy"), base)
  np.save(tmp_path / "flat.npy", np.zeros(768, np.float32))
  with pytest.raises(ValueError, match="flat.npy"):
    peft_interchange.load_released_prompt(str(tmp_path / "flat.npy"), base)


@pytest.fixture(scope="module")
def causal_saved(tmp_path_factory):
  """(HF Llama directory, its model, our config, params and jitted apply with a prefix prompt)."""
  from hf_causal_reference import random_causal_lm  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import causal_lm, hf_causal_lm  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("llama")
  model = random_causal_lm("llama", seed=9)
  model.save_pretrained(path)
  config, params = hf_causal_lm.load_checkpoint(str(path))
  apply = jax.jit(causal_lm.CausalLM(config, prompts.PromptConfig(PROMPT_LENGTH)).apply)
  return path, model, params, apply


def _causal_logits(causal_saved, prompt, peft_model=None):
  """(ours, PEFT's) logits at the input tokens `[3, 9]`."""
  _, _, params, apply = causal_saved
  tokens = np.random.default_rng(4).integers(3, 64, (3, 9))
  params = {**params, "decoder": {**params["decoder"], "prompt": {"prompt": {"prompt": prompt}}}}
  ours = np.asarray(apply({"params": params}, jnp.asarray(tokens)))
  if peft_model is None:
    return ours, None
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()[:, PROMPT_LENGTH:]
  return ours, theirs


def test_causal_lm_adapter_exports_to_peft(causal_saved, tmp_path):
  path, _, _, _ = causal_saved
  prompt = _random_prompt(11)
  peft_interchange.export_causal_lm_adapter(prompt, str(tmp_path), str(path))
  assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
  model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path))
  assert isinstance(peft_model, peft.PeftModelForCausalLM)
  ours, theirs = _causal_logits(causal_saved, prompt, peft_model)
  np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4)
  assert np.abs(theirs).max() > 1.0
  np.testing.assert_array_equal(peft_interchange.import_causal_lm_adapter(str(tmp_path)), prompt)


def test_causal_lm_adapter_trained_by_peft_imports_with_its_logits(causal_saved, tmp_path):
  _, model, _, _ = causal_saved
  peft_model = peft.get_peft_model(model, peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_LENGTH))
  table = peft_model.prompt_encoder["default"].embedding.weight
  with torch.no_grad():
    table.normal_(0.0, 1.0)
  peft_model.save_pretrained(tmp_path)
  prompt = peft_interchange.import_causal_lm_adapter(str(tmp_path))
  np.testing.assert_array_equal(prompt, table.detach().numpy())
  ours, theirs = _causal_logits(causal_saved, prompt, peft_model.eval())
  np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4)
  # A causal adapter is no T5 prompt, and a T5 adapter no causal one.
  with pytest.raises(peft_interchange.AdapterError, match="task_type 'CAUSAL_LM'"):
    peft_interchange.import_peft_adapter(str(tmp_path))
  with pytest.raises(peft_interchange.AdapterError, match="task_type 'SEQ_2_SEQ_LM'"):
    peft_interchange.import_causal_lm_adapter(_write_adapter(tmp_path / "t5"))
  with pytest.raises(ValueError, match="int32"):
    peft_interchange.export_causal_lm_adapter(np.zeros((2, 16), np.int32), str(tmp_path / "x"), "m")
