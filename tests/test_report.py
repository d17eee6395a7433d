"""Run reports rendered from a real short training run on the bundled tiny T5X checkpoint and RTE."""
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


def test_curves_hold_train_and_eval_rows(model_dir):
  curves = report.read_curves(str(model_dir))
  assert [step for step, _ in curves["train"]["loss"]] == [5, 10, 15, 20]
  assert [step for step, _ in curves["train"]["learning_rate"]] == [5, 10, 15, 20]
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
