"""T5X habits on our command line: official gin paths, T5X's macros and flags, did-you-mean."""
import pathlib
import re

import gin
import pytest

from prompt_tuning_jax import cli, migration
from test_gin_cli import TEST_GIN_DIR, run_train, train_flags, train_macros

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OURS = migration.package_gin_files(cli.PACKAGE_GIN_DIR)
# Every file of google-research/prompt-tuning's prompt_tuning/configs/ outside architectures/,
# extended/ and its tests, and the one test file we have.
OFFICIAL_FILES = [
    *(f"models/{family}_{size}_prompt.gin" for family in ("t5_1_1", "mt5")
      for size in ("small", "base", "large", "xl", "xxl")),
    *(f"models/sizes/{size}.gin" for size in ("small", "base", "large", "xl", "xxl")),
    "models/decoding/beam_search.gin", "models/decoding/nucleus_sampling.gin",
    "prompts/from_class_labels.gin", "prompts/from_class_labels_numpy.gin", "prompts/from_file.gin",
    "prompts/from_sampled_vocab.gin", "prompts/from_sampled_vocab_numpy.gin",
    "runs/prompt_finetune.gin", "runs/prompt_eval.gin", "runs/prompt_infer.gin",
    "test/t5_1_1_tiny_prompt.gin",
]


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


@pytest.mark.parametrize("relative", OFFICIAL_FILES)
def test_official_gin_paths_are_read_as_ours(relative):
  ours, note = migration.gin_file(migration.OFFICIAL_PREFIX + relative, OURS)
  assert ours in OURS and "reading ours" in note
  assert ours == relative or relative.endswith("_numpy.gin") or relative.startswith("test/")


def test_an_official_model_path_parses_as_ours(capsys):
  cli.parse_gin(["prompt_tuning/configs/models/t5_1_1_base_prompt.gin"], [])
  assert gin.query_parameter("t5_config.size") == "base"
  assert capsys.readouterr().err == (
      "note: prompt_tuning/configs/models/t5_1_1_base_prompt.gin is "
      "google-research/prompt-tuning's path; reading ours, models/t5_1_1_base_prompt.gin\n")


@pytest.mark.parametrize("relative, reason, closest", [
    ("architectures/prompt_encoder_t5_1_1_flaxformer.gin", "the architecture comes with each",
     "models/t5_1_1"),
    ("extended/models/multi_task_t5_1_1_base_prompt.gin", "are not implemented here",
     "models/t5_1_1_base_prompt.gin"),
    ("models/mt5_80b_prompt.gin", "no file here has its name", "models/mt5_"),
])
def test_official_paths_without_equivalent_name_the_closest(relative, reason, closest):
  with pytest.raises(FileNotFoundError) as error:
    migration.gin_file(migration.OFFICIAL_PREFIX + relative, OURS)
  message = str(error.value)
  assert "has no equivalent here" in message and reason in message
  assert f"Closest of ours: {closest}" in message


def test_a_misspelt_gin_file_is_one_line_with_the_closest(tmp_path, capsys):
  code, err = run_train(train_flags(tmp_path / "run") + ["--gin_file=models/t5_1_1_bse_prompt.gin"],
                        capsys)
  assert code == 2 and err.count("\n") == 1
  assert ("Unable to open file: models/t5_1_1_bse_prompt.gin; did you mean "
          "'models/t5_1_1_base_prompt.gin'") in err


def test_a_dynamic_registration_file_is_one_line(tmp_path, capsys):
  official = tmp_path / "prompt_tuning" / "configs" / "runs"
  official.mkdir(parents=True)
  (official / "prompt_finetune.gin").write_text(
      "from __gin__ import dynamic_registration\nfrom t5x import utils\n"
      "include 't5x/configs/runs/finetune.gin'\n")
  argv = train_flags(tmp_path / "run", run_file="prompt_tuning/configs/runs/prompt_finetune.gin")
  code, err = run_train([f"--gin_search_paths={tmp_path}"] + argv, capsys)
  assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
  assert ("error: prompt_tuning/configs/runs/prompt_finetune.gin is written for T5X's `from "
          "__gin__ import dynamic_registration`, which this package does not read: use ours, "
          "--gin_file=runs/prompt_finetune.gin.") in err


@pytest.mark.parametrize("flag, says", [
    ("--tfds_data_dir=/data/tfds",
     "set the environment variable instead: TFDS_DATA_DIR=/data/tfds"),
    ("--multiprocess_gpu", "several processes are detected from the environment"),
])
def test_t5x_flags_are_one_line(tmp_path, capsys, flag, says):
  code, err = run_train(train_flags(tmp_path / "run") + [flag], capsys)
  assert code == 2 and err.count("\n") == 1
  assert err.startswith(f"error: {flag.partition('=')[0]} is T5X's flag: ") and says in err


def test_t5x_macros_bind_our_settings(tmp_path, capsys):
  bindings = [f"{name} = {value}" for name, value in
              train_macros(tmp_path / "run", INITIAL_CHECKPOINT_PATH=None).items()]
  bindings += ["RANDOM_SEED = 7", "DROPOUT_RATE = 0.25", "EVALUATOR_NUM_EXAMPLES = 5",
               "CHECKPOINT_PATH = None", "EMBED_DIM = 8"]
  settings = cli.train_settings(["t5x_tiny.gin", "runs/prompt_finetune.gin"], bindings,
                                [str(TEST_GIN_DIR)])
  assert settings["seed"] == 7 and settings["eval_config"].num_examples == 5
  assert settings["model_config"].dropout_rate == 0.25 and settings["model_config"].emb_dim == 8
  assert settings["initial_checkpoint_path"] is None
  err = capsys.readouterr().err
  assert "note: RANDOM_SEED is T5X's macro; read as --gin.train.seed=7\n" in err
  assert "note: CHECKPOINT_PATH is T5X's macro; read as --gin.INITIAL_CHECKPOINT_PATH=None\n" in err


@pytest.mark.parametrize("entry, name, target", [
    ("evaluate", "EVALUATOR_NUM_EXAMPLES", "EVAL_NUM_EXAMPLES"),
    ("evaluate", "MIXTURE_OR_TASK_SPLIT", "EVAL_SPLIT"),
    ("infer", "MIXTURE_OR_TASK_SPLIT", "INFER_SPLIT"),
    ("infer", "CHECKPOINT_PATH", "INITIAL_CHECKPOINT_PATH"),
])
def test_t5x_macros_by_entry_point(entry, name, target):
  assert migration.translate_bindings([f"{name} = 'x'"], entry)[0] == [f"{target} = 'x'"]


def test_t5x_macros_that_nothing_reads_are_named(tmp_path, capsys):
  argv = train_flags(tmp_path / "run", TRAIN_STEPS="0") + [
      "--gin.EVAL_STEPS=20", "--gin.MIXTURE_OR_TASK_SPLIT='test'", "--gin.RANDOM_SEED=None"]
  code, err = run_train(argv, capsys)
  assert code == 2 and err.splitlines()[-1].startswith("error: TRAIN_STEPS")
  assert ("warning: EVAL_STEPS is T5X's macro and is not read here: a training run's eval loss "
          "covers EvalConfig.num_examples of the split\n") in err
  assert ("warning: MIXTURE_OR_TASK_SPLIT is T5X's macro and is not read by train (only by "
          "evaluate, evaluate_ensemble, infer)\n") in err
  assert "note: RANDOM_SEED is T5X's macro; None leaves train.seed at its default, 0\n" in err


def test_an_unknown_task_names_the_closest(tmp_path, capsys):
  code, err = run_train(train_flags(tmp_path / "run",
                                    MIXTURE_OR_TASK_NAME="'taskless_super_glue_rte'"), capsys)
  assert code == 2 and err.count("\n") == 1
  assert ("MIXTURE_OR_TASK_NAME 'taskless_super_glue_rte' is not registered; did you mean "
          "'taskless_super_glue_rte_v102'") in err


def test_t5x_train_steps_are_named_with_the_step_offset(tmp_path, capsys):
  argv = train_flags(tmp_path / "run", TRAIN_STEPS="1_150_000",
                     INITIAL_CHECKPOINT_PATH="'/no/such/t5_1_1_lm100k_base/checkpoint_1100000'")
  code, err = run_train(argv, capsys)
  assert code == 2 and "does not exist" in err.splitlines()[-1]
  warning = err.splitlines()[0]
  assert warning.startswith("warning: TRAIN_STEPS=1_150_000 trains the prompt for 1,150,000 steps")
  assert "T5X's counts the checkpoint's pre-training steps too" in warning
  assert warning.endswith("T5X's TRAIN_STEPS=1_150_000 is --gin.TRAIN_STEPS=50000 here")
  assert migration.train_steps_warning(30000, None) is None


def test_readme_lists_every_t5x_name():
  readme = (REPO_ROOT / "README.md").read_text()
  section = readme[readme.index("## Coming from google-research/prompt-tuning"):]
  section = section[:section.index("\n## ", 1)]
  names = [*migration.MAPPED_MACROS, *migration.UNREAD_MACROS, *migration.T5X_FLAGS]
  assert [name for name in names if not re.search(rf"(?<![\w-]){name}(?!\w)", section)] == []
