"""Decode a task's split with a trained prompt: `python -m prompt_tuning_jax.infer --gin_file=...`.

The command line of `inference.infer`; see gin_configs/runs/prompt_infer.gin.
"""
from typing import Optional, Sequence

from prompt_tuning_jax import console


@console.command
def main(argv: Optional[Sequence[str]] = None) -> None:
  """`--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths`; prints where the
  predictions went."""
  from prompt_tuning_jax import cli  # pylint: disable=g-import-not-at-top (after console.command)
  path = cli.run("infer", argv, "Decode a task's split with a trained prompt.")
  print(f"Predictions: {path}")


if __name__ == "__main__":
  main()
