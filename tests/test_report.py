"""Run reports rendered from a real short training run on the demo's bundled model and RTE."""
import json
import shutil

import gin
import numpy as np
import pytest

from prompt_tuning_jax import demo
from prompt_tuning_jax import report
from prompt_tuning_jax import train

TASK = "taskless_super_glue_rte_v102"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A 20-step run that evaluates every 10 steps and keeps its best prompt by accuracy."""
  directory = tmp_path_factory.mktemp("report") / "run"
  train.main([
      "--gin_file=runs/demo.gin",
      f"--gin.MODEL_DIR={str(directory)!r}",
      f"--gin.INITIAL_CHECKPOINT_PATH={demo.DEMO_CHECKPOINT!r}",
      f"--gin.DATA_DIR={demo.DEMO_DATA_DIR!r}",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
      "--gin.PROMPT_LENGTH=4", "--gin.BATCH_SIZE=4", "--gin.TRAIN_STEPS=20",
      "--gin.EVAL_PERIOD=10", "--gin.CHECKPOINT_PERIOD=10", "--gin.train.log_period=5",
      "--gin.EvalConfig.num_examples=8", "--gin.train.progress_bar=False",
  ])
  gin.clear_config()
  return directory


def test_report_draws_the_curves_and_names_the_best_step(model_dir, capsys):
  assert report.main([str(model_dir)]) == 0
  assert "report.png" in capsys.readouterr().out
  image = model_dir / "report.png"
  assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000
  best = json.loads((model_dir / "best" / "best.json").read_text())
  text = (model_dir / "report.md").read_text()
  assert f"| best step | {best['step']} |" in text
  assert f"| best accuracy | {best['value']:.4g} ({TASK}) |" in text
  prompt = np.load(model_dir / "numpy_checkpoints" / "checkpoint_20" / report.PROMPT_FILE)
  assert f"L2 norm {np.linalg.norm(prompt):.4g}" in text
  assert "| steps | 20 |" in text and "examples/s" in text and "![curves](report.png)" in text
  assert text.startswith(
      f"# Run report: {TASK} | random_t5 (embed 192, 2+2 layers) | prompt 4 x 192 | run")
  rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert rows and all(len([c for c in row.split("|")[1:-1] if c.strip()]) == 3 for row in rows)


def test_panels_have_units_and_fold_a_constant_learning_rate_into_a_title(model_dir):
  curves = report.read_curves(str(model_dir))
  drawn = report.panels(curves, report.read_run_config(str(model_dir)))
  titles = [panel.title for panel in drawn]
  assert titles[0] == "train loss (learning rate 0.3, constant)"
  assert "learning rate" not in titles and "gradient norm" in titles
  assert drawn[0].ylabel == "loss, summed over the batch's target tokens"
  assert "eval accuracy" in titles and "eval invalid_prediction_rate" in titles


def test_flat_and_single_point_series_get_sane_limits(tmp_path):
  curves = {"train": {"loss": [(s, 10.0 - s / 10) for s in range(5, 105, 5)],
                      "learning_rate": [(s, 0.01 * s) for s in range(5, 105, 5)],
                      "grad_norm": [(s, 0.0) for s in range(5, 105, 5)]},
            "eval": {"loss_per_token": [(100, 10.65)]},
            f"eval/{TASK}": {"accuracy": [(50, 0.0), (100, 0.0)]}}
  figure = report.plot(curves, None, str(tmp_path / "report.png"), "title")
  axes = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
  assert set(axes) == {"train loss", "learning rate", "gradient norm", "eval loss", "eval accuracy"}
  assert axes["gradient norm"].get_ylim() == (-0.5, 0.5)
  low, high = axes["eval loss"].get_ylim()
  assert low < 10 < 11 < high
  low, high = axes["eval accuracy"].get_ylim()
  assert low < 0 and high > 100
  assert all(axis.get_xlim()[0] == 0 and axis.get_xlim()[1] > 100 for axis in axes.values())
  assert len(axes["train loss"].get_lines()) == 2  # each logged batch and the moving average


def test_moving_average_is_centred():
  np.testing.assert_allclose(report.moving_average([1, 2, 3, 4], 3), [1.5, 2, 3, 3.5])
  np.testing.assert_allclose(report.moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])


def test_curves_hold_train_and_eval_rows(model_dir):
  curves = report.read_curves(str(model_dir))
  assert [step for step, _ in curves["train"]["loss"]] == [5, 10, 15, 20]
  assert [step for step, _ in curves["train"]["learning_rate"]] == [5, 10, 15, 20]
  assert [step for step, _ in curves["train"]["grad_norm"]] == [5, 10, 15, 20]
  assert [step for step, _ in curves[f"eval/{TASK}"]["accuracy"]] == [10, 20]
  assert [step for step, _ in curves["eval"]["loss_per_token"]] == [10, 20]


def test_tensorboard_events_give_the_same_curves(model_dir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(model_dir, copy, symlinks=True)
  (copy / report.METRICS_FILE).unlink()
  from_events = report.read_curves(str(copy))
  from_jsonl = report.read_curves(str(model_dir))
  for kind, name in [("train", "loss"), ("eval", "loss_per_token"), (f"eval/{TASK}", "accuracy")]:
    np.testing.assert_allclose(from_events[kind][name], from_jsonl[kind][name], rtol=1e-6)
  image, markdown = report.write_report(str(copy), str(tmp_path / "out"), metric="loss_per_token")
  assert open(image, "rb").read(4) == b"\x89PNG"
  best_step, best_loss = min(from_jsonl["eval"]["loss_per_token"], key=lambda p: (p[1], p[0]))
  text = open(markdown).read()
  assert f"| best step | {best_step} |" in text and f"| best loss_per_token | {best_loss:.4g} |" in text


def test_bad_model_dir_is_one_line(tmp_path, capsys):
  assert report.main([str(tmp_path / "missing")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
