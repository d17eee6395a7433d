"""One run per MODEL_DIR: the lock names its holder, dies with it, and a refused run writes nothing;
where the flock does not protect (no locks, another host), the holder's record and heartbeat decide."""
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

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


def start_holder(model_dir):
  """A process holding `model_dir`'s lock (until killed)."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom prompt_tuning_jax import run_lock\n"
       f"with run_lock.RunLock({model_dir!r}):\n  print('held', flush=True)\n  time.sleep(300)"],
      cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"},
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "held\n"
  return holder


def kill(holder):
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=60)


def stale_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and "Taking over the stale lock" in r.getMessage()]


def test_the_lock_dies_with_its_process(tmp_path, caplog):
  """A holder killed with SIGKILL (no cleanup at all) leaves the lock free; its record is taken
  over with one warning naming it."""
  model_dir = str(tmp_path / "run")
  holder = start_holder(model_dir)
  try:
    with pytest.raises(run_lock.RunLockedError, match=f"process {holder.pid} on "):
      with run_lock.RunLock(model_dir):
        pass
  finally:
    kill(holder)
  with run_lock.RunLock(model_dir):
    pass
  [warning] = stale_warnings(caplog)
  assert warning.startswith(f"Taking over the stale lock {model_dir}/run.lock of process "
                            f"{holder.pid} on {socket.gethostname()}, since "), warning
  assert warning.endswith(": that process is no longer running."), warning


@pytest.fixture
def no_locks(monkeypatch):
  """This process's locks fail as on a filesystem without them (ENOLCK, NFS without lockd)."""
  def flock(fd, operation):
    del fd, operation
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(run_lock.fcntl, "flock", flock)


def test_without_locks_the_record_refuses_a_live_holder_and_frees_a_dead_ones(tmp_path, caplog,
                                                                             no_locks):
  model_dir = str(tmp_path / "run")
  holder = start_holder(model_dir)  # it locks (its flock is real); this process cannot
  try:
    held = (tmp_path / "run" / run_lock.LOCK_FILE).read_bytes()
    with pytest.raises(run_lock.RunLockedError) as error:
      with run_lock.RunLock(model_dir):
        pass
    message = str(error.value)
    assert "\n" not in message, message
    assert f"in use by another run (process {holder.pid} on {socket.gethostname()}, since " in message
    assert "last seen 0 s ago" in message and "stale once untouched for 300 s" in message, message
    assert (tmp_path / "run" / run_lock.LOCK_FILE).read_bytes() == held
  finally:
    kill(holder)
  with run_lock.RunLock(model_dir):
    record = json.loads((tmp_path / "run" / run_lock.LOCK_FILE).read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
  [warning] = stale_warnings(caplog)
  assert f"of process {holder.pid} on " in warning and warning.endswith("no longer running.")


def write_record(path, **record):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"host": "node-7.cluster", "pid": 4242,
                              "since": "2026-12-05T10:00:00+00:00", "heartbeat_s": 30.0, **record}))


@pytest.mark.parametrize("locks", ["flock", "no_locks"])
def test_another_hosts_record_is_alive_until_its_heartbeat_stops(tmp_path, caplog, request, locks):
  """A record of another host (where the flock protects one host only, or nothing): refused while
  its file is touched, taken over with one warning once it has been untouched for 10 beats."""
  if locks == "no_locks":
    request.getfixturevalue("no_locks")
  model_dir, path = str(tmp_path / "run"), tmp_path / "run" / run_lock.LOCK_FILE
  write_record(path)
  before = path.read_bytes()
  with pytest.raises(run_lock.RunLockedError,
                     match=r"in use by another run \(process 4242 on node-7.cluster, since "
                     r"2026-12-05T10:00:00\+00:00, last seen 0 s ago, holding .*run.lock\)"):
    with run_lock.RunLock(model_dir):
      pass
  assert path.read_bytes() == before and stale_warnings(caplog) == []
  silent = time.time() - 301
  os.utime(path, (silent, silent))
  with run_lock.RunLock(model_dir):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  [warning] = stale_warnings(caplog)
  assert "of process 4242 on node-7.cluster, since 2026-12-05T10:00:00+00:00" in warning
  assert "the file has not been touched for 301 s, 10 times its holder's heartbeat" in warning


def test_the_holder_touches_its_lock_file_until_released(tmp_path):
  path = tmp_path / "run" / run_lock.LOCK_FILE
  with run_lock.RunLock(str(tmp_path / "run"), heartbeat_s=0.05):
    assert json.loads(path.read_text())["heartbeat_s"] == 0.05
    silent = time.time() - 1000
    os.utime(path, (silent, silent))
    deadline = time.time() + 30
    while path.stat().st_mtime < time.time() - 10 and time.time() < deadline:
      time.sleep(0.05)
    assert path.stat().st_mtime > time.time() - 10
  assert not [t for t in threading.enumerate() if t.name == "run-lock-heartbeat"]
  os.utime(path, (silent, silent))
  time.sleep(0.2)
  assert path.stat().st_mtime == silent and path.read_bytes() == b""


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
