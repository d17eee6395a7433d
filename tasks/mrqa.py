"""SQuAD and the MRQA 2019 out-of-domain sets, for the paper's zero-shot domain transfer.

`squad_v010_allanswers` trains on SQuAD; `mrqa_<set>_v001` is the validation set of an
out-of-domain MRQA set (textbookqa, bioasq, race, relation_extraction, duorc, drop), and the
mixture `squad_to_<set>` joins the two (`squad_to_mrqa` joins all). With `byt5_`, `mt5_` forms.
"""
import functools

import tensorflow as tf

from . import common
from . import metrics
from . import postprocessors
from . import preprocessors
from . import readers
from . import sources

# Task name -> (TFDS `mrqa` config, directory under `mrqa/`, the MRQA download's file stem).
OUT_OF_DOMAIN_SETS = {
    "textbookqa": ("textbook_qa", "TextbookQA", "TextbookQA"),
    "bioasq": ("bio_asq", "BioASQ", "BioASQ"),
    "race": ("race", "RACE", "RACE"),
    "relation_extraction": ("relation_extraction", "RelationExtraction", "RelationExtraction"),
    "duorc": ("duo_rc", "DuoRC", "DuoRC.ParaphraseRC"),
    "drop": ("drop", "DROP", "DROP"),
}
_STRING = tf.TensorSpec([], tf.string)
FEATURES = {"qid": _STRING, "context": _STRING, "question": _STRING,
            "answers": tf.TensorSpec([None], tf.string)}
_METRIC_FNS = [metrics.squad]


def _jsonl_names(directory: str, *stems: str) -> list[str]:
  return [f"mrqa/{directory}/{stem}.jsonl{suffix}" for stem in stems for suffix in ("", ".gz")]


def squad_source() -> sources.LocalOrTfdsSource:
  """TFDS `squad/v1.1`, else MRQA's SQuAD files `mrqa/SQuAD/{train,dev}.jsonl[.gz]`."""
  return sources.LocalOrTfdsSource(
      name="SQuAD",
      local_files={"train": _jsonl_names("SQuAD", "train"),
                   "validation": _jsonl_names("SQuAD", "dev")},
      reader=readers.mrqa_examples,
      features=FEATURES,
      tfds_name="squad/v1.1")


def out_of_domain_source(name: str) -> sources.LocalOrTfdsSource:
  """TFDS `mrqa/<config>` (its test split), else `mrqa/<Set>/{dev,<Set>}.jsonl[.gz]`."""
  tfds_config, directory, file_stem = OUT_OF_DOMAIN_SETS[name]
  return sources.LocalOrTfdsSource(
      name=f"MRQA {directory}",
      local_files={"validation": _jsonl_names(directory, "dev", file_stem)},
      reader=readers.mrqa_examples,
      features=FEATURES,
      tfds_name=f"mrqa/{tfds_config}",
      tfds_splits={"validation": "test"})


def register() -> list[str]:
  """Registers SQuAD, the MRQA out-of-domain tasks and their mixtures; returns the task names."""
  add_qa_task = functools.partial(
      common.add_task_variants, text_preprocessors=[preprocessors.squad_text],
      postprocess_fn=postprocessors.qa, metric_fns=_METRIC_FNS, with_taskless=False)
  names = add_qa_task("squad_v010_allanswers", squad_source())
  for name in OUT_OF_DOMAIN_SETS:
    names += add_qa_task(f"mrqa_{name}_v001", out_of_domain_source(name))
    common.add_mixture_variants(
        f"squad_to_{name}", ["squad_v010_allanswers", f"mrqa_{name}_v001"], default_rate=1.0,
        with_taskless=False)
  common.add_mixture_variants(
      "squad_to_mrqa",
      ["squad_v010_allanswers"] + [f"mrqa_{name}_v001" for name in OUT_OF_DOMAIN_SETS],
      default_rate=1.0, with_taskless=False)
  return names
