"""The decoder-only model's soft prompt: its placement (after BOS, or first as PEFT puts it), left
padding, prompt banks, the sliding-window layers' pinned prompt, parity with transformers fed the
same embeddings and with PEFT's CAUSAL_LM prompt tuning (logits and a 20-step SGD trajectory)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio
import tensorflow as tf

from prompt_tuning_jax import causal_lm, hf_causal_lm, losses, partitioning, prompts, trainer
from prompt_tuning_jax.config import ExecutionConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_causal_reference import (BOS, VOCAB, WINDOW, additive_mask,  # noqa: E402  (needs torch)
                                 random_causal_lm)

PROMPT_LENGTH = 4
LENGTH = 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """`saved(family, **changes)`: (HF model, its directory, our config, our params), made once."""
  cache = {}

  def get(family, **changes):
    key = (family, tuple(sorted(changes.items())))
    if key not in cache:
      model = random_causal_lm(family, seed=3, **changes)
      path = tmp_path_factory.mktemp(family)
      model.save_pretrained(path)
      cache[key] = (model, path) + hf_causal_lm.load_checkpoint(str(path))
    return cache[key]
  return get


def _with_prompt(params, prompt):
  return {**params, "decoder": {**params["decoder"], "prompt": {"prompt": {"prompt": prompt}}}}


def _random_prompt(seed, length=PROMPT_LENGTH, embed=16):
  return np.random.default_rng(seed).normal(0.0, 1.0, (length, embed)).astype(np.float32)


def _batch(padding=(0, 3, 6)):
  """Tokens `[3, LENGTH]` starting with BOS, left-padded by `padding`, and their mask."""
  rng = np.random.default_rng(1)
  tokens = np.zeros((3, LENGTH), np.int64)
  mask = np.zeros((3, LENGTH), bool)
  for row, pad in enumerate(padding):
    tokens[row, pad:] = np.concatenate([[BOS], rng.integers(3, VOCAB, LENGTH - pad - 1)])
    mask[row, pad:] = True
  return tokens, mask


def _prompted_embeddings(model, tokens, mask, prompt, after_bos):
  """What we feed transformers: each row's embedded tokens with `prompt` after its BOS (or in front
  of it), kept left-padded; returns the embeddings, their mask, the prompt positions and where each
  input token went."""
  batch, length = tokens.shape
  total = length + prompt.shape[0]
  with torch.no_grad():
    embedded = model.get_input_embeddings()(torch.tensor(tokens)).numpy()
  out = np.zeros((batch, total, embedded.shape[-1]), np.float32)
  out_mask, pinned = np.zeros((batch, total), bool), np.zeros((batch, total), bool)
  token_index = np.zeros((batch, length), np.int64)
  for row in range(batch):
    first = int(np.argmax(mask[row]))
    start = first + after_bos
    pieces = [embedded[row, :start], prompt, embedded[row, start:]]
    out[row] = np.concatenate(pieces)
    out_mask[row] = np.concatenate([mask[row, :start], np.ones(len(prompt), bool),
                                    mask[row, start:]])
    pinned[row, start:start + len(prompt)] = True
    token_index[row] = np.where(np.arange(length) < start, np.arange(length),
                                np.arange(length) + len(prompt))
  return out, out_mask, pinned, token_index


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prompt_after_bos_matches_transformers_with_pinned_prompt(saved, family):
  """`prefix_after_bos`, left-padded rows, sliding windows shorter than the sequence: transformers
  fed the same embeddings, positions and our mask (the prompt visible to every sliding query)."""
  model, _, config, params = saved(family)
  prompt = _random_prompt(0)
  ours = causal_lm.CausalLM(config, prompts.PromptConfig(PROMPT_LENGTH, combine="prefix_after_bos"))
  tokens, mask = _batch()
  logits = np.asarray(jax.jit(ours.apply)({"params": _with_prompt(params, prompt)}, tokens, mask))

  embedded, full_mask, pinned, token_index = _prompted_embeddings(model, tokens, mask, prompt, True)
  masks = {"full_attention": additive_mask(full_mask, pinned),
           "sliding_attention": additive_mask(full_mask, pinned, WINDOW)}
  with torch.no_grad():
    expected = model(inputs_embeds=torch.tensor(embedded),
                     attention_mask=masks if family == "gemma3" else masks["full_attention"],
                     position_ids=torch.tensor(np.maximum(np.cumsum(full_mask, 1) - 1, 0))
                     ).logits.numpy()
  expected = np.take_along_axis(expected, token_index[..., None], axis=1)
  np.testing.assert_array_less(np.abs(logits[mask] - expected[mask]).max(), 1e-4)
  assert np.abs(expected[mask]).max() > 1.0
  if family == "gemma3":  # without pinning, the last tokens (beyond the window) see another model
    unpinned = {"full_attention": masks["full_attention"],
                "sliding_attention": additive_mask(full_mask, np.zeros_like(pinned), WINDOW)}
    with torch.no_grad():
      windowed = model(inputs_embeds=torch.tensor(embedded), attention_mask=unpinned,
                       position_ids=torch.tensor(np.maximum(np.cumsum(full_mask, 1) - 1, 0))
                       ).logits.numpy()
    windowed = np.take_along_axis(windowed, token_index[..., None], axis=1)
    assert np.abs(logits[0, -1] - windowed[0, -1]).max() > 1e-2


@pytest.mark.parametrize("combine", ["prefix", "prefix_after_bos"])
def test_left_padding_changes_nothing(saved, combine):
  _, _, config, params = saved("gemma3")
  apply = jax.jit(causal_lm.CausalLM(config, prompts.PromptConfig(PROMPT_LENGTH,
                                                                  combine=combine)).apply)
  variables = {"params": _with_prompt(params, _random_prompt(1))}
  tokens, mask = _batch(padding=(0, 0, 0))
  padded = np.zeros_like(tokens)
  padded[:, 3:] = tokens[:, :LENGTH - 3]
  unpadded = np.asarray(apply(variables, tokens))
  left = np.asarray(apply(variables, padded, np.broadcast_to(np.arange(LENGTH) >= 3, padded.shape)))
  np.testing.assert_allclose(left[:, 3:], unpadded[:, :LENGTH - 3], atol=1e-5)


def test_prompt_bank_rows_equal_their_own_prompts(saved):
  """A mixed batch from a bank `[2, P, E]` with shorter prompts gives each row its own prompt's
  logits."""
  _, _, config, params = saved("llama")
  bank = np.stack([_random_prompt(2), _random_prompt(3)])
  prompt_ids, prompt_lengths = np.array([0, 1, 1]), np.array([4, 2, 4])
  banked = causal_lm.CausalLM(config, prompts.PromptConfig(PROMPT_LENGTH, bank_size=2,
                                                          combine="prefix_after_bos"))
  tokens, mask = _batch()
  logits = np.asarray(jax.jit(banked.apply)({"params": _with_prompt(params, bank)}, tokens, mask,
                                            prompt_ids, prompt_lengths))
  for row in range(3):
    length = int(prompt_lengths[row])
    single = causal_lm.CausalLM(config, prompts.PromptConfig(length, combine="prefix_after_bos"))
    expected = np.asarray(jax.jit(single.apply)(
        {"params": _with_prompt(params, bank[prompt_ids[row], :length])}, tokens[row:row + 1],
        mask[row:row + 1]))
    np.testing.assert_allclose(logits[row][mask[row]], expected[0][mask[row]], atol=1e-5)


def _peft_model(model, prompt):
  peft_model = peft.get_peft_model(model, peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_LENGTH))
  table = peft_model.prompt_encoder["default"].embedding.weight
  assert tuple(table.shape) == prompt.shape
  with torch.no_grad():
    table.copy_(torch.tensor(prompt))
  return peft_model


# Gemma 3 with a window longer than prompt and tokens: PEFT's windows would drop the prompt where
# ours pin it (see test_prompt_after_bos_matches_transformers_with_pinned_prompt).
PEFT_MODELS = [("llama", {}), ("gemma3", {"sliding_window": 16})]


@pytest.mark.parametrize("family, changes", PEFT_MODELS)
def test_peft_prompt_gives_peft_logits(saved, family, changes):
  model, _, config, params = saved(family, **changes)
  prompt = _random_prompt(4)
  peft_model = _peft_model(model, prompt)
  tokens = _batch(padding=(0, 0, 0))[0]
  with torch.no_grad():
    expected = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()[:, PROMPT_LENGTH:]
  ours = causal_lm.CausalLM(config, prompts.PromptConfig(PROMPT_LENGTH, combine="prefix"))
  logits = np.asarray(jax.jit(ours.apply)({"params": _with_prompt(params, prompt)}, tokens))
  np.testing.assert_array_less(np.abs(logits - expected).max(), 1e-4)
  other = np.asarray(jax.jit(ours.apply)({"params": _with_prompt(params, _random_prompt(5))},
                                         tokens))
  assert np.abs(logits - other).max() > 1e-2  # the prompt matters


def _training_batch():
  """Right-padded rows `[BOS; inputs; targets]`: tokens `[4, LENGTH]`, their mask, the target
  mask, and the same rows as seqio's PrefixLM features (inputs and targets of up to 5 tokens)."""
  rng = np.random.default_rng(2)
  tokens = rng.integers(3, VOCAB, (4, LENGTH))
  tokens[:, 0] = BOS
  mask = np.ones((4, LENGTH), bool)
  targets = np.zeros((4, LENGTH), bool)
  rows = [(5, 10), (4, 8), (6, 9), (3, 6)]
  for row, (inputs, total) in enumerate(rows):
    mask[row, total:] = False
    targets[row, inputs:total] = True
  tokens[~mask] = 0
  dataset = tf.data.Dataset.from_generator(
      lambda: ({"inputs": tokens[row, 1:inputs], "targets": tokens[row, inputs:total]}
               for row, (inputs, total) in enumerate(rows)),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")})
  features = seqio.PrefixLMFeatureConverter(pack=False)(
      dataset, {"inputs": LENGTH // 2, "targets": LENGTH // 2}).batch(4)
  return tokens, mask, targets, next(features.as_numpy_iterator())


@pytest.mark.parametrize("family, changes", PEFT_MODELS)
def test_sgd_trajectory_matches_peft(saved, family, changes):
  """20 steps of plain SGD on the prompt through our train step, on seqio's PrefixLM features
  (the loss on target tokens only, averaged over them): PEFT's losses and prompt, and ours."""
  model, _, config, params = saved(family, **changes)
  steps, learning_rate = 20, 0.5
  prompt = _random_prompt(6)
  tokens, mask, targets, features = _training_batch()

  peft_model = _peft_model(model, prompt)
  trainable = [p for p in peft_model.parameters() if p.requires_grad]
  assert len(trainable) == 1
  optimizer = torch.optim.SGD(trainable, lr=learning_rate)
  labels = torch.tensor(np.where(targets, tokens, -100))
  theirs = []
  for _ in range(steps):
    optimizer.zero_grad()
    loss = peft_model(input_ids=torch.tensor(tokens),
                      attention_mask=torch.tensor(mask.astype(np.int64)), labels=labels).loss
    loss.backward()
    optimizer.step()
    theirs.append(loss.item())

  ours = causal_lm.CausalLM(config, prompts.PromptConfig(PROMPT_LENGTH, combine="prefix"))
  sgd = optax.sgd(learning_rate)
  step = jax.jit(functools.partial(
      trainer.train_step, model=ours, optimizer=sgd,
      loss_config=trainer.LossConfig(z_loss=0.0,
                                     loss_normalizing_factor=losses.NUM_REAL_TARGET_TOKENS)))
  state = trainer.TrainState.create({"decoder": {"prompt": {"prompt": {"prompt": prompt}}}}, sgd,
                                    jax.random.PRNGKey(0))
  trajectory = []
  for _ in range(steps):
    state, metrics = step(state, params, features)
    trajectory.append(float(metrics["loss"]))
  np.testing.assert_array_less(np.abs(np.array(trajectory) - np.array(theirs)).max(), 1e-4)
  assert theirs[-1] < theirs[0] - 0.1  # the prompt learned
  np.testing.assert_allclose(np.asarray(state.trainable["decoder"]["prompt"]["prompt"]["prompt"]),
                             trainable[0].detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("execution", [ExecutionConfig("cpu"), ExecutionConfig(remat_policy="full"),
                                       ExecutionConfig(remat_policy="dots")])
def test_other_execution_settings_give_the_same_logits_and_prompt_gradients(saved, execution):
  """ExecutionConfig(attention="cpu") (flash-style backward pass) and rematerialised layers compute
  the "xla" core's model."""
  _, _, config, params = saved("gemma3")
  tokens, mask = _batch()
  prompt_config = prompts.PromptConfig(PROMPT_LENGTH, combine="prefix_after_bos")

  def value_and_grad(execution):
    model = causal_lm.CausalLM(config, prompt_config, execution)
    logits = lambda prompt: model.apply({"params": _with_prompt(params, prompt)}, tokens, mask)
    loss = lambda prompt: jnp.sum(jnp.where(mask[..., None], logits(prompt), 0.0) ** 2)
    return jax.jit(jax.value_and_grad(loss))(_random_prompt(7))

  (xla_loss, xla_grad), (loss, grad) = value_and_grad(ExecutionConfig()), value_and_grad(execution)
  np.testing.assert_allclose(loss, xla_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, xla_grad, rtol=1e-4, atol=1e-4)
  assert np.abs(xla_grad).max() > 1e-2


def test_every_parameter_has_logical_axes(saved):
  _, _, config, _ = saved("gemma3")
  model = causal_lm.CausalLM(config.replace(qkv_bias=True), prompts.PromptConfig(PROMPT_LENGTH))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  shardings = partitioning.param_shardings(boxed, partitioning.make_mesh((1, 1)))
  assert len(jax.tree.leaves(shardings)) == len(leaves)
  assert set(causal_lm.param_shapes(config, PROMPT_LENGTH)) >= {causal_lm.PROMPT_PATH,
                                                                "decoder/layers_2/mlp/wo/kernel"}


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=4, num_kv_heads=3), "not a multiple of num_kv_heads=3"),
    (dict(family="gpt2"), "family='gpt2'"),
    (dict(sliding_layers=(5,)), "sliding_layers=\\(5,\\)"),
    (dict(activation="relu"), "activation='relu'"),
    (dict(head_dim=5), "must be even"),
])
def test_bad_configs_name_the_field(changes, message):
  with pytest.raises(ValueError, match=message):
    causal_lm.CausalLMConfig(**{**dict(num_layers=2, sliding_window=4), **changes})
