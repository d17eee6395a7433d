"""XLA:CPU's settings for the prompt-tuning step, applied when the package is imported.

Two XLA flags, each added to `XLA_FLAGS` unless the user's own `XLA_FLAGS` already sets that flag
(`xla_cpu_flags`), measured on the T5 1.1 Small prompt-tuning step (batch 32, 228 encoder positions,
2 cores, `benchmarks/train_benchmark.py`):
  - `--xla_cpu_experimental_ynn_fusion_type=`: jaxlib 0.10's XLA:CPU hands dots and the elementwise
    work around them to YNNPACK fusions, which ran the large dots at about half the speed of XLA's own
    Eigen dots: the step took 1.2x as long with them on an older AMD EPYC, and 1.14x as long with
    YNNPACK's dots alone on a Zen 5 one (1.36x with its elementwise fusions too).
  - `--xla_disable_hlo_passes=tree_reduction_rewriter`: that pass splits every reduction into a
    `reduce-window` and a second reduce; the attention softmax's row reductions ran faster as one
    pass, and the step ran 1.03-1.04x faster on the Zen 5 machine (no change on the older one).
XLA reads its flags once, when JAX first opens a backend, so a process that computed with JAX before
importing this package keeps its settings. GPU runs ignore both (XLA:GPU's reduction pass is named
`tree-reduction-rewriter`).

The train, eval and scoring steps also compile with `dot_compiler_options`: on x86-64 CPUs with
AVX-512, each dot runs in oneDNN instead of Eigen. On the Zen 5 machine, alone, the step's large
products ran 1.1x as fast (463-484 against 417-449 GFLOP/s) and its batched attention products up to
twice as fast (Eigen gives each of their small products one thread); the whole step 1.03-1.07x, and
1.10-1.12x with the attention core in two batch chunks (`T5Config.attention_chunks`). Greedy decoding,
whose steps are small products, ran 1.13-1.17x slower with it, so decoding keeps Eigen. On the earlier
2-core EPYC (half this one's matmul peak; its vector extensions were not recorded), oneDNN's large dots
were slower than Eigen's, 164 against 196 GFLOP/s, so the options apply only where AVX-512 is, as on
the machine that measured them faster. A user's `XLA_FLAGS` that set either oneDNN flag keep their
choice.

XLA:CPU also allocates each step's temporaries (2.2 GiB for that step) with malloc and frees them at
the step's end; glibc hands blocks that large to mmap and munmap, so every step page-faults them in
again, 4 KiB at a time: 620,000 faults and about 1 s of kernel time a step. glibc 2.35+ can ask the
kernel for transparent huge pages on those blocks (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): 12,000
faults, and the step 11% faster at the same peak RSS. An allocator that keeps what a step frees,
gperftools' tcmalloc, removes the faults altogether (the kernel's share of the step's CPU time, most
of it zeroing pages, was 7% on the Zen 5 machine), provided the next step's temporaries are
allocated only after the last step's are freed. JAX's CPU client runs a computation on a worker
thread by default, and frees its temporaries there after the caller has seen its results, so the next
step's allocation sometimes came first and tcmalloc then held two sets (5.3 GiB instead of 3.1).
`run_steps_inline` has the client run each single-device computation in the calling thread, freeing
its temporaries before it returns. glibc reads tunables and the loader reads `LD_PRELOAD` only at
start-up, so when one of our command-line tools (`prompt-tuning-*`, `python -m
prompt_tuning_jax.<tool>`) imports the package it runs itself again with both (`tool_environ`):
tcmalloc where the system has it (`libtcmalloc_minimal`, Debian and Ubuntu's `libtcmalloc-minimal4`)
and `LD_PRELOAD` is not already set, and the huge-page tunable on glibc 2.35+ whose huge pages are
on request (`madvise`, the common default); then it runs its steps inline (`prepare_tool_process`).
`PROMPT_TUNING_JAX_TCMALLOC=0` keeps the system's malloc, `PROMPT_TUNING_JAX_HUGE_PAGES=0` (or any
`glibc.malloc.hugetlb` tunable) keeps glibc's pages as they are. A library user sets these variables
themselves before starting Python, and calls `run_steps_inline()` before JAX computes anything.
"""
import ctypes.util
import functools
import os
import platform
import sys
from typing import Any, Mapping, MutableMapping, Optional, Sequence

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DISABLED_PASSES_FLAG = "--xla_disable_hlo_passes"
# XLA flag -> the value we set where the user's `XLA_FLAGS` does not set that flag.
CPU_FLAGS = {YNN_FUSION_FLAG: "", DISABLED_PASSES_FLAG: "tree_reduction_rewriter"}


# `compiler_options` of the programs made of large products, where `dot_compiler_options` applies them.
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


def xla_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
  """Adds each of `CPU_FLAGS` that the user's `XLA_FLAGS` does not set; returns those it added.

  Adds nothing once JAX has started a backend (XLA has read its flags by then).
  """
  if _backends_started():
    return []
  flags = environ.get("XLA_FLAGS", "")
  set_by_user = _flags_set(environ)
  added = [f"{flag}={value}" for flag, value in CPU_FLAGS.items() if flag not in set_by_user]
  if added:
    environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
  return added


@functools.cache
def _has_avx512() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return " avx512f" in f.read()
  except OSError:
    return False


def dot_compiler_options(platform_name: Optional[str] = None,
                         environ: Mapping[str, str] = os.environ,
                         cpu_has_avx512: Optional[bool] = None) -> dict[str, Any]:
  """`jax.jit(compiler_options=...)` for a step made of large products compiled for `platform_name`
  (a device's `platform`; by default JAX's default backend): `ONEDNN_DOTS` on an x86-64 CPU with
  AVX-512, unless the user's `XLA_FLAGS` sets either flag; `{}` elsewhere."""
  if platform_name is None:
    import jax  # pylint: disable=g-import-not-at-top
    platform_name = jax.default_backend()
  if platform_name != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
    return {}
  if _flags_set(environ) & {f"--{name}" for name in ONEDNN_DOTS}:
    return {}
  if not (_has_avx512() if cpu_has_avx512 is None else cpu_has_avx512):
    return {}
  return dict(ONEDNN_DOTS)


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_OPT_OUT = "PROMPT_TUNING_JAX_HUGE_PAGES"
THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> Optional[tuple[int, int]]:
  """`(major, minor)` of this process's glibc, or None for another C library or a version it cannot
  read (then the tools start as they are)."""
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


def is_command_line_tool(argv: Sequence[str]) -> bool:
  """Whether an interpreter command line (`sys.orig_argv`) runs one of our tools: `-m
  prompt_tuning_jax.<tool>` or a `prompt-tuning-*` script."""
  args = iter(argv[1:])
  for arg in args:
    if arg == "-m" or (arg.startswith("-m") and not arg.startswith("--")):
      return (next(args, "") if arg == "-m" else arg[2:]).startswith("prompt_tuning_jax.")
    if arg in ("-X", "-W"):
      next(args, None)
    elif arg.startswith("-c") or arg == "-":
      return False
    elif not arg.startswith("-"):
      return os.path.basename(arg).startswith("prompt-tuning-")
  return False


def huge_pages_environ(environ: Mapping[str, str], glibc: Optional[tuple[int, int]],
                       thp_mode: Optional[str]) -> Optional[dict[str, str]]:
  """`environ` with glibc's huge-page tunable added, or None when the process should stay as it is:
  not glibc 2.35+, huge pages not on request, the tunable already chosen, or the user's opt-out."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (glibc is None or glibc < (2, 35) or thp_mode != "madvise"
      or "glibc.malloc.hugetlb" in tunables or environ.get(HUGE_PAGES_OPT_OUT) == "0"):
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE])))


TCMALLOC_OPT_OUT = "PROMPT_TUNING_JAX_TCMALLOC"


@functools.cache
def _tcmalloc_library() -> Optional[str]:
  """The name the loader finds gperftools' tcmalloc by (`libtcmalloc_minimal.so.4`), or None (also
  off Linux, where `LD_PRELOAD` is not how a library is preloaded)."""
  if not sys.platform.startswith("linux"):
    return None
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def tool_environ(environ: Mapping[str, str], glibc: Optional[tuple[int, int]],
                 thp_mode: Optional[str], tcmalloc: Optional[str]) -> Optional[dict[str, str]]:
  """`environ` with what our tools start with, or None when it adds nothing: `LD_PRELOAD` of the
  `tcmalloc` library (unless None, `LD_PRELOAD` is set, or the user's opt-out) and the huge-page
  tunable (`huge_pages_environ`)."""
  result = huge_pages_environ(environ, glibc, thp_mode)
  if tcmalloc and not environ.get("LD_PRELOAD") and environ.get(TCMALLOC_OPT_OUT) != "0":
    result = dict(result or environ, LD_PRELOAD=tcmalloc)
  return result


def host_tool_environ(environ: Mapping[str, str] = os.environ) -> Optional[dict[str, str]]:
  """`tool_environ` for this machine's glibc, kernel and libraries."""
  return tool_environ(environ, _glibc_version(), _transparent_huge_pages_mode(), _tcmalloc_library())


def run_steps_inline() -> bool:
  """Has JAX's CPU client run each single-device computation in the calling thread, which then frees
  the computation's temporaries before the call returns (`jax_cpu_enable_async_dispatch=False`).
  Returns False, changing nothing, once JAX has started a backend (the client is made by then)."""
  if _backends_started():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def prepare_tool_process() -> None:
  """In one of our command-line tools: replaces the process (same interpreter, arguments and PID) by
  one started with `host_tool_environ` where that adds anything, else runs its steps inline."""
  argv = getattr(sys, "orig_argv", [])
  if not is_command_line_tool(argv) or _backends_started():
    return
  environ = host_tool_environ()
  if environ is None:
    run_steps_inline()
    return
  added = " ".join(f"{k}={environ[k]}" for k in ("LD_PRELOAD", "GLIBC_TUNABLES")
                   if environ.get(k) != os.environ.get(k))
  print(f"prompt_tuning_jax: restarting with {added} (tcmalloc and huge pages for XLA:CPU's "
        f"temporaries; {TCMALLOC_OPT_OUT}=0 or {HUGE_PAGES_OPT_OUT}=0 keeps the system's)",
        file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], environ)
