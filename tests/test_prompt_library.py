"""The prompt library: entries written whole and never replaced, prompts read from every source we
know (our runs, PEFT's adapters, the released `.npy` prompts), and a real training run publishing
its prompt with `--gin.train.publish_to`."""
import os
import pathlib
import stat

import gin
import numpy as np
import pytest

from prompt_tuning_jax import config
from prompt_tuning_jax import prompt_library
from prompt_tuning_jax import train

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
CHECKPOINT = SHARED / "checkpoints" / "t5x_t5_1_1_tiny_flaxformer" / "checkpoint_3"
TASK = "taskless_super_glue_rte_v102"
TINY = config.t5_config("t5_1_1", "tiny")


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


def run_flags(model_dir, library, steps=3):
  """The train command's flags for `steps` steps on the T5X tiny checkpoint, publishing to
  `library`."""
  return [f"--gin_search_paths={REPO_ROOT / 'tests' / 'gin'}", "--gin_file=t5x_tiny.gin",
          "--gin_file=runs/prompt_finetune.gin", f"--gin.MIXTURE_OR_TASK_NAME={TASK!r}",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4}",
          f"--gin.INITIAL_CHECKPOINT_PATH={str(CHECKPOINT)!r}",
          f"--gin.DATA_DIR={str(SHARED / 'data')!r}", "--gin.BATCH_SIZE=4",
          f"--gin.TRAIN_STEPS={steps}", "--gin.EVAL_PERIOD=0",
          f"--gin.MODEL_DIR={str(model_dir)!r}", f"--gin.train.publish_to={str(library)!r}"]


@pytest.fixture(scope="module")
def published_run(tmp_path_factory):
  """A real 3-step run of the T5X tiny checkpoint that published to a library, run twice (the
  second start finds it finished); returns (MODEL_DIR, library)."""
  if not CHECKPOINT.exists():
    pytest.skip(f"{CHECKPOINT} (the shared T5X checkpoint) is not present")
  root = tmp_path_factory.mktemp("published")
  model_dir, library = root / "run", root / "library"
  train.main(run_flags(model_dir, library))
  train.main(run_flags(model_dir, library))
  gin.clear_config()
  return model_dir, library


def test_publish_list_and_read_back(tmp_path):
  prompt = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  model = prompt_library.model_identity(TINY, name="t5_1_1_tiny")
  entry = prompt_library.publish(str(tmp_path / "lib"), "rte", prompt, task=TASK, model=model,
                                 steps=7, metrics={"rte/accuracy": 50.0}, source="somewhere")
  assert prompt_library.entries(str(tmp_path / "lib")) == [entry]
  assert entry == prompt_library.Entry(name="rte", prompt_length=5, embed_dim=4, task=TASK,
                                       model=model, steps=7, metrics={"rte/accuracy": 50.0},
                                       source="somewhere")
  assert model["emb_dim"] == 4 and model["mlp_activations"] == ["gelu", "linear"]
  np.testing.assert_array_equal(prompt_library.load_prompt(str(tmp_path / "lib"), "rte"), prompt)
  assert sorted(os.listdir(tmp_path / "lib")) == ["rte"]  # no temporary left behind
  mode = os.stat(tmp_path / "lib" / "rte").st_mode
  assert mode & stat.S_IROTH and mode & stat.S_IXOTH


def test_an_entry_is_never_replaced(tmp_path):
  library = str(tmp_path)
  first = np.ones((2, 4), np.float32)
  prompt_library.publish(library, "rte", first)
  with pytest.raises(FileExistsError, match="has an entry 'rte' already"):
    prompt_library.publish(library, "rte", np.zeros((2, 4), np.float32))
  np.testing.assert_array_equal(prompt_library.load_prompt(library, "rte"), first)
  assert sorted(os.listdir(library)) == ["rte"]


@pytest.mark.parametrize("name, prompt, message", [
    ("../escape", np.ones((2, 4)), "a file name"),
    (".hidden", np.ones((2, 4)), "a file name"),
    ("ok", np.ones(4), "shape \\(4,\\)"),
    ("ok", np.ones((2, 4), np.int32), "int32"),
    ("ok", np.full((2, 4), np.nan), "NaN"),
])
def test_publish_refuses_bad_input(tmp_path, name, prompt, message):
  with pytest.raises(ValueError, match=message):
    prompt_library.publish(str(tmp_path), name, prompt)
  assert not os.listdir(tmp_path)


def test_a_broken_entry_is_named(tmp_path):
  prompt_library.publish(str(tmp_path), "good", np.ones((2, 4), np.float32))
  (tmp_path / "good" / "entry.json").write_text("{not json")
  with pytest.raises(ValueError, match="good/entry.json is unreadable"):
    prompt_library.entries(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="No prompt library"):
    prompt_library.entries(str(tmp_path / "missing"))


@pytest.mark.needs_shared(SHARED / "prompts")
def test_released_prompt_is_read_for_its_model():
  path = str(SHARED / "prompts" / "t5_1_1_lm100k_base" / "rte.npy")
  base = config.t5_config("t5_1_1_lm100k", "base")
  prompt, entry = prompt_library.read_prompt(path, base)
  np.testing.assert_array_equal(prompt, np.load(path))
  assert (entry.name, entry.prompt_length, entry.embed_dim) == ("rte", 100, 768)
  assert entry.model == prompt_library.model_identity(base)
  with pytest.raises(ValueError, match="emb_dim=512"):
    prompt_library.read_prompt(path, config.t5_config("t5_1_1_lm100k", "small"))


def test_peft_adapter_is_read_as_peft_saved_it(tmp_path):
  """An adapter PEFT itself made and saved (its `[2P, E]` seq2seq table) reads as its first P rows,
  with the base model's name."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)).save_pretrained(
          tmp_path / "tiny-t5")
  base = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "tiny-t5")
  peft_model = peft.get_peft_model(base, peft.PromptTuningConfig(
      task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
  table = peft_model.prompt_encoder["default"].embedding.weight.detach().numpy().copy()
  peft_model.save_pretrained(tmp_path / "adapter")

  prompt, entry = prompt_library.read_prompt(str(tmp_path / "adapter"))
  np.testing.assert_array_equal(prompt, table[:3])
  assert (entry.prompt_length, entry.embed_dim, entry.model) == (
      3, 8, {"name": str(tmp_path / "tiny-t5")})


def test_unknown_paths_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="No prompt at"):
    prompt_library.read_prompt(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="holds no prompt"):
    prompt_library.read_prompt(str(tmp_path))


def test_training_publishes_its_final_prompt_once(published_run):
  model_dir, library = published_run
  [entry] = prompt_library.entries(str(library))
  final = np.load(model_dir / "numpy_checkpoints" / "checkpoint_3" / "encoder.prompt.prompt.prompt")
  np.testing.assert_array_equal(prompt_library.load_prompt(str(library), entry.name), final)
  assert (entry.name, entry.task, entry.steps, entry.source) == (TASK, TASK, 3, str(model_dir))
  assert (entry.prompt_length, entry.embed_dim) == (3, 4)
  assert entry.model["emb_dim"] == 4 and entry.model["vocab_size"] == 32128
  assert entry.model["checkpoint"] == str(CHECKPOINT)


def test_another_run_of_the_task_gets_its_own_entry(tmp_path):
  """Entries are named for the task, then `task.2`, ...; a finished run started again (same
  MODEL_DIR, step and prompt) is not published twice."""
  library = str(tmp_path / "library")
  prompt = np.ones((3, 4), np.float32)
  summary = {"model_dir": "/runs/a", "final_step": 5, "prompt": prompt,
             "eval": {5: {TASK: {"accuracy": 75.0, "per_class": [1.0, 0.5]}}}}
  first = prompt_library.publish_run(library, summary, TASK, TINY, None)
  assert prompt_library.publish_run(library, summary, TASK, TINY, None) == first
  second = prompt_library.publish_run(library, {**summary, "model_dir": "/runs/b"}, TASK, TINY,
                                      None)
  assert (first.name, second.name) == (TASK, f"{TASK}.2")
  assert first.metrics == {f"{TASK}/accuracy": 75.0}
  assert [entry.name for entry in prompt_library.entries(library)] == [TASK, f"{TASK}.2"]
  with pytest.raises(ValueError, match="trained no prompt"):  # e.g. a LoRA run
    prompt_library.publish_run(library, {**summary, "prompt": None}, TASK, TINY, None)


def test_a_run_s_prompt_reads_with_its_model(published_run):
  model_dir, library = published_run
  [entry] = prompt_library.entries(str(library))
  for path in (model_dir, model_dir / "numpy_checkpoints" / "checkpoint_3",
               model_dir / "numpy_checkpoints" / "checkpoint_3" / "encoder.prompt.prompt.prompt",
               library / entry.name):
    prompt, described = prompt_library.read_prompt(str(path))
    np.testing.assert_array_equal(prompt, prompt_library.load_prompt(str(library), entry.name))
    assert (described.task, described.steps) == (TASK, 3), path
    assert {key: described.model[key] for key in prompt_library.ARCHITECTURE_FIELDS} == {
        key: entry.model[key] for key in prompt_library.ARCHITECTURE_FIELDS}, path


def test_a_bad_library_stops_the_run_before_it_writes(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  with pytest.raises(SystemExit) as exit_info:
    train.main(run_flags(tmp_path / "run", tmp_path / "file"))
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error.startswith("error: train.publish_to=") and "is a file, not a folder" in error
  assert not (tmp_path / "run").exists()
