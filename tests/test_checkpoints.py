"""Tests of `checkpoints` and `t5x_checkpoint` on the real T5X checkpoint in `../shared`."""
import gzip
import json
import pathlib
import shutil
import struct

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from prompt_tuning_jax import checkpoints
from prompt_tuning_jax import network
from prompt_tuning_jax import prompts
from prompt_tuning_jax import trees
from prompt_tuning_jax.config import ExecutionConfig, t5_config

MODEL_DIR = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
             / "t5x_t5_1_1_tiny_flaxformer")
CHECKPOINT = MODEL_DIR / "checkpoint_3"
pytestmark = pytest.mark.needs_shared(CHECKPOINT)

TINY = t5_config("t5_1_1", "tiny")  # the README's architecture: max distance 8
EMBEDDING = "target.token_embedder.embedding"


@pytest.fixture(scope="module")
def loaded():
  return checkpoints.load_checkpoint(str(CHECKPOINT), relative_attention_max_distance=8)


def _zarr_by_hand(directory: pathlib.Path) -> np.ndarray:
  """Decodes a gzip zarr v2 array with numpy alone (not tensorstore, not our reader)."""
  meta = json.loads((directory / ".zarray").read_text())
  assert meta["compressor"]["id"] == "gzip" and meta["order"] == "C" and meta["filters"] is None
  shape, chunks = meta["shape"], meta["chunks"]
  out = np.zeros(shape, np.dtype(meta["dtype"]))
  grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]
  for i in grid[0]:
    for j in grid[1]:
      chunk = np.frombuffer(gzip.decompress((directory / f"{i}.{j}").read_bytes()),
                            np.dtype(meta["dtype"])).reshape(chunks)
      part = out[i * chunks[0]:(i + 1) * chunks[0], j * chunks[1]:(j + 1) * chunks[1]]
      part[...] = chunk[:part.shape[0], :part.shape[1]]
  return out


def _apply(config, params, prompt_config=None, execution=ExecutionConfig()):
  inputs = jnp.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0]])
  targets = jnp.array([[11, 12, 1], [13, 1, 0]])
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return network.T5(config, prompt_config, execution).apply({"params": params}, inputs,
                                                           decoder_inputs, targets)


def test_inferred_config_is_the_tiny_t5_1_1(loaded):
  config, _ = loaded
  assert config == TINY
  # Shapes do not hold the max distance: 128 unless overridden.
  assert checkpoints.read_config(str(CHECKPOINT)) == TINY.replace(relative_attention_max_distance=128)
  assert checkpoints.detect_format(str(CHECKPOINT)) == checkpoints.T5X


def test_params_match_the_model_tree(loaded):
  config, params = loaded
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      tuple, trees.unflatten(checkpoints.param_shapes(config)),
      is_leaf=lambda x: isinstance(x, tuple))
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))


def test_scanned_layers_load_stacked(loaded):
  """The real T5X checkpoint into a `scan_layers` model: layer i at index i, same logits."""
  config, params = loaded
  _, stacked = checkpoints.load_checkpoint(str(CHECKPOINT), config=config, scan_layers=True)
  for stack in ("encoder", "decoder"):
    assert not any(name.startswith("layers_") for name in stacked[stack])
    for i in range(2):
      np.testing.assert_array_equal(stacked[stack]["layers"]["mlp"]["wo"]["kernel"][i],
                                    params[stack][f"layers_{i}"]["mlp"]["wo"]["kernel"])
  scanned = jax.jit(_apply, static_argnums=(0, 2, 3))(config, stacked, None,
                                                      ExecutionConfig(scan_layers=True))
  np.testing.assert_allclose(scanned, jax.jit(_apply, static_argnums=0)(config, params), rtol=1e-5,
                             atol=1e-6)


def test_embedding_equals_the_zarr_data(loaded):
  _, params = loaded
  np.testing.assert_array_equal(params["token_embedder"]["embedding"],
                                _zarr_by_hand(CHECKPOINT / EMBEDDING))


def test_forward_pass_with_and_without_prompt(loaded):
  config, params = loaded
  logits = _apply(config, params)
  assert logits.shape == (2, 3, config.vocab_size) and np.isfinite(logits).all()
  prompt = jax.random.uniform(jax.random.PRNGKey(0), (3, config.emb_dim), minval=-0.5, maxval=0.5)
  with_prompt = dict(params, encoder=dict(params["encoder"], prompt={"prompt": {"prompt": prompt}}))
  prompted = _apply(config, with_prompt, prompts.PromptConfig(3))
  assert prompted.shape == logits.shape and np.isfinite(prompted).all()
  assert not np.allclose(prompted, logits)


def test_accepts_file_and_model_dir(loaded):
  _, params = loaded
  for path in (CHECKPOINT / "checkpoint", MODEL_DIR):
    config, other = checkpoints.load_checkpoint(str(path), relative_attention_max_distance=8)
    assert config == TINY
    jax.tree.map(np.testing.assert_array_equal, other, params)


@pytest.mark.parametrize("layout", ["optimizer", "state"])
def test_single_file_msgpack_keeps_prompt_and_casts_bfloat16(loaded, tmp_path, layout):
  """Older all-inline checkpoints, in both train-state layouts, with a prompt and bfloat16 arrays."""
  config, params = loaded
  prompt = np.arange(3 * config.emb_dim, dtype=np.float32).reshape(3, config.emb_dim)
  target = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params)
  target["encoder"]["prompt"] = {"prompt": {"prompt": prompt.astype(jnp.bfloat16)}}
  state = ({"version": 3, "optimizer": {"state": {"step": np.int32(7)}, "target": target}}
           if layout == "optimizer" else {"state": {"step": np.int32(7)}, "target": target})
  path = tmp_path / "checkpoint_7.msgpack"
  path.write_bytes(flax.serialization.msgpack_serialize(state))

  loaded_config, restored = checkpoints.load_checkpoint(str(path), relative_attention_max_distance=8)
  assert loaded_config == config
  np.testing.assert_array_equal(restored["encoder"]["prompt"]["prompt"]["prompt"], prompt)
  assert restored["token_embedder"]["embedding"].dtype == np.float32
  np.testing.assert_array_equal(restored["token_embedder"]["embedding"],
                                target["token_embedder"]["embedding"].astype(np.float32))
  assert _apply(config, restored, prompts.PromptConfig(3)).shape == (2, 3, config.vocab_size)

  bf16_config, as_bf16 = checkpoints.load_checkpoint(str(path), dtype=jnp.bfloat16)
  assert bf16_config.dtype == jnp.bfloat16
  assert as_bf16["token_embedder"]["embedding"].dtype == jnp.bfloat16


def test_model_dir_picks_latest_step_and_reads_bfloat16_zarr(tmp_path):
  """A model dir with checkpoint_3 and checkpoint_10: the latest wins; a bfloat16 zarr array loads."""
  shutil.copytree(CHECKPOINT, tmp_path / "checkpoint_3")
  latest = tmp_path / "checkpoint_10"
  shutil.copytree(CHECKPOINT, latest)
  state = flax.serialization.msgpack_restore((latest / "checkpoint").read_bytes())
  spec = state["optimizer"]["target"]["token_embedder"]["embedding"]
  spec["metadata"]["dtype"] = "bfloat16"
  embedding = _zarr_by_hand(CHECKPOINT / EMBEDDING) * 2
  shutil.rmtree(latest / EMBEDDING)
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(latest / EMBEDDING)},
                   "metadata": spec["metadata"]}, create=True).result()
  store.write(embedding.astype(jnp.bfloat16)).result()
  (latest / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(state))

  _, params = checkpoints.load_checkpoint(str(tmp_path))
  assert params["token_embedder"]["embedding"].dtype == np.float32
  np.testing.assert_array_equal(params["token_embedder"]["embedding"],
                                embedding.astype(jnp.bfloat16).astype(np.float32))


def test_missing_path_is_a_checkpoint_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="not found.*does not exist"):
    checkpoints.load_checkpoint(str(tmp_path / "nowhere"))


def test_directory_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(checkpoints.CheckpointError, match="is not a checkpoint"):
    checkpoints.load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("data", [b"", b"garbage, not msgpack", "truncated"])
def test_corrupt_msgpack_is_a_checkpoint_error(tmp_path, data):
  if data == "truncated":
    data = (CHECKPOINT / "checkpoint").read_bytes()[:5000]
  (tmp_path / "checkpoint").write_bytes(data)
  with pytest.raises(checkpoints.CheckpointError, match="not a readable msgpack checkpoint"):
    checkpoints.load_checkpoint(str(tmp_path))


def test_msgpack_without_parameters(tmp_path):
  (tmp_path / "checkpoint").write_bytes(flax.serialization.msgpack_serialize({"step": 3}))
  with pytest.raises(checkpoints.CheckpointError, match="holds no parameters"):
    checkpoints.load_checkpoint(str(tmp_path))


def test_shape_mismatch_is_a_few_lines_with_the_fields_and_the_fix():
  with pytest.raises(checkpoints.ArchitectureMismatchError) as error:
    checkpoints.load_checkpoint(str(CHECKPOINT), config=TINY.replace(mlp_dim=16))
  assert str(error.value).splitlines() == [
      f"Checkpoint {CHECKPOINT} does not match the config (12 problem(s)): it has mlp_dim=8 where "
      "the config has mlp_dim=16.",
      "  decoder/layers_0/mlp/wi_0/kernel: the checkpoint has shape (4, 8) but the config expects "
      "(4, 16)",
      "  Fix: add --gin.t5_config.mlp_dim=8 (`python -m prompt_tuning_jax.inspect "
      f"{CHECKPOINT} --gin` prints every flag and the models/*.gin file that matches); in Python, "
      "`load_checkpoint(path)` without `config=` reads its own architecture."]


def test_missing_and_extra_parameters_against_t5_1_0_config():
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.load_checkpoint(str(CHECKPOINT), config=t5_config("t5_1_0", "tiny"))
  message = str(error.value)
  assert "it has mlp_activations=('gelu', 'linear'), logits_via_embedding=False where" in message
  assert "decoder/layers_0/mlp/wi/kernel: missing from the checkpoint (the config expects shape " \
         "(4, 8))" in message
  assert "decoder/layers_0/mlp/wi_0/kernel: shape (4, 8) in the checkpoint is not a parameter" \
      in message
  assert ("Fix: add --gin.t5_config.mlp_activations=\"('gelu', 'linear')\" "
          "--gin.t5_config.logits_via_embedding=False") in message


def test_check_params_accepts_trees_of_arrays_and_shapes():
  expected = {"a": {"kernel": (2, 3)}, "b": np.zeros(4)}
  checkpoints.check_params(expected, {"a": {"kernel": np.ones((2, 3))}, "b": (4,)})
  with pytest.raises(checkpoints.CheckpointError, match=r"a/kernel: the checkpoint has shape \(3, 2\)"):
    checkpoints.check_params(expected, {"a": {"kernel": np.ones((3, 2))}, "b": (4,)})
  assert issubclass(checkpoints.CheckpointError, ValueError)


def _t5x_with_embedding_spec(directory: pathlib.Path, **spec_changes) -> pathlib.Path:
  """A copy of the tiny checkpoint's msgpack file whose embedding spec has `spec_changes`."""
  state = flax.serialization.msgpack_restore((CHECKPOINT / "checkpoint").read_bytes())
  state["optimizer"]["target"]["token_embedder"]["embedding"].update(spec_changes)
  directory.mkdir()
  (directory / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(state))
  return directory


@pytest.mark.parametrize("spec, message", [
    ({"kvstore": {"driver": "gfile", "path": "/etc/hostname"}},
     "names an array at '/etc/hostname', outside its directory"),
    ({"kvstore": {"driver": "gfile", "path": "a/../../secret"}}, "outside its directory"),
    ({"kvstore": {"driver": "gfile", "path": "file:///etc/hostname"}}, "outside its directory"),
    ({"kvstore": "file:///etc/hostname"}, "a tensorstore spec T5X does not write"),
    ({"driver": "json"}, "a tensorstore spec T5X does not write \\(driver 'json'"),
], ids=["absolute", "parent", "url", "kvstore_url", "json_driver"])
def test_specs_that_leave_the_checkpoint_directory_are_refused(tmp_path, spec, message):
  path = _t5x_with_embedding_spec(tmp_path / "checkpoint_3", **spec)
  with pytest.raises(checkpoints.CheckpointError, match=message):
    checkpoints.load_checkpoint(str(path))


def test_a_missing_array_directory_names_the_parameter(tmp_path):
  shutil.copytree(CHECKPOINT, tmp_path / "checkpoint_3")
  shutil.rmtree(tmp_path / "checkpoint_3" / EMBEDDING)
  with pytest.raises(checkpoints.CheckpointError,
                     match=f"the array of token_embedder/embedding at .*{EMBEDDING} is missing or "
                           "corrupt"):
    checkpoints.load_checkpoint(str(tmp_path / "checkpoint_3"))


HF_CONFIG = {"vocab_size": 8, "d_model": 2, "num_heads": 1, "d_kv": 2, "d_ff": 4, "num_layers": 1}


def _hf_checkpoint(directory: pathlib.Path, header: dict, data: bytes = b"",
                   config: dict = HF_CONFIG) -> str:
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(config))
  text = json.dumps(header).encode()
  (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
  return str(directory)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}, r"its bytes \[0, 64\) are outside "
                                                                 "the file's 16 bytes of data"),
    ({"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}, "its 16 bytes do not hold a F32 "
                                                                 r"array of shape \(3, 2\)"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
     r"its shape \[-4\] or data_offsets \[0, 16\] is not a list of non-negative integers"),
    ({"dtype": "Q8", "shape": [4], "data_offsets": [0, 16]}, "its dtype 'Q8' is not one of"),
    ({"shape": [4]}, r"\{'shape': \[4\]\} is not \{dtype, shape, data_offsets\}"),
], ids=["outside", "size", "negative_shape", "dtype", "keys"])
def test_safetensors_entries_are_checked_against_the_file(tmp_path, entry, message):
  path = _hf_checkpoint(tmp_path / "hf", {"shared.weight": entry}, bytes(16))
  with pytest.raises(checkpoints.CheckpointError, match=f"tensor 'shared.weight': {message}"):
    checkpoints.read_shapes(path)


def test_hf_config_without_required_keys(tmp_path):
  config = {key: value for key, value in HF_CONFIG.items() if key not in ("d_model", "d_ff")}
  path = _hf_checkpoint(tmp_path / "hf", {}, config=config)
  with pytest.raises(checkpoints.CheckpointError, match="config.json lacks d_model, d_ff"):
    checkpoints.load_checkpoint(path)
