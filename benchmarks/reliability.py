"""Reliability: the faults a training run survives, and bad input of every kind, on real processes.

  PYTHONPATH=. python -m benchmarks.reliability [--kills 5] [--corruptions 4] [--quick]

Each class is tried on `python -m prompt_tuning_jax.<tool>` subprocesses. The training run is short
(8 steps, a checkpoint every 2) on the bundled T5X tiny checkpoint and RTE rows
(`prompt_tuning_jax/demo_data`); an uninterrupted run gives the reference prompt.

- kill: the run is SIGKILLed after a random delay (20-80% of the uninterrupted run's wall time:
  start-up, compilation, steps or saves; halved until the kill comes before the run ends), then
  rerun with the same command. Survived: the rerun ends (exit 0) with the reference prompt, bit for
  bit.
- corruption: a file of a finished run's newest checkpoint is deleted, emptied or garbled (or its
  numpy prompt emptied), then the same command runs again. Survived: it ends with the reference
  prompt.
- concurrent: two runs start on one new MODEL_DIR at once. Survived: one ends with the reference
  prompt, the other exits non-zero.
- disk_full: MODEL_DIR on a tmpfs that holds part of a run (mounting one needs root; skipped
  otherwise). Survived: the run fails, and once the tmpfs is grown the rerun ends with the
  reference prompt.
- bad_input: each case of the catalogue (`tests/test_bad_input.py`, docs/errors.md). Survived: a
  non-zero exit within 2 minutes, the files it was given unchanged and its output not created.

A try is clean when no process of it printed a traceback and each that failed said why in one
`error: ...` line, its last (an architecture mismatch continues it with indented lines). Prints survived/tried and clean/tried per class; writes JSON.
"""
import argparse
import glob
import json
import os
import pathlib
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the bad-input catalogue

# pylint: disable=g-import-not-at-top,wrong-import-position
import test_bad_input
from test_train_e2e import PROMPT_NAME, listing
# pylint: enable=g-import-not-at-top,wrong-import-position

DEMO_DATA = REPO_ROOT / "prompt_tuning_jax" / "demo_data"
TRAIN_STEPS = 8
RUN_MACROS = {
    "MIXTURE_OR_TASK_NAME": "'taskless_super_glue_rte_v102'",
    "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 4}",
    "INITIAL_CHECKPOINT_PATH": repr(str(DEMO_DATA / "t5x_t5_1_1_tiny" / "checkpoint_3")),
    "DATA_DIR": repr(str(DEMO_DATA)),
    "PROMPT_LENGTH": "3",
    "BATCH_SIZE": "4",
    "TRAIN_STEPS": str(TRAIN_STEPS),
    "CHECKPOINT_PERIOD": "2",
    "EVAL_PERIOD": "0",
}
TIMEOUT_S = 120  # a bad input must end within it; a training run of 8 steps does too
CORRUPTIONS = ("missing_file", "empty_array_file", "garbled_metadata", "empty_numpy_prompt")


def train_argv(model_dir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "prompt_tuning_jax.train",
          "--gin_file=models/t5_1_1_tiny_prompt.gin", "--gin_file=runs/prompt_finetune.gin",
          f"--gin.MODEL_DIR={str(model_dir)!r}",
          *[f"--gin.{name}={value}" for name, value in RUN_MACROS.items()]]


def environment(cache_dir: pathlib.Path) -> dict[str, str]:
  """The children's environment: the repository importable, a shared compilation cache."""
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("PROMPT_TUNING_FAULT", None)
  return env


def finished(result: subprocess.CompletedProcess) -> dict[str, Any]:
  """What a finished process shows: exit status, stderr's `error:` lines, a traceback."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  return {"returncode": result.returncode, "traceback": "Traceback" in result.stderr,
          # One `error:` line, its last but for the indented lines that continue it.
          "one_error_line": len(errors) == 1 and all(
              line[:1].isspace() for line in lines[lines.index(errors[0]) + 1:]),
          "error": errors[-1][:300] if errors else None, "stderr_tail": result.stderr[-600:]}


def clean(*processes: dict[str, Any]) -> bool:
  return all(not p["traceback"] and (p["returncode"] == 0 or p["one_error_line"])
             for p in processes)


def final_prompt(model_dir: pathlib.Path) -> Optional[np.ndarray]:
  path = (model_dir / "numpy_checkpoints" / f"checkpoint_{TRAIN_STEPS}"
          / PROMPT_NAME)
  return np.load(path) if path.is_file() else None


class Bench:
  """The runs of one benchmark: a scratch directory, the children's environment, the reference."""

  def __init__(self, root: pathlib.Path, rng: random.Random):
    self.root, self.rng = root, rng
    self.env = environment(root / "jax_cache")
    self.reference: Optional[np.ndarray] = None
    self.reference_s = 0.0
    self.reference_dir = root / "reference"

  def run(self, argv: list[str], timeout: float = TIMEOUT_S) -> dict[str, Any]:
    start = time.monotonic()
    try:
      result = subprocess.run(argv, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
      stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
      result = subprocess.CompletedProcess(argv, "timeout", "", stderr)
    return {**finished(result), "wall_s": round(time.monotonic() - start, 1)}

  def reference_run(self) -> dict[str, Any]:
    """The uninterrupted run (it also fills the compilation cache the other runs read)."""
    process = self.run(train_argv(self.reference_dir))
    self.reference, self.reference_s = final_prompt(self.reference_dir), process["wall_s"]
    if self.reference is None:
      raise RuntimeError(f"The uninterrupted run failed: {process['stderr_tail']}")
    return process

  def matches(self, model_dir: pathlib.Path) -> bool:
    prompt = final_prompt(model_dir)
    return prompt is not None and np.array_equal(prompt, self.reference)

  def kill(self, index: int) -> dict[str, Any]:
    model_dir = self.root / f"kill_{index}"
    delay = round(self.rng.uniform(0.2, 0.8) * self.reference_s, 2)
    for _ in range(4):  # a run that ended before its kill (a warm cache) is tried again, sooner
      shutil.rmtree(model_dir, ignore_errors=True)
      child = subprocess.Popen(train_argv(model_dir), cwd=REPO_ROOT, env=self.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      try:
        child.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()
        break
      delay = round(delay / 2, 2)
    killed = child.returncode == -signal.SIGKILL
    rerun = self.run(train_argv(model_dir))
    return {"name": f"kill after {delay} s", "killed": killed,
            "survived": rerun["returncode"] == 0 and self.matches(model_dir),
            "clean": clean(rerun), "rerun": rerun}

  def corruption(self, index: int) -> dict[str, Any]:
    kind = CORRUPTIONS[index % len(CORRUPTIONS)]
    model_dir = self.root / f"corrupt_{index}"
    shutil.copytree(self.reference_dir, model_dir)
    corrupt(model_dir, kind, self.rng)
    rerun = self.run(train_argv(model_dir))
    return {"name": kind, "survived": rerun["returncode"] == 0 and self.matches(model_dir),
            "clean": clean(rerun), "rerun": rerun}

  def concurrent(self, index: int) -> dict[str, Any]:
    model_dir = self.root / f"concurrent_{index}"
    children = [subprocess.Popen(train_argv(model_dir), cwd=REPO_ROOT, env=self.env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    processes = []
    for child in children:
      try:
        stdout, stderr = child.communicate(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
      processes.append(finished(subprocess.CompletedProcess(child.args, child.returncode, stdout,
                                                            stderr)))
    statuses = sorted(p["returncode"] != 0 for p in processes)
    return {"name": "two runs on one MODEL_DIR", "survived": statuses == [False, True]
            and self.matches(model_dir), "clean": clean(*processes), "runs": processes}

  def disk_full(self, index: int, fraction: float) -> Optional[dict[str, Any]]:
    """A tmpfs of `fraction` of the reference run's size; None where it cannot be mounted."""
    disk = self.root / f"disk_{index}"
    disk.mkdir()
    size_kib = 4 * max(1, int(fraction * tmpfs_pages(self.reference_dir)))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                      capture_output=True, check=False).returncode:
      return None
    try:
      model_dir = disk / "run"
      first = self.run(train_argv(model_dir))
      subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
      rerun = self.run(train_argv(model_dir))
      return {"name": f"tmpfs of {size_kib} KiB", "survived": first["returncode"] != 0
              and rerun["returncode"] == 0 and self.matches(model_dir),
              "clean": clean(first, rerun), "first": first, "rerun": rerun}
    finally:
      subprocess.run(["umount", str(disk)], check=False)

  def bad_input(self, case: "test_bad_input.Case", files: pathlib.Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", f"prompt_tuning_jax.{case.tool}",
            *test_bad_input.argv_of(case, files)]
    output = pathlib.Path(test_bad_input.at(case.model_dir, files))
    existed, before = output.exists(), listing(files)
    process = self.run(argv)
    unchanged = listing(files) == before and output.exists() == existed
    return {"name": case.name, "survived": process["returncode"] not in (0, "timeout")
            and unchanged, "clean": clean(process) and process["returncode"] != 0,
            "process": process}


def corrupt(model_dir: pathlib.Path, kind: str, rng: random.Random) -> None:
  """Corrupts the newest checkpoint of `model_dir` in the way `kind` names."""
  newest = max((model_dir / "checkpoints").iterdir(), key=lambda p: int(p.name)
               if p.name.isdigit() else -1)
  arrays = sorted(glob.glob(str(newest / "state" / "d" / "*")))
  if kind == "missing_file":
    os.remove(rng.choice(arrays))
  elif kind == "empty_array_file":
    open(rng.choice(arrays), "w").close()
  elif kind == "garbled_metadata":
    (newest / "state" / "_METADATA").write_text("{garbled")
  else:
    open(model_dir / "numpy_checkpoints" / f"checkpoint_{newest.name}" / PROMPT_NAME,
         "w").close()


def tmpfs_pages(directory: pathlib.Path) -> int:
  """The 4 KiB pages the files under `directory` take on a tmpfs (at least one each)."""
  return sum(max(1, -(-f.stat().st_size // 4096)) for f in directory.rglob("*") if f.is_file())


def summarize(tries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
  summary: dict[str, dict[str, int]] = {}
  for t in tries:
    row = summary.setdefault(t["class"], {"tried": 0, "survived": 0, "clean": 0})
    row["tried"] += 1
    row["survived"] += bool(t["survived"])
    row["clean"] += bool(t["clean"])
  return summary


def table(summary: dict[str, dict[str, int]], skipped: list[str]) -> str:
  lines = ["| class | survived/tried | clean/tried |", "| --- | --- | --- |"]
  lines += [f"| {name} | {row['survived']}/{row['tried']} | {row['clean']}/{row['tried']} |"
            for name, row in summary.items()]
  lines += [f"| {name} | skipped (cannot mount a tmpfs here) | |" for name in skipped]
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=5)
  parser.add_argument("--corruptions", type=int, default=4)
  parser.add_argument("--concurrent", type=int, default=2)
  parser.add_argument("--disk_full", type=int, default=3)
  parser.add_argument("--bad_inputs", type=int, default=None,
                      help="the first N catalogue cases (default all)")
  parser.add_argument("--quick", action="store_true",
                      help="1 kill, 1 corruption, 2 catalogue cases, nothing else")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results"
                                              / "reliability.json"))
  args = parser.parse_args(argv)
  if args.quick:
    args.kills, args.corruptions, args.concurrent, args.disk_full, args.bad_inputs = 1, 1, 0, 0, 2
  cases = test_bad_input.CASES[:args.bad_inputs]
  start = time.monotonic()
  tries, skipped = [], []
  with tempfile.TemporaryDirectory(prefix="reliability_") as scratch:
    bench = Bench(pathlib.Path(scratch), random.Random(args.seed))
    reference = bench.reference_run()
    steps: list[tuple[str, Callable[[], Optional[dict[str, Any]]]]] = []
    steps += [("kill", lambda i=i: bench.kill(i)) for i in range(args.kills)]
    steps += [("corruption", lambda i=i: bench.corruption(i)) for i in range(args.corruptions)]
    steps += [("concurrent", lambda i=i: bench.concurrent(i)) for i in range(args.concurrent)]
    steps += [("disk_full", lambda i=i: bench.disk_full(i, (i + 1) / (args.disk_full + 1)))
              for i in range(args.disk_full)]
    files = test_bad_input.write_files(pathlib.Path(scratch) / "bad_input")
    steps += [("bad_input", lambda case=case: bench.bad_input(case, files)) for case in cases]
    for name, step in steps:
      result = step()
      if result is None:
        if name not in skipped:
          skipped.append(name)
        continue
      tries.append({"class": name, **result})
      print(f"{name:>10}  {result['name']:<36} survived={result['survived']!s:<5} "
            f"clean={result['clean']}", flush=True)
  summary = summarize(tries)
  results = {
      "command": " ".join(["python -m benchmarks.reliability", *(argv or sys.argv[1:])]),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpus": os.cpu_count(), "python": platform.python_version()},
      "uninterrupted_run_s": reference["wall_s"], "wall_s": round(time.monotonic() - start, 1),
      "summary": summary, "skipped": skipped, "tries": tries,
  }
  print(table(summary, skipped))
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(results, f, indent=2)
  print(f"Wrote {args.output}")
  return results


if __name__ == "__main__":
  main()
