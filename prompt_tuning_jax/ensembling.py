"""Prompt ensembling (Lester et al. 2021, section 6): K prompts for one task over one frozen model.

Each batch of inputs is paired with every one of the K prompts in a single compiled computation: the
prompts form a bank `[K, P, embed]` (shorter ones padded and masked) and row `k * batch + b` reads input
b with prompt k. The members' predictions are combined by majority vote over their decoded outputs
(`method="vote"`, the paper's) or by the mean log-likelihood of each label (`method="rank"`, rank
classification over the task's label words). The task's own postprocessor and metrics score every
member, their average, the best member and the ensemble, as in the paper's ensemble table.

`evaluate_ensemble` is behind `python -m prompt_tuning_jax.ensemble`.
"""
import collections
import functools
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from prompt_tuning_jax import (batching, checkpoints, decoding, inference, run_setup, scoring,
                               serving, trees)
from prompt_tuning_jax.config import ExecutionConfig, T5Config
from prompt_tuning_jax.network import T5

METHODS = ("vote", "rank")


def member_outputs(model: T5, params, inputs: jax.Array, prompt_lengths: jax.Array,
                   label_targets: Optional[jax.Array] = None, *, max_decode_length: int,
                   eos_id: int = 1) -> jax.Array:
  """Runs every input with every prompt of the bank `[K, P, embed]` in `params`.

  Args:
    inputs: `[batch, in_len]`.
    prompt_lengths: `[K]`, each prompt's real length.
    label_targets: `[labels, out_len]` to score each label (rank classification); None to decode.
  Returns:
    greedy tokens `[K, batch, max_decode_length]`, or label log-likelihoods `[K, batch, labels]`.
  """
  num_prompts, batch = prompt_lengths.shape[0], inputs.shape[0]
  rows = dict(prompt_ids=jnp.repeat(jnp.arange(num_prompts), batch),
              prompt_lengths=jnp.repeat(prompt_lengths, batch))
  tiled = jnp.tile(inputs, (num_prompts, 1))
  if label_targets is None:
    outputs, _ = decoding.greedy_decode(model, params, tiled, max_decode_length=max_decode_length,
                                        eos_id=eos_id, **rows)
  else:
    _, outputs = scoring.rank_classify(model, params, tiled, label_targets, **rows)
  return outputs.reshape((num_prompts, batch) + outputs.shape[1:])


def majority_vote(member_predictions: Sequence[Sequence[str]]) -> list[str]:
  """`[K][n]` texts -> `[n]` most common text per example; a tie goes to the earliest member's."""
  return [collections.Counter(text.strip() for text in votes).most_common(1)[0][0]
          for votes in zip(*member_predictions)]


def default_class_labels(task: seqio.Task) -> list[str]:
  """The label words of a task whose postprocessor maps them to ids (`label_names=`)."""
  label_names = getattr(task.postprocessor, "keywords", {}).get("label_names")
  if not label_names:
    raise ValueError(f"Cannot tell the label words of task {task.name!r} from its postprocessor; "
                     "give class_labels (CLASS_LABELS), e.g. ['entailment', 'not_entailment'].")
  return list(label_names)


def task_metrics(task: seqio.Task, examples: Sequence[Mapping[str, Any]],
                 predictions: Sequence[str]) -> dict[str, float]:
  """The task's prediction metrics of decoded texts, after its postprocessor (as seqio applies it)."""
  targets = [task.postprocess_fn(_text(ex["targets_pretokenized"]), example=ex, is_target=True)
             for ex in examples]
  processed = [task.postprocess_fn(text, example=ex, is_target=False)
               for ex, text in zip(examples, predictions)]
  results = {}
  for metric_fn in task.predict_metric_fns:
    results.update({name: float(getattr(value, "value", value))
                    for name, value in metric_fn(targets, processed).items()})
  return results


def ensemble_table(prompt_files: Sequence[str], member_metrics: Sequence[Mapping[str, float]],
                   ensemble_metrics: Mapping[str, float], best_metric: str,
                   method: str) -> dict[str, Any]:
  """The paper's table: each member, their average, the best member (by `best_metric`), the ensemble."""
  best = max(range(len(member_metrics)), key=lambda i: member_metrics[i][best_metric])
  return {
      "method": method,
      "best_metric": best_metric,
      "members": [{"prompt_file": f, **m} for f, m in zip(prompt_files, member_metrics)],
      "average": {name: float(np.mean([m[name] for m in member_metrics]))
                  for name in member_metrics[0]},
      "best": {"prompt_file": prompt_files[best], **member_metrics[best]},
      "ensemble": dict(ensemble_metrics),
  }


def format_table(table: Mapping[str, Any]) -> str:
  """The table as text: one row per member, then average, best and ensemble."""
  names = list(table["average"])
  rows = [(f"member {i}", m) for i, m in enumerate(table["members"])]
  rows += [("average", table["average"]), ("best", table["best"]),
           (f"ensemble ({table['method']})", table["ensemble"])]
  width = max(len(label) for label, _ in rows)
  lines = [" ".join([" " * width] + [f"{name:>12}" for name in names])]
  lines += [" ".join([f"{label:<{width}}"] + [f"{m[name]:12.2f}" for name in names])
            for label, m in rows]
  return "\n".join(lines)


def evaluate_ensemble(*, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                      batch_size: int, model_config: T5Config, prompt_files: Sequence[str],
                      initial_checkpoint_path: Optional[str] = None, split: str = "validation",
                      method: str = "vote", class_labels: Optional[Sequence[str]] = None,
                      num_examples: Optional[int] = None, output_dir: Optional[str] = None,
                      prompt_combine: str = "prefix", best_metric: Optional[str] = None,
                      length_buckets: Sequence[int] = (),
                      execution: ExecutionConfig = ExecutionConfig(attention="auto")
                      ) -> dict[str, Any]:
  """Scores K prompts and their ensemble on a task's split; returns (and writes) the table.

  Args:
    mixture_or_task_name: one seqio task with prediction metrics.
    batch_size: inputs per batch; each batch runs `K * batch_size` rows in one computation.
    prompt_files: the K prompts (`.npy` `[length_k, embed]`, see `inference.read_prompt_file`).
    method: `vote` (majority of decoded outputs) or `rank` (mean label log-likelihood).
    class_labels: the label words for `rank`; default: the task postprocessor's `label_names`.
    output_dir: where to write `ensemble_metrics.json` and per-example
      `ensemble_predictions.jsonl` (each member's prediction, the ensemble's, and for `rank` each
      member's label log-likelihoods), if given.
    best_metric: the metric that picks the best member; default the task's first.
    length_buckets: input lengths; the split is sorted by input length and each batch cut to the
      shortest that holds it (`batching.batches_by_length`), one compiled shape each.
    execution: how the model is computed, resolved for the default device.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown ensemble method {method!r}; use one of {METHODS}.")
  if not prompt_files:
    raise ValueError("PROMPT_FILES is empty; give the prompt files of the ensemble's members.")
  run_setup.check_feature_lengths(task_feature_lengths, 0, None)
  batching.check_length_buckets(length_buckets, task_feature_lengths["inputs"],
                                "evaluate_ensemble.length_buckets")
  vocabulary = run_setup.task_vocabulary(mixture_or_task_name)
  task = seqio.get_mixture_or_task(mixture_or_task_name)
  if not isinstance(task, seqio.Task) or not task.predict_metric_fns:
    raise ValueError(f"{mixture_or_task_name!r} must be one task with prediction metrics to "
                     "ensemble over.")
  labels = None
  if method == "rank":
    labels = list(class_labels) if class_labels else default_class_labels(task)
  prompt_arrays = [inference.read_prompt_file(f, None, model_config.emb_dim) for f in prompt_files]
  table, prompt_lengths = serving.stack_prompts(prompt_arrays, max(map(len, prompt_arrays)))
  execution = run_setup.resolve_execution(execution, model_config)
  frozen = trees.unflatten(checkpoints.load_frozen_params(model_config, initial_checkpoint_path,
                                                          scan_layers=execution.scan_layers))
  model = serving.bank_model(model_config, len(prompt_arrays), table.shape[1], prompt_combine,
                             execution)

  dataset = task.get_dataset(dict(task_feature_lengths), split=split, shuffle=False, num_epochs=1)
  if num_examples is not None:
    dataset = dataset.take(num_examples)
  examples = list(dataset.as_numpy_iterator())
  if not examples:
    raise ValueError(f"{mixture_or_task_name!r} has no {split!r} examples.")
  inputs = np.zeros((len(examples), task_feature_lengths["inputs"]), np.int32)
  for i, example in enumerate(examples):
    inputs[i, :len(example["inputs"])] = example["inputs"]

  target_length = task_feature_lengths["targets"]
  label_targets = None if labels is None else serving.encode_labels(vocabulary, labels,
                                                                    target_length)
  run = jax.jit(lambda frozen, table, inputs, lengths, targets: member_outputs(
      model, serving.with_prompt_bank(frozen, table), inputs, lengths, targets,
      max_decode_length=target_length, eos_id=vocabulary.eos_id))
  outputs, order = [], []
  rows = ({"encoder_input_tokens": row, "index": i} for i, row in enumerate(inputs))
  for batch in batching.batches_by_length(rows, batch_size, length_buckets):
    tokens = batch["encoder_input_tokens"]
    padded = batching.pad_rows(tokens, batch_size)
    outputs.append(np.asarray(run(frozen, table, padded, prompt_lengths, label_targets))
                   [:, :len(tokens)])
    order.append(batch["index"])
  outputs = np.concatenate(outputs, axis=1)[:, np.argsort(np.concatenate(order))]  # [K, examples, ...]

  if labels is None:
    member_predictions = [serving.decode_tokens(vocabulary, tokens) for tokens in outputs]
    ensemble_predictions = majority_vote(member_predictions)
  else:
    member_predictions = [[labels[i] for i in scores.argmax(-1)] for scores in outputs]
    ensemble_predictions = [labels[i] for i in outputs.mean(axis=0).argmax(-1)]
  metrics = functools.partial(task_metrics, task, examples)
  member_metrics = [metrics(predictions) for predictions in member_predictions]
  results = ensemble_table(list(prompt_files), member_metrics, metrics(ensemble_predictions),
                           best_metric or next(iter(member_metrics[0])), method)
  if output_dir is not None and jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "ensemble_metrics.json"), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(output_dir, "ensemble_predictions.jsonl"), "w") as f:
      for i, example in enumerate(examples):
        row = {"index": i, "inputs": _text(example.get("inputs_pretokenized", "")),
               "targets": _text(example["targets_pretokenized"]),
               "members": [predictions[i] for predictions in member_predictions],
               "ensemble": ensemble_predictions[i]}
        if labels is not None:
          row["member_scores"] = outputs[:, i].tolist()
        f.write(json.dumps(row) + "\n")
  return results


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)

