"""The methods beyond prompt tuning (`methods.py`, `adapters.py`): each trains through the command
line on the bundled checkpoint, what each adds computes what it should, and the parameter counts.

PEFT's LoRA, IA3 and prefix tuning are matched against PEFT in tests/test_peft_adapters.py.
"""
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from conftest import SHARED

from prompt_tuning_jax import (checkpoints, cli, config, demo, methods, network, prompts,
                               run_checkpoints, train, trees)
from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax.tasks import common as task_common
from prompt_tuning_jax.tasks import sources

# Each methods/*.gin file but multitask_prompt's, which needs a mixture (its own test below).
GIN_METHODS = ("model_tuning", "prefix_tuning", "per_layer_prompt", "residual_prompt", "ia3", "lora",
               "prompt_tuning")
TOKENS = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
TINY = config.t5_config("t5_1_1", "tiny")
DECODER_INPUTS = jnp.array([[0, 3, 4], [0, 5, 1]])
TARGETS = jnp.array([[3, 4, 1], [5, 1, 0]])


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


def flags(model_dir, method, run_file="runs/prompt_finetune.gin", **macros):
  values = {"MIXTURE_OR_TASK_NAME": "'taskless_super_glue_rte_v102'",
            "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 4}",
            "INITIAL_CHECKPOINT_PATH": repr(demo.DEMO_CHECKPOINT),
            "DATA_DIR": repr(demo.DEMO_DATA_DIR), "BATCH_SIZE": "2", "PROMPT_LENGTH": "4",
            "methods.prefix_tuning.hidden": "8", "RESIDUAL_HIDDEN": "8"}
  if run_file == "runs/prompt_finetune.gin":
    values.update(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS="3", EVAL_PERIOD="0",
                  CHECKPOINT_PERIOD="3")
  values.update(macros)
  return ([f"--gin_file={demo.DEMO_MODEL_GIN}", f"--gin_file={run_file}",
           f"--gin_file=methods/{method}.gin"]
          + [f"--gin.{name}={value}" for name, value in values.items()])


def expected_paths(method: methods.Method, model_config: config.T5Config) -> set[str]:
  """The parameters `method` trains on `model_config` with a 4-token prompt."""
  model = methods.build_model(method, model_config, method.prompt_config(
      4, prompts.prompt_initializers.random_uniform()))
  shapes = methods.param_shapes(model)
  return {p for p in shapes if any(re.fullmatch(r, p) for r in method.trainable_patterns)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """`trained(name)`: the MODEL_DIR of a 3-step run of `methods/{name}.gin`, run once a module."""
  model_dirs = {}

  def model_dir(name):
    if name not in model_dirs:
      model_dirs[name] = tmp_path_factory.mktemp("methods") / name
      train.main(flags(model_dirs[name], name))
      gin.clear_config()
    return model_dirs[name]
  return model_dir


@pytest.mark.parametrize("name", GIN_METHODS)
def test_each_method_trains_three_steps_through_the_command_line(trained, name):
  model_dir = trained(name)
  assert (model_dir / "checkpoints" / "3").is_dir()  # the resume checkpoint
  saved = sorted(os.listdir(model_dir / "numpy_checkpoints" / "checkpoint_3"))
  model_config = cli.model_settings([demo.DEMO_MODEL_GIN], [])["MODEL_CONFIG"]
  method = methods.METHODS[name]()
  if name == "prefix_tuning":
    method = methods.prefix_tuning(hidden=8)
  if name == "residual_prompt":
    method = methods.residual_prompt(hidden=8)
  assert saved == sorted(run_checkpoints.numpy_file_name(p)
                         for p in expected_paths(method, model_config))
  if method.folded() != method:  # the folded parameters, what the plain method reads
    folded = sorted(os.listdir(model_dir / "folded" / "checkpoint_3"))
    assert folded == sorted(run_checkpoints.numpy_file_name(p)
                            for p in expected_paths(method.folded(), model_config))


@pytest.mark.parametrize("name,directory", [("lora", "numpy_checkpoints"),
                                            ("residual_prompt", "folded")])
def test_eval_reads_a_methods_trained_parameters(trained, tmp_path, name, directory):
  model_dir = trained(name)
  params_dir = repr(str(model_dir / directory / "checkpoint_3"))
  eval_lib.main(flags(model_dir, name, "runs/prompt_eval.gin", PROMPT_FILE=params_dir,
                      EVAL_OUTPUT_DIR=repr(str(tmp_path / "eval")), EVAL_NUM_EXAMPLES="4"))
  with open(tmp_path / "eval" / "metrics.json") as f:
    assert 0 <= json.load(f)["taskless_super_glue_rte_v102"]["accuracy"] <= 100


def test_eval_refuses_parameters_of_another_method(trained, tmp_path, capsys):
  model_dir = trained("ia3")
  with pytest.raises(SystemExit):
    eval_lib.main(flags(model_dir, "lora", "runs/prompt_eval.gin",
                        PROMPT_FILE=repr(str(model_dir / "numpy_checkpoints" / "checkpoint_3")),
                        EVAL_OUTPUT_DIR=repr(str(tmp_path / "eval"))))
  assert "does not hold the trained parameters of lora" in capsys.readouterr().err


def test_param_counts_of_t5_1_1_xxl():
  """The issue's hand counts: every weight of T5 1.1 XXL, and 100 x 4096 for the prompt; every
  other method strictly between."""
  result = subprocess.run(
      [sys.executable, "-m", "prompt_tuning_jax.plan", "--param_counts", "--json",
       "--gin_file=models/t5_1_1_xxl_prompt.gin"], capture_output=True, text=True, check=True)
  counts = json.loads(result.stdout)["param_counts"]
  assert counts["model_tuning"] == 11_135_332_352
  assert counts["prompt_tuning"] == 409_600
  others = {k: v for k, v in counts.items() if k not in ("model_tuning", "prompt_tuning")}
  assert set(others) == set(methods.METHODS) - {"model_tuning", "prompt_tuning"}
  assert all(409_600 < v < 11_135_332_352 for v in others.values()), others


# What each method adds computes what it should, under jax.jit, on the tiny T5.


def logits(model, params):
  return jax.jit(model.apply)({"params": params}, TOKENS, DECODER_INPUTS, TARGETS)


def init(model, seed=0):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), TOKENS, DECODER_INPUTS,
                                           TARGETS)["params"])


def without(params, *words):
  return trees.unflatten({k: v for k, v in trees.flatten(params).items()
                          if not any(w in k for w in words)})


@pytest.mark.parametrize("method", [methods.lora(rank=2, targets=("query", "value", "wi_0", "wo")),
                                    methods.ia3()])
def test_lora_and_ia3_start_from_the_frozen_model(method):
  """LoRA's B is zero and IA3's scales are one at initialisation: the frozen model's logits."""
  plain = network.T5(TINY)
  params = init(methods.build_model(method, TINY, None))
  np.testing.assert_allclose(logits(methods.build_model(method, TINY, None), params),
                             logits(plain, without(params, "lora_", "ia3_")), rtol=1e-5, atol=1e-5)


def test_lora_adds_its_low_rank_product_to_the_kernel():
  """A trained LoRA equals the plain model whose kernel is `kernel + A B alpha / rank`."""
  method = methods.lora(rank=2, alpha=6.0, targets=("value",))
  params = trees.flatten(init(methods.build_model(method, TINY, None)))
  rng = np.random.default_rng(0)
  merged = {}
  for path, value in params.items():
    if path.endswith("lora_b"):
      params[path] = rng.normal(size=value.shape).astype(np.float32)
  for path, value in params.items():
    if path.endswith("/kernel") and path[:-len("kernel")] + "lora_a" in params:
      base = path[:-len("kernel")]
      merged[path] = value + params[base + "lora_a"] @ params[base + "lora_b"] * 3.0
    elif "lora_" not in path:
      merged[path] = value
  np.testing.assert_allclose(logits(methods.build_model(method, TINY, None), trees.unflatten(params)),
                             logits(network.T5(TINY), trees.unflatten(merged)), rtol=2e-4, atol=2e-4)


def test_ia3_on_feedforward_scales_the_input_of_wo():
  """IA3 on `wo` equals the plain model whose `wo` rows are scaled."""
  method = methods.ia3(targets=("wo",), feedforward=("wo",))
  params = trees.flatten(init(methods.build_model(method, TINY, None)))
  rng = np.random.default_rng(1)
  plain = {}
  for path in list(params):
    if path.endswith("ia3_scale"):
      params[path] = rng.uniform(0.5, 1.5, params[path].shape).astype(np.float32)
  for path, value in params.items():
    if path.endswith("wo/kernel"):
      plain[path] = value * params[path[:-len("kernel")] + "ia3_scale"][:, None]
    elif "ia3_" not in path:
      plain[path] = value
  np.testing.assert_allclose(logits(methods.build_model(method, TINY, None), trees.unflatten(params)),
                             logits(network.T5(TINY), trees.unflatten(plain)), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("method", [
    methods.prefix_tuning(length=3, hidden=5),
    methods.prefix_tuning(length=3, stacks=("decoder",), position_bias="before", hidden=5),
    methods.residual_prompt(hidden=6)])
def test_folding_keeps_the_logits(method):
  """`Method.fold` turns the training-time MLP into what the folded method's model reads."""
  prompt_config = method.prompt_config(4, prompts.prompt_initializers.random_uniform())
  model = methods.build_model(method, TINY, prompt_config)
  params = init(model)
  trainable = {k: np.asarray(v) for k, v in trees.flatten(params).items()
               if "prefix" in k or k.startswith("encoder/prompt/")}
  frozen = {k: v for k, v in trees.flatten(params).items() if k not in trainable}
  folded = method.fold(trainable, TINY)
  folded_model = methods.build_model(method.folded(), TINY, method.folded().prompt_config(
      4, prompts.prompt_initializers.random_uniform()))
  assert set(methods.param_shapes(folded_model)) == set(frozen) | set(folded)
  np.testing.assert_allclose(logits(folded_model, trees.unflatten({**frozen, **folded})),
                             logits(model, params), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [
    methods.per_layer_prompt("replace"), methods.per_layer_prompt("add"),
    methods.prefix_tuning(length=3, position_bias="before"), methods.lora(rank=2), methods.ia3()])
def test_scanned_layers_compute_the_same(method):
  """`ExecutionConfig.scan_layers` stacks the method's per-layer parameters like the rest."""
  prompt_config = method.prompt_config(4, prompts.prompt_initializers.random_uniform())
  model = methods.build_model(method, TINY, prompt_config)
  params = trees.flatten(init(model))
  scanned = methods.build_model(method, TINY, prompt_config, config.ExecutionConfig(scan_layers=True))
  stacked = checkpoints.stack_layers(params, scan_layers=True)
  np.testing.assert_allclose(logits(scanned, trees.unflatten(stacked)),
                             logits(model, trees.unflatten(params)), rtol=1e-5, atol=1e-5)


def test_layer_prompts_added_as_zeros_change_nothing_and_replacing_does():
  prompt_config = prompts.PromptConfig(4)
  plain = network.T5(TINY, prompt_config)
  add = methods.build_model(methods.per_layer_prompt("add"), TINY, prompt_config)
  params = init(add)
  zeros = trees.flatten(params)
  zeros["encoder/layer_prompts/prompt"] = np.zeros_like(zeros["encoder/layer_prompts/prompt"])
  np.testing.assert_allclose(logits(add, trees.unflatten(zeros)),
                             logits(plain, without(params, "layer_prompts")), rtol=1e-5, atol=1e-5)
  replace = methods.build_model(methods.per_layer_prompt("replace"), TINY, prompt_config)
  assert not np.allclose(logits(replace, params), logits(plain, without(params, "layer_prompts")))


def test_prefix_positions_before_the_sequence_get_relative_position_biases():
  """`position_bias="before"` gives the prefix T5's bias of the positions right before the
  sequence; `"none"` gives it none; the two differ only through that bias."""
  before = methods.build_model(methods.prefix_tuning(3, position_bias="before"), TINY, None)
  none = methods.build_model(methods.prefix_tuning(3), TINY, None)
  params = init(before)
  assert set(trees.flatten(params)) == set(trees.flatten(init(none)))
  assert not np.allclose(logits(before, params), logits(none, params))
  table = trees.flatten(params)
  for stack in ("encoder", "decoder"):
    table[f"{stack}/relpos_bias/rel_embedding"] = np.zeros_like(
        table[f"{stack}/relpos_bias/rel_embedding"])
  np.testing.assert_allclose(logits(before, trees.unflatten(table)),
                             logits(none, trees.unflatten(table)), rtol=1e-5, atol=1e-5)


def test_bad_method_settings_name_the_fix():
  with pytest.raises(ValueError, match="Lora.rank must be a positive integer"):
    methods.lora(rank=0)
  with pytest.raises(ValueError, match="name projections among"):
    methods.lora(targets=("q",))
  with pytest.raises(ValueError, match="Prefix.stacks"):
    methods.prefix_tuning(stacks=("middle",))
  with pytest.raises(ValueError, match="LayerPrompts.combine"):
    methods.per_layer_prompt("concat")
  with pytest.raises(ValueError, match="IA3.feedforward"):
    methods.ia3(targets=("key",), feedforward=("wo",))


SHARED_DATA = str(SHARED / "data")


@pytest.fixture
def two_task_mixture(monkeypatch, shared_dir):
  """RTE and CB from the shared SuperGLUE files, as one mixture."""
  del shared_dir  # skips the test where ../shared is missing
  monkeypatch.setenv(sources.DATA_DIR_ENV, SHARED_DATA)
  task_common.add_mixture("test_rte_and_cb", ["taskless_super_glue_rte_v102",
                                              "taskless_super_glue_cb_v102"], default_rate=1.0)
  return "test_rte_and_cb"


def test_a_task_indexed_mixture_puts_each_examples_task_token_first(two_task_mixture):
  name, task_names, first_token = task_common.task_indexed_mixture(two_task_mixture)
  assert task_names == ["taskless_super_glue_cb_v102", "taskless_super_glue_rte_v102"]
  assert first_token == 32099  # <extra_id_0>
  lengths = {"inputs": 64, "targets": 8}
  for index, task in enumerate(task_names):
    original = next(seqio.get_mixture_or_task(task).get_dataset(
        lengths, split="validation", shuffle=False).as_numpy_iterator())
    indexed = next(seqio.get_mixture_or_task(f"{task}_as_task_{index}_of_{two_task_mixture}")
                   .get_dataset(lengths, split="validation", shuffle=False).as_numpy_iterator())
    assert indexed["inputs"][0] == first_token - index
    np.testing.assert_array_equal(indexed["inputs"][1:len(original["inputs"])],
                                  original["inputs"][:len(indexed["inputs"]) - 1][:-1])
    np.testing.assert_array_equal(indexed["targets"], original["targets"])


@pytest.mark.parametrize("combine", ["add", "concat", "project"])
def test_a_multitask_prompt_is_its_tasks_folded_bank(combine):
  """Reading the task from the first token and combining the shared prompt with the task's equals
  the prompt bank of `fold_multitask` given each row's task and the input without that token."""
  method = methods.multitask_prompt(combine, task_length=2 if combine == "concat" else None)
  method = method.for_tasks(3, first_task_token=30)
  model = methods.build_model(method, TINY, method.prompt_config(
      4, prompts.prompt_initializers.random_uniform()))
  tagged = jnp.concatenate([jnp.array([[30], [28]]), TOKENS], axis=1)  # tasks 0 and 2
  params = init(model)
  flat = trees.flatten(params)
  if combine == "project":  # away from the identity, so that the tasks differ
    flat = {k: v + 0.1 * np.random.default_rng(2).normal(size=v.shape).astype(np.float32)
            if "projection" in k else v for k, v in flat.items()}
    params = trees.unflatten(flat)
  bank = prompts.fold_multitask(trees.unflatten(
      {k[len("encoder/prompt/"):]: v for k, v in flat.items() if k.startswith("encoder/prompt/")}),
      method.multitask())
  assert bank.shape == (3, 6 if combine == "concat" else 4, TINY.emb_dim)
  bank_model = network.T5(TINY, prompts.PromptConfig(bank.shape[1], bank_size=3))
  bank_params = {k: v for k, v in flat.items() if not k.startswith("encoder/prompt/")}
  bank_params[checkpoints.PROMPT_PATH] = bank
  expected = jax.jit(bank_model.apply)({"params": trees.unflatten(bank_params)}, TOKENS,
                                       DECODER_INPUTS, TARGETS, prompt_ids=jnp.array([0, 2]))
  actual = jax.jit(model.apply)({"params": params}, tagged, DECODER_INPUTS, TARGETS)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_multitask_prompt_trains_on_a_mixture_and_writes_each_tasks_prompt(tmp_path,
                                                                          two_task_mixture):
  model_dir = tmp_path / "multitask"
  train.main(flags(model_dir, "multitask_prompt", MIXTURE_OR_TASK_NAME=repr(two_task_mixture),
                   DATA_DIR=repr(SHARED_DATA)))
  assert (model_dir / "checkpoints" / "3").is_dir()
  assert sorted(os.listdir(model_dir / "numpy_checkpoints" / "checkpoint_3")) == [
      "encoder.prompt.prompt.prompt", "encoder.prompt.shared.prompt"]
  shared = np.load(model_dir / "numpy_checkpoints" / "checkpoint_3" / "encoder.prompt.shared.prompt")
  tasks = np.load(model_dir / "numpy_checkpoints" / "checkpoint_3" / "encoder.prompt.prompt.prompt")
  assert tasks.shape == (2,) + shared.shape
  for index, task in enumerate(["taskless_super_glue_cb_v102", "taskless_super_glue_rte_v102"]):
    np.testing.assert_allclose(np.load(model_dir / "task_prompts" / f"{task}.npy"),
                               shared + tasks[index], rtol=1e-6)
  eval_lib.main(flags(model_dir, "multitask_prompt", "runs/prompt_eval.gin",
                      MIXTURE_OR_TASK_NAME=repr(two_task_mixture),
                      DATA_DIR=repr(SHARED_DATA),
                      PROMPT_FILE=repr(str(model_dir / "numpy_checkpoints" / "checkpoint_3")),
                      EVAL_OUTPUT_DIR=repr(str(tmp_path / "eval")), EVAL_NUM_EXAMPLES="4"))
  with open(tmp_path / "eval" / "metrics.json") as f:
    assert len(json.load(f)) == 2  # each task's metrics
