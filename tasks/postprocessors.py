"""Postprocessors: decoded model outputs (and targets) -> the values the metrics compare.

seqio calls each as `fn(text, example=example, is_target=is_target)`. Label outputs that are not
one of the task's label words become -1, which the metrics count as invalid.
"""
from typing import Any, Mapping, Optional, Sequence

INVALID_LABEL = -1

# Determiners ignored when comparing a WSC prediction with its candidate (as T5).
_WSC_DETERMINERS = frozenset((
    "a", "an", "few", "her", "his", "each", "every", "many", "much", "my", "our", "some", "that",
    "the", "their", "these", "this", "those", "which", "whose", "your"))


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _as_int(value: Any) -> int:
  return int(value.item() if hasattr(value, "item") else value)


def label_to_id(output: Any, label_names: Sequence[str],
                example: Optional[Mapping[str, Any]] = None, is_target: bool = False) -> int:
  """The class id of a label word, or -1 for anything else."""
  del example, is_target  # Targets are label words too.
  text = _text(output).strip()
  return label_names.index(text) if text in label_names else INVALID_LABEL


def string_to_float(output: Any, example: Optional[Mapping[str, Any]] = None,
                    is_target: bool = False) -> float:
  """A number such as STS-B's `3.8`, or -1.0 if the text is not a number."""
  del example, is_target
  try:
    return float(_text(output))
  except ValueError:
    return float(INVALID_LABEL)


def translate_labels(output: Any, translation: Mapping[str, str], label_names: Sequence[str],
                     example: Optional[Mapping[str, Any]] = None, is_target: bool = False) -> int:
  """Maps a prediction in another task's label words to this task's class id (QQP <-> MRPC).

  Targets are already in this task's label words and are not translated.
  """
  text = _text(output).strip()
  if not is_target:
    text = translation.get(text, text)
  return label_to_id(text, label_names, example=example, is_target=is_target)


def multirc(output: Any, example: Optional[Mapping[str, Any]] = None,
            is_target: bool = False) -> dict[str, int]:
  """MultiRC answer label `{"value": id}`; targets also carry their question as `group`."""
  result = {"value": label_to_id(output, ("False", "True"))}
  if is_target:
    result["group"] = _as_int(example["idx/question"])
  return result


def record(output: Any, example: Optional[Mapping[str, Any]] = None,
           is_target: bool = False) -> Any:
  """ReCoRD: predictions stay text; targets become all answers and their (passage, query)."""
  if not is_target:
    return _text(output)
  return {
      "answers": [_text(answer) for answer in example["answers"]],
      "group": (_as_int(example["idx/passage"]), _as_int(example["idx/query"])),
  }


def qa(output: Any, example: Optional[Mapping[str, Any]] = None,
       is_target: bool = False) -> Any:
  """SQuAD-style QA: predictions stay text; targets become the list of all answers."""
  if is_target:
    return [_text(answer) for answer in example["answers"]]
  return _text(output)


def _wsc_words(text: str) -> str:
  return " ".join(w for w in text.strip().lower().split(" ") if w not in _WSC_DETERMINERS)


def wsc_simple(output: Any, example: Optional[Mapping[str, Any]] = None,
               is_target: bool = False) -> int:
  """WSC simple: 1 if the predicted referent matches the example's candidate, else 0.

  Targets are the example's label (whether the candidate is the referent); an empty prediction
  is invalid (-1). Words of one must be a subset of the other's, ignoring determiners, and a
  possessive `'` must be in both or neither (as T5).
  """
  if is_target:
    return _as_int(example["label"])
  prediction = _wsc_words(_text(output))
  if not prediction:
    return INVALID_LABEL
  candidate = _wsc_words(_text(example["targets_pretokenized"]))
  if ("'" in prediction) != ("'" in candidate):
    return 0
  prediction_words, candidate_words = set(prediction.split(" ")), set(candidate.split(" "))
  return int(prediction_words <= candidate_words or candidate_words <= prediction_words)
