"""Metrics and postprocessors on small hand-checked cases."""
import functools

import pytest

from prompt_tuning_jax.tasks import metrics
from prompt_tuning_jax.tasks import postprocessors


def test_accuracy_and_invalid_rate():
  assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, -1]) == {"accuracy": 50.0}
  assert metrics.invalid_prediction_rate([0, 1, 1, 0], [0, 1, 0, -1]) == {
      "invalid_prediction_rate": 25.0}
  assert metrics.invalid_prediction_rate([{"value": 1}], [{"value": -1}]) == {
      "invalid_prediction_rate": 100.0}


def test_binary_f1_counts_invalid_predictions_as_wrong():
  # TP=1 (index 0), FP=1 (index 2), FN=1 (index 1): P = R = 1/2, F1 = 1/2.
  assert metrics.f1_with_invalid([1, 1, 0, 0], [1, 0, 1, 0]) == {"f1": 50.0}
  # The invalid prediction on a positive becomes a false negative: P = 1, R = 1/2, F1 = 2/3.
  assert metrics.f1_with_invalid([1, 1, 0], [1, -1, 0])["f1"] == pytest.approx(200 / 3)


def test_cb_macro_f1():
  # Class 0: P = 1, R = 1/2, F1 = 2/3. Class 1: P = 1/2, R = 1, F1 = 2/3. Class 2: F1 = 1.
  mean_f1 = metrics.mean_multiclass_f1(num_classes=3)
  assert mean_f1([0, 0, 1, 2], [0, 1, 1, 2])["mean_3class_f1"] == pytest.approx(100 * 7 / 9)
  # An invalid prediction (-1) is a miss of its true class, not a fourth class.
  assert mean_f1([0, 1, 2], [0, 1, -1])["mean_3class_f1"] == pytest.approx(100 * 2 / 3)


def test_matthews_correlation():
  # TP=1, TN=1, FP=1, FN=0: (1*1 - 1*0) / sqrt(2 * 1 * 2 * 1) = 1/2.
  assert metrics.matthews_corrcoef([1, 0, 0], [1, 1, 0])["matthews_corrcoef"] == pytest.approx(50)


def test_pearson_and_spearman():
  assert metrics.pearson_corrcoef([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])["pearson_corrcoef"] == (
      pytest.approx(100))
  # Monotone but not linear: Spearman 100, Pearson below.
  targets, predictions = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 40.0]
  assert metrics.spearman_corrcoef(targets, predictions)["spearman_corrcoef"] == pytest.approx(100)
  assert metrics.pearson_corrcoef(targets, predictions)["pearson_corrcoef"] < 90


def test_multirc_f1_over_answers_and_exact_match_per_question():
  targets = [{"value": 1, "group": 0}, {"value": 0, "group": 0},
             {"value": 1, "group": 1}, {"value": 1, "group": 1}]
  predictions = [{"value": 1}, {"value": 0}, {"value": 1}, {"value": 0}]
  # Question 0 fully right, question 1 not: EM 50. Answers: TP=2, FN=1, FP=0: F1 = 4/5.
  assert metrics.multirc_exact_match(targets, predictions) == {"exact_match": 50.0}
  assert metrics.multirc_f1_over_all_answers(targets, predictions)["f1"] == pytest.approx(80)


def test_squad_normalisation_and_max_over_answers():
  assert metrics.normalize_answer("  The Quick, brown fox!  ") == "quick brown fox"
  assert metrics.normalize_answer("An apple a day") == "apple day"
  result = metrics.squad(
      [["The Eiffel Tower", "Eiffel Tower in Paris"], ["blue"]],
      ["eiffel tower.", "dark green"])
  # Example 1: exact after normalisation. Example 2: no overlap.
  assert result == {"em": 50.0, "f1": 50.0}
  # Token F1 takes the best answer: "in paris" vs "eiffel tower in paris": P=1, R=1/2, F1=2/3.
  partial = metrics.squad([["Eiffel Tower", "Eiffel Tower in Paris"]], ["in Paris"])
  assert partial["em"] == 0.0
  assert partial["f1"] == pytest.approx(200 / 3)


def test_record_scores_each_query_once():
  targets = [{"answers": ["Morgan", "Tracy Morgan"], "group": (0, 0)},
             {"answers": ["Morgan", "Tracy Morgan"], "group": (0, 0)},
             {"answers": ["China"], "group": (1, 1)}]
  predictions = ["Tracy Morgan", "Tracy Morgan", "the UK"]
  assert metrics.record(targets, predictions) == {"em": 50.0, "f1": 50.0}


def test_label_postprocessor_maps_unknown_words_to_invalid():
  to_id = functools.partial(postprocessors.label_to_id,
                            label_names=("entailment", "not_entailment"))
  assert to_id(b"not_entailment") == 1
  assert to_id("entailment", is_target=True) == 0
  assert to_id("maybe") == -1
  assert postprocessors.string_to_float(b"3.8") == 3.8
  assert postprocessors.string_to_float("three") == -1.0


def test_qqp_to_mrpc_translation():
  translate = functools.partial(
      postprocessors.translate_labels,
      translation={"duplicate": "equivalent", "not_duplicate": "not_equivalent"},
      label_names=("not_equivalent", "equivalent"))
  assert translate(b"duplicate") == 1
  assert translate("not_duplicate") == 0
  assert translate("equivalent", is_target=True) == 1
  assert translate("paraphrase") == -1


def test_wsc_simple_postprocessor():
  example = {"targets_pretokenized": b"the demonstrators", "label": 1}
  wsc = functools.partial(postprocessors.wsc_simple, example=example)
  assert wsc("The demonstrators") == 1
  assert wsc("demonstrators") == 1
  assert wsc("the city councilmen") == 0
  assert wsc("demonstrators'") == 0  # A possessive in only one of them.
  assert wsc("  ") == -1
  assert wsc("whatever", is_target=True) == 1


def test_structured_postprocessors():
  multirc_example = {"idx/question": 7}
  assert postprocessors.multirc(b"True", example=multirc_example) == {"value": 1}
  assert postprocessors.multirc("False", example=multirc_example, is_target=True) == {
      "value": 0, "group": 7}
  record_example = {"answers": [b"Morgan", b"Tracy Morgan"], "idx/passage": 0, "idx/query": 3}
  assert postprocessors.record(b"Morgan", example=record_example) == "Morgan"
  assert postprocessors.record(b"Morgan", example=record_example, is_target=True) == {
      "answers": ["Morgan", "Tracy Morgan"], "group": (0, 3)}
  assert postprocessors.qa(b"x", example={"answers": [b"a", b"b"]}, is_target=True) == ["a", "b"]
