"""One run per MODEL_DIR: an exclusive lock on `MODEL_DIR/run.lock`, taken before a run writes.

Two runs saving into one MODEL_DIR would break each other's checkpoints. A run holds an
`fcntl.flock` on the lock file for its whole life; the kernel drops it when the process ends,
however it ends (a kill included), so a lock is never stale on one host, and on a shared filesystem
that supports locks (NFSv4, Lustre) the server drops a dead client's. The file holds the holder's host,
pid and start time, only to name it to whoever is refused. With several processes, process 0 holds
the lock for all of them.
"""
import datetime
import fcntl
import json
import logging
import os
import socket
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = "run.lock"

logger = logging.getLogger("prompt_tuning_jax")


class RunLockedError(ValueError):
  """Another run holds the MODEL_DIR."""


class RunLock:
  """`with RunLock(model_dir):` holds `model_dir/run.lock` (creating `model_dir`) or raises
  `RunLockedError` naming the holder, having written nothing."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._fd: Optional[int] = None

  def __enter__(self) -> "RunLock":
    error = None
    if jax.process_index() == 0:
      try:
        self._fd = _take(self.path)
      except RunLockedError as e:
        error = e
    if jax.process_count() > 1:
      taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
      if not taken and error is None:
        error = RunLockedError(f"{self.model_dir} is in use by another run: process 0 could not "
                               f"lock {self.path}.")
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc_info) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # no holder named once the run is over
      os.close(self._fd)
      self._fd = None


def _take(path: str) -> Optional[int]:
  """Locks `path`; returns its open descriptor (None where the filesystem has no locks)."""
  if "://" in path:
    logger.warning("%s is not a local path: it is not locked; start one run on it at a time.", path)
    return None
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise RunLockedError(
        f"{os.path.dirname(path)} is in use by another run ({holder}, holding {path}); wait for it "
        "to end or stop it, or give this run another MODEL_DIR.") from None
  except OSError as e:  # e.g. ENOLCK: a filesystem without locks
    os.close(fd)
    logger.warning("Cannot lock %s (%s); start one run on it at a time.", path, e)
    return None
  since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": since}).encode())
  return fd


def _holder(fd: int) -> str:
  """Who holds the lock, from what it wrote into the file."""
  try:
    holder = json.loads(os.pread(fd, 4096, 0))
    return f"process {holder['pid']} on {holder['host']}, since {holder['since']}"
  except (ValueError, KeyError, TypeError):  # it has locked the file and not yet written it
    return "a process that is starting"
