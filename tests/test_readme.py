"""The README's examples run as written: its Python API example on the real T5X test checkpoint, and
each shell block marked `<!-- runs offline -->`; every other shell block needs what a test machine
lacks (a network, a real checkpoint, a finished run)."""
import functools
import json
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT, T5X_TINY_CHECKPOINT
from prompt_tuning_jax import tasks

README = (REPO_ROOT / "README.md").read_text()
OFFLINE_MARK = "<!-- runs offline -->"
# What marks a shell block that cannot run on a test machine.
NEEDS_MORE = ("gs://", "/path/to", "gcloud", "pip install", "make ", "--gin_file=...", "/tmp/rte",
              "demo_run")


def shell_blocks() -> list[tuple[bool, str]]:
  """(marked to run offline, text) of each ```sh block."""
  return [(bool(mark), text) for mark, text in
          re.findall(rf"({re.escape(OFFLINE_MARK)}\n)?```sh\n(.*?)```", README, re.S)]


@functools.cache
def run_block(text: str) -> subprocess.CompletedProcess:
  """Runs a shell block from the repository root with this interpreter as `python` (once)."""
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  return subprocess.run(["bash", "-euo", "pipefail", "-c", text], capture_output=True, text=True,
                        cwd=REPO_ROOT, env=env, timeout=600)


def test_readme_python_example_runs(shared_dir):
  code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
  code = code.replace("/path/to/t5_1_1_lm100k_base/checkpoint_1100000", str(T5X_TINY_CHECKPOINT))
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape[:2] == namespace["targets"].shape
  assert namespace["label_scores"].shape == (1, 2)
  assert namespace["tokens"].shape == (1, 8)
  assert namespace["beam_tokens"].shape == (1, 4, 8)


def test_offline_shell_blocks_run():
  offline = [text for marked, text in shell_blocks() if marked]
  assert len(offline) >= 2
  for text in offline:
    result = run_block(text)
    assert result.returncode == 0, f"{text}\n{result.stderr}"


def test_other_shell_blocks_need_more_than_a_test_machine():
  blocks = [text for marked, text in shell_blocks() if not marked]
  assert [text for text in blocks if not any(need in text for need in NEEDS_MORE)] == []


def test_the_plan_figures_are_what_plan_prints():
  """The prose after the plan block gives the figures the block prints."""
  block = next(text for marked, text in shell_blocks()
               if marked and "prompt_tuning_jax.plan" in text)
  output = run_block(block).stdout
  figures = {name: float(re.search(rf"{re.escape(name)}\s+([\d.]+) GiB", output).group(1))
             for name in ("parameters + optimizer state + batch", "activations and temporaries")}
  prose = README[README.index(block):]
  assert f"{figures['parameters + optimizer state + batch']:.1f} GiB of weights and state" in prose
  assert f"{figures['activations and temporaries']:.1f} GiB of activations" in prose


def test_every_console_script_the_readme_names_is_in_setup_py():
  setup = (REPO_ROOT / "setup.py").read_text()
  scripts = dict(re.findall(r'"(prompt-tuning-[\w-]+)=prompt_tuning_jax\.(\w+):main"', setup))
  assert scripts["prompt-tuning-plan"] == "plan"
  assert set(re.findall(r"`(prompt-tuning-[\w-]+)`", README)) == set(scripts)


def test_the_serve_requests_are_written_as_their_tasks_write_inputs(shared_dir, monkeypatch):
  """Each request of the serve example names its fields in the order its task's inputs do."""
  monkeypatch.setenv("PROMPT_TUNING_DATA_DIR", str(shared_dir / "data"))
  registered = {"rte": "taskless_super_glue_rte_v102", "mrpc": "taskless_glue_mrpc_v002"}
  requests = re.search(r"<<'JSONL'\n(.*?)JSONL", README, re.S).group(1)
  fields = lambda text: re.findall(r"(\w+): ", text)
  for line in requests.splitlines():
    request = json.loads(line)
    [example] = tasks.get_examples(registered[request["task"]], "validation", 1)
    assert fields(request["inputs"]) == fields(example["inputs_pretokenized"]), request
