"""T5X's training loss: cross entropy with label smoothing and z-loss, weighted and normalised; and the
predicted tokens that accuracy counts and greedy decoding takes."""
from typing import Optional, Union

import jax
import jax.numpy as jnp

# `loss_normalizing_factor` may be this string: divide by the batch's number of real target tokens.
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"


def normalizing_factor(factor: Union[None, float, str], weights: jax.Array) -> Optional[jax.Array]:
  """Resolves T5X's `loss_normalizing_factor` (None: plain sum; a number; or NUM_REAL_TARGET_TOKENS)."""
  if factor is None:
    return None
  if factor == NUM_REAL_TARGET_TOKENS:
    return jnp.maximum(jnp.sum(weights), 1.0)
  if isinstance(factor, str):
    raise ValueError(f"loss_normalizing_factor={factor!r}: use None, a number, or "
                     f"{NUM_REAL_TARGET_TOKENS!r}.")
  return jnp.asarray(factor, jnp.float32)


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                           label_smoothing: float = 0.0, z_loss: float = 1e-4,
                           loss_normalizing_factor: Optional[jax.Array] = None
                           ) -> tuple[jax.Array, jax.Array]:
  """Summed loss and its z-loss part over `[batch, length, vocab]` logits, `[batch, length]` targets.

  As T5X: soft targets with `label_smoothing` (minus the entropy of the soft targets, so a perfect model
  scores 0), plus `z_loss * log(Z)^2` per token to keep the softmax normaliser near 1, times `weights`,
  summed, and divided by `loss_normalizing_factor` when given.
  """
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
  log_z = jax.nn.logsumexp(logits, axis=-1)
  token_loss = -jnp.sum(soft * (logits - log_z[..., None]), axis=-1) - entropy
  token_z_loss = z_loss * jnp.square(log_z)
  loss = jnp.sum((token_loss + token_z_loss) * weights)
  total_z_loss = jnp.sum(token_z_loss * weights)
  if loss_normalizing_factor is not None:
    loss, total_z_loss = loss / loss_normalizing_factor, total_z_loss / loss_normalizing_factor
  return loss, total_z_loss


def predicted_tokens(logits: jax.Array) -> jax.Array:
  """`[..., vocab]` logits -> `[...]` int32 index of the largest: `jnp.argmax(logits, -1)` (the first
  maximum, or the first NaN), as a max and a min: one-operand reductions, which XLA:CPU runs much
  faster than argmax's two-operand one (`benchmarks/README.md`)."""
  vocab = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  at_top = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(at_top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
