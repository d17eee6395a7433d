"""The attention cores, `softmax(query . key + bias) . value`, with their backward passes written out.

Differentiated as written, a softmax keeps its normalised weights `[batch, heads, q, k]` for the backward
pass and sums `d_weights * weights` over every key to get its input gradient. `dot_product_attention`
computes the same values and gradients in fewer passes over those `[q, k]` arrays, as flash attention
does (Dao et al., 2022): the forward pass divides the context `[batch, q, heads, kv]` by the softmax
sums instead of dividing the weights, and the backward pass reads that sum off the context,
`sum_k(d_weights * weights) = sum_kv(d_context * context)`. Both hold with dropout on the weights.
On the T5 1.1 Small prompt-tuning step on 2 CPU cores (`benchmarks/train_benchmark.py`) the step ran
about 2.5% faster (steps of both programs alternating in one process).

`attention_over_inputs` is the same for a cross-attention whose keys and values are its unprojected
inputs (`network.MultiHeadAttention` folds the kernels into the query and the output when few queries
attend to a long input). Its logits are laid out `[batch, k, q, heads]`, so that the logits and the
weights' gradient are, per example, `[k, embed] x [embed, q * heads]` products, which oneDNN ran
1.5-2x as fast on 2 CPU cores as the `[q * heads, embed] x [embed, k]` of a `[batch, q, heads, k]`
layout; and the inputs' gradient, to which logits and context both contribute, is one product over
`2q * heads` instead of two and a sum. The T5 1.1 Small step (8 decoder layers of 8 targets over a
228-position encoding) ran 2.7-3.1% faster.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array,
                          dropout_scale: Optional[jax.Array] = None, *, kv_axes: str = "bkhd",
                          logits_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Attention of `[batch, q, heads, kv]` queries over keys and values laid out as `kv_axes` (`bkhd`:
  `[batch, k, heads, kv]`, or `bhkd`), with `bias` broadcastable to `[batch, heads, q, k]` added to the
  logits; returns `[batch, q, heads, kv]` in the values' dtype.

  Logits and softmax are computed in `logits_dtype`. `dropout_scale` (`[batch, heads, q, k]`, `1 / keep`
  where a weight is kept and 0 where it is dropped) multiplies the softmax weights.
  """
  if kv_axes not in ("bkhd", "bhkd"):
    raise ValueError(f"kv_axes={kv_axes!r}: use 'bkhd' or 'bhkd'.")
  return _attention(kv_axes, jnp.dtype(logits_dtype), query, key, value, bias, dropout_scale)


def _queries_first(x: jax.Array) -> jax.Array:
  """`[batch, heads, q, kv]` -> `[batch, q, heads, kv]`. The products over the keys that give a row per
  query (the context and the queries' gradient) are written with heads first and transposed after:
  XLA then runs them as `[q, k] x [k, kv]` products rather than transposed ones, `[kv, k] x [k, q]`,
  which oneDNN ran at 2/3 of the speed."""
  return jnp.swapaxes(x, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(kv_axes, logits_dtype, query, key, value, bias, dropout_scale):
  return _forward(kv_axes, logits_dtype, query, key, value, bias, dropout_scale)[0]


def _forward(kv_axes, logits_dtype, query, key, value, bias, dropout_scale):
  """The context and what the backward pass needs: the unnormalised weights `[batch, heads, q, k]`
  and one over their sums `[batch, heads, q]`."""
  logits = jnp.einsum(f"bqhd,{kv_axes}->bhqk", query.astype(logits_dtype), key.astype(logits_dtype))
  unnormalised, inverse_sum = _softmax_parts(logits + bias.astype(logits_dtype), axis=-1)
  kept = _dropped(unnormalised, dropout_scale)
  context = jnp.einsum(f"bhqk,{kv_axes}->bhqd", kept.astype(value.dtype), value)
  context = _queries_first((context * inverse_sum[..., None]).astype(value.dtype))
  return context, (query, key, value, bias, dropout_scale, unnormalised, inverse_sum, context)


def _backward(kv_axes, logits_dtype, residuals, d_context):
  query, key, value, bias, dropout_scale, unnormalised, inverse_sum, context = residuals
  # sum_k(d_weights * weights) per query, read off the context: [batch, heads, q].
  d_sum = jnp.swapaxes(jnp.sum(d_context.astype(logits_dtype) * context.astype(logits_dtype), -1), 1, 2)
  d_weights = _dropped(jnp.einsum(f"bqhd,{kv_axes}->bhqk", d_context, value).astype(logits_dtype),
                       dropout_scale)
  d_logits = unnormalised * inverse_sum[..., None] * (d_weights - d_sum[..., None])
  d_query = _queries_first(jnp.einsum(f"bhqk,{kv_axes}->bhqd", d_logits.astype(key.dtype), key))
  d_key = jnp.einsum(f"bhqk,bqhd->{kv_axes}", d_logits.astype(query.dtype), query)
  kept = _dropped(unnormalised, dropout_scale)
  d_value = jnp.einsum(f"bhqk,bqhd->{kv_axes}", kept.astype(value.dtype),
                       (d_context * _queries_first(inverse_sum[..., None])).astype(value.dtype))
  d_scale = None if dropout_scale is None else jnp.zeros_like(dropout_scale)
  return (d_query.astype(query.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype),
          _sum_to_shape(d_logits, bias.shape).astype(bias.dtype), d_scale)


def _softmax_parts(logits: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """The softmax over `axis` as `exp(logits - max)` and one over its sums (that axis dropped)."""
  unnormalised = jnp.exp(logits - jnp.max(logits, axis=axis, keepdims=True))
  return unnormalised, 1.0 / jnp.sum(unnormalised, axis=axis)


def _dropped(weights: jax.Array, dropout_scale: Optional[jax.Array]) -> jax.Array:
  """Softmax `weights` after dropout: times `dropout_scale` where one is given."""
  return weights if dropout_scale is None else weights * dropout_scale.astype(weights.dtype)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`x` summed over the axes along which `shape` was broadcast to `x.shape`."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                    if n == 1 and x.shape[lead + i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


_attention.defvjp(_forward, _backward)


def attention_over_inputs(query: jax.Array, inputs: jax.Array, bias: jax.Array,
                          dropout_scale: Optional[jax.Array] = None, *,
                          logits_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Attention of `[batch, q, heads, embed]` queries over unprojected `inputs` `[batch, k, embed]`, which
  serve as both keys and values: `softmax(query . inputs + bias) . inputs`, `[batch, q, heads, embed]`.

  The logits are laid out `[batch, k, q, heads]` (see above): `bias` must broadcast to that, and
  `dropout_scale` (as in `dot_product_attention`) has that shape.
  """
  return _over_inputs(jnp.dtype(logits_dtype), query, inputs, bias, dropout_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _over_inputs(logits_dtype, query, inputs, bias, dropout_scale):
  return _over_inputs_forward(logits_dtype, query, inputs, bias, dropout_scale)[0]


def _over_inputs_forward(logits_dtype, query, inputs, bias, dropout_scale):
  logits = jnp.einsum("bke,bqhe->bkqh", inputs.astype(logits_dtype), query.astype(logits_dtype))
  unnormalised, inverse_sum = _softmax_parts(logits + bias.astype(logits_dtype), axis=1)
  kept = _dropped(unnormalised, dropout_scale).astype(inputs.dtype)
  context = jnp.einsum("bkqh,bke->bqhe", kept, inputs)
  context = (context * inverse_sum[..., None]).astype(inputs.dtype)
  return context, (query, inputs, bias, dropout_scale, unnormalised, inverse_sum, context)


def _over_inputs_backward(logits_dtype, residuals, d_context):
  query, inputs, bias, dropout_scale, unnormalised, inverse_sum, context = residuals
  d_sum = jnp.sum(d_context.astype(logits_dtype) * context.astype(logits_dtype), -1)  # [b, q, heads]
  d_weights = _dropped(jnp.einsum("bqhe,bke->bkqh", d_context, inputs).astype(logits_dtype),
                       dropout_scale)
  d_logits = unnormalised * inverse_sum[:, None] * (d_weights - d_sum[:, None])
  d_query = jnp.einsum("bkqh,bke->bqhe", d_logits.astype(inputs.dtype), inputs)
  # Both uses of the inputs in one product over [2q, heads]: d_logits . query + kept . d_context'.
  kept = _dropped(unnormalised, dropout_scale)
  left = jnp.concatenate([d_logits, kept], axis=2).astype(inputs.dtype)
  right = jnp.concatenate([query, d_context * inverse_sum[..., None]], axis=1).astype(inputs.dtype)
  d_inputs = jnp.einsum("bkqh,bqhe->bke", left, right)
  d_scale = None if dropout_scale is None else jnp.zeros_like(dropout_scale)
  return (d_query.astype(query.dtype), d_inputs.astype(inputs.dtype),
          _sum_to_shape(d_logits, bias.shape).astype(bias.dtype), d_scale)


_over_inputs.defvjp(_over_inputs_forward, _over_inputs_backward)
