"""XLA:CPU's settings for the prompt-tuning step, applied when the package is imported.

jaxlib 0.10's XLA:CPU hands dots and the elementwise work around them to YNNPACK fusions. On the
T5 1.1 Small prompt-tuning step (batch 32, 228 encoder positions, 2 cores) those fusions ran the
large dots at about half the speed of XLA's own Eigen dots, and the step took 1.2x as long
(`benchmarks/train_benchmark.py`). We turn them off with `--xla_cpu_experimental_ynn_fusion_type=`
unless the user's `XLA_FLAGS` already says otherwise. XLA reads its flags once, when JAX first opens
a backend, so a process that computed with JAX before importing this package keeps its settings.
GPU and TPU runs ignore the flag.
"""
import os
import sys
from typing import MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False


def prefer_xla_dots(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds `--xla_cpu_experimental_ynn_fusion_type=` to `XLA_FLAGS`; returns whether it did.

  Leaves the flags alone when the user set the YNNPACK flag (any value) or JAX already started.
  """
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FUSION_FLAG in flags or _backends_started():
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}=".strip()
  return True
