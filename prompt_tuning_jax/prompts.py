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
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax import prompt_initializers

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]
COMBINATIONS = ("prefix", "prefix_after_bos", "suffix")
# The prompt's parameter in a T5 built with a `PromptConfig` (the official code's path).
PROMPT_PATH = "encoder/prompt/prompt/prompt"
MULTITASK_COMBINATIONS = ("add", "concat", "project")


@dataclasses.dataclass(frozen=True)
class MultitaskPrompt:
  """A prompt shared by `num_tasks` tasks combined with each task's own (the official code's
  `extended/multitask_prompts.py`): `"add"`: shared `[P, E]` + task `[P, E]`; `"concat"`:
  `[shared; task]`, `[P + task_length, E]`; `"project"`: the shared prompt through the task's affine
  map, `shared @ kernel + bias` (`[E, E]` and `[E]`, from the identity and zero). Each example's task is the first token of its input,
  `first_task_token - task index` (`tasks.common.task_indexed_mixture`), which the encoder reads
  and drops; given `prompt_ids`, the input is taken as it is."""
  num_tasks: int
  first_task_token: int
  combine: str = "add"
  task_length: Optional[int] = None

  def __post_init__(self):
    if self.combine not in MULTITASK_COMBINATIONS:
      raise ValueError(f"MultitaskPrompt.combine={self.combine!r}: use one of "
                       f"{MULTITASK_COMBINATIONS}.")
    if self.num_tasks < 1 or (self.task_length is not None and self.task_length < 1):
      raise ValueError(f"MultitaskPrompt: num_tasks ({self.num_tasks}) and task_length "
                       f"({self.task_length}) must be positive.")
    if self.combine != "concat" and self.task_length is not None:
      raise ValueError("MultitaskPrompt.task_length applies to combine='concat' only: added and "
                       "projected prompts have the shared prompt's length.")

  def task_ids(self, tokens: jax.Array) -> jax.Array:
    """`[batch, length]` inputs -> `[batch]` task indices, from each row's first token."""
    return jnp.clip(self.first_task_token - tokens[:, 0], 0, self.num_tasks - 1)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """What soft prompt to add: its length, its initialiser and where it goes in the input.

  `bank_size=N` makes a bank of N prompts `[N, length, embed]` instead of one: each example then names
  its prompt (`prompt_ids`) and its prompt's real length (`prompt_lengths`, for shorter prompts padded
  to `length`), so one compiled model serves any mix of tasks or an ensemble of prompts.
  `residual_hidden=H` passes the prompt through residual prompt tuning's shallow MLP with a skip
  connection (Razdaibiedina et al. 2023, `ResidualReparameterization`), which `fold_residual` folds
  into a plain prompt after training. `multitask` makes it a shared prompt `[length, embed]` plus one
  per task (`MultitaskPrompt`), which `fold_multitask` folds into a bank of per-task prompts.
  """
  length: int
  init: Initializer = prompt_initializers.random_uniform()
  combine: str = "prefix"
  bank_size: Optional[int] = None
  residual_hidden: Optional[int] = None
  multitask: Optional[MultitaskPrompt] = None

  def __post_init__(self):
    if self.length <= 0:
      raise ValueError(f"PromptConfig.length (PROMPT_LENGTH) must be positive, got {self.length}.")
    if self.combine not in COMBINATIONS:
      raise ValueError(f"Unknown prompt combination {self.combine!r}; use one of {COMBINATIONS}.")
    if self.bank_size is not None and self.bank_size <= 0:
      raise ValueError(f"PromptConfig.bank_size must be positive, got {self.bank_size}.")
    if self.residual_hidden is not None and (not isinstance(self.residual_hidden, int)
                                             or self.residual_hidden <= 0):
      raise ValueError(f"PromptConfig.residual_hidden must be a positive integer or None, got "
                       f"{self.residual_hidden!r}.")


class TaskProjection(nn.Module):
  """Each task's affine map of the shared prompt: `kernel` `[num_tasks, embed, embed]` (the
  identity at first) and `bias` `[num_tasks, embed]` (zeros)."""
  num_tasks: int

  @nn.compact
  def __call__(self, embed: int) -> tuple[jax.Array, jax.Array]:
    identity = lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype),
                                                                       shape)
    kernel = self.param("kernel", nn.with_logical_partitioning(
        identity, ("prompts", "prompt_embed", "embed")), (self.num_tasks, embed, embed), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("prompts", "prompt_embed")), (self.num_tasks, embed), jnp.float32)
    return kernel, bias


class ResidualReparameterization(nn.Module):
  """Residual prompt tuning's reparameterisation of a prompt `[..., length, embed]`:
  `P + LayerNorm(relu(P W_down + b_down) W_up + b_up)`, with `W_down` `[embed, hidden]` and `W_up`
  `[hidden, embed]` shared by every position (parameters `down`, `up`, `layer_norm`)."""
  hidden: int

  @nn.compact
  def __call__(self, prompt: jax.Array) -> jax.Array:
    embed = prompt.shape[-1]
    param = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    down = nn.relu(prompt @ param("down_kernel", nn.initializers.lecun_normal(),
                                  (embed, self.hidden), ("prompt_embed", "mlp"))
                   + param("down_bias", nn.initializers.zeros, (self.hidden,), ("mlp",)))
    up = (down @ param("up_kernel", nn.initializers.lecun_normal(), (self.hidden, embed),
                       ("mlp", "prompt_embed"))
          + param("up_bias", nn.initializers.zeros, (embed,), ("prompt_embed",)))
    mean = jnp.mean(up, axis=-1, keepdims=True)
    normed = (up - mean) * jax.lax.rsqrt(jnp.var(up, axis=-1, keepdims=True) + 1e-5)
    normed = (normed * param("layer_norm_scale", nn.initializers.ones, (embed,), ("prompt_embed",))
              + param("layer_norm_bias", nn.initializers.zeros, (embed,), ("prompt_embed",)))
    return prompt + normed


def fold_multitask(prompt_params: dict, multitask: MultitaskPrompt) -> np.ndarray:
  """The bank `[num_tasks, length, embed]` of each task's whole prompt, from a multi-task prompt's
  parameters (`{"shared": {"prompt": [P, E]}, "prompt": {"prompt": [N, P_t, E]}}`, or for
  `"project"` `"projection": {"kernel": [N, E, E], "bias": [N, E]}`)."""
  shared = np.asarray(prompt_params["shared"]["prompt"])
  if multitask.combine == "project":
    projection = prompt_params["projection"]
    return (np.einsum("pe,nef->npf", shared, np.asarray(projection["kernel"]))
            + np.asarray(projection["bias"])[:, None])
  tasks = np.asarray(prompt_params["prompt"]["prompt"])
  if multitask.combine == "add":
    return shared[None] + tasks
  return np.concatenate([np.broadcast_to(shared, (len(tasks),) + shared.shape), tasks], axis=1)


def fold_residual(prompt_params: dict, hidden: int) -> jax.Array:
  """The plain prompt `[..., length, embed]` that a residual prompt's parameters (`{"prompt":
  {"prompt": ...}, "residual": {...}}`, as under `encoder/prompt`) give."""
  module = ResidualReparameterization(hidden)
  return jax.jit(lambda p: module.apply({"params": p["residual"]}, p["prompt"]["prompt"]))(
      prompt_params)


class Prompt(nn.Module):
  """Owns the soft prompt parameter `prompt`: `[length, embed]` (logical axes prompt, prompt_embed),
  or `[bank_size, length, embed]` for a bank (prompts, prompt, prompt_embed)."""
  length: int
  init: Initializer
  bank_size: Optional[int] = None

  @nn.compact
  def __call__(self, embed_dim: int) -> jax.Array:
    if self.bank_size is None:
      return self.param("prompt", nn.with_logical_partitioning(self.init, ("prompt", "prompt_embed")),
                        (self.length, embed_dim), jnp.float32)
    bank_init = lambda key, shape, dtype=jnp.float32: jax.vmap(
        lambda k: self.init(k, shape[1:], dtype))(jax.random.split(key, shape[0]))
    return self.param("prompt",
                      nn.with_logical_partitioning(bank_init, ("prompts", "prompt", "prompt_embed")),
                      (self.bank_size, self.length, embed_dim), jnp.float32)


def insert_prompt(prompt: jax.Array, x: jax.Array, mask: jax.Array, start: jax.Array,
                  lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Puts each row's prompt into its input at position `start`.

  Args:
    prompt: `[batch, P, E]`; row b uses its first `lengths[b]` positions (all P when `lengths` is None).
    x: embedded input `[batch, T, E]`; mask: `[batch, T]`.
    start: `[batch]` insertion points.
    lengths: `[batch]` prompt lengths, for prompts of different lengths padded to P.
  Returns:
    `[batch, T + P, E]` and its mask `[batch, T + P]`: `x[:start]`, the prompt, `x[start:]`, then
    padding, so every row's real positions are exactly those of a run with its own prompt alone.
  """
  prompt_length, length = prompt.shape[1], x.shape[1]
  lengths = jnp.full(x.shape[:1], prompt_length) if lengths is None else lengths
  position = jnp.arange(length + prompt_length)[None, :]
  start, lengths = start[:, None], lengths[:, None]
  in_prompt = (position >= start) & (position < start + lengths)
  x_index = jnp.clip(jnp.where(position < start, position, position - lengths), 0, length - 1)
  p_index = jnp.clip(position - start, 0, prompt_length - 1)
  in_x = (position < start) | (position - lengths < length) & (position >= start + lengths)
  gather = lambda a, i: jnp.take_along_axis(a, i[..., None], axis=1)
  out = jnp.where(in_prompt[..., None], gather(prompt, p_index),
                  jnp.where(in_x[..., None], gather(x, x_index), 0))
  return out, in_prompt | (in_x & jnp.take_along_axis(mask, x_index, axis=1))


def combine_prefix(prompt, x, mask, lengths=None):
  """`[P; X]`: `[batch, P, E]`, `[batch, T, E]`, `[batch, T]` -> `[batch, P + T, E]`, `[batch, P + T]`."""
  if lengths is None:  # Every row's prompt is whole: a plain concatenation.
    ones = jnp.ones(prompt.shape[:2], bool)
    return jnp.concatenate([prompt, x], axis=1), jnp.concatenate([ones, mask], axis=1)
  return insert_prompt(prompt, x, mask, jnp.zeros(x.shape[:1], jnp.int32), lengths)


def combine_prefix_after_bos(prompt, x, mask, lengths=None):
  """Like `combine_prefix`, but the prompt follows the first (BOS) position."""
  return insert_prompt(prompt, x, mask, jnp.ones(x.shape[:1], jnp.int32), lengths)


def combine_suffix(prompt, x, mask, lengths=None):
  """The prompt goes right before each row's last real token (EOS); padding stays at the end."""
  return insert_prompt(prompt, x, mask, jnp.maximum(mask.sum(axis=1) - 1, 0), lengths)


_COMBINE = {"prefix": combine_prefix, "prefix_after_bos": combine_prefix_after_bos,
            "suffix": combine_suffix}


class PromptInput(nn.Module):
  """The encoder's prompt hook: embedded input and mask in, the same with the prompt added out."""
  config: PromptConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, prompt_ids: Optional[jax.Array] = None,
               prompt_lengths: Optional[jax.Array] = None
               ) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """`[batch, T, E]`, `[batch, T]` -> `[batch, T + P, E]`, `[batch, T + P]`, and the shared prefix.

    With a bank, `prompt_ids` `[batch]` picks each row's prompt and `prompt_lengths` `[batch]` gives
    its real length (default: all `length` positions). The shared prefix is the prompt `[1, P, E]`
    when every row starts with all of it (one prompt, combined as a whole prefix), else None.
    """
    cfg = self.config
    if cfg.multitask is not None:
      return self._multitask(x, mask, prompt_ids, prompt_lengths) + (None,)
    prompt = Prompt(cfg.length, cfg.init, cfg.bank_size, name="prompt")(x.shape[-1])
    if cfg.residual_hidden is not None:
      prompt = ResidualReparameterization(cfg.residual_hidden, name="residual")(prompt)
    prompt = prompt.astype(self.dtype)
    shared = None
    if cfg.bank_size is None:
      if prompt_ids is not None:
        raise ValueError("prompt_ids need a prompt bank: build the model with PromptConfig(bank_size=N).")
      if cfg.combine == "prefix" and prompt_lengths is None:
        shared = prompt[None]
      prompt = jnp.broadcast_to(prompt, (x.shape[0],) + prompt.shape)
    else:
      if prompt_ids is None:
        raise ValueError("A prompt bank needs prompt_ids [batch] naming each example's prompt.")
      prompt = jnp.take(prompt, prompt_ids, axis=0)
    return _COMBINE[cfg.combine](prompt, x, mask, prompt_lengths) + (shared,)

  def _multitask(self, x, mask, task_ids, prompt_lengths):
    """A multi-task prompt: the shared prompt (`shared/prompt`) with each row's task prompt (the bank
    `prompt/prompt` `[num_tasks, task_length, embed]`, row `task_ids`)."""
    cfg, multitask = self.config, self.config.multitask
    shared = Prompt(cfg.length, cfg.init, name="shared")(x.shape[-1])
    if multitask.combine == "project":
      kernel, bias = TaskProjection(multitask.num_tasks, name="projection")(x.shape[-1])
      rows = (jnp.einsum("pe,bef->bpf", shared, jnp.take(kernel, task_ids, axis=0))
              + jnp.take(bias, task_ids, axis=0)[:, None])
      return _COMBINE[cfg.combine](rows.astype(self.dtype), x, mask, prompt_lengths)
    tasks = Prompt(multitask.task_length or cfg.length, cfg.init, multitask.num_tasks,
                   name="prompt")(x.shape[-1])
    rows = jnp.take(tasks, task_ids, axis=0)
    if multitask.combine == "add":
      rows = shared[None] + rows
    else:
      rows = jnp.concatenate([jnp.broadcast_to(shared, (rows.shape[0],) + shared.shape), rows],
                             axis=1)
    return _COMBINE[cfg.combine](rows.astype(self.dtype), x, mask, prompt_lengths)
