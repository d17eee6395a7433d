"""A trained prompt on a task's split: its metrics (`evaluate_prompt`, behind
`python -m prompt_tuning_jax.eval`) and its decoded predictions (`infer`, behind
`python -m prompt_tuning_jax.infer`).

Both load the frozen model from INITIAL_CHECKPOINT_PATH and the prompt from PROMPT_FILE (a `.npy`
file, or a `numpy_checkpoints/checkpoint_N/encoder.prompt.prompt.prompt` file of ours or of the
official code). With another `method` (`methods.py`), PROMPT_FILE is the directory of the trained
parameters' numpy files: a run's `numpy_checkpoints/checkpoint_N`, or `folded/checkpoint_N` for a
method that folds. `evaluate_prompt` runs the task's seqio metrics and writes them to
`OUTPUT_DIR/metrics.json`, with TensorBoard events and per-example predictions beside it; `infer`
writes one JSON line per example to `OUTPUT_DIR/<task>-<split>.jsonl`: the input text, the decoded
prediction, and the target text where the split has one.
"""
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from prompt_tuning_jax import (architectures, batching, checkpoints, evaluation, freezing, methods,
                               partitioning, prompt_initializers, prompts, run_setup, trees)
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


def read_trained_params(directory: str) -> dict[str, np.ndarray]:
  """The `/`-joined parameters in a directory of numpy files named by their dotted paths (a run's
  `numpy_checkpoints/checkpoint_N` or `folded/checkpoint_N`)."""
  if not os.path.isdir(directory):
    raise ValueError(f"PROMPT_FILE {directory!r} is not a directory; for a method other than prompt "
                     "tuning give the trained parameters' directory, e.g. "
                     "MODEL_DIR/numpy_checkpoints/checkpoint_N.")
  params = {}
  for name in sorted(os.listdir(directory)):
    try:
      params[name.replace(".", "/")] = np.load(os.path.join(directory, name), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise ValueError(f"{os.path.join(directory, name)} is not a numpy array ({e}); give a "
                       "directory of a run's numpy checkpoint.") from None
  return params


def _method_model(method: methods.Method, model_config: T5Config, frozen_paths: set[str],
                  trained: Mapping[str, np.ndarray], prompt_combine: str,
                  execution: ExecutionConfig, prompt_file: str) -> T5:
  """The model of `method`, or of its folded form (`Method.folded`), whose new parameters are
  exactly the `trained` ones, with their shapes."""
  # The input prompt, or a multi-task prompt's shared one, gives the prompt's length.
  prompt = trained.get("encoder/prompt/shared/prompt", trained.get(checkpoints.PROMPT_PATH))
  held = {path: tuple(np.shape(value)) for path, value in trained.items()}
  for candidate in dict.fromkeys((method, method.folded())):
    prompt_config = None
    if candidate.input_prompt and prompt is not None:
      prompt_config = candidate.prompt_config(
          prompt.shape[0], prompt_initializers.from_array(prompt), prompt_combine)
    model = methods.build_model(candidate, model_config, prompt_config, execution)
    shapes = methods.param_shapes(model)
    trainable = trees.flatten(freezing.freeze_mask(trees.unflatten(shapes),
                                                   candidate.trainable_patterns))
    wanted = {path: shape for path, shape in shapes.items()
              if trainable[path] or path not in frozen_paths}
    if (prompt is not None or not candidate.input_prompt) and wanted == held:
      return model
  raise ValueError(
      f"PROMPT_FILE {prompt_file!r} does not hold the trained parameters of {method.name} on this "
      f"model (it holds {sorted(held)[:4]}...); give MODEL_DIR/numpy_checkpoints/checkpoint_N (or "
      "folded/checkpoint_N) of a run of this method on this model, and the run's method file.")


def load_prompted_model(model_config: T5Config, initial_checkpoint_path: Optional[str],
                        prompt_file: str, prompt_combine: str = "prefix",
                        prompt_length: Optional[int] = None, mesh_shape: Sequence[int] = (-1, 1),
                        execution: ExecutionConfig = ExecutionConfig(attention="auto"),
                        method: methods.Method = methods.prompt_tuning()):
  """(model, trainable, frozen) with the frozen params placed on a `(data, model)` mesh; `execution`
  is resolved for the mesh's devices. `method` other than prompt tuning reads its trained
  parameters from the directory `prompt_file`."""
  mesh = partitioning.make_mesh(mesh_shape)
  execution = run_setup.resolve_execution(execution, model_config, mesh)
  architecture = architectures.of(model_config)
  flat = architecture.load_frozen_params(model_config, initial_checkpoint_path, (), None,
                                         execution.scan_layers)
  if method == methods.prompt_tuning():
    prompt = read_prompt_file(prompt_file, prompt_length, model_config.emb_dim)
    prompt_config = prompts.PromptConfig(prompt.shape[0], prompt_initializers.from_array(prompt),
                                         prompt_combine)
    model = architecture.build(method, model_config, prompt_config, execution)
    trained = {architecture.prompt_path: prompt}
  else:
    trained = read_trained_params(prompt_file)
    model = _method_model(method, model_config, set(flat), trained, prompt_combine, execution,
                          prompt_file)
  params = trees.unflatten({**flat, **trained})
  mask = freezing.freeze_mask(params, [re.escape(path) for path in trained])
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
                    execution: ExecutionConfig = ExecutionConfig(attention="auto"),
                    method: methods.Method = methods.prompt_tuning()
                    ) -> dict[str, dict[str, Any]]:
  """Runs the task's metrics for the prompt; returns and writes `{task: {metric: value}}`."""
  run_setup.check_feature_lengths(task_feature_lengths, prompt_length or 0, None)
  batching.check_length_buckets(length_buckets, task_feature_lengths["inputs"],
                                "evaluate.length_buckets")
  run_setup.task_vocabulary(mixture_or_task_name)
  architecture = architectures.of(model_config)
  architecture.check(method, decoding_config.method, length_buckets, ())
  if method.multitask_combine is not None:
    mixture_or_task_name, method, _ = run_setup.task_indexed(mixture_or_task_name, method)
  model, trainable, frozen = load_prompted_model(model_config, initial_checkpoint_path, prompt_file,
                                                 prompt_combine, prompt_length, mesh_shape,
                                                 execution, method)
  evaluator = evaluation.make_evaluator(mixture_or_task_name, task_feature_lengths, split,
                                        log_dir=output_dir, num_examples=num_examples,
                                        feature_converter=architecture.feature_converter())
  predictor = evaluation.Predictor(model, frozen, batch_size, decoding_config, length_buckets,
                                   task_feature_lengths["targets"])
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
          execution: ExecutionConfig = ExecutionConfig(attention="auto"),
          method: methods.Method = methods.prompt_tuning()) -> str:
  """Writes predictions for `split`; returns the path of the JSON-lines file."""
  run_setup.check_feature_lengths(task_feature_lengths, prompt_length or 0, None)
  batching.check_length_buckets(length_buckets, task_feature_lengths["inputs"],
                                "infer.length_buckets")
  vocabulary = run_setup.task_vocabulary(mixture_or_task_name)
  architecture = architectures.of(model_config)
  architecture.check(method, decoding_config.method, length_buckets, ())
  if method.multitask_combine is not None:
    mixture_or_task_name, method, _ = run_setup.task_indexed(mixture_or_task_name, method)
  model, trainable, frozen = load_prompted_model(model_config, initial_checkpoint_path, prompt_file,
                                                 prompt_combine, prompt_length, mesh_shape,
                                                 execution, method)
  task = seqio.get_mixture_or_task(mixture_or_task_name)
  lengths = dict(task_feature_lengths)
  examples = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1)
  if num_examples is not None:
    examples = examples.take(num_examples)
  features = architecture.feature_converter()(examples, lengths).enumerate()
  predictor = evaluation.Predictor(model, frozen, batch_size, decoding_config, length_buckets,
                                   lengths["targets"])
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
