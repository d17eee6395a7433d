"""The two architectures a prompt is tuned on, behind one interface: `ENCODER_DECODER`
(`network.T5`, seqio's `EncDecFeatureConverter`) and `DECODER_ONLY` (`causal_lm.CausalLM`, seqio's
`PrefixLMFeatureConverter`). `of(model_config)` picks one by the model config that a gin model file
binds (`t5_config()` or `causal_lm_config()`), so the entry points need no flag of their own.

Both read batches in T5X's feature names, in which `decoder_target_tokens` and
`decoder_loss_weights` `[batch, length]` mean the same, and `logits` gives float32 logits
`[batch, length, vocab]` at those targets: the train and eval steps, the loss and the metrics are
shared.

Decoder-only features (unpacked PrefixLM): an example's inputs and targets concatenated,
`decoder_input_tokens` the same shifted right by one (0 first), `decoder_loss_weights` 1 on the
targets only (the loss is on target tokens only) and `decoder_causal_attention` 1 on the first
len(inputs) + 1 positions, the inputs as the decoder reads them. The model reads
`decoder_input_tokens` with its BOS in place of the leading 0, its real positions those with a
target (seqio pads with 0), position t predicting target t. Decoding continues each row's
`decoder_causal_attention` positions, `[BOS; inputs]`, left-padded (`causal_decoding.generate`).
"""
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from prompt_tuning_jax import (causal_decoding, causal_lm, checkpoints, decoding, hf_causal_lm,
                               methods, prompts, scoring, xla_cpu)
from prompt_tuning_jax.causal_lm import CausalLM, CausalLMConfig
from prompt_tuning_jax.config import ExecutionConfig, T5Config

Batch = Mapping[str, jax.Array]
# (params, features) -> decoded tokens `[batch, max_length]`.
Decoder = Callable[[Any, Batch], jax.Array]


def _describe(config: Any, layers: str, heads: str) -> str:
  return (f"{layers} layers, {heads} heads of {config.head_dim}, MLP {config.mlp_dim}, vocab "
          f"{config.vocab_size} ({jnp.dtype(config.dtype).name})")


class EncoderDecoder:
  """T5: the prompt in the encoder, the targets decoded by the decoder."""
  prompt_path = checkpoints.PROMPT_PATH
  features = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "decoder_loss_weights")

  def feature_converter(self) -> seqio.FeatureConverter:
    return seqio.EncDecFeatureConverter(pack=False)

  def compiler_options(self, platform: Optional[str] = None, onednn: bool = True) -> dict[str, Any]:
    """`jax.jit`'s compiler options for T5's steps on `platform` (`xla_cpu.dot_compiler_options`)."""
    return xla_cpu.dot_compiler_options(platform, onednn=onednn)

  def describe(self, config: T5Config) -> str:
    """The model in a few words, for a run's opening line."""
    return (f"T5 of emb {config.emb_dim}, " + _describe(
        config, f"{config.num_encoder_layers}+{config.num_decoder_layers}", str(config.num_heads)))

  def check(self, method: methods.Method, decoding_method: str, length_buckets: Sequence[int],
            assignment_map: Sequence[Any]) -> None:
    """Raises a ValueError for settings the architecture cannot run (T5 runs them all)."""
    del method, decoding_method, length_buckets, assignment_map

  def check_checkpoint(self, path: str, config: T5Config) -> None:
    checkpoints.check_checkpoint_matches(path, config)

  def load_frozen_params(self, config: T5Config, path: Optional[str],
                         assignment_map: Sequence[tuple[str, Optional[str]]], rng: jax.Array,
                         scan_layers: bool) -> dict[str, np.ndarray]:
    return checkpoints.load_frozen_params(config, path, assignment_map, rng,
                                          scan_layers=scan_layers)

  def trainable_patterns(self, method: methods.Method) -> tuple[str, ...]:
    return method.trainable_patterns

  def build(self, method: methods.Method, config: T5Config,
            prompt_config: Optional[prompts.PromptConfig],
            execution: ExecutionConfig = ExecutionConfig()) -> nn.Module:
    return methods.build_model(method, config, prompt_config, execution)

  def new_params(self, model: nn.Module, known: set[str], rng: jax.Array) -> dict[str, np.ndarray]:
    """The method's parameters besides the checkpoint's and the prompt, from their initialisers."""
    return methods.init_new_params(model, known, rng)

  def logits(self, model: nn.Module, params, batch: Batch,
             dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Float32 logits `[batch, length, vocab]` at `decoder_target_tokens` (dropout with a key)."""
    enable_dropout = dropout_rng is not None
    return model.apply({"params": params}, batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                       enable_dropout=enable_dropout,
                       rngs={"dropout": dropout_rng} if enable_dropout else None)

  def score(self, model: nn.Module, params, batch: Batch) -> jax.Array:
    """The log-likelihood of each row's targets `[batch]`."""
    return scoring.score(model, params, batch["encoder_input_tokens"],
                         batch["decoder_target_tokens"])

  def decoder(self, model: nn.Module, config: Any, max_length: int) -> Decoder:
    """Decoding by `config` (`evaluation.DecodingConfig`): greedy, beam search or sampling."""
    if config.method == "greedy":
      fn = functools.partial(decoding.greedy_decode, model, max_decode_length=max_length)
      return lambda params, batch: fn(params, batch["encoder_input_tokens"])[0]
    if config.method == "beam_search":
      fn = functools.partial(decoding.beam_search, model, max_decode_length=max_length,
                             beam_size=config.beam_size, alpha=config.alpha)
      return lambda params, batch: fn(params, batch["encoder_input_tokens"])[0][:, 0]
    fn = functools.partial(decoding.temperature_sample, model, max_decode_length=max_length,
                           temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    key = jax.random.PRNGKey(config.seed)
    return lambda params, batch: fn(params, batch["encoder_input_tokens"], key)[0]


class DecoderOnly:
  """A Llama- or Gemma-family `CausalLM`: the prompt in the decoder, inputs and targets one
  sequence (see the module docstring)."""
  prompt_path = causal_lm.PROMPT_PATH
  features = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
              "decoder_causal_attention")

  def feature_converter(self) -> seqio.FeatureConverter:
    return seqio.PrefixLMFeatureConverter(pack=False)

  def compiler_options(self, platform: Optional[str] = None, onednn: bool = True) -> dict[str, Any]:
    """None: XLA's defaults, which run the decoder's steps faster on CPU than T5's options do
    (benchmarks/README.md, "Decoder-only prompt tuning against PEFT")."""
    del platform, onednn
    return {}

  def describe(self, config: CausalLMConfig) -> str:
    return (f"{config.family} decoder of emb {config.emb_dim}, " + _describe(
        config, str(config.num_layers), f"{config.num_heads} (key/value {config.num_kv_heads})"))

  def check(self, method: methods.Method, decoding_method: str, length_buckets: Sequence[int],
            assignment_map: Sequence[Any]) -> None:
    """Raises a ValueError naming the setting a decoder-only run cannot use."""
    if method != methods.prompt_tuning():
      raise ValueError(f"METHOD {method.name}: decoder-only models tune a prompt only; include no "
                       "methods/*.gin file (methods.prompt_tuning).")
    if decoding_method == "beam_search":
      raise ValueError("DecodingConfig.method='beam_search' is not supported for decoder-only "
                       "models; use 'greedy' or 'sample'.")
    if length_buckets:
      raise ValueError("length_buckets are not supported for decoder-only models (inputs and "
                       "targets are one sequence); leave them empty.")
    if assignment_map:
      raise ValueError("An assignment map is not supported for decoder-only models; their "
                       "checkpoint must hold the whole model.")

  def check_checkpoint(self, path: str, config: CausalLMConfig) -> None:
    hf_causal_lm.check_checkpoint_matches(path, config)

  def load_frozen_params(self, config: CausalLMConfig, path: Optional[str],
                         assignment_map: Sequence[tuple[str, Optional[str]]], rng: jax.Array,
                         scan_layers: bool) -> dict[str, np.ndarray]:
    del assignment_map, scan_layers  # refused by `check` and by the model
    return hf_causal_lm.load_frozen_params(config, path, rng)

  def trainable_patterns(self, method: methods.Method) -> tuple[str, ...]:
    del method  # prompt tuning (`check`)
    return (r"decoder/prompt/.*",)

  def build(self, method: methods.Method, config: CausalLMConfig,
            prompt_config: Optional[prompts.PromptConfig],
            execution: ExecutionConfig = ExecutionConfig()) -> nn.Module:
    del method  # prompt tuning (`check`)
    return CausalLM(config, prompt_config, execution)

  def new_params(self, model: nn.Module, known: set[str], rng: jax.Array) -> dict[str, np.ndarray]:
    del model, known, rng  # prompt tuning adds the prompt alone
    return {}

  def logits(self, model: nn.Module, params, batch: Batch,
             dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Float32 logits `[batch, length, vocab]`, position t predicting `decoder_target_tokens` t."""
    del dropout_rng  # these models are tuned without dropout
    tokens = batch["decoder_input_tokens"].at[:, 0].set(model.config.bos_id)
    return model.apply({"params": params}, tokens, batch["decoder_target_tokens"] > 0)

  def score(self, model: nn.Module, params, batch: Batch) -> jax.Array:
    """The log-likelihood of each row's targets (its loss-weighted tokens) `[batch]`."""
    targets = jnp.where(batch["decoder_loss_weights"] > 0, batch["decoder_target_tokens"], 0)
    return scoring.sequence_log_likelihood(self.logits(model, params, batch), targets)

  def decoder(self, model: nn.Module, config: Any, max_length: int) -> Decoder:
    """Greedy decoding or sampling by `config` (`evaluation.DecodingConfig`) of up to `max_length`
    tokens after each row's `[BOS; inputs]`, with the prompt's keys and values computed once."""
    cfg = model.config
    settings = dict(max_new_tokens=max_length, eos_id=cfg.eos_id, bos_id=cfg.bos_id)
    if config.method == "sample":
      settings.update(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    key = jax.random.PRNGKey(config.seed)

    def decode(params, batch: Batch) -> jax.Array:
      tokens, mask = left_padded_inputs(batch, cfg.bos_id)
      return causal_decoding.generate(model, params, tokens, mask, key, **settings)[0]
    return decode


def left_padded_inputs(batch: Batch, bos_id: int) -> tuple[jax.Array, jax.Array]:
  """Each row's `[BOS; inputs]` (its `decoder_causal_attention` positions of
  `decoder_input_tokens`, BOS first) moved to the end of the row: tokens and their mask
  `[batch, length]`, padding 0."""
  mask = batch["decoder_causal_attention"] > 0
  tokens = jnp.where(mask, batch["decoder_input_tokens"].at[:, 0].set(bos_id), 0)
  real = mask.sum(axis=1)
  return causal_lm.roll_rows(tokens, real), causal_lm.roll_rows(mask, real)


ENCODER_DECODER = EncoderDecoder()
DECODER_ONLY = DecoderOnly()
Architecture = EncoderDecoder | DecoderOnly


def of(model_config: Any) -> Architecture:
  """The architecture of a model config: `DECODER_ONLY` for a `CausalLMConfig`, else T5's."""
  return DECODER_ONLY if isinstance(model_config, CausalLMConfig) else ENCODER_DECODER
