"""XLA:CPU settings for the prompt-tuning steps: per-computation compiler options, and an opt-in
environment for the process. Importing this module changes nothing.

`dot_compiler_options` gives the `jax.jit(compiler_options=...)` of the steps (oneDNN's dots only in
those made of large products: train, eval and scoring, not decoding). On CPU: YNNPACK's fusions off
(its dots ran slower than XLA's own Eigen dots), XLA's `tree_reduction_rewriter` off (the attention
softmax's row reductions ran faster in one pass), and on x86-64 with AVX-512 each dot in oneDNN
(only there did oneDNN's dots run faster). A computation's options override `XLA_FLAGS`, so an
option whose flag the user's `XLA_FLAGS` sets is left out, and the user's flag wins.

XLA:CPU mallocs each step's temporaries and frees them at the step's end; glibc returns blocks that
large to the kernel, which zeroes and faults them in again in every step. Two settings read only at
process start avoid most of that, and are opt-in: gperftools' tcmalloc (`LD_PRELOAD`), which keeps
freed memory for the next step, and glibc's transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). `python -m prompt_tuning_jax.xla_cpu` prints what this
host gains (`host_tool_environ`), and nothing where it gains nothing:

  env $(python -m prompt_tuning_jax.xla_cpu) python -m prompt_tuning_jax.train ...

tcmalloc reuses a step's temporaries only if they are freed before the next step allocates its own;
`run_steps_inline` has JAX's CPU client run each computation in the calling thread, which ensures
it. The measurements behind each setting: `benchmarks/README.md`, "Why these CPU settings".
"""
import ctypes.util
import functools
import os
import platform
import sys
from typing import Any, Mapping, Optional

# `compiler_options` of the steps made of large products on any CPU.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",
               "xla_disable_hlo_passes": "tree_reduction_rewriter"}
# Added on x86-64 CPUs with AVX-512; the user's `XLA_FLAGS` setting either flag keeps both out.
ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def _backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False


def _flags_set(environ: Mapping[str, str]) -> set[str]:
  """The flags (`--name`) that `XLA_FLAGS` sets."""
  return {token.split("=")[0] for token in environ.get("XLA_FLAGS", "").split()}


@functools.cache
def _has_avx512() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return " avx512f" in f.read()
  except OSError:
    return False


def dot_compiler_options(platform_name: Optional[str] = None,
                         environ: Mapping[str, str] = os.environ,
                         cpu_has_avx512: Optional[bool] = None,
                         onednn: bool = True) -> dict[str, Any]:
  """`jax.jit(compiler_options=...)` for a step compiled for `platform_name` (a device's `platform`;
  by default JAX's default backend): on CPU, `CPU_OPTIONS`, and where `onednn` (steps made of large
  products, not decoding's small ones) `ONEDNN_DOTS` on x86-64 with AVX-512, less those whose flags
  the user's `XLA_FLAGS` sets; `{}` elsewhere."""
  if platform_name is None:
    import jax  # pylint: disable=g-import-not-at-top
    platform_name = jax.default_backend()
  if platform_name != "cpu":
    return {}
  user_flags = _flags_set(environ)
  options = {name: value for name, value in CPU_OPTIONS.items() if f"--{name}" not in user_flags}
  if (onednn and platform.machine().lower() in ("x86_64", "amd64")
      and not user_flags & {f"--{name}" for name in ONEDNN_DOTS}
      and (_has_avx512() if cpu_has_avx512 is None else cpu_has_avx512)):
    options.update(ONEDNN_DOTS)
  return options


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> Optional[tuple[int, int]]:
  """`(major, minor)` of this process's glibc, or None for another C library or a version it cannot
  read (then no huge-page tunable is suggested)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def _transparent_huge_pages_mode() -> Optional[str]:
  """The kernel's THP mode (`always`, `madvise` or `never`), or None where it has none."""
  try:
    with open(THP_MODE_PATH) as f:
      text = f.read()
  except OSError:
    return None
  return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def huge_pages_environ(environ: Mapping[str, str], glibc: Optional[tuple[int, int]],
                       thp_mode: Optional[str]) -> Optional[dict[str, str]]:
  """`environ` with glibc's huge-page tunable added, or None where it would change nothing: not
  glibc 2.35+, huge pages not on request (`madvise`), or a `glibc.malloc.hugetlb` tunable chosen."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (glibc is None or glibc < (2, 35) or thp_mode != "madvise"
      or "glibc.malloc.hugetlb" in tunables):
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE])))


@functools.cache
def _tcmalloc_library() -> Optional[str]:
  """The name the loader finds gperftools' tcmalloc by (`libtcmalloc_minimal.so.4`, Debian and
  Ubuntu's `libtcmalloc-minimal4`), or None (also off Linux, where `LD_PRELOAD` is not how a library
  is preloaded)."""
  if not sys.platform.startswith("linux"):
    return None
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def tool_environ(environ: Mapping[str, str], glibc: Optional[tuple[int, int]],
                 thp_mode: Optional[str], tcmalloc: Optional[str]) -> Optional[dict[str, str]]:
  """`environ` with the opt-in settings, or None when they add nothing: `LD_PRELOAD` of the
  `tcmalloc` library (unless None or `LD_PRELOAD` is set) and the huge-page tunable
  (`huge_pages_environ`)."""
  result = huge_pages_environ(environ, glibc, thp_mode)
  if tcmalloc and not environ.get("LD_PRELOAD"):
    result = dict(result or environ, LD_PRELOAD=tcmalloc)
  return result


def host_tool_environ(environ: Mapping[str, str] = os.environ) -> Optional[dict[str, str]]:
  """`tool_environ` for this machine's glibc, kernel and libraries."""
  return tool_environ(environ, _glibc_version(), _transparent_huge_pages_mode(),
                      _tcmalloc_library())


def opt_in_assignments(environ: Mapping[str, str] = os.environ) -> list[str]:
  """`NAME=VALUE` for each variable that `host_tool_environ` sets or changes in `environ`."""
  result = host_tool_environ(environ) or {}
  return [f"{name}={value}" for name, value in result.items() if environ.get(name) != value]


def run_steps_inline() -> bool:
  """Has JAX's CPU client run each single-device computation in the calling thread, which then frees
  the computation's temporaries before the call returns (`jax_cpu_enable_async_dispatch=False`).
  Returns False, changing nothing, once JAX has started a backend (the client is made by then)."""
  if _backends_started():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


if __name__ == "__main__":
  for assignment in opt_in_assignments():
    print(assignment)
