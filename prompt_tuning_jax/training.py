"""A training run: `train()`, behind `python -m prompt_tuning_jax.train`.

`train()` is plain Python (the command line binds its arguments with gin): it loads the frozen
model from INITIAL_CHECKPOINT_PATH, builds the prompt, shards both over a `(data, model)` mesh,
streams the seqio task, runs the compiled train step, evaluates every `EvalConfig.period` steps, and
saves the resume state (prompt, optimizer state, step, data position) plus the prompt as numpy.
Restarting the same command resumes from the latest checkpoint that reads back whole and reaches the
same prompt as an uninterrupted run: the data order is a function of (seed, step). A run holds
MODEL_DIR's lock (`run_lock`) while it writes there. SIGTERM (a preemption notice) saves a
checkpoint at the current step and returns; a NaN or Inf loss or prompt, or a prompt that diverged
(a vector `DIVERGENCE_FACTOR` times longer than any embedding's), stops the run (or, with
`skip_nonfinite_steps`, drops that step's update, up to `max_skipped_steps` in a row) and keeps the
last good checkpoint.

Settings come in groups, as in T5X: `DatasetConfig` (what the run reads), `EvalConfig` (when and on
what it evaluates), `CheckpointConfig` (when it saves) and `config.ExecutionConfig` (how the model
is computed, which a resumed run may change). What a resumed run may change, and how, is in
docs/checkpoints.md.
"""
import dataclasses
import errno
import logging
import os
import signal
import threading
import time
import zlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
import tensorflow as tf

from prompt_tuning_jax import (architectures, batching, checkpoints, evaluation, freezing, methods,
                               metrics_logging, optimizers, partitioning, prompt_initializers, prompt_library,
                               prompts, run_checkpoints, run_lock, run_setup, trainer, trees)
from prompt_tuning_jax.config import ExecutionConfig, T5Config
from prompt_tuning_jax.network import T5
from prompt_tuning_jax.run_checkpoints import fault_point

logger = logging.getLogger("prompt_tuning_jax")

# Settings a resumed run may change (it records and applies them; `optimizer` holds the optimizer's
# hyperparameters, LEARNING_RATE among them); any other difference from the run in MODEL_DIR is an
# error.
MUTABLE_RUN_SETTINGS = ("train_steps", "eval_period", "checkpoint_period", "keep_checkpoints",
                        "keep_numpy_checkpoints",
                        "log_period", "eval_num_examples", "skip_nonfinite_steps",
                        "max_skipped_steps", "optimizer", "publish_to")
# Settings runs record since some version; a run recorded without one resumes.
NEW_RUN_SETTINGS = ("optimizer_state",)
# Execution settings that runs recorded inside `model_config` before `ExecutionConfig` held them.
RETIRED_RUN_SETTINGS = ("model_config.remat_policy", "model_config.attention_chunks")
# A prompt vector this many times longer than the longest of the frozen embedding and the initial
# prompt has diverged: its attention saturates, its gradients vanish, and it never comes back.
DIVERGENCE_FACTOR = 1e3


class NonFiniteError(ValueError):
  """The loss or the prompt became NaN or Inf, or the prompt diverged; the run stopped before saving
  it."""


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """The examples a run trains on, after T5X's `utils.DatasetConfig`.

  `batch_size` is global (split over the processes and the mesh's `data` axis). `length_buckets`
  (input lengths before the prompt, e.g. `(64, 128, 256)`) batches examples of similar length
  together, one compiled step per bucket (`batching.batch`; one host only); the run's evaluations
  sort their examples by length into the same buckets.
  """
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  split: str = "train"
  shuffle: bool = True
  use_cached: bool = False
  length_buckets: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """When and on what a training run evaluates its prompt.

  Every `period` steps and at the last step (0: never) the run decodes `split` of
  `mixture_or_task_name` (default: the training task), at most `num_examples` of it, scores the
  predictions with the task's metrics and logs the teacher-forced loss. `best_metric` names a metric
  (`"accuracy"`, or `"task/metric"`) whose best value keeps its prompt in `MODEL_DIR/best`.
  """
  period: int = 0
  split: str = "validation"
  mixture_or_task_name: Optional[str] = None
  num_examples: Optional[int] = None
  decoding_config: evaluation.DecodingConfig = evaluation.DecodingConfig()
  best_metric: Optional[str] = None
  best_higher_is_better: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When a training run saves its state and how many saves it keeps, after T5X's
  `utils.SaveCheckpointConfig`. `period` None saves every `EvalConfig.period` steps, or only at the
  end; the last step and SIGTERM always save. `keep` (None: all) counts the resume checkpoints kept;
  `keep_numpy` (None: all, as prompts are small) the numpy copies of the trained parameters
  (`methods/model_tuning.gin` keeps 1: they are every weight)."""
  period: Optional[int] = None
  keep: Optional[int] = 3
  keep_numpy: Optional[int] = None


def train(*, model_dir: str, dataset_config: DatasetConfig, train_steps: int,
          model_config: T5Config, prompt_length: int, initial_checkpoint_path: Optional[str] = None,
          prompt_init: Callable[..., prompts.Initializer] = prompt_initializers.random_uniform,
          prompt_combine: str = "prefix",
          method: methods.Method = methods.prompt_tuning(),
          assignment_map: Sequence[tuple[str, Optional[str]]] = (),
          trainable_patterns: Optional[Sequence[str]] = None,
          optimizer: Optional[optax.GradientTransformation] = None,
          loss_config: trainer.LossConfig = trainer.LossConfig(),
          eval_config: EvalConfig = EvalConfig(),
          checkpoint_config: CheckpointConfig = CheckpointConfig(),
          execution: ExecutionConfig = ExecutionConfig(attention="auto"),
          mesh_shape: Sequence[int] = (-1, 1), num_microbatches: int = 1, log_period: int = 10,
          seed: int = 0, max_encoder_length: Optional[int] = None,
          progress_bar: Optional[bool] = None, class_labels: Sequence[str] = (),
          skip_nonfinite_steps: bool = False, max_skipped_steps: int = 10,
          log_batch_hashes: bool = False, publish_to: Optional[str] = None) -> dict[str, Any]:
  """Trains a prompt; returns a summary (final step, last metrics, eval results, paths).

  Args mirror T5X's macros: MODEL_DIR, TRAIN_STEPS, INITIAL_CHECKPOINT_PATH (None: a random frozen
  model, for demos and tests), PROMPT_LENGTH; `dataset_config` holds MIXTURE_OR_TASK_NAME,
  TASK_FEATURE_LENGTHS and BATCH_SIZE. `prompt_init` is an initialiser factory (e.g.
  `prompt_initializers.from_class_labels` with its `class_labels` bound). `execution` is resolved
  for the mesh's devices before the model is built. `method` (`methods.py`) is what trains: the
  prompt (the default), every weight, prefixes, per-layer or residual prompts, IA3 or LoRA;
  `trainable_patterns` (default: the method's) picks the parameters that learn by their paths.
  A method with a training-time reparameterisation (a residual prompt, a prefix MLP) also writes
  its folded parameters to `MODEL_DIR/folded/checkpoint_N` at the end. `seed` fixes the initialisation and the
  data order. `class_labels` (CLASS_LABELS) are checked against the targets' length.
  `skip_nonfinite_steps` drops the update of a step whose loss or prompt is NaN or Inf, or whose
  prompt diverged, instead of stopping, until `max_skipped_steps` steps in a row are dropped;
  `log_batch_hashes` (debugging) writes a hash of each batch's tokens to `train_metrics.jsonl`.
  `publish_to` names a prompt library (a folder, `prompt_library`) that a finished run (not one
  stopped by SIGTERM) publishes its final prompt in, with its task, model, steps and last metrics.
  Everything is checked before anything is written; then the run takes MODEL_DIR's lock.

  Returns:
    The summary; `preempted` is True when SIGTERM stopped the run after saving its current step.

  Raises:
    NonFiniteError: the loss or the prompt became NaN or Inf or the prompt diverged (without
      `skip_nonfinite_steps`, or `max_skipped_steps` times in a row with it).
    run_lock.RunLockedError: another run holds MODEL_DIR.
  """
  _check_settings(model_dir, train_steps, dataset_config, eval_config, checkpoint_config,
                  log_period, seed, skip_nonfinite_steps, max_skipped_steps)
  if publish_to is not None:
    prompt_library.check_library(publish_to)
  if "://" not in model_dir:  # orbax saves only to absolute paths; gs://... stays as it is
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
  architecture = architectures.of(model_config)
  architecture.check(method, eval_config.decoding_config.method, dataset_config.length_buckets,
                     assignment_map)
  vocabulary, mesh = _check_inputs(
      dataset_config, eval_config, model_config, architecture, prompt_length,
      initial_checkpoint_path, assignment_map, mesh_shape, num_microbatches, max_encoder_length,
      class_labels)
  execution = run_setup.resolve_execution(execution, model_config, mesh)
  trainable_patterns = tuple(trainable_patterns or architecture.trainable_patterns(method))
  task_names = ()
  if method.multitask_combine is not None:
    dataset_config, eval_config, method, task_names = _task_indexed(dataset_config, eval_config,
                                                                    method)
  metrics_logging.log_run_start(dataset_config.mixture_or_task_name,
                                architecture.describe(model_config),
                                method.description(prompt_length),
                                train_steps, dataset_config.batch_size, mesh, execution.attention,
                                model_dir)
  init_rng, prompt_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
  model, params = _prompted_model(
      model_config, architecture, execution, method, initial_checkpoint_path, assignment_map,
      prompt_length, prompt_init, prompt_combine, vocabulary, init_rng, prompt_rng)
  norm_bound = _divergence_bound(params, architecture.prompt_path)
  data = _Data.read(dataset_config, eval_config, seed, os.path.join(model_dir, "inference_eval"),
                    architecture.feature_converter())
  steps = _CompiledSteps.build(
      model, architecture, params, mesh, optimizer or optimizers.prompt_tuning_adafactor(),
      state_rng, trainable_patterns, loss_config, num_microbatches, skip_nonfinite_steps,
      dataset_config.batch_size, eval_config.decoding_config, dataset_config.length_buckets,
      dataset_config.task_feature_lengths["targets"], norm_bound)
  identity = _run_identity(
      dataset_config=dataset_config, train_steps=train_steps, model_config=model_config,
      prompt_length=prompt_length, prompt_combine=prompt_combine,
      initial_checkpoint_path=initial_checkpoint_path, assignment_map=assignment_map,
      trainable_patterns=trainable_patterns, method=method, loss_config=loss_config,
      num_microbatches=num_microbatches, eval_config=eval_config,
      checkpoint_config=checkpoint_config, log_period=log_period, seed=seed,
      skip_nonfinite_steps=skip_nonfinite_steps, max_skipped_steps=max_skipped_steps,
      optimizer=optimizers.hyperparameters(steps.state.opt_state),
      optimizer_state=optimizers.state_layout(steps.state.opt_state))
  run_checkpoints.check_run_config(model_dir, identity, MUTABLE_RUN_SETTINGS, RETIRED_RUN_SETTINGS,
                                   NEW_RUN_SETTINGS)
  run_checkpoints.check_best_metric(model_dir, eval_config.best_metric)

  # Everything is checked: from here on MODEL_DIR is written, by this run alone.
  with run_lock.RunLock(model_dir):
    changed = run_checkpoints.record_run_config(model_dir, identity, MUTABLE_RUN_SETTINGS,
                                                RETIRED_RUN_SETTINGS, NEW_RUN_SETTINGS)
    if changed:
      logger.info("Settings changed since the run's last start, applied from here on: %s.",
                  "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()))
    checkpointer = run_checkpoints.RunCheckpointer(model_dir, keep=checkpoint_config.keep,
                                                   keep_numpy=checkpoint_config.keep_numpy)
    try:
      batches_consumed = steps.resume(checkpointer)
      loop = _TrainLoop(steps, data, checkpointer, dataset_config, eval_config, train_steps,
                        checkpoint_config.period or eval_config.period or train_steps, log_period,
                        skip_nonfinite_steps, max_skipped_steps, norm_bound, log_batch_hashes,
                        progress_bar, batches_consumed)
      summary = loop.run()
      if method.folded() != method and not summary.get("preempted"):
        summary.update(_write_folded(method, model_config, steps.state.trainable,
                                     summary["final_step"], model_dir))
      if task_names and not summary.get("preempted"):
        summary["task_prompts"] = _write_task_prompts(method, task_names, steps.state.trainable,
                                                      model_dir)
      if publish_to is not None and not summary.get("preempted"):
        summary["published"] = prompt_library.publish_run(
            publish_to, summary, dataset_config.mixture_or_task_name, model_config,
            initial_checkpoint_path)
      return summary
    except OSError as e:  # a full disk outside the save, which says so itself
      if e.errno != errno.ENOSPC:
        raise
      raise OSError(e.errno, f"No space left on device writing {e.filename or model_dir}. "
                    f"{checkpointer.last_good()} Free space, then rerun the same command to "
                    "resume.") from None
    finally:
      checkpointer.close()


def _check_settings(model_dir: str, train_steps: int, dataset_config: DatasetConfig,
                    eval_config: EvalConfig, checkpoint_config: CheckpointConfig, log_period: int,
                    seed: int, skip_nonfinite_steps: bool, max_skipped_steps: int) -> None:
  """Checks the run's numbers and switches, which would otherwise fail mid-run or, as
  `CheckpointConfig.keep=0` would, delete the checkpoints a run resumes from."""
  if not isinstance(model_dir, str) or not model_dir:
    raise ValueError(f"MODEL_DIR must be a directory's path, got {model_dir!r}.")
  _check_int("TRAIN_STEPS", train_steps, 1)
  _check_int("BATCH_SIZE", dataset_config.batch_size, 1)
  _check_int("EVAL_PERIOD (EvalConfig.period)", eval_config.period, 0,
             "0 or None: never evaluate")
  _check_int("EvalConfig.num_examples", eval_config.num_examples, 1, "None: all")
  _check_int("CHECKPOINT_PERIOD (CheckpointConfig.period)", checkpoint_config.period, 1,
             "None: every EVAL_PERIOD steps, or at the end")
  _check_int("CheckpointConfig.keep", checkpoint_config.keep, 1, "None: keep all")
  _check_int("CheckpointConfig.keep_numpy", checkpoint_config.keep_numpy, 1, "None: keep all")
  _check_int("train.log_period", log_period, 1)
  _check_int("train.seed", seed, 0)
  _check_int("train.max_skipped_steps", max_skipped_steps, 1)
  if not isinstance(skip_nonfinite_steps, bool):
    raise ValueError(f"train.skip_nonfinite_steps must be True or False, got "
                     f"{skip_nonfinite_steps!r}.")


def _check_int(name: str, value: Any, minimum: int, none_means: Optional[str] = None) -> None:
  """Raises a ValueError naming the setting unless `value` is an int of at least `minimum` (or
  None, where `none_means` says what None does)."""
  if value is None and none_means is not None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    kind = {0: "a non-negative integer", 1: "a positive integer"}[minimum]
    raise ValueError(f"{name} must be {kind}" + (f" ({none_means})" if none_means else "")
                     + f", got {value!r}.")


def _divergence_bound(params: dict[str, Any], prompt_path: str) -> float:
  """How long a prompt vector may grow: `DIVERGENCE_FACTOR` times the longest row of the frozen
  embedding and of the initial prompt (at `prompt_path`)."""
  flat = trees.flatten(params)
  longest = max(float(np.sqrt(np.max(np.einsum("...i,...i->...", x, x))))
                for x in (np.asarray(flat[path], np.float32)
                          for path in ("token_embedder/embedding", prompt_path)
                          if path in flat))
  return DIVERGENCE_FACTOR * longest


def _check_inputs(dataset_config: DatasetConfig, eval_config: EvalConfig, model_config: T5Config,
                  architecture: architectures.Architecture, prompt_length: int,
                  initial_checkpoint_path: Optional[str],
                  assignment_map: Sequence[tuple[str, Optional[str]]], mesh_shape: Sequence[int],
                  num_microbatches: int, max_encoder_length: Optional[int],
                  class_labels: Sequence[str]) -> tuple[seqio.Vocabulary, jax.sharding.Mesh]:
  """Checks everything that can be checked before any work; returns (the task's vocabulary, the
  mesh)."""
  lengths, batch_size = dataset_config.task_feature_lengths, dataset_config.batch_size
  run_setup.check_prompt_length(prompt_length)
  run_setup.check_feature_lengths(lengths, prompt_length, max_encoder_length)
  vocabulary = run_setup.task_vocabulary(dataset_config.mixture_or_task_name)
  run_setup.check_class_labels(class_labels, lengths["targets"], vocabulary)
  if eval_config.period:
    run_setup.task_vocabulary(eval_config.mixture_or_task_name
                              or dataset_config.mixture_or_task_name)
  mesh = partitioning.make_mesh(mesh_shape)
  partitioning.check_batch_divides(batch_size, mesh, num_microbatches)
  batching.check_length_buckets(dataset_config.length_buckets, lengths["inputs"],
                                "DatasetConfig.length_buckets")
  if batch_size % jax.process_count():
    raise ValueError(f"BATCH_SIZE={batch_size} must divide over {jax.process_count()} processes.")
  if initial_checkpoint_path is not None:
    checkpoints.check_initial_checkpoint(initial_checkpoint_path)
    if not assignment_map:
      architecture.check_checkpoint(initial_checkpoint_path, model_config)
  return vocabulary, mesh


def _prompted_model(model_config: T5Config, architecture: architectures.Architecture,
                    execution: ExecutionConfig, method: methods.Method,
                    initial_checkpoint_path: Optional[str],
                    assignment_map: Sequence[tuple[str, Optional[str]]], prompt_length: int,
                    prompt_init: Callable[..., prompts.Initializer], prompt_combine: str,
                    vocabulary: seqio.Vocabulary, init_rng: jax.Array,
                    prompt_rng: jax.Array) -> tuple[T5, dict[str, Any]]:
  """(the model, its nested params on the host): the frozen model, a new prompt `[prompt_length,
  embed]` from its initialiser (where the method has one), and the method's other new parameters
  from their initialisers."""
  loaded = architecture.load_frozen_params(model_config, initial_checkpoint_path, assignment_map,
                                           init_rng, execution.scan_layers)
  embedding = np.asarray(loaded["token_embedder/embedding"])
  init = run_setup.build_prompt_init(prompt_init, embedding, vocabulary)
  prompt_config = method.prompt_config(prompt_length, init, prompt_combine)
  model = architecture.build(method, model_config, prompt_config, execution)
  new = {}
  if prompt_config is not None and prompt_config.multitask is None:
    new[architecture.prompt_path] = np.asarray(jax.jit(prompt_config.init, static_argnums=(1, 2))(
        prompt_rng, (prompt_length, model_config.emb_dim), jnp.float32))
  new.update(architecture.new_params(model, set(loaded) | set(new), prompt_rng))
  return model, trees.unflatten({**loaded, **new})


@dataclasses.dataclass(frozen=True)
class _Data:
  """The run's examples: the training stream (this process's share, shuffled by the seed, repeated)
  and, when the run evaluates, its eval split, which `evaluator` decodes and `eval_dataset` gives
  the loss of. Every process reads the whole eval split (as seqio's Evaluator does) and places each
  batch from its full copy, so all processes run the same number of batches."""
  train: tf.data.Dataset
  evaluator: Optional[seqio.Evaluator]
  eval_dataset: Optional[tf.data.Dataset]

  @classmethod
  def read(cls, dataset_config: DatasetConfig, eval_config: EvalConfig, seed: int,
           eval_log_dir: str, converter: seqio.FeatureConverter) -> "_Data":
    """Opens the datasets through the model's feature `converter`, which checks the task's splits
    before anything is written."""
    lengths = dict(dataset_config.task_feature_lengths)
    train = seqio.get_dataset(
        dataset_config.mixture_or_task_name, task_feature_lengths=lengths,
        dataset_split=dataset_config.split, shuffle=dataset_config.shuffle, num_epochs=None,
        use_cached=dataset_config.use_cached, seed=seed,
        shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()),
        feature_converter=converter)
    if not eval_config.period:
      return cls(train, None, None)
    eval_name = eval_config.mixture_or_task_name or dataset_config.mixture_or_task_name
    evaluator = evaluation.make_evaluator(eval_name, lengths, eval_config.split,
                                          log_dir=eval_log_dir,
                                          num_examples=eval_config.num_examples,
                                          feature_converter=converter)
    eval_dataset = seqio.get_dataset(
        eval_name, task_feature_lengths=lengths, dataset_split=eval_config.split, shuffle=False,
        num_epochs=1, use_cached=dataset_config.use_cached, feature_converter=converter)
    if eval_config.num_examples:
      eval_dataset = eval_dataset.take(eval_config.num_examples)
    return cls(train, evaluator, eval_dataset)


@dataclasses.dataclass
class _CompiledSteps:
  """The train state and the frozen params on the mesh, and the compiled functions that use them."""
  architecture: architectures.Architecture  # the model's: its features and prompt path
  state: trainer.TrainState
  state_shardings: Any
  frozen: Any
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # (state, frozen, global batch) -> (state, metrics)
  eval_step: Callable  # (trainable, frozen, global batch) -> summed eval metrics
  predictor: evaluation.Predictor

  @classmethod
  def build(cls, model: T5, architecture: architectures.Architecture, params: dict[str, Any],
            mesh: jax.sharding.Mesh,
            optimizer: optax.GradientTransformation, state_rng: jax.Array,
            trainable_patterns: Sequence[str], loss_config: trainer.LossConfig,
            num_microbatches: int, skip_nonfinite_steps: bool, batch_size: int,
            decoding_config: evaluation.DecodingConfig, length_buckets: Sequence[int],
            targets_length: int, norm_bound: float) -> "_CompiledSteps":
    """Splits `params` into trainable and frozen by `trainable_patterns`, places both by the model's
    logical axes, and compiles the train and eval steps and the predictor over `mesh`; a train step
    whose prompt has a vector longer than `norm_bound` is flagged as diverged."""
    mask = freezing.freeze_mask(params, trainable_patterns)
    trainable, frozen = freezing.split(params, mask)
    trainable_sh, frozen_sh = freezing.split(partitioning.model_param_shardings(model, mesh), mask)
    frozen = partitioning.place_on_mesh(frozen, frozen_sh)
    state = trainer.TrainState.create(partitioning.place_on_mesh(trainable, trainable_sh),
                                      optimizer, state_rng)
    state_sh = jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), state).replace(
        trainable=trainable_sh)
    return cls(
        architecture=architecture, state=jax.device_put(state, state_sh),
        state_shardings=state_sh, frozen=frozen,
        batch_sharding=partitioning.batch_sharding(mesh),
        train_step=trainer.compile_train_step(model, optimizer, mesh, state_sh, frozen_sh,
                                              loss_config, num_microbatches, skip_nonfinite_steps,
                                              norm_bound=norm_bound),
        eval_step=trainer.compile_eval_step(model, mesh, trainable_sh, frozen_sh, loss_config),
        predictor=evaluation.Predictor(model, frozen, batch_size, decoding_config, length_buckets,
                                       targets_length))

  def resume(self, checkpointer: run_checkpoints.RunCheckpointer) -> int:
    """Restores the latest good checkpoint into `state`, if there is one, with this run's optimizer
    hyperparameters (a new LEARNING_RATE applies from here on); returns how many batches the run
    has consumed: one a step, whatever the checkpoint's data position says."""
    if checkpointer.latest_step() is None:
      return 0
    state, data_position = checkpointer.restore(abstract_state=self.state)
    state = state.replace(opt_state=optimizers.with_hyperparameters(state.opt_state,
                                                                    self.state.opt_state))
    self.state = jax.device_put(state, self.state_shardings)
    step = int(self.state.step)
    if data_position.get("batches_consumed") != step:
      logger.warning("Checkpoint %s/%d: its data position %s does not fit its step; resuming at "
                     "batch %d (one a step).", checkpointer.directory, step, data_position, step)
    logger.info("Resumed from %s at step %d.", checkpointer.model_dir, step)
    return step

  def place(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a batch -> the global batch of model features on the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items() if k in self.architecture.features}


class _TrainLoop:
  """The steps from the restored state to `train_steps`, with logging, evaluation and saving at
  their periods.

  The host dispatches step N + 1 before it reads whether step N was finite (reading waits for the
  device), so the device always has the next step queued while the host places batches and reads
  flags. At a step that logs, evaluates or saves, the step's own flags are read first: nothing
  non-finite is logged, evaluated or saved.
  """

  def __init__(self, steps: _CompiledSteps, data: _Data,
               checkpointer: run_checkpoints.RunCheckpointer, dataset_config: DatasetConfig,
               eval_config: EvalConfig, train_steps: int, checkpoint_period: int, log_period: int,
               skip_nonfinite_steps: bool, max_skipped_steps: int, norm_bound: float,
               log_batch_hashes: bool, progress_bar: Optional[bool], batches_consumed: int):
    self.steps, self.data, self.checkpointer = steps, data, checkpointer
    self.dataset_config, self.eval_config = dataset_config, eval_config
    self.train_steps, self.checkpoint_period, self.log_period = (train_steps, checkpoint_period,
                                                                  log_period)
    self.skip_nonfinite_steps, self.max_skipped_steps = skip_nonfinite_steps, max_skipped_steps
    self.norm_bound, self.log_batch_hashes = norm_bound, log_batch_hashes
    self.skipped_in_a_row = 0
    self.start_step = int(steps.state.step)
    fault_point("startup", self.start_step)
    # The same shuffled stream on every run (a function of the seed): batch s is the one of step
    # s + 1, and a resumed run skips the batches already consumed.
    per_process = dataset_config.batch_size // jax.process_count()
    self.batches: Iterator[dict[str, np.ndarray]] = batching.batch(
        data.train, per_process, dataset_config.task_feature_lengths["inputs"],
        dataset_config.length_buckets).skip(batches_consumed).as_numpy_iterator()
    self.metrics_log = metrics_logging.MetricsLogger(checkpointer.model_dir, train_steps,
                                                     self.start_step, progress_bar)
    self.window: Optional[dict[str, jax.Array]] = None  # metrics summed since the last log
    self.last_metrics: Optional[dict[str, jax.Array]] = None
    self.window_start = time.time()
    self.summary: dict[str, Any] = {"model_dir": checkpointer.model_dir,
                                    "start_step": self.start_step, "eval": {}}

  def run(self) -> dict[str, Any]:
    """Trains to `train_steps` (or to a SIGTERM); returns the summary."""
    step = self.start_step
    preemption = _Preemption()
    try:
      upcoming = self._next_batch() if step < self.train_steps else None
      unread = None  # (step, metrics) of the step whose finiteness the host has not read yet
      while step < self.train_steps:
        local, batch = upcoming
        if self.log_batch_hashes:
          self.metrics_log.record(
              step + 1, {"hash": _batch_hash(local, self.steps.architecture.features)},
              kind="batch")
        self.steps.state, metrics = self.steps.train_step(self.steps.state, self.steps.frozen,
                                                          batch)
        step += 1
        upcoming = self._next_batch() if step < self.train_steps else None
        fault_point("mid_step", step)
        if unread is not None:
          self._settle(*unread)
        unread = (step, metrics)
        preempted = preemption.requested()
        log_now = step % self.log_period == 0 or step == self.train_steps
        eval_now = (self.eval_config.period and not preempted
                    and (step % self.eval_config.period == 0 or step == self.train_steps))
        save_now = step % self.checkpoint_period == 0 or step == self.train_steps or preempted
        if log_now or eval_now or save_now:
          self._settle(*unread)
          unread = None
        if log_now:
          self._log(step)
        if eval_now:
          self._evaluate(step)
        if save_now:
          self._save(step)
        if preempted:
          logger.warning("SIGTERM: saved checkpoint %d in %s and stopped; rerun the same command "
                         "to resume.", step, self.checkpointer.directory)
          self.summary["preempted"] = True
          break
    finally:
      preemption.restore()
      self.metrics_log.close()
    prompt = trees.flatten(self.steps.state.trainable).get(self.steps.architecture.prompt_path)
    self.summary.update(
        final_step=step, prompt=None if prompt is None else np.asarray(prompt),
        numpy_checkpoints=os.path.join(self.checkpointer.model_dir, run_checkpoints.NUMPY_DIR))
    return self.summary

  def _next_batch(self) -> tuple[dict[str, np.ndarray], dict[str, jax.Array]]:
    """The next batch: this process's rows, and the global batch on the mesh."""
    local = next(self.batches)
    return local, self.steps.place(local)

  def _settle(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Reads whether `step` (already applied, or dropped on the device) was finite and its prompt
    bounded: adds its metrics to the log window, or raises NonFiniteError (or warns, with
    `skip_nonfinite_steps`, until `max_skipped_steps` steps in a row are dropped)."""
    loss_finite, prompt_finite, prompt_bounded = _read_finiteness(metrics)
    if loss_finite and prompt_finite and prompt_bounded:
      counted = {k: v for k, v in metrics.items() if k not in trainer.FINITENESS_METRICS}
      self.window = (counted if self.window is None
                     else jax.tree_util.tree_map(jnp.add, self.window, counted))
      self.last_metrics = counted
      self.skipped_in_a_row = 0
      return
    what = ("the loss is NaN or Inf" if not loss_finite else
            "the prompt is NaN or Inf" if not prompt_finite else
            f"the prompt diverged (a vector longer than {self.norm_bound:.3g}, "
            f"{DIVERGENCE_FACTOR:g} times the longest embedding's)")
    learning_rate = _learning_rate(self.steps.state)
    cause = ("The learning rate" + (f" ({learning_rate:g})" if learning_rate is not None else "")
             + " is most likely too high: lower it with --gin.LEARNING_RATE=... (a resumed run "
             "takes the new rate)")
    self.skipped_in_a_row += 1
    if not self.skip_nonfinite_steps:
      raise NonFiniteError(
          f"Step {step}: {what}; stopped without saving it. {self.checkpointer.last_good()} "
          f"{cause}, or set --gin.train.skip_nonfinite_steps=True to drop such steps.")
    if self.skipped_in_a_row >= self.max_skipped_steps:
      raise NonFiniteError(
          f"Step {step}: {what}; {self.skipped_in_a_row} steps in a row dropped "
          f"(train.max_skipped_steps={self.max_skipped_steps}), so the run stopped. "
          f"{self.checkpointer.last_good()} {cause}.")
    logger.warning("Step %d: %s; its update is dropped (skip_nonfinite_steps).", step, what)

  def _log(self, step: int) -> None:
    """Writes the window's per-token and per-example rates; starts the next window."""
    if self.window is None:  # every step of the window was dropped
      return
    window = jax.tree_util.tree_map(float, jax.device_get(self.window))
    seconds = max(time.time() - self.window_start, 1e-9)
    real_tokens = max(window["real_tokens"], 1.0)
    row = {"loss": float(self.last_metrics["loss"]), "z_loss": float(self.last_metrics["z_loss"]),
           "accuracy": window["correct_tokens"] / real_tokens,
           "grad_norm": float(self.last_metrics["grad_norm"]),
           "learning_rate": _learning_rate(self.steps.state),
           "examples_per_second": window["examples"] / seconds,
           "tokens_per_second": real_tokens / seconds}
    row = {k: v for k, v in row.items() if v is not None}
    self.metrics_log.write(step, row)
    self.summary["train"] = row
    self.window, self.window_start = None, time.time()

  def _evaluate(self, step: int) -> None:
    """Decodes and scores the eval split, logs its loss, and keeps the best prompt."""
    trainable, frozen = self.steps.state.trainable, self.steps.frozen
    self.steps.predictor.trainable = trainable
    results = evaluation.evaluate(self.data.evaluator, self.steps.predictor, step)
    fault_point("mid_eval", step)
    eval_on_mesh = lambda trainable, frozen, batch: self.steps.eval_step(
        trainable, frozen, partitioning.place_on_mesh(batch, self.steps.batch_sharding))
    self.metrics_log.write(step, evaluation.eval_loss(
        self.data.eval_dataset, eval_on_mesh, trainable, frozen, self.dataset_config.batch_size,
        self.steps.architecture.features, self.dataset_config.length_buckets), kind="eval")
    self.summary["eval"][step] = results
    for task, task_metrics in results.items():
      self.metrics_log.write(step, {k: v for k, v in task_metrics.items() if np.ndim(v) == 0},
                             kind=f"eval/{task}")
    best_metric = self.eval_config.best_metric
    if best_metric is not None:
      self.checkpointer.save_best_prompt(step, trainable, best_metric,
                                         _find_metric(results, best_metric),
                                         higher_is_better=self.eval_config.best_higher_is_better)

  def _save(self, step: int) -> None:
    self.checkpointer.save(step, self.steps.state, {"batches_consumed": step})
    fault_point("after_save", step)


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


def _run_identity(*, dataset_config: DatasetConfig, eval_config: EvalConfig,
                  checkpoint_config: CheckpointConfig, model_config: T5Config,
                  trainable_patterns: Sequence[str],
                  method: methods.Method = methods.prompt_tuning(),
                  assignment_map: Sequence[tuple[str, Optional[str]]] = (),
                  **settings) -> dict[str, Any]:
  """The JSON-able settings that identify a run, for `run_config.json`, under the flat names runs
  have always recorded (so runs written before the settings were grouped still resume)."""
  identity = dict(
      settings, mixture_or_task_name=dataset_config.mixture_or_task_name,
      task_feature_lengths=dict(dataset_config.task_feature_lengths),
      batch_size=dataset_config.batch_size, model_config=dataclasses.asdict(model_config),
      trainable_patterns=list(trainable_patterns), eval_period=eval_config.period,
      eval_num_examples=eval_config.num_examples, checkpoint_period=checkpoint_config.period,
      keep_checkpoints=checkpoint_config.keep)
  # Recorded only when set, so runs started before the setting existed still resume.
  if dataset_config.length_buckets:
    identity["length_buckets"] = list(dataset_config.length_buckets)
  if dataset_config.split != DatasetConfig.split:
    identity["split"] = dataset_config.split
  if not dataset_config.shuffle:
    identity["shuffle"] = False
  if assignment_map:
    identity["assignment_map"] = list(assignment_map)
  if checkpoint_config.keep_numpy is not None:
    identity["keep_numpy_checkpoints"] = checkpoint_config.keep_numpy
  if method != methods.prompt_tuning():
    identity["method"] = method
  if not eval_config.best_higher_is_better:
    identity["best_higher_is_better"] = False
  return _json_able(identity)


def _json_able(value: Any) -> Any:
  """`value` with dataclasses as dicts, tuples as lists and dtypes as their names."""
  if dataclasses.is_dataclass(value):
    return _json_able(dataclasses.asdict(value))
  if isinstance(value, dict):
    return {k: _json_able(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_able(v) for v in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return str(jnp.dtype(value))  # the only other kind of setting: a dtype


def _task_indexed(dataset_config: DatasetConfig, eval_config: EvalConfig, method: methods.Method
                  ) -> tuple[DatasetConfig, EvalConfig, methods.Method, list[str]]:
  """A multi-task prompt's run: its mixture (and eval mixture) with each input's task index as its
  first token (`tasks.common.task_indexed_mixture`), the method for those tasks, and their names."""
  name, method, task_names = run_setup.task_indexed(dataset_config.mixture_or_task_name, method)
  if eval_config.mixture_or_task_name is not None:
    eval_config = dataclasses.replace(eval_config, mixture_or_task_name=run_setup.task_indexed(
        eval_config.mixture_or_task_name, method)[0])
  logger.info("Multi-task prompt over %d tasks: %s.", len(task_names), ", ".join(task_names))
  return (dataclasses.replace(dataset_config, mixture_or_task_name=name), eval_config, method,
          task_names)


def _write_task_prompts(method: methods.Method, task_names: Sequence[str], trainable: Any,
                        model_dir: str) -> str:
  """Writes each task's whole prompt `[length, embed]` (the shared prompt combined with the task's)
  to `MODEL_DIR/task_prompts/TASK.npy`, for the prompt bank; returns the directory."""
  tree = jax.device_get(trainable)["encoder"]["prompt"]
  bank = prompts.fold_multitask(tree, method.multitask())
  directory = os.path.join(model_dir, "task_prompts")
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    for name, prompt in zip(task_names, bank):
      np.save(os.path.join(directory, f"{name}.npy"), prompt.astype(np.float32))
  return directory


def _write_folded(method: methods.Method, model_config: T5Config, trainable: Any, step: int,
                  model_dir: str) -> dict[str, Any]:
  """Writes the method's folded parameters (`Method.fold`) of the final `step` as numpy files to
  `MODEL_DIR/folded/checkpoint_{step}`; returns the summary's `folded` path (and its `prompt`, where
  the method has one)."""
  flat = {path: np.asarray(value) for path, value in
          trees.flatten(jax.device_get(trainable)).items()}
  folded = method.fold(flat, model_config)
  directory = os.path.join(model_dir, "folded", f"checkpoint_{step}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    run_checkpoints.write_numpy_params(directory, folded)
  summary = {"folded": directory}
  if checkpoints.PROMPT_PATH in folded:
    summary["prompt"] = folded[checkpoints.PROMPT_PATH]
  return summary


def _read_finiteness(metrics: dict[str, jax.Array]) -> tuple[bool, bool, bool]:
  """(the step's loss is finite, its prompt is finite, its prompt is bounded): the host's wait for
  that step."""
  return tuple(bool(x) for x in jax.device_get([metrics[k] for k in trainer.FINITENESS_METRICS]))


def _batch_hash(batch: Mapping[str, np.ndarray], features: Sequence[str]) -> int:
  """CRC32 of a batch's model `features` (fits a float exactly, for `train_metrics.jsonl`)."""
  return zlib.crc32(b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch)
                             if k in features))


def _learning_rate(state: trainer.TrainState) -> Optional[float]:
  """The current learning rate, where the optimizer keeps it (optax.inject_hyperparams)."""
  return optimizers.hyperparameters(state.opt_state).get("learning_rate")


def _find_metric(results: Mapping[str, Mapping[str, float]], name: str) -> float:
  """`name` is `metric` (the first task that has it) or `task/metric`."""
  task, _, metric = name.rpartition("/")
  for task_name, task_metrics in results.items():
    if (not task or task == task_name) and metric in task_metrics:
      return float(task_metrics[metric])
  raise ValueError(f"EvalConfig.best_metric {name!r} is not among the eval metrics "
                   f"{ {t: sorted(m) for t, m in results.items()} }.")
