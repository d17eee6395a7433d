"""Run reports: `python -m prompt_tuning_jax.report MODEL_DIR` draws a run's curves and sums it up.

Reads `MODEL_DIR/train_metrics.jsonl` (rows `{"step", "kind", ...}`, see `metrics_logging`) or, when
it is missing, the TensorBoard events under `MODEL_DIR/train`, and writes

  report.png  the training loss (and eval loss), the learning rate and each eval metric per step;
  report.md   the best step and metric, the final losses, the prompt's shape and L2 norm, examples/s.

  python -m prompt_tuning_jax.report MODEL_DIR [--output_dir DIR] [--metric accuracy]

The best step is the one in `MODEL_DIR/best/best.json` when the run kept a best prompt
(`EvalConfig.best_metric`), else the best value of `--metric` (default: the first task metric) in
the eval rows. Bad input ends with one line, `error: ...`, and exit status 2.
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import re
import statistics
import sys
from typing import Optional, Sequence

from matplotlib import figure as figure_lib
from matplotlib import ticker
import numpy as np

METRICS_FILE = "train_metrics.jsonl"
BEST_FILE = os.path.join("best", "best.json")
PROMPT_FILE = "encoder.prompt.prompt.prompt"
TRAIN, EVAL = "train", "eval"
# Metrics where lower is better; every other eval metric is taken as higher-is-better.
LOWER_IS_BETTER = ("loss", "loss_per_token", "invalid_prediction_rate")
_NUMPY_STEP = re.compile(r"checkpoint_(\d+)")

# {kind: {metric: [(step, value), ...]}}; kind is "train", "eval" or "eval/<task>".
Curves = dict[str, dict[str, list[tuple[int, float]]]]


@dataclasses.dataclass(frozen=True)
class Best:
  step: int
  metric: str
  value: float
  kind: str


def read_jsonl(path: str) -> Curves:
  """The numeric curves in a `train_metrics.jsonl` file; a repeated step keeps its last row."""
  curves: Curves = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        metrics = curves.setdefault(row.pop("kind", TRAIN), {})
        step = int(row.pop("step"))
        for name, value in row.items():
          if isinstance(value, (int, float)) and not isinstance(value, bool):  # skips e.g. hashes
            metrics.setdefault(name, []).append((step, float(value)))
  return {kind: {name: sorted(dict(points).items()) for name, points in metrics.items()}
          for kind, metrics in curves.items()}


def read_tensorboard(log_dir: str) -> Curves:
  """The scalar curves in TensorBoard event files; tag `a/b/name` is metric `name` of kind `a/b`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (only this fallback needs it)
  curves: Curves = {}
  for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        kind, _, name = value.tag.rpartition("/")
        scalar = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
        curves.setdefault(kind or TRAIN, {}).setdefault(name, []).append((event.step, scalar))
  return {kind: {name: sorted(dict(points).items()) for name, points in metrics.items()}
          for kind, metrics in curves.items()}


def read_curves(model_dir: str) -> Curves:
  """The run's metrics from its JSON-lines file, else from its TensorBoard events."""
  jsonl = os.path.join(model_dir, METRICS_FILE)
  if os.path.isfile(jsonl):
    return read_jsonl(jsonl)
  curves = read_tensorboard(os.path.join(model_dir, TRAIN))
  if not curves:
    raise FileNotFoundError(f"{model_dir} has no {METRICS_FILE} and no TensorBoard events under "
                            f"{os.path.join(model_dir, TRAIN)}: give the MODEL_DIR of a training run.")
  return curves


def task_kinds(curves: Curves) -> list[str]:
  """The `eval/<task>` kinds, in name order."""
  return sorted(kind for kind in curves if kind.startswith(EVAL + "/"))


def find_best(model_dir: str, curves: Curves, metric: Optional[str] = None) -> Optional[Best]:
  """The best eval step: `best/best.json`'s, else the best value of `metric` among the eval rows."""
  best_file = os.path.join(model_dir, BEST_FILE)
  if metric is None and os.path.isfile(best_file):
    with open(best_file) as f:
      saved = json.load(f)
    kind = next((k for k in task_kinds(curves) if saved["metric"] in curves[k]), EVAL)
    return Best(int(saved["step"]), saved["metric"], float(saved["value"]), kind)
  candidates = [(kind, name) for kind in task_kinds(curves) + [EVAL] if kind in curves
                for name in curves[kind] if metric in (None, name)]
  if not candidates:
    if metric is not None:
      raise ValueError(f"No eval metric {metric!r} in {model_dir}; it has "
                       f"{ {k: sorted(curves[k]) for k in curves if k != TRAIN} }.")
    return None
  kind, name = candidates[0]
  sign = -1.0 if name in LOWER_IS_BETTER else 1.0
  step, value = max(curves[kind][name], key=lambda point: (sign * point[1], -point[0]))
  return Best(step, name, value, kind)


def latest_prompt(model_dir: str) -> Optional[tuple[int, np.ndarray]]:
  """(step, prompt) of the latest numpy checkpoint, or None."""
  numpy_dir = os.path.join(model_dir, "numpy_checkpoints")
  steps = [int(m.group(1)) for m in map(_NUMPY_STEP.fullmatch, os.listdir(numpy_dir)) if m] \
      if os.path.isdir(numpy_dir) else []
  for step in sorted(steps, reverse=True):
    path = os.path.join(numpy_dir, f"checkpoint_{step}", PROMPT_FILE)
    if os.path.isfile(path):
      return step, np.load(path)
  return None


def examples_per_second(curves: Curves) -> Optional[float]:
  """The median training throughput, leaving out the first log window (it includes compilation)."""
  points = curves.get(TRAIN, {}).get("examples_per_second", [])
  values = [value for _, value in points[1:] or points]
  return statistics.median(values) if values else None


def plot(curves: Curves, best: Optional[Best], path: str, title: str) -> None:
  """The PNG: train loss, learning rate, eval loss, and a panel per eval metric (a line per task)."""
  train = curves.get(TRAIN, {})
  panels: list[tuple[str, list[tuple[str, list[tuple[int, float]]]]]] = []
  panels.append(("train loss", [("train loss", train["loss"])] if "loss" in train else []))
  if "learning_rate" in train:
    panels.append(("learning rate", [("learning rate", train["learning_rate"])]))
  for name in ("loss_per_token", "token_accuracy"):
    if name in curves.get(EVAL, {}):
      panels.append((f"eval {name.replace('_', ' ')}", [("eval", curves[EVAL][name])]))
  names = sorted({name for kind in task_kinds(curves) for name in curves[kind]})
  for name in names:
    lines = [(kind.partition("/")[2], curves[kind][name]) for kind in task_kinds(curves)
             if name in curves[kind]]
    panels.append((f"eval {name}", lines))

  columns = min(3, len(panels))
  rows = math.ceil(len(panels) / columns)
  # A Figure without pyplot: no global backend or state, so notebooks keep their own backend.
  figure = figure_lib.Figure(figsize=(5 * columns, 3.4 * rows))
  axes = figure.subplots(rows, columns, squeeze=False)
  for axis, (panel_title, lines) in zip(axes.flat, panels):
    for label, points in lines:
      steps, values = zip(*points)
      axis.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=label)
    if best is not None and panel_title == f"eval {best.metric}":
      axis.axvline(best.step, color="gray", linestyle="--", linewidth=1,
                   label=f"best (step {best.step})")
    axis.set_title(panel_title)
    axis.set_xlabel("step")
    axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    if len(lines) > 1 or (best is not None and panel_title == f"eval {best.metric}"):
      axis.legend(fontsize=8)
  for axis in list(axes.flat)[len(panels):]:
    axis.set_visible(False)
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def _last(curves: Curves, kind: str, name: str) -> Optional[tuple[int, float]]:
  points = curves.get(kind, {}).get(name)
  return points[-1] if points else None


def summary(model_dir: str, curves: Curves, best: Optional[Best], image_name: str) -> str:
  """The markdown summary."""
  rows = []
  last_train = _last(curves, TRAIN, "loss")
  if last_train:
    rows.append(("steps", f"{last_train[0]}"))
  if best is not None:
    task = best.kind.partition("/")[2]
    rows.append(("best step", f"{best.step}"))
    rows.append((f"best {best.metric}", f"{best.value:.4g}" + (f" ({task})" if task else "")))
  elif task_kinds(curves) or EVAL in curves:
    rows.append(("best step", "unknown: no eval metric"))
  else:
    rows.append(("best step", "no evaluation in this run (EVAL_PERIOD = 0)"))
  if last_train:
    rows.append(("final train loss", f"{last_train[1]:.4g} (step {last_train[0]})"))
  last_eval = _last(curves, EVAL, "loss_per_token")
  if last_eval:
    rows.append(("final eval loss per token", f"{last_eval[1]:.4g} (step {last_eval[0]})"))
  for kind in task_kinds(curves):
    for name, points in sorted(curves[kind].items()):
      rows.append((f"final {name} ({kind.partition('/')[2]})",
                   f"{points[-1][1]:.4g} (step {points[-1][0]})"))
  prompt = latest_prompt(model_dir)
  if prompt is not None:
    step, array = prompt
    norms = np.linalg.norm(array, axis=-1)
    rows.append(("prompt", f"{list(array.shape)}, L2 norm {np.linalg.norm(array):.4g}, per position "
                           f"mean {norms.mean():.4g} (step {step})"))
  speed = examples_per_second(curves)
  if speed is not None:
    rows.append(("examples/s", f"{speed:.4g} (median over log windows)"))
  table = "\n".join(f"| {name} | {value} |" for name, value in rows)
  return (f"# Run report: {os.path.abspath(model_dir)}\n\n![curves]({image_name})\n\n"
          f"| | |\n| --- | --- |\n{table}\n")


def write_report(model_dir: str, output_dir: Optional[str] = None,
                 metric: Optional[str] = None) -> tuple[str, str]:
  """Writes `report.png` and `report.md` to `output_dir` (default MODEL_DIR); returns their paths."""
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"MODEL_DIR {model_dir!r} is not a directory.")
  output_dir = output_dir or model_dir
  curves = read_curves(model_dir)
  best = find_best(model_dir, curves, metric)
  os.makedirs(output_dir, exist_ok=True)
  image = os.path.join(output_dir, "report.png")
  markdown = os.path.join(output_dir, "report.md")
  plot(curves, best, image, os.path.basename(os.path.abspath(model_dir)))
  with open(markdown, "w") as f:
    f.write(summary(model_dir, curves, best, os.path.relpath(image, output_dir)))
  return image, markdown


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (0, or 2 with one `error:` line on bad input)."""
  parser = argparse.ArgumentParser(prog="prompt-tuning-report", allow_abbrev=False,
                                   description=__doc__.splitlines()[0])
  parser.add_argument("model_dir", help="the MODEL_DIR of a training run")
  parser.add_argument("--output_dir", help="where to write report.png and report.md (default: "
                                           "MODEL_DIR)")
  parser.add_argument("--metric", help="the eval metric that picks the best step (default: the "
                                       "run's best_metric, else the first task metric)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    image, markdown = write_report(args.model_dir, args.output_dir, args.metric)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {image} and {markdown}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
