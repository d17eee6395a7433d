"""Batches of converted seqio examples: one fixed shape, or a few input-length buckets.

T5X pads every example to TASK_FEATURE_LENGTHS. On data of mixed lengths (RTE's inputs run from 20 to
over 300 tokens) most of that is padding that the encoder still computes. With `length_buckets`, a
training example goes to the shortest bucket that holds its input tokens and batches form within a
bucket (`batch`), so a run compiles one train step per bucket (a bounded set of shapes) and pads
little. Evaluation sorts its (finite) examples by input length and cuts each batch to a bucket
(`batches_by_length`): every example kept, and only the last batch short.
"""
from typing import Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf


def check_length_buckets(length_buckets: Sequence[int], input_length: int,
                         name: str = "DatasetConfig.length_buckets",
                         limit_name: str = "TASK_FEATURE_LENGTHS['inputs']") -> tuple[int, ...]:
  """The sorted buckets, with `input_length` as the last; names a bucket that cannot be used, and
  buckets on several hosts (each host would pick its own shapes). `name` is the setting, `limit_name`
  the one that sets `input_length`."""
  bad = [b for b in length_buckets if not isinstance(b, int) or b <= 0 or b > input_length]
  if bad:
    raise ValueError(f"{name}={list(length_buckets)}: {bad} not a positive integer up to "
                     f"{limit_name}={input_length}. Give input lengths (before "
                     f"the prompt), e.g. [64, 128, {input_length}].")
  if length_buckets and jax.process_count() > 1:
    raise ValueError(f"{name} give each host its own batch shapes; on several hosts leave them "
                     f"empty (every batch then has {limit_name}'s shape).")
  return tuple(sorted(set(length_buckets) | {input_length}))


def batch(dataset: tf.data.Dataset, batch_size: int, input_length: int,
          length_buckets: Sequence[int] = ()) -> tf.data.Dataset:
  """Batches of `batch_size` (the remainder dropped) of `EncDecFeatureConverter(pack=False)` output.

  Without buckets every batch is `[batch, input_length]`. With them `encoder_input_tokens` is
  `[batch, bucket]`, the bucket being the shortest that holds each of the batch's examples; the other
  features keep their shapes. The order is a deterministic function of the dataset's. tf.data makes
  the next batches in its own threads (`prefetch`) while the caller uses this one.
  """
  if not length_buckets:
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  buckets = check_length_buckets(length_buckets, input_length)

  def trim(example):
    tokens = example["encoder_input_tokens"]
    real = tf.reduce_sum(tf.cast(tokens > 0, tf.int32))  # unpacked examples pad only at the end
    return dict(example, encoder_input_tokens=tokens[:real])

  trimmed = dataset.map(trim, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return trimmed.bucket_by_sequence_length(
      lambda example: tf.shape(example["encoder_input_tokens"])[0],
      bucket_boundaries=[b + 1 for b in buckets],  # bucket i holds lengths up to buckets[i]
      bucket_batch_sizes=[batch_size] * (len(buckets) + 1), pad_to_bucket_boundary=True,
      drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def pad_rows(array: np.ndarray, batch_size: int) -> np.ndarray:
  """`[rows, ...]` padded with zero rows to `[batch_size, ...]` (a short last batch at a fixed shape)."""
  return np.pad(array, [(0, batch_size - len(array))] + [(0, 0)] * (array.ndim - 1))


def batches_by_length(examples: Iterable[Mapping[str, np.ndarray]], batch_size: int,
                      length_buckets: Sequence[int]) -> Iterator[dict[str, np.ndarray]]:
  """A finite set of converted examples (an eval split) in batches of up to `batch_size`, sorted by
  input length: each batch's `encoder_input_tokens` `[rows, length]` cut to `[rows, bucket]`, the
  shortest of `length_buckets` that holds its longest example (all of `length` if none does).

  Every example comes once, only the last batch is short, and the examples are held in memory.
  """
  examples = list(examples)
  lengths = [int(np.count_nonzero(e["encoder_input_tokens"])) for e in examples]
  order = np.argsort(lengths, kind="stable")
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    features = {k: np.stack([examples[i][k] for i in chunk]) for k in examples[chunk[0]]}
    longest = max(lengths[i] for i in chunk)
    tokens = features["encoder_input_tokens"]
    width = min((b for b in length_buckets if b >= longest), default=tokens.shape[1])
    features["encoder_input_tokens"] = tokens[:, :width]
    yield features
