"""Run checkpoints: bit-identical resume, keep-last-K, numpy prompts, crashes, run config, best prompt."""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import (checkpoints, freezing, optimizers, run_checkpoints, trainer,
                               training, trees)
from prompt_tuning_jax.checkpoints import CheckpointError

PROMPT_FILE = "encoder.prompt.prompt.prompt"
T5X_CHECKPOINT = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
                  / "t5x_t5_1_1_tiny_flaxformer" / "checkpoint_3")


def make_state(seed: int = 0, steps: int = 2) -> trainer.TrainState:
  """A tiny TrainState ([3, 4] prompt) after `steps` Adafactor updates, so no state is trivial."""
  optimizer = optimizers.prompt_tuning_adafactor()
  prompt = jax.random.normal(jax.random.PRNGKey(seed), (3, 4))
  state = trainer.TrainState.create({"encoder": {"prompt": {"prompt": {"prompt": prompt}}}},
                                    optimizer, jax.random.PRNGKey(seed + 1))
  for i in range(steps):
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.1 * (i + 1)), state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    state = state.replace(step=state.step + 1, opt_state=opt_state,
                          trainable=jax.tree_util.tree_map(jnp.add, state.trainable, updates))
  return state


def prompt_of(state) -> np.ndarray:
  return np.asarray(state.trainable["encoder"]["prompt"]["prompt"]["prompt"])


def assert_identical(restored, expected):
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(expected)
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(expected)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture
def checkpointer(tmp_path):
  ckpt = run_checkpoints.RunCheckpointer(str(tmp_path), keep=2)
  yield ckpt
  ckpt.close()


def test_save_restore_is_bit_identical_with_the_optax_structure(tmp_path, checkpointer):
  state = make_state()
  checkpointer.save(2, state, {"examples_seen": 1234, "epoch": 0})
  for abstract in (jax.eval_shape(lambda: state), make_state(seed=7, steps=0)):
    restored, position = checkpointer.restore(abstract_state=abstract)
    assert_identical(restored, state)
    assert type(restored.opt_state) is type(state.opt_state)  # optax's named tuples, not dicts.
    assert position == {"examples_seen": 1234, "epoch": 0}
  # The numpy prompt: the official name, no suffix, loadable without pickle.
  numpy_file = tmp_path / "numpy_checkpoints" / "checkpoint_2" / PROMPT_FILE
  assert os.listdir(numpy_file.parent) == [PROMPT_FILE]
  np.testing.assert_array_equal(np.load(numpy_file, allow_pickle=False), prompt_of(state))


def test_keeps_the_last_k_and_all_numpy_prompts(tmp_path, checkpointer):
  states = {step: make_state(seed=step) for step in (1, 2, 3)}
  for step, state in states.items():
    checkpointer.save(step, state, {"examples_seen": step})
  assert checkpointer.all_steps() == [2, 3] and checkpointer.latest_step() == 3
  restored, position = checkpointer.restore(2, abstract_state=jax.eval_shape(lambda: states[2]))
  assert_identical(restored, states[2])
  assert position == {"examples_seen": 2}
  assert sorted(os.listdir(tmp_path / "numpy_checkpoints")) == [
      "checkpoint_1", "checkpoint_2", "checkpoint_3"]


def test_keep_numpy_keeps_the_newest_numpy_copies_and_restore_rewrites_a_kept_ones(tmp_path):
  checkpointer = run_checkpoints.RunCheckpointer(str(tmp_path), keep=2, keep_numpy=1)
  states = {step: make_state(seed=step) for step in (1, 2, 3)}
  for step, state in states.items():
    checkpointer.save(step, state, {"examples_seen": step})
  assert os.listdir(tmp_path / "numpy_checkpoints") == ["checkpoint_3"]
  restored, _ = checkpointer.restore(2, abstract_state=jax.eval_shape(lambda: states[2]))
  assert_identical(restored, states[2])
  np.testing.assert_array_equal(np.load(tmp_path / "numpy_checkpoints" / "checkpoint_2" / PROMPT_FILE),
                                prompt_of(states[2]))
  checkpointer.close()


def test_a_new_checkpointer_resumes_from_the_latest(tmp_path, checkpointer):
  state = make_state()
  checkpointer.save(5, state, {"examples_seen": 5})
  checkpointer.close()
  resumed = run_checkpoints.RunCheckpointer(str(tmp_path))
  restored, _ = resumed.restore(abstract_state=jax.eval_shape(lambda: state))
  assert_identical(restored, state)
  resumed.close()


def test_an_existing_step_is_never_overwritten(tmp_path, checkpointer):
  state = make_state()
  checkpointer.save(1, state, {"examples_seen": 1})
  before = (tmp_path / "numpy_checkpoints" / "checkpoint_1" / PROMPT_FILE).read_bytes()
  with pytest.raises(CheckpointError, match="never overwritten"):
    checkpointer.save(1, make_state(seed=3), {"examples_seen": 9})
  assert (tmp_path / "numpy_checkpoints" / "checkpoint_1" / PROMPT_FILE).read_bytes() == before
  _, position = checkpointer.restore(abstract_state=jax.eval_shape(lambda: state))
  assert position == {"examples_seen": 1}


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(tmp_path, checkpointer):
  state = make_state()
  checkpointer.save(1, state, {"examples_seen": 1})
  checkpointer.close()
  # What a kill during orbax's save of step 2 leaves: its temporary directory, never renamed.
  (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000000000" / "state").mkdir(parents=True)
  resumed = run_checkpoints.RunCheckpointer(str(tmp_path))
  assert resumed.latest_step() == 1
  restored, _ = resumed.restore(abstract_state=jax.eval_shape(lambda: state))
  assert_identical(restored, state)
  resumed.save(2, make_state(seed=2), {"examples_seen": 2})
  assert resumed.all_steps() == [1, 2]
  resumed.close()


def test_a_corrupt_or_missing_checkpoint_is_one_clear_error(tmp_path, checkpointer):
  abstract = jax.eval_shape(make_state)
  with pytest.raises(CheckpointError, match="No checkpoint to resume from"):
    checkpointer.restore(abstract_state=abstract)
  checkpointer.save(1, make_state(), {"examples_seen": 1})
  checkpointer.save(2, make_state(), {"examples_seen": 2})
  with pytest.raises(CheckpointError, match=r"No checkpoint of step 7 .* steps \[1, 2\]"):
    checkpointer.restore(7, abstract_state=abstract)
  for root, _, files in os.walk(tmp_path / "checkpoints" / "2"):
    for name in files:
      with open(os.path.join(root, name), "w") as f:
        f.write("garbage")
  with pytest.raises(CheckpointError, match=r"(?s)checkpoints/2 .*resume from step 1"):
    checkpointer.restore(2, abstract_state=abstract)


def test_run_config_is_recorded_and_a_different_run_is_refused(tmp_path):
  """`check_run_config` writes nothing; `record_run_config` writes the first start's settings, and
  a later start's changed mutable ones."""
  model_dir = str(tmp_path / "run")
  config = {"model": "t5_1_1_small", "prompt_length": 100, "train_steps": 1000}
  assert run_checkpoints.check_run_config(model_dir, config) == {}
  assert not (tmp_path / "run").exists()
  assert run_checkpoints.record_run_config(model_dir, config) == {}
  config_file = tmp_path / "run" / "run_config.json"
  written = config_file.read_bytes()
  assert json.loads(written) == config
  assert run_checkpoints.check_run_config(model_dir, dict(config)) == {}
  changed = dict(config, train_steps=2000)
  assert run_checkpoints.check_run_config(model_dir, changed, mutable_keys=("train_steps",)) == {
      "train_steps": (1000, 2000)}
  with pytest.raises(ValueError) as error:
    run_checkpoints.check_run_config(model_dir, dict(changed, prompt_length=20, task="rte"),
                                     mutable_keys=("train_steps",))
  message = str(error.value)
  assert "prompt_length: 100 in the run, 20 now" in message
  assert "task: '<absent>' in the run, 'rte' now" in message
  assert "train_steps" not in message.split("\n", 1)[1].split("Use a new")[0]
  assert "new MODEL_DIR" in message
  assert config_file.read_bytes() == written
  assert run_checkpoints.record_run_config(model_dir, changed, mutable_keys=("train_steps",)) == {
      "train_steps": (1000, 2000)}
  assert json.loads(config_file.read_text()) == changed
  assert os.listdir(tmp_path / "run") == ["run_config.json"]


@pytest.mark.parametrize("text", ["", "{garbled", "[1, 2]"])
def test_an_unreadable_run_config_is_named(tmp_path, text):
  (tmp_path / "run_config.json").write_text(text)
  with pytest.raises(ValueError, match=r"run_config.json is unreadable \(.*\); it records the run's "
                                       "settings"):
    run_checkpoints.check_run_config(str(tmp_path), {"a": 1})
  assert (tmp_path / "run_config.json").read_text() == text


def test_a_bad_best_json_is_a_warning_and_replaced_at_the_next_best(tmp_path, caplog,
                                                                     checkpointer):
  checkpointer.save_best_prompt(2, make_state().trainable, "accuracy", 90.0)
  best_dir = tmp_path / "best"
  (best_dir / "best.json").write_text("{garbled")
  run_checkpoints.check_best_metric(str(tmp_path), "accuracy")
  with caplog.at_level("WARNING", logger="prompt_tuning_jax"):
    reopened = run_checkpoints.RunCheckpointer(str(tmp_path))
  [warning] = [r.getMessage() for r in caplog.records if r.name == "prompt_tuning_jax"]
  assert f"{best_dir}/best.json is unreadable (" in warning and "\n" not in warning
  assert reopened.best_metric() is None
  assert reopened.save_best_prompt(4, make_state().trainable, "accuracy", 50.0)
  assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 4
  reopened.close()


def test_a_best_metric_other_than_the_runs_is_refused_before_anything_is_written(tmp_path,
                                                                                 checkpointer):
  checkpointer.save_best_prompt(2, make_state().trainable, "accuracy", 50.0)
  run_checkpoints.check_best_metric(str(tmp_path), "accuracy")
  run_checkpoints.check_best_metric(str(tmp_path), None)
  with pytest.raises(ValueError, match="chosen by 'accuracy', not 'f1'"):
    run_checkpoints.check_best_metric(str(tmp_path), "f1")


def test_retired_settings_of_a_recorded_run_are_ignored(tmp_path):
  recorded = {"model_config": {"emb_dim": 4, "remat_policy": "full"}, "seed": 0}
  (tmp_path / "run_config.json").write_text(json.dumps(recorded))
  now = {"model_config": {"emb_dim": 4}, "seed": 0}
  assert run_checkpoints.check_run_config(str(tmp_path), now,
                                          retired_keys=("model_config.remat_policy", "a.b")) == {}
  with pytest.raises(ValueError, match="model_config"):
    run_checkpoints.check_run_config(str(tmp_path), now)
  assert json.loads((tmp_path / "run_config.json").read_text()) == recorded


def test_a_run_recorded_before_execution_settings_and_grouped_settings_resumes(tmp_path,
                                                                               tiny_config):
  """`run_config.json` as train wrote it before `ExecutionConfig`, the grouped settings and the
  recorded optimizer: flat names, and the execution settings inside `model_config`. The settings
  recorded since are mutable, so it resumes."""
  identity = training._run_identity(  # pylint: disable=protected-access
      dataset_config=training.DatasetConfig("rte", {"inputs": 32, "targets": 4}, batch_size=4),
      train_steps=6, model_config=tiny_config, prompt_length=3, prompt_combine="prefix",
      initial_checkpoint_path=None, trainable_patterns=freezing.PROMPT_ONLY,
      loss_config=trainer.LossConfig(), num_microbatches=1, eval_config=training.EvalConfig(),
      checkpoint_config=training.CheckpointConfig(period=3), log_period=10, seed=0,
      skip_nonfinite_steps=False, max_skipped_steps=10, optimizer={"learning_rate": 0.3},
      optimizer_state=["FactoredState", "EmptyState"])
  recorded = {
      "mixture_or_task_name": "rte", "task_feature_lengths": {"inputs": 32, "targets": 4},
      "train_steps": 6, "batch_size": 4,
      "model_config": dict(identity["model_config"], remat_policy="none", attention_chunks=None),
      "prompt_length": 3, "prompt_combine": "prefix", "initial_checkpoint_path": None,
      "trainable_patterns": ["encoder/prompt/.*"], "loss_config": identity["loss_config"],
      "num_microbatches": 1, "eval_period": 0, "checkpoint_period": 3, "keep_checkpoints": 3,
      "log_period": 10, "eval_num_examples": None, "seed": 0, "skip_nonfinite_steps": False}
  (tmp_path / "run_config.json").write_text(json.dumps(recorded))
  check = lambda run_config: run_checkpoints.check_run_config(
      str(tmp_path), run_config, training.MUTABLE_RUN_SETTINGS, training.RETIRED_RUN_SETTINGS,
      training.NEW_RUN_SETTINGS)
  assert check(identity) == {"max_skipped_steps": ("<absent>", 10),
                             "optimizer": ("<absent>", {"learning_rate": 0.3}),
                             "optimizer_state": ("<absent>", ["FactoredState", "EmptyState"])}
  (tmp_path / "run_config.json").write_text(json.dumps(dict(recorded, optimizer_state=["A"])))
  with pytest.raises(ValueError, match=r"optimizer_state: \['A'\] in the run"):
    check(identity)
  (tmp_path / "run_config.json").write_text(json.dumps(recorded))
  with pytest.raises(ValueError, match="prompt_length: 3 in the run, 4 now"):
    check(dict(identity, prompt_length=4))


def test_run_config_refuses_checkpoints_without_a_config(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="no run_config.json"):
    run_checkpoints.check_run_config(str(tmp_path), {"a": 1})
  assert not (tmp_path / "run_config.json").exists()


def test_best_prompt_is_replaced_only_on_improvement(tmp_path, checkpointer):
  first, second, third = make_state(1), make_state(2), make_state(3)
  assert checkpointer.best_metric() is None
  assert checkpointer.save_best_prompt(10, first.trainable, "accuracy", 0.5)
  assert checkpointer.save_best_prompt(20, second.trainable, "accuracy", 0.7)
  assert not checkpointer.save_best_prompt(30, third.trainable, "accuracy", 0.6)
  assert not checkpointer.save_best_prompt(40, third.trainable, "accuracy", float("nan"))
  best = {"step": 20, "metric": "accuracy", "value": 0.7}
  assert checkpointer.best_metric() == best
  best_dir = tmp_path / "best"
  assert json.loads((best_dir / "best.json").read_text()) == best
  np.testing.assert_array_equal(np.load(best_dir / PROMPT_FILE, allow_pickle=False),
                                prompt_of(second))
  # Only the current best's directory is left; a new checkpointer reads it back.
  assert len([name for name in os.listdir(tmp_path) if name.startswith(".best-")]) == 1
  reopened = run_checkpoints.RunCheckpointer(str(tmp_path))
  assert reopened.best_metric() == best
  reopened.close()
  with pytest.raises(ValueError, match="one metric per run"):
    checkpointer.save_best_prompt(50, third.trainable, "loss", 0.1)


def test_best_prompt_lower_is_better(checkpointer):
  state = make_state()
  assert checkpointer.save_best_prompt(1, state.trainable, "loss", 2.0, higher_is_better=False)
  assert not checkpointer.save_best_prompt(2, state.trainable, "loss", 3.0, higher_is_better=False)
  assert checkpointer.save_best_prompt(3, state.trainable, "loss", 1.0, higher_is_better=False)
  assert checkpointer.best_metric()["step"] == 3


# Partial loading (`checkpoints.apply_assignment_map`), how a run starts from a T5X or HF checkpoint.


@pytest.mark.needs_shared(T5X_CHECKPOINT)
def test_assignment_map_on_the_real_t5x_checkpoint():
  config, params = checkpoints.load_checkpoint(str(T5X_CHECKPOINT))
  targets = checkpoints.param_shapes(config, prompt_length=3)
  loaded, missing = checkpoints.apply_assignment_map(
      params, targets, [(r"decoder/.*", None), (r"encoder/prompt/.*", None)])
  flat = trees.flatten(params)
  assert missing == sorted(name for name in targets
                           if name.startswith("decoder/") or name == checkpoints.PROMPT_PATH)
  assert sorted(loaded) == sorted(set(targets) - set(missing))
  for name, array in loaded.items():
    assert array is flat[name]
  with pytest.raises(CheckpointError, match="encoder/prompt/prompt/prompt: its source"):
    checkpoints.apply_assignment_map(params, targets, [(r"decoder/.*", None)])
  _, missing = checkpoints.apply_assignment_map(params, targets, [], fallback_to_scratch=True)
  assert missing == [checkpoints.PROMPT_PATH]


@pytest.mark.needs_shared(T5X_CHECKPOINT)
def test_load_frozen_params_starts_skipped_params_from_scratch():
  """Through `checkpoints.load_frozen_params`: the skipped decoder is `init_params`'s, the rest the
  checkpoint's; with `scan_layers`, the same stacked."""
  config, params = checkpoints.load_checkpoint(str(T5X_CHECKPOINT))
  rng = jax.random.PRNGKey(3)
  assignment_map = [(r"decoder/.*", None)]
  loaded = checkpoints.load_frozen_params(config, str(T5X_CHECKPOINT), assignment_map, rng)
  assert sorted(loaded) == sorted(checkpoints.param_shapes(config))
  fresh = checkpoints.init_params(config, rng)
  for name, array in loaded.items():
    source = fresh if name.startswith("decoder/") else trees.flatten(params)
    np.testing.assert_array_equal(np.asarray(array), np.asarray(source[name]), err_msg=name)
  stacked = checkpoints.load_frozen_params(config, str(T5X_CHECKPOINT), assignment_map, rng,
                                           scan_layers=True)
  expected = checkpoints.stack_layers(loaded, True)
  assert sorted(stacked) == sorted(expected)
  for name, array in expected.items():
    np.testing.assert_array_equal(np.asarray(stacked[name]), np.asarray(array), err_msg=name)


def test_init_params_in_the_checkpoint_layout_whole_or_any_subset(tiny_config):
  rng = jax.random.PRNGKey(0)
  full = checkpoints.init_params(tiny_config, rng)
  assert {name: x.shape for name, x in full.items()} == checkpoints.param_shapes(tiny_config)
  subset = ["encoder/layers_1/mlp/wo/kernel", "decoder/decoder_norm/scale", "token_embedder/embedding"]
  some = checkpoints.init_params(tiny_config, rng, subset)
  assert sorted(some) == sorted(subset)
  for name in some:
    np.testing.assert_array_equal(some[name], full[name], err_msg=name)
  name = "encoder/layers_{}/attention/query/kernel"
  assert not np.allclose(full[name.format(0)], full[name.format(1)])  # each layer its own draw
  assert 0.5 < np.std(full["token_embedder/embedding"]) < 2  # T5X's embedding init: stddev 1


def test_unstack_layers_inverts_stack_layers(tiny_config):
  flat = checkpoints.init_params(tiny_config, jax.random.PRNGKey(0))
  stacked = checkpoints.stack_layers(flat, True)
  assert stacked["encoder/layers/mlp/wo/kernel"].shape == (
      tiny_config.num_encoder_layers, tiny_config.mlp_dim, tiny_config.emb_dim)
  unstacked = checkpoints.unstack_layers(stacked)
  assert sorted(unstacked) == sorted(flat)
  for name, array in flat.items():
    np.testing.assert_array_equal(unstacked[name], array, err_msg=name)


def test_assignment_map_renames_with_groups_and_first_rule_wins():
  source = {"enc": {"block_0": {"w": np.zeros((2, 3))}, "block_1": {"w": np.ones((2, 3))}},
            "emb": np.full((4, 2), 2.0)}
  targets = {"encoder/layers_0/w": (2, 3), "encoder/layers_1/w": (2, 3), "emb": (4, 2),
             "head": (2,)}
  rules = [(r"encoder/layers_1/.*", None), (r"encoder/layers_(\d+)/(\w+)", r"enc/block_\1/\2"),
           (r"head", None)]
  loaded, missing = checkpoints.apply_assignment_map(source, targets, rules)
  assert missing == ["encoder/layers_1/w", "head"]
  assert sorted(loaded) == ["emb", "encoder/layers_0/w"]
  assert loaded["encoder/layers_0/w"] is source["enc"]["block_0"]["w"]


def test_assignment_map_errors_name_the_path_and_shapes():
  source = {"a/w": np.zeros((2, 3))}
  with pytest.raises(CheckpointError, match=r"b/w: the checkpoint's a/w has shape \(2, 3\) but "
                                            r"the model expects \(3, 2\)"):
    checkpoints.apply_assignment_map(source, {"b/w": (3, 2)}, [(r"b/(.*)", r"a/\1")])
  with pytest.raises(CheckpointError, match="match no parameter"):
    checkpoints.apply_assignment_map(source, {"a/w": (2, 3)}, [(r"decoder/.*", None)])
