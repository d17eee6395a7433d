"""Reads Hugging Face T5 checkpoints (a `save_pretrained` directory) into T5X-named parameters.

The directory holds `config.json` and the weights: `model.safetensors`, `pytorch_model.bin` (needs
torch), or shards listed by `model.safetensors.index.json` / `pytorch_model.bin.index.json`.
torch `Linear` weights are `[out, in]` and become our `[in, out]` kernels; the relative position
tables `[buckets, heads]` become `[heads, buckets]`.

Logits: HF multiplies the decoder output by `d_model**-0.5` when `scale_decoder_outputs` is set
(transformers>=5; older config.json files say `tie_word_embeddings`) and multiplies it by `lm_head`,
which is `shared` unless the checkpoint stores its own `lm_head.weight`. Scaled and shared is T5 1.0's
`logits_via_embedding=True`; otherwise the (scaled) head becomes `decoder/logits_dense/kernel`.

Errors are `ValueError`s (or `OSError`s); `checkpoints.load_checkpoint` turns them into
`CheckpointError`s.
"""
import json
import os
import struct
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax.config import T5Config

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Copies of `shared.weight` (or weights T5 never uses) that a checkpoint may hold.
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# config.json keys without a default: T5's architecture.
_REQUIRED_KEYS = ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers")
# safetensors' own bound on the JSON header, which the file's first 8 bytes give the length of.
_MAX_HEADER_BYTES = 100_000_000
# HF activation names -> ours.
_ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
_ATTENTION = (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))


class Tensor(NamedTuple):
  """A stored tensor: its shape and how to read it as a numpy array."""
  shape: tuple[int, ...]
  read: Callable[[], np.ndarray]


def is_checkpoint(path: str) -> bool:
  """Whether `path` is a directory with `config.json` and T5 weights."""
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES))


def read_config(path: str) -> T5Config:
  """The T5Config of the checkpoint in `path` (config.json, plus whether `lm_head` is stored)."""
  hf = read_json(os.path.join(path, CONFIG_FILE))
  if hf.get("model_type", "t5") not in ("t5", "mt5"):
    raise ValueError(f"{path}/{CONFIG_FILE} is a {hf['model_type']!r} model, not T5.")
  missing = [key for key in _REQUIRED_KEYS if type(hf.get(key)) is not int or hf[key] <= 0]
  if missing:
    raise ValueError(f"{path}/{CONFIG_FILE} lacks {', '.join(missing)} (positive integers); a T5 "
                     f"config.json gives {', '.join(_REQUIRED_KEYS)}. Save it again with "
                     "save_pretrained.")
  ffn = hf.get("feed_forward_proj", "relu")
  parts = ffn.split("-")
  gated = parts[0] == "gated"
  # HF's `gated-gelu` is the tanh GELU (ours); a plain `gelu` is the exact one, which we lack.
  activation = "gelu" if ffn == "gated-gelu" else _ACTIVATIONS.get(parts[-1])
  if activation is None or len(parts) != 1 + gated:
    raise ValueError(f"feed_forward_proj={ffn!r} in {path}/{CONFIG_FILE} is not supported; use relu, "
                     "gated-gelu, gated-silu, silu or gelu_new.")
  logits_via_embedding = _scales_decoder_output(hf) and "lm_head.weight" not in read_tensors(path)
  return T5Config(
      vocab_size=hf["vocab_size"],
      emb_dim=hf["d_model"],
      num_heads=hf["num_heads"],
      head_dim=hf["d_kv"],
      mlp_dim=hf["d_ff"],
      num_encoder_layers=hf["num_layers"],
      num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      mlp_activations=(activation, "linear") if gated else (activation,),
      logits_via_embedding=logits_via_embedding,
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      dropout_rate=hf.get("dropout_rate", 0.1),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Flat `{T5X param path: shape}` of the checkpoint in `path`, reading no array."""
  return {name: shape for name, (shape, _) in _our_tensors(path).items()}


def read_arrays(path: str, dtype: Any) -> dict[str, np.ndarray]:
  """Flat `{T5X param path: array}` of the checkpoint in `path`, cast to `dtype`."""
  return {name: read().astype(dtype, copy=False) for name, (_, read) in _our_tensors(path).items()}


def _our_tensors(path: str) -> dict[str, Tensor]:
  """The checkpoint's tensors under T5X names, transposed (and the logits head scaled) lazily."""
  hf = read_json(os.path.join(path, CONFIG_FILE))
  config = read_config(path)
  tensors = read_tensors(path)
  names = name_map(config)
  if not config.logits_via_embedding:
    head = "lm_head.weight" if "lm_head.weight" in tensors else "shared.weight"
    names["decoder/logits_dense/kernel"] = head
  head_scale = hf["d_model"] ** -0.5 if _scales_decoder_output(hf) else None
  return renamed_tensors(path, tensors, names, _IGNORED, "a T5 model",
                         lambda name: head_scale if name == "decoder/logits_dense/kernel" else None)


def renamed_tensors(path: str, tensors: dict[str, tuple[Sequence[int], Callable]],
                    names: dict[str, str], ignored: Iterable[str], model: str,
                    scale: Callable[[str], Optional[float]] = lambda name: None
                    ) -> dict[str, Tensor]:
  """`{our name: Tensor}` of a checkpoint's `tensors` (`read_tensors`) by `names` (ours -> theirs),
  2-D kernels transposed to `[in, out]` (and multiplied by `scale(name)`) lazily. Tensors neither
  named nor `ignored` are an error naming `model` ("a T5 model"); named ones the checkpoint lacks
  are left out (`checkpoints.check_params` reports them)."""
  unknown = sorted(set(tensors) - set(names.values()) - set(ignored))
  if unknown:
    raise ValueError(f"{path} holds tensors {model} does not have: {', '.join(unknown[:5])}"
                     f"{' ...' if len(unknown) > 5 else ''}. Is config.json right?")
  ours = {}
  for name, hf_name in names.items():
    if hf_name not in tensors:
      continue
    shape, read = tensors[hf_name]
    if len(shape) == 2 and name != "token_embedder/embedding":
      shape, read = shape[::-1], transposed(read, scale(name))
    ours[name] = Tensor(tuple(shape), read)
  return ours


def name_map(config: T5Config) -> dict[str, str]:
  """`{T5X name: HF name}` of every parameter but the untied logits head."""
  mlp = ["wi"] if len(config.mlp_activations) == 1 else ["wi_0", "wi_1"]
  names = {"token_embedder/embedding": "shared.weight",
           "encoder/encoder_norm/scale": "encoder.final_layer_norm.weight",
           "decoder/decoder_norm/scale": "decoder.final_layer_norm.weight"}
  for stack in ("encoder", "decoder"):
    names[f"{stack}/relpos_bias/rel_embedding"] = (
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
  blocks = {"encoder": (("pre_attention_layer_norm", "attention", "SelfAttention"),
                        ("pre_mlp_layer_norm", "mlp", "DenseReluDense")),
            "decoder": (("pre_self_attention_layer_norm", "self_attention", "SelfAttention"),
                        ("pre_cross_attention_layer_norm", "encoder_decoder_attention",
                         "EncDecAttention"),
                        ("pre_mlp_layer_norm", "mlp", "DenseReluDense"))}
  num_layers = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
  for stack, sublayers in blocks.items():
    for i in range(num_layers[stack]):
      for j, (norm, ours, theirs) in enumerate(sublayers):
        prefix, hf_prefix = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer.{j}"
        names[f"{prefix}/{norm}/scale"] = f"{hf_prefix}.layer_norm.weight"
        pairs = [(m, m) for m in mlp + ["wo"]] if ours == "mlp" else [(t, o) for t, o in _ATTENTION]
        for hf_name, our_name in pairs:
          names[f"{prefix}/{ours}/{our_name}/kernel"] = f"{hf_prefix}.{theirs}.{hf_name}.weight"
  return names


def _scales_decoder_output(hf: dict[str, Any]) -> bool:
  return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))


def transposed(read: Callable[[], np.ndarray],
                scale: Optional[float]) -> Callable[[], np.ndarray]:
  """`read` of the transposed array, multiplied by `scale` unless it is None."""
  def read_transposed():
    array = np.ascontiguousarray(read().T)
    return array if scale is None else (array.astype(np.float32) * np.float32(scale)).astype(
        array.dtype)
  return read_transposed


def read_tensors(path: str) -> dict[str, Tensor]:
  """`{HF name: tensor}` from the weight file(s) in `path`."""
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index_file = os.path.join(path, index_name)
    if os.path.isfile(index_file):
      weight_map = read_json(index_file).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file} has no `weight_map` of tensor names to shard files.")
      shards = sorted(set(map(str, weight_map.values())))
      tensors = {}
      for shard in shards:
        tensors.update(_file_tensors(os.path.join(path, shard)))
      return tensors
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, name)):
      return _file_tensors(os.path.join(path, name))
  raise FileNotFoundError(f"No weights in {path}: expected one of {', '.join(WEIGHT_FILES)}.")


def _file_tensors(filename: str) -> dict[str, Tensor]:
  return (_safetensors_tensors(filename) if filename.endswith(".safetensors")
          else _torch_tensors(filename))


def _safetensors_tensors(filename: str) -> dict[str, Tensor]:
  """Parses the safetensors header (8-byte little-endian length, then JSON); reads data lazily.

  The header's length is bounded by the file's size (and safetensors' 100 MB) before it is read, and
  each tensor's dtype, shape and byte range are checked against each other and the file.
  """
  size = os.path.getsize(filename)
  with open(filename, "rb") as f:
    try:
      if size < 8:
        raise ValueError(f"it holds {size} bytes, fewer than the 8 that give its header's length")
      (header_length,) = struct.unpack("<Q", f.read(8))
      if header_length > size - 8:
        raise ValueError(f"its header claims {header_length} bytes, but the file holds {size}")
      if header_length > _MAX_HEADER_BYTES:
        raise ValueError(f"its header claims {header_length} bytes, more than safetensors' "
                         f"{_MAX_HEADER_BYTES}")
      header = json.loads(f.read(header_length))
      if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError among them
      raise ValueError(f"{filename} is not a safetensors file (empty, truncated or corrupt?): "
                       f"{e}") from None
  data_start = 8 + header_length

  def reader(name, entry):
    dtype, shape, (begin, end) = _checked_entry(filename, name, entry, size - data_start)

    def read():
      with open(filename, "rb") as f:
        f.seek(data_start + begin)
        return np.frombuffer(f.read(end - begin), dtype).reshape(shape)
    return Tensor(shape, read)

  return {name: reader(name, entry) for name, entry in header.items() if name != "__metadata__"}


def _checked_entry(filename: str, name: str, entry: Any, data_size: int
                   ) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
  """(dtype, shape, (begin, end)) of a safetensors header entry, or a `ValueError` saying what of it
  is wrong: an unknown dtype, a malformed shape or byte range, or a range outside the file or of
  another size than the shape's."""
  problem = None
  if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
    problem = f"{entry!r:.80} is not {{dtype, shape, data_offsets}}"
  elif entry["dtype"] not in _SAFETENSORS_DTYPES:
    problem = (f"its dtype {entry['dtype']!r} is not one of {', '.join(_SAFETENSORS_DTYPES)}; save "
               "the model in one of those")
  elif not (_int_list(entry["shape"]) and _int_list(entry["data_offsets"])
            and len(entry["data_offsets"]) == 2):
    problem = (f"its shape {entry['shape']!r:.40} or data_offsets {entry['data_offsets']!r:.40} "
               "is not a list of non-negative integers")
  else:
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
    shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
    if not 0 <= begin <= end <= data_size:
      problem = f"its bytes [{begin}, {end}) are outside the file's {data_size} bytes of data"
    elif end - begin != int(np.prod(shape)) * dtype.itemsize:
      problem = f"its {end - begin} bytes do not hold a {entry['dtype']} array of shape {shape}"
    else:
      return dtype, shape, (begin, end)
  raise ValueError(f"{filename} is corrupt: tensor {name!r}: {problem}.")


def _int_list(value: Any) -> bool:
  return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)


def _torch_tensors(filename: str) -> dict[str, Tensor]:
  """Tensors of a `pytorch_model.bin`, memory-mapped; aliases of `shared.weight` are dropped."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"Reading {filename} needs PyTorch (pip install torch), or save the model as "
                     "safetensors.") from e
  state = torch.load(filename, map_location="cpu", weights_only=True, mmap=True)
  shared = state.get("shared.weight")

  def reader(tensor):
    # numpy has no bfloat16 view of a torch tensor: widen it.
    return lambda: (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()

  return {name: Tensor(tuple(t.shape), reader(t)) for name, t in state.items()
          if shared is None or name == "shared.weight" or t.data_ptr() != shared.data_ptr()}


def read_json(filename: str) -> dict[str, Any]:
  """The JSON object in `filename`; anything else is a `ValueError` naming the file."""
  try:
    with open(filename, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{filename} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{filename} holds a JSON {type(value).__name__}, not an object.")
  return value
