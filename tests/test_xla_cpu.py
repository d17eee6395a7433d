"""Importing the package turns off XLA:CPU's YNNPACK fusions and its tree reduction rewriter, unless the
user set those flags; the steps of large products compile with oneDNN's dots on AVX-512 CPUs; our
tools restart themselves with tcmalloc and glibc's huge-page malloc, and run their steps inline."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import xla_cpu

from conftest import REPO_ROOT

PROBE = """
import os, jax, jax.numpy as jnp
{before}
{import_package}
hlo = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(-1)).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS"), "__ynn_fusion" in hlo, "reduce-window" in hlo)
"""


def _probe(xla_flags=None, before="", import_package="import prompt_tuning_jax"):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  env["PYTHONPATH"] = str(REPO_ROOT)
  done = subprocess.run([sys.executable, "-c", PROBE.format(before=before, import_package=import_package)], env=env,
                        capture_output=True, text=True, check=True, timeout=300)
  return done.stdout.split()


YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
TREE_OFF = "--xla_disable_hlo_passes=tree_reduction_rewriter"


def test_import_turns_ynn_fusions_and_tree_reductions_off_and_keeps_other_flags():
  assert _probe("--xla_cpu_enable_fast_math=false") == [
      "--xla_cpu_enable_fast_math=false", YNN_OFF, TREE_OFF, "False", "False"]
  # Without the package this jaxlib does fuse through YNNPACK, so the probe can tell; with the user's
  # own pass list below, the reduction is split in two (`reduce-window`).
  assert _probe(import_package="")[-2] == "True"


def test_a_users_own_settings_and_a_started_backend_are_left_alone():
  assert _probe("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT") == [
      "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT", TREE_OFF, "True", "False"]
  assert _probe("--xla_disable_hlo_passes=cse_barrier_expander") == [
      "--xla_disable_hlo_passes=cse_barrier_expander", YNN_OFF, "False", "True"]
  assert _probe(before="jnp.ones(1).block_until_ready()")[0] == "None"


def test_xla_cpu_flags_on_an_environment(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.xla_cpu_flags(environ) == [YNN_OFF, TREE_OFF]
  assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {YNN_OFF} {TREE_OFF}"
  assert xla_cpu.xla_cpu_flags(environ) == [] and xla_cpu.xla_cpu_flags({}) == [YNN_OFF, TREE_OFF]
  environ = {"XLA_FLAGS": "--xla_disable_hlo_passes=cse_barrier_expander"}
  assert xla_cpu.xla_cpu_flags(environ) == [YNN_OFF]
  monkeypatch.setattr(xla_cpu, "_backends_started", lambda: True)
  environ = {}
  assert xla_cpu.xla_cpu_flags(environ) == [] and environ == {}


def test_dot_compiler_options_choose_onednn_only_where_measured(monkeypatch):
  monkeypatch.setattr(xla_cpu.platform, "machine", lambda: "x86_64")
  options = lambda name="cpu", flags="", avx512=True: xla_cpu.dot_compiler_options(
      name, {"XLA_FLAGS": flags}, cpu_has_avx512=avx512)
  assert options() == xla_cpu.ONEDNN_DOTS
  assert options(flags="--xla_force_host_platform_device_count=8") == xla_cpu.ONEDNN_DOTS
  assert options("gpu") == {} and options("tpu") == {} and options(avx512=False) == {}
  assert options(flags="--xla_cpu_use_onednn=false") == {}
  assert options(None) == (xla_cpu.ONEDNN_DOTS if jax.default_backend() == "cpu" else {})
  assert options(flags="--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT") == {}
  monkeypatch.setattr(xla_cpu.platform, "machine", lambda: "aarch64")
  assert options() == {}


def test_onednn_dots_compile_and_agree_with_eigen():
  """The options give each dot (plain and batched) to oneDNN, with Eigen's results."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(4, 48, 32)), jnp.float32) for _ in range(2))
  fn = lambda a, b: (jnp.einsum("bqd,bkd->bqk", a, b), a.reshape(-1, 32) @ b[0].T)
  compiled = jax.jit(fn, compiler_options=xla_cpu.ONEDNN_DOTS).lower(a, b).compile()
  assert compiled.as_text().count('"kind":"__onednn_fusion"') == 2
  for ours, eigen in zip(compiled(a, b), jax.jit(fn)(a, b)):
    np.testing.assert_allclose(ours, eigen, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "prompt_tuning_jax.train", "--gin_file=a.gin"], True),
    (["python", "-mprompt_tuning_jax.demo"], True),
    (["python", "-X", "dev", "-u", "-m", "prompt_tuning_jax.eval"], True),
    (["python", "/venv/bin/prompt-tuning-train", "-mx"], True),
    (["python", "-m", "pytest", "-m", "prompt_tuning_jax.x"], False),
    (["python", "-c", "pass", "-m", "prompt_tuning_jax.train"], False),
    (["python", "script.py", "-m", "prompt_tuning_jax.train"], False),
    (["python"], False),
])
def test_is_command_line_tool(argv, expected):
  assert xla_cpu.is_command_line_tool(argv) is expected


def test_huge_pages_environ():
  glibc, thp = (2, 36), "madvise"
  assert xla_cpu.huge_pages_environ({"A": "1"}, glibc, thp) == {
      "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert xla_cpu.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc, thp) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  for environ, glibc, thp in [({}, None, thp), ({}, (2, 34), thp), ({}, glibc, "always"),
                              ({}, glibc, "never"), ({}, glibc, None),
                              ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc, thp),
                              ({"PROMPT_TUNING_JAX_HUGE_PAGES": "0"}, glibc, thp)]:
    assert xla_cpu.huge_pages_environ(environ, glibc, thp) is None


def test_tool_environ_adds_tcmalloc_unless_preloading_already_or_told_not_to():
  glibc, thp, tcmalloc = (2, 36), "madvise", "libtcmalloc_minimal.so.4"
  assert xla_cpu.tool_environ({"A": "1"}, glibc, thp, tcmalloc) == {
      "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "LD_PRELOAD": tcmalloc}
  assert xla_cpu.tool_environ({}, None, thp, tcmalloc) == {"LD_PRELOAD": tcmalloc}
  assert xla_cpu.tool_environ({}, glibc, thp, None) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert xla_cpu.tool_environ({"LD_PRELOAD": "libjemalloc.so.2"}, glibc, thp, tcmalloc) == {
      "LD_PRELOAD": "libjemalloc.so.2", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert xla_cpu.tool_environ({"PROMPT_TUNING_JAX_TCMALLOC": "0"}, glibc, thp, tcmalloc) == {
      "PROMPT_TUNING_JAX_TCMALLOC": "0", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # What a restarted tool sees: nothing left to add, so it does not restart again.
  started = xla_cpu.tool_environ({}, glibc, thp, tcmalloc)
  assert xla_cpu.tool_environ(started, glibc, thp, tcmalloc) is None
  assert xla_cpu.tool_environ({"PROMPT_TUNING_JAX_TCMALLOC": "0", "PROMPT_TUNING_JAX_HUGE_PAGES": "0"},
                              glibc, thp, tcmalloc) is None


def _run_tool(**env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "PROMPT_TUNING_JAX_HUGE_PAGES",
                          "PROMPT_TUNING_JAX_TCMALLOC")}
  environ.update(env, PYTHONPATH=str(REPO_ROOT))
  return subprocess.run([sys.executable, "-m", "prompt_tuning_jax.inspect", "--help"], env=environ,
                        capture_output=True, text=True, check=True, timeout=300)


@pytest.mark.skipif(xla_cpu.host_tool_environ({}) is None,
                    reason="needs tcmalloc, or glibc 2.35+ with transparent huge pages on request")
def test_a_tool_restarts_once_with_its_allocator_settings_unless_told_not_to():
  done = _run_tool()
  environ = xla_cpu.host_tool_environ({})
  added = " ".join(f"{k}={environ[k]}" for k in ("LD_PRELOAD", "GLIBC_TUNABLES") if k in environ)
  assert done.stderr.count("prompt_tuning_jax: restarting with") == 1
  assert f"restarting with {added} (" in done.stderr
  assert "usage: prompt-tuning-inspect" in done.stdout  # its arguments came through the restart
  assert "restarting" not in _run_tool(PROMPT_TUNING_JAX_HUGE_PAGES="0",
                                       PROMPT_TUNING_JAX_TCMALLOC="0").stderr


DISPATCH_PROBE = """
import sys
{as_tool}
import prompt_tuning_jax
from jax._src import xla_bridge
print(xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)
"""


def test_a_tool_runs_its_steps_inline_and_a_library_user_dispatches_as_jax_does():
  environ = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PROMPT_TUNING_JAX_HUGE_PAGES="0",
                 PROMPT_TUNING_JAX_TCMALLOC="0")  # nothing to restart for

  def async_dispatch(as_tool: bool) -> str:
    code = DISPATCH_PROBE.format(as_tool="sys.orig_argv = [sys.executable, '-m', "
                                 "'prompt_tuning_jax.train']" if as_tool else "")
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                          check=True, timeout=300).stdout.strip()
  assert async_dispatch(as_tool=True) == "False"
  assert async_dispatch(as_tool=False) == "True"


def test_run_steps_inline_changes_nothing_once_a_backend_started():
  jnp.zeros(1).block_until_ready()
  assert xla_cpu.run_steps_inline() is False


@pytest.mark.parametrize("reported, expected", [
    ("glibc 2.36", (2, 36)), ("glibc 2.35.1", (2, 35)), ("glibc 2", None), ("glibc x.y", None),
    ("musl 1.2", None), ("", None)])
def test_glibc_version_reads_or_gives_up(monkeypatch, reported, expected):
  monkeypatch.setattr(os, "confstr", lambda name: reported)
  assert xla_cpu._glibc_version() == expected  # pylint: disable=protected-access
