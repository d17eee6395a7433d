"""Mixed-task serving: one frozen T5, a bank of soft prompts, one compiled graph for any mix of tasks.

`PromptServer` loads the frozen model once and keeps up to `capacity` prompts of up to
`max_prompt_length` positions in a `[capacity, max_prompt_length, embed]` table (shorter prompts are
padded and masked). Each request names its task; a batch may mix tasks freely. Batches and inputs are
padded to fixed shapes and the table is an argument of the compiled functions, so adding, replacing or
removing a prompt never recompiles. With `length_buckets` (input lengths, before the prompt) the
requests go sorted by input length and each batch is cut to the shortest bucket that holds it, as
evaluation does: one compile per bucket used instead of every batch at `max_input_length`:

  server = PromptServer(config, frozen, capacity=8, max_prompt_length=100, vocabulary=vocab,
                        batch_size=32, max_input_length=512, max_decode_length=8,
                        length_buckets=(64, 128, 256))
  server.add_prompt("rte", np.load("rte.npy"))
  server.predict([("rte", "premise: ... hypothesis: ..."), ("sst2", "sentence: ...")])
"""
import collections
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from prompt_tuning_jax import (batching, checkpoints, decoding, freezing, prompts, scoring, trees,
                               xla_cpu)
from prompt_tuning_jax.config import ExecutionConfig, T5Config
from prompt_tuning_jax.network import T5

# A request: (task name, input text).
Request = tuple[str, str]


def bank_model(model_config: T5Config, capacity: int, max_prompt_length: int,
               prompt_combine: str = "prefix", execution: ExecutionConfig = ExecutionConfig()) -> T5:
  """The T5 whose prompt is a bank `[capacity, max_prompt_length, embed]` picked per row."""
  return T5(model_config, prompts.PromptConfig(max_prompt_length, combine=prompt_combine,
                                               bank_size=capacity), execution)


def with_prompt_bank(frozen: Mapping[str, Any], table) -> dict[str, Any]:
  """The full params: the frozen tree plus the prompt table `[capacity, length, embed]`."""
  return freezing.merge(trees.unflatten({checkpoints.PROMPT_PATH: table}), frozen)


def stack_prompts(prompt_arrays: Sequence[np.ndarray],
                  max_prompt_length: int) -> tuple[np.ndarray, np.ndarray]:
  """`[length_i, embed]` prompts -> the zero-padded table `[n, max_prompt_length, embed]`, lengths `[n]`."""
  table = np.zeros((len(prompt_arrays), max_prompt_length, prompt_arrays[0].shape[1]), np.float32)
  for i, prompt in enumerate(prompt_arrays):
    table[i, :len(prompt)] = prompt
  return table, np.array([len(p) for p in prompt_arrays], np.int32)


def encode_inputs(vocabulary: seqio.Vocabulary, texts: Sequence[str], length: int) -> np.ndarray:
  """Texts -> `[len(texts), length]` ids, each trimmed to `length - 1` then EOS (as seqio), 0-padded."""
  tokens = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    ids = list(vocabulary.encode(text))[:length - 1] + [vocabulary.eos_id]
    tokens[i, :len(ids)] = ids
  return tokens


def encode_labels(vocabulary: seqio.Vocabulary, labels: Sequence[str], length: int) -> np.ndarray:
  """Label words -> targets `[len(labels), length]` (ids, EOS, 0-padding); a label must fit whole."""
  if not labels:
    raise ValueError("The label set is empty; give at least one label.")
  targets = np.zeros((len(labels), length), np.int32)
  for i, label in enumerate(labels):
    ids = list(vocabulary.encode(label)) + [vocabulary.eos_id]
    if len(ids) > length:
      raise ValueError(f"The label {label!r} is {len(ids)} tokens with EOS, more than the "
                       f"{length} the decoder allows (max_decode_length).")
    targets[i, :len(ids)] = ids
  return targets


def decode_tokens(vocabulary: seqio.Vocabulary, tokens: np.ndarray) -> list[str]:
  """Decoded rows `[n, length]` (0 after EOS) -> their texts."""
  return [vocabulary.decode([int(t) for t in row if t != 0]) for row in tokens]


class PromptServer:
  """Serves any mix of tasks from one frozen model and a prompt bank, with one compile per function
  (and per length bucket used).

  `traces` counts how often each compiled function ("predict", "score") was traced.
  """

  def __init__(self, model_config: T5Config, frozen_params: Mapping[str, Any], capacity: int,
               max_prompt_length: int, vocabulary: seqio.Vocabulary, batch_size: int,
               max_input_length: int, max_decode_length: int, prompt_combine: str = "prefix",
               length_buckets: Sequence[int] = (),
               execution: ExecutionConfig = ExecutionConfig(attention="auto")):
    """`frozen_params`: the plain model's params, nested or flat (`{path: array}`), without a prompt.
    `length_buckets`: input lengths up to `max_input_length` to cut batches to (none: every batch
    at `max_input_length`). `execution` is resolved for JAX's default devices."""
    for name, value in (("batch_size", batch_size), ("max_input_length", max_input_length),
                        ("max_decode_length", max_decode_length)):
      if value <= 0:
        raise ValueError(f"PromptServer: {name} must be positive, got {value}.")
    flat = trees.flatten(frozen_params)
    if checkpoints.PROMPT_PATH in flat:
      raise ValueError(f"frozen_params hold a prompt ({checkpoints.PROMPT_PATH}); the server's "
                       "prompts come from add_prompt.")
    execution = execution.for_platform(jax.devices()[0].platform, model_config)
    self.model = bank_model(model_config, capacity, max_prompt_length, prompt_combine, execution)
    self.vocabulary = vocabulary
    self.batch_size, self.max_input_length = batch_size, max_input_length
    self.max_decode_length = max_decode_length
    self.length_buckets = batching.check_length_buckets(length_buckets, max_input_length,
                                                        "length_buckets", "max_input_length")
    self._frozen = jax.device_put(trees.unflatten(flat))
    self._table = np.zeros((capacity, max_prompt_length, model_config.emb_dim), np.float32)
    self._lengths = np.zeros(capacity, np.int32)
    self._slots: dict[str, int] = {}
    self._device_table = jnp.array(self._table)
    self.traces: collections.Counter = collections.Counter()
    self._predict = jax.jit(self._predict_batch,
                            compiler_options=xla_cpu.dot_compiler_options(onednn=False))
    self._score = jax.jit(self._score_batch,
                          compiler_options=xla_cpu.dot_compiler_options())

  @property
  def tasks(self) -> list[str]:
    return sorted(self._slots)

  def add_prompt(self, task: str, prompt_array: np.ndarray) -> None:
    """Loads a task's prompt `[length, embed]` into a free slot of the bank."""
    if task in self._slots:
      raise ValueError(f"Task {task!r} already has a prompt; use replace() to change it.")
    free = sorted(set(range(len(self._lengths))) - set(self._slots.values()))
    if not free:
      raise ValueError(f"The prompt bank is full ({len(self._lengths)} prompts: {self.tasks}); "
                       "remove one or build the server with a larger capacity.")
    self._write(free[0], prompt_array)
    self._slots[task] = free[0]

  def replace(self, task: str, prompt_array: np.ndarray) -> None:
    """Swaps a task's prompt for another `[length, embed]` one."""
    self._write(self._slot(task), prompt_array)

  def remove(self, task: str) -> None:
    """Frees a task's slot."""
    self._slots.pop(self._check_task(task))

  def predict(self, requests: Sequence[Request]) -> list[str]:
    """Greedy-decoded text for each (task, inputs) request, in order."""
    return decode_tokens(self.vocabulary, self.predict_tokens(requests))

  def predict_tokens(self, requests: Sequence[Request]) -> np.ndarray:
    """Greedy-decoded ids `[len(requests), max_decode_length]` (0 after EOS)."""
    tokens = np.zeros((len(requests), self.max_decode_length), np.int32)
    for rows, inputs, ids, lengths in self._batches(requests):
      batch_tokens = self._predict(self._frozen, self._device_table, inputs, ids, lengths)
      tokens[rows] = np.asarray(batch_tokens)[:len(rows)]
    return tokens

  def score(self, requests: Sequence[Request], labels: Sequence[str]) -> np.ndarray:
    """Log-likelihood of each label given each request: `[len(requests), len(labels)]`."""
    targets = encode_labels(self.vocabulary, labels, self.max_decode_length)
    scores = np.zeros((len(requests), len(labels)), np.float32)
    for rows, inputs, ids, lengths in self._batches(requests):
      batch_scores = self._score(self._frozen, self._device_table, inputs, targets, ids, lengths)
      scores[rows] = np.asarray(batch_scores)[:len(rows)]
    return scores

  def _predict_batch(self, frozen, table, inputs, prompt_ids, prompt_lengths):
    """`[batch, in_len]` -> `[batch, max_decode_length]` greedy tokens."""
    self.traces["predict"] += 1
    return decoding.greedy_decode(self.model, with_prompt_bank(frozen, table), inputs,
                                  max_decode_length=self.max_decode_length,
                                  eos_id=self.vocabulary.eos_id, prompt_ids=prompt_ids,
                                  prompt_lengths=prompt_lengths)[0]

  def _score_batch(self, frozen, table, inputs, label_targets, prompt_ids, prompt_lengths):
    """`[batch, in_len]`, `[labels, out_len]` -> log-likelihoods `[batch, labels]`."""
    self.traces["score"] += 1
    return scoring.rank_classify(self.model, with_prompt_bank(frozen, table), inputs, label_targets,
                                 prompt_ids, prompt_lengths)[1]

  def _batches(self, requests: Sequence[Request]
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (the batch's request indices, inputs `[batch_size, width]`, prompt ids and lengths
    `[batch_size]`), the requests sorted by input length (`batching.batches_by_length`); `width` is
    the shortest of `length_buckets` (which end with `max_input_length`) that holds the batch.
    Padding rows are empty inputs on slot 0 with a zero-length prompt."""
    slots = np.array([self._slot(task) for task, _ in requests], np.int32)
    tokens = encode_inputs(self.vocabulary, [text for _, text in requests], self.max_input_length)
    examples = ({"encoder_input_tokens": row, "slot": slot, "index": index}
                for index, (row, slot) in enumerate(zip(tokens, slots)))
    for batch in batching.batches_by_length(examples, self.batch_size, self.length_buckets):
      rows, ids = batch["index"], batch["slot"]
      pad = lambda x: batching.pad_rows(x, self.batch_size)
      yield rows, pad(batch["encoder_input_tokens"]), pad(ids), pad(self._lengths[ids])

  def _check_task(self, task: str) -> str:
    if task not in self._slots:
      raise ValueError(f"Unknown task {task!r}; the server has prompts for {self.tasks}.")
    return task

  def _slot(self, task: str) -> int:
    return self._slots[self._check_task(task)]

  def _write(self, slot: int, prompt_array: np.ndarray) -> None:
    """Puts a prompt into the table and refreshes the device copy (same shape: no recompile)."""
    prompt = np.asarray(prompt_array, np.float32)
    _, max_length, embed = self._table.shape
    if prompt.ndim != 2 or prompt.shape[1] != embed or not 0 < len(prompt) <= max_length:
      raise ValueError(f"A prompt must be [length, {embed}] with 0 < length <= {max_length} "
                       f"(max_prompt_length), got shape {prompt.shape}.")
    if not np.isfinite(prompt).all():
      raise ValueError("The prompt holds NaN or Inf values: its scores would be too, and no JSON "
                       "holds them; use a prompt saved before its run diverged.")
    self._table[slot] = 0.0
    self._table[slot, :len(prompt)] = prompt
    self._lengths[slot] = len(prompt)
    self._device_table = jnp.array(self._table)  # a copy: the host table changes in place
