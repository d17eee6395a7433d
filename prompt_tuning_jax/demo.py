"""The demo, `make demo`: train, evaluate and save a prompt in a few minutes on a laptop's CPU.

Runs the real command-line path: `python -m prompt_tuning_jax.train` with `runs/demo.gin`, on a
small T5 with random weights bundled in `demo_data/random_t5` (large enough for a prompt to steer
what it says; see its README.md) and 400 rows of SuperGLUE RTE bundled in `demo_data/`, then, on the
final prompt, `python -m prompt_tuning_jax.eval` (the decoded answers) and
`python -m prompt_tuning_jax.ensemble` with the one prompt (rank classification: the likelier class
label). It ends by saying what the prompt learned (the answer format) and what it did not (the
task). Running it again with the same MODEL_DIR resumes the finished run (nothing to train) and
evaluates again.

  python -m prompt_tuning_jax.demo [--model_dir=./demo_run] [--gin.TRAIN_STEPS=20 ...]
"""
import argparse
import collections
import json
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

from prompt_tuning_jax import console
from prompt_tuning_jax import ensemble as ensemble_lib
from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax import report
from prompt_tuning_jax import train as train_lib

DEMO_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data")
# The demo's frozen model: a Hugging Face T5 directory (how it was made: its README.md).
DEMO_CHECKPOINT = os.path.join(DEMO_DATA_DIR, "random_t5")
DEMO_MODEL_GIN = "models/demo_random_t5.gin"
DEMO_WEIGHTS = os.path.join(DEMO_CHECKPOINT, "model.safetensors")
# T5X's own test checkpoint (random weights, embed 4): a real T5X-format checkpoint for tests.
T5X_TEST_CHECKPOINT = os.path.join(DEMO_DATA_DIR, "t5x_t5_1_1_tiny", "checkpoint_3")
TASK = "taskless_super_glue_rte_v102"
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


def python_command() -> str:
  """This interpreter as a user would type it: `.venv/bin/python` from the checkout after `make
  demo`, else its absolute path."""
  relative = os.path.relpath(sys.executable)
  return relative if not relative.startswith("..") else sys.executable


def eval_command(prompt_file: str, output_dir: str) -> str:
  """The `prompt_tuning_jax.eval` command line that evaluates `prompt_file` as the demo does."""
  return (f"{python_command()} -m prompt_tuning_jax.eval \\\n"
          f"    --gin_file={DEMO_MODEL_GIN} --gin_file=runs/prompt_eval.gin \\\n"
          f"    --gin.MIXTURE_OR_TASK_NAME=\"'{TASK}'\" \\\n"
          "    --gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 8}\" \\\n"
          f"    --gin.INITIAL_CHECKPOINT_PATH=\"'{DEMO_CHECKPOINT}'\" \\\n"
          f"    --gin.DATA_DIR=\"'{DEMO_DATA_DIR}'\" \\\n"
          f"    --gin.PROMPT_FILE=\"'{prompt_file}'\" \\\n"
          f"    --gin.EVAL_OUTPUT_DIR=\"'{output_dir}'\"")


def majority_rate(predictions_file: str) -> tuple[str, float]:
  """The most common target in an `ensemble_predictions.jsonl` and its share, in percent."""
  with open(predictions_file) as f:
    targets = collections.Counter(json.loads(line)["targets"] for line in f if line.strip())
  label, count = targets.most_common(1)[0]
  return label, 100 * count / sum(targets.values())


def ensure_demo_checkpoint() -> str:
  """DEMO_CHECKPOINT, its weights written first where they are missing: they are generated (a few
  seconds, `demo_data/make_demo_model.py`), not committed. The write is atomic, so processes that
  race here write the same file in turn."""
  if not os.path.exists(DEMO_WEIGHTS):
    # Imported here: it imports JAX, which the command line loads only after quieting the console.
    from prompt_tuning_jax.demo_data import make_demo_model  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory(dir=DEMO_DATA_DIR) as tmp:
      make_demo_model.write(tmp)
      os.replace(os.path.join(tmp, os.path.basename(DEMO_WEIGHTS)), DEMO_WEIGHTS)
  return DEMO_CHECKPOINT


def run_demo(model_dir: str, gin_args: Sequence[str] = ()) -> dict[str, Any]:
  """Trains and evaluates the demo prompt in `model_dir`; returns where everything went and what
  it measured."""
  model_dir = os.path.abspath(model_dir)
  ensure_demo_checkpoint()
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
  rank_dir = os.path.join(model_dir, "rank_eval")
  rank = ensemble_lib.main([
      *common, "--gin_file=runs/prompt_ensemble_eval.gin",
      f"--gin.PROMPT_FILES={[prompt_file]!r}",
      "--gin.ENSEMBLE_METHOD='rank'",
      f"--gin.EVAL_OUTPUT_DIR={rank_dir!r}",
  ])
  metrics_file = os.path.join(eval_dir, "metrics.json")
  with open(metrics_file) as f:
    metrics = json.load(f)[TASK]
  train_loss = report.read_curves(model_dir)["train"]["loss"]
  first_loss, last_loss = report.first_and_last_tenth(train_loss)
  majority_label, majority = majority_rate(os.path.join(rank_dir, "ensemble_predictions.jsonl"))
  return {"model_dir": model_dir, "step": step, "prompt_file": prompt_file,
          "metrics_file": metrics_file, "metrics": metrics, "rank_accuracy":
          rank["ensemble"]["accuracy"], "first_loss": first_loss, "last_loss": last_loss,
          "majority_label": majority_label, "majority": majority}


def closing_text(result: dict[str, Any]) -> str:
  """What the demo learned and what it did not, where it all went, and the commands to go on."""
  python = python_command()
  model_dir, metrics = result["model_dir"], result["metrics"]
  first, last = result["first_loss"], result["last_loss"]
  invalid = metrics["invalid_prediction_rate"]
  return f"""
Demo finished at step {result['step']}: a prompt trained on a frozen T5 with random weights.

What the prompt learned, the answer format:
  train loss (summed over a batch's target tokens), mean of the logged steps:
    {first:.1f} over the first 10% of steps -> {last:.1f} over the last 10% \
({100 * (1 - last / first):.0f}% lower)
  decoded answers that are a class label: {100 - invalid:.0f}% (invalid predictions {invalid:.1f}%)
What it did not learn, the task:
  RTE accuracy, decoded answer:       {metrics['accuracy']:.1f}%
  RTE accuracy, rank classification:  {result['rank_accuracy']:.1f}%  (the likelier label)
  always '{result['majority_label']}' (the majority):  {result['majority']:.1f}%
The frozen model has random weights (prompt_tuning_jax/demo_data/random_t5/README.md): a prompt
can steer it to say a class label, but it cannot read the sentences, so the accuracy stays near the
majority class. Entailment needs a pretrained T5 (below).

Where it went:
  MODEL_DIR:      {model_dir}
  prompt (numpy): {result['prompt_file']}   (numpy.load it)
  eval metrics:   {result['metrics_file']}

Next:
  {python} -m prompt_tuning_jax.report {model_dir}   # curves and a summary
  {eval_command(result['prompt_file'], os.path.join(model_dir, 'eval'))}
  {os.path.join(os.path.dirname(python), 'tensorboard')} --logdir {model_dir}

For real results, train on a pretrained checkpoint, e.g. T5 1.1 LM-adapted Base (a GPU helps):

{REAL_MODEL_COMMAND.replace('python', python, 1)}
"""


@console.command
def main(argv: Optional[Sequence[str]] = None) -> None:
  """`--model_dir` (default `./demo_run`) and any `--gin.NAME=VALUE` for the train and eval runs."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--model_dir", default="demo_run",
                      help="where the run goes (default ./demo_run); rerunning resumes it")
  args, gin_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  for arg in gin_args:
    if not arg.startswith("--gin."):
      parser.error(f"unrecognized argument {arg!r}; pass gin bindings as --gin.NAME=VALUE")
  print(closing_text(run_demo(args.model_dir, gin_args)))


if __name__ == "__main__":
  main()
