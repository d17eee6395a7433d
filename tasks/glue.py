"""GLUE tasks and mixtures, named as in T5 and the prompt tuning code.

`glue_<task>_v002` (and `taskless_`, `byt5_`, `mt5_` forms) for cola, sst2, mrpc, qqp, stsb, mnli,
mnli_matched, mnli_mismatched, qnli, rte and wnli; `glue_mnli_and_dev_v002` (MNLI train with both
dev sets); and `glue_v002_proportional`, the tasks mixed by their number of training examples
(WNLI left out, as in T5).
"""
import functools
from typing import Sequence

import tensorflow as tf

from . import common
from . import metrics
from . import postprocessors
from . import preprocessors
from . import readers
from . import sources

# TFDS config -> directory of the official GLUE download.
DIRECTORIES = {
    "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B",
    "mnli": "MNLI", "mnli_matched": "MNLI", "mnli_mismatched": "MNLI", "qnli": "QNLI",
    "rte": "RTE", "wnli": "WNLI",
}
# Split -> file name, where they are not train.tsv / dev.tsv / test.tsv.
_SPLIT_FILES = {
    "mnli": {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
             "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
             "test_mismatched": "test_mismatched.tsv"},
    "mnli_matched": {"validation": "dev_matched.tsv", "test": "test_matched.tsv"},
    "mnli_mismatched": {"validation": "dev_mismatched.tsv", "test": "test_mismatched.tsv"},
}
_DEFAULT_SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_STRING = tf.TensorSpec([], tf.string)
_TEXT_FEATURES = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("hypothesis", "premise"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
_METRICS = {
    "cola": [metrics.matthews_corrcoef],
    "sst2": [metrics.accuracy],
    "mrpc": [metrics.f1_with_invalid, metrics.accuracy],
    "qqp": [metrics.f1_with_invalid, metrics.accuracy],
    "stsb": [metrics.pearson_corrcoef, metrics.spearman_corrcoef],
    "mnli": [metrics.accuracy],
    "qnli": [metrics.accuracy],
    "rte": [metrics.accuracy],
    "wnli": [metrics.accuracy],
}
TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched", "qnli",
         "rte", "wnli")
# Mixing rates: the number of training examples (T5's weights).
MIXTURE_RATES = {
    "glue_cola_v002": 8_551.,
    "glue_sst2_v002": 67_349.,
    "glue_mrpc_v002": 3_668.,
    "glue_qqp_v002": 363_849.,
    "glue_stsb_v002": 5_749.,
    "glue_mnli_v002": 392_702.,
    "glue_qnli_v002": 104_743.,
    "glue_rte_v002": 2_490.,
    "glue_mnli_mismatched_v002": 0.,
    "glue_mnli_matched_v002": 0.,
}


def _base_task(task: str) -> str:
  """The task whose format and labels `task` uses: mnli for its matched/mismatched sets."""
  return "mnli" if task.startswith("mnli") else task


def source(task: str, splits: Sequence[str] = ()) -> sources.LocalOrTfdsSource:
  """TFDS `glue/<task>`, else `glue/<TASK>/{train,dev,test}.tsv` (MNLI: `dev_matched.tsv`...)."""
  split_files = _SPLIT_FILES.get(task, _DEFAULT_SPLIT_FILES)
  local_files = {split: [f"glue/{DIRECTORIES[task]}/{file_name}"]
                 for split, file_name in split_files.items() if not splits or split in splits}
  label_spec = tf.TensorSpec([], tf.float32 if task == "stsb" else tf.int32)
  features = {name: _STRING for name in _TEXT_FEATURES[_base_task(task)]}
  features.update(label=label_spec, idx=tf.TensorSpec([], tf.int32))
  return sources.LocalOrTfdsSource(
      name=f"GLUE {task}",
      local_files=local_files,
      reader=functools.partial(readers.glue_examples, _base_task(task)),
      features=features,
      tfds_name=f"glue/{task}")


def text_preprocessors(task: str) -> list[common.Preprocessor]:
  """The T5 text preprocessors of a GLUE task."""
  if task == "stsb":
    return [preprocessors.stsb_text]
  base_task = _base_task(task)
  return [functools.partial(
      preprocessors.glue_text, benchmark_name=base_task,
      label_names=readers.GLUE_LABELS[base_task], feature_names=_TEXT_FEATURES[base_task])]


def postprocess_fn(task: str):
  if task == "stsb":
    return postprocessors.string_to_float
  return functools.partial(postprocessors.label_to_id,
                           label_names=readers.GLUE_LABELS[_base_task(task)])


def metric_fns(task: str) -> list:
  return [*_METRICS[_base_task(task)], metrics.invalid_prediction_rate]


def register() -> list[str]:
  """Registers every GLUE task and mixture; returns the task names."""
  names = []
  for task in TASKS:
    names += common.add_task_variants(
        f"glue_{task}_v002", source(task), text_preprocessors(task), postprocess_fn(task),
        metric_fns(task))
  common.add_mixture_variants(
      "glue_mnli_and_dev_v002",
      ["glue_mnli_v002", "glue_mnli_matched_v002", "glue_mnli_mismatched_v002"], default_rate=1.0)
  common.add_mixture_variants("glue_v002_proportional", list(MIXTURE_RATES.items()))
  return names
