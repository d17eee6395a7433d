"""Prints what a checkpoint is: its format, its T5 architecture, its size and its parameter tree.

  python -m prompt_tuning_jax.inspect PATH [--json | --gin] [--max-distance N]
  prompt-tuning-inspect PATH [--json | --gin]

PATH is a T5X checkpoint (a `checkpoint_N/` dir, its `checkpoint` file, a single-file msgpack
checkpoint, or a model dir) or a Hugging Face T5 directory. Only shapes are read, so it is quick even
for XXL checkpoints. `--json` prints one object with the keys `format`, `config` (T5Config's field
names; dtype as a string), `num_params` and `params` (`{path: shape}`). `--gin` prints the
`--gin.t5_config.*` flags, one a line, that make any models/*.gin file describe the checkpoint, and
on stderr the models/*.gin files that already do and the values the checkpoint does not store (T5X's
relative-position max distance) with the one assumed. A bad path prints a one-line error and exits
with status 2.

A Hugging Face decoder-only checkpoint (Llama, Mistral, Qwen2, Gemma 2, Gemma 3 text; see
`hf_causal_lm`) is described too: `--json` then also has `family` (config.json's `model_type`),
`num_layers`, `num_heads` and `num_kv_heads` at the top, and `config` holds the fields of
`causal_lm.CausalLMConfig`.
"""
import argparse
import dataclasses
import json
import sys
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp

from prompt_tuning_jax import checkpoints, hf_causal_lm
from prompt_tuning_jax import config as config_lib
from prompt_tuning_jax.config import T5Config


def describe(path: str, relative_attention_max_distance: Optional[int] = None) -> dict[str, Any]:
  """`{'format', 'config', 'num_params', 'params'}` of the checkpoint at `path` (JSON-ready)."""
  if hf_causal_lm.is_checkpoint(path):
    return describe_causal_lm(path)
  fmt, shapes = checkpoints.read_shapes(path)
  config = checkpoints.read_config(path, relative_attention_max_distance)
  return {"format": fmt, "config": config_to_json(config),
          "num_params": checkpoints.count_params(shapes),
          "params": {name: list(shape) for name, shape in sorted(shapes.items())}}


def describe_causal_lm(path: str) -> dict[str, Any]:
  """`describe` of a Hugging Face decoder-only checkpoint: also its `family`, `num_layers`,
  `num_heads` and `num_kv_heads`."""
  config = hf_causal_lm.read_config(path)
  shapes = hf_causal_lm.read_shapes(path)
  fields = dataclasses.asdict(config)
  fields.update(sliding_layers=list(config.sliding_layers), dtype=jnp.dtype(config.dtype).name)
  return {"format": checkpoints.HUGGINGFACE, "family": config.family,
          "num_layers": config.num_layers, "num_heads": config.num_heads,
          "num_kv_heads": config.num_kv_heads, "config": fields,
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
  if "family" in info:  # a decoder-only checkpoint: its config's fields as they are
    lines = [f"Checkpoint: {path}", f"Format: {info['format']}", "Config (config.json):"]
    lines += [f"  {name}: {value}" for name, value in cfg.items()]
    lines += [f"Parameters: {info['num_params']:,}", "Parameter tree:"]
    width = max(map(len, info["params"]), default=0)
    lines += [f"  {name:<{width}}  {tuple(shape)}" for name, shape in info["params"].items()]
    return "\n".join(lines)
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


def matching_model_files(fields: Mapping[str, Any]) -> dict[str, T5Config]:
  """`{models/*.gin file: its architecture}` of the files whose architecture has the stored
  `fields` (`checkpoints.STORED_FIELDS`; T5 1.1 and its LM-adapted checkpoints share one)."""
  presets = {f"models/{version}_{size}_prompt.gin": config_lib.t5_config(version, size)
             for version in config_lib.VERSIONS for size in config_lib.SIZES}
  return {name: preset for name, preset in presets.items()
          if all(getattr(preset, field) == fields[field] for field in checkpoints.STORED_FIELDS)}


def gin_settings(info: dict[str, Any]) -> tuple[list[str], list[str]]:
  """(the `--gin.t5_config.*` flags of `describe`'s `info`, notes on them for a reader)."""
  cfg = dict(info["config"], mlp_activations=tuple(info["config"]["mlp_activations"]))
  flags = checkpoints.gin_flags({name: cfg[name] for name in (*checkpoints.STORED_FIELDS,
                                                               "relative_attention_max_distance")})
  files = matching_model_files(cfg)
  notes = ["These flags make any models/*.gin file describe the checkpoint; "
           + (f"{' and '.join(files)} already match it." if files else
              "no models/*.gin file matches it as it is.")]
  if info["format"] == checkpoints.T5X:
    distance = cfg["relative_attention_max_distance"]
    others = sorted({preset.relative_attention_max_distance for preset in files.values()}
                    - {distance})
    notes.append(
        f"relative_attention_max_distance={distance} is assumed: T5X checkpoints do not store it "
        f"(T5X's default is {checkpoints.DEFAULT_MAX_DISTANCE}"
        + (f"; the matching files use {' or '.join(map(str, others))}" if others else "")
        + "). Give the model's own value with --max-distance N.")
  return flags, notes


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command line entry point; returns the exit status (2 for a checkpoint that cannot be read)."""
  parser = argparse.ArgumentParser(prog="prompt-tuning-inspect", description=__doc__.split("\n")[0])
  parser.add_argument("path", help="T5X checkpoint or Hugging Face T5 directory")
  output = parser.add_mutually_exclusive_group()
  output.add_argument("--json", action="store_true", help="print one JSON object")
  output.add_argument("--gin", action="store_true",
                      help="print the --gin.t5_config.* flags that describe the checkpoint")
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
  elif args.gin and "family" in info:
    print(f"error: --gin describes T5 checkpoints; {args.path} is a decoder-only "
          f"{info['family']} checkpoint (use --json).", file=sys.stderr)
    return 2
  elif args.gin:
    flags, notes = gin_settings(info)
    print("\n".join(flags))
    print("\n".join(f"# {note}" for note in notes), file=sys.stderr)
  else:
    print(format_text(args.path, info))
  return 0


if __name__ == "__main__":
  sys.exit(main())
