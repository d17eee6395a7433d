"""Train a soft prompt on a frozen T5: the loop behind `python -m prompt_tuning_jax.train`.

`train()` is plain Python (gin binds its arguments at the entry point, `main`): it loads the frozen model
from INITIAL_CHECKPOINT_PATH, builds the prompt, shards both over a `(data, model)` mesh, streams the
seqio task, runs the compiled train step, evaluates every `eval_period` steps, and saves the resume state
(prompt, optimizer state, step, data position) plus the prompt as numpy. Restarting the same command
resumes from the latest checkpoint that reads back whole and reaches the same prompt as an uninterrupted
run: the data order is a function of (seed, step). SIGTERM (a preemption notice) saves a checkpoint at
the current step and returns; a NaN or Inf loss or prompt stops the run (or, with
`skip_nonfinite_steps`, drops that step's update) and keeps the last good checkpoint.
"""
import dataclasses
import inspect
import logging
import os
import signal
import threading
import time
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio

from prompt_tuning_jax import (batching, checkpoints, evaluation, freezing, metrics_logging,
                               optimizers, partitioning, prompt_initializers, prompts, run_checkpoints,
                               trainer)
from prompt_tuning_jax.config import T5Config
from prompt_tuning_jax.network import T5
from prompt_tuning_jax.run_checkpoints import fault_point

logger = logging.getLogger("prompt_tuning_jax")

# Settings a resumed run may change; any other difference from the run in MODEL_DIR is an error.
MUTABLE_RUN_SETTINGS = ("train_steps", "eval_period", "checkpoint_period", "keep_checkpoints",
                        "log_period", "eval_num_examples", "skip_nonfinite_steps")


class NonFiniteError(ValueError):
  """The loss or the prompt became NaN or Inf; the run stopped before saving it."""


def build_prompt_init(factory: Callable[..., prompts.Initializer], embedding: np.ndarray,
                      vocabulary: seqio.Vocabulary) -> prompts.Initializer:
  """Calls an initialiser factory, handing it the frozen embedding and the task's vocabulary where
  it takes them (`from_class_labels`, `from_sampled_vocab`, `from_string`), nothing otherwise."""
  accepted = inspect.signature(factory).parameters
  kwargs = {name: value for name, value in (("embedding", embedding), ("vocabulary", vocabulary))
            if name in accepted}
  return factory(**kwargs)


def task_vocabulary(name: str) -> seqio.Vocabulary:
  try:
    task = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(f"MIXTURE_OR_TASK_NAME {name!r} is not registered ({e}). Import the module "
                     "that registers it with --gin.MIXTURE_OR_TASK_MODULE=\"'my.tasks'\".") from None
  return task.output_features["targets"].vocabulary


def check_feature_lengths(feature_lengths: Mapping[str, int], prompt_length: int,
                          max_encoder_length: Optional[int]):
  """TASK_FEATURE_LENGTHS needs positive `inputs` and `targets`; with the prompt, the encoder's
  length (inputs + PROMPT_LENGTH) must fit `max_encoder_length` when one is set. Inputs longer than
  `inputs` are cut, as in T5 (the prompt takes no input positions)."""
  if not isinstance(feature_lengths, Mapping):
    raise ValueError(f"TASK_FEATURE_LENGTHS must be a dict, got {feature_lengths!r}; e.g. "
                     "{'inputs': 512, 'targets': 8}.")
  for key in ("inputs", "targets"):
    if not isinstance(feature_lengths.get(key), int) or feature_lengths[key] <= 0:
      raise ValueError(f"TASK_FEATURE_LENGTHS must give a positive int for {key!r}, got "
                       f"{dict(feature_lengths)}; e.g. {{'inputs': 512, 'targets': 8}}.")
  if max_encoder_length is not None and feature_lengths["inputs"] + prompt_length > max_encoder_length:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS['inputs']={feature_lengths['inputs']} plus PROMPT_LENGTH={prompt_length} "
        f"is {feature_lengths['inputs'] + prompt_length}, more than max_encoder_length="
        f"{max_encoder_length}; shorten the inputs to {max_encoder_length - prompt_length} or less.")


def check_prompt_length(prompt_length: int):
  if not isinstance(prompt_length, int) or isinstance(prompt_length, bool) or prompt_length <= 0:
    raise ValueError(f"PROMPT_LENGTH must be a positive int, got {prompt_length!r}; the paper uses 100.")


def check_class_labels(class_labels: Sequence[str], targets_length: int,
                       vocabulary: seqio.Vocabulary):
  """Each class label must tokenise to something, and fit TASK_FEATURE_LENGTHS['targets'] with EOS
  (a label cut short can never be predicted)."""
  lengths = {}
  for label in class_labels:
    lengths[label] = len(vocabulary.encode(label))
    if not lengths[label]:
      raise ValueError(f"CLASS_LABELS: the label {label!r} tokenises to nothing; give the task's "
                       "label words, e.g. ['entailment', 'not_entailment'].")
  longest = max(lengths, key=lengths.get, default=None)
  if longest is not None and lengths[longest] + 1 > targets_length:
    raise ValueError(f"TASK_FEATURE_LENGTHS['targets']={targets_length} is shorter than the label "
                     f"{longest!r}: {lengths[longest]} tokens plus EOS; use 'targets': "
                     f"{lengths[longest] + 1} or more.")


def _run_settings(**settings) -> dict[str, Any]:
  """JSON-able settings that identify a run, for `run_config.json`."""
  def plain(value):
    if dataclasses.is_dataclass(value):
      return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
      return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
      return value
    return str(jnp.dtype(value))  # the only other kind of setting: a dtype
  return {k: plain(v) for k, v in settings.items()}


def check_initial_checkpoint(path: str):
  """A local INITIAL_CHECKPOINT_PATH must exist (remote ones are checked when read)."""
  if "://" not in path and not os.path.exists(path):
    raise checkpoints.CheckpointError(
        f"INITIAL_CHECKPOINT_PATH {path!r} does not exist; give a T5X checkpoint directory or a "
        "Hugging Face T5 directory.")


def check_checkpoint_matches(path: str, model_config: T5Config):
  """Raises a `CheckpointError` unless the checkpoint's shapes are `model_config`'s (reads no array)."""
  _, shapes = checkpoints.read_shapes(path)
  prompt_length = shapes[checkpoints.PROMPT_PATH][0] if checkpoints.PROMPT_PATH in shapes else None
  checkpoints.check_params(checkpoints.param_shapes(model_config, prompt_length), shapes, path)


def load_frozen_params(model_config: T5Config, initial_checkpoint_path: Optional[str],
                       assignment_map: Sequence[tuple[str, Optional[str]]] = (),
                       rng: Optional[jax.Array] = None) -> dict[str, np.ndarray]:
  """The frozen model's flat `{path: array}` params from INITIAL_CHECKPOINT_PATH.

  Every parameter must match `model_config`; with an `assignment_map` (T5X's (target regex, source or
  None) pairs) unmatched or skipped parameters start from scratch. With no path, the whole model is
  random (demos and tests). The layout is `T5(model_config)`'s (layers stacked for `scan_layers`).
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if initial_checkpoint_path is None:
    return checkpoints.stack_layers(checkpoints.init_params(model_config, rng), model_config)
  check_initial_checkpoint(initial_checkpoint_path)
  if not assignment_map:  # load_checkpoint stacks the layers itself
    return checkpoints.flatten(
        checkpoints.load_checkpoint(initial_checkpoint_path, config=model_config)[1])
  _, raw = checkpoints.load_checkpoint(initial_checkpoint_path)
  loaded, missing = checkpoints.apply_assignment_map(
      checkpoints.flatten(raw), checkpoints.param_shapes(model_config), assignment_map)
  if missing:
    logger.info("Initialising %d parameters from scratch: %s", len(missing), missing[:5])
    loaded.update(checkpoints.init_params(model_config, rng, missing))
  return checkpoints.stack_layers(loaded, model_config)


def train(*, model_dir: str, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
          train_steps: int, batch_size: int, model_config: T5Config, prompt_length: int,
          initial_checkpoint_path: Optional[str] = None,
          prompt_init: Callable[..., prompts.Initializer] = prompt_initializers.random_uniform,
          prompt_combine: str = "prefix",
          assignment_map: Sequence[tuple[str, Optional[str]]] = (),
          trainable_patterns: Sequence[str] = freezing.PROMPT_ONLY,
          optimizer: Optional[optax.GradientTransformation] = None,
          loss_config: trainer.LossConfig = trainer.LossConfig(),
          mesh_shape: Sequence[int] = (-1, 1), num_microbatches: int = 1,
          eval_period: int = 0, eval_split: str = "validation",
          eval_mixture_or_task_name: Optional[str] = None, eval_num_examples: Optional[int] = None,
          decoding_config: evaluation.DecodingConfig = evaluation.DecodingConfig(),
          best_metric: Optional[str] = None, best_higher_is_better: bool = True,
          checkpoint_period: Optional[int] = None, keep_checkpoints: int = 3,
          log_period: int = 10, seed: int = 0, shuffle: bool = True, use_cached: bool = False,
          max_encoder_length: Optional[int] = None,
          progress_bar: Optional[bool] = None, class_labels: Sequence[str] = (),
          skip_nonfinite_steps: bool = False, log_batch_hashes: bool = False,
          length_buckets: Sequence[int] = ()) -> dict[str, Any]:
  """Trains a prompt; returns a summary (final step, last metrics, eval results, paths).

  Args mirror T5X's macros: MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS,
  BATCH_SIZE (global), INITIAL_CHECKPOINT_PATH (None: a random frozen model, for demos and tests),
  PROMPT_LENGTH. `prompt_init` is an initialiser factory (e.g. `prompt_initializers.from_class_labels`
  with its `class_labels` bound); `best_metric` names an eval metric (`"accuracy"`) whose best value
  keeps its prompt in `MODEL_DIR/best`. `class_labels` (CLASS_LABELS) are checked against the
  targets' length. `skip_nonfinite_steps` drops the update of a step whose loss or prompt is NaN or
  Inf instead of stopping; `log_batch_hashes` (debugging) writes a hash of each batch's tokens to
  `train_metrics.jsonl`. `length_buckets` (input lengths before the prompt, e.g.
  `[64, 128, 256]`) batches examples of similar length together, one compiled step per bucket
  (`batching.batch`; one host only), and its evaluations sort examples by length into the same
  buckets. Everything is checked before anything is written.

  Returns:
    The summary; `preempted` is True when SIGTERM stopped the run after saving its current step.

  Raises:
    NonFiniteError: the loss or the prompt became NaN or Inf (without `skip_nonfinite_steps`).
  """
  # ---- Check everything that can be checked before any work. ----
  check_prompt_length(prompt_length)
  check_feature_lengths(task_feature_lengths, prompt_length, max_encoder_length)
  if train_steps <= 0 or batch_size <= 0:
    raise ValueError(f"TRAIN_STEPS and BATCH_SIZE must be positive, got {train_steps}, {batch_size}.")
  vocabulary = task_vocabulary(mixture_or_task_name)
  check_class_labels(class_labels, task_feature_lengths["targets"], vocabulary)
  eval_name = eval_mixture_or_task_name or mixture_or_task_name
  if eval_period:
    task_vocabulary(eval_name)
  mesh = partitioning.make_mesh(mesh_shape)
  partitioning.check_batch_divides(batch_size, mesh, num_microbatches)
  batching.check_length_buckets(length_buckets, task_feature_lengths["inputs"])
  if batch_size % jax.process_count():
    raise ValueError(f"BATCH_SIZE={batch_size} must divide over {jax.process_count()} processes.")
  if initial_checkpoint_path is not None:
    check_initial_checkpoint(initial_checkpoint_path)
    if not assignment_map:
      check_checkpoint_matches(initial_checkpoint_path, model_config)
  optimizer = optimizer or optimizers.prompt_tuning_adafactor()

  # ---- The frozen model and the prompt. ----
  rng = jax.random.PRNGKey(seed)
  init_rng, prompt_rng, state_rng = jax.random.split(rng, 3)
  loaded = load_frozen_params(model_config, initial_checkpoint_path, assignment_map, init_rng)
  embedding = np.asarray(loaded["token_embedder/embedding"])
  prompt_config = prompts.PromptConfig(
      prompt_length, build_prompt_init(prompt_init, embedding, vocabulary), prompt_combine)
  model = T5(model_config, prompt_config)
  prompt = jax.jit(prompt_config.init, static_argnums=(1, 2))(
      prompt_rng, (prompt_length, model_config.emb_dim), jnp.float32)
  params = checkpoints.unflatten({**loaded, checkpoints.PROMPT_PATH: np.asarray(prompt)})

  # ---- Data and evaluation (reading them checks the task's splits before anything is written). ----
  per_process = batch_size // jax.process_count()
  dataset = seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths), dataset_split="train",
      shuffle=shuffle, num_epochs=None, use_cached=use_cached, seed=seed,
      shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()),
      feature_converter=seqio.EncDecFeatureConverter(pack=False))
  batch_sharding = partitioning.batch_sharding(mesh)

  evaluator = evaluation.make_evaluator(
      eval_name, task_feature_lengths, eval_split, log_dir=os.path.join(model_dir, "inference_eval"),
      num_examples=eval_num_examples) if eval_period else None
  # Every process reads the whole eval split (as seqio's Evaluator does) and places each batch from
  # its full copy, so all processes run the same number of batches.
  eval_dataset = seqio.get_dataset(
      eval_name, task_feature_lengths=dict(task_feature_lengths), dataset_split=eval_split,
      shuffle=False, num_epochs=1, use_cached=use_cached,
      feature_converter=seqio.EncDecFeatureConverter(pack=False)) if eval_period else None
  if eval_dataset is not None and eval_num_examples:
    eval_dataset = eval_dataset.take(eval_num_examples)

  # ---- Shardings, state, compiled steps. ----
  mask = freezing.freeze_mask(params, trainable_patterns)
  trainable, frozen = freezing.split(params, mask)
  trainable_sh, frozen_sh = freezing.split(partitioning.model_param_shardings(model, mesh), mask)
  frozen = partitioning.place_on_mesh(frozen, frozen_sh)
  state = trainer.TrainState.create(partitioning.place_on_mesh(trainable, trainable_sh), optimizer,
                                    state_rng)
  state_sh = jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), state).replace(
      trainable=trainable_sh)
  state = jax.device_put(state, state_sh)
  train_step = trainer.compile_train_step(model, optimizer, mesh, state_sh, frozen_sh, loss_config,
                                          num_microbatches, skip_nonfinite_steps)
  predictor = evaluation.Predictor(model, frozen, batch_size, decoding_config, length_buckets)
  eval_step = trainer.compile_eval_step(model, mesh, trainable_sh, frozen_sh, loss_config)
  eval_on_mesh = lambda trainable, frozen, batch: eval_step(
      trainable, frozen, partitioning.place_on_mesh(batch, batch_sharding))

  # ---- Everything checked: from here on MODEL_DIR is written. ----
  run_checkpoints.check_run_config(model_dir, _run_settings(
      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths),
      train_steps=train_steps, batch_size=batch_size,
      # Scanning is how the layers compile, not what they compute: a run resumes either way.
      model_config={k: v for k, v in dataclasses.asdict(model_config).items() if k != "scan_layers"},
      prompt_length=prompt_length, prompt_combine=prompt_combine,
      initial_checkpoint_path=initial_checkpoint_path, trainable_patterns=list(trainable_patterns),
      loss_config=loss_config, num_microbatches=num_microbatches, eval_period=eval_period,
      checkpoint_period=checkpoint_period, keep_checkpoints=keep_checkpoints, log_period=log_period,
      eval_num_examples=eval_num_examples, seed=seed, skip_nonfinite_steps=skip_nonfinite_steps,
      # Recorded only when set, so runs started before the setting existed still resume.
      **({"length_buckets": list(length_buckets)} if length_buckets else {})),
      mutable_keys=MUTABLE_RUN_SETTINGS)
  checkpointer = run_checkpoints.RunCheckpointer(model_dir, keep=keep_checkpoints)
  data_position = {"batches_consumed": 0}
  if checkpointer.latest_step() is not None:
    state, data_position = checkpointer.restore(abstract_state=state)
    state = jax.device_put(state, state_sh)
    logger.info("Resumed from %s at step %d.", model_dir, int(state.step))
  start_step = int(state.step)
  fault_point("startup", start_step)
  # The same shuffled stream on every run (a function of the seed): batch s is the one of step s + 1,
  # and a resumed run skips the batches already consumed.
  batches = batching.batch(dataset, per_process, task_feature_lengths["inputs"], length_buckets).skip(
      data_position["batches_consumed"]).as_numpy_iterator()

  def next_batch() -> tuple[dict[str, np.ndarray], dict[str, jax.Array]]:
    """The next batch, this process's rows and the global array on the mesh."""
    local = next(batches)
    return local, {k: jax.make_array_from_process_local_data(batch_sharding, v)
                   for k, v in local.items() if k in _MODEL_FEATURES}

  metrics_log = metrics_logging.MetricsLogger(model_dir, train_steps, start_step, progress_bar)
  checkpoint_period = checkpoint_period or eval_period or train_steps
  summary: dict[str, Any] = {"model_dir": model_dir, "start_step": start_step, "eval": {}}
  window, last_metrics, window_start = None, None, time.time()

  def settle(step: int, metrics: dict[str, jax.Array]) -> None:
    """Reads whether `step` (already applied, or dropped on the device) was finite: adds its metrics
    to the log window, or raises NonFiniteError (or warns, with `skip_nonfinite_steps`)."""
    nonlocal window, last_metrics
    loss_finite, prompt_finite = _read_finiteness(metrics)
    if loss_finite and prompt_finite:
      counted = {k: v for k, v in metrics.items() if k not in trainer.FINITENESS_METRICS}
      window = counted if window is None else jax.tree_util.tree_map(jnp.add, window, counted)
      last_metrics = counted
      return
    what = "loss" if not loss_finite else "prompt"
    if not skip_nonfinite_steps:
      latest = checkpointer.latest_step()
      raise NonFiniteError(
          f"Step {step}: the {what} is NaN or Inf; stopped without saving it. "
          + (f"The last good checkpoint is step {latest} in {checkpointer.directory}. "
             if latest is not None else "No checkpoint has been saved yet. ")
          + "Lower the learning rate, or set --gin.train.skip_nonfinite_steps=True to drop such "
          "steps.")
    logger.warning("Step %d: the %s is NaN or Inf; its update is dropped "
                   "(skip_nonfinite_steps).", step, what)

  queue_ahead = _queues_steps_ahead(mesh)
  step = start_step
  preemption = _Preemption()
  try:
    upcoming = next_batch() if step < train_steps else None
    unread = None  # (step, metrics) of the step whose finiteness the host has not read yet
    while step < train_steps:
      local, batch = upcoming
      if log_batch_hashes:
        metrics_log.record(step + 1, {"hash": _batch_hash(local)}, kind="batch")
      state, metrics = train_step(state, frozen, batch)
      step += 1
      # While the device runs this step, the host places the next batch, then reads the finiteness of
      # the step before (an accelerator always has the next step queued) or of this one (CPU).
      upcoming = next_batch() if step < train_steps else None
      fault_point("mid_step", step)
      if unread is not None:
        settle(*unread)
      unread = (step, metrics)
      preempted = preemption.requested()
      log_now = step % log_period == 0 or step == train_steps
      eval_now = eval_period and (step % eval_period == 0 or step == train_steps) and not preempted
      save_now = step % checkpoint_period == 0 or step == train_steps or preempted
      if log_now or eval_now or save_now or not queue_ahead:  # the first three read this step
        settle(*unread)
        unread = None
      if window is not None and log_now:
        summary["train"] = _log_window(metrics_log, step, window, last_metrics,
                                       time.time() - window_start, state)
        window, window_start = None, time.time()
      if eval_now:
        predictor.trainable = state.trainable
        results = evaluation.evaluate(evaluator, predictor, step)
        fault_point("mid_eval", step)
        metrics_log.write(step, evaluation.eval_loss(
            eval_dataset, eval_on_mesh, state.trainable, frozen, batch_size, _MODEL_FEATURES,
            length_buckets), kind="eval")
        summary["eval"][step] = results
        for task, task_metrics in results.items():
          metrics_log.write(step, {k: v for k, v in task_metrics.items()
                                   if np.ndim(v) == 0}, kind=f"eval/{task}")
        if best_metric is not None:
          value = _find_metric(results, best_metric)
          checkpointer.save_best_prompt(step, state.trainable, best_metric, value,
                                        higher_is_better=best_higher_is_better)
      if save_now:
        checkpointer.save(step, state, {"batches_consumed": step})
        fault_point("after_save", step)
      if preempted:
        logger.warning("SIGTERM: saved checkpoint %d in %s and stopped; rerun the same command to "
                       "resume.", step, checkpointer.directory)
        summary["preempted"] = True
        break
  finally:
    preemption.restore()
    metrics_log.close()
    checkpointer.close()
  summary.update(final_step=step, prompt=np.asarray(state.trainable["encoder"]["prompt"]["prompt"]
                                                    ["prompt"]) if "encoder" in state.trainable
                 else None, numpy_checkpoints=os.path.join(model_dir, "numpy_checkpoints"))
  return summary


_MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                   "decoder_loss_weights")


class _Preemption:
  """Turns SIGTERM (how preemption arrives) into a flag the loop reads at each step boundary.

  With several processes, each call or-s the processes' flags on the devices and returns the result
  of the call before, so reading it waits only for the step the loop has already waited for: every
  process stops at the same step, one step after the notice reached any of them.
  """

  def __init__(self):
    self._received = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._receive)
    self._gathered = None  # the last call's or-ed flag, a replicated 0-d jax.Array
    if jax.process_count() > 1:
      devices = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
      mesh = jax.sharding.Mesh(devices, ("processes", "local_devices"))
      self._per_process = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("processes"))
      self._any = jax.jit(jnp.any, out_shardings=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))

  def _receive(self, signum, frame):
    del signum, frame
    self._received = True

  def requested(self) -> bool:
    """Whether this process (alone) or any process (by the previous call) has received SIGTERM."""
    if jax.process_count() == 1:
      return self._received
    previous, self._gathered = self._gathered, self._any(jax.make_array_from_process_local_data(
        self._per_process, np.asarray([self._received])))
    return previous is not None and bool(previous)

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _queues_steps_ahead(mesh) -> bool:
  """Whether the loop queues a step before reading the one before it: on GPU (NVIDIA H200, T5 1.1
  Small, batch 32) that took a step of the loop from 11.4 to 6.8 ms; on XLA:CPU it made the step
  15-25% slower (`benchmarks/gpu_benchmark.py`, "lag ms")."""
  return mesh.devices.flat[0].platform != "cpu"


def _read_finiteness(metrics: dict[str, jax.Array]) -> tuple[bool, bool]:
  """(the step's loss is finite, its prompt is finite): the host's wait for that step."""
  return tuple(bool(x) for x in jax.device_get([metrics[k] for k in trainer.FINITENESS_METRICS]))


def _batch_hash(batch: Mapping[str, np.ndarray]) -> int:
  """CRC32 of a batch's tokens (fits a float exactly, for `train_metrics.jsonl`)."""
  return zlib.crc32(b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch)
                             if k in _MODEL_FEATURES))


def _log_window(metrics_log, step: int, window, last, seconds: float, state):
  """Turns summed window metrics into per-token/-example rates and writes them."""
  window = jax.tree_util.tree_map(float, jax.device_get(window))
  real_tokens = max(window["real_tokens"], 1.0)
  row = {"loss": float(last["loss"]), "z_loss": float(last["z_loss"]),
         "accuracy": window["correct_tokens"] / real_tokens,
         "grad_norm": float(last["grad_norm"]),
         "learning_rate": _learning_rate(state),
         "examples_per_second": window["examples"] / max(seconds, 1e-9),
         "tokens_per_second": real_tokens / max(seconds, 1e-9)}
  row = {k: v for k, v in row.items() if v is not None}
  metrics_log.write(step, row)
  return row


def _learning_rate(state) -> Optional[float]:
  """The current learning rate, where the optimizer keeps it (optax.inject_hyperparams)."""
  value = getattr(state.opt_state, "hyperparams", {}).get("learning_rate")
  return None if value is None else float(value)


def _find_metric(results: Mapping[str, Mapping[str, float]], name: str) -> float:
  """`name` is `metric` (the first task that has it) or `task/metric`."""
  task, _, metric = name.rpartition("/")
  for task_name, task_metrics in results.items():
    if (not task or task == task_name) and metric in task_metrics:
      return float(task_metrics[metric])
  raise ValueError(f"best_metric {name!r} is not among the eval metrics "
                   f"{ {t: sorted(m) for t, m in results.items()} }.")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line: `--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths`.

  See gin_configs/runs/prompt_finetune.gin.
  """
  from prompt_tuning_jax import gin_utils  # pylint: disable=g-import-not-at-top (it imports us)
  summary = gin_utils.run("train", argv, "Train a prompt on a frozen T5.")
  gin_utils.write_config(summary["model_dir"])
  step = summary["final_step"]
  prompt_file = os.path.join(summary["numpy_checkpoints"], f"checkpoint_{step}",
                             run_checkpoints.numpy_file_name(checkpoints.PROMPT_PATH))
  if summary.get("preempted"):
    print(f"Stopped by SIGTERM at step {step}, checkpoint saved; rerun the same command to resume. "
          f"MODEL_DIR: {summary['model_dir']}")
    return
  print(f"Trained to step {step}; MODEL_DIR: {summary['model_dir']}\nPrompt (numpy): {prompt_file}")


if __name__ == "__main__":
  main()
