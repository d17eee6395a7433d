"""The official metric of each task, as seqio metric functions `fn(targets, predictions) -> dict`.

Inputs are the postprocessed values (see `postprocessors.py`); -1 is an invalid prediction.
Scores are percentages, as in T5 and the paper.
"""
import collections
import re
import string
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.stats
import sklearn.metrics

from . import postprocessors

Metrics = dict[str, float]


def _value(item: Any) -> Any:
  return item["value"] if isinstance(item, Mapping) else item


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> Metrics:
  return {"accuracy": 100 * sklearn.metrics.accuracy_score(targets, predictions)}


def invalid_prediction_rate(targets: Sequence[Any], predictions: Sequence[Any]) -> Metrics:
  """The percentage of predictions that are not a valid label."""
  del targets
  invalid = [_value(p) == postprocessors.INVALID_LABEL for p in predictions]
  return {"invalid_prediction_rate": 100 * float(np.mean(invalid)) if invalid else 0.0}


def f1_with_invalid(targets: Sequence[int], predictions: Sequence[int]) -> Metrics:
  """Binary F1 of class 1, counting an invalid prediction as the wrong class."""
  targets = np.asarray(targets)
  predictions = np.asarray(predictions)
  invalid = ~np.isin(predictions, (0, 1))
  predictions = np.where(invalid, 1 - targets, predictions)
  return {"f1": 100 * sklearn.metrics.f1_score(targets, predictions)}


def mean_multiclass_f1(num_classes: int) -> Callable[[Sequence[int], Sequence[int]], Metrics]:
  """Macro-averaged F1 over the classes 0..num_classes-1 (CB); invalid predictions are wrong."""

  def mean_f1(targets: Sequence[int], predictions: Sequence[int]) -> Metrics:
    f1 = sklearn.metrics.f1_score(targets, predictions, labels=list(range(num_classes)),
                                  average="macro", zero_division=0)
    return {f"mean_{num_classes}class_f1": 100 * f1}

  return mean_f1


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> Metrics:
  return {"matthews_corrcoef": 100 * sklearn.metrics.matthews_corrcoef(targets, predictions)}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> Metrics:
  return {"pearson_corrcoef": 100 * scipy.stats.pearsonr(targets, predictions)[0]}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> Metrics:
  return {"spearman_corrcoef": 100 * scipy.stats.spearmanr(targets, predictions)[0]}


def multirc_f1_over_all_answers(targets: Sequence[Mapping[str, int]],
                                predictions: Sequence[Mapping[str, int]]) -> Metrics:
  """MultiRC F1a: binary F1 over every answer option."""
  return f1_with_invalid([t["value"] for t in targets], [p["value"] for p in predictions])


def multirc_exact_match(targets: Sequence[Mapping[str, int]],
                        predictions: Sequence[Mapping[str, int]]) -> Metrics:
  """MultiRC EM: the percentage of questions with every answer option labelled right."""
  question_correct = collections.defaultdict(lambda: True)
  for target, prediction in zip(targets, predictions):
    question_correct[target["group"]] &= target["value"] == prediction["value"]
  return {"exact_match": 100 * float(np.mean(list(question_correct.values())))}


def normalize_answer(text: str) -> str:
  """SQuAD answer normalisation: lower case, no punctuation, articles or extra whitespace."""
  text = text.lower()
  text = "".join(c for c in text if c not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  target_tokens = target.split()
  prediction_tokens = prediction.split()
  common = collections.Counter(target_tokens) & collections.Counter(prediction_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> Metrics:
  """SQuAD EM and token F1, each the max over an example's answers, after normalisation."""
  exact_matches, f1s = [], []
  for answers, prediction in zip(targets, predictions):
    answers = [normalize_answer(a) for a in answers]
    prediction = normalize_answer(prediction)
    exact_matches.append(max(float(a == prediction) for a in answers))
    f1s.append(max(_token_f1(a, prediction) for a in answers))
  return {"em": 100 * float(np.mean(exact_matches)), "f1": 100 * float(np.mean(f1s))}


def record(targets: Sequence[Mapping[str, Any]], predictions: Sequence[str]) -> Metrics:
  """ReCoRD: SQuAD EM/F1 once per query (the examples repeat a query once per answer)."""
  per_query = {}
  for target, prediction in zip(targets, predictions):
    per_query.setdefault(target["group"], (target["answers"], prediction))
  answers, query_predictions = zip(*per_query.values()) if per_query else ((), ())
  return squad(answers, query_predictions)
