"""Surviving faults: kills at five points, SIGTERM, corrupt checkpoints, a full disk, NaN, a diverging
prompt; errors that end the process at once; settings a resumed run applies; determinism.

The run is the real T5X tiny checkpoint on the RTE files in ../shared (see `test_train_e2e.flags`), 8
steps, a checkpoint every 2 and an evaluation at 6 and 8. The killed runs are real processes, killed
by the `PROMPT_TUNING_FAULT` test hook (`run_checkpoints.fault_point`); they share a persistent
compilation cache to start faster. Resumed runs start from copies of one 2-step run.
"""
import errno
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import run_checkpoints, train, trainer
from prompt_tuning_jax.checkpoints import CheckpointError
from test_run_checkpoints import assert_identical, make_state
from test_train_e2e import REPO_ROOT, SHARED, flags, listing, prompt_at

pytestmark = pytest.mark.needs_shared(SHARED)

RUN = {"TRAIN_STEPS": "8", "CHECKPOINT_PERIOD": "2", "EVAL_PERIOD": "6",
       "EvalConfig.num_examples": "2", "train.log_batch_hashes": "True"}
# Each rerun of the same command is killed at the next point; then one more finishes the run.
FAULTS = ("startup:0", "mid_step:1", "after_save:2", "mid_save:4", "mid_eval:6")


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


def run_flags(model_dir, **macros):
  return flags(MODEL_DIR=repr(str(model_dir)), **{**RUN, **macros})


def run_process(model_dir, fault=None):
  """`python -m prompt_tuning_jax.train` with the test run's flags, `fault` in its environment."""
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT),
         "JAX_COMPILATION_CACHE_DIR": str(model_dir.parent / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop(run_checkpoints.FAULT_ENV, None)
  if fault:
    env[run_checkpoints.FAULT_ENV] = fault
  return subprocess.run([sys.executable, "-m", "prompt_tuning_jax.train", *run_flags(model_dir)],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)


def batch_hashes(model_dir) -> dict[int, set[int]]:
  """{step: every hash of its batch recorded, over all the (re)runs}."""
  hashes = {}
  with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
    for row in map(json.loads, f):
      if row["kind"] == "batch":
        hashes.setdefault(row["step"], set()).add(row["hash"])
  return hashes


def steps_in(model_dir, directory="checkpoints", prefix="") -> list[int]:
  """The steps of the complete checkpoints (or, with `numpy_checkpoints`, numpy prompts) on disk."""
  path = os.path.join(model_dir, directory)
  names = os.listdir(path) if os.path.isdir(path) else []
  return sorted(int(name[len(prefix):]) for name in names
                if name.startswith(prefix) and name[len(prefix):].isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
  train.main(run_flags(model_dir))
  gin.clear_config()
  return model_dir


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
  """One MODEL_DIR through every fault in turn, then a rerun that finds its newest checkpoint (4)
  garbled; {fault or 'last': (process result, checkpoint steps, numpy prompt steps)} after each."""
  model_dir = tmp_path_factory.mktemp("killed") / "run"
  results = {}
  for fault in FAULTS:
    result = run_process(model_dir, fault)
    results[fault] = (result, steps_in(model_dir),
                      steps_in(model_dir, "numpy_checkpoints", "checkpoint_"))
  (model_dir / "checkpoints" / "4" / "state" / "_METADATA").write_text("{garbled")
  result = run_process(model_dir)
  results["last"] = (result, steps_in(model_dir),
                     steps_in(model_dir, "numpy_checkpoints", "checkpoint_"))
  return model_dir, results


@pytest.mark.parametrize("fault, steps_after, numpy_steps_after", [
    ("startup:0", [], []), ("mid_step:1", [], []), ("after_save:2", [2], [2]),
    ("mid_save:4", [2, 4], [2]), ("mid_eval:6", [2, 4], [2, 4])])
def test_a_kill_leaves_only_complete_checkpoints(killed_runs, fault, steps_after,
                                                 numpy_steps_after):
  """mid_save: orbax had written step 4, not its numpy prompt; the next run's restore writes it."""
  model_dir, results = killed_runs
  result, steps, numpy_steps = results[fault]
  assert result.returncode == -9, result.stderr[-3000:]
  assert (steps, numpy_steps) == (steps_after, numpy_steps_after)
  assert ("Resumed" in result.stderr) == bool(FAULTS.index(fault) > 2)
  assert (model_dir / "run_config.json").is_file()


def test_reruns_after_every_fault_reach_the_uninterrupted_prompt(killed_runs, uninterrupted):
  """The last rerun finds checkpoint 4 garbled: it says so in one line, then resumes from 2."""
  model_dir, results = killed_runs
  result, steps, _ = results["last"]
  assert result.returncode == 0, result.stderr[-3000:]
  reports = [line for line in result.stderr.splitlines() if "is unreadable" in line]
  assert len(reports) == 1 and "checkpoints/4 is unreadable" in reports[0], result.stderr[-3000:]
  assert "corrupt-4" in reports[0] and "at step 2." in result.stderr and steps == [4, 6, 8]
  assert not glob.glob(str(model_dir / "numpy_checkpoints" / ".*"))
  for step in (2, 4, 6, 8):
    np.testing.assert_array_equal(prompt_at(model_dir, step), prompt_at(uninterrupted, step))
  # Every (re)run fed each step the batch the uninterrupted run fed it.
  expected = batch_hashes(uninterrupted)
  assert sorted(expected) == list(range(1, 9))
  assert batch_hashes(model_dir) == expected


def test_sigterm_saves_the_step_and_exits_cleanly_then_resumes_bit_identically(
    uninterrupted, tmp_path, monkeypatch, capsys):
  """A second fresh run, stopped by SIGTERM at step 5 and resumed: the uninterrupted run's prompts."""
  model_dir = tmp_path / "run"
  handler = signal.getsignal(signal.SIGTERM)
  monkeypatch.setenv(run_checkpoints.FAULT_ENV, "sigterm:5")
  train.main(run_flags(model_dir))
  assert "Stopped by SIGTERM at step 5, checkpoint saved" in capsys.readouterr().out
  assert steps_in(model_dir) == [2, 4, 5] and signal.getsignal(signal.SIGTERM) == handler
  monkeypatch.delenv(run_checkpoints.FAULT_ENV)
  train.main(run_flags(model_dir))
  assert "Trained to step 8" in capsys.readouterr().out
  for step in (2, 4, 6, 8):
    np.testing.assert_array_equal(prompt_at(model_dir, step), prompt_at(uninterrupted, step))
  assert batch_hashes(model_dir) == batch_hashes(uninterrupted)


def _missing_file(step_dir):
  os.remove(glob.glob(str(step_dir / "state" / "d" / "*"))[0])


def _zero_length_array(step_dir):
  open(glob.glob(str(step_dir / "state" / "d" / "*"))[0], "w").close()


def _garbled_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("{garbled")


def _zero_length_numpy_prompt(step_dir):
  numpy_dir = step_dir.parent.parent / "numpy_checkpoints" / f"checkpoint_{step_dir.name}"
  open(numpy_dir / run_checkpoints.numpy_file_name("encoder/prompt/prompt/prompt"), "w").close()


@pytest.mark.parametrize("corrupt", [_missing_file, _zero_length_array, _garbled_metadata,
                                     _zero_length_numpy_prompt], ids=lambda f: f.__name__[1:])
def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, caplog, corrupt):
  states = {1: make_state(seed=1), 2: make_state(seed=2)}
  checkpointer = run_checkpoints.RunCheckpointer(str(tmp_path))
  for step, state in states.items():
    checkpointer.save(step, state, {"batches_consumed": step})
  checkpointer.close()
  corrupt(tmp_path / "checkpoints" / "2")

  resumed = run_checkpoints.RunCheckpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING, logger="prompt_tuning_jax"):
    restored, position = resumed.restore(abstract_state=jax.eval_shape(lambda: states[2]))
  assert_identical(restored, states[1])
  assert position == {"batches_consumed": 1}
  # Our one line (orbax may log warnings of its own about the same checkpoint).
  [report] = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and r.name == "prompt_tuning_jax"]
  assert "\n" not in report and "checkpoints/2 is unreadable" in report
  assert (tmp_path / "checkpoints" / "corrupt-2").is_dir()
  assert (tmp_path / "numpy_checkpoints" / "corrupt-checkpoint_2").is_dir()
  # The run goes on: step 2 is saved again, with nothing of the bad one in the way.
  resumed.save(2, states[2], {"batches_consumed": 2})
  assert resumed.all_steps() == [1, 2]
  assert_identical(resumed.restore(abstract_state=jax.eval_shape(lambda: states[2]))[0], states[2])
  resumed.close()


def test_what_a_kill_in_the_numpy_writer_left_is_removed(tmp_path):
  leftover = tmp_path / "numpy_checkpoints" / ".checkpoint_4.tmp-x1y2"
  leftover.mkdir(parents=True)
  (leftover / "encoder.prompt.prompt.prompt").write_bytes(b"\x93NUM")
  run_checkpoints.RunCheckpointer(str(tmp_path)).close()
  assert os.listdir(tmp_path / "numpy_checkpoints") == []


def test_no_readable_checkpoint_is_one_error(tmp_path):
  checkpointer = run_checkpoints.RunCheckpointer(str(tmp_path))
  checkpointer.save(1, make_state(), {"batches_consumed": 1})
  _garbled_metadata(tmp_path / "checkpoints" / "1")
  with pytest.raises(CheckpointError, match="No checkpoint in .* reads back whole"):
    checkpointer.restore(abstract_state=jax.eval_shape(make_state))
  checkpointer.close()


@pytest.fixture
def full_disk(tmp_path):
  """A 1 MiB tmpfs (needs root), or None where it cannot be mounted."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                           capture_output=True, check=False).returncode == 0
  yield disk if mounted else None
  if mounted:
    subprocess.run(["umount", str(disk)], check=True)


def _fill(directory, leave_kib=0):
  """Writes a file into `directory` until its disk is full, then frees `leave_kib` KiB of it."""
  with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError as e:
      assert e.errno == errno.ENOSPC
    f.truncate(f.tell() - leave_kib * 1024)


def _fail_numpy_writes(monkeypatch):
  """The numpy writer fails as on a full disk, after orbax has written the step."""
  def no_space(file, array, allow_pickle):
    del array, allow_pickle
    file.write(b"\x93NUMPY")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(run_checkpoints.np, "save", no_space)


@pytest.mark.parametrize("where", ["tmpfs", "numpy_writer"])
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, full_disk,
                                                                       monkeypatch, caplog, where):
  """One error, and nothing else: orbax's own reports of the failed write (errors logged with their
  tracebacks, by the threads that wrote part of the checkpoint in the 8 KiB left) go to the
  package's debug log."""
  if where == "tmpfs" and full_disk is None:
    pytest.skip("cannot mount a tmpfs here (not root)")
  model_dir = str(full_disk if where == "tmpfs" else tmp_path)
  state = make_state()
  checkpointer = run_checkpoints.RunCheckpointer(model_dir)
  checkpointer.save(1, state, {"batches_consumed": 1})
  if where == "tmpfs":
    _fill(model_dir, leave_kib=8)
  else:
    _fail_numpy_writes(monkeypatch)
  caplog.set_level(logging.DEBUG, logger="prompt_tuning_jax")
  unraisablehook = sys.unraisablehook
  with pytest.raises(CheckpointError) as error:
    checkpointer.save(2, make_state(seed=2), {"batches_consumed": 2})
  assert sys.unraisablehook is unraisablehook
  assert [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG] == []
  if where == "tmpfs":
    held = [r.getMessage() for r in caplog.records if r.getMessage().startswith("absl: ")]
    assert held and all("No space left on device" in message for message in held), held
  message = str(error.value)
  assert "\n" not in message and len(message) < 600, message
  assert message.startswith(f"Saving checkpoint 2 in {model_dir}/checkpoints failed: the disk is "
                            "full"), message
  assert "The last good checkpoint is step 1 in" in message, message
  assert not glob.glob(os.path.join(model_dir, "checkpoints", "2.*"))
  assert not glob.glob(os.path.join(model_dir, "numpy_checkpoints", ".checkpoint_2*"))
  assert not os.path.exists(os.path.join(model_dir, "numpy_checkpoints", "checkpoint_2"))
  monkeypatch.undo()
  if where == "tmpfs":
    os.remove(os.path.join(model_dir, "filler"))
  checkpointer.close()
  reopened = run_checkpoints.RunCheckpointer(model_dir)
  assert_identical(reopened.restore(1, abstract_state=jax.eval_shape(lambda: state))[0], state)
  reopened.close()


def _poisoned_train_step(at_step):
  """`trainer.train_step` whose step `at_step` (traced: the finiteness guard and the jit around it
  are the real ones) returns a NaN loss and prompt."""
  train_step = trainer.train_step

  def poisoned_step(state, frozen, batch, **kwargs):
    new_state, metrics = train_step(state, frozen, batch, **kwargs)
    poison = jnp.where(new_state.step == at_step, jnp.nan, 1.0)
    return (new_state.replace(trainable=jax.tree_util.tree_map(lambda x: x * poison,
                                                               new_state.trainable)),
            dict(metrics, loss=metrics["loss"] * poison))
  return poisoned_step


def test_nan_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch,
                                                                  caplog):
  """The loop reads step 3's finiteness only after queueing step 4; it stops at step 3 all the
  same."""
  model_dir = tmp_path / "run"
  argv = flags(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS="4", CHECKPOINT_PERIOD="2")
  monkeypatch.setattr(trainer, "train_step", _poisoned_train_step(at_step=3))
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.count("\n") == 1
  assert err.startswith("error: Step 3: the loss is NaN or Inf") and "step 2" in err
  assert steps_in(model_dir) == [2]
  assert sorted(os.listdir(model_dir / "numpy_checkpoints")) == ["checkpoint_2"]
  good_prompt = prompt_at(model_dir, 2)
  assert np.isfinite(good_prompt).all()

  # Rerun with skip_nonfinite_steps: step 3's update is dropped, the run goes on from step 2.
  with caplog.at_level(logging.WARNING, logger="prompt_tuning_jax"):
    train.main(argv + ["--gin.train.skip_nonfinite_steps=True"])
  assert any("Step 3: the loss is NaN or Inf; its update is dropped" in r.getMessage()
             for r in caplog.records)
  assert steps_in(model_dir) == [2, 4]
  np.testing.assert_array_equal(prompt_at(model_dir, 2), good_prompt)
  assert np.isfinite(prompt_at(model_dir, 4)).all()
  assert not np.array_equal(prompt_at(model_dir, 4), good_prompt)


def run_command(argv, env=None, timeout=120):
  """`python -m prompt_tuning_jax.train argv` as its own process, which must end within `timeout`
  seconds (an error's exit used to hang on tf.data's iterator)."""
  return subprocess.run([sys.executable, "-m", "prompt_tuning_jax.train", *argv], cwd=REPO_ROOT,
                        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
                        capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_error_line(result, message):
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_data_row_of_the_wrong_type_ends_the_process_at_once(tmp_path):
  data = tmp_path / "data" / "superglue" / "RTE"
  data.mkdir(parents=True)
  rte = SHARED / "data" / "superglue" / "RTE"
  (data / "val.jsonl").write_bytes((rte / "val.jsonl").read_bytes())
  rows = (rte / "train.jsonl").read_text().splitlines()[:8]
  rows[1] = json.dumps(dict(json.loads(rows[1]), premise=5))
  (data / "train.jsonl").write_text("\n".join(rows) + "\n")
  result = run_command(flags(MODEL_DIR=repr(str(tmp_path / "run")),
                             DATA_DIR=repr(str(tmp_path / "data"))))
  assert_one_error_line(result, "premise")


# A task module (MIXTURE_OR_TASK_MODULE) whose reader checks nothing, so that a row of the wrong
# type fails inside tf.data's iterator, after MODEL_DIR is written.
UNCHECKED_TASK_MODULE = """
import json
import os

import tensorflow as tf

from prompt_tuning_jax.tasks import common, sources, super_glue

ROWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rows.jsonl")
TEXT, ID = tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int64)
common.add_task("unchecked_rte", sources.LocalOrTfdsSource(
    "rows", {"train": [ROWS], "validation": [ROWS]},
    lambda path: [json.loads(line) for line in open(path)],
    {"premise": TEXT, "hypothesis": TEXT, "label": ID, "idx": ID}),
    super_glue.text_preprocessors("rte"))
"""


def test_an_error_inside_tf_data_ends_the_process_at_once(tmp_path):
  """The error surfaces from tf.data's iterator mid-run: the process used to hang at exit in the
  iterator's destructor."""
  (tmp_path / "unchecked_rte_task.py").write_text(UNCHECKED_TASK_MODULE)
  rows = [{"premise": f"A cat sat {i}.", "hypothesis": "A cat sits.", "label": i % 2, "idx": i}
          for i in range(8)]
  rows[1]["premise"] = 5
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  result = run_command(
      flags(MODEL_DIR=repr(str(tmp_path / "run")), TRAIN_STEPS="2", CHECKPOINT_PERIOD="2",
            MIXTURE_OR_TASK_MODULE="'unchecked_rte_task'",
            MIXTURE_OR_TASK_NAME="'unchecked_rte'"),
      env={"PYTHONPATH": f"{REPO_ROOT}:{tmp_path}"})
  assert_one_error_line(result, "reading the data failed: InternalError: Unsupported object type")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A run of 2 steps (checkpoint 2), to resume in copies."""
  model_dir = tmp_path_factory.mktemp("two_steps") / "run"
  train.main(flags(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS="2", CHECKPOINT_PERIOD="2"))
  gin.clear_config()
  return model_dir


def resumed(two_steps, tmp_path, name, **macros):
  """A copy of `two_steps` resumed in this process with `macros` (TRAIN_STEPS 3 by default)."""
  model_dir = tmp_path / name
  shutil.copytree(two_steps, model_dir, symlinks=True)
  train.main(flags(MODEL_DIR=repr(str(model_dir)), **{"TRAIN_STEPS": "3", "CHECKPOINT_PERIOD": "2",
                                                       **macros}))
  gin.clear_config()
  return model_dir


def logged(model_dir, key):
  with open(model_dir / "train_metrics.jsonl") as f:
    return [row[key] for row in map(json.loads, f) if row.get("kind", "train") == "train"
            and key in row]


def test_a_new_learning_rate_applies_on_resume(two_steps, tmp_path):
  """Adafactor's update is the rate times a step the rate does not change, plus the weight decay
  (1e-5 of the prompt): step 3 from the same checkpoint and batch moves the prompt 0.01 / 0.3 as far
  at the new rate; the rate is logged and recorded. A change of the optimizer's state layout
  (weight decay 0) is refused before anything is written."""
  same, lower = (resumed(two_steps, tmp_path, "same"),
                 resumed(two_steps, tmp_path, "lower", LEARNING_RATE="0.01"))
  start = prompt_at(two_steps, 2)
  step = lambda model_dir: prompt_at(model_dir, 3) - start * (1 - 1e-5)
  np.testing.assert_allclose(step(lower), step(same) * 0.01 / 0.3, rtol=1e-3, atol=1e-8)
  assert logged(lower, "learning_rate")[-1] == pytest.approx(0.01)
  assert logged(same, "learning_rate")[-1] == pytest.approx(0.3)
  assert json.loads((lower / "run_config.json").read_text())["optimizer"]["learning_rate"] == 0.01
  before = listing(lower)
  with pytest.raises(SystemExit):
    train.main(flags(MODEL_DIR=repr(str(lower)), TRAIN_STEPS="4",
                     **{"optimizers.prompt_tuning_adafactor.weight_decay": "0.0"}))
  assert listing(lower) == before


def test_a_relative_model_dir_is_made_absolute(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  train.main(flags(MODEL_DIR="'run'", TRAIN_STEPS="1", CHECKPOINT_PERIOD="1"))
  assert steps_in(tmp_path / "run") == [1]
  assert f"MODEL_DIR: {tmp_path / 'run'}" in capsys.readouterr().out


def test_a_diverging_prompt_stops_the_run_and_keeps_the_checkpoints(two_steps, tmp_path, capsys):
  """LEARNING_RATE=1e30 makes the prompt 1e30 with finite loss and gradients: stopped at step 3
  with checkpoint 2 and its prompt as they were; with skip_nonfinite_steps, after 2 steps dropped."""
  for name, macros in [("stop", {}), ("skip", {"TRAIN_STEPS": "8", "train.skip_nonfinite_steps":
                                               "True", "train.max_skipped_steps": "2"})]:
    with pytest.raises(SystemExit) as exit_info:
      resumed(two_steps, tmp_path, name, LEARNING_RATE="1e30", **macros)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    step = 3 if name == "stop" else 4
    assert err.startswith(f"error: Step {step}: the prompt diverged"), err
    assert "The last good checkpoint is step 2" in err and "learning rate (1e+30)" in err
    if name == "skip":
      assert "2 steps in a row dropped" in err
    assert steps_in(tmp_path / name) == [2]
    assert os.listdir(tmp_path / name / "numpy_checkpoints") == ["checkpoint_2"]
    np.testing.assert_array_equal(prompt_at(tmp_path / name, 2), prompt_at(two_steps, 2))


def test_a_full_disk_mid_run_is_one_line_naming_the_last_good_checkpoint(two_steps, tmp_path,
                                                                         monkeypatch, capsys):
  _fail_numpy_writes(monkeypatch)
  with pytest.raises(SystemExit):
    resumed(two_steps, tmp_path, "full")
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert err.startswith(f"error: Saving checkpoint 3 in {tmp_path / 'full' / 'checkpoints'} failed: "
                        "the disk is full"), err
  assert "The last good checkpoint is step 2" in err and "Free space, then rerun" in err
  np.testing.assert_array_equal(prompt_at(tmp_path / "full", 2), prompt_at(two_steps, 2))


def test_a_bad_best_json_and_data_position_do_not_block_resuming(two_steps, tmp_path, caplog):
  """A garbled best.json is named in one warning; a data position that does not fit the step is
  named and recomputed: the run trains step 3 on batch 3, as the run resumed untouched."""
  model_dir = tmp_path / "edited"
  shutil.copytree(two_steps, model_dir, symlinks=True)
  (model_dir / "best").mkdir()
  (model_dir / "best" / "best.json").write_text("{garbled")
  position = model_dir / "checkpoints" / "2" / "data_position" / "metadata"
  with open(position) as f:
    assert json.load(f) == {"batches_consumed": 2}
  with open(position, "w") as f:
    json.dump({"batches_consumed": 0}, f)
  with caplog.at_level(logging.WARNING, logger="prompt_tuning_jax"):
    train.main(flags(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS="3", CHECKPOINT_PERIOD="2",
                     **{"train.log_batch_hashes": "True"}))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and r.name == "prompt_tuning_jax"]
  assert any("best.json is unreadable" in w for w in warnings), warnings
  assert any("data position" in w and "resuming at batch 2" in w for w in warnings), warnings
  untouched = resumed(two_steps, tmp_path, "untouched", **{"train.log_batch_hashes": "True"})
  assert batch_hashes(model_dir)[3] == batch_hashes(untouched)[3]
  np.testing.assert_array_equal(prompt_at(model_dir, 3), prompt_at(untouched, 3))
