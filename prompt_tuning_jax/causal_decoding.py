"""Generation from the decoder-only `causal_lm.CausalLM` with a key/value cache in which each
prompt's keys and values are computed once and shared by every row that uses it.

A soft prompt placed `prefix` (`[P; X]`) or `prefix_after_bos` (`[BOS; P; X]`) is the same prefix
of every row that uses it, and causal attention makes its keys and values independent of what
follows. So `generate` runs three phases, all in one jitted function:
  1. the prompts: one prefill of `[N, S]` positions for a bank of N prompts (N = 1 for a single
     prompt), S = P + 1: the prompt after `bos_id`, or the prompt (and one masked slot);
  2. the rows: each row's own tokens (without its BOS, which the prefix holds) attend to its
     prompt's keys and values, gathered by `prompt_ids`; a mixed-task batch costs one prefill per
     prompt, not per row;
  3. the new tokens, one step at a time, each attending to the row's cache `[S + T + steps]`.
The rows' cache holds a copy of its prompt's keys and values (gathered once, after phase 1); the
prompts are computed once. Positions, the causal mask and the pinned prompt of sliding-window
layers are the full forward pass's (`causal_lm`), so generation equals step-by-step full passes.

Rows are left-padded (their last real token at the end), as for transformers' `generate`. With
`prefix_after_bos` every row's first real token must be `bos_id`. Rows sharing a prompt of a bank
share its `prompt_lengths`. After a row's `eos_id` its tokens are 0.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from prompt_tuning_jax import decoding, losses
from prompt_tuning_jax.causal_lm import CausalLM, KeyLayout, positions_of

KeyValues = list[tuple[jax.Array, jax.Array]]  # per layer, `[batch, keys, kv_heads, head_dim]`


def _concat_layouts(*layouts: KeyLayout) -> KeyLayout:
  return KeyLayout(*(jnp.concatenate(parts, axis=1) for parts in zip(*layouts)))


def prefill_prompts(model: CausalLM, params, prompt_lengths: Optional[jax.Array] = None,
                    bos_id: Optional[int] = None) -> tuple[KeyValues, KeyLayout]:
  """Keys and values of every prompt of the model's bank (or its one prompt): per layer
  `[N, P + 1, kv_heads, head_dim]`, and their layout `[N, P + 1]` (positions, real, pinned).

  `prompt_lengths` `[N]` are the prompts' real lengths (default: all P); `bos_id` the token
  before them for `prefix_after_bos`.
  """
  config = model.prompt_config
  count = config.bank_size or 1
  after_bos = config.combine == "prefix_after_bos"
  call = lambda method, *args: model.apply({"params": params}, *args, method=method)
  # One token for PromptInput to place the prompt around: the BOS, or a masked slot after it.
  first = jnp.full((count, 1), bos_id if after_bos else 0, jnp.int32)
  x, mask, pinned, _ = call(CausalLM.add_prompt, call(CausalLM.embed, first),
                            jnp.full((count, 1), after_bos),
                            None if config.bank_size is None else jnp.arange(count), prompt_lengths)
  positions = positions_of(mask)
  layout = KeyLayout(positions, mask, pinned)
  return call(CausalLM.run_layers, x, positions, layout)[1], layout


def generate(model: CausalLM, params, tokens: jax.Array, input_mask: jax.Array,
             rng: Optional[jax.Array] = None, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int, bos_id: Optional[int] = None,
             prompt_ids: Optional[jax.Array] = None,
             prompt_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Continues left-padded rows `[batch, T]` (`input_mask` marks their real tokens).

  Temperature 0 is greedy; otherwise tokens are sampled from the logits over `temperature`, within
  the `top_k` tokens and the `top_p` nucleus (`decoding`'s filters), with `rng`.
  `prompt_ids`, `prompt_lengths` `[batch]` pick each row's prompt from a bank and give its length.
  Meant for `jax.jit` with the model and the keyword settings bound.

  Returns:
    The new tokens `[batch, max_new_tokens]` and each row's log-likelihood of them `[batch]`
    (untempered).
  """
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0 or max_new_tokens <= 0:
    raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and "
                     f"max_new_tokens > 0; got temperature={temperature}, top_p={top_p}, "
                     f"top_k={top_k}, max_new_tokens={max_new_tokens}.")
  call = lambda method, *args: model.apply({"params": params}, *args, method=method)
  cfg, (batch, length) = model.config, tokens.shape
  mask = input_mask.astype(bool)
  # Without a prompt, the prefix is empty.
  empty = jnp.zeros((batch, 0, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
  prefix = [(empty, empty)] * cfg.num_layers
  prefix_layout = KeyLayout(*(jnp.zeros((batch, 0), dtype) for dtype in (jnp.int32, bool, bool)))
  if model.prompt_config is not None:
    config = model.prompt_config
    if config.combine not in ("prefix", "prefix_after_bos"):
      raise ValueError(f"generate shares prompts placed first; PromptConfig.combine="
                       f"{config.combine!r} puts them among each row's tokens: use 'prefix' or "
                       "'prefix_after_bos'.")
    if config.combine == "prefix_after_bos" and bos_id is None:
      raise ValueError("generate needs bos_id (the token each row starts with) for "
                       "PromptConfig.combine='prefix_after_bos'.")
    count = config.bank_size or 1
    row_prompts = jnp.zeros(batch, jnp.int32) if prompt_ids is None else prompt_ids
    lengths = None if prompt_lengths is None else (
        jnp.zeros(count, jnp.int32).at[row_prompts].max(prompt_lengths))
    kv, layout = prefill_prompts(model, params, lengths, bos_id)
    prefix = [(k[row_prompts], v[row_prompts]) for k, v in kv]
    prefix_layout = KeyLayout(*(a[row_prompts] for a in layout))
    if config.combine == "prefix_after_bos":  # the prefix holds each row's BOS
      first = jnp.argmax(mask, axis=1)
      mask = mask & (jnp.arange(length)[None, :] != first[:, None])

  positions = prefix_layout.mask.sum(axis=1, dtype=jnp.int32)[:, None] + positions_of(mask)
  own_layout = KeyLayout(positions, mask, jnp.zeros_like(mask))
  y, own = call(CausalLM.run_layers, call(CausalLM.embed, tokens), positions,
                _concat_layouts(prefix_layout, own_layout), prefix)
  logits = call(CausalLM.logits, y[:, -1:])[:, 0]
  # The rows' cache: the prompt's keys and values, the rows' own, room for the new tokens'.
  pad = lambda a: jnp.zeros((batch, max_new_tokens) + a.shape[2:], a.dtype)
  cache = [tuple(jnp.concatenate([before, kv, pad(kv)], axis=1) for before, kv in zip(p, o))
           for p, o in zip(prefix, own)]
  cache_layout = _concat_layouts(prefix_layout, own_layout,
                                 KeyLayout(*(pad(a) for a in own_layout)))
  first_new = prefix_layout.mask.shape[1] + length  # cache index of the first new token

  def body(state):
    i, out, done, log_likelihood, logits, position, cache, layout, rng = state
    if temperature == 0.0:
      chosen = losses.predicted_tokens(logits)
    else:
      rng, key = jax.random.split(rng)
      chosen = jax.random.categorical(key, decoding.filter_logits(logits / temperature, top_k,
                                                                  top_p))
    chosen = jnp.where(done, 0, chosen).astype(jnp.int32)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], axis=-1)[:, 0]
    log_likelihood = log_likelihood + jnp.where(done, 0.0, picked)
    out = out.at[:, i].set(chosen)
    done = done | (chosen == eos_id)
    # The chosen token's pass: it attends to the cache and itself, and its keys join the cache.
    position = position + 1
    step_layout = KeyLayout(position[:, None], jnp.ones((batch, 1), bool),
                            jnp.zeros((batch, 1), bool))
    y, own = call(CausalLM.run_layers, call(CausalLM.embed, chosen[:, None]), position[:, None],
                  _concat_layouts(layout, step_layout), cache)
    slot = first_new + i
    cache = [tuple(jax.lax.dynamic_update_slice_in_dim(c, o, slot, axis=1) for c, o in zip(kv, new))
             for kv, new in zip(cache, own)]
    layout = KeyLayout(*(jax.lax.dynamic_update_slice_in_dim(a, s, slot, axis=1)
                         for a, s in zip(layout, step_layout)))
    logits = call(CausalLM.logits, y)[:, 0]
    return i + 1, out, done, log_likelihood, logits, position, cache, layout, rng

  def cond(state):
    i, _, done, *_ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  state = (0, jnp.zeros((batch, max_new_tokens), jnp.int32), jnp.zeros(batch, bool),
           jnp.zeros(batch), logits, positions[:, -1], cache, cache_layout,
           jax.random.PRNGKey(0) if rng is None else rng)
  _, out, _, log_likelihood, *_ = jax.lax.while_loop(cond, body, state)
  return out, log_likelihood
