"""Writes one variable of a checkpoint to a `.npy` file.

  python -m prompt_tuning_jax.extract_variable --checkpoint PATH \
      --variable encoder/prompt/prompt/prompt --output prompt.npy

PATH is a T5X checkpoint (only that variable is read), a Hugging Face T5 directory, or a run of ours:
its MODEL_DIR (the latest checkpoint), `MODEL_DIR/checkpoints` or `MODEL_DIR/checkpoints/N`. Names are
`/`- or `.`-joined paths; in a run checkpoint they are paths in the `TrainState` (`step`,
`opt_state/0/v/...`), and a trainable variable may be named without its `trainable/` prefix.
T5X and Hugging Face parameters are written as float32 (like `checkpoints.load_checkpoint` reads
them); run variables keep their dtype, but bfloat16 becomes float32 (`.npy` has no bfloat16).
`from_checkpoint` makes such a variable a prompt initialiser.
"""
import argparse
import difflib
import functools
import os
import sys
import tempfile
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from prompt_tuning_jax import checkpoints
from prompt_tuning_jax import prompt_initializers
from prompt_tuning_jax import run_checkpoints
from prompt_tuning_jax.checkpoints import CheckpointError

_TRAINABLE = "trainable/"
_MAX_SUGGESTIONS = 5


class UnknownVariableError(KeyError):
  """The checkpoint has no variable of the requested name."""


def read_variable(path: str, name: str) -> np.ndarray:
  """The array of variable `name` (`/`- or `.`-joined) in the checkpoint at `path`.

  Raises:
    UnknownVariableError: no such variable; the message lists the closest names.
    CheckpointError: `path` is missing or not a readable checkpoint.
  """
  readers = _readers(path)
  name = name.replace(".", "/")
  if name not in readers and _TRAINABLE + name in readers:
    name = _TRAINABLE + name
  if name not in readers:
    close = ([known for known in sorted(readers) if name in known][:_MAX_SUGGESTIONS]
             or difflib.get_close_matches(name, list(readers), n=_MAX_SUGGESTIONS, cutoff=0.4))
    raise UnknownVariableError(
        f"{path} has no variable {name!r}. "
        + (f"Closest names: {', '.join(close)}." if close else
           f"It has {len(readers)} variables, e.g. {', '.join(sorted(readers)[:_MAX_SUGGESTIONS])}."))
  array = np.asarray(readers[name]())
  return array.astype(np.float32) if array.dtype == jnp.bfloat16 else array


def from_checkpoint(path: str, variable: str = checkpoints.PROMPT_PATH
                    ) -> prompt_initializers.Initializer:
  """A prompt initialiser of a variable read out of a checkpoint: T5X, Hugging Face, or one of our
  runs (MODEL_DIR or a step). E.g. the prompt of another run, to start a new task from it (the
  paper's prompt transfer)."""
  array = np.asarray(read_variable(path, variable), np.float32)
  return prompt_initializers.from_array(array, name=f"from_checkpoint({path!r}, {variable!r})")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="prompt-tuning-extract-variable",
      description="Write one variable of a T5X, Hugging Face or prompt-tuning run checkpoint to .npy.")
  parser.add_argument("--checkpoint", required=True,
                      help="T5X checkpoint, Hugging Face directory, MODEL_DIR or "
                           "MODEL_DIR/checkpoints/N.")
  parser.add_argument("--variable", required=True,
                      help="e.g. encoder/prompt/prompt/prompt or encoder.prompt.prompt.prompt.")
  parser.add_argument("--output", required=True, help="the .npy file to write (written as named).")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output file.")
  args = parser.parse_args(argv)
  if os.path.exists(args.output) and not args.overwrite:
    print(f"error: {args.output} exists; pass --overwrite to replace it.", file=sys.stderr)
    return 1
  try:
    array = read_variable(args.checkpoint, args.variable)
  except UnknownVariableError as e:
    print(f"error: {e.args[0]}", file=sys.stderr)
    return 2
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  try:
    _save(args.output, array)
  except OSError as e:
    print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {args.variable} {array.dtype}{list(array.shape)} to {args.output}.")
  return 0


def _readers(path: str) -> dict[str, Callable[[], np.ndarray]]:
  """`{'/'-joined name: read()}` of every variable of the checkpoint at `path`."""
  step_dir = _run_step_dir(path)
  if step_dir is not None:
    return _run_readers(step_dir)
  _, shapes = checkpoints.read_shapes(path)
  return {name: functools.partial(checkpoints.read_variable, path, name) for name in shapes}


def _run_step_dir(path: str) -> Optional[str]:
  """The step directory of a run checkpoint at `path` (the latest one of a run), else None."""
  if os.path.isdir(os.path.join(path, run_checkpoints.STATE_ITEM)):
    return path
  root = os.path.join(path, run_checkpoints.CHECKPOINTS_DIR)
  root = root if os.path.isdir(root) else path
  if not os.path.isdir(root):
    return None
  steps = [int(name) for name in os.listdir(root)
           if name.isdigit() and os.path.isdir(os.path.join(root, name, run_checkpoints.STATE_ITEM))]
  return os.path.join(root, str(max(steps))) if steps else None


def _run_readers(step_dir: str) -> dict[str, Callable[[], np.ndarray]]:
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      state = checkpointer.restore(os.path.join(os.path.abspath(step_dir),
                                                run_checkpoints.STATE_ITEM))
  except Exception as e:  # orbax and tensorstore raise many unrelated types.
    raise CheckpointError(f"Cannot read run checkpoint {step_dir}: {type(e).__name__}: {e}") from e
  return {"/".join(_key_name(key) for key in key_path): functools.partial(np.asarray, leaf)
          for key_path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def _key_name(key) -> str:
  """`trainable` of a dict key, `0` of a sequence index, `count` of an attribute."""
  for field in ("key", "idx", "name"):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _save(output: str, array: np.ndarray) -> None:
  """np.save to `output` exactly (no `.npy` appended), under a temporary name first."""
  directory = os.path.dirname(os.path.abspath(output))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array, allow_pickle=False)
    os.replace(tmp, output)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


if __name__ == "__main__":
  sys.exit(main())
