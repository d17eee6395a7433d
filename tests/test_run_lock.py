"""One run per MODEL_DIR: the lock names its holder, dies with it, and a refused run writes nothing."""
import os
import signal
import socket
import subprocess
import sys

import gin
import pytest

from prompt_tuning_jax import run_lock, train
from test_train_e2e import REPO_ROOT, SHARED, flags, listing


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  model_dir = str(tmp_path / "run")
  with run_lock.RunLock(model_dir):
    held = (tmp_path / "run" / run_lock.LOCK_FILE).read_bytes()
    with pytest.raises(run_lock.RunLockedError) as error:
      with run_lock.RunLock(model_dir):
        pass
    message = str(error.value)
    assert "\n" not in message and "in use by another run" in message
    assert f"process {os.getpid()} on {socket.gethostname()}, since " in message
    assert (tmp_path / "run" / run_lock.LOCK_FILE).read_bytes() == held
  with run_lock.RunLock(model_dir):  # released on exit
    pass
  assert (tmp_path / "run" / run_lock.LOCK_FILE).read_bytes() == b""


def test_the_lock_dies_with_its_process(tmp_path):
  """A holder killed with SIGKILL (no cleanup at all) leaves the lock free."""
  model_dir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom prompt_tuning_jax import run_lock\n"
       f"with run_lock.RunLock({model_dir!r}):\n  print('held', flush=True)\n  time.sleep(300)"],
      cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"},
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(run_lock.RunLockedError, match=f"process {holder.pid} on "):
      with run_lock.RunLock(model_dir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  with run_lock.RunLock(model_dir):
    pass


@pytest.mark.needs_shared(SHARED)
def test_a_training_run_on_a_locked_model_dir_is_refused_and_writes_nothing(tmp_path, capsys):
  model_dir = tmp_path / "run"
  with run_lock.RunLock(str(model_dir)):
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
      train.main(flags(MODEL_DIR=repr(str(model_dir))))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {model_dir} is in use by another run (process {os.getpid()}")
    assert listing(tmp_path) == before
