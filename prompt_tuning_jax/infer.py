"""Decode a task's split with a trained prompt: `python -m prompt_tuning_jax.infer --gin_file=...`.

`infer()` writes one JSON line per example to `OUTPUT_DIR/<task>-<split>.jsonl`: the input text, the
decoded prediction, and the target text where the split has one.
"""
import json
import os
from typing import Mapping, Optional, Sequence

import jax
import seqio

from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax import batching, evaluation, train
from prompt_tuning_jax.config import T5Config


def infer(*, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
          model_config: T5Config, prompt_file: str, output_dir: str,
          initial_checkpoint_path: Optional[str] = None, prompt_combine: str = "prefix",
          prompt_length: Optional[int] = None, split: str = "validation",
          num_examples: Optional[int] = None,
          decoding_config: evaluation.DecodingConfig = evaluation.DecodingConfig(),
          mesh_shape: Sequence[int] = (-1, 1),
          length_buckets: Sequence[int] = ()) -> str:
  """Writes predictions for `split`; returns the path of the JSON-lines file."""
  train.check_feature_lengths(task_feature_lengths, prompt_length or 0, None)
  batching.check_length_buckets(length_buckets, task_feature_lengths["inputs"],
                                "infer.length_buckets")
  vocabulary = train.task_vocabulary(mixture_or_task_name)
  model, trainable, frozen = eval_lib.load_prompted_model(
      model_config, initial_checkpoint_path, prompt_file, prompt_combine, prompt_length, mesh_shape)
  task = seqio.get_mixture_or_task(mixture_or_task_name)
  lengths = dict(task_feature_lengths)
  examples = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1)
  if num_examples is not None:
    examples = examples.take(num_examples)
  features = seqio.EncDecFeatureConverter(pack=False)(examples, lengths).enumerate()
  predictor = evaluation.Predictor(model, frozen, batch_size, decoding_config, length_buckets)
  predictor.trainable = trainable
  predictions = dict(predictor.predict_fn(features))
  path = os.path.join(output_dir, f"{mixture_or_task_name}-{split}.jsonl")
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as f:
      for index, example in enumerate(examples.as_numpy_iterator()):
        row = {"index": index, "inputs": _text(example.get("inputs_pretokenized")),
               "prediction": vocabulary.decode(predictions[index])}
        if "targets_pretokenized" in example:
          row["targets"] = _text(example["targets_pretokenized"])
        f.write(json.dumps(row) + "\n")
  return path


def _text(value) -> Optional[str]:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line: `--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths`.

  See gin_configs/runs/prompt_infer.gin.
  """
  from prompt_tuning_jax import gin_utils  # pylint: disable=g-import-not-at-top (it imports us)
  path = gin_utils.run("infer", argv, "Decode a task's split with a trained prompt.")
  print(f"Predictions: {path}")


if __name__ == "__main__":
  main()
