"""Train a prompt on a frozen T5: `python -m prompt_tuning_jax.train --gin_file=...`.

The command line of `training.train`; see gin_configs/runs/prompt_finetune.gin.
"""
import os
from typing import Optional, Sequence

from prompt_tuning_jax import console


@console.command
def main(argv: Optional[Sequence[str]] = None) -> None:
  """`--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths`; writes the operative
  config to MODEL_DIR/config.gin and prints where the prompt went."""
  from prompt_tuning_jax import (  # pylint: disable=g-import-not-at-top (after console.command)
      checkpoints, cli, run_checkpoints)
  summary = cli.run("train", argv, "Train a prompt on a frozen T5.")
  cli.write_config(summary["model_dir"])
  step = summary["final_step"]
  if summary.get("preempted"):
    print(f"Stopped by SIGTERM at step {step}, checkpoint saved; rerun the same command to resume. "
          f"MODEL_DIR: {summary['model_dir']}")
    return
  prompt_file = os.path.join(summary["numpy_checkpoints"], f"checkpoint_{step}",
                             run_checkpoints.numpy_file_name(checkpoints.PROMPT_PATH))
  print(f"Trained to step {step}; MODEL_DIR: {summary['model_dir']}\nPrompt (numpy): {prompt_file}")


if __name__ == "__main__":
  main()
