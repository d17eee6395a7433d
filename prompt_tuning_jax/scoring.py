"""Scoring: the log-likelihood of given targets, and rank classification over a label set."""
from typing import Optional

import jax
import jax.numpy as jnp

from prompt_tuning_jax.network import T5


def shift_right(targets: jax.Array) -> jax.Array:
  """Decoder inputs from targets `[batch, length]`: T5's start token 0, then the targets, one late."""
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


def sequence_log_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Sum of log p(target token) over non-pad (id > 0) positions: `[b, t, vocab]`, `[b, t]` -> `[b]`."""
  logits = logits.astype(jnp.float32)
  # logit[target] - logsumexp(logits): no `[b, t, vocab]` log-softmax is materialised.
  token_log_probs = (jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
                     - jax.nn.logsumexp(logits, axis=-1))
  return jnp.sum(jnp.where(targets > 0, token_log_probs, 0.0), axis=-1)


def score(model: T5, params, encoder_input_tokens: jax.Array, targets: jax.Array,
          prompt_ids: Optional[jax.Array] = None,
          prompt_lengths: Optional[jax.Array] = None) -> jax.Array:
  """Per-example log-likelihood of `targets` `[batch, out_len]` given inputs `[batch, in_len]`: `[batch]`.

  `prompt_ids`, `prompt_lengths` `[batch]` pick each row's prompt from a prompt bank.
  """
  logits = model.apply({"params": params}, encoder_input_tokens, shift_right(targets), targets,
                       prompt_ids=prompt_ids, prompt_lengths=prompt_lengths)
  return sequence_log_likelihood(logits, targets)


def rank_classify(model: T5, params, encoder_input_tokens: jax.Array, label_targets: jax.Array,
                  prompt_ids: Optional[jax.Array] = None,
                  prompt_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Scores every label for every input; the encoder runs once per input.

  Args:
    encoder_input_tokens: `[batch, in_len]`.
    label_targets: `[num_labels, out_len]`, each label's target ids (with EOS), 0-padded.
  Returns:
    the best label index `[batch]` and the log-likelihoods `[batch, num_labels]`.
  """
  batch, num_labels = encoder_input_tokens.shape[0], label_targets.shape[0]
  encoded, mask = model.apply({"params": params}, encoder_input_tokens, prompt_ids=prompt_ids,
                              prompt_lengths=prompt_lengths, method=T5.encode)
  targets = jnp.tile(label_targets, (batch, 1))
  logits = model.apply({"params": params}, jnp.repeat(encoded, num_labels, axis=0),
                       jnp.repeat(mask, num_labels, axis=0), shift_right(targets), targets,
                       method=T5.decode)
  log_likelihood = sequence_log_likelihood(logits, targets).reshape(batch, num_labels)
  return jnp.argmax(log_likelihood, axis=-1), log_likelihood
