"""Training, evaluation and inference through the command line, from the real T5X tiny checkpoint.

The model is `tests/gin/t5x_tiny.gin` (the checkpoint's architecture, a 3-token prompt) and the data
the real SuperGLUE RTE files in ../shared/data.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from prompt_tuning_jax import checkpoints
from prompt_tuning_jax import config
from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax import infer
from prompt_tuning_jax import run_checkpoints
from prompt_tuning_jax import train
from prompt_tuning_jax import trainer
from prompt_tuning_jax import training
from prompt_tuning_jax import trees

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
CHECKPOINT = SHARED / "checkpoints" / "t5x_t5_1_1_tiny_flaxformer" / "checkpoint_3"
TEST_GIN_DIR = REPO_ROOT / "tests" / "gin"
PROMPT_NAME = "encoder.prompt.prompt.prompt"

pytestmark = pytest.mark.needs_shared(SHARED)


@pytest.fixture(autouse=True)
def clear_gin():
  """Leaves no gin bindings (e.g. DATA_DIR) behind for other tests."""
  yield
  gin.clear_config()


def flags(run_file="runs/prompt_finetune.gin", **macros):
  """Command-line flags for the tiny checkpoint on RTE; `macros` add or override `--gin.NAME`."""
  values = {
      "MIXTURE_OR_TASK_NAME": "'taskless_super_glue_rte_v102'",
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 4}",
      "INITIAL_CHECKPOINT_PATH": repr(str(CHECKPOINT)),
      "DATA_DIR": repr(str(SHARED / "data")),
      "BATCH_SIZE": "4",
  }
  if run_file == "runs/prompt_finetune.gin":
    values.update(TRAIN_STEPS="6", EVAL_PERIOD="0", CHECKPOINT_PERIOD="3")
  values.update(macros)
  return [f"--gin_search_paths={TEST_GIN_DIR}", "--gin_file=t5x_tiny.gin",
          f"--gin_file={run_file}"] + [f"--gin.{name}={value}" for name, value in values.items()]


def prompt_at(model_dir, step) -> np.ndarray:
  return np.load(os.path.join(model_dir, "numpy_checkpoints", f"checkpoint_{step}", PROMPT_NAME))


def listing(directory) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file and directory under `directory`."""
  entries = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      entries[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
  return entries


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """An uninterrupted 6-step run; returns (MODEL_DIR, the frozen params of its last step, the
  model it trained)."""
  model_dir = tmp_path_factory.mktemp("full") / "run"
  recorded = {}
  compile_train_step = trainer.compile_train_step

  def recording_compile(model, *args, **kwargs):
    recorded["model"] = model
    step = compile_train_step(model, *args, **kwargs)

    def recording_step(state, frozen, batch):
      recorded["frozen"] = frozen
      return step(state, frozen, batch)
    return recording_step

  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setattr(trainer, "compile_train_step", recording_compile)
    train.main(flags(MODEL_DIR=repr(str(model_dir))))
  gin.clear_config()
  return model_dir, jax.device_get(recorded["frozen"]), recorded["model"]


def test_frozen_weights_stay_the_checkpoints(full_run):
  frozen = full_run[1]
  _, expected = checkpoints.load_checkpoint(str(CHECKPOINT))
  expected, frozen = trees.flatten(expected), trees.flatten(frozen)
  assert sorted(frozen) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(np.asarray(frozen[name]), value, err_msg=name)


def test_the_attention_is_resolved_for_the_devices(full_run):
  """ATTENTION_IMPLEMENTATION 'auto' (runs/prompt_finetune.gin) becomes the devices' best."""
  model = full_run[2]
  expected = config.ExecutionConfig(attention="auto").for_platform(jax.devices()[0].platform,
                                                                  model.config)
  assert model.execution == expected and model.execution.attention != "auto"


def test_numpy_prompt_is_saved(full_run):
  model_dir = full_run[0]
  prompt = prompt_at(model_dir, 6)
  assert prompt.shape == (3, 4) and prompt.dtype == np.float32
  assert not np.array_equal(prompt, prompt_at(model_dir, 3))
  assert (model_dir / "config.gin").is_file() and (model_dir / "train_metrics.jsonl").is_file()


def test_restart_reaches_the_uninterrupted_prompt(full_run, tmp_path):
  """Stopped at step 3, then resumed to 6 by `python -m prompt_tuning_jax.train` in a subprocess."""
  model_dir = tmp_path / "run"
  train.main(flags(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS="3"))
  assert not (model_dir / "numpy_checkpoints" / "checkpoint_6").exists()
  result = subprocess.run(
      [sys.executable, "-m", "prompt_tuning_jax.train", *flags(MODEL_DIR=repr(str(model_dir)))],
      cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed" in result.stderr and "Trained to step 6" in result.stdout
  np.testing.assert_array_equal(prompt_at(model_dir, 6), prompt_at(full_run[0], 6))


def test_resumed_with_other_execution_settings_reaches_the_same_prompt(full_run, tmp_path):
  """`ExecutionConfig.scan_layers` stacks the checkpoint's layers, and the reference attention
  computes what the devices' own does: the run it resumes trains on alike."""
  model_dir = tmp_path / "run"
  train.main(flags(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS="3"))
  train.main(flags(MODEL_DIR=repr(str(model_dir)), ATTENTION_IMPLEMENTATION="'xla'",
                   **{"ExecutionConfig.scan_layers": "True"}))
  np.testing.assert_allclose(prompt_at(model_dir, 6), prompt_at(full_run[0], 6), rtol=1e-5,
                             atol=1e-6)


def expect_one_line_error(capsys, main, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  # One `error:` line; an architecture mismatch continues it with a few indented lines.
  first, *rest = err.splitlines()
  assert first.startswith("error: ") and "Traceback" not in err, err
  assert len(rest) <= 3 and all(line.startswith("  ") for line in rest), err
  assert message in err


@pytest.mark.parametrize("macros, message", [
    ({"INITIAL_CHECKPOINT_PATH": "'/no/such/checkpoint_1'"}, "does not exist"),
    ({"t5_config.emb_dim": "8", "t5_config.head_dim": "4"}, "does not match the config"),
    ({"train.mesh_shape": "(2, 1)"}, "mesh_shape (2, 1)"),
    ({"train.num_microbatches": "3"}, "BATCH_SIZE=4"),
    ({"PROMPT_LENGTH": "5"}, "prompt_length: 3 in the run, 5 now"),
    ({"TASK_FEATURE_LENGTHS": "{'inputs': 32}"}, "TASK_FEATURE_LENGTHS"),
], ids=["missing_checkpoint", "other_architecture", "mesh_devices", "batch_split",
        "other_run_config", "feature_lengths"])
def test_bad_input_leaves_model_dir_untouched(full_run, capsys, macros, message):
  model_dir = full_run[0]
  before = listing(model_dir)
  argv = flags(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS="9")
  expect_one_line_error(capsys, train.main, argv + [f"--gin.{k}={v}" for k, v in macros.items()],
                        message)
  assert listing(model_dir) == before


def test_other_architecture_writes_nothing_in_a_new_model_dir(tmp_path, capsys):
  model_dir = tmp_path / "run"
  argv = flags(MODEL_DIR=repr(str(model_dir))) + ["--gin.t5_config.num_encoder_layers=3"]
  expect_one_line_error(capsys, train.main, argv, "does not match the config")
  assert not model_dir.exists()


def test_eval_and_infer_on_the_trained_prompt(full_run):
  model_dir = full_run[0]
  prompt_file = repr(str(model_dir / "numpy_checkpoints" / "checkpoint_6" / PROMPT_NAME))
  eval_lib.main(flags("runs/prompt_eval.gin", PROMPT_FILE=prompt_file,
                      EVAL_OUTPUT_DIR=repr(str(model_dir / "eval")), EVAL_NUM_EXAMPLES="8"))
  with open(model_dir / "eval" / "metrics.json") as f:
    assert 0 <= json.load(f)["taskless_super_glue_rte_v102"]["accuracy"] <= 100

  infer.main(flags("runs/prompt_infer.gin", PROMPT_FILE=prompt_file,
                   INFER_OUTPUT_DIR=repr(str(model_dir / "infer")), INFER_NUM_EXAMPLES="8"))
  with open(model_dir / "infer" / "taskless_super_glue_rte_v102-validation.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 8
  assert rows[0]["targets"] in ("entailment", "not_entailment") and "prediction" in rows[0]


@pytest.mark.parametrize("main, run_file, output, setting", [
    (eval_lib.main, "runs/prompt_eval.gin", "EVAL_OUTPUT_DIR", "evaluate.length_buckets"),
    (infer.main, "runs/prompt_infer.gin", "INFER_OUTPUT_DIR", "infer.length_buckets"),
], ids=["eval", "infer"])
def test_eval_and_infer_name_a_length_bucket_longer_than_the_inputs(tmp_path, capsys, main, run_file,
                                                                     output, setting):
  argv = flags(run_file, PROMPT_FILE=repr(str(tmp_path / "prompt.npy")),
               **{output: repr(str(tmp_path / "out")), setting: "[64]"})
  expect_one_line_error(capsys, main, argv, f"{setting}=[64]: [64] not a positive integer up to")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 8), np.float32), "shape (3, 8)"),
    (np.zeros((3, 4), np.int32), "int32"),
], ids=["shape", "dtype"])
def test_eval_rejects_a_prompt_file_of_another_model(full_run, tmp_path, capsys, array, message):
  model_dir = full_run[0]
  before = listing(model_dir)
  prompt_file = tmp_path / "prompt.npy"
  np.save(prompt_file, array)
  argv = flags("runs/prompt_eval.gin", PROMPT_FILE=repr(str(prompt_file)),
               EVAL_OUTPUT_DIR=repr(str(model_dir / "bad_eval")))
  expect_one_line_error(capsys, eval_lib.main, argv, message)
  assert listing(model_dir) == before


def test_length_buckets_train_on_a_few_shapes(tmp_path, monkeypatch):
  """`DatasetConfig.length_buckets`: batches of RTE's real lengths come in the buckets' shapes,
  each example whole; the run's eval loss sees its batches cut to the buckets too."""
  shapes, rows = {"train": [], "eval": []}, {"train": 0, "eval": 0}

  def recording(kind, compile_step):
    def recording_compile(*args, **kwargs):
      step = compile_step(*args, **kwargs)

      def recording_step(state_or_trainable, frozen, batch):
        shapes[kind].append(batch["encoder_input_tokens"].shape)
        rows[kind] += int((np.asarray(batch["decoder_loss_weights"]).sum(1) > 0).sum())
        return step(state_or_trainable, frozen, batch)
      return recording_step
    return recording_compile

  monkeypatch.setattr(trainer, "compile_train_step", recording("train", trainer.compile_train_step))
  monkeypatch.setattr(trainer, "compile_eval_step", recording("eval", trainer.compile_eval_step))
  model_dir = tmp_path / "run"
  train.main(flags(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS="8", EVAL_PERIOD="8",
                   TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 4}",
                   **{"DatasetConfig.length_buckets": "[64, 96, 128]",
                      "EvalConfig.num_examples": "8"}))
  train_shapes = shapes["train"]
  assert {s[1] for s in train_shapes} <= {64, 96, 128, 256} and len({s[1] for s in train_shapes}) >= 2
  assert all(s[0] == 4 for s in train_shapes) and len(train_shapes) == 8
  eval_widths = [s[1] for s in shapes["eval"]]
  assert set(eval_widths) <= {64, 96, 128, 256} and min(eval_widths) < 256 and rows["eval"] == 8
  with open(model_dir / "run_config.json") as f:
    assert json.load(f)["length_buckets"] == [64, 96, 128]
  assert prompt_at(model_dir, 8).shape == prompt_at(model_dir, 6).shape


def test_the_next_batch_is_placed_and_the_next_step_queued_before_waiting(tmp_path, monkeypatch):
  """Per step: dispatch the step, place the next batch on the mesh, then wait (reading finiteness is
  the loop's first sync) for the step before, so the device always has the next step queued, on
  every platform. The last step places nothing, and its save waits for it."""
  events = []
  compile_train_step, make_array = trainer.compile_train_step, jax.make_array_from_process_local_data
  read_finiteness = training._read_finiteness  # pylint: disable=protected-access

  def recording_compile(*args, **kwargs):
    step = compile_train_step(*args, **kwargs)
    return lambda *a: (events.append("step"), step(*a))[1]
  monkeypatch.setattr(trainer, "compile_train_step", recording_compile)
  monkeypatch.setattr(jax, "make_array_from_process_local_data",
                      lambda *a: (events.append("place"), make_array(*a))[1])
  monkeypatch.setattr(training, "_read_finiteness",
                      lambda metrics: (events.append("wait"), read_finiteness(metrics))[1])
  train.main(flags(MODEL_DIR=repr(str(tmp_path / "run")), TRAIN_STEPS="5", CHECKPOINT_PERIOD="5"))
  batches = [e for i, e in enumerate(events)  # one "place" a batch, not one an array
             if e != "place" or i == 0 or events[i - 1] != "place"]
  assert batches == ["place", "step", "place", "step"] + ["place", "wait", "step"] * 3 + [
      "wait", "wait"]


def unshuffled_flags(model_dir) -> list[str]:
  """6 unshuffled steps, evaluated at steps 3 and 6 on 16 validation examples."""
  return flags(MODEL_DIR=repr(str(model_dir)), EVAL_PERIOD="3") + [
      "--gin.DatasetConfig.shuffle=False", "--gin.EvalConfig.num_examples=16"]


@pytest.fixture(scope="module")
def unshuffled_run(tmp_path_factory):
  """One process's run of `unshuffled_flags`: the reference for the two-process runs."""
  model_dir = tmp_path_factory.mktemp("unshuffled") / "run"
  train.main(unshuffled_flags(model_dir))
  gin.clear_config()
  return model_dir


def run_two_processes(model_dir, fault_in_process_1=None) -> list[str]:
  """`python -m prompt_tuning_jax.train` with `unshuffled_flags` as two processes joined by
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (gloo collectives on CPU), one device
  each; returns their stdouts. `fault_in_process_1` sets PROMPT_TUNING_FAULT in process 1 alone."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
  env.pop(run_checkpoints.FAULT_ENV, None)
  faults = [{}, {run_checkpoints.FAULT_ENV: fault_in_process_1} if fault_in_process_1 else {}]
  processes = [subprocess.Popen(
      [sys.executable, "-m", "prompt_tuning_jax.train", *unshuffled_flags(model_dir)], cwd=REPO_ROOT, env={**env, "JAX_PROCESS_ID": str(i), **faults[i]},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [process.communicate(timeout=300) for process in processes]
  finally:
    for process in processes:
      process.kill()
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


def test_two_processes_train_as_one(unshuffled_run, tmp_path):
  """Unshuffled, each process reads every other example, so a global batch holds the same examples
  as one process's, and the prompt after 6 steps is one process's to float rounding. Evaluation
  (every process reads the whole split) gives one process's loss and predictions. Both write the
  resume checkpoints (orbax), process 0 alone the logs."""
  one, two = unshuffled_run, tmp_path / "two"
  assert "Trained to step 6" in run_two_processes(two)[0]
  np.testing.assert_allclose(prompt_at(two, 6), prompt_at(one, 6), atol=1e-5)
  assert not np.allclose(prompt_at(two, 6), prompt_at(two, 3), atol=1e-5)
  assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(one / "checkpoints"))
  logged = [[json.loads(line) for line in (run / "train_metrics.jsonl").read_text().splitlines()]
            for run in (two, one)]
  assert len(logged[0]) == len(logged[1])
  evals = [[entry for entry in log if entry["kind"].startswith("eval")] for log in logged]
  assert [(e["step"], e["kind"]) for e in evals[0]] == [(e["step"], e["kind"]) for e in evals[1]]
  assert len(evals[0]) == 4  # the loss and the task's metrics, at steps 3 and 6
  for ours, reference in zip(*evals):
    assert ours.keys() == reference.keys()
    names = [name for name in reference if name not in ("step", "kind")]
    np.testing.assert_allclose([ours[n] for n in names], [reference[n] for n in names], rtol=1e-5)
  predictions = "inference_eval/taskless_super_glue_rte_v102-000006.jsonl"
  assert (two / predictions).read_text() == (one / predictions).read_text()


def test_sigterm_to_one_process_stops_both_at_one_step_and_they_resume(unshuffled_run, tmp_path):
  """A preemption notice reaching process 1 alone at step 4: both processes learn of it one step
  later, save step 5 and exit cleanly; two processes resume to step 6 and reach one process's
  uninterrupted prompt."""
  two = tmp_path / "two"
  outputs = run_two_processes(two, fault_in_process_1="sigterm:4")
  assert "Stopped by SIGTERM at step 5, checkpoint saved" in outputs[0]
  assert sorted(os.listdir(two / "checkpoints"), key=int) == ["3", "5"]
  assert "Trained to step 6" in run_two_processes(two)[0]
  np.testing.assert_allclose(prompt_at(two, 6), prompt_at(unshuffled_run, 6), atol=1e-5)
