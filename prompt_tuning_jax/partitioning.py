"""Sharding: a `(data, model)` device mesh and T5X's rules from logical axis names to mesh axes.

Parameters are sharded by their logical names (`network.py` puts one on every parameter), the prompt is
replicated, and batches are split over `data`. Activations follow the same rules: the network marks
them with `nn.with_logical_constraint` (batch over `data`; heads, MLP units and vocabulary over
`model`), which takes effect in functions wrapped by `shard_activations`.
`mesh_shape=(-1, 1)` is pure data parallelism.
"""
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

# T5X's standard rules (t5x.partitioning.standard_logical_axis_rules, 1-D parameter partitioning).
LOGICAL_AXIS_RULES = (
    ("batch", DATA),
    ("vocab", MODEL),
    ("embed", None),
    ("mlp", MODEL),
    ("heads", MODEL),
    ("kv", None),
    ("joined_kv", MODEL),
    ("relpos_buckets", None),
    ("length", None),
    ("prompts", None),
    ("prompt", None),
    ("prompt_embed", None),
    ("layers", None),  # the stacked axis of `ExecutionConfig.scan_layers` parameters
    ("prefix", None),  # the positions of `adapters.Prefix`'s keys and values
    ("lora_rank", None),
)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A `(data, model)` mesh over `devices` (default: all); one entry of `mesh_shape` may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != 2 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)}: give (data, model) sizes, at most one -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide the {len(devices)} devices.")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} needs {math.prod(shape)} devices, but there are "
                     f"{len(devices)}; make data x model equal the device count.")
  return Mesh(np.asarray(devices).reshape(shape), (DATA, MODEL))


def logical_specs(boxed_variables) -> Any:
  """PartitionSpecs in logical names, from `model.init` output (or its `jax.eval_shape`)."""
  return nn.get_partition_spec(boxed_variables)


def param_shardings(boxed_params, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a boxed parameter tree; a dimension a mesh axis does not divide is replicated."""
  def sharding(boxed):
    spec = nn.logical_to_mesh_axes(boxed.names, rules)
    shape = boxed.unbox().shape
    fixed = [axis if axis is None or shape[i] % mesh.shape[axis] == 0 else None
             for i, axis in enumerate(spec)]
    return NamedSharding(mesh, PartitionSpec(*fixed))
  return jax.tree_util.tree_map(sharding, boxed_params,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def model_param_shardings(model: nn.Module, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings of a T5's parameters, read off its abstract (never allocated) init."""
  tokens = jax.numpy.ones((1, 1), jax.numpy.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)["params"]
  return param_shardings(boxed, mesh, rules)


def shard_activations(fn: Callable, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Callable:
  """`fn`, tracing with `mesh` and `rules` in effect, so the model's activation constraints apply.

  Outside such a function, and on a one-device mesh, the constraints are no-ops.
  """
  if mesh.size == 1:
    return fn

  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  # Names the jit after the step (`fn` may be a functools.partial, which has no name of its own).
  wrapped.__name__ = fn.__name__ if hasattr(fn, "__name__") else fn.func.__name__
  return wrapped


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split the leading (batch) dimension over `data`."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def place_on_mesh(tree, shardings):
  """Puts host numpy arrays on the mesh when every process holds the full arrays; `shardings` is a
  tree like `tree`'s, or one sharding for every array. Each process keeps its own devices' pieces."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: put(x, shardings), tree)
  return jax.tree_util.tree_map(put, tree, shardings)


def check_batch_divides(batch_size: int, mesh: Mesh, num_microbatches: int = 1):
  """The global batch must split evenly over data shards and micro-batches."""
  data = mesh.shape[DATA]
  if batch_size % (data * num_microbatches):
    raise ValueError(f"BATCH_SIZE={batch_size} does not divide into {data} data shards x "
                     f"{num_microbatches} micro-batches; use a multiple of {data * num_microbatches}.")
