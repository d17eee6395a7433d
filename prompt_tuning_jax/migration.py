"""Moving in from T5X and google-research/prompt-tuning: their gin paths, macros and flags as ours.

The command line (`cli.py`) asks this module while it parses, so that a T5X habit meets an answer
rather than silence or a traceback:

- an official gin path (`prompt_tuning/configs/models/t5_1_1_base_prompt.gin`) is read as ours
  where we have one (`models/t5_1_1_base_prompt.gin`), else named with the closest of ours;
- a T5X macro we do not read (`RANDOM_SEED`, `DROPOUT_RATE`, `EVALUATOR_NUM_EXAMPLES`,
  `CHECKPOINT_PATH`, ...) is bound to our setting, or named in a warning with what to do instead;
- T5X's flags (`--tfds_data_dir`, ...) and gin files written for T5X's `dynamic_registration` end
  in one line saying what to do; `TRAIN_STEPS` counted T5X's way (with the checkpoint's
  pre-training steps) is named in a warning.

Plain Python, no TensorFlow or JAX: the tools call it before those load.
"""
import difflib
import os
import re
from typing import Iterable, Optional, Sequence

OFFICIAL_PREFIX = "prompt_tuning/configs/"
T5X_PREFIX = "t5x/configs/"
# Official files whose equivalent here has another name; the others keep their names.
_RENAMED = {
    "prompts/from_class_labels_numpy.gin": "prompts/from_class_labels.gin",
    "prompts/from_sampled_vocab_numpy.gin": "prompts/from_sampled_vocab.gin",
    "test/t5_1_1_tiny_prompt.gin": "models/t5_1_1_tiny_prompt.gin",
}
# Official folders with no equivalent here, and why.
_NO_EQUIVALENT = {
    "architectures/": "the architecture comes with each models/<family>_<size>_prompt.gin file "
                      "(t5_config)",
    "extended/": "the extended methods (multi-task, per-layer and wayward prompts, IA3) are not "
                 "implemented here",
}

# T5X's macros that our gin files do not read -> our setting, by entry point ("*": every one).
MAPPED_MACROS = {
    "RANDOM_SEED": {"train": "train.seed"},
    "DROPOUT_RATE": {"*": "t5_config.dropout_rate"},
    "EVALUATOR_NUM_EXAMPLES": {"train": "EvalConfig.num_examples", "evaluate": "EVAL_NUM_EXAMPLES",
                               "evaluate_ensemble": "EVAL_NUM_EXAMPLES"},
    "CHECKPOINT_PATH": {"*": "INITIAL_CHECKPOINT_PATH"},
    "MIXTURE_OR_TASK_SPLIT": {"evaluate": "EVAL_SPLIT", "evaluate_ensemble": "EVAL_SPLIT",
                              "infer": "INFER_SPLIT"},
    "ACTIVATION_DTYPE": {"*": "t5_config.dtype"},
    "NUM_EMBEDDINGS": {"*": "t5_config.vocab_size"},
    "EMBED_DIM": {"*": "t5_config.emb_dim"},
    "NUM_HEADS": {"*": "t5_config.num_heads"},
    "HEAD_DIM": {"*": "t5_config.head_dim"},
    "MLP_DIM": {"*": "t5_config.mlp_dim"},
    "NUM_ENCODER_LAYERS": {"*": "t5_config.num_encoder_layers"},
    "NUM_DECODER_LAYERS": {"*": "t5_config.num_decoder_layers"},
}
# T5X's macros with no setting here, and what to do instead.
UNREAD_MACROS = {
    "EVAL_STEPS": "a training run's eval loss covers EvalConfig.num_examples of the split",
    "EVALUATOR_USE_MEMORY_CACHE": "evaluation datasets are always cached in memory",
    "JSON_WRITE_N_RESULTS": "every prediction is written",
    "USE_HARDWARE_RNG": "the run's random numbers come from train.seed",
    "PROMPT_REGEX": "what trains is train.trainable_patterns (default ['encoder/prompt/.*'])",
    "EMBEDDING_FILE": "the prompt initialisers read the frozen model's embedding table",
    "PROMPT": "the prompt's initialiser is PROMPT_INIT (e.g. prompts/from_class_labels.gin)",
}
T5X_MACROS = (*MAPPED_MACROS, *UNREAD_MACROS)  # each is bound to ours or named in a warning
# T5X's command-line flags, and what to do instead.
T5X_FLAGS = {
    "--tfds_data_dir": "set the environment variable instead: TFDS_DATA_DIR={value} python -m ... "
                       "(tasks read TFDS datasets prepared there, else the original files under "
                       "--gin.DATA_DIR)",
    "--multiprocess_gpu": "drop it: several processes are detected from the environment (TPU pod, "
                          "Slurm, Open MPI, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                          "JAX_PROCESS_ID)",
}
for _flag in ("--coordinator_address", "--process_count", "--process_index"):
  T5X_FLAGS[_flag] = T5X_FLAGS["--multiprocess_gpu"]
# T5X's TRAIN_STEPS include the checkpoint's pre-training steps; from here on it is surely that.
T5X_SIZED_TRAIN_STEPS = 1_000_000
_BINDING = re.compile(r"\s*([A-Z_][A-Z0-9_]*)\s*=\s*(.*)", re.DOTALL)
_CHECKPOINT_STEP = re.compile(r"checkpoint_(\d+)/?$")


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
  """Up to `n` of `candidates` most like `name` (difflib), best first."""
  return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
  """`; did you mean 'a' or 'b'?`, or nothing when no candidate is close."""
  matches = closest(name, candidates)
  return f"; did you mean {' or '.join(map(repr, matches))}?" if matches else ""


def gin_file(name: str, ours: Sequence[str]) -> tuple[str, str]:
  """(the gin file to read, a note saying so) for a `--gin_file` that no search path has.

  `ours` are the names of the gin files we have (`models/t5_1_1_base_prompt.gin`, ...). An official
  path is read as ours with a note; anything else raises a `FileNotFoundError` naming the closest
  of ours.
  """
  relative = name[len(OFFICIAL_PREFIX):] if name.startswith(OFFICIAL_PREFIX) else None
  if relative is not None:
    equivalent = _RENAMED.get(relative, relative)
    if equivalent in ours:
      return equivalent, (f"{name} is google-research/prompt-tuning's path; reading ours, "
                          f"{equivalent}")
    reason = next((why for folder, why in _NO_EQUIVALENT.items() if relative.startswith(folder)),
                  "no file here has its name")
    raise FileNotFoundError(
        f"{name} is google-research/prompt-tuning's and has no equivalent here: {reason}. Closest "
        f"of ours: {', '.join(_closest_in_folder(relative, ours))} (docs/gin.md lists them).")
  relative = name[len(T5X_PREFIX):] if name.startswith(T5X_PREFIX) else name
  raise FileNotFoundError(
      f"Unable to open file: {name}{did_you_mean(relative, ours)} (gin files are looked for in the "
      "working directory, --gin_search_paths and the package's gin_configs/)")


def _closest_in_folder(relative: str, ours: Sequence[str]) -> list[str]:
  """The 3 of `ours` most like an official file by name, from the folder it would be in here
  (`models/` for the official `architectures/` and `test/` files)."""
  folder = relative.removeprefix("extended/").rpartition("/")[0]
  if folder not in {name.rpartition("/")[0] for name in ours}:
    folder = "models"
  by_name = {name.rpartition("/")[2]: name for name in ours if name.rpartition("/")[0] == folder}
  return [by_name[match] for match in
          difflib.get_close_matches(relative.rpartition("/")[2], list(by_name), n=3, cutoff=0)]


def dynamic_registration_error(name: str, text: str, ours: Sequence[str]) -> Optional[str]:
  """The one-line error for a gin file written for T5X's `dynamic_registration`, else None."""
  if not re.search(r"^\s*from\s+__gin__\s+import\s+dynamic_registration", text, re.MULTILINE):
    return None
  relative = name.split(OFFICIAL_PREFIX, 1)[-1]
  ours_instead = _RENAMED.get(relative, relative)
  instead = (f"use ours, --gin_file={ours_instead}" if ours_instead in ours else
             "write one that binds our configurables (train, t5_config, DatasetConfig, ...) and "
             "includes ours (models/..., prompts/..., runs/...), as docs/gin.md shows")
  return (f"{name} is written for T5X's `from __gin__ import dynamic_registration`, which this "
          f"package does not read: {instead}.")


def flag_error(arg: str) -> Optional[str]:
  """The one-line error for one of T5X's command-line flags, else None."""
  flag, _, value = arg.partition("=")
  if flag not in T5X_FLAGS:
    return None
  return f"{flag} is T5X's flag: {T5X_FLAGS[flag].format(value=value or 'DIR')}."


def translate_bindings(bindings: Sequence[str], entry: str) -> tuple[list[str], list[str]]:
  """(the bindings with T5X's macros bound to our settings for `entry`, a note for each).

  `RANDOM_SEED = 3` becomes `train.seed = 3` for `train`; a macro with no setting for `entry` is
  kept (and later named by `unread_macro_warning`). A `None` seed is left out: ours is an int.
  """
  translated, notes = [], []
  for binding in bindings:
    match = _BINDING.fullmatch(binding)
    targets = MAPPED_MACROS.get(match.group(1), {}) if match else {}
    target = targets.get(entry, targets.get("*"))
    if target is None:
      translated.append(binding)
      continue
    name, value = match.group(1), match.group(2).strip()
    if target == "train.seed" and value == "None":
      notes.append(f"{name} is T5X's macro; None leaves train.seed at its default, 0")
      continue
    translated.append(f"{target} = {value}")
    notes.append(f"{name} is T5X's macro; read as --gin.{target}={value}")
  return translated, notes


def unread_macro_warning(name: str, entry: str) -> str:
  """The warning for one of T5X's macros (`T5X_MACROS`) that `entry` does not read."""
  if name in UNREAD_MACROS:
    return f"{name} is T5X's macro and is not read here: {UNREAD_MACROS[name]}"
  where = ", ".join(sorted(set(MAPPED_MACROS[name]) - {"*"}))
  return f"{name} is T5X's macro and is not read by {entry} (only by {where})"


def train_steps_warning(train_steps: int, initial_checkpoint_path: Optional[str]) -> Optional[str]:
  """A warning when TRAIN_STEPS looks counted T5X's way, with the checkpoint's steps; else None."""
  if not isinstance(train_steps, int) or train_steps < T5X_SIZED_TRAIN_STEPS:
    return None
  step = _CHECKPOINT_STEP.search(initial_checkpoint_path or "")
  meant = (f"; on this checkpoint (step {int(step.group(1)):,}) T5X's TRAIN_STEPS={train_steps:_} "
           f"is --gin.TRAIN_STEPS={train_steps - int(step.group(1))} here"
           if step and 0 < train_steps - int(step.group(1)) else "")
  return (f"TRAIN_STEPS={train_steps:_} trains the prompt for {train_steps:,} steps: here "
          "TRAIN_STEPS counts this run's steps only, while T5X's counts the checkpoint's "
          f"pre-training steps too (the official sst2-demo.sh's 1_150_000 on a 1,100,000-step "
          f"checkpoint is 50,000 steps){meant}")


def package_gin_files(gin_dir: str) -> list[str]:
  """The `/`-joined names of the gin files under `gin_dir`, e.g. `models/t5_1_1_base_prompt.gin`."""
  names = []
  for root, _, files in os.walk(gin_dir, followlinks=True):
    names += [os.path.relpath(os.path.join(root, f), gin_dir).replace(os.sep, "/")
              for f in files if f.endswith(".gin")]
  return sorted(names)
