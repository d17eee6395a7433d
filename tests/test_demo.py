"""The demo (`make demo`) end to end, shortened: train, evaluate, save, and run again.

The full demo (300 steps) is minutes of CPU; this runs STEPS. What a short run shows honestly: the
loss falls and the answers are already class labels. Accuracy on RTE it does not claim (the frozen
model knows no language; the demo says so).
"""
import json
import shlex

import gin
import numpy as np
import pytest

from prompt_tuning_jax import demo
from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax import report

STEPS = 60


@pytest.fixture(autouse=True)
def clear_gin():
  """Leaves no gin bindings (e.g. DATA_DIR) behind for other tests."""
  yield
  gin.clear_config()


def test_demo_learns_the_answer_format_and_reruns(tmp_path, capsys):
  model_dir = tmp_path / "demo_run"
  argv = [f"--model_dir={model_dir}", f"--gin.TRAIN_STEPS={STEPS}", f"--gin.EVAL_PERIOD={STEPS}",
          f"--gin.CHECKPOINT_PERIOD={STEPS}", "--gin.EvalConfig.num_examples=16",
          "--gin.EVAL_NUM_EXAMPLES=32"]
  demo.main(argv)
  out = capsys.readouterr().out
  prompt_file = model_dir / "numpy_checkpoints" / f"checkpoint_{STEPS}" / demo.PROMPT_FILE_NAME
  assert np.load(prompt_file).shape == (20, 192)
  assert (model_dir / "train").is_dir() and (model_dir / "best").exists()

  first, last = report.first_and_last_tenth(report.read_curves(str(model_dir))["train"]["loss"])
  assert last < 0.7 * first
  with open(model_dir / "eval" / "metrics.json") as f:
    metrics = json.load(f)[demo.TASK]
  assert metrics["invalid_prediction_rate"] < 5
  with open(model_dir / "rank_eval" / "ensemble_metrics.json") as f:
    assert 0 <= json.load(f)["ensemble"]["accuracy"] <= 100

  for text in (str(model_dir), str(prompt_file), "over the first 10% of steps",
               "rank classification", "majority", "-m prompt_tuning_jax.report", "--logdir",
               "t5_1_1_lm100k_base"):
    assert text in out, text

  # The eval command it prints works as written.
  command = out[out.index("-m prompt_tuning_jax.eval"):].replace("\\\n", " ").split("\n")[0]
  eval_dir = model_dir / "eval_again"
  eval_lib.main([arg for arg in shlex.split(command)[2:]
                 if not arg.startswith("--gin.EVAL_OUTPUT_DIR")]
                + [f"--gin.EVAL_OUTPUT_DIR={str(eval_dir)!r}", "--gin.EVAL_NUM_EXAMPLES=8"])
  assert (eval_dir / "metrics.json").is_file()
  capsys.readouterr()

  metrics_log = (model_dir / "train_metrics.jsonl").read_text()
  demo.main(argv)  # Resumes the finished run: nothing to train, evaluates again.
  assert f"Demo finished at step {STEPS}" in capsys.readouterr().out
  assert (model_dir / "train_metrics.jsonl").read_text() == metrics_log
