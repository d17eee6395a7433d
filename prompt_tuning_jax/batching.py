"""Training batches of converted seqio examples: one fixed shape, or a few input-length buckets.

T5X pads every example to TASK_FEATURE_LENGTHS. On data of mixed lengths (RTE's inputs run from 20 to
over 300 tokens) most of that is padding that the encoder still computes. With `length_buckets`, each
example goes to the shortest bucket that holds its input tokens and batches form within a bucket,
so a run compiles one train step per bucket (a bounded set of shapes) and pads little.
"""
from typing import Sequence

import tensorflow as tf


def check_length_buckets(length_buckets: Sequence[int], input_length: int) -> tuple[int, ...]:
  """The sorted buckets, with `input_length` as the last; names a bucket that cannot be used."""
  bad = [b for b in length_buckets if not isinstance(b, int) or b <= 0 or b > input_length]
  if bad:
    raise ValueError(f"train.length_buckets={list(length_buckets)}: {bad} not a positive integer up to "
                     f"TASK_FEATURE_LENGTHS['inputs']={input_length}. Give input lengths (before "
                     f"the prompt), e.g. [64, 128, {input_length}].")
  return tuple(sorted(set(length_buckets) | {input_length}))


def batch(dataset: tf.data.Dataset, batch_size: int, input_length: int,
          length_buckets: Sequence[int] = ()) -> tf.data.Dataset:
  """Batches of `batch_size` (the remainder dropped) of `EncDecFeatureConverter(pack=False)` output.

  Without buckets every batch is `[batch, input_length]`. With them `encoder_input_tokens` is
  `[batch, bucket]`, the bucket being the shortest that holds each of the batch's examples; the other
  features keep their shapes. The order is a deterministic function of the dataset's.
  """
  if not length_buckets:
    return dataset.batch(batch_size, drop_remainder=True)
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
      drop_remainder=True)
