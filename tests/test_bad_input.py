"""Bad input to `python -m prompt_tuning_jax.train` (and `eval`, `infer`, `serve`): one line
`error: ...`, exit 2, nothing written.

Every case is a row of the table in docs/errors.md; `test_the_docs_table_is_up_to_date` keeps the two
the same (`PYTHONPATH=. python tests/test_bad_input.py` rewrites the table from `CASES`).
"""
import dataclasses
import io
import json
import pathlib
import shutil
import struct

import flax.serialization
import gin
import numpy as np
import pytest

from prompt_tuning_jax import ensemble
from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax import infer, serve, train
from test_train_e2e import CHECKPOINT, REPO_ROOT, SHARED, flags, listing

DOCS = REPO_ROOT / "docs" / "errors.md"
TABLE_START, TABLE_END = "<!-- table: tests/test_bad_input.py -->", "<!-- end of table -->"
RTE = SHARED / "data" / "superglue" / "RTE"
GOOD_LINE = ('{"premise": "A cat sat.", "hypothesis": "A cat is sitting.", "label": "entailment", '
             '"idx": 0}\n')
HF_CONFIG = {"model_type": "t5", "vocab_size": 32128, "d_model": 4, "num_heads": 2, "d_kv": 2,
             "d_ff": 8, "num_layers": 2, "feed_forward_proj": "gated-gelu"}
TOOLS = {"train": train.main, "eval": eval_lib.main, "infer": infer.main, "ensemble": ensemble.main,
         "serve": serve.main}
RUN_FILES = {"train": "runs/prompt_finetune.gin", "eval": "runs/prompt_eval.gin",
             "infer": "runs/prompt_infer.gin", "ensemble": "runs/prompt_ensemble_eval.gin"}
OUTPUT_MACROS = {"train": "MODEL_DIR", "eval": "EVAL_OUTPUT_DIR", "infer": "INFER_OUTPUT_DIR",
                 "ensemble": "EVAL_OUTPUT_DIR"}


def npy(array: np.ndarray) -> bytes:
  f = io.BytesIO()
  np.save(f, array)
  return f.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
  f = io.BytesIO()
  np.savez(f, **arrays)
  return f.getvalue()


def safetensors(header: dict, data: bytes = b"") -> bytes:
  """A safetensors file: the header's length (8 bytes, little-endian), the JSON header, the data."""
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text)) + text + data


def t5x_checkpoint(array_path: str) -> bytes:
  """A T5X msgpack `checkpoint` whose embedding is a zarr array at `array_path`."""
  spec = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": array_path},
          "metadata": {"dtype": "<f4", "shape": [32128, 4], "chunks": [4096, 4]}}
  return flax.serialization.msgpack_serialize(
      {"optimizer": {"target": {"token_embedder": {"embedding": spec}}}})


def requests(*lines: str) -> bytes:
  return "".join(line + "\n" for line in lines).encode()


# The msgpack file of the T5X checkpoint bundled with the package.
T5X_MSGPACK = (REPO_ROOT / "prompt_tuning_jax" / "demo_data" / "t5x_t5_1_1_tiny" / "checkpoint_3"
               / "checkpoint").read_bytes()
GOOD_REQUEST = '{"task": "rte", "inputs": "premise: A cat sat. hypothesis: A cat sits."}'
PROMPT = np.random.RandomState(0).uniform(-0.5, 0.5, (3, 4)).astype(np.float32)
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
    "garbage_run_config/run_config.json": b"\x00garbage",
    # Malformed input of every kind, and malformed checkpoints.
    "prompts/good.npy": PROMPT,
    "prompts/empty.npy": b"",
    "prompts/truncated.npy": npy(PROMPT)[:140],
    "prompts/archive.npz": npz(prompt=PROMPT),
    "prompts/one_d.npy": PROMPT[0],
    "prompts/three_d.npy": PROMPT[None],
    "prompts/nan.npy": np.where(np.arange(12).reshape(3, 4) == 5, np.nan, PROMPT),
    "prompts/inf.npy": np.where(np.arange(12).reshape(3, 4) == 5, -np.inf, PROMPT),
    "hf_without_d_model/config.json":
        json.dumps({k: v for k, v in HF_CONFIG.items() if k != "d_model"}).encode(),
    "hf_without_d_model/model.safetensors": safetensors({}),
    "hf_unknown_dtype/config.json": json.dumps(HF_CONFIG).encode(),
    "hf_unknown_dtype/model.safetensors":
        safetensors({"shared.weight": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
                    b"\0"),
    "hf_empty/config.json": json.dumps(HF_CONFIG).encode(),
    "hf_empty/model.safetensors": b"",
    "hf_truncated_header/config.json": json.dumps(HF_CONFIG).encode(),
    "hf_truncated_header/model.safetensors": safetensors({"shared.weight": {
        "dtype": "F32", "shape": [32128, 4], "data_offsets": [0, 514048]}})[:40],
    "hf_huge_header/config.json": json.dumps(HF_CONFIG).encode(),
    "hf_huge_header/model.safetensors": b"\xff" * 8 + b"{}",
    "hf_garbage_header/config.json": json.dumps(HF_CONFIG).encode(),
    "hf_garbage_header/model.safetensors": struct.pack("<Q", 8) + b"\x00\xfe\xffgarb\x01",
    "t5x_absolute_path/checkpoint": t5x_checkpoint("/etc/hostname"),
    "t5x_parent_path/checkpoint": t5x_checkpoint("../t5x_missing_arrays/x"),
    "t5x_truncated/checkpoint": T5X_MSGPACK[:5000],
    "t5x_missing_arrays/checkpoint": T5X_MSGPACK,  # without the arrays beside it
    "data_not_object/superglue/RTE/train.jsonl": GOOD_LINE.encode() + b"[1, 2]\n",
    "data_wrong_type/superglue/RTE/train.jsonl": GOOD_LINE.encode()
        + b'{"premise": 5, "hypothesis": "x", "label": 0, "idx": 1}\n',
    "data_nested_field/superglue/RTE/train.jsonl": GOOD_LINE.encode()
        + b'{"premise": "a", "hypothesis": "x", "label": 0, "idx": {"a": 1}}\n',
    "data_lone_surrogate/superglue/RTE/train.jsonl": GOOD_LINE.encode()
        + b'{"premise": "a\\ud800", "hypothesis": "x", "label": 0, "idx": 1}\n',
    "glue_missing_column/glue/RTE/train.tsv":
        b"index\tsentence1\tlabel\n0\tA cat sat.\tentailment\n",
    "gin/syntax.gin": b"PROMPT_LENGTH = 3\nBATCH_SIZE = 4 4\n",
    "gin/unclosed.gin": b"PROMPT_LENGTH = [3\n",
    "serve/good.jsonl": requests(GOOD_REQUEST),
    "serve/lone_surrogate.jsonl": requests(GOOD_REQUEST, '{"task": "rte", "inputs": "a \\udc00"}'),
    "serve/not_json.jsonl": requests(GOOD_REQUEST, '{"task": "rte", "inputs": '),
    "serve/not_object.jsonl": requests(GOOD_REQUEST, '["rte", "a cat"]'),
    "serve/wrong_type.jsonl": requests(GOOD_REQUEST, '{"task": "rte", "inputs": 5}'),
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
  # `train`, `eval`, `infer`, `ensemble` (model_dir is the output directory) or `serve` (macros are
  # its flags, model_dir its --output).
  tool: str = "train"
  lines: int = 1  # Of the error: an architecture mismatch gives what differs, then the fix.


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
         "TRAIN_STEPS must be a positive integer, got 0", "Give a positive number of steps."),
    # Run settings: checked before anything is written, not where they are first used.
    Case("train_steps_not_int", "TRAIN_STEPS is not a number", {"TRAIN_STEPS": "'forty'"},
         "TRAIN_STEPS must be a positive integer, got 'forty'", "Give a positive number of steps."),
    Case("train_steps_none", "TRAIN_STEPS is None", {"TRAIN_STEPS": "None"},
         "TRAIN_STEPS must be a positive integer, got None", "Give a positive number of steps."),
    Case("checkpoint_period_negative", "CHECKPOINT_PERIOD is negative", {"CHECKPOINT_PERIOD": "-5"},
         "CHECKPOINT_PERIOD (CheckpointConfig.period) must be a positive integer",
         "Give a positive number of steps, or None (every EVAL_PERIOD steps, or at the end)."),
    Case("eval_period_negative", "EVAL_PERIOD is negative", {"EVAL_PERIOD": "-1"},
         "EVAL_PERIOD (EvalConfig.period) must be a non-negative integer",
         "Give a number of steps, or 0 to never evaluate."),
    Case("keep_checkpoints_zero", "CheckpointConfig.keep is 0 (it would delete every checkpoint)",
         {"CheckpointConfig.keep": "0"}, "CheckpointConfig.keep must be a positive integer",
         "Keep at least 1 checkpoint, or None for all."),
    Case("learning_rate_negative", "LEARNING_RATE is negative", {"LEARNING_RATE": "-1"},
         "LEARNING_RATE (optimizers.prompt_tuning_adafactor.learning_rate) must be a positive "
         "number, got -1", "Give a positive rate (the paper: 0.3)."),
    Case("learning_rate_not_number", "LEARNING_RATE is not a number", {"LEARNING_RATE": "'fast'"},
         "must be a positive number, got 'fast'", "Give a positive rate (the paper: 0.3)."),
    # Checkpoints.
    Case("checkpoint_missing", "INITIAL_CHECKPOINT_PATH does not exist",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/no_such_checkpoint'"}, "does not exist",
         "Fix the path to the T5X or Hugging Face checkpoint."),
    Case("checkpoint_empty", "INITIAL_CHECKPOINT_PATH is an empty directory",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/empty_checkpoint'"}, "is not a checkpoint",
         "Point at a `checkpoint_N/` directory or a Hugging Face T5 directory."),
    Case("checkpoint_architecture", "The checkpoint is of another architecture",
         {"t5_config.num_encoder_layers": "3"}, "does not match the config",
         "Use the models/*.gin file of the checkpoint's model, or add the --gin flags the error "
         "gives (`prompt-tuning-inspect CHECKPOINT --gin` prints them all).", lines=3),
    Case("checkpoint_vocabulary", "The checkpoint has another vocabulary size",
         {"t5_config.vocab_size": "32000"}, "it has vocab_size=32128 where the config has "
         "vocab_size=32000", "Use the models/*.gin file (vocabulary) of the checkpoint's model, or "
         "the --gin flags the error gives.", lines=3),
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
    Case("model_dir_garbage_config", "MODEL_DIR's run_config.json is not JSON", {},
         "garbage_run_config/run_config.json is unreadable (Expecting value",
         "Restore the file, or use a new MODEL_DIR.", model_dir="{tmp}/garbage_run_config"),
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
    # Malformed input, and malformed checkpoints: read before anything is written.
    Case("gin_syntax_binding", "A --gin.NAME=VALUE binding is not gin syntax",
         {"BATCH_SIZE": "4 4"}, "in the binding 'BATCH_SIZE = 4 4', column 16: Expected newline",
         "Fix the binding's value (a Python literal, a string in quotes)."),
    Case("gin_syntax_unclosed_binding", "A binding opens a bracket it does not close",
         {"PROMPT_LENGTH": "(3"}, "in the binding 'PROMPT_LENGTH = (3': a bracket or quote is not "
         "closed", "Close the bracket or quote."),
    Case("gin_syntax_file", "A --gin_file is not gin syntax", {},
         "syntax.gin, line 2, column 16: Expected newline", "Fix the file at that line and column.",
         gin_files=("{tmp}/gin/syntax.gin",)),
    Case("gin_syntax_unclosed_file", "A --gin_file opens a bracket it does not close", {},
         "unclosed.gin: a bracket or quote is not closed", "Close the bracket or quote.",
         gin_files=("{tmp}/gin/unclosed.gin",)),
    Case("hf_config_incomplete", "A Hugging Face config.json lacks d_model",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/hf_without_d_model'"}, "config.json lacks d_model",
         "Save the model again with save_pretrained (config.json and its weights)."),
    Case("hf_unknown_dtype", "A safetensors tensor has a dtype safetensors does not define",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/hf_unknown_dtype'"}, "its dtype 'F4' is not one of",
         "Save the weights in a standard dtype (F32, BF16, F16, ...)."),
    Case("hf_empty_weights", "model.safetensors is empty",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/hf_empty'"}, "it holds 0 bytes, fewer than the 8",
         "Copy or download the weights again."),
    Case("hf_truncated_header", "model.safetensors is cut off within its header",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/hf_truncated_header'"},
         "its header claims 85 bytes, but the file holds 40",
         "Copy or download the weights again."),
    Case("hf_huge_header", "model.safetensors claims a header larger than the file",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/hf_huge_header'"},
         "its header claims 18446744073709551615 bytes, but the file holds 10",
         "Copy or download the weights again (nothing that large is read)."),
    Case("hf_garbage_header", "model.safetensors' header is not JSON",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/hf_garbage_header'"}, "is not a safetensors file",
         "Copy or download the weights again."),
    Case("t5x_spec_absolute_path", "A T5X checkpoint names an array by an absolute path",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/t5x_absolute_path'"},
         "names an array at '/etc/hostname', outside its directory",
         "Use the checkpoint T5X wrote; nothing outside its directory is read."),
    Case("t5x_spec_parent_path", "A T5X checkpoint names an array through '..'",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/t5x_parent_path'"},
         "names an array at '../t5x_missing_arrays/x', outside its directory",
         "Use the checkpoint T5X wrote; nothing outside its directory is read."),
    Case("t5x_truncated", "A T5X checkpoint's msgpack `checkpoint` file is truncated",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/t5x_truncated'"},
         "is not a readable msgpack checkpoint",
         "Copy the checkpoint again."),
    Case("t5x_arrays_missing", "A T5X checkpoint lacks its zarr array directories",
         {"INITIAL_CHECKPOINT_PATH": "'{tmp}/t5x_missing_arrays'"},
         "the array of decoder/layers_0/encoder_decoder_attention/key/kernel at",
         "Copy the whole `checkpoint_N/` directory."),
    Case("prompt_file_empty", "PROMPT_FILE is empty", {"PROMPT_FILE": "'{tmp}/prompts/empty.npy'"},
         "No data left in file", "Save the prompt again with numpy.save.",
         gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_truncated", "PROMPT_FILE is truncated",
         {"PROMPT_FILE": "'{tmp}/prompts/truncated.npy'"}, "mmap length is greater than file size",
         "Save the prompt again with numpy.save.", gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_npz", "PROMPT_FILE is a .npz archive",
         {"PROMPT_FILE": "'{tmp}/prompts/archive.npz'"}, "is a .npz archive of ['prompt']",
         "Save the prompt alone: numpy.save(path, archive['prompt']).",
         gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_1d", "PROMPT_FILE holds a 1-D array",
         {"PROMPT_FILE": "'{tmp}/prompts/one_d.npy'"}, "holds a float32 array of shape (4,)",
         "Save the [prompt_length, embed_dim] prompt.", gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_3d", "PROMPT_FILE holds a 3-D array",
         {"PROMPT_FILE": "'{tmp}/prompts/three_d.npy'"}, "holds a float32 array of shape (1, 3, 4)",
         "Save the [prompt_length, embed_dim] prompt.", gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_nan", "The initial prompt (prompts/from_file.gin) holds NaN",
         {"PROMPT_FILE": "'{tmp}/prompts/nan.npy'"}, "nan.npy' holds 1 NaN or Inf values",
         "Use a prompt saved before its run diverged.", gin_files=("prompts/from_file.gin",)),
    Case("prompt_file_inf", "The initial prompt (prompts/from_file.gin) holds Inf",
         {"PROMPT_FILE": "'{tmp}/prompts/inf.npy'"}, "inf.npy' holds 1 NaN or Inf values",
         "Use a prompt saved before its run diverged.", gin_files=("prompts/from_file.gin",)),
    Case("eval_prompt_nan", "eval's PROMPT_FILE holds NaN",
         {"PROMPT_FILE": "'{tmp}/prompts/nan.npy'"},
         "nan.npy' holds 1 NaN or Inf values", "Use a prompt saved before its run diverged.",
         tool="eval"),
    Case("ensemble_prompt_inf", "One of ensemble's PROMPT_FILES holds Inf",
         {"PROMPT_FILES": "['{tmp}/prompts/good.npy', '{tmp}/prompts/inf.npy']"},
         "inf.npy' holds 1 NaN or Inf values", "Use prompts saved before their runs diverged.",
         tool="ensemble"),
    Case("infer_prompt_3d", "infer's PROMPT_FILE holds a 3-D array",
         {"PROMPT_FILE": "'{tmp}/prompts/three_d.npy'"}, "holds a float32 array of shape (1, 3, 4)",
         "Save the [prompt_length, embed_dim] prompt.", tool="infer"),
    Case("data_not_object", "A data line is JSON but not an object",
         {"DATA_DIR": "'{tmp}/data_not_object'"}, "train.jsonl:2: '[1, 2]' is not a JSON object",
         "Fix that line of the file: one {\"field\": value, ...} object a line."),
    Case("data_wrong_type", "A data line's field has the wrong type",
         {"DATA_DIR": "'{tmp}/data_wrong_type'"},
         "train.jsonl:2: the field 'premise' is 5 (int), not a string",
         "Fix that line of the file."),
    Case("data_nested_field", "A data line's field holds an object (or a list) in place of a value",
         {"DATA_DIR": "'{tmp}/data_nested_field'"},
         "train.jsonl:2: the field 'idx' is {'a': 1} (dict), not an int32; fix that line of the file.",
         "Fix that line of the file."),
    Case("data_lone_surrogate", "A data line holds a lone surrogate (\\ud800)",
         {"DATA_DIR": "'{tmp}/data_lone_surrogate'"}, "train.jsonl:2: holds a lone surrogate",
         "Fix the text of that line (its escapes must encode characters)."),
    Case("glue_tsv_missing_column", "A GLUE tsv lacks a column of the task",
         {"DATA_DIR": "'{tmp}/glue_missing_column'",
          "MIXTURE_OR_TASK_NAME": "'taskless_glue_rte_v002'"},
         "train.tsv: no column 'sentence2' (GLUE rte's 'sentence2')",
         "Use the official tsv file, header line included."),
    Case("serve_prompt_nan", "serve's --prompt holds NaN",
         {"--prompt": "rte={tmp}/prompts/nan.npy"},
         "nan.npy' holds 1 NaN or Inf values", "Use a prompt saved before its run diverged.",
         tool="serve"),
    Case("serve_lone_surrogate", "A serve request holds a lone surrogate (\\udc00)",
         {"--requests": "{tmp}/serve/lone_surrogate.jsonl"},
         "lone_surrogate.jsonl:2: holds a lone surrogate '\\udc00'",
         "Fix the request's text (its escapes must encode characters).", tool="serve"),
    Case("serve_request_not_json", "A serve request line is not JSON",
         {"--requests": "{tmp}/serve/not_json.jsonl"}, "not_json.jsonl:2: not a JSON line",
         "Write one JSON object a line.", tool="serve"),
    Case("serve_request_not_object", "A serve request line is not a JSON object",
         {"--requests": "{tmp}/serve/not_object.jsonl"},
         "not_object.jsonl:2: '[\"rte\", \"a cat\"]' is not a JSON object",
         "Write one {\"task\": ..., \"inputs\": ...} object a line.", tool="serve"),
    Case("serve_request_wrong_type", "A serve request's inputs are not a string",
         {"--requests": "{tmp}/serve/wrong_type.jsonl"},
         "wrong_type.jsonl:2: expected {\"task\": str, \"inputs\": str}",
         "Give the inputs as text.", tool="serve"),
]


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> pathlib.Path:
  return write_files(tmp_path_factory.mktemp("bad_input"))


def write_files(root: pathlib.Path) -> pathlib.Path:
  """Writes the FILES under `root`, RTE's real validation file beside each bad training file."""
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
  """The command line of `case.tool` (`python -m prompt_tuning_jax.<tool>`'s arguments)."""
  if case.tool == "serve":
    args = {"--checkpoint": str(CHECKPOINT), "--relative_attention_max_distance": "8",
            "--prompt": "rte={tmp}/prompts/good.npy", "--requests": "{tmp}/serve/good.jsonl",
            "--output": case.model_dir, **case.macros}
    return [at(part, tmp) for item in args.items() for part in item]
  macros = {name: at(value, tmp) for name, value in case.macros.items()}
  if case.tool != "train":
    macros.setdefault("PROMPT_FILE", repr(f"{tmp}/prompts/good.npy"))
  argv = flags(RUN_FILES[case.tool], **{OUTPUT_MACROS[case.tool]: repr(at(case.model_dir, tmp))},
               **macros)
  run_file = argv.index(f"--gin_file={RUN_FILES[case.tool]}")
  return (argv[:run_file] + [f"--gin_file={at(name, tmp)}" for name in case.gin_files]
          + argv[run_file:])


def exit_status(case: Case, tmp: pathlib.Path) -> int:
  """Runs the case's tool in this process; its exit status."""
  try:
    return TOOLS[case.tool](argv_of(case, tmp))
  except SystemExit as e:
    return e.code


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(files, capsys, case):
  model_dir = pathlib.Path(at(case.model_dir, files))
  before = listing(files)
  status = exit_status(case, files)
  err = capsys.readouterr().err
  assert status == 2, err
  assert err.startswith("error: ") and err.count("\n") == case.lines and "Traceback" not in err, err
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
