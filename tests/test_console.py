"""What a tool prints: no start-up noise, one opening line, evaluations announced with progress.

Runs on the T5X test checkpoint and the RTE slice bundled with the package, so it needs no
../shared data.
"""
import os
import pathlib
import subprocess
import sys

import gin
import pytest

from prompt_tuning_jax import demo, train

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_GIN_DIR = REPO_ROOT / "tests" / "gin"
# What TensorFlow, CUDA, gRPC and absl print when they load unasked.
NOISE = ("absl::InitializeLog", "cuda", "cuInit", "TF-TRT", "oneDNN custom operations",
         "computation placer", "Unable to register")


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


def tiny_run_flags(model_dir, **macros) -> list[str]:
  """A 2-step run on the bundled T5X checkpoint and RTE slice, evaluated at its end."""
  values = {
      "MODEL_DIR": repr(str(model_dir)),
      "MIXTURE_OR_TASK_NAME": "'taskless_super_glue_rte_v102'",
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 4}",
      "INITIAL_CHECKPOINT_PATH": repr(demo.T5X_TEST_CHECKPOINT),
      "DATA_DIR": repr(demo.DEMO_DATA_DIR),
      "TRAIN_STEPS": "2", "BATCH_SIZE": "2", "EVAL_PERIOD": "2", "EvalConfig.num_examples": "4",
  }
  values.update(macros)
  return [f"--gin_search_paths={TEST_GIN_DIR}", "--gin_file=t5x_tiny.gin",
          "--gin_file=runs/prompt_finetune.gin"] + [f"--gin.{k}={v}" for k, v in values.items()]


def clean_environment() -> dict[str, str]:
  """This process's environment without the variables the tools set."""
  return {name: value for name, value in os.environ.items()
          if name not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}


def test_importing_the_package_changes_no_environment():
  """Beyond what TensorFlow and the other libraries set when they load."""
  code = ("import os, jax, seqio, tensorflow, tensorflow_datasets, orbax.checkpoint; "
          "before = dict(os.environ); "
          "import prompt_tuning_jax.train, prompt_tuning_jax.cli, prompt_tuning_jax.console; "
          "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
  subprocess.run([sys.executable, "-c", code], check=True, env=clean_environment(), cwd=REPO_ROOT,
                 timeout=300)


def test_a_training_run_opens_with_one_line_and_prints_no_noise(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "prompt_tuning_jax.train", *tiny_run_flags(tmp_path / "run")],
      capture_output=True, text=True, env=clean_environment(), cwd=REPO_ROOT, timeout=600)
  assert result.returncode == 0, result.stderr
  lines = result.stderr.splitlines()
  assert [line for line in lines if any(noise in line for noise in NOISE)] == []
  assert lines[0].startswith(
      "Training a 3-token prompt on taskless_super_glue_rte_v102: T5 of emb 4, 2+2 layers, 2 heads "
      "of 2, MLP 8, vocab 32128 (float32); 2 steps of global batch 2; mesh 1x1 (data x model) of "
      "1 cpu device(s); attention 'cpu'; MODEL_DIR ")
  assert "Evaluating step 2: decoding 4 examples of taskless_super_glue_rte_v102." in lines
  assert any(line.startswith("Evaluated step 2 in ") for line in lines)
  assert "Trained to step 2" in result.stdout


def test_evaluation_shows_progress_on_a_terminal(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
  train.main(tiny_run_flags(tmp_path / "run"))
  err = capsys.readouterr().err
  assert "eval:" in err and "example/s" in err


def test_the_tool_modules_load_neither_tensorflow_nor_jax():
  """So that a tool quiets the process before they load."""
  code = ("import sys; import prompt_tuning_jax.train, prompt_tuning_jax.eval, "
          "prompt_tuning_jax.infer, prompt_tuning_jax.ensemble, prompt_tuning_jax.demo, "
          "prompt_tuning_jax.plan; assert not {'tensorflow', 'jax'} & set(sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=300)
