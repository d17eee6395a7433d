"""SPoT's retrieval and warm start: the similarities against sums written out by hand, the real
`spot retrieve` command on a library of five prompts, the warm start's exact first prompt, the
refusals, and the whole recipe (`spot transfer`) on the bundled T5X checkpoint."""
import functools
import json
import pathlib
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import cli
from prompt_tuning_jax import config
from prompt_tuning_jax import demo
from prompt_tuning_jax import prompt_library
from prompt_tuning_jax import run_setup
from prompt_tuning_jax import spot

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
TINY = config.t5_config("t5_1_1", "tiny")
SOURCES = ("boolq", "cb", "mnli", "qqp", "squad")


def cosine(u, v):
  return sum(a * b for a, b in zip(u, v)) / (sum(a * a for a in u) ** 0.5
                                              * sum(b * b for b in v) ** 0.5)


def by_hand(source, target, measure):
  """SPoT's two measures written out with Python loops over the tokens."""
  source, target = source.tolist(), target.tolist()
  if measure == "average":
    mean = lambda rows: [sum(column) / len(rows) for column in zip(*rows)]
    return cosine(mean(source), mean(target))
  return sum(cosine(s, t) for s in source for t in target) / (len(source) * len(target))


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  """Five source prompts `[6, 32]` for the tiny T5 and a target that is `qqp`'s plus noise; returns
  (library, target file, {name: prompt})."""
  root = tmp_path_factory.mktemp("spot")
  rng = np.random.default_rng(29)
  prompts = {name: rng.normal(size=(6, 32)).astype(np.float32) for name in SOURCES}
  model = prompt_library.model_identity(TINY.replace(emb_dim=32))
  for name, prompt in prompts.items():
    prompt_library.publish(str(root / "library"), name, prompt, task=name, model=model, steps=100)
  target = prompts["qqp"] + 0.3 * rng.normal(size=(6, 32)).astype(np.float32)
  np.save(root / "target.npy", target)
  return root / "library", root / "target.npy", prompts


@pytest.mark.parametrize("measure", prompt_library.MEASURES)
def test_similarities_equal_sums_by_hand(measure):
  rng = np.random.default_rng(0)
  source, target = rng.normal(size=(4, 5)), rng.normal(size=(7, 5))  # SPoT compares any lengths
  assert prompt_library.similarity(source, target, measure) == pytest.approx(
      by_hand(source, target, measure), abs=1e-12)
  assert prompt_library.similarity(source, source, "average") == pytest.approx(1.0)
  assert prompt_library.similarity(source, -source, measure) == pytest.approx(
      -prompt_library.similarity(source, source, measure))


@pytest.mark.parametrize("measure", prompt_library.MEASURES)
def test_rank_orders_the_library_by_hand_computed_scores(library, measure):
  directory, target_file, prompts = library
  target = np.load(target_file)
  ranked = prompt_library.rank(str(directory), target, measure=measure)
  expected = sorted(((by_hand(prompts[name], target, measure), name) for name in SOURCES),
                    reverse=True)
  assert [(entry.name, score) for entry, score in ranked] == [
      (name, pytest.approx(score, abs=1e-6)) for score, name in expected]


def spot_command(*args):
  return subprocess.run([sys.executable, "-m", "prompt_tuning_jax.spot", *args],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)


def test_retrieve_ranks_the_perturbed_source_first(library):
  directory, target_file, prompts = library
  result = spot_command("retrieve", "--library", str(directory), "--target", str(target_file),
                        "--json")
  assert result.returncode == 0, result.stderr
  ranking = json.loads(result.stdout)
  assert [row["name"] for row in ranking][0] == "qqp"
  assert sorted(row["name"] for row in ranking) == sorted(SOURCES)
  target = np.load(target_file)
  for row in ranking:
    assert set(row) == {"name", "score"}
    assert row["score"] == pytest.approx(by_hand(prompts[row["name"]], target, "average"))
  assert [row["score"] for row in ranking] == sorted((row["score"] for row in ranking),
                                                     reverse=True)


def test_retrieve_per_token_and_top_k(library, capsys):
  directory, target_file, _ = library
  spot.main(["retrieve", "--library", str(directory), "--target", str(target_file), "--json",
             "--measure", "per_token", "--top_k", "2"])
  ranking = json.loads(capsys.readouterr().out)
  assert len(ranking) == 2 and ranking[0]["name"] == "qqp"


def test_another_width_is_refused_in_one_line(library, tmp_path, capsys):
  directory, _, _ = library
  np.save(tmp_path / "wide.npy", np.ones((6, 64), np.float32))
  with pytest.raises(SystemExit) as exit_info:
    spot.main(["retrieve", "--library", str(directory), "--target", str(tmp_path / "wide.npy")])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  [line] = captured.err.strip().splitlines()
  assert line.startswith("error: ") and "embed dim 32, the target's 64" in line


def test_another_architecture_is_refused(library, tmp_path):
  directory, _, prompts = library
  other = prompt_library.model_identity(TINY.replace(emb_dim=32, num_encoder_layers=4))
  prompt_library.publish(str(tmp_path), "target", prompts["qqp"], model=other)
  with pytest.raises(ValueError, match="num_encoder_layers 2, the target's 4"):
    spot.retrieve(str(directory), str(tmp_path / "target"))


def warm_start_prompt(library_dir, target, length, **kwargs):
  """The first prompt of a run initialised by `from_library`, built as `training.train` builds it
  (`run_setup.build_prompt_init`, then the initialiser under jit)."""
  factory = functools.partial(prompt_library.from_library, str(library_dir), str(target), **kwargs)
  init = run_setup.build_prompt_init(factory, np.zeros((8, 32), np.float32), vocabulary=None)
  return np.asarray(jax.jit(init, static_argnums=(1, 2))(jax.random.PRNGKey(0), (length, 32),
                                                         jnp.float32))


def test_warm_start_is_the_best_source_exactly(library):
  directory, target_file, prompts = library
  np.testing.assert_array_equal(warm_start_prompt(directory, target_file, 6), prompts["qqp"])


def test_warm_start_of_the_top_k_is_their_weighted_average(library):
  directory, target_file, prompts = library
  target = np.load(target_file)
  scores = sorted(((by_hand(prompts[name], target, "per_token"), name) for name in SOURCES),
                  reverse=True)[:2]
  assert all(score > 0 for score, _ in scores)
  expected = sum(score * prompts[name] for score, name in scores) / sum(s for s, _ in scores)
  np.testing.assert_allclose(
      warm_start_prompt(directory, target_file, 6, top_k=2, measure="per_token"), expected,
      rtol=1e-6, atol=1e-6)


def test_warm_start_refuses_another_length(library):
  directory, target_file, _ = library
  with pytest.raises(ValueError, match=r"the prompt is \(6, 32\) but the model wants \(5, 32\)"):
    warm_start_prompt(directory, target_file, 5)
  with pytest.raises(ValueError, match="top_k must be a positive integer"):
    warm_start_prompt(directory, target_file, 6, top_k=0)


def test_from_library_gin_file_gives_the_warm_start(library):
  directory, target_file, prompts = library
  settings = cli.train_settings(
      ["models/t5_1_1_tiny_prompt.gin", "prompts/from_library.gin", "runs/prompt_finetune.gin"],
      [f"PROMPT_LIBRARY = {str(directory)!r}", f"SPOT_TARGET = {str(target_file)!r}",
       "MODEL_DIR = '/tmp/unused'", f"MIXTURE_OR_TASK_NAME = {demo.TASK!r}",
       "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 4}", "INITIAL_CHECKPOINT_PATH = None",
       "PROMPT_LENGTH = 6"])
  init = run_setup.build_prompt_init(settings["prompt_init"], np.zeros((8, 32), np.float32), None)
  np.testing.assert_array_equal(init(None, (6, 32), jnp.float32), prompts["qqp"])


def test_the_recipe_runs_end_to_end_on_the_bundled_checkpoint(tmp_path, capsys):
  """`spot transfer` on the bundled T5X tiny checkpoint: a 2-step probe run on RTE, retrieval from
  a library of three prompts for its architecture, and a 2-step run from the warm start."""
  rng = np.random.default_rng(3)
  model = prompt_library.model_identity(config.t5_config("t5_1_1", "tiny"))
  library = tmp_path / "library"
  for name in ("cb", "copa", "wic"):
    prompt_library.publish(str(library), name, rng.normal(size=(3, 4)).astype(np.float32),
                           task=name, model=model)
  model_dir = tmp_path / "rte"
  spot.main([
      "transfer", "--library", str(library), "--model_dir", str(model_dir), "--probe_steps", "2",
      f"--gin_search_paths={REPO_ROOT / 'tests' / 'gin'}", "--gin_file=t5x_tiny.gin",
      "--gin_file=runs/prompt_finetune.gin", f"--gin.MIXTURE_OR_TASK_NAME={demo.TASK!r}",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4}",
      f"--gin.INITIAL_CHECKPOINT_PATH={demo.T5X_TEST_CHECKPOINT!r}",
      f"--gin.DATA_DIR={demo.DEMO_DATA_DIR!r}", "--gin.BATCH_SIZE=4", "--gin.TRAIN_STEPS=2",
      "--gin.EVAL_PERIOD=0"])
  out = capsys.readouterr().out
  retrieval = json.loads((model_dir / "spot" / "retrieval.json").read_text())
  probe = model_dir / "spot" / "probe"
  assert retrieval["ranking"] == spot.retrieve(str(library), str(probe))
  best = retrieval["ranking"][0]["name"]
  assert retrieval["warm_start"] == [{"name": best, "weight": 1.0}]
  np.testing.assert_array_equal(np.load(model_dir / "spot" / "init.npy"),
                                prompt_library.load_prompt(str(library), best))
  assert (probe / "numpy_checkpoints" / "checkpoint_2").is_dir()
  assert (model_dir / "numpy_checkpoints" / "checkpoint_2").is_dir()
  operative = " ".join((model_dir / "config.gin").read_text().replace("\\\n", " ").split())
  assert "PROMPT_INIT = @prompt_initializers.from_npy" in operative
  assert f"from_npy.path = '{model_dir / 'spot' / 'init.npy'}'" in operative
  assert f"Started from {best} (weight 1)" in out


def test_spot_source_tasks_read_tfds_features_from_local_files(tmp_path, monkeypatch):
  from prompt_tuning_jax import tasks  # pylint: disable=g-import-not-at-top
  rows = {"yelp_polarity_reviews": {"text": "Great tacos, slow service.", "label": 1},
          "hellaswag": {"context": "He opens the jar", "endings": ["a", "and eats.", "b", "c"],
                        "label": 1}}
  for name, row in rows.items():
    (tmp_path / "spot" / name).mkdir(parents=True)
    (tmp_path / "spot" / name / "validation.jsonl").write_text(json.dumps(row) + "\n")
  monkeypatch.setenv("PROMPT_TUNING_DATA_DIR", str(tmp_path))
  [yelp] = tasks.get_examples("spot_yelp_polarity_reviews_v020")
  assert (yelp["inputs_pretokenized"], yelp["targets_pretokenized"]) == (
      "yelp_polarity_reviews text: Great tacos, slow service.", "positive")
  [taskless] = tasks.get_examples("taskless_spot_yelp_polarity_reviews_v020")
  assert taskless["inputs_pretokenized"] == "text: Great tacos, slow service."
  [hellaswag] = tasks.get_examples("spot_rainbow_hellaswag_v110")
  assert (hellaswag["inputs_pretokenized"], hellaswag["targets_pretokenized"]) == (
      "hellaswag context: He opens the jar ending0: a ending1: and eats. ending2: b ending3: c",
      "ending1")


def test_spot_mixtures_hold_the_registered_tasks():
  import seqio  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import tasks  # pylint: disable=g-import-not-at-top
  mixture = seqio.get_mixture_or_task("taskless_spot_sentiment_v002")
  yelp = "taskless_spot_yelp_polarity_reviews_v020"
  assert sorted(task.name for task in mixture.tasks) == ["taskless_glue_sst2_v002", yelp]
  assert mixture.get_rate(seqio.get_mixture_or_task(yelp)) == 560_000.
  commonsense = seqio.get_mixture_or_task("spot_commonsense_v002")
  assert len(commonsense.tasks) == 5
  assert "spot_rainbow_cosmos_qa_v100" in {
      task.name for task in seqio.get_mixture_or_task("spot_reading_v002").tasks}
  assert set(tasks.spot.TASK_NAMES) <= set(seqio.TaskRegistry.names())


@pytest.mark.needs_shared(SHARED / "prompts")
def test_add_a_released_prompt_and_list_the_library(tmp_path, capsys):
  released = SHARED / "prompts" / "t5_1_1_lm100k_base" / "rte.npy"
  library = str(tmp_path / "library")
  spot.main(["add", "--library", library, "--name", "rte", "--prompt", str(released), "--task",
             "super_glue_rte_v102", "--model", "t5_1_1_lm100k_base"])
  spot.main(["list", "--library", library, "--json"])
  [row] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (row["name"], row["task"], row["prompt_length"], row["embed_dim"]) == (
      "rte", "super_glue_rte_v102", 100, 768)
  assert row["model"]["name"] == "t5_1_1_lm100k_base" and row["model"]["emb_dim"] == 768
  np.testing.assert_array_equal(prompt_library.load_prompt(library, "rte"), np.load(released))
  with pytest.raises(SystemExit) as exit_info:  # the small model's width is not the prompt's
    spot.main(["add", "--library", library, "--name", "small", "--prompt", str(released),
               "--model", "t5_1_1_lm100k_small"])
  assert exit_info.value.code == 2
  assert "emb_dim=512" in capsys.readouterr().err
