"""The train and eval steps: pure functions of (state, frozen params, batch), compiled once with shardings.

`TrainState` holds only what learns (the prompt), its optimizer state and the step; the frozen model's
parameters are a separate argument that is never differentiated, never updated and never saved.
Batches use T5X's feature names, each `[batch, length]`: the model's architecture
(`architectures.of(model.config)`) reads its own (T5: `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights`) and gives logits at `decoder_target_tokens`, where
the loss weighted by `decoder_loss_weights` is taken.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from prompt_tuning_jax import architectures, freezing, losses, partitioning
from prompt_tuning_jax.network import T5

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, trainable, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), trainable=trainable,
               opt_state=optimizer.init(trainable), rng=rng)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """T5X's loss settings (`EncoderDecoderModel` and its `loss_normalizing_factor`)."""
  label_smoothing: float = 0.0
  z_loss: float = 1e-4
  loss_normalizing_factor: Union[None, float, str] = None


def _weights(batch: Batch) -> jax.Array:
  if "decoder_loss_weights" in batch:
    return batch["decoder_loss_weights"].astype(jnp.float32)
  return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def _loss_and_metrics(model: T5, params, batch: Batch, loss_config: LossConfig,
                      normalizer: Optional[jax.Array], dropout_rng: Optional[jax.Array]):
  """Loss, and summed metrics (loss, z_loss, correct tokens, real tokens, examples) of one batch."""
  logits = architectures.of(model.config).logits(model, params, batch, dropout_rng)
  weights = _weights(batch)
  loss, z_loss = losses.weighted_cross_entropy(
      logits, batch["decoder_target_tokens"], weights, label_smoothing=loss_config.label_smoothing,
      z_loss=loss_config.z_loss, loss_normalizing_factor=normalizer)
  correct = jnp.sum((losses.predicted_tokens(logits) == batch["decoder_target_tokens"]) * weights)
  metrics = {"loss": loss, "z_loss": z_loss, "correct_tokens": correct,
             "real_tokens": jnp.sum(weights),
             "examples": jnp.asarray(batch["decoder_target_tokens"].shape[0], jnp.float32)}
  return loss, metrics


def train_step(state: TrainState, frozen, batch: Batch, *, model: T5,
               optimizer: optax.GradientTransformation, loss_config: LossConfig = LossConfig(),
               num_microbatches: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; gradients are summed over `num_microbatches` slices of the batch.

  Returns the new state and summed metrics plus `learning_rate`-free derived ones (`accuracy`).
  The dropout key of step s is `fold_in(state.rng, s)`, so a resumed run draws the same masks.
  """
  normalizer = losses.normalizing_factor(loss_config.loss_normalizing_factor, _weights(batch))
  step_rng = jax.random.fold_in(state.rng, state.step)
  use_dropout = model.config.dropout_rate > 0

  def micro_grads(trainable, micro: Batch, rng):
    def loss_fn(trainable):
      params = freezing.merge(trainable, frozen)
      return _loss_and_metrics(model, params, micro, loss_config, normalizer,
                               rng if use_dropout else None)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return grads, metrics

  if num_microbatches == 1:
    grads, metrics = micro_grads(state.trainable, batch, step_rng)
  else:
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:]), batch)

    def accumulate(carry, inputs):
      index, micro_batch = inputs
      grads, metrics = micro_grads(state.trainable, micro_batch, jax.random.fold_in(step_rng, index))
      return jax.tree_util.tree_map(jnp.add, carry, (grads, metrics)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
        micro_grads, state.trainable, jax.tree_util.tree_map(lambda x: x[0], micro), step_rng))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_microbatches), micro))

  updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  metrics = dict(metrics, accuracy=metrics["correct_tokens"] / jnp.maximum(metrics["real_tokens"], 1),
                 grad_norm=optax.global_norm(grads))
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


FINITENESS_METRICS = ("loss_finite", "prompt_finite", "prompt_bounded")


def max_row_norm(tree) -> jax.Array:
  """The largest L2 norm of a row (along the last axis) of any leaf of `tree`: for a prompt
  `[length, embed]`, its longest vector."""
  return jnp.max(jnp.stack([
      jnp.max(jnp.sqrt(jnp.sum(jnp.square(jnp.atleast_1d(x).astype(jnp.float32)), axis=-1)))
      for x in jax.tree_util.tree_leaves(tree)]))


def with_finiteness(step_fn: Callable, skip_nonfinite: bool = False,
                    norm_bound: Optional[float] = None) -> Callable:
  """`step_fn(state, frozen, batch) -> (state, metrics)` whose metrics also say, as 0-d bools,
  whether the loss (`loss_finite`) and every new trainable value (`prompt_finite`) are finite, and
  whether no row of them is longer than `norm_bound` (`prompt_bounded`; always, without a bound): a
  prompt far longer than any embedding has diverged, even where its loss and gradients stay finite.

  With `skip_nonfinite`, a step where any is not keeps its input's trainable params and optimizer
  state (the step still counts). All happens on the device, so a loop may queue the next step before
  it reads this one's flags.
  """
  def checked_step(state: TrainState, frozen, batch: Batch):
    new_state, metrics = step_fn(state, frozen, batch)
    loss_finite = jnp.isfinite(metrics["loss"])
    prompt_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                       for x in jax.tree_util.tree_leaves(new_state.trainable)]))
    prompt_bounded = (jnp.asarray(True) if norm_bound is None
                      else max_row_norm(new_state.trainable) <= norm_bound)
    if skip_nonfinite:
      finite = loss_finite & prompt_finite & prompt_bounded
      updated_if_finite = lambda new, old: jax.tree_util.tree_map(
          lambda n, o: jnp.where(finite, n, o), new, old)
      new_state = new_state.replace(
          trainable=updated_if_finite(new_state.trainable, state.trainable),
          opt_state=updated_if_finite(new_state.opt_state, state.opt_state))
    return new_state, dict(metrics, loss_finite=loss_finite, prompt_finite=prompt_finite,
                           prompt_bounded=prompt_bounded)
  return checked_step


def eval_step(trainable, frozen, batch: Batch, *, model: T5,
              loss_config: LossConfig = LossConfig()) -> dict[str, jax.Array]:
  """Summed loss metrics of one batch, without dropout."""
  normalizer = losses.normalizing_factor(loss_config.loss_normalizing_factor, _weights(batch))
  _, metrics = _loss_and_metrics(model, freezing.merge(trainable, frozen), batch, loss_config,
                                 normalizer, None)
  return metrics


def _dot_options(model: T5, mesh: Mesh) -> dict[str, Any]:
  return architectures.of(model.config).compiler_options(mesh.devices.flat[0].platform)


def compile_train_step(model: T5, optimizer: optax.GradientTransformation, mesh: Mesh,
                       state_shardings, frozen_shardings, loss_config: LossConfig = LossConfig(),
                       num_microbatches: int = 1, skip_nonfinite: bool = False,
                       compiler_options: Optional[dict[str, Any]] = None,
                       norm_bound: Optional[float] = None) -> Callable:
  """`train_step` `with_finiteness` (`skip_nonfinite`, `norm_bound`) under `jax.jit`, with the state
  and frozen params placed by their shardings, the batch split over the mesh's `data` axis and
  activations sharded by the model's logical constraints; the old state's buffers are donated.
  Compiled with `compiler_options`, by default the model's architecture's for the mesh's platform
  (`architectures.EncoderDecoder.compiler_options`)."""
  step = partitioning.shard_activations(with_finiteness(functools.partial(
      train_step, model=model, optimizer=optimizer, loss_config=loss_config,
      num_microbatches=num_microbatches), skip_nonfinite, norm_bound), mesh)
  return jax.jit(step, in_shardings=(state_shardings, frozen_shardings,
                                     partitioning.batch_sharding(mesh)),
                 out_shardings=(state_shardings, partitioning.replicated(mesh)), donate_argnums=(0,),
                 compiler_options=(_dot_options(model, mesh) if compiler_options is None
                                   else compiler_options))


def compile_eval_step(model: T5, mesh: Mesh, trainable_shardings, frozen_shardings,
                      loss_config: LossConfig = LossConfig()) -> Callable:
  step = partitioning.shard_activations(
      functools.partial(eval_step, model=model, loss_config=loss_config), mesh)
  return jax.jit(step, in_shardings=(trainable_shardings, frozen_shardings,
                                     partitioning.batch_sharding(mesh)),
                 out_shardings=partitioning.replicated(mesh),
                 compiler_options=_dot_options(model, mesh))
