"""Evaluate an ensemble of prompts on a task: `python -m prompt_tuning_jax.ensemble`, e.g.

  python -m prompt_tuning_jax.ensemble --gin_file=models/t5_1_1_lm100k_base_prompt.gin \\
    --gin_file=runs/prompt_ensemble_eval.gin --gin.PROMPT_FILES="['a.npy', 'b.npy', 'c.npy']" ...

The command line of `ensembling.evaluate_ensemble`; see gin_configs/runs/prompt_ensemble_eval.gin.
"""
from typing import Any, Optional, Sequence

from prompt_tuning_jax import console


@console.command
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """`--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths`; prints the table (each
  member, their average, the best member, the ensemble) and returns it when called with `argv`."""
  from prompt_tuning_jax import (  # pylint: disable=g-import-not-at-top (after console.command)
      cli, ensembling)
  results = cli.run("evaluate_ensemble", argv, "Evaluate an ensemble of prompts on a task.")
  print(ensembling.format_table(results))
  return results


if __name__ == "__main__":
  main()
