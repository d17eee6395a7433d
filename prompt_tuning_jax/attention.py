"""Attention cores, `softmax(query . key + bias) . value` over `[batch, length, heads, head_dim]` arrays.

`dot_product_attention` runs one of three implementations (`ExecutionConfig.attention`), each giving
the same values and gradients within float rounding:
  - `"xla"`: T5X's einsums and softmax as written, differentiated by JAX: the reference.
  - `"cudnn"`: cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`), for
    NVIDIA GPUs in bfloat16 or float16. cuDNN's kernel has no dropout and decoding's one-query steps
    gain nothing from it, so those calls run `"xla"`.
  - `"cpu"`: the backward pass written out in flash attention's passes (Dao et al., 2022): the forward
    pass divides the context by the softmax sums instead of dividing the `[q, k]` weights, and the
    backward pass reads `sum_k(d_weights * weights)` off the context, so fewer passes run over the
    `[batch, heads, q, k]` arrays; products are laid out as oneDNN's dots run them fastest.
    `attention_over_inputs` is its core for a cross-attention over unprojected inputs
    (`cpu_attention`).
T5 does not scale the logits (the scaling is folded into the query's initialiser). Dropout on the
weights is T5X's: one keep mask per key, shared by every query (`dropout_scale`).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

CORES = ("xla", "cudnn", "cpu")


def dropout_scale(rng: jax.Array, rate: float, shape: tuple[int, int, int, int],
                  dtype: jnp.dtype) -> jax.Array:
  """T5X's attention dropout as a factor `[batch, heads, 1, k]` for weights `shape` `[batch, heads,
  q, k]`: `1 / keep` where a key is kept, 0 where it is dropped, the same for every query."""
  batch, heads, _, keys = shape
  keep = jax.random.bernoulli(rng, 1.0 - rate, (batch, heads, 1, keys))
  return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array,
                          scale: Optional[jax.Array] = None, *, implementation: str = "xla",
                          logits_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Attention of `[batch, q, heads, d]` queries over `[batch, k, heads, d]` keys and values, with
  `bias` broadcastable to `[batch, heads, q, k]` added to the logits; returns `[batch, q, heads, d]` in
  the values' dtype. `scale` (`dropout_scale`, or None) multiplies the softmax weights; logits and
  softmax are computed in `logits_dtype`."""
  if implementation not in CORES:
    raise ValueError(f"attention implementation {implementation!r}: use one of {CORES}.")
  if implementation == "cudnn" and scale is None and query.shape[1] > 1:
    return jax.nn.dot_product_attention(query, key, value.astype(query.dtype),
                                        bias=jnp.broadcast_to(bias, _logits_shape(query, key)
                                                              ).astype(query.dtype),
                                        scale=1.0, implementation="cudnn").astype(value.dtype)
  if implementation == "cpu":
    return _attention(jnp.dtype(logits_dtype), query, key, value, bias, scale)
  return _xla_attention(query, key, value, bias, scale, jnp.dtype(logits_dtype))


def _logits_shape(query: jax.Array, key: jax.Array) -> tuple[int, int, int, int]:
  return (query.shape[0], query.shape[2], query.shape[1], key.shape[1])


def _xla_attention(query, key, value, bias, scale, logits_dtype):
  """T5X's `dot_product_attention`, as written."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(logits_dtype), key.astype(logits_dtype))
  weights = jax.nn.softmax(logits + bias.astype(logits_dtype)).astype(value.dtype)
  weights = _dropped(weights, scale)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _queries_first(x: jax.Array) -> jax.Array:
  """`[batch, heads, q, d]` -> `[batch, q, heads, d]`. The products that give a row per query (the
  context and the queries' gradient) are written heads first and transposed after, so that XLA runs
  them as `[q, k] x [k, d]` products rather than transposed ones, which oneDNN ran slower."""
  return jnp.swapaxes(x, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(logits_dtype, query, key, value, bias, scale):
  return _forward(logits_dtype, query, key, value, bias, scale)[0]


def _forward(logits_dtype, query, key, value, bias, scale):
  """The context and what the backward pass needs: the unnormalised weights `[batch, heads, q, k]`
  and one over their sums `[batch, heads, q]`."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(logits_dtype), key.astype(logits_dtype))
  unnormalised, inverse_sum = _softmax_parts(logits + bias.astype(logits_dtype), axis=-1)
  kept = _dropped(unnormalised, scale)
  context = jnp.einsum("bhqk,bkhd->bhqd", kept.astype(value.dtype), value)
  context = _queries_first((context * inverse_sum[..., None]).astype(value.dtype))
  return context, (query, key, value, bias, scale, unnormalised, inverse_sum, context)


def _backward(logits_dtype, residuals, d_context):
  query, key, value, bias, scale, unnormalised, inverse_sum, context = residuals
  # sum_k(d_weights * weights) per query, read off the context: [batch, heads, q].
  d_sum = jnp.swapaxes(jnp.sum(d_context.astype(logits_dtype) * context.astype(logits_dtype), -1), 1, 2)
  d_weights = _dropped(jnp.einsum("bqhd,bkhd->bhqk", d_context, value).astype(logits_dtype), scale)
  d_logits = unnormalised * inverse_sum[..., None] * (d_weights - d_sum[..., None])
  d_query = _queries_first(jnp.einsum("bhqk,bkhd->bhqd", d_logits.astype(key.dtype), key))
  d_key = jnp.einsum("bhqk,bqhd->bkhd", d_logits.astype(query.dtype), query)
  kept = _dropped(unnormalised, scale)
  d_value = jnp.einsum("bhqk,bqhd->bkhd", kept.astype(value.dtype),
                       (d_context * _queries_first(inverse_sum[..., None])).astype(value.dtype))
  d_scale = None if scale is None else jnp.zeros_like(scale)
  return (d_query.astype(query.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype),
          _sum_to_shape(d_logits, bias.shape).astype(bias.dtype), d_scale)


def _softmax_parts(logits: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """The softmax over `axis` as `exp(logits - max)` and one over its sums (that axis dropped)."""
  unnormalised = jnp.exp(logits - jnp.max(logits, axis=axis, keepdims=True))
  return unnormalised, 1.0 / jnp.sum(unnormalised, axis=axis)


def _dropped(weights: jax.Array, scale: Optional[jax.Array]) -> jax.Array:
  """Softmax `weights` after dropout: times `scale` where one is given."""
  return weights if scale is None else weights * scale.astype(weights.dtype)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`x` summed over the axes along which `shape` was broadcast to `x.shape`."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                    if n == 1 and x.shape[lead + i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


_attention.defvjp(_forward, _backward)


def attention_over_inputs(query: jax.Array, inputs: jax.Array, bias: jax.Array,
                          scale: Optional[jax.Array] = None, *,
                          logits_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """The `"cpu"` core of `[batch, q, heads, embed]` queries over unprojected `inputs` `[batch, k,
  embed]`, which serve as both keys and values: `softmax(query . inputs + bias) . inputs`,
  `[batch, q, heads, embed]`.

  The logits are laid out `[batch, k, q, heads]`, so that the logits and the weights' gradient are,
  per example, `[k, embed] x [embed, q * heads]` products, and the inputs' gradient, to which logits
  and context both contribute, is one product. `bias` must broadcast to that layout, and `scale` (as
  `dropout_scale`, transposed) too.
  """
  return _over_inputs(jnp.dtype(logits_dtype), query, inputs, bias, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _over_inputs(logits_dtype, query, inputs, bias, scale):
  return _over_inputs_forward(logits_dtype, query, inputs, bias, scale)[0]


def _over_inputs_forward(logits_dtype, query, inputs, bias, scale):
  logits = jnp.einsum("bke,bqhe->bkqh", inputs.astype(logits_dtype), query.astype(logits_dtype))
  unnormalised, inverse_sum = _softmax_parts(logits + bias.astype(logits_dtype), axis=1)
  kept = _dropped(unnormalised, scale).astype(inputs.dtype)
  context = jnp.einsum("bkqh,bke->bqhe", kept, inputs)
  context = (context * inverse_sum[..., None]).astype(inputs.dtype)
  return context, (query, inputs, bias, scale, unnormalised, inverse_sum, context)


def _over_inputs_backward(logits_dtype, residuals, d_context):
  query, inputs, bias, scale, unnormalised, inverse_sum, context = residuals
  d_sum = jnp.sum(d_context.astype(logits_dtype) * context.astype(logits_dtype), -1)  # [b, q, heads]
  d_weights = _dropped(jnp.einsum("bqhe,bke->bkqh", d_context, inputs).astype(logits_dtype), scale)
  d_logits = unnormalised * inverse_sum[:, None] * (d_weights - d_sum[:, None])
  d_query = jnp.einsum("bkqh,bke->bqhe", d_logits.astype(inputs.dtype), inputs)
  # Both uses of the inputs in one product over [2q, heads]: d_logits . query + kept . d_context'.
  kept = _dropped(unnormalised, scale)
  left = jnp.concatenate([d_logits, kept], axis=2).astype(inputs.dtype)
  right = jnp.concatenate([query, d_context * inverse_sum[..., None]], axis=1).astype(inputs.dtype)
  d_inputs = jnp.einsum("bkqh,bqhe->bke", left, right)
  d_scale = None if scale is None else jnp.zeros_like(scale)
  return (d_query.astype(query.dtype), d_inputs.astype(inputs.dtype),
          _sum_to_shape(d_logits, bias.shape).astype(bias.dtype), d_scale)


_over_inputs.defvjp(_over_inputs_forward, _over_inputs_backward)
