"""A decoder-only transformer in Flax Linen for the Llama and Gemma families, beside our T5
(`network.py`): t5x's decoder-only parameter names and the logical axes of `layers.py`, so
`partitioning.py`'s rules shard it as they shard T5.

One config covers Llama 2/3 (RoPE, RMSNorm, SwiGLU, grouped-query attention), Mistral (a sliding
window on every layer), Qwen2 (biases on the query, key and value projections), Gemma 2 (embeddings
scaled by sqrt(embed), RMSNorms of the form `1 + scale`, norms after attention and MLP too, GeGLU,
attention and final logit soft-capping, `query_pre_attn_scalar`, alternating sliding and global
layers) and Gemma 3 text models (norms of queries and keys, a RoPE base of its own for sliding
layers). `hf_causal_lm.py` reads their Hugging Face checkpoints.

Parameter tree (entries in brackets only where the config asks for them):
  token_embedder/embedding                                 [vocab, embed]
  [decoder/prompt/prompt/prompt]                           [P, embed], with a PromptConfig
  decoder/layers_{i}/pre_self_attention_layer_norm/scale   [embed]
  decoder/layers_{i}/self_attention/query/kernel           [embed, heads * head_dim]
  decoder/layers_{i}/self_attention/{key,value}/kernel     [embed, kv_heads * head_dim]
  decoder/layers_{i}/self_attention/out/kernel             [heads * head_dim, embed]
  [decoder/layers_{i}/self_attention/{query,key,value}_bias]   qkv_bias (Qwen2)
  [decoder/layers_{i}/self_attention/{query,key}_norm/scale]   qk_norm (Gemma 3), [head_dim]
  [decoder/layers_{i}/post_self_attention_layer_norm/scale]    post_norms (Gemma)
  decoder/layers_{i}/pre_mlp_layer_norm/scale
  decoder/layers_{i}/mlp/{wi_0,wi_1,wo}/kernel             act(x wi_0) * (x wi_1), then wo
  [decoder/layers_{i}/post_mlp_layer_norm/scale]               post_norms
  decoder/decoder_norm/scale
  [decoder/logits_dense/kernel]                            [embed, vocab], untied models

Inputs are token ids `[batch, length]` and an `input_mask` of the real tokens (decoder-only
vocabularies have no reserved pad id); rows are left-padded (generation) or right-padded (training).
A token's position is the number of real positions before it, so padding changes nothing.

The soft prompt enters through `prompts.PromptInput` (`PromptConfig.combine`): `prefix_after_bos`
puts it after each row's first real token, the BOS, which stays the first token and the attention
sink the model was trained with; `prefix` puts it first (PEFT's placement); `suffix` before the last
real token. Its positions come in order with the tokens' (`[BOS; P; X]` has positions 0, 1..P,
P+1...), and the causal mask covers them like any other. In sliding-window layers the prompt's
positions are pinned: every query attends to all of them, however far back they are, so the prompt
steers every layer at every length (a token past the window would otherwise lose it in the sliding
layers). Within the window this is the ordinary mask, so it changes nothing on inputs shorter than
the window.
"""
import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax import attention, prompts
from prompt_tuning_jax.config import ExecutionConfig
from prompt_tuning_jax.layers import (MASK_BIAS, STREAM_AXES, Dense, Embed, LayerNorm, MlpBlock,
                                      constrain, remat)
from prompt_tuning_jax.trees import flatten

# Hugging Face `model_type`s this model reproduces.
FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3_text")
ROPE_SCALINGS = ("linear", "llama3")
PROMPT_PATH = "decoder/prompt/prompt/prompt"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE's frequencies rescaled for contexts longer than pre-training's, as transformers does:
  `linear` divides every frequency by `factor` (Gemma 3 4B and up, global layers); `llama3` divides
  those of wavelengths over `original_max_positions / low_freq_factor` by it, keeps those under
  `original_max_positions / high_freq_factor`, and interpolates between (Llama 3.1 and later)."""
  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALINGS:
      raise ValueError(f"RopeScaling.kind={self.kind!r}: use one of {ROPE_SCALINGS}.")
    if not self.factor > 0 or (self.kind == "llama3" and not
                               0 < self.low_freq_factor < self.high_freq_factor):
      raise ValueError(f"RopeScaling {self}: need factor > 0 and, for llama3, "
                       "0 < low_freq_factor < high_freq_factor.")


@dataclasses.dataclass(frozen=True)
class CausalLMConfig:
  """Shape and behaviour of a decoder-only transformer (defaults: Llama 2 7B).

  `family` is the Hugging Face `model_type` the config came from; the other fields say what is
  computed. `sliding_layers` are the indices of the layers that attend over the last
  `sliding_window` positions only (and to the prompt, see the module docstring). Sliding layers use
  `local_rope_theta` when it is set (Gemma 3), and `rope_theta` with `rope_scaling` otherwise.
  Attention logits are scaled by `query_pre_attn_scalar ** -0.5` (None: `head_dim`), then
  soft-capped to `attn_logit_softcap * tanh(logits / attn_logit_softcap)` when that is set;
  `final_logit_softcap` does the same to the output logits.
  """
  family: str = "llama"
  vocab_size: int = 32000
  emb_dim: int = 4096
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  mlp_dim: int = 11008
  num_layers: int = 32
  activation: str = "silu"  # of the gated MLP: silu (SwiGLU) or gelu, tanh-approximated (GeGLU)
  rope_theta: float = 10000.0
  local_rope_theta: Optional[float] = None
  rope_scaling: Optional[RopeScaling] = None
  norm_epsilon: float = 1e-6
  norm_plus_one: bool = False  # Gemma: RMSNorms scale by (1 + scale), computed in float32
  tie_embeddings: bool = False  # logits against the token embedding instead of logits_dense
  scale_embeddings: bool = False  # Gemma: embedded tokens times sqrt(emb_dim)
  qkv_bias: bool = False
  qk_norm: bool = False
  post_norms: bool = False
  query_pre_attn_scalar: Optional[float] = None
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  sliding_window: Optional[int] = None
  sliding_layers: tuple[int, ...] = ()
  bos_id: int = 1  # the token every sequence starts with (training puts it first; decoding too)
  eos_id: int = 2  # the token that ends a generation
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"CausalLMConfig.family={self.family!r}: use one of {', '.join(FAMILIES)}.")
    for name in ("vocab_size", "emb_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "num_layers"):
      if type(getattr(self, name)) is not int or getattr(self, name) <= 0:
        raise ValueError(f"CausalLMConfig.{name} must be a positive integer, got "
                         f"{getattr(self, name)!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"CausalLMConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}; each key/value head serves a group of "
                       "query heads.")
    if self.head_dim % 2:
      raise ValueError(f"CausalLMConfig.head_dim={self.head_dim} must be even for RoPE.")
    if self.activation not in ("silu", "gelu"):
      raise ValueError(f"CausalLMConfig.activation={self.activation!r}: use 'silu' or 'gelu'.")
    for name in ("rope_theta", "local_rope_theta", "query_pre_attn_scalar", "attn_logit_softcap",
                 "final_logit_softcap", "sliding_window"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"CausalLMConfig.{name} must be positive (or None), got {value!r}.")
    if self.qk_norm and not self.norm_plus_one:
      raise ValueError("CausalLMConfig.qk_norm (Gemma 3's) needs norm_plus_one=True.")
    bad = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
    if bad or (self.sliding_layers and self.sliding_window is None):
      raise ValueError(f"CausalLMConfig.sliding_layers={self.sliding_layers}: each must be a layer "
                       f"index below num_layers={self.num_layers}, and they need a sliding_window.")

  @property
  def mlp_activations(self) -> tuple[str, str]:
    """The gated MLP in `layers.MlpBlock`'s terms: `act(x wi_0) * (x wi_1)`."""
    return (self.activation, "linear")

  @property
  def dropout_rate(self) -> float:
    """`layers.MlpBlock` reads it; these models are tuned without dropout."""
    return 0.0

  def rope(self, sliding: bool) -> tuple[float, Optional[RopeScaling]]:
    """(theta, scaling) of a sliding or a global layer's RoPE."""
    if sliding and self.local_rope_theta is not None:
      return self.local_rope_theta, None
    return self.rope_theta, self.rope_scaling

  def replace(self, **changes) -> "CausalLMConfig":
    return dataclasses.replace(self, **changes)


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None
                     ) -> np.ndarray:
  """RoPE's inverse frequencies `[head_dim // 2]` (float32): theta ** (-2i / head_dim), rescaled."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is not None and scaling.kind == "linear":
    inv_freq = inv_freq / scaling.factor
  elif scaling is not None:  # llama3
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = scaling.original_max_positions / scaling.low_freq_factor
    high_wavelength = scaling.original_max_positions / scaling.high_freq_factor
    smooth = ((scaling.original_max_positions / wavelength - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    inv_freq = np.where(wavelength > low_wavelength, inv_freq / scaling.factor,
                        np.where(wavelength < high_wavelength, inv_freq, smoothed))
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates `[batch, length, heads, head_dim]` by `[batch, length]` positions, the halves of the
  head as pairs (transformers' `rotate_half` layout)."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [b, t, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1).astype(jnp.float32)
  return (x.astype(jnp.float32) * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class KeyLayout(NamedTuple):
  """What the attention needs to know of its keys `[batch, keys]`: their positions (int32), which
  are real tokens (bool), and which are pinned (bool: prompt positions, visible to every query of a
  sliding-window layer)."""
  positions: jax.Array
  mask: jax.Array
  pinned: jax.Array


def attention_bias(query_positions: jax.Array, keys: KeyLayout,
                   window: Optional[int] = None) -> jax.Array:
  """The causal mask as an additive bias `[batch, 1, queries, keys]` (0 or MASK_BIAS): a query sees
  the real keys at its position or before, and, with a `window`, only the last `window` positions
  of them (distance < window, transformers' rule) or pinned ones."""
  query = query_positions[:, :, None]
  key = keys.positions[:, None, :]
  allowed = keys.mask[:, None, :] & (key <= query)
  if window is not None:
    allowed = allowed & ((query - key < window) | keys.pinned[:, None, :])
  return jnp.where(allowed, 0.0, MASK_BIAS).astype(jnp.float32)[:, None]


def softcapped_attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array,
                         cap: float) -> jax.Array:
  """`[batch, q, heads, d]` queries over `[batch, k, heads, d]` keys and values with the logits
  soft-capped, `cap * tanh(logits / cap)`, before `bias` is added (Gemma 2); softmax in float32.
  The cores in `attention.py` add the bias to the raw logits, so they cannot do this."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32), key.astype(jnp.float32))
  weights = jax.nn.softmax(jnp.tanh(logits / cap) * cap + bias).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


class GemmaRMSNorm(nn.Module):
  """Gemma's RMS norm: `x / rms(x) * (1 + scale)` in float32 (`scale` starts at 0), over the last
  axis, named `axis` (`embed` for the stream, `kv` for Gemma 3's query and key norms)."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  axis: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis,)),
                       (x.shape[-1],), jnp.float32)
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.epsilon)
    return (y * (1.0 + scale)).astype(self.dtype)


def _norm(config: CausalLMConfig, name: str) -> nn.Module:
  """The stream's RMS norm: T5's (`layers.LayerNorm`, Llama's) or Gemma's."""
  if config.norm_plus_one:
    return GemmaRMSNorm(config.norm_epsilon, config.dtype, name=name)
  return LayerNorm(config.norm_epsilon, config.dtype, name=name)


class CausalSelfAttention(nn.Module):
  """Grouped-query self-attention with RoPE: `query` `[embed, heads * head_dim]`, `key` and `value`
  `[embed, kv_heads * head_dim]` (query head h reads key/value head `h // (heads // kv_heads)`),
  `out`. Besides its own keys it attends to `past` ones (a decoding cache), given first."""
  config: CausalLMConfig
  execution: ExecutionConfig = ExecutionConfig()
  sliding: bool = False

  def project(self, x: jax.Array, name: str, heads: int) -> jax.Array:
    """`[batch, length, embed]` -> `[batch, length, heads, head_dim]` through kernel `name`."""
    cfg = self.config
    y = Dense(heads * cfg.head_dim, ("embed", "joined_kv"), cfg.dtype, name=name)(x)
    if cfg.qkv_bias:
      y = y + self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                      ("joined_kv",)),
                         (heads * cfg.head_dim,), jnp.float32).astype(cfg.dtype)
    return y.reshape(y.shape[:2] + (heads, cfg.head_dim))

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, keys: KeyLayout,
               past: Optional[tuple[jax.Array, jax.Array]] = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attention of `x` `[batch, q, embed]` at `positions` `[batch, q]`.

    Args:
      keys: the layout of all keys `[batch, k]`: `past`'s, then `x`'s own q.
      past: keys and values `[batch, k - q, kv_heads, head_dim]` from before, or None (k = q).
    Returns:
      `[batch, q, embed]`, and `x`'s own keys (RoPE applied) and values
      `[batch, q, kv_heads, head_dim]`, for a cache.
    """
    cfg = self.config
    query = constrain(self.project(x, "query", cfg.num_heads), ("batch", "length", "heads", "kv"))
    key, value = (self.project(x, name, cfg.num_kv_heads) for name in ("key", "value"))
    if cfg.qk_norm:
      query = GemmaRMSNorm(cfg.norm_epsilon, cfg.dtype, "kv", name="query_norm")(query)
      key = GemmaRMSNorm(cfg.norm_epsilon, cfg.dtype, "kv", name="key_norm")(key)
    inv_freq = rope_frequencies(cfg.head_dim, *cfg.rope(self.sliding))
    query, key = apply_rope(query, positions, inv_freq), apply_rope(key, positions, inv_freq)
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    query = query * jnp.asarray(scale, query.dtype)
    all_keys, all_values = (key, value) if past is None else (
        jnp.concatenate([past[0], key], axis=1), jnp.concatenate([past[1], value], axis=1))
    group = cfg.num_heads // cfg.num_kv_heads
    all_keys, all_values = (jnp.repeat(a, group, axis=2) for a in (all_keys, all_values))
    bias = attention_bias(positions, keys, cfg.sliding_window if self.sliding else None)
    if cfg.attn_logit_softcap is not None:
      context = softcapped_attention(query, all_keys, all_values, bias, cfg.attn_logit_softcap)
    else:
      context = attention.dot_product_attention(
          query, all_keys, all_values, bias,
          implementation="xla" if query.shape[1] == 1 else self.execution.attention)
    joined = context.reshape(context.shape[:2] + (cfg.num_heads * cfg.head_dim,))
    out = Dense(cfg.emb_dim, ("joined_kv", "embed"), cfg.dtype, name="out")(joined)
    return out, (key, value)


class DecoderLayer(nn.Module):
  """Pre-normed self-attention and gated MLP, each residual (Gemma: each also post-normed)."""
  config: CausalLMConfig
  execution: ExecutionConfig = ExecutionConfig()
  sliding: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, keys: KeyLayout,
               past: Optional[tuple[jax.Array, jax.Array]] = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`[batch, q, embed]` -> the same, and the layer's keys and values (`CausalSelfAttention`)."""
    cfg = self.config
    y = _norm(cfg, "pre_self_attention_layer_norm")(x)
    y, own = CausalSelfAttention(cfg, self.execution, self.sliding, name="self_attention")(
        y, positions, keys, past)
    if cfg.post_norms:
      y = _norm(cfg, "post_self_attention_layer_norm")(y)
    x = x + y
    y = MlpBlock(cfg, name="mlp")(_norm(cfg, "pre_mlp_layer_norm")(x))
    if cfg.post_norms:
      y = _norm(cfg, "post_mlp_layer_norm")(y)
    return constrain(x + y, STREAM_AXES), own


def _leading_padding(mask: jax.Array) -> jax.Array:
  """`[batch]` number of padding positions before each row's first real one (0 for an empty row)."""
  return jnp.where(mask.any(axis=1), jnp.argmax(mask, axis=1), 0).astype(jnp.int32)


def roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
  """Each row of `x` `[batch, length, ...]` rotated left by `shift[b]` positions."""
  index = (jnp.arange(x.shape[1])[None, :] + shift[:, None]) % x.shape[1]
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def positions_of(mask: jax.Array) -> jax.Array:
  """`[batch, length]` positions: how many real positions come before each (0 for leading pads)."""
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


class Decoder(nn.Module):
  """The prompt hook, the layers, the final norm and the logits; `CausalLM` calls its methods."""
  config: CausalLMConfig
  embedder: Embed
  prompt_config: Optional[prompts.PromptConfig] = None
  execution: ExecutionConfig = ExecutionConfig()

  def setup(self):
    cfg = self.config
    if self.execution.attention == "auto":
      raise ValueError("ExecutionConfig.attention='auto' must be resolved for the devices "
                       "(ExecutionConfig.for_platform) before the model is built.")
    if self.execution.scan_layers:
      raise ValueError("ExecutionConfig.scan_layers is not supported by the decoder-only model "
                       "(its sliding and global layers differ); use scan_layers=False.")
    if self.prompt_config is not None:
      self.prompt = prompts.PromptInput(self.prompt_config, cfg.dtype)
    sliding = set(cfg.sliding_layers)
    layer = remat(DecoderLayer, self.execution, static_argnums=())
    self.layers = [layer(cfg, self.execution, i in sliding) for i in range(cfg.num_layers)]
    self.decoder_norm = _norm(cfg, "decoder_norm")
    if not cfg.tie_embeddings:
      self.logits_dense = Dense(cfg.vocab_size, ("embed", "vocab"), cfg.dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """`[batch, length]` ids -> `[batch, length, embed]`, Gemma's scaled by sqrt(embed)."""
    x = self.embedder(tokens)
    if self.config.scale_embeddings:
      x = x * jnp.asarray(self.config.emb_dim ** 0.5, x.dtype)
    return x

  def add_prompt(self, x: jax.Array, mask: jax.Array, prompt_ids: Optional[jax.Array] = None,
                 prompt_lengths: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The prompt put into embedded rows `[batch, T, E]` with mask `[batch, T]`, after any left
    padding: (`[batch, T + P, E]`, its mask and pinned (prompt) positions `[batch, T + P]`, and
    the index of each of the T input positions in it `[batch, T]`).

    `PromptInput` places the prompt counting from index 0, so left-padded rows are rotated to
    start with their first real token, combined, and rotated back.
    """
    cfg, length = self.prompt_config, x.shape[1]
    shift = _leading_padding(mask)
    x, mask = roll_rows(x, shift), roll_rows(mask, shift)
    combined, combined_mask, _ = self.prompt(x, mask, prompt_ids, prompt_lengths)
    total = combined.shape[1]
    # Where PromptInput's combination puts the prompt (see prompts.COMBINATIONS) and for how long.
    start = {"prefix": jnp.zeros_like(shift), "prefix_after_bos": jnp.ones_like(shift),
             "suffix": jnp.maximum(mask.sum(axis=1) - 1, 0)}[cfg.combine][:, None]
    lengths = (jnp.full_like(shift, total - length) if prompt_lengths is None
               else prompt_lengths)[:, None]
    combined_index = jnp.arange(total)[None, :]
    pinned = (combined_index >= start) & (combined_index < start + lengths)
    token_index = jnp.arange(length)[None, :]
    token_index = token_index + jnp.where(token_index >= start, lengths, 0)
    back = total - shift
    token_index = (roll_rows(token_index, (length - shift) % length) + shift[:, None]) % total
    return (roll_rows(combined, back % total), roll_rows(combined_mask, back % total),
            roll_rows(pinned, back % total), token_index.astype(jnp.int32))

  def run_layers(self, x: jax.Array, positions: jax.Array, keys: KeyLayout,
                 past: Optional[list[tuple[jax.Array, jax.Array]]] = None
                 ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """The layers on `[batch, q, embed]` at `positions` `[batch, q]`; `keys` lays out each layer's
    `past` keys (if any) and then the q own ones. Returns the stream after the final norm and each
    layer's own keys and values `[batch, q, kv_heads, head_dim]`."""
    own = []
    for i, layer in enumerate(self.layers):
      x, kv = layer(x, positions, keys, None if past is None else past[i])
      own.append(kv)
    return self.decoder_norm(x), own

  def logits(self, y: jax.Array) -> jax.Array:
    """Normed `[batch, length, embed]` -> float32 logits `[batch, length, vocab]`, soft-capped."""
    cfg = self.config
    logits = (self.embedder.attend(y) if cfg.tie_embeddings else self.logits_dense(y))
    logits = logits.astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
      logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return constrain(logits, ("batch", "length", "vocab"))

  def __call__(self, tokens: jax.Array, input_mask: Optional[jax.Array] = None,
               prompt_ids: Optional[jax.Array] = None,
               prompt_lengths: Optional[jax.Array] = None) -> jax.Array:
    """`[batch, length]` ids (and mask) -> float32 logits `[batch, length, vocab]` (`CausalLM`)."""
    mask = jnp.ones(tokens.shape, bool) if input_mask is None else input_mask.astype(bool)
    x = self.embed(tokens)
    if self.prompt_config is None:
      if prompt_ids is not None or prompt_lengths is not None:
        raise ValueError("prompt_ids and prompt_lengths need a model built with a PromptConfig.")
      pinned, token_index = jnp.zeros_like(mask), None
    else:
      x, mask, pinned, token_index = self.add_prompt(x, mask, prompt_ids, prompt_lengths)
    positions = positions_of(mask)
    y, _ = self.run_layers(constrain(x, STREAM_AXES), positions,
                           KeyLayout(positions, mask, pinned))
    if token_index is not None:  # the input tokens' outputs, without the prompt's
      y = jnp.take_along_axis(y, token_index[..., None], axis=1)
    return self.logits(y)


class CausalLM(nn.Module):
  """The decoder-only model: token embedder and `Decoder`.

  `__call__(tokens, input_mask, prompt_ids, prompt_lengths)` returns float32 logits
  `[batch, length, vocab]` at the input tokens (the prompt's positions are dropped), position t
  predicting token t + 1. `prompt_ids`, `prompt_lengths` `[batch]` pick each row's prompt from a
  bank (`PromptConfig.bank_size`) and give its real length.
  """
  config: CausalLMConfig
  prompt_config: Optional[prompts.PromptConfig] = None
  execution: ExecutionConfig = ExecutionConfig()

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.decoder = Decoder(cfg, self.token_embedder, self.prompt_config, self.execution)

  def __call__(self, tokens: jax.Array, input_mask: Optional[jax.Array] = None,
               prompt_ids: Optional[jax.Array] = None,
               prompt_lengths: Optional[jax.Array] = None) -> jax.Array:
    return self.decoder(tokens, input_mask, prompt_ids, prompt_lengths)

  # The pieces of `__call__`, for `causal_decoding` (`model.apply(..., method=CausalLM.embed)`).

  def embed(self, tokens: jax.Array) -> jax.Array:
    """`Decoder.embed`: `[batch, length]` ids -> `[batch, length, embed]`."""
    return self.decoder.embed(tokens)

  def add_prompt(self, x: jax.Array, mask: jax.Array, prompt_ids: Optional[jax.Array] = None,
                 prompt_lengths: Optional[jax.Array] = None):
    """`Decoder.add_prompt`: the prompt put into embedded rows, with mask, pinned positions and
    where the input positions went."""
    return self.decoder.add_prompt(x, mask, prompt_ids, prompt_lengths)

  def run_layers(self, x: jax.Array, positions: jax.Array, keys: KeyLayout,
                 past: Optional[list[tuple[jax.Array, jax.Array]]] = None):
    """`Decoder.run_layers`: the normed stream and each layer's own keys and values."""
    return self.decoder.run_layers(x, positions, keys, past)

  def logits(self, y: jax.Array) -> jax.Array:
    """`Decoder.logits`: normed `[batch, length, embed]` -> float32 `[batch, length, vocab]`."""
    return self.decoder.logits(y)


def param_shapes(config: CausalLMConfig, prompt_length: Optional[int] = None
                 ) -> dict[str, tuple[int, ...]]:
  """Flat `{param path: shape}` of `CausalLM(config)` (with a prompt of `prompt_length`), computed
  abstractly (nothing is allocated)."""
  prompt_config = None if prompt_length is None else prompts.PromptConfig(prompt_length)
  tokens = jnp.ones((1, 1), jnp.int32)
  abstract = jax.eval_shape(CausalLM(config, prompt_config).init, jax.random.PRNGKey(0), tokens)
  return {name: tuple(leaf.shape) for name, leaf in flatten(nn.unbox(abstract["params"])).items()}
