"""Prints what a checkpoint is: its format, its T5 architecture, its size and its parameter tree.

  python -m prompt_tuning_jax.inspect PATH [--json] [--max-distance N]
  prompt-tuning-inspect PATH [--json]

PATH is a T5X checkpoint (a `checkpoint_N/` dir, its `checkpoint` file, a single-file msgpack
checkpoint, or a model dir) or a Hugging Face T5 directory. Only shapes are read, so it is quick even
for XXL checkpoints. `--json` prints one object with the keys `format`, `config` (T5Config's field
names; dtype as a string), `num_params` and `params` (`{path: shape}`). A bad path prints a one-line
error and exits with status 2.
"""
import argparse
import dataclasses
import json
import sys
from typing import Any, Optional, Sequence

import jax.numpy as jnp

from prompt_tuning_jax import checkpoints
from prompt_tuning_jax.config import T5Config


def describe(path: str, relative_attention_max_distance: Optional[int] = None) -> dict[str, Any]:
  """`{'format', 'config', 'num_params', 'params'}` of the checkpoint at `path` (JSON-ready)."""
  fmt, shapes = checkpoints.read_shapes(path)
  config = checkpoints.read_config(path, relative_attention_max_distance)
  return {"format": fmt, "config": config_to_json(config),
          "num_params": checkpoints.count_params(shapes),
          "params": {name: list(shape) for name, shape in sorted(shapes.items())}}


def config_to_json(config: T5Config) -> dict[str, Any]:
  """The config's fields as JSON values: tuples become lists, the dtype its name (`float32`)."""
  fields = dataclasses.asdict(config)
  fields["mlp_activations"] = list(config.mlp_activations)
  fields["dtype"] = jnp.dtype(config.dtype).name
  return fields


def format_text(path: str, info: dict[str, Any]) -> str:
  """The human-readable report of `describe`'s `info`."""
  cfg = info["config"]
  gated = len(cfg["mlp_activations"]) > 1
  max_distance_note = ("  (not stored in T5X checkpoints; set it with --max-distance)"
                       if info["format"] == checkpoints.T5X else "")
  lines = [
      f"Checkpoint: {path}",
      f"Format: {info['format']}",
      "Config" + (" (inferred from the shapes):" if info["format"] == checkpoints.T5X
                  else " (config.json):"),
      f"  vocab_size: {cfg['vocab_size']}",
      f"  emb_dim: {cfg['emb_dim']}",
      f"  num_heads: {cfg['num_heads']}",
      f"  head_dim: {cfg['head_dim']}",
      f"  mlp_dim: {cfg['mlp_dim']}",
      f"  num_encoder_layers: {cfg['num_encoder_layers']}",
      f"  num_decoder_layers: {cfg['num_decoder_layers']}",
      f"  mlp: {'gated' if gated else 'not gated'} {tuple(cfg['mlp_activations'])}",
      "  logits: " + ("tied (token embedding, logits_via_embedding=True)"
                      if cfg["logits_via_embedding"] else "untied (decoder/logits_dense)"),
      f"  relative_attention_num_buckets: {cfg['relative_attention_num_buckets']}",
      f"  relative_attention_max_distance: {cfg['relative_attention_max_distance']}"
      + max_distance_note,
      f"Parameters: {info['num_params']:,}",
      "Parameter tree:",
  ]
  width = max(map(len, info["params"]), default=0)
  lines += [f"  {name:<{width}}  {tuple(shape)}" for name, shape in info["params"].items()]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command line entry point; returns the exit status (2 for a checkpoint that cannot be read)."""
  parser = argparse.ArgumentParser(prog="prompt-tuning-inspect", description=__doc__.split("\n")[0])
  parser.add_argument("path", help="T5X checkpoint or Hugging Face T5 directory")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--max-distance", type=int, default=None,
                      help="relative_attention_max_distance to report (T5X checkpoints lack it)")
  args = parser.parse_args(argv)
  try:
    info = describe(args.path, args.max_distance)
  except checkpoints.CheckpointError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(info))
  else:
    print(format_text(args.path, info))
  return 0


if __name__ == "__main__":
  sys.exit(main())
