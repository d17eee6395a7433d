"""A T5 encoder-decoder in Flax Linen with T5X parameter names and logical axis names.

The parameter tree is the one T5X (flaxformer) checkpoints hold:
`token_embedder/embedding`, `encoder/relpos_bias/rel_embedding`,
`encoder/layers_{i}/{pre_attention_layer_norm,attention/{query,key,value,out},pre_mlp_layer_norm,mlp}`,
`encoder/encoder_norm`, `decoder/layers_{i}/{pre_self_attention_layer_norm,self_attention,
pre_cross_attention_layer_norm,encoder_decoder_attention,pre_mlp_layer_norm,mlp}`, `decoder/decoder_norm`,
`decoder/logits_dense` (untied models only). Attention kernels are stored joined, `[embed, heads * kv]`.
With `T5Config.scan_layers` each stack's layers are one `nn.scan`ned module, `{encoder,decoder}/layers/...`,
every parameter stacked on a leading `layers` axis (`checkpoints.stack_layers` converts).

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `joined_kv`, `vocab`,
`relpos_buckets`, `prompt`, `prompt_embed`) through `nn.with_logical_partitioning`, which the trainer maps
to mesh axes; activations carry them (plus `batch`, `length`) through `nn.with_logical_constraint`,
which shards them wherever `partitioning.shard_activations` is in effect and is a no-op elsewhere.
A soft prompt enters through one hook: the encoder hands its embedded input to a
`prompts.PromptInput` (parameter `encoder/prompt/prompt/prompt`, the official code's name) when the
model is built with a `PromptConfig`.
"""
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax import attention, prompts
from prompt_tuning_jax.config import T5Config

# Added to attention logits where attention is not allowed (T5X's value).
MASK_BIAS = -1e10

# Logical axes of the residual stream `[batch, length, embed]`.
STREAM_AXES = ("batch", "length", "embed")
constrain = nn.with_logical_constraint

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "linear": lambda x: x,
}


def _fan_in_normal(scale: float = 1.0) -> Callable:
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class SharedPrefix(NamedTuple):
  """Rows `[batch, n + length, embed]` whose `n` leading rows are the same in every example, held as
  `prefix` `[1, n, embed]` and `rest` `[batch, length, embed]`: a single prompt in front of the
  embedded input, as the first encoder layer sees it. `Dense` projects the prefix once for the whole
  batch, and gradients reach only what each part depends on."""
  prefix: jax.Array
  rest: jax.Array

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.rest.shape[0], self.prefix.shape[1] + self.rest.shape[1], self.rest.shape[2])


class Dense(nn.Module):
  """`[..., in] -> [..., features]` with a float32 kernel `[in, features]` named by `kernel_axes`."""
  features: int
  kernel_axes: tuple[str, str]
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = _fan_in_normal()

  @nn.compact
  def kernel(self, in_features: int) -> jax.Array:
    """The kernel `[in_features, features]` in `dtype`, for callers that fold it into another product."""
    return self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                      (in_features, self.features), jnp.float32).astype(self.dtype)

  def __call__(self, x: jax.Array | SharedPrefix) -> jax.Array:
    kernel = self.kernel(x.shape[-1])
    if isinstance(x, SharedPrefix):  # [1, n, features] once, broadcast over the batch
      prefix = jnp.dot(x.prefix.astype(self.dtype), kernel)
      rest = jnp.dot(x.rest.astype(self.dtype), kernel)
      return jnp.concatenate([jnp.broadcast_to(prefix, (rest.shape[0],) + prefix.shape[1:]), rest],
                             axis=1)
    return jnp.dot(x.astype(self.dtype), kernel)


class Embed(nn.Module):
  """The token embedding `[vocab, embed]`, shared by encoder, decoder and (T5 1.0) the logits."""
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """`[batch, length]` int ids -> `[batch, length, embed]`."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """`[batch, length, embed]` -> `[batch, length, vocab]` against the embedding table."""
    return jnp.dot(x.astype(self.dtype), self.embedding.T.astype(self.dtype))


class LayerNorm(nn.Module):
  """T5's scale-only RMS norm, computed in float32."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return x.astype(self.dtype) * scale.astype(self.dtype)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """T5's bucketing of `key_position - query_position`: exact for small distances, log-spaced after.

  Computed in float32 like Mesh TensorFlow and the PyTorch port, so bucket edges agree with both.
  """
  buckets = np.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = np.abs(relative_position)
  else:
    distance = -np.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
  large = max_exact + (log_ratio / np.float32(np.log(max_distance / max_exact))
                       * np.float32(num_buckets - max_exact))
  large = np.minimum(np.where(distance < max_exact, 0, large).astype(relative_position.dtype),
                     num_buckets - 1)
  return buckets + np.where(distance < max_exact, distance, large)


class RelativePositionBiases(nn.Module):
  """Attention logit biases from bucketed relative positions, one table `[heads, buckets]` per stack."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_length: int, key_length: int, bidirectional: bool) -> jax.Array:
    """Returns `[1, heads, query_length, key_length]`."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    bucket = relative_position_bucket(relative, bidirectional, self.num_buckets, self.max_distance)
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.1), ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    return jnp.take(table, jnp.asarray(bucket), axis=1)[None].astype(self.dtype)


def attention_bias(query_mask: jax.Array, key_mask: jax.Array) -> jax.Array:
  """`[batch, q]`, `[batch, k]` booleans -> additive bias `[batch, 1, q, k]` (0 or MASK_BIAS)."""
  allowed = query_mask[:, None, :, None] & key_mask[:, None, None, :]
  return jnp.where(allowed, 0.0, MASK_BIAS).astype(jnp.float32)


def attends_through_inputs(query_length: int, key_length: int, embed: int, head_dim: int) -> bool:
  """Whether attention is cheaper with keys and values left unprojected (see `MultiHeadAttention`).

  Per head and example, projecting keys and values costs about `4 k e d` FLOPs and the two attention
  products `4 q k d`; folding the key kernel into the queries and the value kernel after the context
  costs `4 q k e + 4 q e d` instead. Few queries over many inputs win (a decoder's 8 target positions
  over a 228-position encoding: 7x fewer FLOPs); self-attention over one sequence never does.
  """
  q, k, e, d = query_length, key_length, embed, head_dim
  return q * (k * e + e * d - k * d) < k * e * d


def projects_prefix_once(config: T5Config, dropout_on: bool) -> bool:
  """Whether the first encoder layer takes a single prompt prefix as a `SharedPrefix`: not while
  dropout is on (it makes the prompt's rows differ per example), nor with scanned layers (one layer is
  traced for all)."""
  return not dropout_on and not config.scan_layers


def attention_chunks(config: T5Config, batch: int) -> int:
  """`config.attention_chunks`, or its backend default (2 on CPU, else 1); 1 if it does not divide
  `batch`."""
  chunks = config.attention_chunks
  if chunks is None:
    chunks = 2 if jax.default_backend() == "cpu" else 1
  return chunks if batch % chunks == 0 else 1


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


# Cache entries of a decoding cross-attention: the encoding's keys and values, the same for every
# beam of an example (`decoding` does not reorder them).
CROSS_CACHE = ("cached_cross_key", "cached_cross_value")


class MultiHeadAttention(nn.Module):
  """T5 attention (no logit scaling: it is folded into the query initialiser).

  With `decode=True` it keeps keys and values in the `cache` collection: a first call on the full
  `[batch, max_length]` shape creates the zero cache, each later call takes one position, appends its key
  and value, and attends to the positions written so far (the causal mask is derived from the cache index).
  Cross-attention (`cross=True`) with `decode=True` projects the encoding's keys and values once, in the
  call that creates the cache, as `[batch, heads, length, kv]` (`CROSS_CACHE`), and each later call
  attends to them: the encoding is the same at every step.

  Without a cache, and when `attends_through_inputs` says it costs less (cross-attention from a few
  target positions), the same products are associated the other way: logits are
  `(query @ key_kernel^T) @ inputs_kv^T` and the output `(weights @ inputs_kv) @ value_kernel`, so keys
  and values over the long input are never formed (`attention.attention_over_inputs`). The parameters
  and the result are the same.
  Otherwise the core (logits, softmax, context: `attention.dot_product_attention`) runs, without a
  cache, in `attention_chunks` batch chunks.
  """
  config: T5Config
  cross: bool = False

  @nn.compact
  def __call__(self, inputs_q: jax.Array | SharedPrefix, inputs_kv: jax.Array | SharedPrefix,
               bias: jax.Array, *, enable_dropout: bool = False, decode: bool = False) -> jax.Array:
    """`[batch, q, embed]`, `[batch, k, embed]`, bias `[batch|1, heads|1, q, k]` -> `[batch, q, embed]`.
    Self-attention's inputs may be a `SharedPrefix`."""
    cfg = self.config
    joined = cfg.num_heads * cfg.head_dim
    query_init = _fan_in_normal(1.0 / cfg.head_dim)
    dense = lambda name, init=_fan_in_normal(): Dense(joined, ("embed", "joined_kv"), cfg.dtype, init,
                                                       name=name)
    split = lambda x: constrain(x.reshape(x.shape[:2] + (cfg.num_heads, cfg.head_dim)),
                                ("batch", "length", "heads", "kv"))
    logits_dtype = jnp.float32 if cfg.float32_attention_logits else cfg.dtype

    def dropout_scale(shape, axes):
      """The softmax weights' dropout as a factor `shape` (1 / keep where a weight is kept, else 0), or
      None without dropout."""
      if not (enable_dropout and cfg.dropout_rate > 0):
        return None
      return constrain(nn.Dropout(cfg.dropout_rate)(jnp.ones(shape, cfg.dtype), deterministic=False),
                       axes)

    output = Dense(cfg.emb_dim, ("joined_kv", "embed"), cfg.dtype, name="out")
    query = split(dense("query", query_init)(inputs_q))

    if not decode and attends_through_inputs(inputs_q.shape[1], inputs_kv.shape[1],
                                             inputs_kv.shape[-1], cfg.head_dim):
      embed = inputs_kv.shape[-1]
      key_kernel = dense("key").kernel(embed).reshape(embed, cfg.num_heads, cfg.head_dim)
      value_kernel = dense("value").kernel(embed).reshape(embed, cfg.num_heads, cfg.head_dim)
      inputs_kv = inputs_kv.astype(cfg.dtype)
      query_in_inputs = constrain(jnp.einsum("bqhd,ehd->bqhe", query, key_kernel),
                                  ("batch", "length", "heads", "embed"))
      scale = dropout_scale((query.shape[0], inputs_kv.shape[1], query.shape[1], cfg.num_heads),
                            ("batch", None, "length", "heads"))  # the logits' [batch, k, q, heads]
      context = attention.attention_over_inputs(
          query_in_inputs, inputs_kv, jnp.transpose(bias, (0, 3, 2, 1)), scale,
          logits_dtype=logits_dtype)
      out = jnp.einsum("bqhe,ehd->bqhd", context, value_kernel)
      return output(out.reshape(inputs_q.shape[:2] + (joined,)))

    kv_axes = "bkhd"  # keys and values [batch, length, heads, kv]
    if decode and self.cross:  # the encoding's, projected by the call that creates the cache
      kv_axes = "bhkd"
      if self.has_variable("cache", CROSS_CACHE[0]):
        key, value = (self.get_variable("cache", name) for name in CROSS_CACHE)
      else:
        key, value = (constrain(jnp.swapaxes(split(dense(name)(inputs_kv)), 1, 2),
                                ("batch", "heads", "length", "kv")) for name in ("key", "value"))
        for name, array in zip(CROSS_CACHE, (key, value)):
          self.put_variable("cache", name, array)
    else:
      key = split(dense("key")(inputs_kv))
      value = split(dense("value")(inputs_kv))
    if decode and not self.cross:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        index = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        max_length = key.shape[1]
        # The bias holds every query position: keep this step's row, and mask positions not yet written.
        bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=2)
        bias = bias + jnp.where(jnp.arange(max_length) <= index, 0.0, MASK_BIAS)[None, None, None, :]

    def attend(query, key, value, bias):
      scale = dropout_scale((query.shape[0], cfg.num_heads, query.shape[1],
                             key.shape[kv_axes.index("k")]), ("batch", "heads", "length", None))
      return attention.dot_product_attention(query, key, value, bias, scale, kv_axes=kv_axes,
                                             logits_dtype=logits_dtype)

    chunks = 1 if decode else attention_chunks(cfg, query.shape[0])
    out = over_batch_chunks(attend, chunks, query, key, value, bias)
    return output(split(out).reshape(inputs_q.shape[:2] + (joined,)))


class MlpBlock(nn.Module):
  """Feed-forward block: `wi` (plain) or `wi_0`, `wi_1` (gated), then `wo`."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, enable_dropout: bool = False) -> jax.Array:
    cfg = self.config
    acts = cfg.mlp_activations
    hidden = None
    for i, act in enumerate(acts):
      name = "wi" if len(acts) == 1 else f"wi_{i}"
      h = _ACTIVATIONS[act](Dense(cfg.mlp_dim, ("embed", "mlp"), cfg.dtype, name=name)(x))
      hidden = h if hidden is None else hidden * h
    hidden = constrain(nn.Dropout(cfg.dropout_rate)(hidden, deterministic=not enable_dropout),
                       ("batch", "length", "mlp"))
    return Dense(cfg.emb_dim, ("mlp", "embed"), cfg.dtype, name="wo")(hidden)


class EncoderLayer(nn.Module):
  """Self-attention and MLP, each pre-normed and residual. Under `nn.scan` (`scanned`) it returns
  `(x, None)`, scan's (carry, output). `rows`, the same rows as `x` held as a `SharedPrefix`, lets
  the attention project the shared rows once."""
  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, enable_dropout: bool = False,
               rows: Optional[SharedPrefix] = None):
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=not enable_dropout)
    norm = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_attention_layer_norm")
    y = norm(x) if rows is None else SharedPrefix(norm(rows.prefix), norm(rows.rest))
    y = MultiHeadAttention(cfg, name="attention")(y, y, bias, enable_dropout=enable_dropout)
    x = x + drop(y)
    y = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(x)
    x = constrain(x + drop(MlpBlock(cfg, name="mlp")(y, enable_dropout)), STREAM_AXES)
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention to the encoding and MLP; `scanned` as `EncoderLayer`."""
  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, y: jax.Array, encoded: jax.Array, self_bias: jax.Array, cross_bias: jax.Array,
               enable_dropout: bool = False, decode: bool = False):
    cfg = self.config
    drop = lambda z: nn.Dropout(cfg.dropout_rate)(z, deterministic=not enable_dropout)
    z = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_self_attention_layer_norm")(y)
    z = MultiHeadAttention(cfg, name="self_attention")(z, z, self_bias, enable_dropout=enable_dropout,
                                                      decode=decode)
    y = y + drop(z)
    z = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_cross_attention_layer_norm")(y)
    z = MultiHeadAttention(cfg, cross=True, name="encoder_decoder_attention")(
        z, encoded, cross_bias, enable_dropout=enable_dropout, decode=decode)
    y = y + drop(z)
    z = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(y)
    y = constrain(y + drop(MlpBlock(cfg, name="mlp")(z, enable_dropout)), STREAM_AXES)
    return (y, None) if self.scanned else y


def _remat(layer: type[nn.Module], config: T5Config, static_argnums: tuple[int, ...]):
  """`layer`, recomputed in the backward pass as `config.remat_policy` says."""
  if config.remat_policy == "none":
    return layer
  policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[
      config.remat_policy]
  return nn.remat(layer, policy=policy, static_argnums=static_argnums)


def _stack(layer: type[nn.Module], config: T5Config, num_layers: int, name: str, *args,
           first_layer_args: tuple = ()) -> jax.Array:
  """Runs `num_layers` of `layer` on `args` (the stream first, the rest shared by every layer).

  With `config.scan_layers` one layer is traced and `nn.scan` runs it over parameters stacked on a
  leading `layers` axis (`{name}/...`, `[num_layers, ...]`), so compile time does not grow with depth;
  otherwise each layer is its own module `{name}_{i}`, the checkpoint layout, and the first also gets
  `first_layer_args` (none under scan).
  """
  stream, *shared = args
  if config.scan_layers:
    scanned = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                      length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(config, scanned=True, name=name)(stream, *shared)[0]
  for i in range(num_layers):
    stream = layer(config, name=f"{name}_{i}")(stream, *shared, *(first_layer_args if i == 0 else ()))
  return stream


class Encoder(nn.Module):
  """Embeds tokens, lets the prompt hook extend them, and runs the encoder stack.

  A single prompt in front of every input (`prompts.PromptInput`'s shared prefix) reaches the first
  layer also as a `SharedPrefix` where `projects_prefix_once`: its query, key and value are projected
  once, not once per example, and the input rows, which do not depend on the prompt, send no input
  gradient back through that layer's projections unless the embedding itself trains.
  """
  config: T5Config
  embedder: Embed
  prompt_config: Optional[prompts.PromptConfig] = None

  @nn.compact
  def __call__(self, tokens: jax.Array, enable_dropout: bool = False,
               prompt_ids: Optional[jax.Array] = None,
               prompt_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """`[batch, length]` ids -> (`[batch, length + P, embed]` encoding, `[batch, length + P]` mask).

    `prompt_ids`, `prompt_lengths` `[batch]`: each row's prompt in a bank and its real length.
    """
    cfg = self.config
    embedded = self.embedder(tokens)
    x, mask, rows = embedded, tokens > 0, ()
    if self.prompt_config is not None:
      x, mask, prefix = prompts.PromptInput(self.prompt_config, cfg.dtype, name="prompt")(
          x, mask, prompt_ids, prompt_lengths)
      if prefix is not None and projects_prefix_once(cfg, enable_dropout and cfg.dropout_rate > 0):
        rows = (SharedPrefix(prefix, embedded),)
    x = constrain(nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout), STREAM_AXES)
    length = x.shape[1]
    bias = attention_bias(mask, mask) + RelativePositionBiases(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads,
        name="relpos_bias")(length, length, bidirectional=True)
    layer = _remat(EncoderLayer, cfg, static_argnums=(3,))  # (self, x, bias, enable_dropout, rows)
    x = _stack(layer, cfg, cfg.num_encoder_layers, "layers", x, bias, enable_dropout,
               first_layer_args=rows)
    x = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout), mask


class Decoder(nn.Module):
  config: T5Config
  embedder: Embed

  @nn.compact
  def __call__(self, encoded: jax.Array, encoded_mask: jax.Array, decoder_input_tokens: jax.Array,
               decoder_target_tokens: Optional[jax.Array] = None, enable_dropout: bool = False,
               decode: bool = False, max_decode_length: Optional[int] = None) -> jax.Array:
    """Returns float32 logits `[batch, target_length, vocab]`.

    With `decode=True` the input is one position `[batch, 1]` (or the full `[batch, max_decode_length]`
    once, to create the cache) and `max_decode_length` is the cache's length.
    """
    cfg = self.config
    y = nn.Dropout(cfg.dropout_rate)(self.embedder(decoder_input_tokens),
                                     deterministic=not enable_dropout)
    relpos = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance, cfg.num_heads,
                                    name="relpos_bias")
    if decode:
      self_bias = relpos(max_decode_length, max_decode_length, bidirectional=False)
      if max_decode_length == y.shape[1]:  # the call that creates the cache: a plain causal pass
        self_bias = self_bias + jnp.where(nn.make_causal_mask(decoder_input_tokens), 0.0, MASK_BIAS)
      cross_bias = attention_bias(jnp.ones(y.shape[:2], bool), encoded_mask)
    else:
      length = y.shape[1]
      # Padding is read off the targets (the inputs start with the pad id 0); without targets, none.
      query_mask = (jnp.ones(y.shape[:2], bool) if decoder_target_tokens is None
                    else decoder_target_tokens > 0)
      causal = jnp.tril(jnp.ones((length, length), bool))
      self_bias = (relpos(length, length, bidirectional=False)
                   + jnp.where(causal, 0.0, MASK_BIAS)[None, None]
                   + attention_bias(query_mask, query_mask))
      cross_bias = attention_bias(query_mask, encoded_mask)
    # (self, y, encoded, self_bias, cross_bias, enable_dropout, decode); no remat while decoding.
    layer = DecoderLayer if decode else _remat(DecoderLayer, cfg, static_argnums=(5, 6))
    y = _stack(layer, cfg, cfg.num_decoder_layers, "layers", y, encoded, self_bias, cross_bias,
               enable_dropout, decode)
    y = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=not enable_dropout)
    if cfg.logits_via_embedding:
      logits = self.embedder.attend(y) / jnp.sqrt(jnp.asarray(y.shape[-1], cfg.dtype))
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), cfg.dtype, name="logits_dense")(y)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class T5(nn.Module):
  """The encoder-decoder. `__call__` takes T5X's feature names and returns logits.

  Attributes:
    config: the architecture.
    prompt_config: the soft prompt, or None for the plain model.
  """
  config: T5Config
  prompt_config: Optional[prompts.PromptConfig] = None

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.encoder = Encoder(cfg, self.token_embedder, self.prompt_config)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: jax.Array, enable_dropout: bool = False,
             prompt_ids: Optional[jax.Array] = None,
             prompt_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """`[batch, length]` -> (`[batch, length + P, embed]`, mask `[batch, length + P]`)."""
    return self.encoder(encoder_input_tokens, enable_dropout, prompt_ids, prompt_lengths)

  def decode(self, encoded: jax.Array, encoded_mask: jax.Array, decoder_input_tokens: jax.Array,
             decoder_target_tokens: Optional[jax.Array] = None, enable_dropout: bool = False,
             decode: bool = False, max_decode_length: Optional[int] = None) -> jax.Array:
    return self.decoder(encoded, encoded_mask, decoder_input_tokens, decoder_target_tokens,
                        enable_dropout, decode, max_decode_length)

  def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array,
               decoder_target_tokens: Optional[jax.Array] = None, enable_dropout: bool = False,
               prompt_ids: Optional[jax.Array] = None,
               prompt_lengths: Optional[jax.Array] = None) -> jax.Array:
    """`[batch, in_len]`, `[batch, out_len]` (targets shifted right) -> logits `[batch, out_len, vocab]`."""
    encoded, mask = self.encode(encoder_input_tokens, enable_dropout, prompt_ids, prompt_lengths)
    return self.decode(encoded, mask, decoder_input_tokens, decoder_target_tokens, enable_dropout)
