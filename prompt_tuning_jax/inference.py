"""A trained prompt on a task's split: its metrics (`evaluate_prompt`, behind
`python -m prompt_tuning_jax.eval`) and its decoded predictions (`infer`, behind
`python -m prompt_tuning_jax.infer`).

Both load the frozen model from INITIAL_CHECKPOINT_PATH and the prompt from PROMPT_FILE (a `.npy`
file, or a `numpy_checkpoints/checkpoint_N/encoder.prompt.prompt.prompt` file of ours or of the
official code). `evaluate_prompt` runs the task's seqio metrics and writes them to
`OUTPUT_DIR/metrics.json`, with TensorBoard events and per-example predictions beside it; `infer`
writes one JSON line per example to `OUTPUT_DIR/<task>-<split>.jsonl`: the input text, the decoded
prediction, and the target text where the split has one.
"""
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from prompt_tuning_jax import (batching, checkpoints, evaluation, freezing, partitioning,
                               prompt_initializers, prompts, run_setup, trees)
from prompt_tuning_jax.config import ExecutionConfig, T5Config
from prompt_tuning_jax.network import T5


def read_prompt_file(prompt_file: str, prompt_length: Optional[int], embed_dim: int) -> np.ndarray:
  """The `[prompt_length, embed]` prompt in PROMPT_FILE, checked against the model."""
  if os.path.isdir(prompt_file):
    raise ValueError(f"PROMPT_FILE {prompt_file!r} is a directory; give the prompt file itself, e.g. "
                     f"{os.path.join(prompt_file, 'numpy_checkpoints', 'checkpoint_N', 'encoder.prompt.prompt.prompt')}.")
  prompt = prompt_initializers.load_prompt_file(prompt_file)
  expected = (prompt_length or prompt.shape[0], embed_dim)
  if prompt.shape != expected:
    raise ValueError(f"PROMPT_FILE {prompt_file!r} holds a prompt of shape {prompt.shape}, but the model "
                     f"wants {expected} (PROMPT_LENGTH, embed_dim): use a prompt trained for this model.")
  return prompt.astype(np.float32)


def load_prompted_model(model_config: T5Config, initial_checkpoint_path: Optional[str],
                        prompt_file: str, prompt_combine: str = "prefix",
                        prompt_length: Optional[int] = None, mesh_shape: Sequence[int] = (-1, 1),
                        execution: ExecutionConfig = ExecutionConfig(attention="auto")):
  """(model, trainable, frozen) with the frozen params placed on a `(data, model)` mesh; `execution`
  is resolved for the mesh's devices."""
  prompt = read_prompt_file(prompt_file, prompt_length, model_config.emb_dim)
  mesh = partitioning.make_mesh(mesh_shape)
  execution = run_setup.resolve_execution(execution, model_config, mesh)
  flat = checkpoints.load_frozen_params(model_config, initial_checkpoint_path,
                                        scan_layers=execution.scan_layers)
  prompt_config = prompts.PromptConfig(prompt.shape[0], prompt_initializers.from_array(prompt),
                                       prompt_combine)
  model = T5(model_config, prompt_config, execution=execution)
  params = trees.unflatten({**flat, checkpoints.PROMPT_PATH: prompt})
  mask = freezing.freeze_mask(params)
  trainable, frozen = freezing.split(params, mask)
  _, frozen_sh = freezing.split(partitioning.model_param_shardings(model, mesh), mask)
  return model, trainable, partitioning.place_on_mesh(frozen, frozen_sh)


def evaluate_prompt(*, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                    batch_size: int, model_config: T5Config, prompt_file: str, output_dir: str,
                    initial_checkpoint_path: Optional[str] = None, prompt_combine: str = "prefix",
                    prompt_length: Optional[int] = None, split: str = "validation",
                    num_examples: Optional[int] = None,
                    decoding_config: evaluation.DecodingConfig = evaluation.DecodingConfig(),
                    mesh_shape: Sequence[int] = (-1, 1), length_buckets: Sequence[int] = (),
                    execution: ExecutionConfig = ExecutionConfig(attention="auto")
                    ) -> dict[str, dict[str, Any]]:
  """Runs the task's metrics for the prompt; returns and writes `{task: {metric: value}}`."""
  run_setup.check_feature_lengths(task_feature_lengths, prompt_length or 0, None)
  batching.check_length_buckets(length_buckets, task_feature_lengths["inputs"],
                                "evaluate.length_buckets")
  run_setup.task_vocabulary(mixture_or_task_name)
  model, trainable, frozen = load_prompted_model(model_config, initial_checkpoint_path, prompt_file,
                                                 prompt_combine, prompt_length, mesh_shape,
                                                 execution)
  evaluator = evaluation.make_evaluator(mixture_or_task_name, task_feature_lengths, split,
                                        log_dir=output_dir, num_examples=num_examples)
  predictor = evaluation.Predictor(model, frozen, batch_size, decoding_config, length_buckets)
  predictor.trainable = trainable
  results = evaluation.evaluate(evaluator, predictor, step=0)
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
      json.dump({t: {k: v for k, v in m.items() if np.ndim(v) == 0} for t, m in results.items()},
                f, indent=2)
  return results


def infer(*, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
          model_config: T5Config, prompt_file: str, output_dir: str,
          initial_checkpoint_path: Optional[str] = None, prompt_combine: str = "prefix",
          prompt_length: Optional[int] = None, split: str = "validation",
          num_examples: Optional[int] = None,
          decoding_config: evaluation.DecodingConfig = evaluation.DecodingConfig(),
          mesh_shape: Sequence[int] = (-1, 1), length_buckets: Sequence[int] = (),
          execution: ExecutionConfig = ExecutionConfig(attention="auto")) -> str:
  """Writes predictions for `split`; returns the path of the JSON-lines file."""
  run_setup.check_feature_lengths(task_feature_lengths, prompt_length or 0, None)
  batching.check_length_buckets(length_buckets, task_feature_lengths["inputs"],
                                "infer.length_buckets")
  vocabulary = run_setup.task_vocabulary(mixture_or_task_name)
  model, trainable, frozen = load_prompted_model(model_config, initial_checkpoint_path, prompt_file,
                                                 prompt_combine, prompt_length, mesh_shape,
                                                 execution)
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
