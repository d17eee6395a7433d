"""Evaluation through seqio: the task's own postprocessors and metrics over our predictions and scores.

`Predictor` turns a frozen model plus a prompt into seqio's `predict_fn` (decoded tokens) and `score_fn`
(log-likelihood of the targets). Batches are padded to one fixed size so each function compiles once,
or once per length bucket with `length_buckets`: the examples then go sorted by input length
(`batching.batches_by_length`), and seqio puts the results back in its order by their indices.
`make_evaluator` builds a `seqio.Evaluator` that writes metrics to TensorBoard and, with predictions,
to JSON lines under `log_dir`. `evaluate` announces each evaluation in one line (what it decodes and
scores) and another when it is done; on a terminal a progress bar counts the examples as their
outputs are ready.
"""
import dataclasses
import functools
import logging
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tqdm

from prompt_tuning_jax import architectures, batching, freezing, partitioning
from prompt_tuning_jax.network import T5

DECODING_METHODS = ("greedy", "beam_search", "sample")
_INDEX = "_seqio_index"  # seqio's example index, carried as a feature through the batching

# What each of seqio's model output types does to an example, for the announcement.
_PASS_NAMES = {"PREDICTION": "decoding", "PREDICTION_WITH_AUX": "decoding", "SCORE": "scoring"}

logger = logging.getLogger("prompt_tuning_jax")


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How `predict` decodes: `greedy`, `beam_search` (beam_size, alpha) or `sample` (temperature,
  top_k, top_p, seed). `max_decode_length` defaults to the task's target length."""
  method: str = "greedy"
  beam_size: int = 4
  alpha: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  max_decode_length: Optional[int] = None

  def __post_init__(self):
    if self.method not in DECODING_METHODS:
      raise ValueError(f"Unknown decoding method {self.method!r}; use one of {DECODING_METHODS}.")


def _pad_rows(features: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Each `[rows, ...]` feature padded with zero rows to `[batch_size, ...]`."""
  return {k: batching.pad_rows(v, batch_size) for k, v in features.items()}


def _batches(dataset, batch_size: int, length_buckets: Sequence[int]) -> Iterator[dict]:
  """A finite dataset of model features in batches of up to `batch_size` rows: in order at full
  width, or sorted by input length and cut to a bucket (`batching.batches_by_length`)."""
  if not length_buckets:
    return dataset.batch(batch_size).as_numpy_iterator()
  return batching.batches_by_length(dataset.as_numpy_iterator(), batch_size, length_buckets)


def _padded_batches(dataset, batch_size: int, length_buckets: Sequence[int] = ()
                    ) -> Iterator[tuple[np.ndarray, dict, int]]:
  """Yields (indices, features padded to `batch_size` rows, real rows) from seqio's (index, features)."""
  rows = dataset.map(lambda index, features: dict(features, **{_INDEX: index}))
  for features in _batches(rows, batch_size, length_buckets):
    indices = features.pop(_INDEX)
    yield indices, _pad_rows(features, batch_size), len(indices)


class Predictor:
  """seqio `predict_fn`/`score_fn` for `model` with frozen params and the current trainable subtree.

  The model's architecture (`architectures.of`) decodes and scores the features it reads. Decoding
  produces `decoding_config.max_decode_length` tokens, or `targets_length` (the task's), or as many
  as `decoder_target_tokens` is wide (an encoder-decoder's targets). With `length_buckets` (input
  lengths, checked by the caller with `batching.check_length_buckets`) examples go sorted by input
  length, each batch cut to a bucket: one compiled shape a bucket.
  """

  def __init__(self, model: T5, frozen, batch_size: int,
               decoding_config: DecodingConfig = DecodingConfig(),
               length_buckets: Sequence[int] = (), targets_length: Optional[int] = None):
    self.model, self.frozen, self.batch_size = model, frozen, batch_size
    self.decoding_config, self.length_buckets = decoding_config, tuple(length_buckets)
    self.targets_length = targets_length
    self.architecture = architectures.of(model.config)
    self.trainable: Any = {}
    self.progress: Optional[tqdm.tqdm] = None  # counts examples as their outputs are ready
    self._decoders: dict[int, Callable] = {}
    # With several processes jit takes global arrays only. Every process holds the whole eval set
    # (seqio's Evaluator does not shard it): each batch is split over `data` from that full copy and
    # the outputs gathered to every process. `frozen` must then be on the run's mesh.
    self._mesh = None
    jit_kwargs = {}
    if jax.process_count() > 1:
      self._mesh = jax.tree_util.tree_leaves(frozen)[0].sharding.mesh
      partitioning.check_batch_divides(batch_size, self._mesh)
      jit_kwargs = {"out_shardings": partitioning.replicated(self._mesh)}
    self._jit = functools.partial(jax.jit, **jit_kwargs)
    self._score = self._jit(lambda t, f, batch: self.architecture.score(
        model, freezing.merge(t, f), batch), compiler_options=self.architecture.compiler_options())

  def _placed(self, features: Mapping[str, np.ndarray]):
    """The model's features of a batch as the jitted functions take them: as they are, or split
    over `data` (processes)."""
    inputs = {k: v for k, v in features.items() if k in self.architecture.features}
    if self._mesh is None:
      return inputs
    return partitioning.place_on_mesh(inputs, partitioning.batch_sharding(self._mesh))

  def _decoder(self, max_length: int) -> Callable:
    if max_length not in self._decoders:
      run = self.architecture.decoder(self.model, self.decoding_config, max_length)
      self._decoders[max_length] = self._jit(
          lambda t, f, batch: run(freezing.merge(t, f), batch),
          compiler_options=self.architecture.compiler_options(onednn=False))
    return self._decoders[max_length]

  def _count_done(self, pending: Sequence[tuple[np.ndarray, int, Any]], last: bool) -> None:
    """Counts a batch on the progress bar once its outputs are ready: the one before the newest
    (which stays queued, so the device is never idle), or with `last` the newest. Without a bar,
    nothing waits."""
    if self.progress is not None and len(pending) > (0 if last else 1):
      _, real, outputs = pending[-1 if last else -2]
      jax.block_until_ready(outputs)
      self.progress.update(real)

  def predict_fn(self, dataset) -> list[tuple[int, list[int]]]:
    """seqio's predict_fn: (index, decoded token ids, 0-padded after EOS) per example. The rows keep
    one length: seqio stacks them into one array (and its decode stops at EOS)."""
    pending = []  # read back after the loop: the host reads each next batch while the device decodes
    for indices, features, real in _padded_batches(dataset, self.batch_size, self.length_buckets):
      max_length = (self.decoding_config.max_decode_length or self.targets_length
                    or features["decoder_target_tokens"].shape[1])
      pending.append((indices, real, self._decoder(max_length)(
          self.trainable, self.frozen, self._placed(features))))
      self._count_done(pending, last=False)
    self._count_done(pending, last=True)
    return [(int(i), [int(t) for t in row]) for indices, real, tokens in pending
            for i, row in zip(indices, np.asarray(tokens)[:real])]

  def score_fn(self, dataset) -> list[tuple[int, float]]:
    """seqio's score_fn: (index, log-likelihood of the targets) per example."""
    pending = []  # read back after the loop, as in `predict_fn`
    for indices, features, real in _padded_batches(dataset, self.batch_size, self.length_buckets):
      pending.append((indices, real, self._score(self.trainable, self.frozen,
                                                 self._placed(features))))
      self._count_done(pending, last=False)
    self._count_done(pending, last=True)
    return [(int(i), float(s)) for indices, real, scores in pending
            for i, s in zip(indices, np.asarray(scores)[:real])]


def eval_loss(dataset, eval_step: Callable, trainable, frozen, batch_size: int,
              features: tuple[str, ...], length_buckets: Sequence[int] = ()) -> dict[str, float]:
  """Teacher-forced loss and token accuracy over a finite dataset of model features.

  A last short batch is padded with rows of zero loss weight, so `eval_step` compiles once (once a
  bucket with `length_buckets`, which sort the examples by input length). The sums stay on the
  device until the end, so the host reads the next batch while the device runs this one.
  """
  totals = None
  for batch in _batches(dataset, batch_size, length_buckets):
    batch = _pad_rows({k: v for k, v in batch.items() if k in features}, batch_size)
    metrics = eval_step(trainable, frozen, batch)
    totals = metrics if totals is None else jax.tree_util.tree_map(jnp.add, totals, metrics)
  if totals is None:
    return {}
  totals = jax.device_get(totals)
  tokens = max(float(totals["real_tokens"]), 1.0)
  return {"loss_per_token": float(totals["loss"]) / tokens,
          "token_accuracy": float(totals["correct_tokens"]) / tokens}


def make_evaluator(mixture_or_task_name: str, feature_lengths: Mapping[str, int],
                   split: str = "validation", log_dir: Optional[str] = None,
                   num_examples: Optional[int] = None, write_predictions: bool = True,
                   feature_converter: Optional[seqio.FeatureConverter] = None) -> seqio.Evaluator:
  """A seqio Evaluator over `split`, its features from `feature_converter` (the model
  architecture's; default: unpacked encoder-decoder features)."""
  loggers = []
  if log_dir is not None:
    loggers.append(seqio.TensorBoardLogger)
    if write_predictions:
      loggers.append(seqio.JSONLogger)
  return seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name,
      feature_converter=feature_converter or seqio.EncDecFeatureConverter(pack=False),
      eval_split=split, sequence_length=dict(feature_lengths), num_examples=num_examples,
      logger_cls=loggers, log_dir=log_dir, async_compute_metrics=False)


def evaluate(evaluator: seqio.Evaluator, predictor: Predictor, step: int,
             progress_bar: Optional[bool] = None) -> dict[str, dict[str, float]]:
  """Runs one evaluation, announced and timed in a line each; returns `{task: {metric: value}}`.

  seqio calls `predict_fn` and/or `score_fn`, as the task's metric functions ask: prediction metrics
  (accuracy, F1, ...) decode, score metrics (e.g. rank classification, perplexity) score the targets.
  A progress bar counts the examples of each pass (on a terminal, or with `progress_bar`).
  """
  passes = {task.name: sorted({metric.model_output_type for metric in task.metric_objs},
                              key=lambda kind: kind.value) for task in evaluator.eval_tasks}
  examples = {name: _count(evaluator.cached_model_datasets[name]) for name in passes}
  what = "; ".join(
      " and ".join(_PASS_NAMES.get(kind.name, kind.name.lower()) for kind in kinds)
      + f" {examples[name]} examples of {name}" for name, kinds in passes.items())
  primary = jax.process_index() == 0
  use_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
  if primary:
    _say(f"Evaluating{f' step {step}' if step else ''}: {what}.")
  start = time.time()
  predictor.progress = (tqdm.tqdm(total=sum(examples[name] * len(passes[name]) for name in passes),
                                  unit="example", desc="eval", leave=False, dynamic_ncols=True)
                        if use_bar and primary else None)
  try:
    all_metrics, _ = evaluator.evaluate(compute_metrics=primary, step=step,
                                        predict_fn=predictor.predict_fn,
                                        score_fn=predictor.score_fn)
  finally:
    if predictor.progress is not None:
      predictor.progress.close()
    predictor.progress = None
  if primary:
    _say(f"Evaluated{f' step {step}' if step else ''} in {time.time() - start:.0f} s.")
  results = all_metrics.result() if all_metrics is not None else {}
  return {task: {name: _scalar(value) for name, value in metrics.items()}
          for task, metrics in (results or {}).items()}


def _count(dataset) -> int:
  """The number of examples of a finite dataset (seqio's cached eval datasets are in memory)."""
  cardinality = int(dataset.cardinality())
  return cardinality if cardinality >= 0 else int(dataset.reduce(0, lambda count, _: count + 1))


def _say(line: str) -> None:
  """Logs `line` above any progress bars (tqdm's write keeps them intact)."""
  with tqdm.tqdm.external_write_mode(file=sys.stderr):
    logger.info(line)


def _scalar(value) -> Any:
  """seqio metric values may be wrapped (`seqio.metrics.Scalar`); return plain numbers."""
  value = getattr(value, "value", value)
  return float(value) if np.ndim(value) == 0 else value
