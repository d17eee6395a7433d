"""`--gin.ATTENTION_IMPLEMENTATION` on the command line: each implementation trains the same prompt
from the bundled T5X checkpoint, and an unknown one is refused before anything is written."""
import os
import pathlib

import gin
import numpy as np
import pytest

from prompt_tuning_jax import train

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "prompt_tuning_jax"
DEMO_DATA = PACKAGE / "demo_data"
TEST_GIN_DIR = pathlib.Path(__file__).resolve().parent / "gin"
PROMPT_NAME = "encoder.prompt.prompt.prompt"
STEPS = 4


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


def _flags(model_dir, implementation: str) -> list[str]:
  values = {
      "MODEL_DIR": repr(str(model_dir)),
      "MIXTURE_OR_TASK_NAME": "'taskless_super_glue_rte_v102'",
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 4}",
      "INITIAL_CHECKPOINT_PATH": repr(str(DEMO_DATA / "t5x_t5_1_1_tiny" / "checkpoint_3")),
      "DATA_DIR": repr(str(DEMO_DATA)),
      "BATCH_SIZE": "4", "TRAIN_STEPS": str(STEPS), "EVAL_PERIOD": "0",
      "CHECKPOINT_PERIOD": str(STEPS), "ATTENTION_IMPLEMENTATION": repr(implementation),
  }
  return [f"--gin_search_paths={TEST_GIN_DIR}", "--gin_file=t5x_tiny.gin",
          "--gin_file=runs/prompt_finetune.gin"] + [f"--gin.{k}={v}" for k, v in values.items()]


def test_every_implementation_trains_the_same_prompt(tmp_path):
  prompts = {}
  for implementation in ("xla", "cpu", "auto"):
    model_dir = tmp_path / implementation
    train.main(_flags(model_dir, implementation))
    prompts[implementation] = np.load(
        model_dir / "numpy_checkpoints" / f"checkpoint_{STEPS}" / PROMPT_NAME)
  assert np.all(np.isfinite(prompts["xla"]))
  for implementation in ("cpu", "auto"):
    np.testing.assert_allclose(prompts[implementation], prompts["xla"], atol=1e-5,
                               err_msg=implementation)


def test_an_unknown_implementation_is_refused_in_one_line(tmp_path, capsys):
  model_dir = tmp_path / "run"
  with pytest.raises(SystemExit) as exit_info:
    train.main(_flags(model_dir, "bogus"))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "'bogus'" in err[0], err
  assert not os.path.exists(model_dir)
