"""The demo (`make demo`) end to end, shortened: train, evaluate, save, and run again."""
import json

import gin
import numpy as np
import pytest

from prompt_tuning_jax import demo


@pytest.fixture(autouse=True)
def clear_gin():
  """Leaves no gin bindings (e.g. DATA_DIR) behind for other tests."""
  yield
  gin.clear_config()


def test_demo_trains_evaluates_and_reruns(tmp_path, capsys):
  model_dir = tmp_path / "demo_run"
  argv = [f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=20", "--gin.EVAL_PERIOD=10",
          "--gin.CHECKPOINT_PERIOD=10"]
  demo.main(argv)
  out = capsys.readouterr().out
  prompt_file = model_dir / "numpy_checkpoints" / "checkpoint_20" / demo.PROMPT_FILE_NAME
  assert np.load(prompt_file).shape == (20, 4)
  with open(model_dir / "eval" / "metrics.json") as f:
    assert "accuracy" in json.load(f)["taskless_super_glue_rte_v102"]
  assert (model_dir / "train").is_dir() and (model_dir / "best").exists()
  for text in (str(model_dir), str(prompt_file), "tensorboard --logdir", "random weights",
               "t5_1_1_lm100k_base"):
    assert text in out

  metrics_log = (model_dir / "train_metrics.jsonl").read_text()
  demo.main(argv)  # Resumes the finished run: nothing to train, evaluates again.
  assert "Demo finished at step 20" in capsys.readouterr().out
  assert (model_dir / "train_metrics.jsonl").read_text() == metrics_log
