"""Parameter-efficient additions inside the frozen T5's layers, each a small config object, after
PEFT's tuners, plus the stack-level modules that own their per-layer parameters.

  - `Lora(rank, alpha, targets)`: a low-rank update beside a projection's kernel, `x A B alpha / rank`
    (Hu et al. 2021; PEFT's LoRA): `{projection}/lora_a` `[in, rank]` (fan-in normal) and
    `{projection}/lora_b` `[rank, out]` (zeros, so training starts from the frozen model).
  - `IA3(targets, feedforward)`: a learned rescaling (Liu et al. 2022; PEFT's IA3),
    `{projection}/ia3_scale` (ones): of the outputs of `targets`, except those also in `feedforward`,
    whose inputs it scales.
  - `Prefix(length, stacks, position_bias, hidden)`: key and value prefixes `[layers, length, heads,
    kv]` for every self-attention layer of `stacks` (Li & Liang 2021), optionally produced by an MLP
    from a `[length, embed]` table (`hidden`: its width), which `fold_prefix` turns into plain
    prefixes after training.
  - `LayerPrompts(combine)`: a prompt at the input of every encoder layer after the first (the
    official code's `extended/train/per_layer.py`): it replaces (`"replace"`) or is added to
    (`"add"`) the positions the input prompt holds; the first layer sees the input prompt itself.

Projection names are T5X's: `query`, `key`, `value`, `out` in every attention, `wi` (or `wi_0`,
`wi_1`) and `wo` in every MLP, so PEFT's T5 names map one to one (`q`, `k`, `v`, `o`, `wi`, `wo`).
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

PROJECTIONS = ("query", "key", "value", "out", "wi", "wi_0", "wi_1", "wo")
STACKS = ("encoder", "decoder")
PREFIX_POSITION_BIASES = ("none", "before")
LAYER_PROMPT_COMBINATIONS = ("replace", "add")


def _check_projections(owner: str, names: tuple[str, ...]) -> None:
  unknown = [n for n in names if n not in PROJECTIONS]
  if unknown or not names:
    raise ValueError(f"{owner}: {unknown or 'no projections'} given; name projections among "
                     f"{', '.join(PROJECTIONS)} (PEFT's q, k, v, o, wi, wo).")


@dataclasses.dataclass(frozen=True)
class Lora:
  """LoRA on `targets` (PEFT's default for T5: query and value) of every layer."""
  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = ("query", "value")

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
      raise ValueError(f"Lora.rank must be a positive integer, got {self.rank!r}.")
    if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
      raise ValueError(f"Lora.alpha must be a positive number, got {self.alpha!r}.")
    object.__setattr__(self, "targets", tuple(self.targets))
    _check_projections("Lora.targets", self.targets)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class IA3:
  """IA3 on `targets` of every layer; `feedforward` (a subset) are scaled at their inputs. PEFT's
  default for T5: key, value and wo, with wo a feed-forward module."""
  targets: tuple[str, ...] = ("key", "value", "wo")
  feedforward: tuple[str, ...] = ("wo",)

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "feedforward", tuple(self.feedforward))
    _check_projections("IA3.targets", self.targets)
    if not set(self.feedforward) <= set(self.targets):
      raise ValueError(f"IA3.feedforward {self.feedforward} must be among IA3.targets "
                       f"{self.targets}.")


@dataclasses.dataclass(frozen=True)
class Prefix:
  """Key/value prefixes of `length` positions in the self-attention of every layer of `stacks`.

  `position_bias`: `"none"` gives the prefix positions no relative-position bias (attention to
  them depends on their content only); `"before"` places them right before the sequence, as PEFT's
  PREFIX_TUNING does on T5 (through the decoder's cache: `stacks=("decoder",)`). `hidden`: the width
  of the MLP that produces the prefixes while training (Li & Liang's reparameterisation; PEFT's
  `prefix_projection`), None for plain prefixes.
  """
  length: int = 10
  stacks: tuple[str, ...] = STACKS
  position_bias: str = "none"
  hidden: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 1:
      raise ValueError(f"Prefix.length (PREFIX_LENGTH) must be a positive integer, got "
                       f"{self.length!r}.")
    object.__setattr__(self, "stacks", tuple(self.stacks))
    if not self.stacks or not set(self.stacks) <= set(STACKS):
      raise ValueError(f"Prefix.stacks={self.stacks!r}: use 'encoder', 'decoder' or both.")
    if self.position_bias not in PREFIX_POSITION_BIASES:
      raise ValueError(f"Prefix.position_bias={self.position_bias!r}: use one of "
                       f"{PREFIX_POSITION_BIASES}.")
    if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden < 1):
      raise ValueError(f"Prefix.hidden must be a positive integer or None, got {self.hidden!r}.")


@dataclasses.dataclass(frozen=True)
class LayerPrompts:
  """A prompt at every encoder layer's input after the first, `combine`d with the stream's prompt
  positions (the input prompt, which must be a single `prefix` prompt)."""
  combine: str = "replace"

  def __post_init__(self):
    if self.combine not in LAYER_PROMPT_COMBINATIONS:
      raise ValueError(f"LayerPrompts.combine={self.combine!r}: use one of "
                       f"{LAYER_PROMPT_COMBINATIONS}.")


@dataclasses.dataclass(frozen=True)
class Adapters:
  """Everything added inside the layers of one model; all None is the plain T5."""
  lora: Optional[Lora] = None
  ia3: Optional[IA3] = None
  prefix: Optional[Prefix] = None
  layer_prompts: Optional[LayerPrompts] = None

  def projection(self, name: str) -> dict[str, Any]:
    """`layers.Dense` keyword arguments (`lora`, `ia3`) of the projection `name`."""
    ia3 = None
    if self.ia3 is not None and name in self.ia3.targets:
      ia3 = "inputs" if name in self.ia3.feedforward else "outputs"
    lora = self.lora if self.lora is not None and name in self.lora.targets else None
    return dict(lora=lora, ia3=ia3)

  def prefix_in(self, stack: str) -> Optional[Prefix]:
    """The prefix of `stack`'s self-attention, or None."""
    return self.prefix if self.prefix is not None and stack in self.prefix.stacks else None

  @property
  def changes_attention(self) -> bool:
    """Whether any attention layer computes differently from the plain T5's."""
    names = set()
    for config in (self.lora, self.ia3):
      names |= set(config.targets) if config is not None else set()
    return self.prefix is not None or bool(names & {"query", "key", "value", "out"})


class PrefixKeysValues(nn.Module):
  """One stack's prefixes: keys and values `[layers, length, heads, kv]` (logical axes `layers`,
  `prefix`, `heads`, `kv`). Plain: parameters `key` and `value` (PEFT's normal(1) initialisation).
  With `config.hidden`: an `embedding` `[length, embed]` through a tanh MLP (`wi` `[embed, hidden]`,
  `wo` `[hidden, layers * 2 * heads * kv]`, with biases)."""
  config: Prefix
  num_layers: int
  num_heads: int
  head_dim: int
  emb_dim: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    cfg, shape = self.config, (self.num_layers, self.config.length, self.num_heads, self.head_dim)
    axes = ("layers", "prefix", "heads", "kv")
    if cfg.hidden is None:
      init = nn.with_logical_partitioning(nn.initializers.normal(1.0), axes)
      return (self.param("key", init, shape, jnp.float32),
              self.param("value", init, shape, jnp.float32))
    param = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    out_features = self.num_layers * 2 * self.num_heads * self.head_dim
    table = param("embedding", nn.initializers.normal(1.0), (cfg.length, self.emb_dim),
                  ("prefix", "embed"))
    hidden = jnp.tanh(table @ param("wi", nn.initializers.lecun_normal(), (self.emb_dim, cfg.hidden),
                                    ("embed", "mlp"))
                      + param("wi_bias", nn.initializers.zeros, (cfg.hidden,), ("mlp",)))
    flat = (hidden @ param("wo", nn.initializers.lecun_normal(), (cfg.hidden, out_features),
                           ("mlp", "joined_kv"))
            + param("wo_bias", nn.initializers.zeros, (out_features,), ("joined_kv",)))
    both = flat.reshape(cfg.length, self.num_layers, 2, self.num_heads, self.head_dim)
    both = jnp.transpose(both, (2, 1, 0, 3, 4))  # [2, layers, length, heads, kv]
    return both[0], both[1]


class LayerPromptTable(nn.Module):
  """The prompts of encoder layers 1.. `[layers - 1, length, embed]` (logical axes `layers`,
  `prompt`, `prompt_embed`), parameter `prompt`, initialised like the input prompt."""
  num_layers: int
  length: int
  init: Any

  @nn.compact
  def __call__(self, embed_dim: int) -> jax.Array:
    shape = (self.num_layers - 1, self.length, embed_dim)
    table_init = lambda key, shape, dtype=jnp.float32: jax.vmap(
        lambda k: self.init(k, shape[1:], dtype))(jax.random.split(key, shape[0]))
    return self.param("prompt", nn.with_logical_partitioning(
        table_init, ("layers", "prompt", "prompt_embed")), shape, jnp.float32)


def combine_layer_prompt(combine: str, prompt: jax.Array, x: jax.Array) -> jax.Array:
  """`x` `[batch, P + T, embed]` with its first P positions replaced by, or added to, `prompt`
  `[P, embed]`."""
  length = prompt.shape[0]
  head = x[:, :length]
  prompt = jnp.broadcast_to(prompt.astype(x.dtype), head.shape)
  head = prompt if combine == "replace" else head + prompt
  return jnp.concatenate([head, x[:, length:]], axis=1)


def fold_prefix(prefix_params: dict[str, Any], config: Prefix, num_layers: int, num_heads: int,
                head_dim: int, emb_dim: int) -> dict[str, Any]:
  """One stack's prefix parameters with the MLP applied: `{"key", "value"}` `[layers, length,
  heads, kv]`, what a model built with `hidden=None` reads."""
  module = PrefixKeysValues(config, num_layers, num_heads, head_dim, emb_dim)
  key, value = jax.jit(lambda p: module.apply({"params": p}))(prefix_params)
  return {"key": key, "value": value}
