"""Loads frozen T5 parameters from T5X native and Hugging Face checkpoints.

`load_checkpoint(path)` detects the format, infers or reads the architecture and returns
`(T5Config, params)`, where `params` is the nested dict `network.T5(config)` expects (with
`encoder/prompt/prompt/prompt` kept when the checkpoint holds a prompt). `load_frozen_params` is
what a run starts from: the frozen model of INITIAL_CHECKPOINT_PATH checked against the run's
config, with T5X's assignment map, or a random model. Every failure - a missing path, an unknown or
corrupt format, a missing, extra or misshapen parameter - is one `CheckpointError` that says what
is wrong and how to fix it.

Formats (the `format` names `detect_format` returns):
  - `t5x`: a T5X checkpoint: a `checkpoint_N/` directory (msgpack `checkpoint` file plus tensorstore
    arrays), its `checkpoint` file, a single-file msgpack checkpoint, or a model directory (its
    latest `checkpoint_N` is read). See `t5x_checkpoint`.
  - `huggingface`: a transformers `save_pretrained` directory of a T5 model. See `hf_checkpoint`.
"""
import contextlib
import functools
import logging
import os
import re
import socket
import threading
import urllib.parse
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax import hf_checkpoint
from prompt_tuning_jax import network
from prompt_tuning_jax import prompts
from prompt_tuning_jax import t5x_checkpoint
from prompt_tuning_jax.config import ExecutionConfig, T5Config
from prompt_tuning_jax.trees import flatten, unflatten

T5X = "t5x"
HUGGINGFACE = "huggingface"
PROMPT_PATH = prompts.PROMPT_PATH
# How long a remote checkpoint's host may take to accept a connection (`check_reachable`).
REMOTE_TIMEOUT_SECONDS = 10.0
# The host that serves each URL scheme tensorstore reads; other URLs name their host.
_REMOTE_HOSTS = {"gs": "storage.googleapis.com", "s3": "s3.amazonaws.com"}
# Not stored in a checkpoint's shapes; T5's default. The tiny test checkpoint uses 8.
DEFAULT_MAX_DISTANCE = 128
_MAX_REPORTED = 5  # an assignment map's error lists up to twice this many problems
# The architecture fields a checkpoint's shapes give (T5X's: inferred; Hugging Face's: config.json
# gives them and the max distance too).
STORED_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
                 "num_decoder_layers", "mlp_activations", "logits_via_embedding",
                 "relative_attention_num_buckets")

logger = logging.getLogger("prompt_tuning_jax")


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded (missing, unreadable, or not matching the config)."""


class ArchitectureMismatchError(CheckpointError):
  """The checkpoint's parameters do not fit the config's model. Its message keeps its few lines
  (what differs; indented: the first problems and the `--gin` fix), on the command line too."""


def detect_format(path: str) -> str:
  """`huggingface` or `t5x` for `path`; raises `CheckpointError` if it is neither, or if a remote
  path's host does not answer (`check_reachable`)."""
  check_reachable(path)
  if not path.startswith("gs://") and not os.path.exists(path):
    raise CheckpointError(f"Checkpoint not found: {path} does not exist.")
  if hf_checkpoint.is_checkpoint(path):
    return HUGGINGFACE
  if t5x_checkpoint.is_checkpoint(path):
    return T5X
  raise CheckpointError(
      f"{path} is not a checkpoint. Expected a T5X checkpoint (a `checkpoint_N/` directory with a "
      "`checkpoint` file, the file itself, or a model directory holding `checkpoint_N/`) or a Hugging "
      "Face T5 directory (`config.json` with `model.safetensors` or `pytorch_model.bin`).")


def check_reachable(path: str, timeout: float = REMOTE_TIMEOUT_SECONDS) -> None:
  """Raises a `CheckpointError` naming `path` when it is a URL (`gs://...`) whose host does not
  accept a connection within `timeout` seconds; local paths pass.

  Tensorstore retries an unreachable host for many minutes before it fails; this probe fails in
  seconds, offline or behind a firewall, before tensorstore opens anything.
  """
  url = urllib.parse.urlsplit(path)
  if "://" not in path or url.scheme == "file":
    return
  host = _REMOTE_HOSTS.get(url.scheme) or url.hostname
  port = 443 if url.scheme in _REMOTE_HOSTS else url.port or (80 if url.scheme == "http" else 443)
  result: list[BaseException] = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
      result.append(e)

  probe = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout of its own
  probe.start()
  probe.join(timeout)
  if probe.is_alive() or result:
    cause = f"{type(result[0]).__name__}: {result[0]}" if result else "no answer"
    raise CheckpointError(
        f"Cannot reach {path}: {host} did not accept a connection within {timeout:g} s ({cause}); "
        "is this machine offline or its network blocked? Copy the checkpoint to a local directory "
        "and give that path.")


def read_shapes(path: str) -> tuple[str, dict[str, tuple[int, ...]]]:
  """(format, flat `{param path: shape}`) of a checkpoint, reading no large array."""
  fmt, shapes, _ = _open(path)
  return fmt, shapes


def read_config(path: str, relative_attention_max_distance: Optional[int] = None) -> T5Config:
  """The architecture of a checkpoint: config.json for Hugging Face, inferred from shapes for T5X."""
  fmt, shapes, _ = _open(path)
  return _config(path, fmt, shapes, relative_attention_max_distance)


def load_checkpoint(path: str, dtype: Any = jnp.float32, *, config: Optional[T5Config] = None,
                    scan_layers: bool = False, relative_attention_max_distance: Optional[int] = None
                    ) -> tuple[T5Config, dict[str, Any]]:
  """Loads a T5X or Hugging Face T5 checkpoint.

  Args:
    path: a T5X checkpoint (dir, `checkpoint` file, single msgpack file or model dir) or a Hugging
      Face T5 directory.
    dtype: the parameters' dtype (bfloat16 checkpoints are cast to float32 by default). An inferred
      config computes in it too (`T5Config.dtype`).
    config: load into this architecture instead of the checkpoint's own; every parameter must match.
    scan_layers: stack each stack's layers (`stack_layers`) for a model built with
      `ExecutionConfig(scan_layers=True)`.
    relative_attention_max_distance: the max distance of the inferred config. Shapes do not hold it:
      T5X checkpoints default to 128; Hugging Face ones take config.json's value unless this is set.

  Returns:
    (config, params): params is the nested dict of numpy arrays of `network.T5(config)` (plus
    `encoder/prompt/prompt/prompt` `[prompt_length, embed]` when the checkpoint holds a prompt);
    layers are stacked (`stack_layers`) when `scan_layers` is set.

  Raises:
    CheckpointError: the path is missing or not a checkpoint, the file is corrupt, or a parameter is
      missing, extra or of the wrong shape for `config`.
  """
  fmt, shapes, read_arrays = _open(path)
  if config is None:
    config = _config(path, fmt, shapes, relative_attention_max_distance).replace(dtype=dtype)
  prompt_length = shapes[PROMPT_PATH][0] if PROMPT_PATH in shapes else None
  check_params(param_shapes(config, prompt_length), shapes, checkpoint=path)
  with as_checkpoint_error(path):
    return config, unflatten(stack_layers(read_arrays(dtype), scan_layers))


def infer_config(shapes: Mapping[str, tuple[int, ...]],
                 relative_attention_max_distance: int = DEFAULT_MAX_DISTANCE) -> T5Config:
  """The T5Config implied by flat T5X-named parameter shapes.

  A gated MLP (`wi_0`, `wi_1`) is taken as T5 1.1's gated GELU, a plain `wi` as T5 1.0's ReLU; logits
  are tied (`logits_via_embedding`) when there is no `decoder/logits_dense/kernel`.
  """
  required = ("token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
              "encoder/layers_0/attention/query/kernel", "encoder/layers_0/mlp/wo/kernel")
  missing = [name for name in required if name not in shapes]
  if missing:
    raise CheckpointError(f"Not a T5 checkpoint: it lacks {', '.join(missing)} (it has "
                          f"{_preview(shapes)}).")
  vocab_size, emb_dim = shapes["token_embedder/embedding"]
  num_heads, num_buckets = shapes["encoder/relpos_bias/rel_embedding"]
  gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
  count_layers = lambda stack: len({name.split("/")[1] for name in shapes
                                    if name.startswith(f"{stack}/layers_")})
  return T5Config(
      vocab_size=vocab_size,
      emb_dim=emb_dim,
      num_heads=num_heads,
      head_dim=shapes["encoder/layers_0/attention/query/kernel"][1] // num_heads,
      mlp_dim=shapes["encoder/layers_0/mlp/wo/kernel"][0],
      num_encoder_layers=count_layers("encoder"),
      num_decoder_layers=count_layers("decoder"),
      mlp_activations=("gelu", "linear") if gated else ("relu",),
      logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
      relative_attention_num_buckets=num_buckets,
      relative_attention_max_distance=relative_attention_max_distance)


def param_shapes(config: T5Config, prompt_length: Optional[int] = None) -> dict[str, tuple[int, ...]]:
  """Flat `{param path: shape}` of `network.T5(config)` (with a prompt of `prompt_length`), in the
  checkpoint layout (one `layers_{i}` per layer)."""
  prompt_config = None if prompt_length is None else prompts.PromptConfig(prompt_length)
  model = network.T5(config, prompt_config)
  tokens = jnp.ones((1, 1), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens, tokens)
  return {name: tuple(leaf.shape) for name, leaf in flatten(nn.unbox(abstract["params"])).items()}


def check_params(expected: Mapping[str, Any], params: Mapping[str, Any], checkpoint: str = "") -> None:
  """Raises one `ArchitectureMismatchError` of a few lines: the architecture fields that differ, the first
  misshapen, missing and extra parameters, and the `--gin.t5_config.*` flags that fix it.

  Args:
    expected: the model's parameters: a nested or flat dict whose leaves are shapes or arrays.
    params: the checkpoint's parameters, likewise.
    checkpoint: the checkpoint's path, for the message.
  """
  expected, params = _shapes(expected), _shapes(params)
  kinds = [
      [f"{name}: the checkpoint has shape {params[name]} but the config expects {expected[name]}"
       for name in sorted(expected) if name in params and params[name] != expected[name]],
      [f"{name}: missing from the checkpoint (the config expects shape {expected[name]})"
       for name in sorted(expected) if name not in params],
      [f"{name}: shape {params[name]} in the checkpoint is not a parameter of the config's model"
       for name in sorted(params) if name not in expected]]
  count = sum(map(len, kinds))
  if not count:
    return
  fields = _differing_fields(expected, params)
  source = f"Checkpoint {checkpoint}" if checkpoint else "The checkpoint"
  differ = ""
  if fields:
    differ = (": it has " + ", ".join(f"{name}={theirs!r}" for name, (theirs, _) in fields.items())
              + " where the config has "
              + ", ".join(f"{name}={ours!r}" for name, (_, ours) in fields.items()))
  inspect_command = f"python -m prompt_tuning_jax.inspect {checkpoint or 'PATH'} --gin"
  fix = (f"Fix: add {' '.join(gin_flags({name: theirs for name, (theirs, _) in fields.items()}))} "
         f"(`{inspect_command}` prints every flag and the models/*.gin file that matches)"
         if fields else f"Fix: describe the checkpoint's architecture (`{inspect_command}` prints "
         "the flags)")
  raise ArchitectureMismatchError(
      f"{source} does not match the config ({count} problem(s)){differ}.\n  "
      + "\n  ".join(kind[0] for kind in kinds if kind)
      + f"\n  {fix}; in Python, `load_checkpoint(path)` without `config=` reads its own "
      "architecture.")


def gin_flags(fields: Mapping[str, Any]) -> list[str]:
  """`--gin.t5_config.NAME=VALUE` for each architecture field, in shell syntax (quoted where the
  value holds more than letters, digits, `.` and `-`), e.g.
  `--gin.t5_config.mlp_activations="('gelu', 'linear')"`."""
  flags = []
  for name, value in fields.items():
    text = repr(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)
    quoted = f'"{text}"' if re.search(r"[^\w.-]", text) else text
    flags.append(f"--gin.t5_config.{name}={quoted}")
  return flags


def _differing_fields(expected: Mapping[str, tuple[int, ...]],
                      params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, Any]]:
  """`{field: (the checkpoint's, the config's)}` of the architecture fields the shapes give that
  differ; empty where either side is not a T5 parameter tree."""
  try:
    theirs, ours = infer_config(params), infer_config(expected)
  except (CheckpointError, ValueError):
    return {}
  return {name: (getattr(theirs, name), getattr(ours, name)) for name in STORED_FIELDS
          if getattr(theirs, name) != getattr(ours, name)}


_LAYER = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.+)$")
_STACKED_LAYERS = re.compile(r"^(encoder|decoder)/layers/(.+)$")


def stack_layers(flat: Mapping[str, Any], scan_layers: bool) -> dict[str, Any]:
  """Flat params in the checkpoint layout -> the layout of a model built with `scan_layers`.

  With `scan_layers` (`ExecutionConfig.scan_layers`), each stack's `{stack}/layers_{i}/{rest}`
  become one `{stack}/layers/{rest}` `[num_layers, ...]` (layer i at index i); otherwise `flat` is
  returned as is.
  """
  if not scan_layers:
    return dict(flat)
  stacked, grouped = {}, {}
  for name, value in flat.items():
    match = _LAYER.match(name)
    if match:
      stack, index, rest = match.groups()
      grouped.setdefault(f"{stack}/layers/{rest}", {})[int(index)] = value
    else:
      stacked[name] = value
  for name, by_index in grouped.items():
    stacked[name] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
  return stacked


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_layers`: each `{stack}/layers/{rest}` `[num_layers, ...]` becomes
  `{stack}/layers_{i}/{rest}`; other params are kept as they are."""
  unstacked = {}
  for name, value in flat.items():
    match = _STACKED_LAYERS.match(name)
    if match:
      stack, rest = match.groups()
      unstacked.update({f"{stack}/layers_{i}/{rest}": value[i] for i in range(value.shape[0])})
    else:
      unstacked[name] = value
  return unstacked


def init_params(config: T5Config, rng: jax.Array,
                paths: Optional[Sequence[str]] = None) -> dict[str, jax.Array]:
  """Flat params of `network.T5(config)` from its initialisers, in the checkpoint layout (one
  `layers_{i}` per layer), or only those of `paths` (the others are neither computed nor held).

  The same whatever the run's `ExecutionConfig.scan_layers`: the initialiser always runs on the
  scanned model, one layer body in a loop. Jitted whole, the unrolled model's initialiser is one
  random-number program per weight, which XLA compiles many times slower.
  """
  model = network.T5(config, execution=ExecutionConfig(scan_layers=True))
  wanted = None if paths is None else {_LAYER.sub(r"\1/layers/\3", path) for path in paths}

  def init(key: jax.Array) -> dict[str, jax.Array]:
    tokens = jnp.ones((1, 1), jnp.int32)
    flat = flatten(nn.unbox(model.init(key, tokens, tokens))["params"])
    return flat if wanted is None else {name: flat[name] for name in wanted}

  flat = unstack_layers(jax.jit(init)(rng))
  return flat if paths is None else {path: flat[path] for path in paths}


def count_params(shapes: Mapping[str, tuple[int, ...]]) -> int:
  """The number of scalars in flat `{path: shape}`."""
  return sum(int(np.prod(shape)) for shape in shapes.values())


def _open(path: str) -> tuple[str, dict[str, tuple[int, ...]], Callable[[Any], dict[str, np.ndarray]]]:
  """(format, flat shapes, `read_arrays(dtype)` -> flat arrays) of the checkpoint at `path`."""
  fmt = detect_format(path)
  with as_checkpoint_error(path):
    if fmt == HUGGINGFACE:
      return (fmt, hf_checkpoint.read_shapes(path),
              functools.partial(hf_checkpoint.read_arrays, path))
    leaves = t5x_checkpoint.read_leaves(path)
    shapes = {name: t5x_checkpoint.leaf_shape(leaf) for name, leaf in leaves.items()}
    return fmt, shapes, functools.partial(t5x_checkpoint.read_arrays, leaves)


def _config(path: str, fmt: str, shapes: Mapping[str, tuple[int, ...]],
            relative_attention_max_distance: Optional[int]) -> T5Config:
  if fmt == T5X:
    return infer_config(shapes, relative_attention_max_distance or DEFAULT_MAX_DISTANCE)
  with as_checkpoint_error(path):
    config = hf_checkpoint.read_config(path)
  if relative_attention_max_distance is not None:
    config = config.replace(relative_attention_max_distance=relative_attention_max_distance)
  return config


def _shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  return {name: tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(leaf)
          for name, leaf in flatten(tree).items()}


def _preview(names) -> str:
  names = sorted(names)
  return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or "nothing"


@contextlib.contextmanager
def as_checkpoint_error(path: str) -> Iterator[None]:
  """Re-raises the readers' `OSError`s and `ValueError`s as `CheckpointError`s."""
  try:
    yield
  except CheckpointError:
    raise
  except (OSError, ValueError) as e:
    raise CheckpointError(f"Cannot read checkpoint {path}: {e}") from e


def apply_assignment_map(params_from_checkpoint: Mapping[str, Any], target_shapes: Mapping[str, Any],
                         assignment_map: Sequence[tuple[str, Optional[str]]],
                         fallback_to_scratch: bool = False) -> tuple[dict[str, Any], list[str]]:
  """Picks the checkpoint's parameter for each target path, like T5X's `assignment_map`.

  Each rule `(target_regex, source)` applies to the `/`-joined target paths its regex full-matches
  (the first matching rule wins): a `None` source leaves the target to be initialised from scratch;
  otherwise the source is the match expanded by `source` (`\\1`, `\\g<name>` refer to groups).
  Targets matching no rule load from the same path.

  Args:
    params_from_checkpoint: the checkpoint's parameters, nested or flat (`{'a/b': array}`).
    target_shapes: the model's parameters, nested or flat; leaves are shapes or arrays.
    assignment_map: `(target_regex, source pattern or None)` pairs.
    fallback_to_scratch: initialise targets whose source the checkpoint lacks from scratch instead
      of raising (T5X's `fallback_to_scratch`).

  Returns:
    (params, missing): flat `{target path: array}` of the loaded parameters, and the sorted target
    paths left for initialisation from scratch (e.g. `encoder/prompt/prompt/prompt`).

  Raises:
    CheckpointError: a rule matches no target, a source is missing (without `fallback_to_scratch`),
      or a source's shape differs from its target's.
  """
  source, targets = flatten(params_from_checkpoint), _shapes(target_shapes)
  rules = [(re.compile(pattern), replacement) for pattern, replacement in assignment_map]
  unused = [pattern.pattern for pattern, _ in rules
            if not any(pattern.fullmatch(name) for name in targets)]
  if unused:
    raise CheckpointError(f"Assignment map rules match no parameter of the model: {unused} (it has "
                          f"{_preview(targets)}). Rules full-match `/`-joined paths.")
  params, missing, absent, misshapen = {}, [], [], []
  for name, shape in targets.items():
    match, replacement = next(((m, r) for m, r in ((p.fullmatch(name), r) for p, r in rules) if m),
                              (None, name))
    if replacement is None:
      missing.append(name)
      continue
    source_name = match.expand(replacement) if match else name
    if source_name not in source:
      if fallback_to_scratch:
        missing.append(name)
      else:
        absent.append(f"{name}: its source {source_name} is missing from the checkpoint")
    elif tuple(np.shape(source[source_name])) != shape:
      misshapen.append(f"{name}: the checkpoint's {source_name} has shape "
                       f"{tuple(np.shape(source[source_name]))} but the model expects {shape}")
    else:
      params[name] = source[source_name]
  if absent or misshapen:
    problems = misshapen + absent
    raise CheckpointError(
        f"The assignment map does not fit the checkpoint ({len(problems)} problem(s)):\n  "
        + "\n  ".join(problems[:2 * _MAX_REPORTED])
        + (f"\n  ... and {len(problems) - 2 * _MAX_REPORTED} more" if len(problems) > 2 * _MAX_REPORTED
           else "")
        + "\nMap such targets to another source, to None (initialise from scratch), or pass "
          "fallback_to_scratch=True.")
  return params, sorted(missing)


def read_variable(path: str, name: str, dtype: Any = jnp.float32) -> np.ndarray:
  """One parameter (a `/`-joined path) of a T5X or Hugging Face checkpoint, cast to `dtype`.

  Of a T5X checkpoint only that array is read. `read_shapes` lists the names.

  Raises:
    CheckpointError: the checkpoint is missing or unreadable.
    KeyError: it has no parameter `name`.
  """
  fmt = detect_format(path)
  with as_checkpoint_error(path):
    if fmt == HUGGINGFACE:
      return hf_checkpoint.read_arrays(path, dtype)[name]
    leaf = t5x_checkpoint.read_leaves(path)[name]
    return t5x_checkpoint.read_arrays({name: leaf}, dtype)[name]


def check_initial_checkpoint(path: str) -> None:
  """A local INITIAL_CHECKPOINT_PATH must exist (remote ones are checked when read)."""
  if "://" not in path and not os.path.exists(path):
    raise CheckpointError(
        f"INITIAL_CHECKPOINT_PATH {path!r} does not exist; give a T5X checkpoint directory or a "
        "Hugging Face T5 directory.")


def check_checkpoint_matches(path: str, config: T5Config) -> None:
  """Raises a `CheckpointError` unless the checkpoint's shapes are `config`'s (reads no array)."""
  _, shapes = read_shapes(path)
  prompt_length = shapes[PROMPT_PATH][0] if PROMPT_PATH in shapes else None
  check_params(param_shapes(config, prompt_length), shapes, path)


def load_frozen_params(config: T5Config, initial_checkpoint_path: Optional[str],
                       assignment_map: Sequence[tuple[str, Optional[str]]] = (),
                       rng: Optional[jax.Array] = None, *,
                       scan_layers: bool = False) -> dict[str, np.ndarray]:
  """The frozen model's flat `{path: array}` params from INITIAL_CHECKPOINT_PATH.

  Every parameter must match `config`; with an `assignment_map` (T5X's (target regex, source or
  None) pairs) unmatched or skipped parameters start from scratch (`init_params` with `rng`). With
  no path, the whole model is random (demos and tests). Layers are stacked (`stack_layers`) for a
  model built with `ExecutionConfig(scan_layers=True)`.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if initial_checkpoint_path is None:
    return stack_layers(init_params(config, rng), scan_layers)
  check_initial_checkpoint(initial_checkpoint_path)
  if not assignment_map:  # load_checkpoint stacks the layers itself
    return flatten(load_checkpoint(initial_checkpoint_path, config=config,
                                   scan_layers=scan_layers)[1])
  _, raw = load_checkpoint(initial_checkpoint_path)
  loaded, missing = apply_assignment_map(flatten(raw), param_shapes(config), assignment_map)
  if missing:
    logger.info("Initialising %d parameters from scratch: %s", len(missing), missing[:5])
    loaded.update(init_params(config, rng, missing))
  return stack_layers(loaded, scan_layers)
