"""Checkpoints of a prompt-tuning run: what resumes it, the prompt as numpy, the best prompt so far.

A run's MODEL_DIR holds:
  run_config.json                          its settings, checked on every start (`check_run_config`)
                                           and recorded (`record_run_config`).
  run.lock                                 held by the run that uses the directory (`run_lock`).
  checkpoints/N/                           orbax, step N: `state` (the `TrainState`: prompt, optimizer
                                           state, step, rng) and `data_position` (JSON); the last K.
  numpy_checkpoints/checkpoint_N/NAME      each trainable variable at step N, `np.save`d without a
                                           suffix; NAME is its dotted path, as in the official code:
                                           `encoder.prompt.prompt.prompt`.
  best -> .best-XXXX/                      the best prompt so far: numpy files and `best.json`.
  checkpoints/corrupt-N/, numpy_checkpoints/corrupt-checkpoint_N/
                                           a checkpoint found unreadable on restore, moved aside.

The frozen model is never saved: a resumed run re-reads it from its initial checkpoint, so a checkpoint
of an XXL run is megabytes. Every write is atomic (a temporary name, then a rename) and no checkpoint
is overwritten: a save of a step that exists is refused. A checkpoint exists once orbax has renamed it into
place; its numpy files follow, and a restore writes them again if a kill cut them off.

`fault_point` is a test hook: with `PROMPT_TUNING_FAULT=<point>:<step>` in the environment, the process
SIGKILLs itself (SIGTERMs itself for the point `sigterm`) when it reaches that point at that step.
"""
import errno
import gc
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from prompt_tuning_jax import trees
from prompt_tuning_jax.checkpoints import CheckpointError

RUN_CONFIG_FILE = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"
NUMPY_DIR = "numpy_checkpoints"
BEST_DIR = "best"
BEST_FILE = "best.json"
STATE_ITEM = "state"
DATA_POSITION_ITEM = "data_position"
CORRUPT_PREFIX = "corrupt-"
FAULT_ENV = "PROMPT_TUNING_FAULT"

logger = logging.getLogger("prompt_tuning_jax")


def fault_point(point: str, step: int) -> None:
  """Test hook: kills this process at `point` of step `step` if `$PROMPT_TUNING_FAULT` names them.

  `PROMPT_TUNING_FAULT=mid_save:4` sends SIGKILL to the process in the save of step 4;
  `sigterm:<step>` sends SIGTERM at `mid_step` instead (a preemption notice). Without the variable,
  nothing happens.
  """
  fault = os.environ.get(FAULT_ENV)
  if fault == f"{point}:{step}":
    os.kill(os.getpid(), signal.SIGKILL)
  elif point == "mid_step" and fault == f"sigterm:{step}":
    os.kill(os.getpid(), signal.SIGTERM)


def numpy_file_name(path: str) -> str:
  """The official numpy file name of a `/`-joined variable path: `encoder.prompt.prompt.prompt`."""
  return path.replace("/", ".")


def check_run_config(model_dir: str, run_config: Mapping[str, Any],
                     mutable_keys: Sequence[str] = (), retired_keys: Sequence[str] = (),
                     new_keys: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
  """Checks the run's settings against those recorded in `model_dir`; writes nothing.

  Args:
    model_dir: the run's MODEL_DIR.
    run_config: a JSON-serialisable dict of the settings that define the run.
    mutable_keys: keys that may change between starts (e.g. `train_steps`, `eval_period`).
    retired_keys: `.`-joined paths of settings that runs recorded before they stopped defining a run
      (e.g. `model_config.remat_policy`); a recorded run's are ignored, so it still resumes.
    new_keys: keys that runs recorded only from some version on; a run recorded without one
      resumes (and records it).

  Returns:
    `{key: (old, new)}` of the mutable keys that changed, and of the new keys first recorded; `{}`
    for a new run.

  Raises:
    ValueError: `model_dir` holds a run with other settings (each differing key is named with its
      old and new value), holds checkpoints but no `run_config.json`, or an unreadable one.
  """
  new = _json_copy(run_config)
  filename = os.path.join(model_dir, RUN_CONFIG_FILE)
  if not os.path.exists(filename):
    if os.path.isdir(os.path.join(model_dir, CHECKPOINTS_DIR)):
      raise ValueError(f"{model_dir} holds checkpoints but no {RUN_CONFIG_FILE}, so its settings "
                       "cannot be checked. Use a new MODEL_DIR.")
    return {}
  try:
    with open(filename) as f:
      old = json.load(f)
    if not isinstance(old, dict):
      raise ValueError(f"a JSON {type(old).__name__}, not an object")
  except ValueError as e:
    raise ValueError(f"{filename} is unreadable ({e}); it records the run's settings, written at its "
                     "first start: restore it, or use a new MODEL_DIR.") from None
  old = _without(old, retired_keys)
  absent = "<absent>"
  changed = {key: (old.get(key, absent), new.get(key, absent))
             for key in sorted(old.keys() | new.keys()) if old.get(key, absent) != new.get(key, absent)}
  refused = {key: (old_value, new_value) for key, (old_value, new_value) in changed.items()
             if key not in mutable_keys and not (key in new_keys and old_value == absent)}
  if refused:
    lines = "\n".join(f"  {key}: {old_value!r} in the run, {new_value!r} now"
                      for key, (old_value, new_value) in refused.items())
    raise ValueError(
        f"{model_dir} holds a run with different settings ({filename}):\n{lines}\nUse a new MODEL_DIR "
        f"for these settings, or the run's settings to resume it (only {sorted(mutable_keys)} may "
        "change).")
  return changed


def record_run_config(model_dir: str, run_config: Mapping[str, Any],
                      mutable_keys: Sequence[str] = (), retired_keys: Sequence[str] = (),
                      new_keys: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
  """`check_run_config`, then records the settings: all of them on the run's first start, the
  changed mutable ones on a later start (so the file holds the settings in use). Process 0 writes;
  call it holding the run's lock (`run_lock.RunLock`).

  Returns:
    What `check_run_config` returns.
  """
  filename = os.path.join(model_dir, RUN_CONFIG_FILE)
  first_start = not os.path.exists(filename)
  changed = check_run_config(model_dir, run_config, mutable_keys, retired_keys, new_keys)
  if (first_start or changed) and jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    _write_atomically(filename, json.dumps(_json_copy(run_config), indent=2,
                                           sort_keys=True).encode())
  return changed


def check_best_metric(model_dir: str, metric_name: Optional[str]) -> None:
  """Raises a ValueError if `model_dir`'s best prompt was chosen by a metric other than
  `metric_name` (EvalConfig.best_metric). An unreadable `best.json` passes: the run warns and
  replaces it at its next best."""
  try:
    best = _read_best(os.path.join(model_dir, BEST_DIR))
  except ValueError:
    return
  if metric_name is not None and best is not None and best["metric"] != metric_name:
    raise ValueError(f"The best prompt in {model_dir}/{BEST_DIR} was chosen by {best['metric']!r}, "
                     f"not {metric_name!r} (EvalConfig.best_metric); keep one metric per run, or "
                     "use a new MODEL_DIR.")


class RunCheckpointer:
  """Saves and restores a run's `TrainState` and data position in `MODEL_DIR/checkpoints`.

  Saves are synchronous: when `save` returns, the checkpoint and the numpy files are complete.
  Call `save`, `restore` and `save_best_prompt` on every process; orbax coordinates the hosts and
  only process 0 writes the numpy files.
  """

  def __init__(self, model_dir: str, keep: Optional[int] = 3, keep_numpy: Optional[int] = None):
    """`keep`: how many of the latest checkpoints to keep, None for all; `keep_numpy`: how many of
    the latest numpy copies (None: all, as prompts are small; model tuning's hold every weight).
    An unreadable `best/best.json` is reported in one log line and replaced at the next best
    prompt."""
    self.model_dir = model_dir
    self.keep_numpy = keep_numpy
    self.directory = os.path.join(model_dir, CHECKPOINTS_DIR)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE_ITEM, DATA_POSITION_ITEM),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True))
    try:
      self._best = _read_best(os.path.join(model_dir, BEST_DIR))
    except ValueError as e:
      logger.warning("%s; the run goes on without it, and its next best prompt replaces it.", e)
      self._best = None
    if jax.process_index() == 0:  # What a kill while writing numpy files left (orbax cleans its own).
      for leftover in glob.glob(os.path.join(model_dir, NUMPY_DIR, ".checkpoint_*.tmp-*")):
        shutil.rmtree(leftover, ignore_errors=True)

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The step of the latest complete checkpoint, or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: Mapping[str, Any]) -> None:
    """Saves `state` (a `TrainState`) and `data_position` (a small JSON dict) as step `step`.

    Also writes each leaf of `state.trainable` to `numpy_checkpoints/checkpoint_{step}/`. Deletes
    the oldest checkpoint beyond `keep`, and the oldest numpy copies beyond `keep_numpy`.

    Raises:
      CheckpointError: step `step` (or its numpy directory) exists already; nothing is written. Or
        the save failed (e.g. the disk is full): what it wrote is removed, earlier steps are intact.
    """
    step = int(step)
    numpy_dir = self._numpy_dir(step)
    if step in self.all_steps() or os.path.exists(numpy_dir):
      raise CheckpointError(f"Step {step} exists already in {self.model_dir} ({self.directory}/{step} "
                            f"or {numpy_dir}); checkpoints are never overwritten. Resume from the "
                            "latest checkpoint instead of saving this step again.")
    arrays = _host_arrays(state.trainable)
    try:
      with _OrbaxReportsHeld():
        self._manager.save(step, force=True, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state),
               DATA_POSITION_ITEM: ocp.args.JsonSave(dict(data_position))}))
        self._manager.wait_until_finished()
      fault_point("mid_save", step)
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(numpy_dir), exist_ok=True)
        _write_numpy_dir(numpy_dir, arrays)
        self._remove_old_numpy_copies()
    except Exception as e:  # orbax and tensorstore raise many unrelated types.
      self._remove_unfinished(step)
      no_space = _is_no_space(e)
      raise CheckpointError(
          f"Saving checkpoint {step} in {self.directory} failed"
          + (": the disk is full" if no_space else "")
          + f" ({_first_line(e)}). {self.last_good(before=step)} "
          + ("Free space, then rerun" if no_space else "Rerun") + " the same command to resume."
      ) from e

  def restore(self, step: Optional[int] = None, *, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, data_position) of step `step`, or of the latest checkpoint that reads back whole.

    Without `step`, an unreadable latest checkpoint (a missing or truncated file, garbled metadata, a
    prompt that differs from its numpy copy) is reported in one log line and moved aside to
    `checkpoints/corrupt-N` (its numpy directory to `numpy_checkpoints/corrupt-checkpoint_N`), and the
    one before it is tried. A checkpoint whose numpy files a kill cut off gets them written again.

    Args:
      step: the step to restore; None for the latest good one.
      abstract_state: the state's structure: a fresh `TrainState`, or `jax.eval_shape` of one
        (`jax.ShapeDtypeStruct` leaves, with shardings to place the arrays). The restored state has
        its pytree structure (optax's named tuples included) and the saved values, bit for bit.

    Raises:
      CheckpointError: there is no such checkpoint, or it (with `step`: every one) is unreadable or
        does not fit the state.
    """
    steps = self.all_steps()
    if step is None and not steps:
      raise CheckpointError(f"No checkpoint to resume from in {self.directory}; start the run from "
                            "scratch.")
    if step is not None:
      if int(step) not in steps:
        raise CheckpointError(f"No checkpoint of step {step} in {self.directory}: it has steps {steps}.")
      return self._restore_step(int(step), abstract_state)
    for candidate in reversed(steps):
      try:
        return self._restore_step(candidate, abstract_state)
      except CheckpointError as e:
        error = e
        moved = self._move_aside(candidate)
        logger.warning("Checkpoint %s/%d is unreadable (%s); moved it to %s and trying the one "
                       "before.", self.directory, candidate, _first_line(e.__cause__ or e), moved)
    raise CheckpointError(f"No checkpoint in {self.directory} reads back whole: the oldest, step "
                          f"{steps[0]}, failed with {_first_line(error.__cause__ or error)}. Use a new "
                          "MODEL_DIR.")

  def last_good(self, before: Optional[int] = None) -> str:
    """What a failed run left to resume from, in a sentence: its latest checkpoint (before step
    `before`, one whose save failed), or none."""
    kept = [step for step in self.all_steps() if before is None or step < before]
    if not kept:
      return "No checkpoint has been saved yet."
    return f"The last good checkpoint is step {kept[-1]} in {self.directory} (kept: {kept})."

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    try:
      with _OrbaxReportsHeld():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
               DATA_POSITION_ITEM: ocp.args.JsonRestore()}))
      arrays = _host_arrays(restored[STATE_ITEM].trainable)
      self._check_numpy_copy(step, arrays)
    except Exception as e:  # orbax and tensorstore raise many unrelated types.
      earlier = [s for s in self.all_steps() if s < step]
      raise CheckpointError(
          f"Cannot restore checkpoint {self.directory}/{step} (corrupt, incomplete, or of a run with "
          f"another config): {type(e).__name__}: {e}\nMove that directory out of {self.directory} "
          + (f"to resume from step {earlier[-1]}" if earlier else "to start from scratch")
          + ", or use a new MODEL_DIR.") from e
    if jax.process_index() == 0 and not os.path.exists(self._numpy_dir(step)):
      _write_numpy_dir(self._numpy_dir(step), arrays)
    return restored[STATE_ITEM], restored[DATA_POSITION_ITEM]

  def _remove_old_numpy_copies(self) -> None:
    """Deletes the numpy copies older than the newest `keep_numpy` (a restore rewrites a kept
    checkpoint's copy if it is missing)."""
    if self.keep_numpy is None:
      return
    pattern = re.compile(r"checkpoint_(\d+)")
    steps = sorted(int(m.group(1)) for m in map(pattern.fullmatch, os.listdir(
        os.path.join(self.model_dir, NUMPY_DIR))) if m)
    for step in steps[:-self.keep_numpy]:
      shutil.rmtree(self._numpy_dir(step), ignore_errors=True)

  def _numpy_dir(self, step: int) -> str:
    return os.path.join(self.model_dir, NUMPY_DIR, f"checkpoint_{step}")

  def _check_numpy_copy(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Raises a ValueError if step `step`'s numpy files exist and differ from `arrays`."""
    numpy_dir = self._numpy_dir(step)
    if not os.path.isdir(numpy_dir):
      return
    for name, array in arrays.items():
      saved = np.load(os.path.join(numpy_dir, name), allow_pickle=False)
      if saved.shape != array.shape or not np.array_equal(saved, array, equal_nan=True):
        raise ValueError(f"its {name} differs from its numpy copy {numpy_dir}/{name}")

  def _move_aside(self, step: int) -> str:
    """Renames step `step`'s checkpoint and numpy directories to `corrupt-...`; returns the first."""
    moved = _unused_name(os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}"))
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), moved)
      numpy_dir = self._numpy_dir(step)
      if os.path.exists(numpy_dir):
        os.rename(numpy_dir, _unused_name(os.path.join(os.path.dirname(numpy_dir),
                                                       CORRUPT_PREFIX + os.path.basename(numpy_dir))))
    multihost_utils.sync_global_devices(f"move aside checkpoint {step}")
    self._manager.reload()
    return moved

  def _remove_unfinished(self, step: int) -> None:
    """Deletes orbax's temporary directory of a failed save of `step` (the numpy writer cleans up)."""
    if jax.process_index() == 0:
      for leftover in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(leftover, ignore_errors=True)

  def best_metric(self) -> Optional[dict[str, Any]]:
    """`{'step': ..., 'metric': ..., 'value': ...}` of the best prompt saved, or None."""
    return self._best

  def save_best_prompt(self, step: int, trainable: Any, metric_name: str, value: float,
                       higher_is_better: bool = True) -> bool:
    """Makes `trainable` the best prompt if `value` of `metric_name` beats the best so far.

    Writes `MODEL_DIR/best/` (a link swapped atomically to a new directory holding the numpy
    files and `best.json`), so a reader sees the old best or the new one, never a mix.

    Returns:
      Whether `trainable` is the new best. A NaN value never is.

    Raises:
      ValueError: the best so far was chosen by another metric.
    """
    if self._best is not None and self._best["metric"] != metric_name:
      raise ValueError(f"The best prompt in {self.model_dir}/{BEST_DIR} was chosen by "
                       f"{self._best['metric']!r}, not {metric_name!r}; keep one metric per run.")
    value = float(value)
    best = None if self._best is None else self._best["value"]
    if math.isnan(value) or (best is not None and
                             (value <= best if higher_is_better else value >= best)):
      return False
    arrays = _host_arrays(trainable)
    self._best = {"step": int(step), "metric": metric_name, "value": value}
    if jax.process_index() == 0:
      _replace_best(self.model_dir, arrays, self._best)
    return True

  def close(self) -> None:
    self._manager.close()


class _OrbaxReportsHeld(logging.Filter):
  """`with _OrbaxReportsHeld():` around an orbax save or restore whose failure the caller reports in
  one line of its own.

  While the block runs, what orbax logs (its absl logger's records, logged by a module of orbax, and
  asyncio's, such as "Future exception was never retrieved") is held, as are the "Event loop is
  closed" errors of tensorstore's I/O threads, which outlive the event loop of a failed orbax write
  and print bare tracebacks through `sys.unraisablehook`. If the block raises, orbax's threads that
  it started are given `THREADS_WAIT_S` to end (a failed save leaves some writing, and logging, after
  the first error reaches the caller), the futures they dropped are collected, and what was held goes
  to this package's logger at DEBUG. Else what was held is passed on as it came. After the block,
  logging and `sys.unraisablehook` are as before.
  """
  THREADS_WAIT_S = 10.0

  def __init__(self):
    super().__init__()
    self._records: list[logging.LogRecord] = []
    self._unraisable: list[Any] = []
    self._unraisablehook = sys.unraisablehook
    self._threads_before: set[threading.Thread] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == _ABSL_LOGGER.name and not record.pathname.startswith(_ORBAX_SOURCE):
      return True
    self._records.append(record)
    return False

  def _hold_unraisable(self, unraisable: Any) -> None:
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      self._unraisable.append(unraisable)
    else:
      self._unraisablehook(unraisable)

  def __enter__(self) -> None:
    self._threads_before = set(threading.enumerate())
    for held_logger in _HELD_LOGGERS:
      held_logger.addFilter(self)
    sys.unraisablehook = self._hold_unraisable

  def __exit__(self, error_type: Optional[type], *_) -> None:
    if error_type is not None:
      deadline = time.monotonic() + self.THREADS_WAIT_S
      for thread in set(threading.enumerate()) - self._threads_before:
        if type(thread).__module__.startswith("orbax."):
          # Thread's own join: orbax's raises the thread's error.
          threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
      gc.collect()  # asyncio reports a dropped future's error when it is collected
    for held_logger in _HELD_LOGGERS:
      held_logger.removeFilter(self)
    sys.unraisablehook = self._unraisablehook
    for record in self._records:
      if error_type is None:
        logging.getLogger(record.name).handle(record)
      else:
        logger.debug("%s: %s", record.name, record.getMessage(), exc_info=record.exc_info)
    for unraisable in self._unraisable:
      if error_type is None:
        self._unraisablehook(unraisable)
      else:
        logger.debug("tensorstore: %s", unraisable.exc_value)


_ORBAX_SOURCE = os.path.dirname(os.path.dirname(ocp.__file__)) + os.sep  # .../site-packages/orbax/
_ABSL_LOGGER = logging.getLogger("absl")  # the logger of absl.logging, which orbax logs with
_HELD_LOGGERS = (_ABSL_LOGGER, logging.getLogger("asyncio"))


def _host_arrays(trainable: Any) -> dict[str, np.ndarray]:
  """`{dotted path: numpy array}` of the leaves; arrays spread over hosts are gathered."""
  def to_numpy(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)
  return {numpy_file_name(path): to_numpy(leaf)
          for path, leaf in trees.flatten(trainable).items()}


def _without(settings: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
  """`settings` less each `.`-joined path in `paths` (a nested key of dicts) that it holds."""
  for path in paths:
    *parents, key = path.split(".")
    node = settings
    for parent in parents:
      node = node.get(parent) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.pop(key, None)
  return settings


def _first_line(error: BaseException) -> str:
  """`Type: the message's first line`, cut to 200 characters (orbax's messages can be pages)."""
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _is_no_space(error: BaseException) -> bool:
  """Whether `error` (or what caused it) says the disk is full."""
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _unused_name(path: str) -> str:
  """`path`, or `path.1`, `path.2`, ... : the first that does not exist."""
  candidate, n = path, 0
  while os.path.lexists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate


def _write_numpy_files(directory: str, arrays: Mapping[str, np.ndarray]) -> None:
  for name, array in arrays.items():
    with open(os.path.join(directory, name), "wb") as f:  # A handle: np.save adds no `.npy`.
      np.save(f, array, allow_pickle=False)


def _write_numpy_dir(directory: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Creates `directory` holding one numpy file per array, atomically (built aside, then renamed)."""
  parent, name = os.path.split(directory)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    _write_numpy_files(tmp, arrays)
    os.rename(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _replace_best(model_dir: str, arrays: Mapping[str, np.ndarray], best: dict[str, Any]) -> None:
  """Points `model_dir/best` at a new directory of `arrays` and `best.json`; deletes the old one."""
  link = os.path.join(model_dir, BEST_DIR)
  old_target = os.path.realpath(link) if os.path.islink(link) else None
  new_target = tempfile.mkdtemp(prefix=f".{BEST_DIR}-", dir=model_dir)
  tmp_link = f"{new_target}.link"
  try:
    _write_numpy_files(new_target, arrays)
    with open(os.path.join(new_target, BEST_FILE), "w") as f:
      json.dump(best, f, indent=2)
    os.symlink(os.path.basename(new_target), tmp_link)
    os.replace(tmp_link, link)
  except BaseException:
    shutil.rmtree(new_target, ignore_errors=True)
    raise
  finally:
    if os.path.lexists(tmp_link):
      os.remove(tmp_link)
  if old_target:
    shutil.rmtree(old_target, ignore_errors=True)


def _read_best(best_dir: str) -> Optional[dict[str, Any]]:
  """The best prompt's `{'step', 'metric', 'value'}`, or None if there is none.

  Raises:
    ValueError: `best.json` is not such a JSON object; the message names the file.
  """
  filename = os.path.join(best_dir, BEST_FILE)
  if not os.path.exists(filename):
    return None
  try:
    with open(filename) as f:
      best = json.load(f)
    if not (isinstance(best, dict) and isinstance(best.get("metric"), str)
            and isinstance(best.get("step"), int)
            and isinstance(best.get("value"), (int, float))):
      raise ValueError("not an object of 'step', 'metric' and 'value'")
  except ValueError as e:
    raise ValueError(f"{filename} is unreadable ({e})") from None
  return best


def _write_atomically(filename: str, data: bytes) -> None:
  """Writes `filename` complete under a temporary name, then renames it into place."""
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(filename)}.tmp-",
                             dir=os.path.dirname(filename) or ".")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, filename)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _json_copy(value: Mapping[str, Any]) -> dict[str, Any]:
  """`value` as it reads back from JSON (tuples as lists, keys sorted)."""
  return json.loads(json.dumps(dict(value), sort_keys=True))


def write_numpy_params(directory: str, params: Mapping[str, np.ndarray]) -> None:
  """Writes `/`-joined `params` as numpy files named as the official code names them, in a new
  `directory`, atomically; a `directory` that exists already is left as it is."""
  if not os.path.exists(directory):
    _write_numpy_dir(directory, {numpy_file_name(path): np.asarray(value)
                                 for path, value in params.items()})
