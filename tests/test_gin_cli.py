"""The gin command line: flags, search paths, required macros, errors, user task modules, models."""
import glob
import os
import pathlib
import re
import textwrap

import gin
import pytest

import prompt_tuning_jax
from prompt_tuning_jax import config
from prompt_tuning_jax import cli
from prompt_tuning_jax import ensemble
from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax import infer
from prompt_tuning_jax import train
from prompt_tuning_jax import training

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_GIN_DIR = REPO_ROOT / "tests" / "gin"
# The T5 releases' files (the decoder-only ones, llama_ and gemma_prompt.gin, read their checkpoint).
MODEL_FILES = sorted(path for path in glob.glob(os.path.join(cli.PACKAGE_GIN_DIR, "models",
                                                             "*_prompt.gin"))
                     if not os.path.basename(path).startswith(("llama_", "gemma_")))


@pytest.fixture(autouse=True)
def clear_gin():
  """Leaves no gin bindings (e.g. DATA_DIR) behind for other tests."""
  yield
  gin.clear_config()


def run_train(argv, capsys):
  """(exit status, stderr) of `train.main(argv)`, which must fail."""
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv)
  return exit_info.value.code, capsys.readouterr().err


def train_macros(model_dir, **macros) -> dict[str, str]:
  """The macros of a tiny random-model run on RTE; `macros` override or add some (None: leave
  one out)."""
  values = {
      "MODEL_DIR": repr(str(model_dir)),
      "MIXTURE_OR_TASK_NAME": "'taskless_super_glue_rte_v102'",
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 4}",
      "INITIAL_CHECKPOINT_PATH": "None",
      "TRAIN_STEPS": "2",
      "BATCH_SIZE": "2",
      "EVAL_PERIOD": "0",
  }
  values.update(macros)
  return {name: value for name, value in values.items() if value is not None}


def train_flags(model_dir, run_file="runs/prompt_finetune.gin", **macros) -> list[str]:
  """`train_macros` as command-line flags, after the tiny model's and `run_file`'s gin files."""
  return [f"--gin_search_paths={TEST_GIN_DIR}", "--gin_file=t5x_tiny.gin",
          f"--gin_file={run_file}"] + [
              f"--gin.{name}={value}" for name, value in train_macros(model_dir, **macros).items()]


def test_missing_macro_names_macro_and_file(tmp_path, capsys):
  code, err = run_train(train_flags(tmp_path / "run", MODEL_DIR=None), capsys)
  assert code == 2
  assert err.count("\n") == 1 and err.startswith("error: ")
  assert "MODEL_DIR is not set" in err and "runs/prompt_finetune.gin" in err
  assert not (tmp_path / "run").exists()


def test_missing_class_labels_names_the_prompt_file(tmp_path, capsys):
  argv = train_flags(tmp_path / "run")
  argv.insert(2, "--gin_file=prompts/from_class_labels.gin")
  code, err = run_train(argv, capsys)
  assert code == 2
  assert "CLASS_LABELS is not set" in err and "prompts/from_class_labels.gin" in err


def test_unbound_entry_arguments_are_named(tmp_path, capsys):
  code, err = run_train([f"--gin_search_paths={TEST_GIN_DIR}", "--gin_file=t5x_tiny.gin",
                         f"--gin.MODEL_DIR={str(tmp_path)!r}"], capsys)
  assert code == 2
  assert "train.model_dir, train.dataset_config" in err and "not bound" in err


def test_required_marker_counts_as_missing():
  with pytest.raises(cli.UsageError, match="MODEL_DIR is not set, but the command line"):
    cli.parse_gin([], ["MODEL_DIR = %gin.REQUIRED", "train.model_dir = %MODEL_DIR"])


@pytest.mark.parametrize("flag, message", [
    ("--gin.no_such_function.x=1", "No configurable matching 'no_such_function'"),
    ("--gin.train.no_such_argument=1", "doesn't have a parameter named 'no_such_argument'"),
    ("--gin.PROMPT_LENGTH=%NO_SUCH_MACRO", "NO_SUCH_MACRO is not set"),
    ("--gin_file=no_such_file.gin", "Unable to open file: no_such_file.gin"),
])
def test_unknown_names_are_one_line_errors(tmp_path, capsys, flag, message):
  code, err = run_train(train_flags(tmp_path / "run") + [flag], capsys)
  assert code == 2
  assert err.startswith("error: ") and err.count("\n") == 1
  assert message in err and "Traceback" not in err


def test_later_gin_files_override_earlier_ones(tmp_path):
  (tmp_path / "five.gin").write_text("PROMPT_LENGTH = 5\n")
  (tmp_path / "seven.gin").write_text("PROMPT_LENGTH = 7\n")
  cli.parse_gin(["models/t5_1_1_small_prompt.gin", "five.gin", "seven.gin"], [],
                [str(tmp_path)])
  assert gin.query_parameter("%PROMPT_LENGTH") == 7
  cli.parse_gin(["models/t5_1_1_small_prompt.gin", "seven.gin", "five.gin"], [],
                [str(tmp_path)])
  assert gin.query_parameter("%PROMPT_LENGTH") == 5
  cli.parse_gin(["models/t5_1_1_small_prompt.gin", "five.gin"], ["PROMPT_LENGTH = 9"],
                [str(tmp_path)])
  assert gin.query_parameter("%PROMPT_LENGTH") == 9


def test_gin_search_paths(tmp_path):
  configs = tmp_path / "my_configs"
  configs.mkdir()
  (configs / "my_model.gin").write_text(textwrap.dedent("""\
      include 'models/t5_1_1_base_prompt.gin'
      PROMPT_LENGTH = 11
      """))
  with pytest.raises(OSError, match="my_model.gin"):
    cli.parse_gin(["my_model.gin"], [])
  args = cli.parse_args([f"--gin_search_paths=/elsewhere,{configs}",
                         "--gin_file=my_model.gin"], "test")
  assert args.gin_search_paths == ["/elsewhere", str(configs)]
  cli.parse_gin(args.gin_files, args.gin_bindings, args.gin_search_paths)
  assert gin.query_parameter("%PROMPT_LENGTH") == 11
  assert gin.query_parameter("t5_config.size") == "base"


def test_gin_files_are_found_through_the_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.PACKAGE_GIN_DIR == os.path.join(
      os.path.dirname(prompt_tuning_jax.__file__), "gin_configs")
  cli.parse_gin(["models/t5_1_1_lm100k_base_prompt.gin", "prompts/from_class_labels.gin",
                 "runs/prompt_finetune.gin", "models/decoding/beam_search.gin"],
                ["CLASS_LABELS = ['yes', 'no']", "MODEL_DIR = '/tmp/x'",
                 "MIXTURE_OR_TASK_NAME = 'x'", "TASK_FEATURE_LENGTHS = {}",
                 "INITIAL_CHECKPOINT_PATH = None"])
  assert gin.query_parameter("%BATCH_SIZE") == 32
  assert gin.query_parameter("%TRAIN_STEPS") == 30000
  assert gin.query_parameter("%LEARNING_RATE") == 0.3
  assert gin.query_parameter("%PROMPT_LENGTH") == 100
  assert gin.query_parameter("DecodingConfig.method") == "beam_search"
  assert gin.query_parameter("prompt_initializers.from_class_labels.class_labels") is not None


def test_command_line_flags():
  args = cli.parse_args(["--gin_file=a.gin", "--gin.MODEL_DIR='/tmp/x'", "--gin_file=b.gin",
                         "--gin.train.seed=3"], "test")
  assert args.gin_files == ["a.gin", "b.gin"]
  assert args.gin_bindings == ["MODEL_DIR = '/tmp/x'", "train.seed = 3"]
  with pytest.raises(SystemExit):
    cli.parse_args(["--model_dir=/tmp"], "test")


@pytest.mark.parametrize("path", MODEL_FILES, ids=os.path.basename)
def test_model_gin_files_give_the_released_configs(path):
  version, size = re.fullmatch(r"(\w+)_(tiny|small|base|large|xl|xxl)_prompt\.gin",
                               os.path.basename(path)).groups()
  cli.parse_gin([path], [])
  assert gin.get_configurable("t5_config")() == config.t5_config(version, size)
  assert gin.query_parameter("%PROMPT_LENGTH") == 100


def test_model_gin_files_cover_every_release():
  names = {os.path.basename(path) for path in MODEL_FILES}
  assert names == {f"{version}_{size}_prompt.gin" for version in config.VERSIONS
                   for size in config.SIZES}


def test_t5_1_1_lm100k_xxl():
  cli.parse_gin(["models/t5_1_1_lm100k_xxl_prompt.gin"], [])
  model_config = gin.get_configurable("t5_config")()
  assert (model_config.emb_dim, model_config.num_heads, model_config.mlp_dim) == (4096, 64, 10240)
  assert model_config.vocab_size == 32128 and not model_config.logits_via_embedding


def test_train_settings_are_the_grouped_configs_of_the_run_file(tmp_path):
  bindings = [f"{name} = {value}" for name, value in train_macros(tmp_path / "run").items()]
  settings = cli.train_settings(["t5x_tiny.gin", "runs/prompt_finetune.gin"], bindings,
                                [str(TEST_GIN_DIR)])
  assert settings["dataset_config"] == training.DatasetConfig(
      mixture_or_task_name="taskless_super_glue_rte_v102",
      task_feature_lengths={"inputs": 32, "targets": 4}, batch_size=2)
  assert settings["eval_config"].period == 0 and settings["checkpoint_config"].period == 1000
  assert settings["execution"] == config.ExecutionConfig(attention="auto")
  assert settings["train_steps"] == 2 and settings["prompt_length"] == 3


@pytest.mark.parametrize("main, run_file, macros", [
    (train.main, "runs/prompt_finetune.gin", {}),
    (eval_lib.main, "runs/prompt_eval.gin", {"PROMPT_FILE": "'p.npy'", "EVAL_OUTPUT_DIR": "OUT"}),
    (infer.main, "runs/prompt_infer.gin", {"PROMPT_FILE": "'p.npy'", "INFER_OUTPUT_DIR": "OUT"}),
    (ensemble.main, "runs/prompt_ensemble_eval.gin",
     {"PROMPT_FILES": "['p.npy']", "EVAL_OUTPUT_DIR": "OUT"}),
], ids=["train", "eval", "infer", "ensemble"])
def test_an_unknown_attention_implementation_is_one_line_and_writes_nothing(tmp_path, capsys, main,
                                                                            run_file, macros):
  out = tmp_path / "out"
  macros = {name: repr(str(out)) if value == "OUT" else value for name, value in macros.items()}
  with pytest.raises(SystemExit) as exit_info:
    main(train_flags(out, run_file, ATTENTION_IMPLEMENTATION="'bogus'", **macros))
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.count("\n") == 1
  assert err.startswith("error: ATTENTION_IMPLEMENTATION='bogus' is not one of")
  assert not out.exists()


USER_TASKS = '''\
"""A user's own task: echo a word, registered with the package's helpers."""
import tensorflow as tf

from prompt_tuning_jax import tasks


def _read(path):
  with open(path) as f:
    for line in f:
      yield {"word": line.strip()}


def _to_text(dataset):
  return dataset.map(lambda ex: {"inputs": tf.strings.join(["echo: ", ex["word"]]),
                                 "targets": ex["word"]})


tasks.add_task(
    "user_echo_words",
    tasks.LocalOrTfdsSource(
        name="echo words", local_files={"train": [WORDS], "validation": [WORDS]},
        reader=_read, features={"word": tf.TensorSpec([], tf.string)}),
    text_preprocessors=[_to_text])
'''


def test_user_task_module(tmp_path, monkeypatch, capsys):
  words = tmp_path / "words.txt"
  words.write_text("\n".join(["apple", "pear", "plum", "fig", "kiwi", "lime"]) + "\n")
  (tmp_path / "my_echo_tasks.py").write_text(USER_TASKS.replace("[WORDS]", f"[{str(words)!r}]"))
  monkeypatch.syspath_prepend(str(tmp_path))
  argv = train_flags(tmp_path / "run", MIXTURE_OR_TASK_NAME="'user_echo_words'")

  code, err = run_train(argv, capsys)
  assert code == 2 and "user_echo_words" in err and "MIXTURE_OR_TASK_MODULE" in err

  train.main(argv + ["--gin.MIXTURE_OR_TASK_MODULE='my_echo_tasks'"])
  assert (tmp_path / "run" / "numpy_checkpoints" / "checkpoint_2" /
          "encoder.prompt.prompt.prompt").is_file()
  assert (tmp_path / "run" / "config.gin").is_file()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     {"num_processes": 4, "process_id": 3}),
    ({"SLURM_NTASKS": "4"}, {}),
    ({"SLURM_NTASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, {}),
])
def test_multi_host_start(monkeypatch, env, expected):
  """`expected`: the arguments `jax.distributed.initialize` gets, or None where it is not called."""
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(cli.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  cli.maybe_initialize_distributed()
  assert calls == ([] if expected is None else [expected])


@pytest.mark.parametrize("num_processes, process_id", [("2", ""), ("2", "2"), ("two", "0")])
def test_multi_host_start_names_bad_process_numbers(monkeypatch, num_processes, process_id):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", num_processes)
  monkeypatch.setenv("JAX_PROCESS_ID", process_id)
  monkeypatch.setattr(cli.jax.distributed, "initialize", lambda **kwargs: pytest.fail("started"))
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES=.* and JAX_PROCESS_ID=.*: set both"):
    cli.maybe_initialize_distributed()
