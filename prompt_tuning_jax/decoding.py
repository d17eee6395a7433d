"""Autoregressive decoding with a key/value cache: greedy, temperature/top-k/top-p sampling, beam search.

Each function is pure in (params, inputs[, rng]) and meant to run under `jax.jit` with the model and
the lengths bound, e.g. `jax.jit(functools.partial(greedy_decode, model, max_decode_length=8))`.
The decoder starts from token 0 (T5's start id is the pad id) and stops a row at `eos_id`; positions
after a row's EOS hold 0.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from prompt_tuning_jax import losses
from prompt_tuning_jax.layers import CROSS_CACHE
from prompt_tuning_jax.network import T5

NEG_INF = -1e10


def _init_cache(model: T5, params, encoded, encoded_mask, max_decode_length: int):
  """The cache for `[batch, max_decode_length]` decoding: zero self-attention keys and values, and
  the encoding's cross-attention keys and values."""
  dummy = jnp.zeros((encoded.shape[0], max_decode_length), jnp.int32)
  _, variables = model.apply({"params": params}, encoded, encoded_mask, dummy, decode=True,
                             max_decode_length=max_decode_length, method=T5.decode, mutable=["cache"])
  return variables["cache"]


def _step(model: T5, params, cache, encoded, encoded_mask, tokens, max_decode_length: int):
  """One decoder position: `[batch]` last tokens -> `[batch, vocab]` float32 logits, updated cache."""
  logits, variables = model.apply({"params": params, "cache": cache}, encoded, encoded_mask,
                                  tokens[:, None], decode=True, max_decode_length=max_decode_length,
                                  method=T5.decode, mutable=["cache"])
  return logits[:, 0], variables["cache"]


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Masks `[batch, vocab]` logits outside the top-k tokens and outside the top-p nucleus."""
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose probability reaches top_p: a token stays if the mass before it < top_p.
    keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def temperature_sample(model: T5, params, encoder_input_tokens: jax.Array, rng: Optional[jax.Array],
                       *, max_decode_length: int, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, eos_id: int = 1,
                       prompt_ids: Optional[jax.Array] = None,
                       prompt_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Samples `[batch, max_decode_length]` tokens; temperature 0 is greedy decoding.

  Returns the tokens and each row's log-likelihood `[batch]` under the model (untempered).
  `prompt_ids`, `prompt_lengths` `[batch]` pick each row's prompt from a prompt bank.
  """
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"temperature_sample: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                     f"temperature={temperature}, top_p={top_p}, top_k={top_k}.")
  encoded, encoded_mask = model.apply({"params": params}, encoder_input_tokens,
                                      prompt_ids=prompt_ids, prompt_lengths=prompt_lengths,
                                      method=T5.encode)
  batch = encoder_input_tokens.shape[0]
  cache = _init_cache(model, params, encoded, encoded_mask, max_decode_length)
  if rng is None:
    rng = jax.random.PRNGKey(0)

  def body(state):
    i, tokens, last, done, log_likelihood, cache, rng = state
    logits, cache = _step(model, params, cache, encoded, encoded_mask, last, max_decode_length)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if temperature == 0.0:
      chosen = losses.predicted_tokens(logits)
    else:
      rng, key = jax.random.split(rng)
      chosen = jax.random.categorical(key, filter_logits(logits / temperature, top_k, top_p))
    chosen = jnp.where(done, 0, chosen).astype(jnp.int32)
    picked = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
    log_likelihood = log_likelihood + jnp.where(done, 0.0, picked)
    tokens = tokens.at[:, i].set(chosen)
    done = done | (chosen == eos_id)
    return i + 1, tokens, chosen, done, log_likelihood, cache, rng

  def cond(state):
    i, _, _, done, *_ = state
    return (i < max_decode_length) & ~jnp.all(done)

  state = (0, jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch,), jnp.int32),
           jnp.zeros((batch,), bool), jnp.zeros((batch,)), cache, rng)
  _, tokens, _, _, log_likelihood, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens, log_likelihood


def greedy_decode(model: T5, params, encoder_input_tokens: jax.Array, *, max_decode_length: int,
                  eos_id: int = 1, prompt_ids: Optional[jax.Array] = None,
                  prompt_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """The most likely next token at each step: `[batch, max_decode_length]` tokens, `[batch]` scores."""
  return temperature_sample(model, params, encoder_input_tokens, None,
                            max_decode_length=max_decode_length, temperature=0.0, eos_id=eos_id,
                            prompt_ids=prompt_ids, prompt_lengths=prompt_lengths)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT's `((5 + length) / 6) ** alpha`, as T5X's beam search divides scores by it."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree, indices: jax.Array, batch: int, beams: int):
  """Picks `indices` `[batch, new_beams]` from every `[batch * beams, ...]` leaf. Scalars pass, and so
  do the encoding's cross-attention keys and values (`CROSS_CACHE`): every beam of an example has the
  same ones, and `indices` pick within an example."""
  def gather(path, x):
    if x.ndim == 0 or getattr(path[-1], "key", None) in CROSS_CACHE:
      return x
    x = x.reshape((batch, beams) + x.shape[1:])
    x = jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)
    return x.reshape((-1,) + x.shape[2:])
  return jax.tree_util.tree_map_with_path(gather, tree)


def beam_search(model: T5, params, encoder_input_tokens: jax.Array, *, max_decode_length: int,
                beam_size: int = 4, alpha: float = 0.6, eos_id: int = 1,
                prompt_ids: Optional[jax.Array] = None,
                prompt_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Beam search with a length penalty.

  Returns the beams sorted best first, `[batch, beam_size, max_decode_length]`, and their scores
  `[batch, beam_size]` (log-likelihood / length_penalty(length, alpha)). A search ends when no live beam
  can beat the worst finished one any more, or at `max_decode_length`.
  """
  if beam_size < 1:
    raise ValueError(f"beam_search: beam_size must be at least 1, got {beam_size}.")
  batch, k, length = encoder_input_tokens.shape[0], beam_size, max_decode_length
  encoded, encoded_mask = model.apply({"params": params}, encoder_input_tokens,
                                      prompt_ids=prompt_ids, prompt_lengths=prompt_lengths,
                                      method=T5.encode)
  encoded = jnp.repeat(encoded, k, axis=0)
  encoded_mask = jnp.repeat(encoded_mask, k, axis=0)
  cache = _init_cache(model, params, encoded, encoded_mask, length)
  top_penalty = length_penalty(jnp.float32(length), alpha)

  def body(state):
    i, live_seqs, live_logp, fin_seqs, fin_scores, cache = state
    last = jnp.where(i == 0, 0, live_seqs[:, :, jnp.maximum(i - 1, 0)]).reshape(-1)
    logits, cache = _step(model, params, cache, encoded, encoded_mask, last, length)
    vocab = logits.shape[-1]
    candidates = (live_logp[:, :, None] + jax.nn.log_softmax(logits).reshape(batch, k, vocab))
    candidates = candidates.reshape(batch, k * vocab)
    top_logp, top_index = jax.lax.top_k(candidates, 2 * k)
    beam_index, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(live_seqs, beam_index[:, :, None], axis=1).at[:, :, i].set(token)
    is_eos = token == eos_id
    # Live: the best k that did not just end. Finished: the best k of old and newly ended.
    live_logp_2k = jnp.where(is_eos, NEG_INF, top_logp)
    new_live_logp, live_pick = jax.lax.top_k(live_logp_2k, k)
    new_live = jnp.take_along_axis(seqs, live_pick[:, :, None], axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(beam_index, live_pick, axis=1), batch, k)
    ended_scores = jnp.where(is_eos, top_logp / length_penalty(i + 1.0, alpha), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, ended_scores], axis=1)
    fin_scores, fin_pick = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], axis=1), fin_pick[:, :, None],
                                   axis=1)
    return i + 1, new_live, new_live_logp, fin_seqs, fin_scores, cache

  def cond(state):
    i, _, live_logp, _, fin_scores, _ = state
    # The best a live beam can still reach is its log-prob now under the largest penalty.
    best_live = live_logp[:, 0] / top_penalty
    worst_finished = jnp.min(fin_scores, axis=1)
    improvable = jnp.any(best_live > worst_finished)
    return (i < length) & improvable

  initial_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1))
  state = (0, jnp.zeros((batch, k, length), jnp.int32), initial_logp,
           jnp.zeros((batch, k, length), jnp.int32), jnp.full((batch, k), NEG_INF), cache)
  _, live_seqs, live_logp, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, state)
  # Rows where nothing finished fall back to their live beams (which ran out of length).
  none_finished = jnp.all(fin_scores <= NEG_INF / 2, axis=1)
  seqs = jnp.where(none_finished[:, None, None], live_seqs, fin_seqs)
  scores = jnp.where(none_finished[:, None], live_logp / top_penalty, fin_scores)
  return seqs, scores
