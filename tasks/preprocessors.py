"""Text preprocessors: examples in the TFDS format -> T5's `inputs`/`targets` strings.

The formats are those of T5 (Raffel et al., 2020), which the prompt tuning paper uses, e.g.
`rte sentence1: ... sentence2: ...` -> `entailment`. `remove_task_name` gives the paper's `taskless_`
variants by dropping the leading task name.
"""
from typing import Optional, Sequence

import seqio
import tensorflow as tf

# The two SuperGLUE WSC texts whose pronoun index does not point at the pronoun (as in T5).
_WSC_INPUTS_WITH_BLANK = {
    ('The boy continued to whip the pony , and eventually the pony threw him over. John laughed '
     'out quite loud. "Good for him," he said. '):
        ('The boy continued to whip the pony , and eventually the pony threw him over. John '
         'laughed out quite loud. "Good for X ," he said.'),
    ('When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic '
     'pebble in an iron safe . Some day they might want to use it , but really for now, what more '
     'could they wish for?'):
        ('When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the '
         'magic pebble in an iron safe . Some day they might want to use X , but really for now, '
         'what more could they wish for?'),
}


def _label_name(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
  """The name of a class id; `<unk>` for -1 (unlabelled test examples)."""
  label = tf.cast(label, tf.int32)
  return tf.where(label < 0, "<unk>", tf.gather(label_names, tf.maximum(label, 0)))


def _pad_punctuation(text: tf.Tensor) -> tf.Tensor:
  """Puts spaces around each non-word character and collapses runs of whitespace (as T5)."""
  text = tf.strings.regex_replace(text, r"(\W)", r" \1 ")
  return tf.strings.regex_replace(text, r"\s+", " ")


@seqio.map_over_dataset
def glue_text(example, benchmark_name: str, label_names: Sequence[str],
              feature_names: Optional[Sequence[str]] = None):
  """`<benchmark> <feature>: <text> ...` -> label name, as T5's GLUE/SuperGLUE format.

  Args:
    example: a GLUE-like example with text features, an int `label` and `idx`.
    benchmark_name: the leading task name, e.g. `rte`.
    label_names: the target text of each class id.
    feature_names: the text features in order; by default all but `label`/`idx`, sorted.

  Returns:
    `inputs`, `targets` and the example's index (`idx`, or `idx/<field>` for MultiRC).
  """
  feature_names = feature_names or sorted(set(example) - {"label", "idx"})
  parts = [benchmark_name]
  for name in feature_names:
    parts += [f"{name}:", example[name]]
  inputs = tf.strings.join(parts, separator=" ")
  processed = {"inputs": inputs, "targets": _label_name(example["label"], label_names)}
  if isinstance(example["idx"], dict):
    for key, value in example["idx"].items():
      processed[f"idx/{key}"] = value
  else:
    processed["idx"] = example["idx"]
  return processed


def multirc_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """MultiRC as `multirc question: ... answer: ... paragraph: ...`, without HTML markup."""
  dataset = glue_text(dataset, benchmark_name="multirc", label_names=("False", "True"),
                      feature_names=("question", "answer", "paragraph"))

  def remove_markup(example):
    text = tf.strings.regex_replace(example["inputs"], "<br>", " ")
    return {**example, "inputs": tf.strings.regex_replace(text, "<(/)?b>", "")}

  return dataset.map(remove_markup, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset
def stsb_text(example):
  """STS-B with its score rounded to a multiple of 0.2 as the target, e.g. `3.8`."""
  inputs = tf.strings.join(
      ["stsb sentence1:", example["sentence1"], "sentence2:", example["sentence2"]], separator=" ")
  score = tf.round(tf.cast(example["label"], tf.float32) * 5) / 5
  return {"inputs": inputs, "targets": tf.strings.as_string(score, precision=1),
          "idx": example["idx"]}


def wsc_simple_text(dataset: tf.data.Dataset, correct_referent_only: bool) -> tf.data.Dataset:
  """WSC in T5's simple form: `wsc: <text with *pronoun*>` -> the candidate referent.

  Args:
    dataset: `super_glue/wsc.fixed` examples.
    correct_referent_only: keep only examples whose candidate is the referent (for training).

  Returns:
    `inputs`, `targets` (the candidate's text), `label` (whether it is the referent) and `idx`.
  """

  def to_text(example):
    words = tf.strings.split(example["text"], sep=" ")
    index = tf.cast(example["span2_index"], tf.int32)
    with_blank = tf.strings.join([
        tf.strings.reduce_join(words[:index], separator=" "), "X",
        tf.strings.reduce_join(words[index + 1:], separator=" ")], separator=" ")
    for text, special_with_blank in _WSC_INPUTS_WITH_BLANK.items():
      with_blank = tf.where(tf.equal(example["text"], text), special_with_blank, with_blank)
    marked = tf.strings.regex_replace(
        with_blank, " X ", tf.strings.join([" *", example["span2_text"], "* "]))
    return {
        "inputs": tf.strings.join(["wsc:", marked], separator=" "),
        "targets": example["span1_text"],
        "label": tf.cast(example["label"], tf.int32),
        "idx": example["idx"],
    }

  if correct_referent_only:
    dataset = dataset.filter(lambda example: tf.equal(example["label"], 1))
  return dataset.map(to_text, num_parallel_calls=tf.data.AUTOTUNE)


def record_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """ReCoRD as `record query: ... entities: a, b passage: ...`, one example per answer.

  An example without answers (the test split) gets the single target `<unk>`. Every example keeps
  the full `answers` list and `idx/passage`, `idx/query` for evaluation.
  """

  def to_texts(example):
    passage = tf.strings.regex_replace(
        example["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    inputs = tf.strings.join([
        "record query:", example["query"], "entities:",
        tf.strings.reduce_join(example["entities"], separator=", "), "passage:", passage,
    ], separator=" ")
    answers = example["answers"]
    targets = tf.cond(tf.size(answers) > 0, lambda: answers, lambda: tf.constant(["<unk>"]))
    copies = tf.size(targets)
    return {
        "inputs": tf.fill([copies], inputs),
        "targets": targets,
        "answers": tf.tile(tf.expand_dims(answers, 0), [copies, 1]),
        "idx/passage": tf.fill([copies], tf.cast(example["idx"]["passage"], tf.int32)),
        "idx/query": tf.fill([copies], tf.cast(example["idx"]["query"], tf.int32)),
    }

  return dataset.map(to_texts, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


@seqio.map_over_dataset
def squad_text(example):
  """SQuAD-style QA as T5: `question: ... context: ...` -> the first answer.

  Question, context and answers get T5's punctuation padding. Accepts TFDS `squad` examples
  (`answers/text`, `id`) and TFDS `mrqa` examples (flat `answers`, `qid`).
  """
  answers = example["answers"]
  answers = _pad_punctuation(answers["text"] if isinstance(answers, dict) else answers)
  question = _pad_punctuation(example["question"])
  context = _pad_punctuation(example["context"])
  inputs = tf.strings.join(["question:", question, "context:", context], separator=" ")
  return {
      "inputs": tf.strings.regex_replace(inputs, r"\s+", " "),
      "targets": answers[0],
      "id": example["id"] if "id" in example else example["qid"],
      "question": question,
      "context": context,
      "answers": answers,
  }


@seqio.map_over_dataset
def remove_task_name(example, key: str = "inputs"):
  """Drops the first word of `key` (the task name), for the paper's `taskless_` tasks."""
  return {**example, key: tf.strings.regex_replace(example[key], r"^[^ ]* ", "",
                                                   replace_global=False)}
