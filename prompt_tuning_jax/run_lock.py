"""One run per MODEL_DIR: an exclusive lock on `MODEL_DIR/run.lock`, taken before a run writes.

Two runs saving into one MODEL_DIR would break each other's checkpoints. A run holds an
`fcntl.flock` on the lock file for its whole life; the kernel drops it when the process ends,
however it ends (a kill included), and on a shared filesystem that supports locks (NFSv4, Lustre)
the server drops a dead client's. The file holds the holder's record (host, pid, start time, the
period of its heartbeat), which names it to whoever is refused, and the holder touches the file (its
mtime) every `heartbeat_s` seconds from a daemon thread.

Where the flock does not protect, the record decides: on a filesystem without locks (`ENOLCK`), and
across hosts on one that locks each host apart (NFS mounted `nolock`). A record is stale, and the
lock is taken over with one warning naming it, when its holder is on this host and has ended (the
flock was free, or its pid is gone) or when the file has not been touched for `STALE_HEARTBEATS`
of its holder's heartbeats; any other holder is alive, and the run is refused. On those filesystems
two runs started in the same instant may both pass (the record is read, then written); start one run
at a time there. A released lock is an empty file. With several processes, process 0 holds the lock
for all of them.
"""
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0  # how often the holder touches the lock file
STALE_HEARTBEATS = 10  # a record untouched for this many of its heartbeats is stale
_RECORD_BYTES = 512  # a record is padded to this size and written in one `pwrite`

logger = logging.getLogger("prompt_tuning_jax")


class RunLockedError(ValueError):
  """Another run holds the MODEL_DIR."""


class RunLock:
  """`with RunLock(model_dir):` holds `model_dir/run.lock` (creating `model_dir`) or raises
  `RunLockedError` naming the holder, having written nothing. `heartbeat_s`: how often the holder
  touches the file."""

  def __init__(self, model_dir: str, heartbeat_s: float = HEARTBEAT_S):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self.heartbeat_s = heartbeat_s
    self._fd: Optional[int] = None
    self._stop = threading.Event()
    self._heartbeat: Optional[threading.Thread] = None

  def __enter__(self) -> "RunLock":
    error = None
    if jax.process_index() == 0:
      try:
        self._fd = _take(self.path, self.heartbeat_s)
      except RunLockedError as e:
        error = e
    if jax.process_count() > 1:
      taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
      if not taken and error is None:
        error = RunLockedError(f"{self.model_dir} is in use by another run: process 0 could not "
                               f"lock {self.path}.")
    if error is not None:
      raise error
    if self._fd is not None:
      self._stop.clear()
      self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
      self._heartbeat.start()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._heartbeat is not None:
      self._stop.set()
      self._heartbeat.join()
      self._heartbeat = None
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # no holder named once the run is over
      os.close(self._fd)
      self._fd = None

  def _beat(self) -> None:
    """Touches the lock file every `heartbeat_s` until the lock is released."""
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self._fd)
      except OSError:  # e.g. a network filesystem's passing error: the next beat tries again
        pass


def _take(path: str, heartbeat_s: float) -> Optional[int]:
  """Locks `path` and writes this process's record; returns its open descriptor (None for a remote
  path, which is not locked)."""
  if "://" in path:
    logger.warning("%s is not a local path: it is not locked; start one run on it at a time.", path)
    return None
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      flocked = True
    except BlockingIOError:
      raise _locked_error(path, _describe(_record(fd), fd)) from None
    except OSError as e:
      if e.errno != errno.ENOLCK:
        raise
      flocked = False  # a filesystem without locks: the record alone decides
    record = _record(fd)
    if record is not None:
      stale = _stale_because(record, fd, flocked)
      if stale is None:
        raise _locked_error(path, _describe(record, fd),
                            STALE_HEARTBEATS * record["heartbeat_s"])
      logger.warning("Taking over the stale lock %s of %s: %s.", path, _describe(record, fd), stale)
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since,
                       "heartbeat_s": heartbeat_s})
    os.pwrite(fd, text.ljust(_RECORD_BYTES).encode(), 0)
    os.ftruncate(fd, _RECORD_BYTES)
  except BaseException:
    os.close(fd)
    raise
  return fd


def _record(fd: int) -> Optional[dict[str, Any]]:
  """The holder's record in the lock file; None for an empty file (a released lock) or one that
  is not a record."""
  try:
    record = json.loads(os.pread(fd, 4 * _RECORD_BYTES, 0))
  except ValueError:
    return None
  if not (isinstance(record, dict) and isinstance(record.get("host"), str)
          and isinstance(record.get("pid"), int) and isinstance(record.get("since"), str)
          and isinstance(record.get("heartbeat_s"), (int, float))):
    return None
  return record


def _stale_because(record: dict[str, Any], fd: int, flocked: bool) -> Optional[str]:
  """Why `record`'s holder no longer holds the lock, or None if it may still."""
  if record["host"] == socket.gethostname() and (flocked or not _pid_alive(record["pid"])):
    return "that process is no longer running"
  silent_s = time.time() - os.fstat(fd).st_mtime
  if silent_s > STALE_HEARTBEATS * record["heartbeat_s"]:
    return (f"the file has not been touched for {silent_s:.0f} s, {STALE_HEARTBEATS} times its "
            "holder's heartbeat")
  return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _describe(record: Optional[dict[str, Any]], fd: int) -> str:
  """Who holds the lock, from its record, and when it last touched the file."""
  if record is None:  # it has locked the file and not yet written it
    return "a process that is starting"
  touched_s = max(0.0, time.time() - os.fstat(fd).st_mtime)
  return (f"process {record['pid']} on {record['host']}, since {record['since']}, last seen "
          f"{touched_s:.0f} s ago")


def _locked_error(path: str, holder: str, stale_after_s: Optional[float] = None) -> RunLockedError:
  """The refusal naming the holder; `stale_after_s`, where only the record says it is alive."""
  hint = "" if stale_after_s is None else (
      f" If that run has ended, its lock is stale once untouched for {stale_after_s:.0f} s.")
  return RunLockedError(
      f"{os.path.dirname(path)} is in use by another run ({holder}, holding {path}); wait for it "
      f"to end or stop it, or give this run another MODEL_DIR.{hint}")
