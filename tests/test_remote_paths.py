"""Remote checkpoint paths that cannot be reached end in one line within a bounded time.

The command-line tests pass with and without a network: offline (or without access) the tools must
end within `BOUND_SECONDS` with one line naming the path; online they may succeed.
"""
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from prompt_tuning_jax import checkpoints, demo

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_GIN_DIR = REPO_ROOT / "tests" / "gin"
GCS_CHECKPOINT = "gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_base/checkpoint_1100000"
BOUND_SECONDS = 120


def run_tool(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
  start = time.monotonic()
  result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=BOUND_SECONDS + 60)
  return result, time.monotonic() - start


def assert_bounded_one_line(result: subprocess.CompletedProcess, seconds: float, path: str):
  assert seconds < BOUND_SECONDS
  if result.returncode:
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and path in result.stderr


def test_a_host_that_does_not_answer_fails_within_the_timeout(monkeypatch):
  released = threading.Event()

  def hang(*_, **__):
    released.wait(60)
    raise TimeoutError("released by the test")

  monkeypatch.setattr(checkpoints.socket, "create_connection", hang)
  start = time.monotonic()
  try:
    with pytest.raises(checkpoints.CheckpointError, match=r"Cannot reach gs://bucket/ckpt: "
                       r"storage.googleapis.com did not accept a connection within 0.5 s"):
      checkpoints.check_reachable("gs://bucket/ckpt", timeout=0.5)
    assert time.monotonic() - start < 5
  finally:
    released.set()


def test_a_refused_connection_names_its_cause(monkeypatch):
  def refuse(address, timeout):
    raise ConnectionRefusedError(f"refused {address} after {timeout}")
  monkeypatch.setattr(checkpoints.socket, "create_connection", refuse)
  with pytest.raises(checkpoints.CheckpointError, match=r"ConnectionRefusedError: refused "
                     r"\('example.com', 8080\)"):
    checkpoints.detect_format("http://example.com:8080/ckpt")


def test_local_paths_are_not_probed(monkeypatch, tmp_path):
  monkeypatch.setattr(checkpoints.socket, "create_connection",
                      lambda *_, **__: pytest.fail("probed"))
  checkpoints.check_reachable(str(tmp_path))
  checkpoints.check_reachable(f"file://{tmp_path}")


def test_inspect_of_a_gs_checkpoint_ends_in_bounded_time():
  result, seconds = run_tool("prompt_tuning_jax.inspect", GCS_CHECKPOINT)
  assert_bounded_one_line(result, seconds, GCS_CHECKPOINT)


def test_train_from_a_gs_checkpoint_ends_in_bounded_time(tmp_path):
  path = "gs://t5-data/pretrained_models/t5x/no_such_model_for_tests/checkpoint_1"
  result, seconds = run_tool(
      "prompt_tuning_jax.train", f"--gin_search_paths={TEST_GIN_DIR}", "--gin_file=t5x_tiny.gin",
      "--gin_file=runs/prompt_finetune.gin", f"--gin.MODEL_DIR={str(tmp_path / 'run')!r}",
      "--gin.MIXTURE_OR_TASK_NAME='taskless_super_glue_rte_v102'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4}",
      f"--gin.INITIAL_CHECKPOINT_PATH={path!r}",
      f"--gin.DATA_DIR={demo.DEMO_DATA_DIR!r}", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2")
  assert result.returncode == 2  # the checkpoint does not exist, online or not
  assert_bounded_one_line(result, seconds, path)
  assert not os.path.exists(tmp_path / "run")
