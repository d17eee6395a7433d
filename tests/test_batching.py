"""Length-bucketed training batches: shapes, padding, order, and the settings that cannot work."""
import numpy as np
import pytest
import tensorflow as tf

from prompt_tuning_jax import batching

INPUT_LENGTH, TARGET_LENGTH = 16, 3


def _converted(lengths):
  """Examples shaped as `EncDecFeatureConverter(pack=False)` leaves them: padded to the lengths."""
  def example(i, n):
    tokens = np.zeros(INPUT_LENGTH, np.int32)
    tokens[:n] = np.arange(2, n + 2)
    targets = np.array([i + 2, 1, 0], np.int32)
    return {"encoder_input_tokens": tokens, "decoder_target_tokens": targets,
            "decoder_input_tokens": np.array([0, i + 2, 1], np.int32),
            "decoder_loss_weights": (targets > 0).astype(np.int32)}
  rows = [example(i, n) for i, n in enumerate(lengths)]
  return tf.data.Dataset.from_tensor_slices({k: np.stack([r[k] for r in rows]) for k in rows[0]})


def test_without_buckets_every_batch_has_the_feature_lengths():
  batches = list(batching.batch(_converted([3, 9, 16, 5, 2]), 2, INPUT_LENGTH).as_numpy_iterator())
  assert [b["encoder_input_tokens"].shape for b in batches] == [(2, INPUT_LENGTH)] * 2


def test_buckets_group_examples_by_length_and_pad_to_the_bucket():
  lengths = [3, 9, 16, 5, 2, 12, 4, 10, 1, 7]
  batches = list(batching.batch(_converted(lengths), 2, INPUT_LENGTH, (4, 8)).as_numpy_iterator())
  seen = []
  for b in batches:
    tokens = b["encoder_input_tokens"]
    real = (tokens > 0).sum(1)
    bucket = tokens.shape[1]
    assert bucket in (4, 8, 16) and real.max() <= bucket
    assert bucket == 4 or real.max() > {8: 4, 16: 8}[bucket]  # the shortest bucket that holds them
    for row, n in zip(tokens, real):
      np.testing.assert_array_equal(row[:n], np.arange(2, n + 2))  # tokens kept, in place
      assert not row[n:].any()
    assert b["decoder_target_tokens"].shape == (2, TARGET_LENGTH)
    seen.extend(real.tolist())
  # Buckets of 4 (3, 2, 4, 1), 8 (5, 7) and 16 (9, 16, 12, 10): five full batches, every example.
  assert len(batches) == 5 and sorted(seen) == sorted(lengths)
  again = list(batching.batch(_converted(lengths), 2, INPUT_LENGTH, (4, 8)).as_numpy_iterator())
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])


@pytest.mark.parametrize("buckets", [(0, 8), (8, 32), (4.5,)])
def test_bad_buckets_are_named(buckets):
  with pytest.raises(ValueError, match=r"DatasetConfig.length_buckets=.* up to TASK_FEATURE_LENGTHS"):
    batching.check_length_buckets(buckets, INPUT_LENGTH)


def test_eval_batches_sort_by_length_and_cut_each_batch_to_its_bucket():
  lengths = [3, 9, 16, 5, 2, 12, 4, 10, 1, 7]
  examples = [dict(e, index=i) for i, e in enumerate(_converted(lengths).as_numpy_iterator())]
  batches = list(batching.batches_by_length(iter(examples), 3, (4, 8)))
  # Sorted: 1 2 3 | 4 5 7 | 9 10 12 | 16, in buckets 4, 8, the full 16 (none holds 9) and 16.
  assert [b["encoder_input_tokens"].shape for b in batches] == [(3, 4), (3, 8), (3, 16), (1, 16)]
  for b in batches:
    for row, i in zip(b["encoder_input_tokens"], b["index"]):
      n = lengths[i]
      np.testing.assert_array_equal(row[:n], np.arange(2, n + 2))  # each example whole, in place
      assert not row[n:].any()
      np.testing.assert_array_equal(b["decoder_target_tokens"][list(b["index"]).index(i)],
                                    examples[i]["decoder_target_tokens"])
  assert sorted(i for b in batches for i in b["index"]) == list(range(len(lengths)))


def test_bad_eval_buckets_name_their_own_setting():
  with pytest.raises(ValueError, match=r"^infer.length_buckets=\[32\]"):
    batching.check_length_buckets([32], INPUT_LENGTH, "infer.length_buckets")
