"""T5's layers in Flax Linen, after t5x's `examples/t5/layers.py`: T5X's parameter names and logical
axis names on every parameter (`embed`, `mlp`, `heads`, `kv`, `joined_kv`, `vocab`, `relpos_buckets`).

Attention kernels are stored joined, `[embed, heads * kv]`, as T5X checkpoints hold them. Activations
carry logical axis names (plus `batch`, `length`) through `nn.with_logical_constraint`, which shards
them wherever `partitioning.shard_activations` is in effect and is a no-op elsewhere. Dropout is
T5X's: the residual stream's and the MLP's masks are shared along the length axis, the attention
weights' along the queries (`attention.dropout_scale`).
"""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax import attention
from prompt_tuning_jax.adapters import Adapters, Lora
from prompt_tuning_jax.config import ExecutionConfig, T5Config

# Added to attention logits where attention is not allowed (T5X's value).
MASK_BIAS = -1e10

# Logical axes of the residual stream `[batch, length, embed]`.
STREAM_AXES = ("batch", "length", "embed")
constrain = nn.with_logical_constraint

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "linear": lambda x: x,
}


def fan_in_normal(scale: float = 1.0) -> Callable:
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def remat(layer: type[nn.Module], execution: ExecutionConfig, static_argnums: tuple[int, ...]):
  """`layer`, recomputed in the backward pass as `execution.remat_policy` says."""
  if execution.remat_policy == "none":
    return layer
  policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[
      execution.remat_policy]
  return nn.remat(layer, policy=policy, static_argnums=static_argnums)


def dropout(config: T5Config) -> nn.Dropout:
  """T5X's dropout of `[batch, length, features]` activations: one mask along the length axis."""
  return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))


class Dense(nn.Module):
  """`[..., in] -> [..., features]` with a float32 kernel `[in, features]` named by `kernel_axes`.

  `lora` (an `adapters.Lora`) adds `lora_a` `[in, rank]` and `lora_b` `[rank, features]`, whose
  product, scaled, is added to the kernel's; `ia3` (`"inputs"` or `"outputs"`) adds `ia3_scale`,
  which rescales the inputs `[in]` or the outputs `[features]` (`adapters.py`).
  """
  features: int
  kernel_axes: tuple[str, str]
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = fan_in_normal()
  lora: Optional[Lora] = None
  ia3: Optional[str] = None

  @nn.compact
  def weights(self, in_features: int) -> dict[str, jax.Array]:
    """The kernel `[in_features, features]` and the adapters' weights, in `dtype`."""
    param = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32).astype(self.dtype)
    weights = {"kernel": param("kernel", self.kernel_init, (in_features, self.features),
                               self.kernel_axes)}
    if self.lora is not None:
      weights["lora_a"] = param("lora_a", fan_in_normal(), (in_features, self.lora.rank),
                                (self.kernel_axes[0], "lora_rank"))
      weights["lora_b"] = param("lora_b", nn.initializers.zeros, (self.lora.rank, self.features),
                                ("lora_rank", self.kernel_axes[1]))
    if self.ia3 is not None:
      side = 0 if self.ia3 == "inputs" else 1
      weights["ia3_scale"] = param("ia3_scale", nn.initializers.ones,
                                   ((in_features, self.features)[side],), (self.kernel_axes[side],))
    return weights

  def kernel(self, in_features: int) -> jax.Array:
    """The kernel `[in_features, features]` in `dtype`, for callers that fold it into another product."""
    return self.weights(in_features)["kernel"]

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    weights = self.weights(x.shape[-1])
    if self.ia3 == "inputs":
      x = x * weights["ia3_scale"]
    y = jnp.dot(x, weights["kernel"])
    if self.lora is not None:
      y = y + jnp.dot(jnp.dot(x, weights["lora_a"]), weights["lora_b"]) * self.lora.scale
    if self.ia3 == "outputs":
      y = y * weights["ia3_scale"]
    return y


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
  def __call__(self, query_length: int, key_length: int, bidirectional: bool,
               key_offset: int = 0) -> jax.Array:
    """Returns `[1, heads, query_length, key_length]`, for queries at positions 0.. and keys at
    `key_offset`.. (a prefix right before the sequence: `key_offset=-key_length`)."""
    relative = (np.arange(key_length)[None, :] + key_offset) - np.arange(query_length)[:, None]
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


# Cache entries of a decoding cross-attention: the encoding's keys and values `[batch, k, heads, kv]`,
# the same at every step and for every beam of an example (`decoding` does not reorder them).
CROSS_CACHE = ("cached_cross_key", "cached_cross_value")


class MultiHeadAttention(nn.Module):
  """T5 attention: `query`, `key`, `value` and `out` projections around the attention core that
  `execution.attention` names (no logit scaling: it is folded into the query initialiser).

  With `decode=True` it keeps keys and values in the `cache` collection: a first call on the full
  `[batch, max_length]` shape creates the zero cache, each later call takes one position, appends its
  key and value, and attends to the positions written so far (the causal mask is derived from the
  cache index). Cross-attention (`cross=True`) with `decode=True` projects the encoding's keys and
  values once, in the call that creates the cache, and each later call attends to them.

  `adapters` adds LoRA and IA3 to the projections; a `prefix` (keys and values `[P, heads, kv]`,
  `adapters.Prefix`) goes in front of the keys and values, with `prefix_bias` `[1, heads|1, q, P]`
  (zeros when None) as its logit bias.
  """
  config: T5Config
  execution: ExecutionConfig = ExecutionConfig()
  cross: bool = False
  adapters: Adapters = Adapters()

  def projection(self, name: str, init: Callable = fan_in_normal()) -> Dense:
    cfg = self.config
    return Dense(cfg.num_heads * cfg.head_dim, ("embed", "joined_kv"), cfg.dtype, init,
                 **self.adapters.projection(name), name=name)

  def split_heads(self, x: jax.Array) -> jax.Array:
    """`[batch, length, heads * kv]` -> `[batch, length, heads, kv]`."""
    cfg = self.config
    return constrain(x.reshape(x.shape[:2] + (cfg.num_heads, cfg.head_dim)),
                     ("batch", "length", "heads", "kv"))

  def dropout_scale(self, shape: tuple[int, int, int, int], enable_dropout: bool):
    """`attention.dropout_scale` for weights `[batch, heads, q, k]`, or None without dropout."""
    if not (enable_dropout and self.config.dropout_rate > 0):
      return None
    return attention.dropout_scale(self.make_rng("dropout"), self.config.dropout_rate, shape,
                                   self.config.dtype)

  @property
  def logits_dtype(self) -> jnp.dtype:
    return jnp.float32 if self.config.float32_attention_logits else self.config.dtype

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, bias: jax.Array, *,
               enable_dropout: bool = False, decode: bool = False,
               prefix: Optional[tuple[jax.Array, jax.Array]] = None,
               prefix_bias: Optional[jax.Array] = None) -> jax.Array:
    """`[batch, q, embed]`, `[batch, k, embed]`, bias `[batch|1, heads|1, q, k]` -> `[batch, q, embed]`."""
    cfg = self.config
    query = self.split_heads(self.projection("query", fan_in_normal(1.0 / cfg.head_dim))(inputs_q))
    cached_cross = decode and self.cross and self.has_variable("cache", CROSS_CACHE[0])
    if cached_cross:
      key, value = (self.get_variable("cache", name) for name in CROSS_CACHE)
    else:
      key = self.split_heads(self.projection("key")(inputs_kv))
      value = self.split_heads(self.projection("value")(inputs_kv))
    if decode and self.cross and not cached_cross:
      for name, array in zip(CROSS_CACHE, (key, value)):
        self.put_variable("cache", name, array)
    elif decode and not self.cross:
      key, value, bias, prefix_bias = self._extend_cache(key, value, bias, prefix_bias)
    if prefix is not None:
      key, value, bias = with_prefix(prefix, prefix_bias, key, value, bias)
    scale = self.dropout_scale((query.shape[0], cfg.num_heads, query.shape[1], key.shape[1]),
                               enable_dropout)
    context = attention.dot_product_attention(
        query, key, value, bias, scale, logits_dtype=self.logits_dtype,
        implementation="xla" if decode else self.execution.attention)
    return self.output(context)

  def output(self, context: jax.Array) -> jax.Array:
    """`[batch, q, heads, kv]` -> `[batch, q, embed]` through the `out` projection."""
    cfg = self.config
    joined = context.reshape(context.shape[:2] + (cfg.num_heads * cfg.head_dim,))
    return Dense(cfg.emb_dim, ("joined_kv", "embed"), cfg.dtype, **self.adapters.projection("out"),
                 name="out")(joined)

  def _extend_cache(self, key, value, bias, prefix_bias):
    """Self-attention while decoding: the first call creates the zero cache `[batch, max_length,
    heads, kv]` and passes through; each later call writes its one position and returns the cached
    keys and values with this step's row of `bias` (and of `prefix_bias`, if any), positions not
    yet written masked."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return key, value, bias, prefix_bias
    index = cache_index.value
    key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
    value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
    cached_key.value, cached_value.value = key, value
    cache_index.value = index + 1
    bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=2)
    bias = bias + jnp.where(jnp.arange(key.shape[1]) <= index, 0.0, MASK_BIAS)[None, None, None, :]
    if prefix_bias is not None:
      prefix_bias = jax.lax.dynamic_slice_in_dim(prefix_bias, index, 1, axis=2)
    return key, value, bias, prefix_bias


def with_prefix(prefix: tuple[jax.Array, jax.Array], prefix_bias: Optional[jax.Array],
                key: jax.Array, value: jax.Array, bias: jax.Array):
  """Keys and values `[batch, k, heads, kv]` with the prefix's `[P, heads, kv]` in front, and `bias`
  `[batch|1, heads|1, q, k]` with `prefix_bias` `[1, heads|1, q, P]` (zeros when None) in front."""
  prefix_key, prefix_value = (jnp.broadcast_to(p.astype(key.dtype), (key.shape[0],) + p.shape)
                              for p in prefix)
  length = prefix_key.shape[1]
  if prefix_bias is None:
    prefix_bias = jnp.zeros(bias.shape[:3] + (length,), bias.dtype)
  prefix_bias = jnp.broadcast_to(prefix_bias, jnp.broadcast_shapes(
      bias.shape[:3], prefix_bias.shape[:3]) + (length,))
  bias = jnp.broadcast_to(bias, prefix_bias.shape[:3] + bias.shape[3:])
  return (jnp.concatenate([prefix_key, key], axis=1), jnp.concatenate([prefix_value, value], axis=1),
          jnp.concatenate([prefix_bias.astype(bias.dtype), bias], axis=-1))


class MlpBlock(nn.Module):
  """Feed-forward block: `wi` (plain) or `wi_0`, `wi_1` (gated), then `wo`; `adapters` adds LoRA
  and IA3 to them."""
  config: T5Config
  adapters: Adapters = Adapters()

  @nn.compact
  def __call__(self, x: jax.Array, enable_dropout: bool = False) -> jax.Array:
    cfg = self.config
    acts = cfg.mlp_activations
    hidden = None
    for i, act in enumerate(acts):
      name = "wi" if len(acts) == 1 else f"wi_{i}"
      h = ACTIVATIONS[act](Dense(cfg.mlp_dim, ("embed", "mlp"), cfg.dtype,
                                 **self.adapters.projection(name), name=name)(x))
      hidden = h if hidden is None else hidden * h
    hidden = constrain(dropout(cfg)(hidden, deterministic=not enable_dropout),
                       ("batch", "length", "mlp"))
    return Dense(cfg.emb_dim, ("mlp", "embed"), cfg.dtype, **self.adapters.projection("wo"),
                 name="wo")(hidden)
