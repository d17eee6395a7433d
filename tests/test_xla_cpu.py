"""Importing the package changes nothing in the importer's process; the steps of large products
compile with XLA:CPU's options per computation (YNNPACK's fusions and the tree reduction rewriter
off, oneDNN's dots on AVX-512) where the user's `XLA_FLAGS` do not set them; tcmalloc and glibc's
huge pages are an opt-in environment that `python -m prompt_tuning_jax.xla_cpu` prints."""
import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import xla_cpu

from conftest import REPO_ROOT

BUNDLED_CHECKPOINT = (REPO_ROOT / "prompt_tuning_jax" / "demo_data" / "t5x_t5_1_1_tiny"
                      / "checkpoint_3")
PROCESS_SETTINGS = ("LD_PRELOAD", "GLIBC_TUNABLES", "XLA_FLAGS")
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="compiles XLA:CPU's options")


def _environ(**env) -> dict[str, str]:
  """This process's environment without the settings under test, with `env`, our code importable."""
  environ = {k: v for k, v in os.environ.items() if k not in PROCESS_SETTINGS}
  return dict(environ, PYTHONPATH=str(REPO_ROOT), **env)


def _run(args, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], env=_environ(**env), capture_output=True,
                        text=True, check=True, timeout=300)


IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, sys
import jax, flax, tensorflow, seqio
from jax._src import xla_bridge
environ, dispatch = dict(os.environ), xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value
sys.stdout.flush(), sys.stderr.flush(), os.write(1, b"<start>"), os.write(2, b"<start>")
import prompt_tuning_jax
names = [m.name for m in pkgutil.walk_packages(prompt_tuning_jax.__path__, "prompt_tuning_jax.")]
for name in names:
  importlib.import_module(name)
sys.stdout.flush(), sys.stderr.flush(), os.write(1, b"<end>"), os.write(2, b"<end>")
print(json.dumps({"modules": names, "environ_after": dict(os.environ), "environ_before": environ,
                  "dispatch_unchanged": xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value == dispatch}))
"""


def test_importing_every_module_changes_no_environment_variable_and_prints_nothing():
  """After jax, flax, tensorflow and seqio (which may log), importing all of ours writes nothing to
  stdout or stderr, and leaves the environment (`XLA_FLAGS` included) and JAX's dispatch as they
  were."""
  done = _run(["-c", IMPORT_EVERYTHING])
  for stream in (done.stdout, done.stderr):
    assert stream.split("<start>", 1)[1].split("<end>", 1)[0] == ""
  result = json.loads(done.stdout.split("<end>", 1)[1])
  assert {"prompt_tuning_jax.train", "prompt_tuning_jax.xla_cpu",
          "prompt_tuning_jax.tasks.super_glue"} <= set(result["modules"])
  assert result["environ_after"] == result["environ_before"]
  assert result["dispatch_unchanged"]


def test_a_tool_runs_without_restarting():
  done = _run(["-m", "prompt_tuning_jax.inspect", str(BUNDLED_CHECKPOINT)])
  assert "token_embedder/embedding" in done.stdout
  assert "restarting" not in done.stdout + done.stderr


def test_dot_compiler_options_for_each_platform_and_the_users_flags(monkeypatch):
  monkeypatch.setattr(xla_cpu.platform, "machine", lambda: "x86_64")
  options = lambda name="cpu", flags="", avx512=True: xla_cpu.dot_compiler_options(
      name, {"XLA_FLAGS": flags}, cpu_has_avx512=avx512)
  both = {**xla_cpu.CPU_OPTIONS, **xla_cpu.ONEDNN_DOTS}
  assert options() == both
  assert options(flags="--xla_force_host_platform_device_count=8") == both
  assert options("gpu") == {} and options("tpu") == {}
  assert options(avx512=False) == xla_cpu.CPU_OPTIONS
  assert options(None) == (both if jax.default_backend() == "cpu" else {})
  assert options(flags="--xla_cpu_use_onednn=false") == xla_cpu.CPU_OPTIONS
  assert options(flags="--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT") == (
      xla_cpu.CPU_OPTIONS)
  assert options(flags="--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT") == {
      "xla_disable_hlo_passes": "tree_reduction_rewriter", **xla_cpu.ONEDNN_DOTS}
  assert options(flags="--xla_disable_hlo_passes=x --xla_cpu_use_onednn=true") == {
      "xla_cpu_experimental_ynn_fusion_type": ""}
  monkeypatch.setattr(xla_cpu.platform, "machine", lambda: "aarch64")
  assert options() == xla_cpu.CPU_OPTIONS and options("gpu") == {}


def _dot_then_reduce(a, b):
  return jnp.tanh(a @ b).sum(-1)


def _exp_then_reduce(x):
  return jnp.exp(x).sum(-1)


def _compiled_text(fn, options, *args) -> str:
  return jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()


@on_cpu
def test_the_cpu_options_turn_ynn_fusions_and_tree_reductions_off_in_the_compiled_program():
  a, x = jnp.ones((64, 64)), jnp.ones((256, 1024))
  options = xla_cpu.dot_compiler_options("cpu", {})
  assert "__ynn" in _compiled_text(_dot_then_reduce, {}, a, a)  # this jaxlib's default
  assert "__ynn" not in _compiled_text(_dot_then_reduce, options, a, a)
  ynn_off = {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert "reduce-window" in _compiled_text(_exp_then_reduce, ynn_off, x)  # the rewriter's split
  for text in (_compiled_text(_exp_then_reduce, options, x),
               _compiled_text(_dot_then_reduce, options, a, a)):
    assert "reduce-window" not in text and "__ynn" not in text


USERS_FLAGS_PROBE = """
import json, jax, jax.numpy as jnp
from prompt_tuning_jax import xla_cpu
options = xla_cpu.dot_compiler_options()
compiled = lambda fn, *args: jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()
dot = compiled(lambda a, b: jnp.tanh(a @ b).sum(-1), jnp.ones((64, 64)), jnp.ones((64, 64)))
reduce = compiled(lambda x: jnp.exp(x).sum(-1), jnp.ones((256, 1024)))
print(json.dumps({"options": sorted(options), "ynn": "__ynn" in dot, "onednn": "__onednn" in dot,
                  "split": "reduce-window" in reduce}))
"""


def _with_users_flags(flags: str) -> dict:
  return json.loads(_run(["-c", USERS_FLAGS_PROBE], XLA_FLAGS=flags).stdout.splitlines()[-1])


@on_cpu
def test_the_users_xla_flags_win_over_the_options():
  """A computation's options override `XLA_FLAGS`, so they leave out what `XLA_FLAGS` sets."""
  # The user's own pass list, without the tree reduction rewriter, stays in force; YNNPACK is off.
  result = _with_users_flags("--xla_disable_hlo_passes=cse_barrier_expander")
  assert "xla_disable_hlo_passes" not in result["options"]
  assert (result["ynn"], result["split"]) == (False, True)
  assert result["onednn"] == ("xla_cpu_use_onednn" in result["options"])
  result = _with_users_flags(
      "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT --xla_cpu_use_onednn=false")
  assert result == {"options": ["xla_disable_hlo_passes"], "ynn": True, "onednn": False,
                    "split": False}


@on_cpu
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="oneDNN on x86-64")
def test_onednn_dots_compile_and_agree_with_eigen():
  """The options give each dot (plain and batched) to oneDNN, with Eigen's results."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(4, 48, 32)), jnp.float32) for _ in range(2))
  fn = lambda a, b: (jnp.einsum("bqd,bkd->bqk", a, b), a.reshape(-1, 32) @ b[0].T)
  compiled = jax.jit(fn, compiler_options={**xla_cpu.CPU_OPTIONS, **xla_cpu.ONEDNN_DOTS}).lower(
      a, b).compile()
  assert compiled.as_text().count('"kind":"__onednn_fusion"') == 2
  eigen = jax.jit(fn, compiler_options=xla_cpu.CPU_OPTIONS)
  for ours, expected in zip(compiled(a, b), eigen(a, b)):
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_huge_pages_environ():
  glibc, thp = (2, 36), "madvise"
  assert xla_cpu.huge_pages_environ({"A": "1"}, glibc, thp) == {
      "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert xla_cpu.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc, thp) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  for environ, glibc, thp in [({}, None, thp), ({}, (2, 34), thp), ({}, glibc, "always"),
                              ({}, glibc, "never"), ({}, glibc, None),
                              ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc, thp)]:
    assert xla_cpu.huge_pages_environ(environ, glibc, thp) is None


def test_tool_environ_adds_tcmalloc_unless_preloading_already():
  glibc, thp, tcmalloc = (2, 36), "madvise", "libtcmalloc_minimal.so.4"
  assert xla_cpu.tool_environ({"A": "1"}, glibc, thp, tcmalloc) == {
      "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "LD_PRELOAD": tcmalloc}
  assert xla_cpu.tool_environ({}, None, thp, tcmalloc) == {"LD_PRELOAD": tcmalloc}
  assert xla_cpu.tool_environ({}, glibc, thp, None) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert xla_cpu.tool_environ({"LD_PRELOAD": "libjemalloc.so.2"}, glibc, thp, tcmalloc) == {
      "LD_PRELOAD": "libjemalloc.so.2", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  started = xla_cpu.tool_environ({}, glibc, thp, tcmalloc)  # nothing left to add once applied
  assert xla_cpu.tool_environ(started, glibc, thp, tcmalloc) is None
  assert xla_cpu.tool_environ({}, None, None, None) is None


def test_opt_in_assignments_are_what_the_host_adds(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(xla_cpu, "_transparent_huge_pages_mode", lambda: "madvise")
  monkeypatch.setattr(xla_cpu, "_tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
  assert xla_cpu.opt_in_assignments({"A": "1", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == [
      "GLIBC_TUNABLES=glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
      "LD_PRELOAD=libtcmalloc_minimal.so.4"]
  assert xla_cpu.opt_in_assignments({"LD_PRELOAD": "x.so"}) == [
      "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"]
  monkeypatch.setattr(xla_cpu, "_tcmalloc_library", lambda: None)
  monkeypatch.setattr(xla_cpu, "_transparent_huge_pages_mode", lambda: "always")
  assert xla_cpu.opt_in_assignments({}) == []


NOTHING_TO_ADD = {"LD_PRELOAD": "libc.so.6", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}


def test_the_command_prints_this_hosts_assignments_or_nothing():
  done = _run(["-m", "prompt_tuning_jax.xla_cpu"])
  assert done.stdout.splitlines() == xla_cpu.opt_in_assignments(_environ()) and done.stderr == ""
  assert _run(["-m", "prompt_tuning_jax.xla_cpu"], **NOTHING_TO_ADD).stdout == ""


@pytest.mark.parametrize("env", [{}, NOTHING_TO_ADD])
def test_the_one_liner_starts_a_command_with_the_opt_in_environment(env):
  """`env $(python -m prompt_tuning_jax.xla_cpu) COMMAND`, as README and `make demo` run it, also
  where the host gains nothing."""
  show = "import os; print(os.environ.get('LD_PRELOAD'), os.environ.get('GLIBC_TUNABLES'))"
  done = subprocess.run(["sh", "-c", 'env $("$0" -m prompt_tuning_jax.xla_cpu) "$0" -c "$1"',
                         sys.executable, show], env=_environ(**env), capture_output=True, text=True,
                        check=True, timeout=300)
  expected = xla_cpu.host_tool_environ(_environ(**env)) or _environ(**env)
  assert done.stdout.split() == [str(expected.get(k)) for k in ("LD_PRELOAD", "GLIBC_TUNABLES")]


def test_run_steps_inline_before_and_after_a_backend_starts():
  code = ("from jax._src import xla_bridge; from prompt_tuning_jax import xla_cpu; "
          "print(xla_cpu.run_steps_inline(), xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)")
  assert _run(["-c", code]).stdout.split() == ["True", "False"]
  jnp.zeros(1).block_until_ready()
  assert xla_cpu.run_steps_inline() is False


@pytest.mark.parametrize("reported, expected", [
    ("glibc 2.36", (2, 36)), ("glibc 2.35.1", (2, 35)), ("glibc 2", None), ("glibc x.y", None),
    ("musl 1.2", None), ("", None)])
def test_glibc_version_reads_or_gives_up(monkeypatch, reported, expected):
  monkeypatch.setattr(os, "confstr", lambda name: reported)
  assert xla_cpu._glibc_version() == expected  # pylint: disable=protected-access
