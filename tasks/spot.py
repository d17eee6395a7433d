"""SPoT's source tasks that the other modules lack, and SPoT's mixtures for multi-task source prompts.

SPoT (Vu et al., 2022) trains source prompts on 16 tasks (C4, DocNLI, Yelp-2, MNLI, QQP, QNLI,
ReCoRD, CxC, SQuAD, DROP, SST-2, WinoGrande, HellaSWAG, MultiRC, CosmosQA, RACE) and on mixtures
of them. Registered elsewhere: MNLI, QQP, QNLI, SST-2 (`glue.py`), ReCoRD, MultiRC (`super_glue.py`),
SQuAD (`mrqa.py`). Registered here under the official code's names (`prompt_tuning/spot/data`), in
T5's text format (`<task> <field>: <text> ...` -> the label), with `taskless_`, `byt5_` and `mt5_`
forms; the label of a multiple-choice task is the name of the right choice, as in COPA:

  spot_yelp_polarity_reviews_v020   Yelp-2 `text` -> negative | positive
  spot_rainbow_cosmos_qa_v100       CosmosQA `context`, `question`, `answer0`..`answer3` -> answerN
  spot_rainbow_hellaswag_v110       HellaSWAG `context`, `ending0`..`ending3` -> endingN
  spot_rainbow_piqa_v100            PIQA `goal`, `sol1`, `sol2` -> sol1 | sol2
  spot_rainbow_winogrande_v110      WinoGrande `sentence`, `option1`, `option2` -> option1 | option2

Each reads TFDS (`yelp_polarity_reviews`, `cosmos_qa`, `hellaswag`, `piqa`, `winogrande`, its
`train_xl` as train) when prepared, else `spot/<tfds name>/<split>.jsonl` under DATA_DIR: one JSON
object a line with TFDS's features (`label` the class id; HellaSWAG's `endings` a list). Not
registered (no TFDS dataset or reader here): C4's prefix LM, DocNLI, CxC, DROP's training set (its
MRQA validation set is `mrqa_drop_v001`) and RACE's multiple choice.

SPoT's mixtures, each task at its number of training examples (T5's rates), over what is registered:

  spot_glue_superglue_v002    GLUE and SuperGLUE (SPoT's best generic source for SuperGLUE)
  spot_nli_v002               MNLI, QNLI, GLUE RTE, SuperGLUE CB and RTE
  spot_paraphrase_v002        MRPC, QQP, STS-B
  spot_sentiment_v002         SST-2, Yelp-2
  spot_reading_v002           SQuAD, ReCoRD, MultiRC, CosmosQA (no `taskless_` form: SQuAD has none)
  spot_commonsense_v002       COPA, CosmosQA, HellaSWAG, PIQA, WinoGrande (SPoT's RAINBOW, in part)
"""
import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from . import common
from . import glue
from . import metrics
from . import postprocessors
from . import readers
from . import sources
from . import super_glue

_STRING = tf.TensorSpec([], tf.string)


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
  """A classification task read from TFDS features: `fields` are (the name shown in the inputs, the
  feature, an index into it or None), in order; `label` is the id of one of `label_names`."""
  tfds_name: str
  fields: Sequence[tuple[str, str, Optional[int]]]
  label_names: Sequence[str]
  train_examples: float
  tfds_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def features(self) -> dict[str, tf.TensorSpec]:
    """The TensorSpecs of the features read, as TFDS holds them."""
    specs = {feature: tf.TensorSpec([None] if index is not None else [], tf.string)
             for _, feature, index in self.fields}
    return {**specs, "label": tf.TensorSpec([], tf.int32)}


def _shown(*features: str) -> list[tuple[str, str, None]]:
  return [(feature, feature, None) for feature in features]


TASKS = {
    "spot_yelp_polarity_reviews_v020": ChoiceTask(
        "yelp_polarity_reviews", _shown("text"), ("negative", "positive"), 560_000.),
    "spot_rainbow_cosmos_qa_v100": ChoiceTask(
        "cosmos_qa", _shown("context", "question", "answer0", "answer1", "answer2", "answer3"),
        ("answer0", "answer1", "answer2", "answer3"), 25_262.),
    "spot_rainbow_hellaswag_v110": ChoiceTask(
        "hellaswag", [*_shown("context"), *((f"ending{i}", "endings", i) for i in range(4))],
        ("ending0", "ending1", "ending2", "ending3"), 39_905.),
    "spot_rainbow_piqa_v100": ChoiceTask(
        "piqa", _shown("goal", "sol1", "sol2"), ("sol1", "sol2"), 16_113.),
    "spot_rainbow_winogrande_v110": ChoiceTask(
        "winogrande", _shown("sentence", "option1", "option2"), ("option1", "option2"), 40_398.,
        tfds_splits={"train": "train_xl"}),
}
_SPLITS = ("train", "validation", "test")
_SQUAD_TRAIN_EXAMPLES = 87_599.
_RATES = {**glue.MIXTURE_RATES, **super_glue.MIXTURE_RATES, "squad_v010_allanswers":
          _SQUAD_TRAIN_EXAMPLES, **{name: task.train_examples for name, task in TASKS.items()}}
MIXTURES = {
    "spot_glue_superglue_v002": [*glue.MIXTURE_RATES, *super_glue.MIXTURE_RATES],
    "spot_nli_v002": ["glue_mnli_v002", "glue_qnli_v002", "glue_rte_v002", "super_glue_cb_v102",
                      "super_glue_rte_v102"],
    "spot_paraphrase_v002": ["glue_mrpc_v002", "glue_qqp_v002", "glue_stsb_v002"],
    "spot_sentiment_v002": ["glue_sst2_v002", "spot_yelp_polarity_reviews_v020"],
    "spot_reading_v002": ["squad_v010_allanswers", "super_glue_record_v102",
                          "super_glue_multirc_v102", "spot_rainbow_cosmos_qa_v100"],
    "spot_commonsense_v002": ["super_glue_copa_v102", "spot_rainbow_cosmos_qa_v100",
                              "spot_rainbow_hellaswag_v110", "spot_rainbow_piqa_v100",
                              "spot_rainbow_winogrande_v110"],
}


def source(task: ChoiceTask) -> sources.LocalOrTfdsSource:
  """TFDS `<tfds name>`, else `spot/<tfds name>/<split>.jsonl` in TFDS's features."""
  return sources.LocalOrTfdsSource(
      name=f"SPoT {task.tfds_name}",
      local_files={split: [f"spot/{task.tfds_name}/{split}.jsonl"] for split in _SPLITS},
      reader=readers.read_jsonl,
      features=task.features,
      tfds_name=task.tfds_name,
      tfds_splits=task.tfds_splits)


@seqio.map_over_dataset
def choice_text(example, benchmark_name: str, fields: Sequence[tuple[str, str, Optional[int]]],
                label_names: Sequence[str]):
  """`<benchmark> <field>: <text> ...` -> the label's name (T5's GLUE format, without an index);
  `<unk>` for an unlabelled example (label -1)."""
  parts = [benchmark_name]
  for shown, feature, index in fields:
    parts += [f"{shown}:", example[feature] if index is None else example[feature][index]]
  label = tf.cast(example["label"], tf.int32)
  return {"inputs": tf.strings.join(parts, separator=" "),
          "targets": tf.where(label < 0, "<unk>", tf.gather(label_names, tf.maximum(label, 0)))}


def register() -> list[str]:
  """Registers SPoT's tasks and mixtures (module docstring); returns the task names."""
  names = []
  for name, task in TASKS.items():
    names += common.add_task_variants(
        name, source(task),
        [functools.partial(choice_text, benchmark_name=task.tfds_name, fields=task.fields,
                           label_names=task.label_names)],
        functools.partial(postprocessors.label_to_id, label_names=task.label_names),
        [metrics.accuracy, metrics.invalid_prediction_rate])
  for name, tasks in MIXTURES.items():
    common.add_mixture_variants(name, [(task, _RATES[task]) for task in tasks if _RATES[task]],
                                with_taskless="squad_v010_allanswers" not in tasks)
  return names


TASK_NAMES = tuple(register())
