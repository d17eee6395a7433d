"""`extract_variable`: one variable of a T5X checkpoint or of a run checkpoint to `.npy`."""
import pathlib

import jax
import numpy as np
import pytest

from prompt_tuning_jax import (checkpoints, extract_variable, optimizers, run_checkpoints, trainer,
                               trees)

T5X_CHECKPOINT = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
                  / "t5x_t5_1_1_tiny_flaxformer" / "checkpoint_3")
needs_t5x = pytest.mark.needs_shared(T5X_CHECKPOINT)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A MODEL_DIR with checkpoints at steps 1 and 2 of a [3, 4] prompt; returns (dir, states)."""
  model_dir = tmp_path_factory.mktemp("run")
  optimizer = optimizers.prompt_tuning_adafactor()
  states = {}
  checkpointer = run_checkpoints.RunCheckpointer(str(model_dir))
  for step in (1, 2):
    prompt = jax.random.normal(jax.random.PRNGKey(step), (3, 4))
    states[step] = trainer.TrainState.create(
        {"encoder": {"prompt": {"prompt": {"prompt": prompt}}}}, optimizer,
        jax.random.PRNGKey(0)).replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    checkpointer.save(step, states[step], {"examples_seen": step})
  checkpointer.close()
  return model_dir, states


@needs_t5x
def test_t5x_variable_equals_load_checkpoint(tmp_path):
  output = tmp_path / "embedding.npy"
  assert extract_variable.main(["--checkpoint", str(T5X_CHECKPOINT), "--variable",
                                "token_embedder.embedding", "--output", str(output)]) == 0
  _, params = checkpoints.load_checkpoint(str(T5X_CHECKPOINT))
  np.testing.assert_array_equal(np.load(output, allow_pickle=False),
                                params["token_embedder"]["embedding"])


@needs_t5x
def test_unknown_variable_lists_close_names_and_exits_2(tmp_path, capsys):
  output = tmp_path / "out.npy"
  assert extract_variable.main(["--checkpoint", str(T5X_CHECKPOINT), "--variable",
                                "encoder/layers_0/attention/querry/kernel",
                                "--output", str(output)]) == 2
  error = capsys.readouterr().err
  assert "encoder/layers_0/attention/query/kernel" in error and "Traceback" not in error
  assert not output.exists()


@pytest.mark.parametrize("where", ["model_dir", "step_dir"])
def test_run_checkpoint_prompt_and_step(run_dir, tmp_path, where):
  model_dir, states = run_dir
  step = 2 if where == "model_dir" else 1
  path = model_dir if where == "model_dir" else model_dir / "checkpoints" / "1"
  output = tmp_path / "prompt"  # Written as named: no `.npy` appended.
  assert extract_variable.main(["--checkpoint", str(path), "--variable",
                                "encoder.prompt.prompt.prompt", "--output", str(output)]) == 0
  np.testing.assert_array_equal(np.load(output, allow_pickle=False),
                                states[step].trainable["encoder"]["prompt"]["prompt"]["prompt"])
  assert extract_variable.read_variable(str(path), "step") == step
  v = extract_variable.read_variable(str(path), "opt_state/inner_state/0/v/encoder/prompt/prompt/"
                                                   "prompt")
  assert v.shape == (3, 4)


def test_refuses_to_overwrite_without_flag(run_dir, tmp_path, capsys):
  model_dir, states = run_dir
  output = tmp_path / "prompt.npy"
  output.write_bytes(b"keep me")
  args = ["--checkpoint", str(model_dir), "--variable", "encoder/prompt/prompt/prompt",
          "--output", str(output)]
  assert extract_variable.main(args) == 1
  assert "--overwrite" in capsys.readouterr().err
  assert output.read_bytes() == b"keep me"
  assert extract_variable.main(args + ["--overwrite"]) == 0
  np.testing.assert_array_equal(np.load(output, allow_pickle=False),
                                states[2].trainable["encoder"]["prompt"]["prompt"]["prompt"])


def test_missing_checkpoint_is_an_error_without_traceback(tmp_path, capsys):
  assert extract_variable.main(["--checkpoint", str(tmp_path / "nope"), "--variable", "x",
                                "--output", str(tmp_path / "x.npy")]) == 1
  assert "does not exist" in capsys.readouterr().err


def test_hugging_face_variable_equals_load_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=32, d_model=8, d_kv=4, num_heads=2, d_ff=12, num_layers=1,
      feed_forward_proj="gated-gelu", decoder_start_token_id=0))
  model.save_pretrained(tmp_path / "hf")
  output = tmp_path / "query.npy"
  name = "encoder/layers_0/attention/query/kernel"
  assert extract_variable.main(["--checkpoint", str(tmp_path / "hf"), "--variable", name,
                                "--output", str(output)]) == 0
  _, params = checkpoints.load_checkpoint(str(tmp_path / "hf"))
  np.testing.assert_array_equal(np.load(output, allow_pickle=False),
                                trees.flatten(params)[name])


@needs_t5x
def test_from_checkpoint_is_a_prompt_initializer_of_a_variable():
  init = extract_variable.from_checkpoint(str(T5X_CHECKPOINT), "encoder/relpos_bias/rel_embedding")
  _, params = checkpoints.load_checkpoint(str(T5X_CHECKPOINT))
  run = lambda shape: jax.jit(init, static_argnums=(1, 2))(jax.random.PRNGKey(0), shape,
                                                           jax.numpy.float32)
  np.testing.assert_array_equal(run((2, 4)), params["encoder"]["relpos_bias"]["rel_embedding"])
  with pytest.raises(ValueError, match=r"the prompt is \(2, 4\) but the model wants \(3, 4\)"):
    run((3, 4))


def test_from_checkpoint_reads_a_run_s_prompt(run_dir):
  model_dir, states = run_dir
  init = extract_variable.from_checkpoint(str(model_dir))
  np.testing.assert_array_equal(
      init(jax.random.PRNGKey(0), (3, 4)),
      states[2].trainable["encoder"]["prompt"]["prompt"]["prompt"])
