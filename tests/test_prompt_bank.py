"""A prompt bank: a mixed batch equals, row for row, each row run alone with its own prompt."""
import functools

import jax
import numpy as np
import pytest

from prompt_tuning_jax import decoding, network, prompts, scoring

INPUTS = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0], [11, 12, 13, 14, 15, 1],
                   [16, 1, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([[20, 21, 1], [22, 1, 0], [23, 24, 1], [25, 26, 1]], np.int32)
LENGTHS = (4, 2, 3)  # three tasks' prompts, padded to 4 in the bank


@pytest.fixture(scope="module")
def bank(tiny_config):
  rng = np.random.RandomState(0)
  return [rng.normal(size=(n, tiny_config.emb_dim)).astype(np.float32) for n in LENGTHS]


def _with_prompt(params, prompt):
  return dict(params, encoder=dict(params["encoder"], prompt={"prompt": {"prompt": prompt}}))


@pytest.mark.parametrize("combine", ["prefix", "prefix_after_bos", "suffix"])
def test_mixed_batch_equals_each_task_alone(tiny_config, tiny_params, bank, combine):
  capacity, width = 5, max(LENGTHS)
  table = np.zeros((capacity, width, tiny_config.emb_dim), np.float32)
  for i, prompt in enumerate(bank):
    table[i, :len(prompt)] = prompt
  ids = np.array([2, 0, 1, 0], np.int32)
  lengths = np.array(LENGTHS + (0, 0))[ids]
  mixed_model = network.T5(tiny_config, prompts.PromptConfig(width, combine=combine,
                                                             bank_size=capacity))
  mixed_params = _with_prompt(tiny_params, table)
  mixed_logits = jax.jit(lambda p: mixed_model.apply(
      {"params": p}, INPUTS, scoring.shift_right(TARGETS), TARGETS, prompt_ids=ids,
      prompt_lengths=lengths))(mixed_params)
  mixed_tokens, _ = jax.jit(functools.partial(decoding.greedy_decode, mixed_model,
                                              max_decode_length=5))(
      mixed_params, INPUTS, prompt_ids=ids, prompt_lengths=lengths) \
      if combine != "prefix_after_bos" else (None, None)
  for task in set(ids.tolist()):  # each task's rows, run alone with its own prompt
    rows = np.flatnonzero(ids == task)
    alone = network.T5(tiny_config, prompts.PromptConfig(LENGTHS[task], combine=combine))
    alone_params = _with_prompt(tiny_params, bank[task])
    logits = jax.jit(lambda p, x, t: alone.apply({"params": p}, x, scoring.shift_right(t), t))(
        alone_params, INPUTS[rows], TARGETS[rows])
    real = TARGETS[rows] > 0
    np.testing.assert_allclose(np.asarray(mixed_logits)[rows][real], np.asarray(logits)[real],
                               atol=1e-5)
    if combine != "prefix_after_bos":  # decoding reads the same encoder output; two modes suffice
      tokens, _ = jax.jit(functools.partial(decoding.greedy_decode, alone, max_decode_length=5))(
          alone_params, INPUTS[rows])
      np.testing.assert_array_equal(np.asarray(mixed_tokens)[rows], tokens)


def test_replacing_a_prompt_does_not_recompile(tiny_config, tiny_params, bank):
  model = network.T5(tiny_config, prompts.PromptConfig(4, bank_size=3))
  traces = []

  def forward(p, ids, n):
    traces.append(1)  # runs once per compilation
    return model.apply({"params": p}, INPUTS, scoring.shift_right(TARGETS), TARGETS, prompt_ids=ids,
                       prompt_lengths=n)
  apply = jax.jit(forward)
  table = np.zeros((3, 4, tiny_config.emb_dim), np.float32)
  ids, lengths = np.array([0, 0, 1, 1], np.int32), np.array([4, 4, 2, 2], np.int32)
  first = apply(_with_prompt(tiny_params, table), ids, lengths)
  # A new array: on CPU jax may alias a numpy argument, and the first call may still be running.
  table = table.copy()
  table[1, :2] = bank[1]
  second = apply(_with_prompt(tiny_params, table), ids, lengths)
  assert len(traces) == 1
  np.testing.assert_array_equal(first[:2], second[:2])
  assert not np.allclose(first[2:], second[2:])


def test_bank_needs_ids_and_single_prompt_refuses_them(tiny_config, tiny_params):
  banked = network.T5(tiny_config, prompts.PromptConfig(2, bank_size=2))
  table = np.zeros((2, 2, tiny_config.emb_dim), np.float32)
  with pytest.raises(ValueError, match="needs prompt_ids"):
    banked.apply({"params": _with_prompt(tiny_params, table)}, INPUTS, TARGETS)
  single = network.T5(tiny_config, prompts.PromptConfig(2))
  with pytest.raises(ValueError, match="need a prompt bank"):
    single.apply({"params": _with_prompt(tiny_params, table[0])}, INPUTS, TARGETS,
                 prompt_ids=np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="bank_size must be positive"):
    prompts.PromptConfig(2, bank_size=0)
