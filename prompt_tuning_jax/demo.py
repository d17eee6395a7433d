"""The demo, `make demo`: train, evaluate and save a prompt in a few minutes on a laptop's CPU.

Runs the real command-line path: `python -m prompt_tuning_jax.train` with `runs/demo.gin`, on the
T5X tiny test checkpoint and 400 rows of SuperGLUE RTE bundled in `demo_data/`, then
`python -m prompt_tuning_jax.eval` on the final prompt. Running it again with the same MODEL_DIR
resumes the finished run (nothing to train) and evaluates again.

  python -m prompt_tuning_jax.demo [--model_dir=./demo_run] [--gin.TRAIN_STEPS=20 ...]
"""
import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax import train as train_lib

DEMO_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data")
DEMO_CHECKPOINT = os.path.join(DEMO_DATA_DIR, "t5x_t5_1_1_tiny", "checkpoint_3")
PROMPT_FILE_NAME = "encoder.prompt.prompt.prompt"

REAL_MODEL_COMMAND = """\
  python -m prompt_tuning_jax.train \\
    --gin_file=models/t5_1_1_lm100k_base_prompt.gin \\
    --gin_file=prompts/from_class_labels.gin \\
    --gin_file=runs/prompt_finetune.gin \\
    --gin.MODEL_DIR="'/tmp/rte_base'" \\
    --gin.MIXTURE_OR_TASK_NAME="'taskless_super_glue_rte_v102'" \\
    --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 8}" \\
    --gin.CLASS_LABELS="['entailment', 'not_entailment']" \\
    --gin.INITIAL_CHECKPOINT_PATH="'gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_base/checkpoint_1100000'" \\
    --gin.DATA_DIR="'/path/to/data'"   # or prepare TFDS super_glue/rte"""


def run_demo(model_dir: str, gin_args: Sequence[str] = ()) -> dict[str, Any]:
  """Trains and evaluates the demo prompt in `model_dir`; returns where everything went."""
  model_dir = os.path.abspath(model_dir)
  common = [
      "--gin_file=runs/demo.gin",
      f"--gin.MODEL_DIR={model_dir!r}",
      f"--gin.INITIAL_CHECKPOINT_PATH={DEMO_CHECKPOINT!r}",
      f"--gin.DATA_DIR={DEMO_DATA_DIR!r}",
      *gin_args,
  ]
  train_lib.main(common)
  numpy_dir = os.path.join(model_dir, "numpy_checkpoints")
  step = max(int(name.rpartition("_")[2]) for name in os.listdir(numpy_dir))
  prompt_file = os.path.join(numpy_dir, f"checkpoint_{step}", PROMPT_FILE_NAME)
  eval_dir = os.path.join(model_dir, "eval")
  eval_lib.main([
      *common, "--gin_file=runs/prompt_eval.gin",
      f"--gin.PROMPT_FILE={prompt_file!r}",
      f"--gin.EVAL_OUTPUT_DIR={eval_dir!r}",
  ])
  metrics_file = os.path.join(eval_dir, "metrics.json")
  with open(metrics_file) as f:
    metrics = json.load(f)
  return {"model_dir": model_dir, "step": step, "prompt_file": prompt_file,
          "metrics_file": metrics_file, "metrics": metrics}


def main(argv: Optional[Sequence[str]] = None) -> None:
  """`--model_dir` (default `./demo_run`) and any `--gin.NAME=VALUE` for the train and eval runs."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--model_dir", default="demo_run",
                      help="where the run goes (default ./demo_run); rerunning resumes it")
  args, gin_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  for arg in gin_args:
    if not arg.startswith("--gin."):
      parser.error(f"unrecognized argument {arg!r}; pass gin bindings as --gin.NAME=VALUE")
  result = run_demo(args.model_dir, gin_args)
  accuracy = {task: m.get("accuracy") for task, m in result["metrics"].items()}
  print(f"""
Demo finished at step {result['step']}.
  MODEL_DIR:      {result['model_dir']}
  prompt (numpy): {result['prompt_file']}
  load it with:   numpy.load('{result['prompt_file']}')
  eval metrics:   {result['metrics_file']}  accuracy: {accuracy}
  TensorBoard:    tensorboard --logdir {result['model_dir']}

The frozen model here is a 4-dimensional T5 with random weights (a test checkpoint), so the prompt
learns next to nothing: expect accuracy near zero or chance. The demo shows the whole path (gin
config, checkpoint loading, training, checkpoints, evaluation). For real results, train on a
pretrained checkpoint, e.g. T5 1.1 LM-adapted Base:

{REAL_MODEL_COMMAND}
""")


if __name__ == "__main__":
  main()
