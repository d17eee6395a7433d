"""Decoder-only prompt tuning through the command line: `models/llama_prompt.gin` and
`models/gemma_prompt.gin` on tiny random Llama and Gemma 3 checkpoints written by transformers'
`save_pretrained`, a seqio task through seqio's PrefixLM feature converter, training, a resume
checkpoint, resuming, evaluation during training and `eval`/`infer` on the trained prompt."""
import functools
import json
import os

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from prompt_tuning_jax import architectures, cli, hf_causal_lm, train
from prompt_tuning_jax import eval as eval_lib
from prompt_tuning_jax import infer as infer_lib
from prompt_tuning_jax.tasks import common as task_common

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_causal_reference import random_causal_lm  # noqa: E402  (needs torch)

TASK = "tiny_causal_lm_greater_than"
# seqio's byte vocabulary (pad 0, EOS 1, unk 2, bytes 3..258); the models' BOS is id 259, a token
# the vocabulary never writes.
VOCABULARY = seqio.ByteVocabulary()
SPECIAL_TOKENS = dict(vocab_size=260, bos_token_id=259, eos_token_id=1, pad_token_id=0)
PROMPT_NAME = "decoder.prompt.prompt.prompt"
MODEL_FILES = {"llama": "models/llama_prompt.gin", "gemma3": "models/gemma_prompt.gin"}


def _examples(split):
  rng = np.random.default_rng({"train": 0, "validation": 1}[split])
  pairs = rng.integers(0, 10, (16, 2))
  return tf.data.Dataset.from_tensor_slices({
      "inputs": [f"{a} > {b} ?" for a, b in pairs],
      "targets": ["yes" if a > b else "no" for a, b in pairs]})


def _accuracy(targets, predictions):
  return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


@pytest.fixture(scope="module", autouse=True)
def task():
  """A yes/no task in the byte vocabulary, registered for this module."""
  source = seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: _examples(split),
                                    splits=["train", "validation"])
  task_common.add_task(TASK, source, [], metric_fns=[_accuracy], vocabulary=VOCABULARY)
  yield
  seqio.TaskRegistry.remove(TASK)


@pytest.fixture(autouse=True)
def clear_gin():
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """`checkpoint(family)`: the directory of a tiny random model of the byte vocabulary."""
  paths = {}

  def get(family):
    if family not in paths:
      paths[family] = tmp_path_factory.mktemp(family)
      random_causal_lm(family, seed=5, **SPECIAL_TOKENS).save_pretrained(paths[family])
    return str(paths[family])
  return get


def _flags(family, checkpoint_path, run_file, **macros):
  values = {"MIXTURE_OR_TASK_NAME": repr(TASK),
            "TASK_FEATURE_LENGTHS": "{'inputs': 12, 'targets': 4}",
            "INITIAL_CHECKPOINT_PATH": repr(checkpoint_path), "BATCH_SIZE": "4",
            "PROMPT_LENGTH": "3", **macros}
  return [f"--gin_file={MODEL_FILES[family]}", f"--gin_file={run_file}"] + [
      f"--gin.{name}={value}" for name, value in values.items()]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def resumed_run(request, checkpoint, tmp_path_factory):
  """(family, checkpoint, MODEL_DIR, the first run's summary, the resumed run's): 2 steps, then
  resumed to 3 with an evaluation at step 3, through `python -m prompt_tuning_jax.train`'s main."""
  family = request.param
  path = checkpoint(family)
  model_dir = str(tmp_path_factory.mktemp(f"{family}_run") / "run")
  flags = lambda **macros: _flags(family, path, "runs/prompt_finetune.gin",
                                  MODEL_DIR=repr(model_dir), CHECKPOINT_PERIOD="2",
                                  **{"EvalConfig.num_examples": "4", **macros})
  summaries = []
  entry = cli.ENTRY_POINTS["train"]

  @functools.wraps(entry)
  def recording_train(**kwargs):
    summaries.append(entry(**kwargs))
    return summaries[-1]

  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(cli.ENTRY_POINTS, "train", recording_train)
    train.main(flags(TRAIN_STEPS="2", EVAL_PERIOD="0"))
    gin.clear_config()
    train.main(flags(TRAIN_STEPS="3", EVAL_PERIOD="3"))
    gin.clear_config()
  return (family, path, model_dir, *summaries)


def _prompt(model_dir, step):
  return np.load(os.path.join(model_dir, "numpy_checkpoints", f"checkpoint_{step}", PROMPT_NAME))


def test_cli_trains_resumes_and_evaluates_a_decoder_prompt(resumed_run):
  family, path, model_dir, first, resumed = resumed_run
  assert (first["start_step"], first["final_step"]) == (0, 2)
  assert (resumed["start_step"], resumed["final_step"]) == (2, 3)
  assert os.path.isdir(os.path.join(model_dir, "checkpoints", "3"))
  recorded = json.load(open(os.path.join(model_dir, "run_config.json")))
  assert recorded["trainable_patterns"] == ["decoder/prompt/.*"]
  assert recorded["model_config"]["family"] == hf_causal_lm.read_config(path).family
  assert recorded["prompt_combine"] == "prefix_after_bos"
  # The prompt learned, step by step; nothing else did (the checkpoint holds no prompt).
  prompts = [_prompt(model_dir, step) for step in (2, 3)]
  assert prompts[0].shape == (3, 16) and np.abs(prompts[1] - prompts[0]).max() > 0
  np.testing.assert_array_equal(resumed["prompt"], prompts[1])
  # Evaluation during training: decoded predictions scored by the task, the loss on targets.
  assert 0.0 <= resumed["eval"][3][TASK]["accuracy"] <= 100.0
  rows = [json.loads(line) for line in open(os.path.join(model_dir, "train_metrics.jsonl"))]
  losses = [row for row in rows if row["kind"] == "eval"]
  assert len(losses) == 1 and losses[0]["loss_per_token"] > 0


def test_eval_and_infer_read_the_trained_prompt(resumed_run, tmp_path):
  family, path, model_dir, _, resumed = resumed_run
  prompt_file = os.path.join(model_dir, "numpy_checkpoints", "checkpoint_3", PROMPT_NAME)
  common = dict(PROMPT_FILE=repr(prompt_file), BATCH_SIZE="4")
  eval_lib.main(_flags(family, path, "runs/prompt_eval.gin", **common,
                       EVAL_OUTPUT_DIR=repr(str(tmp_path / "eval")), EVAL_NUM_EXAMPLES="4"))
  # The same prompt on the same examples: the training run's evaluation.
  results = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert results[TASK]["accuracy"] == resumed["eval"][3][TASK]["accuracy"]
  gin.clear_config()
  if family != "llama":
    return  # infer decodes as eval does; once is enough
  infer_lib.main(_flags(family, path, "runs/prompt_infer.gin", **common,
                        INFER_OUTPUT_DIR=repr(str(tmp_path / "infer")), INFER_NUM_EXAMPLES="4"))
  rows = [json.loads(line) for line in open(tmp_path / "infer" / f"{TASK}-validation.jsonl")]
  assert len(rows) == 4 and all(set(row) >= {"inputs", "prediction", "targets"} for row in rows)


def test_the_model_file_names_the_other_family(checkpoint, tmp_path, capsys):
  argv = _flags("llama", checkpoint("gemma3"), "runs/prompt_finetune.gin",
                MODEL_DIR=repr(str(tmp_path / "run")), TRAIN_STEPS="1")
  with pytest.raises(SystemExit):
    train.main(argv)
  assert "use models/gemma_prompt.gin" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_decoding_continues_the_inputs_seqio_put_first():
  """seqio's own PrefixLM features (its docstring's example 2): `[BOS; inputs]` left-padded."""
  dataset = tf.data.Dataset.from_tensors({"inputs": tf.constant([9, 4, 6, 1]),
                                          "targets": tf.constant([3, 9, 1])})
  features = next(seqio.PrefixLMFeatureConverter(pack=False)(
      dataset, {"inputs": 10, "targets": 4}).as_numpy_iterator())
  np.testing.assert_array_equal(features["decoder_loss_weights"][:8], [0, 0, 0, 0, 1, 1, 1, 0])
  batch = {k: v[None] for k, v in features.items()}
  tokens, mask = jax.jit(architectures.left_padded_inputs, static_argnums=1)(batch, 7)
  np.testing.assert_array_equal(tokens[0], [0] * 9 + [7, 9, 4, 6, 1])
  np.testing.assert_array_equal(mask[0], np.arange(14) >= 9)
