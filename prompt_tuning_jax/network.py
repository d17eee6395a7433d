"""A T5 encoder-decoder in Flax Linen, after t5x's `examples/t5/network.py`: the layers
(`layers.py`) stacked into an encoder and a decoder with T5X's parameter names.

The parameter tree is the one T5X (flaxformer) checkpoints hold:
`token_embedder/embedding`, `encoder/relpos_bias/rel_embedding`,
`encoder/layers_{i}/{pre_attention_layer_norm,attention/{query,key,value,out},pre_mlp_layer_norm,mlp}`,
`encoder/encoder_norm`, `decoder/layers_{i}/{pre_self_attention_layer_norm,self_attention,
pre_cross_attention_layer_norm,encoder_decoder_attention,pre_mlp_layer_norm,mlp}`, `decoder/decoder_norm`,
`decoder/logits_dense` (untied models only). With `ExecutionConfig.scan_layers` each stack's layers are
one `nn.scan`ned module, `{encoder,decoder}/layers/...`, every parameter stacked on a leading `layers`
axis (`checkpoints.stack_layers` converts).

`T5Config` is what the model computes; `ExecutionConfig` how (attention implementation, remat, scan),
chosen at the edge and never changing the result. A soft prompt enters through one hook: the encoder
hands its embedded input to a `prompts.PromptInput` (parameter `encoder/prompt/prompt/prompt`, the
official code's name) when the model is built with a `PromptConfig`. Other parameter-efficient
methods live inside the layers (`adapters.Adapters`): LoRA and IA3 in the projections, key/value
prefixes (`{encoder,decoder}/prefix`) in the self-attentions, per-layer prompts
(`encoder/layer_prompts`) at the encoder layers' inputs.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_tuning_jax import adapters as adapters_lib
from prompt_tuning_jax import cpu_attention, prompts
from prompt_tuning_jax.adapters import Adapters
from prompt_tuning_jax.config import ExecutionConfig, T5Config
from prompt_tuning_jax.layers import (MASK_BIAS, STREAM_AXES, Dense, Embed, LayerNorm, MlpBlock,
                                      MultiHeadAttention, RelativePositionBiases, attention_bias,
                                      constrain, dropout, remat)


def attention_module(execution: ExecutionConfig,
                     adapters: Adapters = Adapters()) -> type[MultiHeadAttention]:
  """The attention layer of `execution.attention` (resolved: not `"auto"`). Adapters that change
  the attention layers (LoRA or IA3 on its projections, prefixes) run in `MultiHeadAttention`, whose
  products the `"cpu"` layer reorders; its `"cpu"` core still serves them."""
  if execution.attention == "auto":
    raise ValueError("ExecutionConfig.attention='auto' must be resolved for the devices "
                     "(ExecutionConfig.for_platform) before the model is built.")
  if execution.attention == "cpu" and not adapters.changes_attention:
    return cpu_attention.CpuMultiHeadAttention
  return MultiHeadAttention


# What each layer of a stack may get of its own (`_stack`'s `per_layer`): `"prompt"` `[P, embed]`,
# the layer prompt (`adapters.LayerPrompts`), and `"prefix"`, the keys and values `[P, heads, kv]`
# of its self-attention's prefix (`adapters.Prefix`).
LayerInputs = Optional[dict[str, Any]]


class EncoderLayer(nn.Module):
  """Self-attention and MLP, each pre-normed and residual. Under `nn.scan` (`scanned`) it returns
  `(x, None)`, scan's (carry, output). `layer_inputs` (`LayerInputs`) are this layer's prompt and
  prefix, with the prefix's logit bias `prefix_bias`. `rows`, the same rows as `x` held as a
  `cpu_attention.SharedPrefix`, lets the `"cpu"` attention project the shared rows once."""
  config: T5Config
  execution: ExecutionConfig = ExecutionConfig()
  scanned: bool = False
  adapters: Adapters = Adapters()

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, enable_dropout: bool = False,
               prefix_bias: Optional[jax.Array] = None, layer_inputs: LayerInputs = None,
               rows: Optional[cpu_attention.SharedPrefix] = None):
    cfg, layer_inputs = self.config, layer_inputs or {}
    drop = lambda y: dropout(cfg)(y, deterministic=not enable_dropout)
    if "prompt" in layer_inputs:
      x = adapters_lib.combine_layer_prompt(self.adapters.layer_prompts.combine,
                                            layer_inputs["prompt"], x)
    norm = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_attention_layer_norm")
    y = norm(x) if rows is None else rows.map(norm)
    y = attention_module(self.execution, self.adapters)(
        cfg, self.execution, adapters=self.adapters, name="attention")(
            y, y, bias, enable_dropout=enable_dropout, prefix=layer_inputs.get("prefix"),
            prefix_bias=prefix_bias)
    x = x + drop(y)
    y = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(x)
    x = constrain(x + drop(MlpBlock(cfg, self.adapters, name="mlp")(y, enable_dropout)),
                  STREAM_AXES)
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention to the encoding and MLP; `scanned`, `prefix_bias` and
  `layer_inputs` (a prefix only) as `EncoderLayer`."""
  config: T5Config
  execution: ExecutionConfig = ExecutionConfig()
  scanned: bool = False
  adapters: Adapters = Adapters()

  @nn.compact
  def __call__(self, y: jax.Array, encoded: jax.Array, self_bias: jax.Array, cross_bias: jax.Array,
               enable_dropout: bool = False, decode: bool = False,
               prefix_bias: Optional[jax.Array] = None, layer_inputs: LayerInputs = None):
    cfg, layer_inputs = self.config, layer_inputs or {}
    attention = attention_module(self.execution, self.adapters)
    drop = lambda z: dropout(cfg)(z, deterministic=not enable_dropout)
    z = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_self_attention_layer_norm")(y)
    z = attention(cfg, self.execution, adapters=self.adapters, name="self_attention")(
        z, z, self_bias, enable_dropout=enable_dropout, decode=decode,
        prefix=layer_inputs.get("prefix"), prefix_bias=prefix_bias)
    y = y + drop(z)
    z = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_cross_attention_layer_norm")(y)
    z = attention(cfg, self.execution, cross=True, adapters=self.adapters,
                  name="encoder_decoder_attention")(
        z, encoded, cross_bias, enable_dropout=enable_dropout, decode=decode)
    y = y + drop(z)
    z = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(y)
    y = constrain(y + drop(MlpBlock(cfg, self.adapters, name="mlp")(z, enable_dropout)),
                  STREAM_AXES)
    return (y, None) if self.scanned else y


def _stack(layer: type[nn.Module], config: T5Config, execution: ExecutionConfig, adapters: Adapters,
           num_layers: int, name: str, *args, per_layer: LayerInputs = None,
           first_layer_args: tuple = ()) -> jax.Array:
  """Runs `num_layers` of `layer` on `args` (the stream first, the rest shared by every layer),
  giving layer i `per_layer`'s slice i (leaves `[num_layers, ...]`) after them.

  With `execution.scan_layers` one layer is traced and `nn.scan` runs it over parameters stacked on
  a leading `layers` axis (`{name}/...`, `[num_layers, ...]`), so compile time does not grow with
  depth; otherwise each layer is its own module `{name}_{i}`, the checkpoint layout, and the first
  also gets `first_layer_args` (none under scan).
  """
  stream, *shared = args
  if execution.scan_layers:
    scanned = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(shared) + (nn.broadcast if per_layer is None else 0,),
                      length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(config, execution, scanned=True, adapters=adapters, name=name)(
        stream, *shared, per_layer)[0]
  for i in range(num_layers):
    own = None if per_layer is None else jax.tree_util.tree_map(lambda x: x[i], per_layer)
    stream = layer(config, execution, adapters=adapters, name=f"{name}_{i}")(
        stream, *shared, own, *(first_layer_args if i == 0 else ()))
  return stream


def _prefix(adapters: Adapters, stack: str, config: T5Config, relpos: RelativePositionBiases,
            query_length: int, bidirectional: bool) -> tuple[LayerInputs, Optional[jax.Array]]:
  """`stack`'s prefix keys and values (`{"prefix": ...}`, `[layers, P, heads, kv]` each, from the
  module `prefix`) and their logit bias `[1, heads, query_length, P]` (None: zeros), or (None, None)."""
  prefix = adapters.prefix_in(stack)
  if prefix is None:
    return None, None
  num_layers = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
  keys_values = adapters_lib.PrefixKeysValues(prefix, num_layers, config.num_heads, config.head_dim,
                                              config.emb_dim, name="prefix")()
  bias = None
  if prefix.position_bias == "before":
    bias = relpos(query_length, prefix.length, bidirectional, key_offset=-prefix.length)
  return {"prefix": keys_values}, bias


class Encoder(nn.Module):
  """Embeds tokens, lets the prompt hook extend them, and runs the encoder stack.

  Under the `"cpu"` attention a single prompt in front of every input (`prompts.PromptInput`'s
  shared prefix) also reaches the first layer as a `cpu_attention.SharedPrefix`, except with dropout
  (it makes the prompt's rows differ per example) or scanned layers (one layer is traced for all).
  """
  config: T5Config
  embedder: Embed
  prompt_config: Optional[prompts.PromptConfig] = None
  execution: ExecutionConfig = ExecutionConfig()
  adapters: Adapters = Adapters()

  @nn.compact
  def __call__(self, tokens: jax.Array, enable_dropout: bool = False,
               prompt_ids: Optional[jax.Array] = None,
               prompt_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """`[batch, length]` ids -> (`[batch, length + P, embed]` encoding, `[batch, length + P]` mask).

    `prompt_ids`, `prompt_lengths` `[batch]`: each row's prompt in a bank and its real length.
    """
    cfg, execution, adapters = self.config, self.execution, self.adapters
    drop = lambda x: dropout(cfg)(x, deterministic=not enable_dropout)
    multitask = self.prompt_config.multitask if self.prompt_config is not None else None
    if multitask is not None and prompt_ids is None:  # the task is the input's first token
      prompt_ids, tokens = multitask.task_ids(tokens), tokens[:, 1:]
    embedded = self.embedder(tokens)
    x, mask, rows, shared_prompt = embedded, tokens > 0, (), None
    if self.prompt_config is not None:
      x, mask, shared_prompt = prompts.PromptInput(self.prompt_config, cfg.dtype, name="prompt")(
          x, mask, prompt_ids, prompt_lengths)
      if (shared_prompt is not None and attention_module(execution, adapters) is
          cpu_attention.CpuMultiHeadAttention and adapters.layer_prompts is None
          and not execution.scan_layers and not (enable_dropout and cfg.dropout_rate > 0)):
        rows = (cpu_attention.SharedPrefix(shared_prompt, embedded),)
    x = constrain(drop(x), STREAM_AXES)
    length = x.shape[1]
    relpos = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance, cfg.num_heads,
                                    name="relpos_bias")
    bias = attention_bias(mask, mask) + relpos(length, length, bidirectional=True)
    per_layer, prefix_bias = _prefix(adapters, "encoder", cfg, relpos, length, bidirectional=True)
    if adapters.layer_prompts is not None:
      per_layer = dict(per_layer or {}, prompt=self._layer_prompts(shared_prompt))
    # (self, x, bias, dropout, prefix_bias, layer_inputs, rows)
    layer = remat(EncoderLayer, execution, static_argnums=(3,))
    x = _stack(layer, cfg, execution, adapters, cfg.num_encoder_layers, "layers", x, bias,
               enable_dropout, prefix_bias, per_layer=per_layer, first_layer_args=rows)
    x = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="encoder_norm")(x)
    return drop(x), mask

  def _layer_prompts(self, prompt: Optional[jax.Array]) -> jax.Array:
    """Every layer's prompt `[layers, P, embed]`: the first layer's is the input prompt `[1, P,
    embed]` (`"replace"`) or zeros (`"add"`), the others' the `layer_prompts` table's."""
    combine, config = self.adapters.layer_prompts.combine, self.prompt_config
    if prompt is None:
      raise ValueError("Per-layer prompts need one input prompt combined as a prefix: "
                       "PromptConfig(combine='prefix') with no bank and no prompt_lengths.")
    table = adapters_lib.LayerPromptTable(self.config.num_encoder_layers, config.length,
                                          config.init, name="layer_prompts")(prompt.shape[-1])
    first = prompt if combine == "replace" else jnp.zeros_like(prompt)
    return jnp.concatenate([first.astype(table.dtype), table], axis=0)


class Decoder(nn.Module):
  config: T5Config
  embedder: Embed
  execution: ExecutionConfig = ExecutionConfig()
  adapters: Adapters = Adapters()

  @nn.compact
  def __call__(self, encoded: jax.Array, encoded_mask: jax.Array, decoder_input_tokens: jax.Array,
               decoder_target_tokens: Optional[jax.Array] = None, enable_dropout: bool = False,
               decode: bool = False, max_decode_length: Optional[int] = None) -> jax.Array:
    """Returns float32 logits `[batch, target_length, vocab]`.

    With `decode=True` the input is one position `[batch, 1]` (or the full `[batch, max_decode_length]`
    once, to create the cache) and `max_decode_length` is the cache's length.
    """
    cfg = self.config
    drop = lambda x: dropout(cfg)(x, deterministic=not enable_dropout)
    y = drop(self.embedder(decoder_input_tokens))
    relpos = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance, cfg.num_heads,
                                    name="relpos_bias")
    query_length = max_decode_length if decode else y.shape[1]
    per_layer, prefix_bias = _prefix(self.adapters, "decoder", cfg, relpos, query_length,
                                     bidirectional=False)
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
    # (self, y, encoded, self_bias, cross_bias, enable_dropout, decode, prefix_bias, layer_inputs);
    # no remat while decoding.
    layer = DecoderLayer if decode else remat(DecoderLayer, self.execution, static_argnums=(5, 6))
    y = _stack(layer, cfg, self.execution, self.adapters, cfg.num_decoder_layers, "layers", y,
               encoded, self_bias, cross_bias, enable_dropout, decode, prefix_bias,
               per_layer=per_layer)
    y = drop(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="decoder_norm")(y))
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
    execution: how it is computed (resolved: its attention is not `"auto"`).
    adapters: what other methods add inside the layers (`adapters.py`).
  """
  config: T5Config
  prompt_config: Optional[prompts.PromptConfig] = None
  execution: ExecutionConfig = ExecutionConfig()
  adapters: Adapters = Adapters()

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.encoder = Encoder(cfg, self.token_embedder, self.prompt_config, self.execution,
                           self.adapters)
    self.decoder = Decoder(cfg, self.token_embedder, self.execution, self.adapters)

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
