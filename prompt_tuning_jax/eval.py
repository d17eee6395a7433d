"""Evaluate a trained prompt on a task: `python -m prompt_tuning_jax.eval --gin_file=...`.

The command line of `inference.evaluate_prompt`; see gin_configs/runs/prompt_eval.gin.
"""
import json
from typing import Optional, Sequence

import numpy as np

from prompt_tuning_jax import console


@console.command
def main(argv: Optional[Sequence[str]] = None) -> None:
  """`--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths`; prints each task's
  metrics."""
  from prompt_tuning_jax import cli  # pylint: disable=g-import-not-at-top (after console.command)
  results = cli.run("evaluate", argv, "Evaluate a trained prompt on a task.")
  for task, task_metrics in results.items():
    shown = {k: v for k, v in task_metrics.items() if np.ndim(v) == 0}
    print(f"{task}: {json.dumps(shown)}")


if __name__ == "__main__":
  main()
