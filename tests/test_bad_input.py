"""Bad input to `python -m prompt_tuning_jax.train`: one line `error: ...`, exit 2, nothing written.

Every case is a row of the table in docs/errors.md; `test_the_docs_table_is_up_to_date` keeps the two
the same (`PYTHONPATH=. python tests/test_bad_input.py` rewrites the table from `CASES`).
"""
import dataclasses
import pathlib
import shutil

import gin
import numpy as np
import pytest

from prompt_tuning_jax import train
from test_train_e2e import SHARED, flags, listing

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "errors.md"
TABLE_START, TABLE_END = "<!-- table: tests/test_bad_input.py -->", "<!-- end of table -->"
RTE = SHARED / "data" / "superglue" / "RTE"
GOOD_LINE = ('{"premise": "A cat sat.", "hypothesis": "A cat is sitting.", "label": "entailment", '
             '"idx": 0}\n')
# Files the cases point at, under {tmp}: name -> contents (bytes, or an array for a numpy file).
FILES = {
    "empty_checkpoint/": None,
    "prompts/wrong_shape.npy": np.zeros((3, 8), np.float32),
    "prompts/wrong_dtype.npy": np.zeros((3, 4), np.int32),
    "prompts/not_numpy.npy": b"0.1 0.2 0.3\n",
    "data_missing_field/superglue/RTE/train.jsonl":
        GOOD_LINE.encode() + b'{"premise": "A dog ran.", "label": "entailment", "idx": 1}\n',
    "data_empty_lines/superglue/RTE/train.jsonl": b"\n\n  \n",
    "data_not_utf8/superglue/RTE/train.jsonl":
        GOOD_LINE.encode() + b'{"premise": "caf\xe9", "hypothesis": "x", "label": 0, "idx": 1}\n',
    "data_wrong_label/superglue/RTE/train.jsonl":
        GOOD_LINE.encode() + b'{"premise": "a", "hypothesis": "b", "label": "maybe", "idx": 1}\n',
    "other_run/run_config.json": b'{"prompt_length": 7}\n',
    "checkpoints_without_config/checkpoints/": None,
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  cause: str  # The bad input, for the docs.
  macros: dict[str, str]  # --gin.NAME=VALUE; `{tmp}` is the directory holding FILES.
  message: str  # A part of the one-line error.
  fix: str
  gin_files: tuple[str, ...] = ()  # Before runs/prompt_finetune.gin.
  model_dir: str = "{tmp}/runs/new"  # Must stay as it was (absent, for a new one).


LABELS = "['entailment', 'not_entailment']"
CASES = [
    # The command line and gin.
    Case("unknown_task", "MIXTURE_OR_TASK_NAME names no registered task",
         {"MIXTURE_OR_TASK_NAME": "'no_such_task'"}, "'no_such_task' is not registered",
         "Check the name; import your task module with MIXTURE_OR_TASK_MODULE."),
    Case("unknown_macro", "A binding uses a macro nothing sets",
         {"PROMPT_LENGTH": "%NO_SUCH_MACRO"}, "NO_SUCH_MACRO is not set",
         "Set it with --gin.NAME=VALUE or include the gin file that sets it."),
    Case("binding_typo", "A misspelt parameter in a binding", {"DatasetConfig.batch_sise": "4"},
         "doesn't have a parameter named 'batch_sise'", "Fix the parameter's name."),
    Case("unknown_configurable", "A misspelt function in a binding", {"trian.batch_size": "4"},
         "No configurable matching 'trian'", "Fix the function's name (`train`, `t5_config`, ...)."),
    Case("missing_gin_file", "--gin_file names a file that does not exist", {},
         "Unable to open file: no_such_file.gin",
         "Fix the path, or add its directory with --gin_search_paths.",
         gin_files=("no_such_file.gin",)),
    Case("non_positive_steps", "TRAIN_STEPS is 0", {"TRAIN_STEPS": "0"},
         "TRAIN_STEPS and BATCH_SIZE must be positive", "Give a positive number of steps."),
    # Checkpoints.
    Case("checkpoint_missing", "INITIAL_CHECKPOINT_PATH does not exist",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/no_such_checkpoint'"}, "does not exist",
         "Fix the path to the T5X or Hugging Face checkpoint."),
    Case("checkpoint_empty", "INITIAL_CHECKPOINT_PATH is an empty directory",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/empty_checkpoint'"}, "is not a checkpoint",
         "Point at a `checkpoint_N/` directory or a Hugging Face T5 directory."),
    Case("checkpoint_architecture", "The checkpoint is of another architecture",
         {"t5_config.num_encoder_layers": "3"}, "does not match the config",
         "Use the models/*.gin file of the checkpoint's model."),
    Case("checkpoint_vocabulary", "The checkpoint has another vocabulary size",
         {"t5_config.vocab_size": "32000"}, "token_embedder/embedding",
         "Use the models/*.gin file (vocabulary) of the checkpoint's model."),
    # Prompts and prompt files.
    Case("prompt_file_missing", "PROMPT_FILE does not exist",
         {"PROMPT_FILE": "'{tmp}/prompts/no_such.npy'"}, "No prompt file at",
         "Fix the path (e.g. MODEL_DIR/numpy_checkpoints/checkpoint_N/encoder.prompt.prompt.prompt).",
         gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_shape", "PROMPT_FILE holds a prompt of another shape",
         {"PROMPT_FILE": "'{tmp}/prompts/wrong_shape.npy'"}, "is (3, 8) but the model wants (3, 4)",
         "Use a prompt trained for this model and PROMPT_LENGTH.",
         gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_dtype", "PROMPT_FILE holds integers",
         {"PROMPT_FILE": "'{tmp}/prompts/wrong_dtype.npy'"}, "holds a int32 array",
         "Save the prompt as a float array.", gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_not_numpy", "PROMPT_FILE is not a numpy file",
         {"PROMPT_FILE": "'{tmp}/prompts/not_numpy.npy'"}, "is not a numpy .npy array",
         "Save the prompt with numpy.save.", gin_files=("prompts/from_file.gin",)),
    Case("prompt_length_zero", "PROMPT_LENGTH is 0", {"PROMPT_LENGTH": "0"},
         "PROMPT_LENGTH must be a positive int", "Give a positive length (the paper: 100)."),
    Case("prompt_length_negative", "PROMPT_LENGTH is negative", {"PROMPT_LENGTH": "-5"},
         "PROMPT_LENGTH must be a positive int", "Give a positive length (the paper: 100)."),
    Case("class_labels_empty", "A CLASS_LABELS label tokenises to nothing",
         {"CLASS_LABELS": "['', 'no']"}, "the label '' tokenises to nothing",
         "Give the task's label words.", gin_files=("prompts/from_class_labels.gin",)),
    # Lengths, batch and mesh.
    Case("targets_shorter_than_label", "TASK_FEATURE_LENGTHS['targets'] cannot hold a label + EOS",
         {"CLASS_LABELS": LABELS}, "is shorter than the label 'not_entailment'",
         "Raise 'targets' to the length the message gives.",
         gin_files=("prompts/from_class_labels.gin",)),
    Case("inputs_and_prompt_too_long", "TASK_FEATURE_LENGTHS['inputs'] + PROMPT_LENGTH exceeds "
         "train.max_encoder_length", {"train.max_encoder_length": "16"}, "more than max_encoder_length",
         "Shorten the inputs to the length the message gives."),
    Case("feature_lengths_incomplete", "TASK_FEATURE_LENGTHS lacks 'targets'",
         {"TASK_FEATURE_LENGTHS": "{'inputs': 32}"}, "must give a positive int for 'targets'",
         "Give both, e.g. {'inputs': 512, 'targets': 8}."),
    Case("batch_not_divisible", "BATCH_SIZE does not split into the micro-batches",
         {"train.num_microbatches": "3"}, "BATCH_SIZE=4 does not divide",
         "Use a multiple of the number the message gives."),
    Case("mesh_needs_more_devices", "train.mesh_shape needs more devices than there are",
         {"train.mesh_shape": "(2, 1)"}, "mesh_shape (2, 1) needs 2 devices",
         "Make data x model the device count."),
    Case("length_bucket_too_long",
         "A DatasetConfig.length_buckets entry exceeds TASK_FEATURE_LENGTHS['inputs']",
         {"DatasetConfig.length_buckets": "[16, 64]"}, "[64] not a positive integer up to",
         "Give input lengths up to 'inputs' (the longest bucket is 'inputs' itself)."),
    # Execution settings.
    Case("attention_unknown", "ATTENTION_IMPLEMENTATION names no attention implementation",
         {"ATTENTION_IMPLEMENTATION": "'bogus'"}, "ATTENTION_IMPLEMENTATION='bogus' is not one of",
         "Use 'auto', 'xla', 'cudnn' or 'cpu'."),
    Case("attention_cudnn_elsewhere",
         "ATTENTION_IMPLEMENTATION is 'cudnn' without a GPU or in float32",
         {"ATTENTION_IMPLEMENTATION": "'cudnn'"},
         "ATTENTION_IMPLEMENTATION='cudnn' needs an NVIDIA GPU", "Use 'auto' or 'xla'."),
    Case("scan_layers_not_bool", "ExecutionConfig.scan_layers is not True or False",
         {"ExecutionConfig.scan_layers": "'yes'"}, "ExecutionConfig.scan_layers='yes'",
         "Give True or False."),
    Case("execution_setting_in_t5_config", "An execution setting is bound on t5_config",
         {"t5_config.scan_layers": "True"}, "t5_config.scan_layers is an execution setting",
         "Bind it on ExecutionConfig, e.g. --gin.ExecutionConfig.scan_layers=True."),
    # MODEL_DIR.
    Case("model_dir_other_run", "MODEL_DIR holds a run with other settings", {},
         "holds a run with different settings", "Use a new MODEL_DIR, or the run's settings.",
         model_dir="{tmp}/other_run"),
    Case("model_dir_without_config", "MODEL_DIR holds checkpoints but no run_config.json", {},
         "holds checkpoints but no run_config.json", "Use a new MODEL_DIR.",
         model_dir="{tmp}/checkpoints_without_config"),
    # Data.
    Case("data_missing_field", "A data line lacks a field",
         {"DATA_DIR": "'{tmp}/data_missing_field'"}, "train.jsonl:2: the field 'hypothesis' is missing",
         "Fix that line of the file."),
    Case("data_empty_lines", "A data file has only empty lines",
         {"DATA_DIR": "'{tmp}/data_empty_lines'"}, "holds no examples",
         "Point DATA_DIR at the complete files."),
    Case("data_not_utf8", "A data file is not UTF-8", {"DATA_DIR": "'{tmp}/data_not_utf8'"},
         "train.jsonl:2: not valid UTF-8", "Save the file as UTF-8."),
    Case("data_wrong_label", "A data line has a label outside the task's",
         {"DATA_DIR": "'{tmp}/data_wrong_label'"}, "train.jsonl:2: the label 'maybe' is none of",
         "Fix the label (a label name, or a class id)."),
    Case("data_not_found", "DATA_DIR holds no files of the task", {"DATA_DIR": "'{tmp}'"},
         "No data found for SuperGLUE RTE", "Point DATA_DIR at the data, or prepare the TFDS dataset."),
    Case("eval_split_missing", "The eval split does not exist",
         {"EVAL_PERIOD": "2", "EvalConfig.split": "'no_such_split'"}, "no_such_split",
         "Use a split the task has (e.g. 'validation')."),
]


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> pathlib.Path:
  """The FILES, with RTE's real validation file beside each bad training file."""
  root = tmp_path_factory.mktemp("bad_input")
  for name, contents in FILES.items():
    path = root / name
    if name.endswith("/"):
      path.mkdir(parents=True)
      continue
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(contents, np.ndarray):
      with open(path, "wb") as f:
        np.save(f, contents)
    else:
      path.write_bytes(contents)
    if path.name == "train.jsonl":
      shutil.copy(RTE / "val.jsonl", path.parent / "val.jsonl")
  return root


def at(text: str, tmp: pathlib.Path) -> str:
  return text.replace("{tmp}", str(tmp))


def argv_of(case: Case, tmp: pathlib.Path) -> list[str]:
  argv = flags(MODEL_DIR=repr(at(case.model_dir, tmp)),
               **{name: at(value, tmp) for name, value in case.macros.items()})
  run_file = argv.index("--gin_file=runs/prompt_finetune.gin")
  return argv[:run_file] + [f"--gin_file={name}" for name in case.gin_files] + argv[run_file:]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(files, capsys, case):
  model_dir = pathlib.Path(at(case.model_dir, files))
  before = listing(files)
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv_of(case, files))
  err = capsys.readouterr().err
  assert exit_info.value.code == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  assert case.message in err
  assert listing(files) == before
  assert model_dir.exists() == (case.model_dir != Case.model_dir)


def test_at_least_25_cases():
  assert len(CASES) >= 25 and len({case.name for case in CASES}) == len(CASES)


def render_table() -> str:
  def cell(text: str) -> str:
    return text.replace("|", "\\|")
  rows = ["| Case | Bad input | The error says | Fix |", "| --- | --- | --- | --- |"]
  rows += [f"| `{case.name}` | {cell(case.cause)} | `{cell(case.message)}` | {cell(case.fix)} |"
           for case in CASES]
  return "\n".join(rows)


def test_the_docs_table_is_up_to_date():
  text = DOCS.read_text()
  table = text[text.index(TABLE_START) + len(TABLE_START):text.index(TABLE_END)].strip()
  assert table == render_table(), (
      "run `PYTHONPATH=. python tests/test_bad_input.py` to update docs/errors.md")


if __name__ == "__main__":
  docs = DOCS.read_text()
  start, end = docs.index(TABLE_START) + len(TABLE_START), docs.index(TABLE_END)
  DOCS.write_text(docs[:start] + "\n" + render_table() + "\n" + docs[end:])
