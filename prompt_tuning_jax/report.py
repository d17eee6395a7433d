"""Run reports: `python -m prompt_tuning_jax.report MODEL_DIR` draws a run's curves and sums it up.

Reads `MODEL_DIR/train_metrics.jsonl` (rows `{"step", "kind", ...}`, see `metrics_logging`) or, when
it is missing, the TensorBoard events under `MODEL_DIR/train`, and writes

  report.png  per training step: the train loss and the prompt's gradient norm (each logged batch
              and a moving average), the eval loss per token and token accuracy, and each task
              metric; the learning rate too when it changes (a constant one is named in a title);
              the title names the task and the model (from `MODEL_DIR/run_config.json`);
  report.md   the best step and metric, the train loss at the start and end, the final losses and
              metrics, the prompt's shape and norms, examples/s: each row says what its number is.

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
from typing import Any, Optional, Sequence

from matplotlib import figure as figure_lib
from matplotlib import ticker
import numpy as np

METRICS_FILE = "train_metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"
# `losses.NUM_REAL_TARGET_TOKENS`, spelled out so that drawing a report does not import JAX.
PER_TOKEN_FACTOR = "NUM_REAL_TARGET_TOKENS"
BEST_FILE = os.path.join("best", "best.json")
PROMPT_FILE = "encoder.prompt.prompt.prompt"
TRAIN, EVAL = "train", "eval"
# Metrics where lower is better; every other eval metric is taken as higher-is-better.
LOWER_IS_BETTER = ("loss", "loss_per_token", "invalid_prediction_rate")
_NUMPY_STEP = re.compile(r"checkpoint_(\d+)")
_TASK_METRIC_MEANINGS = {
    "accuracy": "percent of the eval split's decoded answers that are the target",
    "invalid_prediction_rate": "percent of the eval split's decoded answers that are none of the "
                               "task's labels",
}

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


def read_run_config(model_dir: str) -> dict[str, Any]:
  """`MODEL_DIR/run_config.json` (the run's task, model and settings), or {} when it is missing."""
  path = os.path.join(model_dir, RUN_CONFIG_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def describe_run(model_dir: str, run_config: dict[str, Any]) -> str:
  """`task | model (embed, layers) | prompt P x E | directory`, as far as the run config says."""
  parts = [run_config["mixture_or_task_name"]] if "mixture_or_task_name" in run_config else []
  model = run_config.get("model_config")
  if model:
    path = run_config.get("initial_checkpoint_path")
    names = (path or "").rstrip("/").split("/")
    # `.../t5_1_1_lm100k_base/checkpoint_1100000` is named by its model directory too.
    name = ("random T5" if path is None else
            "/".join(names[-2:]) if names[-1].startswith("checkpoint_") else names[-1])
    parts.append(f"{name} (embed {model['emb_dim']}, {model['num_encoder_layers']}+"
                 f"{model['num_decoder_layers']} layers)")
    method = run_config.get("method") or {"name": "prompt_tuning"}
    if method["name"] != "prompt_tuning":
      parts.append(method["name"])
    if "prompt_length" in run_config and method.get("input_prompt", True):
      parts.append(f"prompt {run_config['prompt_length']} x {model['emb_dim']}")
  parts.append(os.path.basename(os.path.abspath(model_dir)))
  return " | ".join(parts)


def train_loss_unit(run_config: dict[str, Any]) -> str:
  """What the logged train loss is a sum or mean of, from the run's `loss_normalizing_factor`."""
  factor = run_config.get("loss_config", {}).get("loss_normalizing_factor")
  if factor is None:
    return "summed over the batch's target tokens"
  if factor == PER_TOKEN_FACTOR:
    return "per target token"
  return f"summed over the batch's target tokens, divided by {factor:g}"


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
  """The mean of the `window` values centred on each point (fewer at either end), so that the trend
  is not drawn late."""
  values = np.asarray(values, np.float64)
  total = np.concatenate([[0.0], np.cumsum(values)])
  index = np.arange(len(values))
  starts = np.maximum(index - window // 2, 0)
  ends = np.minimum(index + (window - 1) // 2 + 1, len(values))
  return (total[ends] - total[starts]) / (ends - starts)


def smoothing_window(num_points: int) -> int:
  """A tenth of the points, at least 3: wide enough to show a trend through batch noise."""
  return max(3, num_points // 10)


@dataclasses.dataclass
class Panel:
  """One panel of the PNG: its lines `(label, [(step, value), ...])` against the training step."""
  title: str
  ylabel: str
  lines: list[tuple[str, list[tuple[int, float]]]]
  bounds: Optional[tuple[float, float]] = None  # the y range of a bounded quantity (%, fraction)
  smooth: bool = False  # also draw the moving average of a noisy per-batch series


def _constant(points: Sequence[tuple[int, float]]) -> Optional[float]:
  """The value of a series that never changes, else None."""
  values = [value for _, value in points]
  return values[0] if values and max(values) == min(values) else None


def panels(curves: Curves, run_config: dict[str, Any]) -> list[Panel]:
  """What `plot` draws: train loss (and learning rate unless it is constant), gradient norm, eval
  loss and token accuracy, and one panel per task metric with a line per task."""
  train = curves.get(TRAIN, {})
  result = []
  rate = train.get("learning_rate", [])
  constant_rate = _constant(rate)
  if "loss" in train:
    title = "train loss" + (f" (learning rate {constant_rate:g}, constant)"
                            if constant_rate is not None else "")
    result.append(Panel(title, f"loss, {train_loss_unit(run_config)}",
                         [("logged batch", train["loss"])], smooth=True))
  if rate and constant_rate is None:
    result.append(Panel("learning rate", "learning rate", [("learning rate", rate)]))
  if "grad_norm" in train:
    result.append(Panel("gradient norm", "L2 norm of the prompt's gradient",
                         [("logged batch", train["grad_norm"])], smooth=True))
  evals = curves.get(EVAL, {})
  if "loss_per_token" in evals:
    result.append(Panel("eval loss", "cross-entropy, nats per target token",
                         [("eval split", evals["loss_per_token"])]))
  if "token_accuracy" in evals:
    result.append(Panel("eval token accuracy", "fraction of target tokens right",
                         [("eval split", evals["token_accuracy"])], bounds=(0.0, 1.0)))
  for name in sorted({name for kind in task_kinds(curves) for name in curves[kind]}):
    lines = [(kind.partition("/")[2], curves[kind][name]) for kind in task_kinds(curves)
             if name in curves[kind]]
    values = [value for _, points in lines for _, value in points]
    # Task metrics are percentages (T5's convention, kept by every task here).
    bounds = (0.0, 100.0) if all(0.0 <= value <= 100.0 for value in values) else None
    result.append(Panel(f"eval {name}", f"{name} (%)" if bounds else name, lines, bounds))
  return result


def _set_y_limits(axis, panel: Panel) -> None:
  """Bounded quantities show their whole range; a flat series gets a range around its value rather
  than matplotlib's +-0.05, and no tick offset."""
  values = [value for _, points in panel.lines for _, value in points]
  margin = 0.04
  if panel.bounds is not None:
    low, high = panel.bounds
    axis.set_ylim(low - margin * (high - low), high + margin * (high - low))
  elif values and max(values) - min(values) <= 1e-6 * max(1.0, abs(max(values))):
    half = max(0.1 * abs(values[0]), 0.5)
    axis.set_ylim(values[0] - half, values[0] + half)
  axis.ticklabel_format(axis="y", useOffset=False)


def plot(curves: Curves, best: Optional[Best], path: str, title: str,
         run_config: Optional[dict[str, Any]] = None) -> figure_lib.Figure:
  """Writes the PNG, a panel per quantity (`panels`) on the run's step axis, with units on both
  axes; returns the figure."""
  drawn = panels(curves, run_config or {})
  if not drawn:
    raise ValueError(f"No curves to draw for {title}: the run logged no metrics yet.")
  last_step = max(step for metrics in curves.values() for points in metrics.values()
                  for step, _ in points)
  columns = min(3, len(drawn))
  rows = math.ceil(len(drawn) / columns)
  # A Figure without pyplot: no global backend or state, so notebooks keep their own backend.
  figure = figure_lib.Figure(figsize=(5.2 * columns, 3.6 * rows + 0.4))
  axes = figure.subplots(rows, columns, squeeze=False)
  for axis, panel in zip(axes.flat, drawn):
    for label, points in panel.lines:
      steps, values = zip(*points)
      few = len(points) < 20
      line, = axis.plot(steps, values, marker="o" if few else None, markersize=3, label=label,
                        alpha=0.35 if panel.smooth and not few else 1.0,
                        linewidth=1 if panel.smooth else 1.5)
      if panel.smooth and len(points) >= 6:
        window = smoothing_window(len(points))
        axis.plot(steps, moving_average(values, window), color=line.get_color(), linewidth=2,
                  label=f"moving average of {window}")
    is_best = best is not None and panel.title == f"eval {best.metric}"
    if is_best:
      axis.axvline(best.step, color="gray", linestyle="--", linewidth=1,
                   label=f"best (step {best.step})")
    axis.set_title(panel.title, fontsize=10)
    axis.set_xlabel("training step")
    axis.set_ylabel(panel.ylabel, fontsize=9)
    axis.set_xlim(0, last_step * 1.03 + 1)
    axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    _set_y_limits(axis, panel)
    axis.grid(alpha=0.3)
    if len(axis.get_lines()) > 1:
      axis.legend(fontsize=8)
  for axis in list(axes.flat)[len(drawn):]:
    axis.set_visible(False)
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  return figure


def _last(curves: Curves, kind: str, name: str) -> Optional[tuple[int, float]]:
  points = curves.get(kind, {}).get(name)
  return points[-1] if points else None


def first_and_last_tenth(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
  """Mean value over the first and over the last 10% of the steps; an empty window takes the nearest
  logged step."""
  last_step = points[-1][0]
  first = [value for step, value in points if step <= max(last_step / 10, points[0][0])]
  last = [value for step, value in points if step >= last_step * 9 / 10]
  return statistics.fmean(first), statistics.fmean(last)


def summary(model_dir: str, curves: Curves, best: Optional[Best], image_name: str,
            run_config: Optional[dict[str, Any]] = None) -> str:
  """The markdown summary: one row per number, each with what it means."""
  run_config = run_config or {}
  rows = []
  train_loss = curves.get(TRAIN, {}).get("loss", [])
  if train_loss:
    rows.append(("steps", f"{train_loss[-1][0]}", "training steps run (the last logged step)"))
  if best is not None:
    task = best.kind.partition("/")[2]
    source = ("kept in best/best.json by `EvalConfig.best_metric`"
              if os.path.isfile(os.path.join(model_dir, BEST_FILE)) else
              "the best value among the eval rows")
    rows.append(("best step", f"{best.step}", f"the evaluation with the best {best.metric}, "
                                              f"{source}"))
    rows.append((f"best {best.metric}", f"{best.value:.4g}" + (f" ({task})" if task else ""),
                 f"{best.metric} at the best step" + (", in percent" if task else "")))
  elif task_kinds(curves) or EVAL in curves:
    rows.append(("best step", "unknown: no eval metric", ""))
  else:
    rows.append(("best step", "no evaluation in this run (EVAL_PERIOD = 0)", ""))
  unit = train_loss_unit(run_config)
  if train_loss:
    first, last = first_and_last_tenth(train_loss)
    rows.append(("final train loss", f"{train_loss[-1][1]:.4g} (step {train_loss[-1][0]})",
                 f"cross-entropy plus z-loss of the last logged batch, {unit}"))
    rows.append(("train loss, first and last 10% of steps",
                 f"{first:.4g} -> {last:.4g} ({100 * (last - first) / first:+.0f}%)",
                 "mean of the logged batches in the first and in the last tenth of the run"))
  grad_norm = _last(curves, TRAIN, "grad_norm")
  if grad_norm:
    rows.append(("final gradient norm", f"{grad_norm[1]:.4g} (step {grad_norm[0]})",
                 "L2 norm of the loss's gradient with respect to the trained parameters (the prompt), last "
                 "logged batch"))
  last_eval = _last(curves, EVAL, "loss_per_token")
  if last_eval:
    rows.append(("final eval loss per token", f"{last_eval[1]:.4g} (step {last_eval[0]})",
                 "mean cross-entropy (nats) per target token over the eval split, teacher-forced"))
  for kind in task_kinds(curves):
    for name, points in sorted(curves[kind].items()):
      rows.append((f"final {name} ({kind.partition('/')[2]})",
                   f"{points[-1][1]:.4g} (step {points[-1][0]})",
                   _TASK_METRIC_MEANINGS.get(name, f"the task's {name} of the decoded answers on "
                                                   "the eval split, in percent")))
  prompt = latest_prompt(model_dir)
  if prompt is not None:
    step, array = prompt
    norms = np.linalg.norm(array, axis=-1)
    rows.append(("prompt", f"{list(array.shape)}, L2 norm {np.linalg.norm(array):.4g}, "
                           f"per position mean {norms.mean():.4g} (step {step})",
                 "the latest saved prompt: [positions, embed], the L2 norm of the whole array, and "
                 "the mean L2 norm of one position's vector (compare the token embeddings')"))
  speed = examples_per_second(curves)
  if speed is not None:
    rows.append(("examples/s", f"{speed:.4g} (median over log windows)",
                 "training throughput; the first window, which includes compiling, is left out"))
  table = "\n".join(f"| {name} | {value} | {meaning} |" for name, value, meaning in rows)
  return (f"# Run report: {describe_run(model_dir, run_config)}\n\n"
          f"MODEL_DIR: `{os.path.abspath(model_dir)}`\n\n![curves]({image_name})\n\n"
          f"| | value | what it is |\n| --- | --- | --- |\n{table}\n")


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
  run_config = read_run_config(model_dir)
  plot(curves, best, image, describe_run(model_dir, run_config), run_config)
  with open(markdown, "w") as f:
    f.write(summary(model_dir, curves, best, os.path.relpath(image, output_dir), run_config))
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
