"""SuperGLUE tasks and mixtures, named as in T5 and the prompt tuning code.

`super_glue_<task>_v102` (and `taskless_`, `byt5_`, `mt5_` forms) for boolq, cb, copa, multirc,
record, rte, wic, axb and axg; WSC in T5's simple form as `super_glue_wsc_v102_simple_train`
(correct referents only) and `super_glue_wsc_v102_simple_eval`, joined in the mixture
`super_glue_wsc_and_dev_v102_simple`; and `super_glue_v102_proportional`, every task mixed by its
number of training examples.
"""
import functools
from typing import Sequence

import seqio
import tensorflow as tf

from . import common
from . import metrics
from . import postprocessors
from . import preprocessors
from . import readers
from . import sources

# TFDS config -> directory of the official SuperGLUE download.
DIRECTORIES = {
    "boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD",
    "rte": "RTE", "wic": "WiC", "wsc.fixed": "WSC", "axb": "AX-b", "axg": "AX-g",
}
_STRING = tf.TensorSpec([], tf.string)
_INT = tf.TensorSpec([], tf.int32)
_FEATURES = {
    "boolq": {"question": _STRING, "passage": _STRING},
    "cb": {"premise": _STRING, "hypothesis": _STRING},
    "copa": {"premise": _STRING, "choice1": _STRING, "choice2": _STRING, "question": _STRING},
    "multirc": {"paragraph": _STRING, "question": _STRING, "answer": _STRING,
                "idx": {"paragraph": _INT, "question": _INT, "answer": _INT}},
    "record": {"passage": _STRING, "query": _STRING,
               "entities": tf.TensorSpec([None], tf.string),
               "answers": tf.TensorSpec([None], tf.string),
               "idx": {"passage": _INT, "query": _INT}},
    "rte": {"premise": _STRING, "hypothesis": _STRING},
    "wic": {"word": _STRING, "sentence1": _STRING, "sentence2": _STRING,
            "start1": _INT, "start2": _INT, "end1": _INT, "end2": _INT},
    "wsc.fixed": {"text": _STRING, "span1_index": _INT, "span2_index": _INT,
                  "span1_text": _STRING, "span2_text": _STRING},
    "axb": {"sentence1": _STRING, "sentence2": _STRING},
    "axg": {"premise": _STRING, "hypothesis": _STRING},
}
# The text features of each classification task, in T5's (sorted) order.
_TEXT_FEATURES = {
    "boolq": ("passage", "question"),
    "cb": ("hypothesis", "premise"),
    "copa": ("choice1", "choice2", "premise", "question"),
    "rte": ("hypothesis", "premise"),
    "wic": ("sentence1", "sentence2", "word"),
    "axb": ("hypothesis", "premise"),
    "axg": ("hypothesis", "premise"),
}
_METRICS = {
    "boolq": [metrics.accuracy],
    "cb": [metrics.mean_multiclass_f1(num_classes=3), metrics.accuracy],
    "copa": [metrics.accuracy],
    "multirc": [metrics.multirc_f1_over_all_answers, metrics.multirc_exact_match],
    "record": [metrics.record],
    "rte": [metrics.accuracy],
    "wic": [metrics.accuracy],
    "axb": [],  # Only an unlabelled test set.
    "axg": [],
}
# Mixing rates: the number of training examples (T5's weights, without DPR).
MIXTURE_RATES = {
    "super_glue_wsc_v102_simple_train": 259.,
    "super_glue_wsc_v102_simple_eval": 0.,
    "super_glue_boolq_v102": 9_427.,
    "super_glue_cb_v102": 250.,
    "super_glue_copa_v102": 400.,
    "super_glue_multirc_v102": 27_243.,
    "super_glue_record_v102": 138_854.,
    "super_glue_rte_v102": 2_490.,
    "super_glue_wic_v102": 5_428.,
    "super_glue_axb_v102": 0.,
    "super_glue_axg_v102": 0.,
}


def source(task: str,
           splits: Sequence[str] = ("train", "validation", "test")) -> sources.LocalOrTfdsSource:
  """TFDS `super_glue/<task>`, else `superglue/<Task>/{train,val,test}.jsonl` (AX-b/g: test)."""
  directory = DIRECTORIES[task]
  if task in ("axb", "axg"):
    local_files = {"test": [f"superglue/{directory}/{directory}.jsonl"]}
  else:
    file_names = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}
    local_files = {split: [f"superglue/{directory}/{file_names[split]}"] for split in splits}
  features = {**_FEATURES[task], "label": _INT}
  features.setdefault("idx", _INT)
  if task == "record":
    del features["label"]
  return sources.LocalOrTfdsSource(
      name=f"SuperGLUE {directory}",
      local_files=local_files,
      reader=functools.partial(readers.super_glue_examples, task),
      features=features,
      tfds_name=f"super_glue/{task}")


def text_preprocessors(task: str) -> list[common.Preprocessor]:
  """The T5 text preprocessors of a SuperGLUE task other than WSC."""
  if task == "multirc":
    return [preprocessors.multirc_text]
  if task == "record":
    return [preprocessors.record_text]
  steps = []
  if task == "axb":
    steps.append(functools.partial(
        seqio.preprocessors.rekey,
        key_map={"premise": "sentence1", "hypothesis": "sentence2", "label": "label", "idx": "idx"}))
  benchmark_name = "rte" if task in ("axb", "axg") else task
  steps.append(functools.partial(
      preprocessors.glue_text, benchmark_name=benchmark_name,
      label_names=readers.SUPER_GLUE_LABELS[task], feature_names=_TEXT_FEATURES[task]))
  return steps


def postprocess_fn(task: str):
  if task == "multirc":
    return postprocessors.multirc
  if task == "record":
    return postprocessors.record
  return functools.partial(postprocessors.label_to_id, label_names=readers.SUPER_GLUE_LABELS[task])


def register() -> list[str]:
  """Registers every SuperGLUE task and mixture; returns the task names."""
  names = []
  for task in ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "axb", "axg"):
    metric_fns = list(_METRICS[task])
    if metric_fns and task != "record":
      metric_fns.append(metrics.invalid_prediction_rate)
    names += common.add_task_variants(
        f"super_glue_{task}_v102", source(task), text_preprocessors(task), postprocess_fn(task),
        metric_fns)
  names += common.add_task_variants(
      "super_glue_wsc_v102_simple_train", source("wsc.fixed", splits=("train",)),
      [functools.partial(preprocessors.wsc_simple_text, correct_referent_only=True)])
  names += common.add_task_variants(
      "super_glue_wsc_v102_simple_eval", source("wsc.fixed", splits=("validation", "test")),
      [functools.partial(preprocessors.wsc_simple_text, correct_referent_only=False)],
      postprocessors.wsc_simple, [metrics.accuracy, metrics.invalid_prediction_rate])
  common.add_mixture_variants(
      "super_glue_wsc_and_dev_v102_simple",
      ["super_glue_wsc_v102_simple_train", "super_glue_wsc_v102_simple_eval"], default_rate=1.0)
  common.add_mixture_variants("super_glue_v102_proportional", list(MIXTURE_RATES.items()))
  return names
