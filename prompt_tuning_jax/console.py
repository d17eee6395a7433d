"""A quiet console for the command-line tools: no TensorFlow, CUDA, gRPC or absl start-up noise.

TensorFlow logs from its C++ libraries while they load (absl's "before InitializeLog" warning,
oneDNN, "Could not find cuda drivers") and CUDA's `cuInit` failure when it first lists devices; it
reads its log level, as gRPC its verbosity, from the environment. So before anything imports
TensorFlow a tool sets those variables, loads TensorFlow with its stderr held back and passed on
without the known start-up lines, hides the accelerators from it (it only reads data here, and on a
GPU host it would take the GPU's memory from JAX) and gives the log lines a plain format.

Importing the package changes nothing (a library leaves its importer's process alone): a tool's
`main`, decorated with `command`, does this only as the process's own command line, and the tool
modules import `cli` inside `main`. A user who sets `TF_CPP_MIN_LOG_LEVEL` sees TensorFlow's logs
at that level, but for the start-up lines.
"""
import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterator, Optional, Sequence

# Set for a tool's process unless already set.
ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's and XLA's C++ logs: errors only
    "GRPC_VERBOSITY": "ERROR",
}
# What TensorFlow prints while it loads and lists its devices, whatever the level.
_START_UP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cuda_platform|cuda_executor|cuda_diagnostics)"
    r"\.cc:\d+\]")
# Library log lines that say nothing to a user of the tools.
_QUIET_MESSAGES = ("Given sequence lengths *may be* insufficient",)  # seqio, at each evaluation
PACKAGE_LOGGER = "prompt_tuning_jax"


def command(main: Callable[[Optional[Sequence[str]]], Any]) -> Callable[..., Any]:
  """A tool's `main(argv=None)`, quiet as the process's own command line (`argv` None: `python -m`,
  the console scripts), then run as `cli.command` runs it; `cli` is imported only then."""
  @functools.wraps(main)
  def quiet_main(argv: Optional[Sequence[str]] = None) -> Any:
    if argv is None:
      quiet()
    from prompt_tuning_jax import cli  # pylint: disable=g-import-not-at-top (after `quiet`)
    return cli.command(main)(argv)
  return quiet_main


def quiet() -> None:
  """Makes this process's console quiet; call before anything imports TensorFlow."""
  for name, value in ENVIRONMENT.items():
    os.environ.setdefault(name, value)
  handler = logging.StreamHandler()  # before a library's basicConfig adds one of its own
  handler.setFormatter(_Formatter())
  handler.addFilter(lambda record: not record.getMessage().startswith(_QUIET_MESSAGES))
  logging.root.addHandler(handler)
  logging.getLogger(PACKAGE_LOGGER).setLevel(logging.INFO)
  with _without_start_up_noise():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")


class _Formatter(logging.Formatter):
  """The package's lines as they are (`warning: ...` above INFO); other libraries' named."""

  def format(self, record: logging.LogRecord) -> str:
    message = super().format(record)
    if record.name.split(".")[0] != PACKAGE_LOGGER:
      return f"{record.levelname.lower()}: {record.name}: {message}"
    return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


@contextlib.contextmanager
def _without_start_up_noise() -> Iterator[None]:
  """File descriptor 2 goes to a file while the context runs; at its end the file's lines go to
  stderr, but for those `_START_UP_NOISE` matches."""
  sys.stderr.flush()
  with tempfile.TemporaryFile() as held:
    saved = os.dup(2)
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      lines = held.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if not _START_UP_NOISE.match(line)))
      sys.stderr.flush()
