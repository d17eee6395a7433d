"""Train a prompt on a frozen T5: `python -m prompt_tuning_jax.train --gin_file=...`.

The command line of `training.train`; see gin_configs/runs/prompt_finetune.gin.
"""
import os
from typing import Optional, Sequence

from prompt_tuning_jax import console


@console.command
def main(argv: Optional[Sequence[str]] = None) -> None:
  """`--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths`; writes the operative
  config to MODEL_DIR/config.gin and prints where the prompt (or the method's parameters) went."""
  from prompt_tuning_jax import (  # pylint: disable=g-import-not-at-top (after console.command)
      checkpoints, cli, run_checkpoints)
  summary = cli.run("train", argv, "Train a prompt on a frozen T5.")
  cli.write_config(summary["model_dir"])
  step = summary["final_step"]
  if summary.get("preempted"):
    print(f"Stopped by SIGTERM at step {step}, checkpoint saved; rerun the same command to resume. "
          f"MODEL_DIR: {summary['model_dir']}")
    return
  numpy_dir = summary.get("folded") or os.path.join(summary["numpy_checkpoints"],
                                                     f"checkpoint_{step}")
  prompt_file = os.path.join(numpy_dir, run_checkpoints.numpy_file_name(checkpoints.PROMPT_PATH))
  where = (f"Prompt (numpy): {prompt_file}" if os.path.exists(prompt_file)
           else f"Trained parameters (numpy): {numpy_dir}")
  print(f"Trained to step {step}; MODEL_DIR: {summary['model_dir']}\n{where}")


if __name__ == "__main__":
  main()
