"""Importing the package turns off XLA:CPU's YNNPACK fusions, unless the user chose otherwise."""
import os
import subprocess
import sys

from prompt_tuning_jax import xla_cpu

from conftest import REPO_ROOT

PROBE = """
import os, jax, jax.numpy as jnp
{before}
{import_package}
hlo = jax.jit(lambda a, b: jnp.tanh(a @ b) * 2).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS"), "__ynn_fusion" in hlo)
"""


def _probe(xla_flags=None, before="", import_package="import prompt_tuning_jax"):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  env["PYTHONPATH"] = str(REPO_ROOT)
  done = subprocess.run([sys.executable, "-c", PROBE.format(before=before, import_package=import_package)], env=env,
                        capture_output=True, text=True, check=True, timeout=300)
  return done.stdout.split()


def test_import_turns_ynn_fusions_off_and_keeps_other_flags():
  assert _probe("--xla_cpu_enable_fast_math=false") == [
      "--xla_cpu_enable_fast_math=false", "--xla_cpu_experimental_ynn_fusion_type=", "False"]
  # Without the package this jaxlib does fuse through YNNPACK, so the probe can tell.
  assert _probe(import_package="")[-1] == "True"


def test_a_users_own_ynn_setting_and_a_started_backend_are_left_alone():
  assert _probe("--xla_cpu_experimental_ynn_fusion_type=individual_dot")[0] == (
      "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
  assert _probe(before="jnp.ones(1).block_until_ready()")[0] == "None"


def test_prefer_xla_dots_on_an_environment(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.prefer_xla_dots(environ) is True
  assert environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                  "--xla_cpu_experimental_ynn_fusion_type=")
  assert xla_cpu.prefer_xla_dots(environ) is False and xla_cpu.prefer_xla_dots({}) is True
  monkeypatch.setattr(xla_cpu, "_backends_started", lambda: True)
  environ = {}
  assert xla_cpu.prefer_xla_dots(environ) is False and environ == {}
