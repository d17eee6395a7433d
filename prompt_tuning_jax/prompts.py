"""The soft prompt: a config object, the module that owns `[prompt_length, embed]`, and where it goes.

`PromptConfig(length=100, init=prompt_initializers.from_class_labels(...), combine="prefix")` is all a
model needs: `network.T5(config, prompt_config)` builds a `PromptInput` named `prompt` inside the encoder,
whose `Prompt` holds the parameter `encoder/prompt/prompt/prompt` (the official code's path).

Combinations, for embedded input `X` `[batch, length, embed]` and prompt `P` `[prompt_length, embed]`:
  - `prefix`: `[P; X]` (the paper).
  - `prefix_after_bos`: `[X_0; P; X_1:]`, for inputs that begin with a BOS token.
  - `suffix`: `P` inserted right before each row's last real token (T5's EOS): `[X_:n-1; P; X_n-1; pad]`.
The returned mask marks the prompt positions as real, so the encoder's self-attention and the decoder's
cross-attention both see them.
"""
import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_tuning_jax import prompt_initializers

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]
COMBINATIONS = ("prefix", "prefix_after_bos", "suffix")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """What soft prompt to add: its length, its initialiser and where it goes in the input."""
  length: int
  init: Initializer = prompt_initializers.random_uniform()
  combine: str = "prefix"

  def __post_init__(self):
    if self.length <= 0:
      raise ValueError(f"PromptConfig.length (PROMPT_LENGTH) must be positive, got {self.length}.")
    if self.combine not in COMBINATIONS:
      raise ValueError(f"Unknown prompt combination {self.combine!r}; use one of {COMBINATIONS}.")


class Prompt(nn.Module):
  """Owns the soft prompt parameter `prompt` `[length, embed]` (logical axes prompt, prompt_embed)."""
  length: int
  init: Initializer

  @nn.compact
  def __call__(self, embed_dim: int) -> jax.Array:
    return self.param("prompt", nn.with_logical_partitioning(self.init, ("prompt", "prompt_embed")),
                      (self.length, embed_dim), jnp.float32)


def combine_prefix(prompt, x, mask):
  """`[batch, P, E]`, `[batch, T, E]`, `[batch, T]` -> `[batch, P + T, E]`, `[batch, P + T]`."""
  ones = jnp.ones(prompt.shape[:2], bool)
  return jnp.concatenate([prompt, x], axis=1), jnp.concatenate([ones, mask], axis=1)


def combine_prefix_after_bos(prompt, x, mask):
  """Like `combine_prefix`, but the prompt follows the first (BOS) position."""
  ones = jnp.ones(prompt.shape[:2], bool)
  return (jnp.concatenate([x[:, :1], prompt, x[:, 1:]], axis=1),
          jnp.concatenate([mask[:, :1], ones, mask[:, 1:]], axis=1))


def combine_suffix(prompt, x, mask):
  """The prompt goes right before each row's last real token (EOS); padding stays at the end."""
  prompt_length, length = prompt.shape[1], x.shape[1]
  position = jnp.arange(length + prompt_length)[None, :]
  start = jnp.maximum(mask.sum(axis=1) - 1, 0)[:, None]
  in_prompt = (position >= start) & (position < start + prompt_length)
  x_index = jnp.clip(jnp.where(position < start, position, position - prompt_length), 0, length - 1)
  p_index = jnp.clip(position - start, 0, prompt_length - 1)
  gather = lambda a, i: jnp.take_along_axis(a, i[..., None], axis=1)
  out = jnp.where(in_prompt[..., None], gather(prompt, p_index), gather(x, x_index))
  return out, in_prompt | jnp.take_along_axis(mask, x_index, axis=1)


_COMBINE = {"prefix": combine_prefix, "prefix_after_bos": combine_prefix_after_bos,
            "suffix": combine_suffix}


class PromptInput(nn.Module):
  """The encoder's prompt hook: embedded input and mask in, the same with the prompt added out."""
  config: PromptConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[batch, T, E]`, `[batch, T]` -> `[batch, T + P, E]`, `[batch, T + P]`."""
    prompt = Prompt(self.config.length, self.config.init, name="prompt")(x.shape[-1])
    prompt = jnp.broadcast_to(prompt.astype(self.dtype), (x.shape[0],) + prompt.shape)
    return _COMBINE[self.config.combine](prompt, x, mask)
