"""Generation with the shared-prompt key/value cache (`causal_decoding.generate`): identical to
step-by-step full forward passes (greedy and sampling, single prompts and mixed banks, sliding
windows shorter than the sequence), and greedy generations identical to transformers' `generate`
and to PEFT's with its prompt."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import causal_decoding, causal_lm, decoding, hf_causal_lm, prompts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_causal_reference import BOS, EOS, VOCAB, random_causal_lm  # noqa: E402  (needs torch)

PROMPT_LENGTH = 3
STEPS = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """`saved(family)`: (HF model, its directory, our config, our params), each made once."""
  cache = {}

  def get(family):
    if family not in cache:
      model = random_causal_lm(family, seed=5)
      path = tmp_path_factory.mktemp(family)
      model.save_pretrained(path)
      cache[family] = (model, path) + hf_causal_lm.load_checkpoint(str(path))
    return cache[family]
  return get


def _rows():
  """Left-padded rows `[4, 7]` that start with BOS, and their mask."""
  rng = np.random.default_rng(7)
  tokens, mask = np.zeros((4, 7), np.int32), np.zeros((4, 7), bool)
  for row, pad in enumerate((0, 2, 4, 1)):
    tokens[row, pad:] = np.concatenate([[BOS], rng.integers(3, VOCAB, 6 - pad)])
    mask[row, pad:] = True
  return tokens, mask


# (family, PromptConfig or None, prompt_ids, prompt_lengths): no prompt; one prompt first (PEFT's
# placement); a bank of 2 after BOS, mixed rows, one prompt shorter.
SETUPS = {
    **{f"{family}-no-prompt": (family, None, None, None) for family in ("gemma2", "gemma3")},
    "llama-prefix": ("llama", prompts.PromptConfig(PROMPT_LENGTH, combine="prefix"), None, None),
    "gemma3-bank-after-bos": ("gemma3", prompts.PromptConfig(PROMPT_LENGTH, bank_size=2,
                                                             combine="prefix_after_bos"),
                              np.array([1, 0, 1, 0]), np.array([2, 3, 2, 3])),
}


def _setup(saved, name):
  family, prompt_config, prompt_ids, prompt_lengths = SETUPS[name]
  _, _, config, params = saved(family)
  if prompt_config is not None:
    shape = ((prompt_config.bank_size,) if prompt_config.bank_size else ()) + (PROMPT_LENGTH, 16)
    prompt = np.random.default_rng(3).normal(0.0, 1.0, shape).astype(np.float32)
    params = {**params, "decoder": {**params["decoder"], "prompt": {"prompt": {"prompt": prompt}}}}
  return causal_lm.CausalLM(config, prompt_config), params, prompt_ids, prompt_lengths


@pytest.fixture(scope="module")
def generator(saved):
  """`generator(setup name, **settings)`: (model, params, prompt_ids, prompt_lengths, jitted
  `generate`), each compiled once."""
  cache = {}

  def get(name, **settings):
    key = (name, tuple(sorted(settings.items())))
    if key not in cache:
      model, params, prompt_ids, prompt_lengths = _setup(saved, name)
      cache[key] = (model, params, prompt_ids, prompt_lengths, jax.jit(functools.partial(
          causal_decoding.generate, model, max_new_tokens=STEPS, eos_id=EOS, bos_id=BOS,
          **settings)))
    return cache[key]
  return get


def _step_by_step(model, params, tokens, mask, choose, prompt_ids, prompt_lengths):
  """The reference: a full forward pass over the rows and what was generated so far for every new
  token, `choose(step, logits)` picking it; returns tokens and log-likelihoods as `generate`.
  The rows get room for the new tokens at the end (masked until written), so one shape compiles."""
  forward = jax.jit(model.apply)
  batch, length = tokens.shape
  tokens = np.concatenate([tokens, np.zeros((batch, STEPS), np.int32)], axis=1)
  mask = np.concatenate([mask, np.zeros((batch, STEPS), bool)], axis=1)
  done = np.zeros(batch, bool)
  out, log_likelihood = np.zeros((batch, STEPS), np.int32), np.zeros(batch)
  for step in range(STEPS):
    logits = np.asarray(forward({"params": params}, tokens, mask, prompt_ids,
                                prompt_lengths))[:, length + step - 1]
    chosen = np.where(done, 0, np.asarray(choose(step, jnp.asarray(logits))))
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    log_likelihood += np.where(done, 0.0, log_probs[np.arange(batch), chosen])
    out[:, step] = chosen
    done |= chosen == EOS
    tokens[:, length + step], mask[:, length + step] = chosen, True
  return out, log_likelihood


@pytest.mark.parametrize("name", ["gemma2-no-prompt", "llama-prefix", "gemma3-bank-after-bos"])
def test_greedy_generation_equals_step_by_step_full_passes(generator, name):
  model, params, prompt_ids, prompt_lengths, generate = generator(name)
  tokens, mask = _rows()
  out, log_likelihood = generate(params, tokens, mask, prompt_ids=prompt_ids,
                                 prompt_lengths=prompt_lengths)
  expected, expected_ll = _step_by_step(model, params, tokens, mask,
                                        lambda _, logits: jnp.argmax(logits, -1), prompt_ids,
                                        prompt_lengths)
  np.testing.assert_array_equal(np.asarray(out), expected)
  np.testing.assert_allclose(np.asarray(log_likelihood), expected_ll, atol=1e-4)
  assert len(np.unique(expected)) > 3  # real sequences, not one repeated token


def test_sampling_equals_step_by_step_full_passes(generator):
  settings = dict(temperature=0.7, top_k=20, top_p=0.9)
  model, params, prompt_ids, prompt_lengths, generate = generator("gemma3-bank-after-bos",
                                                                  **settings)
  tokens, mask = _rows()
  rng = jax.random.PRNGKey(11)
  out, _ = generate(params, tokens, mask, rng, prompt_ids=prompt_ids,
                    prompt_lengths=prompt_lengths)
  keys = []
  for _ in range(STEPS):  # generate's key sequence
    rng, key = jax.random.split(rng)
    keys.append(key)
  filtered = lambda logits: decoding.filter_logits(
      logits / settings["temperature"], settings["top_k"], settings["top_p"])
  not_greedy = []
  categorical = jax.jit(lambda key, logits: jax.random.categorical(key, filtered(logits)))

  def sample(step, logits):
    chosen = categorical(keys[step], logits)
    not_greedy.append(np.asarray(chosen != jnp.argmax(logits, -1)).any())
    return chosen

  expected, _ = _step_by_step(model, params, tokens, mask, sample, prompt_ids, prompt_lengths)
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert any(not_greedy)  # sampling sampled


# Llama's generate is compared with a prompt, through PEFT's, below.
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_greedy_generation_equals_transformers_generate(saved, generator, family):
  model = saved(family)[0]
  _, params, _, _, generate = generator(f"{family}-no-prompt")
  tokens, mask = _rows()
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(mask.astype(np.int64)),
                            max_new_tokens=STEPS, do_sample=False, eos_token_id=EOS,
                            pad_token_id=0).numpy()[:, tokens.shape[1]:]
  expected = np.zeros((len(tokens), STEPS), np.int64)
  expected[:, :theirs.shape[1]] = theirs
  out, _ = generate(params, tokens, mask)
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert len(np.unique(expected)) > 3


def test_greedy_generation_equals_peft_generate_with_its_prompt(saved, generator):
  """PEFT's CAUSAL_LM prompt; its `generate` keeps the prompt only without a cache (peft #2123)."""
  peft = pytest.importorskip("peft")
  _, params, _, _, generate = generator("llama-prefix")
  prompt = params["decoder"]["prompt"]["prompt"]["prompt"]
  peft_model = peft.get_peft_model(saved("llama")[0], peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_LENGTH))
  with torch.no_grad():
    peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(prompt))
  # Unpadded rows: PEFT's generate ignores position ids, so a padded row's would count the padding.
  tokens = np.random.default_rng(8).integers(3, VOCAB, _rows()[0].shape).astype(np.int32)
  tokens[:, 0] = BOS
  with torch.no_grad():
    theirs = peft_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                 attention_mask=torch.ones(tokens.shape, dtype=torch.long),
                                 max_new_tokens=STEPS, do_sample=False, eos_token_id=EOS,
                                 pad_token_id=0, use_cache=False).numpy()[:, tokens.shape[1]:]
  expected = np.zeros((len(tokens), STEPS), np.int64)
  expected[:, :theirs.shape[1]] = theirs
  out, _ = generate(params, tokens, np.ones(tokens.shape, bool))
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert len(np.unique(expected)) > 3


def test_prompts_are_prefilled_once_each(saved):
  """The prompt phase runs on the bank's N prompts whatever the batch: `[N, P + 1]` positions."""
  model, params, _, _ = _setup(saved, "gemma3-bank-after-bos")
  kv, layout = jax.jit(functools.partial(causal_decoding.prefill_prompts, model, bos_id=BOS))(
      params, jnp.array([3, 2]))
  assert len(kv) == 3 and kv[0][0].shape == (2, PROMPT_LENGTH + 1, 2, 6)
  np.testing.assert_array_equal(np.asarray(layout.mask), [[1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(layout.pinned), [[0, 1, 1, 1], [0, 1, 1, 0]])


@pytest.mark.parametrize("prompt_config, bos_id, message", [
    (prompts.PromptConfig(2, combine="suffix"), BOS, "combine='suffix'"),
    (prompts.PromptConfig(2, combine="prefix_after_bos"), None, "needs bos_id"),
])
def test_unshareable_settings_are_refused(saved, prompt_config, bos_id, message):
  _, _, config, _ = saved("llama")
  tokens, mask = _rows()
  with pytest.raises(ValueError, match=message):
    causal_decoding.generate(causal_lm.CausalLM(config, prompt_config), {}, tokens, mask,
                             max_new_tokens=2, eos_id=EOS, bos_id=bos_id)
