"""The `"cpu"` attention implementation: `layers.MultiHeadAttention` with the same parameters and
results, computed in an order that suits XLA:CPU.

Three changes of how, not what, used only when `ExecutionConfig.attention` is `"cpu"`:
  - A prompt in front of every input is the same in each example: the first encoder layer can hold
    its rows as a `SharedPrefix`, whose query, key and value are projected once for the batch, and
    whose input rows, which do not depend on the prompt, take no input gradient there.
  - Few queries over many inputs (the decoder's targets over the encoding) attend through the
    unprojected inputs (`attends_through_inputs`): the key kernel is folded into the queries and the
    value kernel applied after the context, so keys and values over the long input are never formed
    (`attention.attention_over_inputs`).
  - Otherwise the `"cpu"` core runs in `attention_chunks` interleaved batch chunks.
Decoding runs `layers.MultiHeadAttention`'s own path.
"""
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_tuning_jax import attention, layers

DEFAULT_CHUNKS = 2


class SharedPrefix(NamedTuple):
  """Rows `[batch, n + length, embed]` whose `n` leading rows are the same in every example, held as
  `prefix` `[1, n, embed]` and `rest` `[batch, length, embed]`."""
  prefix: jax.Array
  rest: jax.Array

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.rest.shape[0], self.prefix.shape[1] + self.rest.shape[1], self.rest.shape[2])

  def map(self, fn: Callable[[jax.Array], jax.Array]) -> "SharedPrefix":
    """`fn` (row-wise) applied to both parts."""
    return SharedPrefix(fn(self.prefix), fn(self.rest))


def attends_through_inputs(query_length: int, key_length: int, embed: int, head_dim: int) -> bool:
  """Whether attention costs fewer FLOPs with keys and values left unprojected.

  Per head and example, projecting keys and values costs about `4 k e d` FLOPs and the two attention
  products `4 q k d`; folding the key kernel into the queries and the value kernel after the context
  costs `4 q k e + 4 q e d` instead. Few queries over many inputs win; self-attention never does.
  """
  q, k, e, d = query_length, key_length, embed, head_dim
  return q * (k * e + e * d - k * d) < k * e * d


def over_batch_chunks(fn: Callable[..., jax.Array], chunks: int, *arrays: jax.Array) -> jax.Array:
  """`fn(*arrays)` computed on `chunks` interleaved batch chunks (examples j, j + chunks, ...) and put
  back in order. Arrays are `[batch, ...]` or `[1, ...]` (the same for every chunk); `fn` maps each
  chunk to `[batch / chunks, ...]`. Interleaving keeps each chunk spread like the batch when the batch
  is sharded in contiguous blocks."""
  if chunks == 1:
    return fn(*arrays)
  batch = arrays[0].shape[0]
  take = lambda x, j: x.reshape((batch // chunks, chunks) + x.shape[1:])[:, j] if x.shape[0] > 1 else x
  outs = [fn(*(take(x, j) for x in arrays)) for j in range(chunks)]
  return jnp.stack(outs, axis=1).reshape((batch,) + outs[0].shape[1:])


class CpuMultiHeadAttention(layers.MultiHeadAttention):
  """`layers.MultiHeadAttention` for `"cpu"`; self-attention's inputs may be a `SharedPrefix`."""

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, bias, *, enable_dropout=False, decode=False, prefix=None,
               prefix_bias=None):
    if decode or prefix is not None:
      return super().__call__(inputs_q, inputs_kv, bias, enable_dropout=enable_dropout,
                              decode=decode, prefix=prefix, prefix_bias=prefix_bias)
    cfg = self.config
    query = self.split_heads(self.project("query", inputs_q, 1.0 / cfg.head_dim))
    if attends_through_inputs(inputs_q.shape[1], inputs_kv.shape[1], inputs_kv.shape[-1],
                              cfg.head_dim):
      return self._through_inputs(query, inputs_kv, bias, enable_dropout)
    key = self.split_heads(self.project("key", inputs_kv))
    value = self.split_heads(self.project("value", inputs_kv))
    scale = self.dropout_scale((query.shape[0], cfg.num_heads, query.shape[1], key.shape[1]),
                               enable_dropout)
    chunks = self.execution.attention_chunks or DEFAULT_CHUNKS
    chunks = chunks if query.shape[0] % chunks == 0 else 1

    def core(query, key, value, bias, *scale):
      return attention.dot_product_attention(query, key, value, bias, *scale, implementation="cpu",
                                             logits_dtype=self.logits_dtype)
    return self.output(over_batch_chunks(core, chunks, query, key, value, bias,
                                         *(() if scale is None else (scale,))))

  def project(self, name: str, x, init_scale: float = 1.0) -> jax.Array:
    """A projection of `[batch, length, embed]` rows or of a `SharedPrefix`, whose prefix is projected
    once and broadcast over the batch."""
    dense = self.projection(name, layers.fan_in_normal(init_scale))
    if not isinstance(x, SharedPrefix):
      return dense(x)
    kernel = dense.kernel(x.shape[-1])
    with jax.named_scope(name):  # the products carry the projection's name, as `Dense`'s do
      prefix, rest = (jnp.dot(part.astype(self.config.dtype), kernel) for part in x)
    return jnp.concatenate([jnp.broadcast_to(prefix, (rest.shape[0],) + prefix.shape[1:]), rest],
                           axis=1)

  def _through_inputs(self, query, inputs_kv, bias, enable_dropout):
    """`query` `[batch, q, heads, kv]` over the unprojected `inputs_kv` `[batch, k, embed]`."""
    cfg = self.config
    embed = inputs_kv.shape[-1]
    kernel = lambda name: self.projection(name).kernel(embed).reshape(embed, cfg.num_heads,
                                                                      cfg.head_dim)
    query_in_inputs = layers.constrain(jnp.einsum("bqhd,ehd->bqhe", query, kernel("key")),
                                       ("batch", "length", "heads", "embed"))
    scale = self.dropout_scale((query.shape[0], cfg.num_heads, query.shape[1], inputs_kv.shape[1]),
                               enable_dropout)
    context = attention.attention_over_inputs(
        query_in_inputs, inputs_kv.astype(cfg.dtype), jnp.transpose(bias, (0, 3, 2, 1)),
        None if scale is None else jnp.transpose(scale, (0, 3, 2, 1)),  # [batch, k, q, heads]
        logits_dtype=self.logits_dtype)
    return self.output(jnp.einsum("bqhe,ehd->bqhd", context, kernel("value")))
