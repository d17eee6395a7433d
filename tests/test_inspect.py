"""Tests of `python -m prompt_tuning_jax.inspect`."""
import json
import os
import pathlib
import shlex
import subprocess
import sys

import gin
import pytest

from prompt_tuning_jax import demo
from prompt_tuning_jax import inspect as inspect_lib
from prompt_tuning_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = REPO.parent / "shared" / "checkpoints" / "t5x_t5_1_1_tiny_flaxformer" / "checkpoint_3"
needs_checkpoint = pytest.mark.needs_shared(CHECKPOINT)
TINY_JSON = {
    "vocab_size": 32128, "emb_dim": 4, "num_heads": 2, "head_dim": 2, "mlp_dim": 8,
    "num_encoder_layers": 2, "num_decoder_layers": 2, "mlp_activations": ["gelu", "linear"],
    "logits_via_embedding": False, "relative_attention_num_buckets": 4,
    "relative_attention_max_distance": 8, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
    "dtype": "float32", "float32_attention_logits": True,
}
# 4 * 32128 (embedding) + 4 * 32128 (logits) + per layer 4 attention kernels 4x4 and 3 MLP kernels of
# 32 in the encoder (2 norms) and 8 attention kernels plus MLP in the decoder (3 norms), 2 norms, 2
# relpos tables 2x4.
TINY_PARAMS = (2 * 4 * 32128 + 2 * (4 * 16 + 3 * 32 + 2 * 4) + 2 * (8 * 16 + 3 * 32 + 3 * 4)
               + 2 * 4 + 2 * 8)


@pytest.fixture(autouse=True)
def clear_gin():
  """Leaves no gin bindings behind for other tests."""
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny T5 1.0 Hugging Face checkpoint (relu, tied logits)."""
  transformers = pytest.importorskip("transformers")
  path = tmp_path_factory.mktemp("hf")
  config = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=12, num_layers=1,
                                 num_heads=2, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, feed_forward_proj="relu")
  transformers.T5ForConditionalGeneration(config).save_pretrained(path)
  return path


@needs_checkpoint
def test_text_on_t5x_checkpoint(capsys):
  assert inspect_lib.main([str(CHECKPOINT), "--max-distance", "8"]) == 0
  out = capsys.readouterr().out
  assert "Format: t5x" in out
  for line in ("vocab_size: 32128", "emb_dim: 4", "num_heads: 2", "head_dim: 2", "mlp_dim: 8",
               "num_encoder_layers: 2", "num_decoder_layers: 2", "mlp: gated",
               "logits: untied", "relative_attention_num_buckets: 4",
               f"Parameters: {TINY_PARAMS:,}"):
    assert line in out
  assert "token_embedder/embedding" in out and "(32128, 4)" in out
  assert "encoder/layers_1/mlp/wi_0/kernel" in out


@needs_checkpoint
def test_json_on_t5x_checkpoint(capsys):
  assert inspect_lib.main([str(CHECKPOINT), "--json", "--max-distance", "8"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["format"] == "t5x"
  assert info["config"] == TINY_JSON
  assert info["num_params"] == TINY_PARAMS
  assert info["params"]["decoder/logits_dense/kernel"] == [4, 32128]


def test_text_and_json_on_hf_dir(hf_dir, capsys):
  assert inspect_lib.main([str(hf_dir)]) == 0
  out = capsys.readouterr().out
  assert "Format: huggingface" in out and "mlp: not gated ('relu',)" in out
  assert "logits: tied" in out and "relative_attention_max_distance: 20" in out
  assert inspect_lib.main([str(hf_dir), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["format"] == "huggingface"
  assert info["config"]["mlp_activations"] == ["relu"] and info["config"]["logits_via_embedding"]
  assert (info["config"]["emb_dim"], info["config"]["mlp_dim"]) == (8, 12)
  assert "decoder/logits_dense/kernel" not in info["params"]
  assert info["params"]["encoder/relpos_bias/rel_embedding"] == [2, 8]


@pytest.mark.parametrize("make_path", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_bad_path_is_one_line_and_exit_2(tmp_path, capsys, make_path):
  assert inspect_lib.main([str(make_path(tmp_path))]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.startswith("error: ") and captured.err.count("\n") == 1


@needs_checkpoint
def test_subprocess_json():
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "prompt_tuning_jax.inspect", "--json", str(CHECKPOINT)],
      capture_output=True, text=True, env=env, cwd=REPO, check=True, timeout=120)
  info = json.loads(result.stdout)
  assert info["format"] == "t5x" and info["num_params"] == TINY_PARAMS
  assert info["config"] == dict(TINY_JSON, relative_attention_max_distance=128)


@pytest.mark.parametrize("path", [
    pytest.param(CHECKPOINT, marks=needs_checkpoint, id="shared"),
    pytest.param(pathlib.Path(demo.T5X_TEST_CHECKPOINT), id="bundled"),
])
def test_gin_flags_of_a_t5x_checkpoint(path, capsys):
  assert inspect_lib.main([str(path), "--gin"]) == 0
  captured = capsys.readouterr()
  assert captured.out.splitlines() == [
      "--gin.t5_config.vocab_size=32128", "--gin.t5_config.emb_dim=4",
      "--gin.t5_config.num_heads=2", "--gin.t5_config.head_dim=2", "--gin.t5_config.mlp_dim=8",
      "--gin.t5_config.num_encoder_layers=2", "--gin.t5_config.num_decoder_layers=2",
      "--gin.t5_config.mlp_activations=\"('gelu', 'linear')\"",
      "--gin.t5_config.logits_via_embedding=False",
      "--gin.t5_config.relative_attention_num_buckets=4",
      "--gin.t5_config.relative_attention_max_distance=128"]
  assert captured.err.splitlines() == [
      "# These flags make any models/*.gin file describe the checkpoint; "
      "models/t5_1_1_tiny_prompt.gin and models/t5_1_1_lm100k_tiny_prompt.gin already match it.",
      "# relative_attention_max_distance=128 is assumed: T5X checkpoints do not store it (T5X's "
      "default is 128; the matching files use 8). Give the model's own value with "
      "--max-distance N."]
  assert inspect_lib.main([str(path), "--gin", "--max-distance", "8"]) == 0
  assert "--gin.t5_config.relative_attention_max_distance=8" in capsys.readouterr().out


def test_gin_flags_of_a_hf_dir_store_the_max_distance(hf_dir, capsys):
  assert inspect_lib.main([str(hf_dir), "--gin"]) == 0
  captured = capsys.readouterr()
  assert "--gin.t5_config.mlp_activations=\"('relu',)\"" in captured.out.splitlines()
  assert "--gin.t5_config.relative_attention_max_distance=20" in captured.out.splitlines()
  assert captured.err == ("# These flags make any models/*.gin file describe the checkpoint; no "
                          "models/*.gin file matches it as it is.\n")


def test_gin_flags_make_another_model_file_train_on_the_checkpoint(tmp_path, capsys):
  """The flags fix the mismatch error of models/t5_1_1_base_prompt.gin on the T5X checkpoint."""
  checkpoint = demo.T5X_TEST_CHECKPOINT
  argv = ["--gin_file=models/t5_1_1_base_prompt.gin", "--gin_file=runs/prompt_finetune.gin",
          f"--gin.MODEL_DIR={str(tmp_path / 'run')!r}",
          "--gin.MIXTURE_OR_TASK_NAME='taskless_super_glue_rte_v102'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}",
          f"--gin.INITIAL_CHECKPOINT_PATH={checkpoint!r}", f"--gin.DATA_DIR={demo.DEMO_DATA_DIR!r}",
          "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2", "--gin.EVAL_PERIOD=0"]
  with pytest.raises(SystemExit):
    train.main(argv)
  err = capsys.readouterr().err
  # A few lines on the command line too: what differs, then (indented) the first problem and the fix.
  first, *rest = err.splitlines()
  assert first.startswith("error: ") and "does not match the config" in first
  assert 2 <= len(rest) <= 4 and all(line.startswith("  ") for line in rest), err
  assert ("it has emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8, num_encoder_layers=2, "
          "num_decoder_layers=2, relative_attention_num_buckets=4 where the config has emb_dim=768"
          in err)
  assert ("Fix: add --gin.t5_config.emb_dim=4 --gin.t5_config.num_heads=2 "
          "--gin.t5_config.head_dim=2 --gin.t5_config.mlp_dim=8") in err
  assert f"`python -m prompt_tuning_jax.inspect {checkpoint} --gin` prints every flag" in err

  assert inspect_lib.main([checkpoint, "--gin"]) == 0
  flags = shlex.split(capsys.readouterr().out)
  train.main(argv + flags)
  assert (tmp_path / "run" / "numpy_checkpoints" / "checkpoint_2" /
          "encoder.prompt.prompt.prompt").is_file()


@pytest.mark.parametrize("family, layers", [("llama", 2), ("gemma3", 3)])
def test_json_of_a_decoder_only_checkpoint(tmp_path, capsys, family, layers):
  """A tiny Llama and Gemma 3 written by transformers: family, layers, heads, key/value heads."""
  pytest.importorskip("torch")
  from hf_causal_reference import random_causal_lm  # pylint: disable=g-import-not-at-top
  model = random_causal_lm(family)
  model.save_pretrained(tmp_path)
  assert inspect_lib.main([str(tmp_path), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert (info["format"], info["family"], info["num_layers"], info["num_heads"],
          info["num_kv_heads"]) == ("huggingface", model.config.model_type, layers, 4, 2)
  assert info["num_params"] == model.num_parameters()  # a tied head is counted once, as there
  assert info["params"]["decoder/layers_0/self_attention/key/kernel"] == [16, 12]
  assert info["config"]["sliding_layers"] == ([] if family == "llama" else [0, 2])
  assert inspect_lib.main([str(tmp_path)]) == 0
  assert f"  family: {model.config.model_type}" in capsys.readouterr().out
  assert inspect_lib.main([str(tmp_path), "--gin"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --gin describes T5 checkpoints") and err.count("\n") == 1
