"""The core stays backend-neutral: the model's modules ask no backend, and no module imports in a
cycle."""
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "prompt_tuning_jax"
# The modules that define the model: what they compute must not depend on the process's backend.
MODEL_MODULES = ("config.py", "attention.py", "layers.py", "cpu_attention.py", "network.py",
                 "prompts.py")


def test_model_modules_do_not_ask_for_the_backend():
  for name in MODEL_MODULES:
    text = (PACKAGE / name).read_text(encoding="utf-8")
    for call in ("default_backend", "jax.devices(", "local_devices("):
      assert call not in text, f"{name} calls {call}: choose execution settings at the edge"


def test_no_import_cycles(shared_dir):
  tool = shared_dir / "tools" / "import_cycles.py"
  proc = subprocess.run([sys.executable, str(tool), str(PACKAGE)], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
