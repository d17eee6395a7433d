"""Helpers to register tasks the way this package does, for its benchmarks and for users.

A user module (named with `--gin.MIXTURE_OR_TASK_MODULE`) can register its own task with
`add_task` and a `LocalOrTfdsSource`; `import_task_module` imports it.
"""
import functools
import importlib
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

from prompt_tuning_jax import vocabularies

from . import preprocessors

MT5_SPM_PATH = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"

Preprocessor = Callable[..., Any]
MixtureEntry = Union[str, tuple[str, float]]


@functools.cache
def mt5_vocabulary() -> seqio.SentencePieceVocabulary:
  """mT5's SentencePiece vocabulary; its model file is only read when first used."""
  return seqio.SentencePieceVocabulary(MT5_SPM_PATH, extra_ids=100)


# Task name prefix -> the vocabulary of that model family.
VOCABULARY_BY_PREFIX: Mapping[str, Callable[[], seqio.Vocabulary]] = {
    "": vocabularies.t5_vocabulary,
    "byt5_": vocabularies.byt5_vocabulary,
    "mt5_": mt5_vocabulary,
}
TASKLESS_PREFIX = "taskless_"


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """`inputs` and `targets` in `vocabulary`, each ending with EOS."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def add_task(name: str,
             source: seqio.DataSource,
             text_preprocessors: Sequence[Preprocessor],
             postprocess_fn: Optional[Callable[..., Any]] = None,
             metric_fns: Sequence[Callable[..., Any]] = (),
             vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
  """Registers (or re-registers) a text-to-text task.

  Args:
    name: the task name.
    source: where the examples come from.
    text_preprocessors: turn the source's examples into `inputs`/`targets` strings.
    postprocess_fn: maps decoded outputs and targets to what `metric_fns` compare.
    metric_fns: `fn(targets, predictions) -> dict` metrics.
    vocabulary: defaults to the T5 vocabulary.

  Returns:
    The registered task.
  """
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          *text_preprocessors,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=output_features(vocabulary or vocabularies.t5_vocabulary()),
      postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns))


def add_mixture(name: str, tasks: Sequence[MixtureEntry],
                default_rate: Optional[float] = None) -> seqio.Mixture:
  """Registers (or re-registers) a mixture of tasks, given as names or (name, rate) pairs."""
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks), default_rate=default_rate)


def add_task_variants(name: str,
                      source: seqio.DataSource,
                      text_preprocessors: Sequence[Preprocessor],
                      postprocess_fn: Optional[Callable[..., Any]] = None,
                      metric_fns: Sequence[Callable[..., Any]] = (),
                      with_taskless: bool = True) -> list[str]:
  """Registers `name` for each vocabulary prefix, and its `taskless_` form if asked.

  Returns:
    The registered names, e.g. `glue_rte_v002`, `taskless_glue_rte_v002`, `byt5_glue_rte_v002`.
  """
  forms = {"": list(text_preprocessors)}
  if with_taskless:
    forms[TASKLESS_PREFIX] = [*text_preprocessors, preprocessors.remove_task_name]
  names = []
  for vocabulary_prefix, vocabulary in VOCABULARY_BY_PREFIX.items():
    for form_prefix, form_preprocessors in forms.items():
      full_name = f"{vocabulary_prefix}{form_prefix}{name}"
      add_task(full_name, source, form_preprocessors, postprocess_fn, metric_fns, vocabulary())
      names.append(full_name)
  return names


def add_mixture_variants(name: str, tasks: Sequence[MixtureEntry],
                         default_rate: Optional[float] = None,
                         with_taskless: bool = True) -> list[str]:
  """Registers a mixture for each vocabulary prefix (and `taskless_`), over the same variants."""
  forms = ("", TASKLESS_PREFIX) if with_taskless else ("",)
  names = []
  for vocabulary_prefix in VOCABULARY_BY_PREFIX:
    for form_prefix in forms:
      prefix = vocabulary_prefix + form_prefix
      entries = [prefix + t if isinstance(t, str) else (prefix + t[0], t[1]) for t in tasks]
      add_mixture(prefix + name, entries, default_rate)
      names.append(prefix + name)
  return names


# The suffix of the mixture `task_indexed_mixture` registers for a mixture or task.
TASK_INDEXED_SUFFIX = "_task_indexed"


def task_indexed_mixture(name: str) -> tuple[str, list[str], int]:
  """A mixture like the mixture (or task) `name` whose examples' inputs begin with a token naming
  their task: `<extra_id_i>` for the i-th of its tasks in name order, the token the official
  code's multi-task prompts read (`extended/multitask_prompts.py`). Registered on first use.

  Returns:
    (the indexed mixture's name, its tasks' names in index order, the token id of task 0; task i's
    is that minus i).
  """
  mixture = seqio.get_mixture_or_task(name)
  subtasks = sorted(mixture.tasks, key=lambda t: t.name) if isinstance(mixture, seqio.Mixture) \
      else [mixture]
  first_token = subtasks[0].output_features["inputs"].vocabulary.vocab_size - 1
  indexed = name + TASK_INDEXED_SUFFIX
  if indexed not in seqio.MixtureRegistry.names():
    entries = []
    for index, task in enumerate(subtasks):
      steps = list(task.preprocessors)
      at = len(steps) - (steps[-1] is seqio.preprocessors.append_eos_after_trim)
      steps.insert(at, functools.partial(_prepend_token, token=first_token - index))
      copy = f"{task.name}_as_task_{index}_of_{name}"
      seqio.TaskRegistry.remove(copy)
      seqio.TaskRegistry.add(copy, source=task.source, output_features=task.output_features,
                             preprocessors=steps, postprocess_fn=task.postprocessor,
                             metric_objs=task.metric_objs)
      rate = mixture.get_rate(task) if isinstance(mixture, seqio.Mixture) else 1.0
      entries.append((copy, rate))
    add_mixture(indexed, entries)
  return indexed, [task.name for task in subtasks], first_token


def _prepend_token(dataset, token: int):
  """Tokenised `inputs` with `token` in front (before EOS is appended after trimming)."""
  return dataset.map(lambda example: {
      **example, "inputs": tf.concat([tf.constant([token], example["inputs"].dtype),
                                      example["inputs"]], axis=0)})


def import_task_module(module_name: str):
  """Imports a module that registers tasks (`MIXTURE_OR_TASK_MODULE`), with a clear error.

  Raises:
    ImportError: the module itself cannot be found (errors inside it propagate unchanged).
  """
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise ImportError(
          f"MIXTURE_OR_TASK_MODULE {module_name!r} cannot be imported: no module named {e.name!r}. "
          "Give the dotted name of a module on the Python path (e.g. `my_project.tasks`) that "
          "registers its tasks with seqio when imported.") from e
    raise


def _to_python(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, list):
    return [_to_python(v) for v in value]
  return value


def get_examples(task_name: str, split: str = "validation",
                 num_examples: Optional[int] = None) -> list[dict[str, Any]]:
  """The first examples of a task's split, preprocessed and tokenised, in file order.

  Each example has `inputs_pretokenized`/`targets_pretokenized` (the text), `inputs`/`targets`
  (the token ids, with EOS) and the task's other fields, as Python values.
  """
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
  if num_examples is not None:
    dataset = dataset.take(num_examples)
  examples: Iterable[Mapping[str, Any]] = dataset.as_numpy_iterator()
  return [{key: _to_python(value) for key, value in example.items()} for example in examples]
