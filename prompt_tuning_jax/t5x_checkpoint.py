"""Reads the parameters of T5X native checkpoints.

A T5X checkpoint directory `checkpoint_N/` holds a msgpack file `checkpoint`: the train state
`{'version': ..., 'optimizer': {'state': ..., 'target': PARAMS}}` (flax.optim era) or
`{'state': ..., 'target': PARAMS}` (newer T5X). Small arrays are inline (flax's msgpack ndarray
extension); large ones are tensorstore specs such as
`{'driver': 'zarr', 'kvstore': {'driver': 'gfile', 'path': 'target.encoder...kernel'}, 'metadata': ...}`
whose path is relative to the checkpoint directory. Older single-file checkpoints keep every array
inline. Only the parameters (`target`) are read; the optimizer state is ignored.

Errors are `ValueError`s (or `FileNotFoundError`s) with a message naming the file;
`checkpoints.load_checkpoint` turns them into `CheckpointError`s.
"""
import contextlib
import os
import re
from typing import Any, Iterator, Union

import flax.serialization
import numpy as np
import tensorstore as ts

CHECKPOINT_FILE = "checkpoint"
_STEP_DIR = re.compile(r"checkpoint_(\d+)")
_GCS_PATH = re.compile(r"gs://([^/]+)/(.*)", re.DOTALL)
# The tensorstore drivers of the arrays T5X writes.
_ARRAY_DRIVERS = ("zarr", "zarr3")

# A parameter as stored: an inline array, or a tensorstore spec (a dict) read on demand.
Leaf = Union[np.ndarray, dict[str, Any]]


def is_checkpoint(path: str) -> bool:
  """Whether `path` is a T5X checkpoint file, a `checkpoint_N` dir or a model dir holding them."""
  try:
    checkpoint_file(path)
  except (FileNotFoundError, ValueError):
    return False
  return True


def checkpoint_file(path: str) -> str:
  """The msgpack file of `path`: the file itself, `path/checkpoint`, or the latest `checkpoint_N`'s.

  A `gs://` path must name a `checkpoint_N` directory or its `checkpoint` file.
  """
  if _GCS_PATH.fullmatch(path):
    return path if path.endswith("/" + CHECKPOINT_FILE) else path.rstrip("/") + "/" + CHECKPOINT_FILE
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No such file or directory: {path}")
  if os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
    return os.path.join(path, CHECKPOINT_FILE)
  steps = [int(m.group(1)) for m in map(_STEP_DIR.fullmatch, os.listdir(path))
           if m and os.path.isfile(os.path.join(path, m.group(0), CHECKPOINT_FILE))]
  if not steps:
    raise ValueError(f"{path} is not a T5X checkpoint: it has no `{CHECKPOINT_FILE}` file and no "
                     "`checkpoint_N/` directories.")
  return os.path.join(path, f"checkpoint_{max(steps)}", CHECKPOINT_FILE)


def read_leaves(path: str) -> dict[str, Leaf]:
  """Flat `{'encoder/layers_0/attention/query/kernel': leaf}` of the checkpoint's parameters.

  Leaves are inline numpy arrays or tensorstore specs with absolute paths (see `read_arrays`).
  """
  filename = checkpoint_file(path)
  data = _read_bytes(filename)
  try:
    state = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on corrupt input.
    raise ValueError(f"{filename} is not a readable msgpack checkpoint (truncated or corrupt?): "
                     f"{type(e).__name__}: {e}") from e
  target = _find_target(state)
  if target is None:
    raise ValueError(f"{filename} holds no parameters: expected a T5X train state with "
                     "`optimizer/target` or `target` (or a bare parameter tree with `token_embedder`).")
  if _GCS_PATH.fullmatch(filename):
    checkpoint_dir = filename.rsplit("/", 1)[0]
  else:
    checkpoint_dir = os.path.dirname(os.path.abspath(filename))
  leaves = {}
  _flatten(target, "", checkpoint_dir, leaves)
  return leaves


def leaf_shape(leaf: Leaf) -> tuple[int, ...]:
  """The shape of an inline array, or of a tensorstore array from its metadata (opened if absent)."""
  if isinstance(leaf, dict):
    if "shape" in leaf.get("metadata", {}):
      return tuple(leaf["metadata"]["shape"])
    return tuple(ts.open(leaf).result().shape)
  return tuple(np.shape(leaf))


def read_arrays(leaves: dict[str, Leaf], dtype: Any) -> dict[str, np.ndarray]:
  """Reads every leaf (tensorstore reads run concurrently) and casts it to `dtype`."""
  stores = {name: ts.open(leaf, read=True) for name, leaf in leaves.items() if isinstance(leaf, dict)}
  reads = {}
  for name, store in stores.items():
    with _naming_the_array(name, leaves[name]):
      reads[name] = store.result().read()
  arrays = {}
  for name, leaf in leaves.items():
    if name in reads:
      with _naming_the_array(name, leaf):
        array = reads[name].result()
    else:
      array = np.asarray(leaf)
    arrays[name] = array.astype(dtype, copy=False)
  return arrays


@contextlib.contextmanager
def _naming_the_array(name: str, spec: dict[str, Any]) -> Iterator[None]:
  """Re-raises tensorstore's error (a missing array directory, a missing or corrupt chunk) as a
  `ValueError` that names the parameter and its directory."""
  try:
    yield
  except ValueError as e:
    reason = str(e).split(" [tensorstore_spec=")[0]  # the spec repeats what the message says
    raise ValueError(f"the array of {name} at {spec['kvstore']['path']} is missing or corrupt: "
                     f"{reason}") from None


def _read_bytes(filename: str) -> bytes:
  gcs = _GCS_PATH.fullmatch(filename)
  if not gcs:
    with open(filename, "rb") as f:
      return f.read()
  store = ts.KvStore.open({"driver": "gcs", "bucket": gcs.group(1)}).result()
  result = store.read(gcs.group(2)).result()
  if result.state != "value":
    raise FileNotFoundError(f"No such file: {filename}")
  return result.value


def _find_target(state: Any) -> Any:
  if not isinstance(state, dict):
    return None
  if isinstance(state.get("optimizer"), dict) and "target" in state["optimizer"]:
    return state["optimizer"]["target"]
  if "target" in state:
    return state["target"]
  if "token_embedder" in state:
    return state
  return None


def _flatten(tree: Any, prefix: str, checkpoint_dir: str, out: dict[str, Leaf]):
  if isinstance(tree, dict) and "driver" not in tree:
    for key, value in tree.items():
      _flatten(value, f"{prefix}/{key}" if prefix else str(key), checkpoint_dir, out)
  elif isinstance(tree, dict):
    out[prefix] = _absolute_spec(tree, checkpoint_dir)
  else:
    out[prefix] = tree


def _absolute_spec(spec: dict[str, Any], checkpoint_dir: str) -> dict[str, Any]:
  """A stored tensorstore spec with its relative path joined to `checkpoint_dir`.

  T5X writes the `gfile` kvstore driver: it becomes `file` for a local directory and `gcs` for a
  `gs://bucket/...` one. Specs of tensorstore<0.1.14 keep the path at the top level. The arrays
  are T5X's own: a spec of another driver, or whose path leaves the checkpoint directory (absolute,
  or through `..`), is refused, so a crafted checkpoint cannot make us read other files.
  """
  spec = dict(spec)
  kvstore = spec.get("kvstore", {})
  if spec["driver"] not in _ARRAY_DRIVERS or not isinstance(kvstore, dict):
    raise ValueError(f"The checkpoint in {checkpoint_dir} holds a tensorstore spec T5X does not "
                     f"write (driver {spec['driver']!r}, kvstore {kvstore!r:.60}); expected a "
                     f"{' or '.join(_ARRAY_DRIVERS)} array in the checkpoint directory.")
  relative = kvstore.get("path") or spec.pop("path", None)
  if not isinstance(relative, str):
    raise ValueError(f"Tensorstore spec without a path in the checkpoint in {checkpoint_dir}: {spec}")
  if os.path.isabs(relative) or ".." in re.split(r"[/\\]", relative) or "://" in relative:
    raise ValueError(f"The checkpoint in {checkpoint_dir} names an array at {relative!r}, outside "
                     "its directory; a T5X checkpoint's arrays are inside it. Refusing to read it.")
  gcs = _GCS_PATH.fullmatch(checkpoint_dir)
  if gcs:
    spec["kvstore"] = {"driver": "gcs", "bucket": gcs.group(1),
                       "path": os.path.join(gcs.group(2), relative)}
  else:
    spec["kvstore"] = {"driver": "file", "path": os.path.join(checkpoint_dir, relative)}
  return spec
