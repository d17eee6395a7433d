"""T5 architecture configs: one small frozen dataclass and the named presets of the released models."""
import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

VERSIONS = ("t5_1_0", "t5_1_1", "t5_1_1_lm100k", "mt5", "byt5")
SIZES = ("tiny", "small", "base", "large", "xl", "xxl")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape and behaviour of a T5 encoder-decoder.

  Field names follow t5x's `examples/t5/network.py` (`emb_dim`, `num_heads`, `head_dim`, `mlp_dim`, ...),
  so a T5X gin file's numbers carry over as they are.
  """
  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  # ('gelu', 'linear') is T5 1.1's gated GELU; ('relu',) is T5 1.0's plain ReLU MLP.
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  # True: logits are the token embedding's transpose, scaled by emb_dim**-0.5 (T5 1.0). False: a
  # separate `decoder/logits_dense` (T5 1.1, mT5, ByT5).
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  # Activations (and the frozen weights when they are cast) run in `dtype`; attention logits and the
  # softmax stay in float32 when `float32_attention_logits` is set.
  dtype: Any = jnp.float32
  float32_attention_logits: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
                 "num_decoder_layers", "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}.")
    if not self.mlp_activations or any(a not in ("gelu", "relu", "linear", "silu")
                                       for a in self.mlp_activations):
      raise ValueError(f"T5Config.mlp_activations={self.mlp_activations!r}: use ('relu',) for T5 1.0 "
                       "or ('gelu', 'linear') for T5 1.1; known activations: gelu, relu, silu, linear.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}.")

  @property
  def is_gated(self) -> bool:
    return len(self.mlp_activations) > 1

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cpu")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """How the model is computed, not what: every setting gives the same logits and gradients (within
  float rounding), so none is part of a run's identity and a run may resume under others.

  `attention` is the attention core: `"xla"` (T5X's einsum and softmax, the reference), `"cudnn"`
  (cuDNN's fused attention through `jax.nn.dot_product_attention`, NVIDIA GPUs in bfloat16/float16),
  `"cpu"` (kernels laid out for XLA:CPU and oneDNN: the prompt's projections shared by the batch,
  cross-attention through its unprojected inputs, the core in `attention_chunks` batch chunks), or
  `"auto"`, which `for_platform` turns into the best of these for a platform before the model is
  built. `remat_policy` recomputes each layer's activations in the backward pass (`"none"`, `"full"`:
  only the layer's input is kept, `"dots"`: matmul outputs are kept). `scan_layers` runs each stack's
  layers with `nn.scan` over parameters stacked on a leading `layers` axis, so one layer is compiled
  instead of all (checkpoints keep T5X's `layers_{i}`; `checkpoints.stack_layers` converts).
  """
  attention: str = "xla"
  attention_chunks: Optional[int] = None  # "cpu" only; None: 2, or 1 where 2 does not divide the batch
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ATTENTION_IMPLEMENTATION={self.attention!r} is not one of "
                       f"{', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}; 'auto' picks for the devices.")
    if self.attention_chunks is not None and (not isinstance(self.attention_chunks, int)
                                              or isinstance(self.attention_chunks, bool)
                                              or self.attention_chunks < 1):
      raise ValueError(f"ExecutionConfig.attention_chunks={self.attention_chunks!r}: use a positive "
                       "integer, or None for the default.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ExecutionConfig.remat_policy={self.remat_policy!r}: use one of "
                       f"{REMAT_POLICIES}.")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"ExecutionConfig.scan_layers={self.scan_layers!r}: use True or False.")

  def replace(self, **changes) -> "ExecutionConfig":
    return dataclasses.replace(self, **changes)

  def for_platform(self, platform: str, model_config: T5Config) -> "ExecutionConfig":
    """This config with `"auto"` replaced by the best implementation for a device `platform` (`"cpu"`,
    `"gpu"`, `"tpu"`) and `model_config`; refuses `"cudnn"` where cuDNN cannot run it."""
    cudnn_ok = (platform == "gpu" and jnp.dtype(model_config.dtype) in (jnp.bfloat16, jnp.float16)
                and model_config.head_dim % 8 == 0 and model_config.head_dim <= 128)
    if self.attention == "cudnn" and not cudnn_ok:
      raise ValueError(
          f"ATTENTION_IMPLEMENTATION='cudnn' needs an NVIDIA GPU and a bfloat16 or float16 model with "
          f"a head_dim that is a multiple of 8 up to 128; this run has platform {platform!r}, dtype "
          f"{jnp.dtype(model_config.dtype).name}, head_dim {model_config.head_dim}: use 'auto' or 'xla'.")
    if self.attention != "auto":
      return self
    best = {"cpu": "cpu", "gpu": "cudnn" if cudnn_ok else "xla"}.get(platform, "xla")
    return self.replace(attention=best)


def _refuse_execution_fields(overrides: dict[str, Any]) -> None:
  """`t5_config` describes the architecture; execution settings moved to `ExecutionConfig`."""
  moved = sorted(set(overrides) & {f.name for f in dataclasses.fields(ExecutionConfig)})
  if moved:
    raise ValueError(
        f"t5_config.{moved[0]} is an execution setting, not part of the architecture: bind "
        + ", ".join(f"--gin.ExecutionConfig.{name}=..." for name in moved) + " instead.")


# (emb_dim, num_heads, head_dim, mlp_dim, num_encoder_layers, num_decoder_layers) of each release.
_T5_1_0_SIZES = {
    "small": (512, 8, 64, 2048, 6, 6),
    "base": (768, 12, 64, 3072, 12, 12),
    "large": (1024, 16, 64, 4096, 24, 24),
    "xl": (1024, 32, 128, 16384, 24, 24),
    "xxl": (1024, 128, 128, 65536, 24, 24),
}
_T5_1_1_SIZES = {
    "small": (512, 6, 64, 1024, 8, 8),
    "base": (768, 12, 64, 2048, 12, 12),
    "large": (1024, 16, 64, 2816, 24, 24),
    "xl": (2048, 32, 64, 5120, 24, 24),
    "xxl": (4096, 64, 64, 10240, 24, 24),
}
_BYT5_SIZES = {
    "small": (1472, 6, 64, 3584, 12, 4),
    "base": (1536, 12, 64, 3968, 18, 6),
    "large": (1536, 16, 64, 3840, 36, 12),
    "xl": (2560, 32, 64, 6720, 36, 12),
    "xxl": (4672, 64, 64, 12352, 36, 12),
}
# The architecture of the real test checkpoint written by t5x (`../shared/checkpoints`).
_TINY = (4, 2, 2, 8, 2, 2)
_TINY_RELPOS = dict(relative_attention_num_buckets=4, relative_attention_max_distance=8)


def t5_config(version: str = "t5_1_1", size: str = "small", **overrides) -> T5Config:
  """The config of a released T5 model, e.g. `t5_config("t5_1_1_lm100k", "xxl", dtype=jnp.bfloat16)`.

  `tiny` is the architecture of the T5X test checkpoint (embed 4, 2 heads of dim 2, MLP 8, 2+2 layers,
  4 relative-position buckets, max distance 8) in every version, for tests.
  """
  if version not in VERSIONS:
    raise ValueError(f"Unknown T5 version {version!r}; choose one of {', '.join(VERSIONS)}.")
  if size not in SIZES:
    raise ValueError(f"Unknown T5 size {size!r}; choose one of {', '.join(SIZES)}.")
  _refuse_execution_fields(overrides)
  family = {"t5_1_0": _T5_1_0_SIZES, "byt5": _BYT5_SIZES}.get(version, _T5_1_1_SIZES)
  dims = _TINY if size == "tiny" else family[size]
  fields = dict(zip(("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
                     "num_decoder_layers"), dims))
  if size == "tiny":
    fields.update(_TINY_RELPOS)
  if version == "t5_1_0":
    fields.update(mlp_activations=("relu",), logits_via_embedding=True)
  fields["vocab_size"] = {"mt5": 250112, "byt5": 384}.get(version, 32128)
  fields.update(overrides)
  return T5Config(**fields)
