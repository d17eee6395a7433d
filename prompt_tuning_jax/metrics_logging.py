"""Where training metrics go: TensorBoard, a JSON-lines file, and the terminal.

A run opens with one line saying what it trains, on what and where (`log_run_start`). On a terminal
a tqdm progress bar shows loss and throughput; elsewhere (CI, a pod's log) each log period is one
plain line. Only process 0 writes.
"""
import json
import logging
import os
import sys
from typing import Mapping, Optional

import jax
import tensorflow as tf
import tqdm

logger = logging.getLogger("prompt_tuning_jax")


def log_run_start(task: str, model: str, what: str, train_steps: int,
                  batch_size: int, mesh: jax.sharding.Mesh, attention: str, model_dir: str) -> None:
  """Logs the run's opening line (process 0): what trains (`methods.Method.description`), the
  task, the model in a few words (`architectures.*.describe`: its dimensions), the steps, the
  global batch, the mesh and its devices, the attention implementation and MODEL_DIR."""
  if jax.process_index() != 0:
    return
  data, model_axis = mesh.devices.shape
  logger.info(
      "Training %s on %s: %s; %s steps of global batch %d; mesh %dx%d (data x model) of %d %s "
      "device(s); attention %r; MODEL_DIR %s", what, task, model, f"{train_steps:,}", batch_size,
      data, model_axis, mesh.devices.size, mesh.devices.flat[0].platform, attention, model_dir)


class MetricsLogger:
  """Writes `{name: value}` per step to `MODEL_DIR/train` (TensorBoard) and `train_metrics.jsonl`."""

  def __init__(self, model_dir: str, total_steps: int, start_step: int = 0,
               progress_bar: Optional[bool] = None):
    self.primary = jax.process_index() == 0
    self.path = os.path.join(model_dir, "train_metrics.jsonl")
    self._writer = tf.summary.create_file_writer(os.path.join(model_dir, "train")) \
        if self.primary else None
    use_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) \
        if use_bar and self.primary else None

  def write(self, step: int, metrics: Mapping[str, float], kind: str = "train"):
    """Records `metrics` at `step`; `kind` separates train from eval in the JSON file."""
    if not self.primary:
      return
    row = {"step": step, "kind": kind, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    with self._writer.as_default(step=step):
      for name, value in metrics.items():
        tf.summary.scalar(name if kind == "train" else f"{kind}/{name}", float(value))
    self._writer.flush()
    if kind == "train":
      self._show(step, metrics)
    else:
      text = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
      (self._bar.write if self._bar else logger.info)(f"step {step} {kind}: {text}")

  def record(self, step: int, values: Mapping[str, float], kind: str):
    """Adds a row to `train_metrics.jsonl` only (e.g. debugging data, not for TensorBoard)."""
    if self.primary:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")

  def _show(self, step: int, metrics: Mapping[str, float]):
    summary = {k: f"{metrics[k]:.4g}" for k in ("loss", "accuracy", "examples_per_second")
               if k in metrics}
    if self._bar is not None:
      self._bar.set_postfix(summary, refresh=False)
      self._bar.update(step - self._bar.n)
    else:
      logger.info("step %d: %s", step, ", ".join(f"{k}={v}" for k, v in summary.items()))

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()
