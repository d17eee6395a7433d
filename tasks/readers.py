"""Pure-Python readers for the original benchmark files.

Each reader turns one file into examples with the same feature names, label ids and index fields
as the TFDS version of the dataset (`super_glue`, `glue`, `mrqa`), so that one set of preprocessors
serves both sources. Nothing here imports TensorFlow.
"""
import csv
import dataclasses
import functools
import gzip
import io
import json
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

Example = dict[str, Any]

# Label names in TFDS class-id order.
SUPER_GLUE_LABELS = {
    "boolq": ("False", "True"),
    "cb": ("entailment", "contradiction", "neutral"),
    "copa": ("choice1", "choice2"),
    "multirc": ("False", "True"),
    "rte": ("entailment", "not_entailment"),
    "wic": ("False", "True"),
    "wsc.fixed": ("False", "True"),
    "axb": ("entailment", "not_entailment"),
    "axg": ("entailment", "not_entailment"),
}
GLUE_LABELS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}
# Text features of each GLUE task: TFDS name -> the tsv columns it may come from.
_GLUE_COLUMNS = {
    "cola": {"sentence": ("sentence",)},
    "sst2": {"sentence": ("sentence", "text")},
    "mrpc": {"sentence1": ("#1 String",), "sentence2": ("#2 String",)},
    "qqp": {"question1": ("question1",), "question2": ("question2",)},
    "stsb": {"sentence1": ("sentence1",), "sentence2": ("sentence2",)},
    "mnli": {"premise": ("sentence1",), "hypothesis": ("sentence2",)},
    "qnli": {"question": ("question",), "sentence": ("sentence",)},
    "rte": {"sentence1": ("sentence1",), "sentence2": ("sentence2",)},
    "wnli": {"sentence1": ("sentence1",), "sentence2": ("sentence2",)},
}
_GLUE_LABEL_COLUMNS = ("label", "gold_label", "Quality", "is_duplicate", "score")
_INT32_RANGE = range(-2**31, 2**31)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SUPER_GLUE_TEXT_FEATURES = {
    "boolq": ("question", "passage"),
    "cb": ("premise", "hypothesis"),
    "copa": ("premise", "choice1", "choice2", "question"),
    "rte": ("premise", "hypothesis"),
    "wic": ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2"),
    "axb": ("sentence1", "sentence2"),
    "axg": ("premise", "hypothesis"),
}


@dataclasses.dataclass(frozen=True)
class _Optional:
  """A field of a line that may be absent."""
  type: Any


# The fields the readers take from a line of a jsonl file, and their types (the TFDS features they
# become, whose tf.data signature a value of another type would break; a line's other fields are
# ignored): `str`; `int`, an int32; `bool`; `None`, null; a tuple, any of its types; `[t]`, a list
# of `t`; `{name: t}`, an object holding those fields.
_LABEL = _Optional((str, int, bool, None))  # a class name, a bool or a class id (`_label_id`)
_MULTIRC_LINE = {"idx": int, "passage": {"text": str, "questions": [{
    "question": str, "idx": int,
    "answers": [{"text": str, "idx": int, "label": _Optional((bool, int, None))}]}]}}
_RECORD_LINE = {"idx": int, "passage": {"text": str, "entities": [{"start": int, "end": int}]},
                "qas": [{"query": str, "idx": int, "answers": _Optional([{"text": str}])}]}
_WSC_LINE = {"text": str, "idx": int, "label": _LABEL, "target": {
    "span1_index": int, "span2_index": int, "span1_text": str, "span2_text": str}}
_MRQA_LINE = {"context": str, "qas": [{"qid": str, "question": str, "answers": [str]}]}
_TYPE_NAMES = {str: "a string", int: "an int32", bool: "a bool", None: "null"}


def _super_glue_line(task: str) -> dict[str, Any]:
  """The fields of a line of SuperGLUE `task`'s jsonl files, and their types."""
  if task in _SUPER_GLUE_TEXT_FEATURES:
    return {**{name: int if name.startswith(("start", "end")) else str
               for name in _SUPER_GLUE_TEXT_FEATURES[task]}, "idx": int, "label": _LABEL}
  return {"multirc": _MULTIRC_LINE, "record": _RECORD_LINE, "wsc.fixed": _WSC_LINE}[task]


def _check_fields(value: Any, fields: Any, name: str = "") -> None:
  """Checks a parsed jsonl line (`value`) against its `fields` (`_super_glue_line`).

  Raises:
    KeyError: a field is missing; its argument is the field's path (`passage.questions[0].idx`).
    ValueError: a field's value is of another type; the message names the field, the value and the
      type it should be.
  """
  if isinstance(fields, dict):
    if not isinstance(value, dict):
      raise _wrong_type(name, value, "an object")
    for field, field_type in fields.items():
      path = f"{name}.{field}" if name else field
      if field in value:
        _check_fields(value[field],
                      field_type.type if isinstance(field_type, _Optional) else field_type, path)
      elif not isinstance(field_type, _Optional):
        raise KeyError(path)
  elif isinstance(fields, list):
    if not isinstance(value, list):
      raise _wrong_type(name, value, "a list")
    for index, item in enumerate(value):
      _check_fields(item, fields[0], f"{name}[{index}]")
  else:
    types = fields if isinstance(fields, tuple) else (fields,)
    if not any(_is_of(value, t) for t in types):
      raise _wrong_type(name, value, " or ".join(_TYPE_NAMES[t] for t in types))


def _is_of(value: Any, type_: Any) -> bool:
  """Whether `value` is of `type_` (`str`, `bool`, None, or `int`: an int32 that is not a bool)."""
  if type_ is None:
    return value is None
  if type_ is int:
    return isinstance(value, int) and not isinstance(value, bool) and value in _INT32_RANGE
  return isinstance(value, type_)


def _wrong_type(name: str, value: Any, kind: str) -> ValueError:
  """The error of the field `name` holding `value`, not `kind` (`an int32`)."""
  shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
  return ValueError(f"the field {name!r} is {shown} ({type(value).__name__}), not {kind}")


def _open_text(path: str) -> io.TextIOBase:
  """Opens a (possibly gzipped) UTF-8 file, dropping a byte-order mark."""
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
  return open(path, encoding="utf-8-sig", newline="")


def numbered_jsonl(path: str) -> Iterator[tuple[int, Example]]:
  """Yields (line number, JSON object) of each non-empty line of a (possibly gzipped) UTF-8 file.

  A line that is not valid UTF-8, not JSON, not a JSON object, or holds a lone surrogate (an escape
  such as `\\ud800` that encodes no character) is a `ValueError` naming the file and the line.
  """
  with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not valid UTF-8 ({e.reason} at byte {e.start} of "
                         "the line); save the file as UTF-8.") from None
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_number}: not a JSON line: {e}") from e
        if not isinstance(row, dict):
          raise ValueError(f"{path}:{line_number}: {line.strip()[:40]!r} is not a JSON object; "
                           "each line holds one example, {\"name\": value, ...}.")
        try:
          if _SURROGATE_ESCAPE.search(line):  # the only way a decoded line holds one
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
          raise ValueError(f"{path}:{line_number}: holds a lone surrogate "
                           f"{e.object[e.start:e.end]!r}, which is not a character; fix the "
                           "text.") from None
        yield line_number, row


def read_jsonl(path: str) -> Iterator[Example]:
  """Yields the JSON object on each non-empty line of `path`."""
  for _, row in numbered_jsonl(path):
    yield row


def read_tsv(path: str, fieldnames: Optional[Sequence[str]] = None) -> Iterator[dict[str, str]]:
  """Yields the rows of a GLUE-style tsv: tab separated, quote characters kept as text.

  Args:
    path: the file.
    fieldnames: column names for a file without a header line; None reads them from the header.
  """
  with _open_text(path) as f:
    yield from csv.DictReader(f, fieldnames=fieldnames, delimiter="\t", quoting=csv.QUOTE_NONE)


def _label_id(label: Any, label_names: Sequence[str]) -> int:
  """A label as its class id: a name, a bool, or an int (or its string); -1 means unlabelled."""
  if isinstance(label, bool):
    return int(label)
  if label in label_names:
    return label_names.index(label)
  if str(label).strip() in ("True", "False"):
    return int(str(label).strip() == "True")
  try:
    class_id = int(label)
  except (TypeError, ValueError):
    class_id = None
  if class_id is None or not -1 <= class_id < len(label_names):
    raise ValueError(f"the label {label!r} is none of {list(label_names)} nor a class id in "
                     f"[0, {len(label_names) - 1}] (or -1, unlabelled)")
  return class_id


def fix_wsc_spans(example: Example) -> Example:
  """Makes WSC span texts substrings of the text, as TFDS `super_glue/wsc.fixed` does."""
  for span in ("span1", "span2"):
    span_text = example[f"{span}_text"]
    if span_text in example["text"]:
      continue
    if span_text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
      continue  # The subjects have intervening text; nothing to fix.
    words = example["text"].split()
    if not 0 <= example[f"{span}_index"] < len(words):
      raise ValueError(f"WSC example {example['idx']}: {span}_index {example[f'{span}_index']} is "
                       f"not the index of a word of its text, which has {len(words)}")
    first_word = words[example[f"{span}_index"]]
    span_text = (span_text[0].lower() if first_word[0].islower() else span_text[0].upper()) + span_text[1:]
    span_text = span_text.rstrip(".").replace("\n", " ")
    if span_text not in example["text"]:
      raise ValueError(f"WSC example {example['idx']}: span {span_text!r} is not in its text.")
    example[f"{span}_text"] = span_text
  return example


def _record_examples(row: Mapping[str, Any]) -> Iterator[Example]:
  """One example per ReCoRD query: sorted unique entity strings and answers."""
  passage = row["passage"]
  text = passage["text"]
  # Entity offsets are inclusive at both ends.
  entities = sorted({text[e["start"]:e["end"] + 1] for e in passage["entities"]})
  for qa in row["qas"]:
    yield {
        "passage": text,
        "query": qa["query"],
        "entities": entities,
        "answers": sorted({a["text"] for a in qa.get("answers", [])}),
        "idx": {"passage": row["idx"], "query": qa["idx"]},
    }


def _multirc_examples(row: Mapping[str, Any]) -> Iterator[Example]:
  """One example per MultiRC answer option."""
  passage = row["passage"]
  for question in passage["questions"]:
    for answer in question["answers"]:
      label = answer.get("label")
      yield {
          "paragraph": passage["text"],
          "question": question["question"],
          "answer": answer["text"],
          "label": -1 if label is None else int(bool(label)),
          "idx": {"paragraph": row["idx"], "question": question["idx"], "answer": answer["idx"]},
      }


def super_glue_examples(task: str, path: str) -> Iterator[Example]:
  """Yields the examples of a SuperGLUE jsonl file in the TFDS `super_glue/<task>` format.

  Args:
    task: the TFDS config name: boolq, cb, copa, multirc, record, rte, wic, wsc.fixed, axb or axg.
    path: the jsonl file (e.g. `RTE/val.jsonl` of the official download).
  """
  fields = _SUPER_GLUE_TEXT_FEATURES.get(task)
  expected = f"; a SuperGLUE {task} line has {[*fields, 'idx']}" if fields else ""
  yield from _jsonl_examples(path, functools.partial(_super_glue_row_examples, task), expected)


def _jsonl_examples(path: str, row_examples: Callable[[Example], Iterator[Example]],
                    expected: str = "") -> Iterator[Example]:
  """The examples of each line of a jsonl file; `row_examples` checks the line's fields
  (`_check_fields`). A line whose fields are missing or malformed is a `ValueError` naming the file,
  the line and the field. `expected` ends the message of a missing field (what a line has)."""
  for line_number, row in numbered_jsonl(path):
    try:
      examples = list(row_examples(row))
    except KeyError as e:
      raise ValueError(f"{path}:{line_number}: the field {e.args[0]!r} is missing{expected}; fix "
                       "that line of the file.") from None
    except ValueError as e:
      raise ValueError(f"{path}:{line_number}: {str(e).rstrip('.')}; fix that line of the file."
                       ) from None
    yield from examples


def _super_glue_row_examples(task: str, row: Mapping[str, Any]) -> Iterator[Example]:
  _check_fields(row, _super_glue_line(task))
  if task == "record":
    yield from _record_examples(row)
  elif task == "multirc":
    yield from _multirc_examples(row)
  else:
    if task == "wsc.fixed":
      example = {k: row["target"][k] for k in ("span1_index", "span2_index", "span1_text", "span2_text")}
      example["text"] = row["text"]
      example["idx"] = row["idx"]
      example = fix_wsc_spans(example)
    else:
      example = {name: row[name] for name in _SUPER_GLUE_TEXT_FEATURES[task]}
      example["idx"] = row["idx"]
    label = row.get("label")
    example["label"] = -1 if label is None else _label_id(label, SUPER_GLUE_LABELS[task])
    yield example


def _glue_columns(task: str, path: str, header: Sequence[Optional[str]]) -> dict[str, str]:
  """`{feature: its tsv column}` of a GLUE task from the file's header; a missing column is a
  `ValueError` naming the file and the column."""
  columns = {}
  for feature, candidates in _GLUE_COLUMNS[task].items():
    columns[feature] = next((column for column in candidates if column in header), None)
    if columns[feature] is None:
      raise ValueError(f"{path}: no column {' or '.join(map(repr, candidates))} (GLUE {task}'s "
                       f"{feature!r}); the header has {[c for c in header if c is not None]}. Use "
                       "the official tsv file, header line included.")
  return columns


def glue_examples(task: str, path: str) -> Iterator[Example]:
  """Yields the examples of a GLUE tsv file in the TFDS `glue/<task>` format.

  Rows with missing fields (a few in QQP's train file) are skipped, as TFDS does.

  Args:
    task: the TFDS config name without the MNLI suffix: cola, sst2, mrpc, qqp, stsb, mnli, qnli,
      rte or wnli.
    path: the tsv file (e.g. `RTE/dev.tsv` of the official download).
  """
  with _open_text(path) as f:
    first_line = f.readline()
  # CoLA's train and dev files have no header: source, label, original label, sentence.
  headerless_cola = task == "cola" and not first_line.startswith("index\t")
  fieldnames = ("source", "label", "original_label", "sentence") if headerless_cola else None
  columns = None
  for row_number, row in enumerate(read_tsv(path, fieldnames)):
    columns = columns or _glue_columns(task, path, list(row))
    example: Example = {feature: row[column] for feature, column in columns.items()}
    label = next((row[c] for c in _GLUE_LABEL_COLUMNS if c in row), "")
    if None in example.values() or label is None:
      continue
    try:
      if task == "stsb":
        example["label"] = float(label) if label else -1.0
      else:
        example["label"] = _label_id(label, GLUE_LABELS[task]) if label else -1
    except ValueError as e:
      raise ValueError(f"{path}: row {row_number + 1}: {str(e).rstrip('.')}.") from None
    example["idx"] = row_number
    yield example


def mrqa_examples(path: str) -> Iterator[Example]:
  """Yields one example per question of an MRQA jsonl(.gz) file, with or without its header.

  The format is that of TFDS `mrqa`: `qid`, `context`, `question` (both stripped) and `answers`.
  """
  yield from _jsonl_examples(path, _mrqa_row_examples, "; an MRQA line has 'context' and 'qas'")


def _mrqa_row_examples(row: Mapping[str, Any]) -> Iterator[Example]:
  if "header" in row:
    return
  _check_fields(row, _MRQA_LINE)
  for qa in row["qas"]:
    yield {"qid": qa["qid"], "context": row["context"].strip(), "question": qa["question"].strip(),
           "answers": qa["answers"]}
