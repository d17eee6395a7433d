"""Prompt ensembling on real RTE data: one computation per batch, each member as if alone, the table."""
import json

import jax
import numpy as np
import pytest
import seqio

import prompt_tuning_jax.tasks  # pylint: disable=unused-import (registers the tasks)
from prompt_tuning_jax import (checkpoints, config, decoding, ensembling, network, prompts, serving,
                               trees)

TASK = "taskless_super_glue_rte_v102"
LENGTHS = {"inputs": 48, "targets": 8}
PROMPT_LENGTHS = (3, 2, 3)
NUM_EXAMPLES = 6


@pytest.fixture(scope="module")
def data_dir(shared_dir):
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("PROMPT_TUNING_DATA_DIR", str(shared_dir / "data"))
    yield shared_dir / "data"


@pytest.fixture(scope="module")
def model_config():
  return config.t5_config("t5_1_1", "tiny")  # the T5 vocabulary, embed 4


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory, model_config):
  directory = tmp_path_factory.mktemp("prompts")
  rng = np.random.RandomState(0)
  files = []
  for k, n in enumerate(PROMPT_LENGTHS):
    files.append(str(directory / f"prompt_{k}.npy"))
    np.save(files[-1], rng.normal(scale=3.0, size=(n, model_config.emb_dim)).astype(np.float32))
  return files


def _evaluate(model_config, prompt_files, output_dir, method):
  return ensembling.evaluate_ensemble(
      mixture_or_task_name=TASK, task_feature_lengths=LENGTHS, batch_size=4,
      model_config=model_config, prompt_files=prompt_files, method=method,
      num_examples=NUM_EXAMPLES, output_dir=str(output_dir))


def _read_rows(output_dir):
  return [json.loads(line) for line in
          (output_dir / "ensemble_predictions.jsonl").read_text().splitlines()]


def test_vote_members_match_each_prompt_alone(data_dir, model_config, prompt_files, tmp_path):
  table = _evaluate(model_config, prompt_files, tmp_path, "vote")
  assert [m["prompt_file"] for m in table["members"]] == prompt_files
  accuracies = [m["accuracy"] for m in table["members"]]
  assert table["average"]["accuracy"] == pytest.approx(np.mean(accuracies))
  assert table["best"]["accuracy"] == max(accuracies)
  assert json.loads((tmp_path / "ensemble_metrics.json").read_text()) == table

  rows = _read_rows(tmp_path)
  assert len(rows) == NUM_EXAMPLES
  assert [r["ensemble"] for r in rows] == ensembling.majority_vote(
      list(zip(*[r["members"] for r in rows])))
  correct = [r["ensemble"] == r["targets"] for r in rows]
  assert table["ensemble"]["accuracy"] == pytest.approx(100 * np.mean(correct))

  # Member 1 (a 2-position prompt, padded to 3 in the stack) decodes as its prompt alone does.
  vocabulary = seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary
  prompt = np.load(prompt_files[1])
  alone = network.T5(model_config, prompts.PromptConfig(len(prompt)))
  params = serving.with_prompt_bank(
      trees.unflatten(checkpoints.load_frozen_params(model_config, None)), prompt)
  inputs = serving.encode_inputs(vocabulary, [r["inputs"] for r in rows], LENGTHS["inputs"])
  tokens, _ = jax.jit(lambda p, x: decoding.greedy_decode(
      alone, p, x, max_decode_length=LENGTHS["targets"]))(params, inputs)
  assert serving.decode_tokens(vocabulary, np.asarray(tokens)) == [r["members"][1] for r in rows]


def test_rank_averages_label_log_likelihoods(data_dir, model_config, prompt_files, tmp_path):
  table = _evaluate(model_config, prompt_files, tmp_path, "rank")
  labels = ["entailment", "not_entailment"]
  for row in _read_rows(tmp_path):
    scores = np.array(row["member_scores"])  # [K, labels]
    assert scores.shape == (len(prompt_files), 2)
    assert row["members"] == [labels[i] for i in scores.argmax(-1)]
    assert row["ensemble"] == labels[scores.mean(0).argmax()]
  assert table["method"] == "rank" and table["ensemble"]["invalid_prediction_rate"] == 0.0


def test_length_buckets_change_the_shapes_and_nothing_else(data_dir, model_config, prompt_files,
                                                           tmp_path, monkeypatch):
  """With inputs of 256 and buckets of 64 and 128, the members see cut batches and score the same."""
  widths, member_outputs = [], ensembling.member_outputs

  def recording(model, params, inputs, *args, **kwargs):
    widths.append(inputs.shape[1])  # once a compiled shape
    return member_outputs(model, params, inputs, *args, **kwargs)
  monkeypatch.setattr(ensembling, "member_outputs", recording)
  results = {}
  for buckets in ((), (64, 128)):
    output_dir = tmp_path / str(len(buckets))
    table = ensembling.evaluate_ensemble(
        mixture_or_task_name=TASK, task_feature_lengths={"inputs": 256, "targets": 8}, batch_size=4,
        model_config=model_config, prompt_files=prompt_files, method="rank",
        num_examples=NUM_EXAMPLES, output_dir=str(output_dir), length_buckets=buckets)
    results[buckets] = table, _read_rows(output_dir)
  assert widths[0] == 256 and min(widths[1:]) < 256
  (full_table, full_rows), (cut_table, cut_rows) = results[()], results[(64, 128)]
  assert cut_table == full_table
  for full, cut in zip(full_rows, cut_rows):
    assert (cut["index"], cut["members"], cut["ensemble"]) == (full["index"], full["members"],
                                                               full["ensemble"])
    np.testing.assert_allclose(cut["member_scores"], full["member_scores"], rtol=1e-5)


def test_helpers_and_errors(data_dir, model_config, prompt_files):
  assert ensembling.majority_vote([["a", "b", "c"], ["b", "b", "d"], ["a", "c", "e"]]) == \
      ["a", "b", "c"]
  assert ensembling.default_class_labels(seqio.get_mixture_or_task(TASK)) == \
      ["entailment", "not_entailment"]
  with pytest.raises(ValueError, match="Unknown ensemble method"):
    _evaluate(model_config, prompt_files, "/tmp/unused", "mean")
  with pytest.raises(ValueError, match="PROMPT_FILES is empty"):
    _evaluate(model_config, [], "/tmp/unused", "vote")
