"""Prompt interchange with Hugging Face PEFT, and the prompts released with the paper.

`export_peft_adapter` writes a trained prompt `[P, E]` as a PEFT prompt-tuning adapter
(`adapter_config.json` and `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads on
the matching Hugging Face T5; `import_peft_adapter` reads such an adapter back as our prompt `[P, E]`.
`load_released_prompt` reads a released `.npy` prompt and checks it against a T5Config.

How PEFT's placement maps onto ours (peft 0.21, `PeftModelForSeq2SeqLM` with `PROMPT_TUNING`):
  - The adapter holds one table `prompt_embeddings` `[num_virtual_tokens * num_transformer_submodules,
    token_dim]`. `forward` and `generate` prepend its first `num_virtual_tokens` rows to the embedded
    encoder input and ones to the attention mask: `[P; embed(input_ids)]`, exactly our
    `PromptConfig(combine="prefix")` (the paper's placement, our default). The decoder's inputs, mask
    and labels are left alone, as in ours; the decoder sees the prompt only through cross-attention.
  - For `SEQ_2_SEQ_LM`, PEFT defaults to `num_transformer_submodules=2` and allocates `[2P, E]`, but
    prompt tuning never reads rows `P:` (only multitask prompt tuning prepends them to the decoder):
    they stay at their initial values. We export `num_transformer_submodules=1`, a `[P, E]` table, and
    on import keep rows `:P`, which is all PEFT uses.
  - `FEATURE_EXTRACTION` (a `T5EncoderModel`) prepends the whole table to the encoder input; with
    `num_transformer_submodules=1` that is our encoder's output too.
  - Our `prefix_after_bos` and `suffix` combinations and prompt banks have no PEFT counterpart: export
    only prompts trained with `combine="prefix"`.

Decoder-only models (`causal_lm.CausalLM`; PEFT's `PeftModelForCausalLM`, `CAUSAL_LM`):
`export_causal_lm_adapter` and `import_causal_lm_adapter`. PEFT prepends its one table
`[num_virtual_tokens, token_dim]` to the embedded input (`[P; embed(input_ids)]`, ones in front of
the attention mask, positions counted from the prompt's first): our `PromptConfig(combine="prefix")`.
A prompt trained `prefix_after_bos` (our default for these models) is another model's prompt.
"""
import json
import os
import tempfile
from typing import IO, Any, Callable

import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy

from prompt_tuning_jax import prompt_initializers
from prompt_tuning_jax.config import T5Config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_KEY = "prompt_embeddings"
PEFT_TYPE = "PROMPT_TUNING"
# PEFT task types whose prompt-tuning placement on T5 is ours (see the module docstring).
TASK_TYPES = ("SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
CAUSAL_LM = "CAUSAL_LM"  # decoder-only models (`export_causal_lm_adapter`)


class AdapterError(ValueError):
  """A PEFT adapter that is not a prompt-tuning adapter we can represent, or is malformed."""


def export_peft_adapter(prompt: np.ndarray, output_dir: str, base_model_name_or_path: str, *,
                        task_type: str = "SEQ_2_SEQ_LM", overwrite: bool = False) -> None:
  """Writes `prompt` `[P, E]` as a PEFT prompt-tuning adapter in `output_dir`.

  Args:
    prompt: a float `[P, E]` prompt (bfloat16 too) trained with `combine="prefix"`; stored as
      float32.
    output_dir: created if missing; receives `adapter_config.json` and `adapter_model.safetensors`.
    base_model_name_or_path: the Hugging Face T5 the prompt was trained for (hub id or directory).
    task_type: `SEQ_2_SEQ_LM` (T5ForConditionalGeneration) or `FEATURE_EXTRACTION` (T5EncoderModel).
    overwrite: replace existing adapter files instead of raising `FileExistsError`.
  """
  _write_adapter(prompt, output_dir, base_model_name_or_path, task_type, TASK_TYPES, overwrite)


def export_causal_lm_adapter(prompt: np.ndarray, output_dir: str, base_model_name_or_path: str, *,
                             overwrite: bool = False) -> None:
  """Writes a decoder-only model's `prompt` `[P, E]`, trained with `combine="prefix"`, as a PEFT
  `CAUSAL_LM` prompt-tuning adapter for `base_model_name_or_path` (`export_peft_adapter`'s
  arguments and files)."""
  _write_adapter(prompt, output_dir, base_model_name_or_path, CAUSAL_LM, (CAUSAL_LM,), overwrite)


def _write_adapter(prompt: np.ndarray, output_dir: str, base_model_name_or_path: str,
                   task_type: str, task_types: tuple[str, ...], overwrite: bool) -> None:
  """`export_peft_adapter` for a `task_type` among `task_types`."""
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.floating):
    raise ValueError(f"A prompt is a float [prompt_length, embed_dim] array, got a {prompt.dtype} array "
                     f"of shape {prompt.shape}.")
  if task_type not in task_types:
    raise ValueError(f"task_type {task_type!r} does not place the prompt where ours goes; use one of "
                     f"{task_types}.")
  paths = [os.path.join(output_dir, name) for name in (WEIGHTS_FILE, CONFIG_FILE)]
  existing = [path for path in paths if os.path.exists(path)]
  if existing and not overwrite:
    raise FileExistsError(f"Adapter files already exist: {', '.join(existing)}; pass overwrite=True "
                          "to replace them.")
  config = {
      "peft_type": PEFT_TYPE,
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "inference_mode": True,
      "num_virtual_tokens": prompt.shape[0],
      "token_dim": prompt.shape[1],
      # One table, prepended to the encoder input only.
      "num_transformer_submodules": 1,
      # Unused by prompt tuning; PEFT fills them in from the base model's config.
      "num_attention_heads": None,
      "num_layers": None,
      "modules_to_save": None,
      "prompt_tuning_init": "RANDOM",
      "prompt_tuning_init_text": None,
      "tokenizer_name_or_path": None,
      "tokenizer_kwargs": None,
  }
  os.makedirs(output_dir, exist_ok=True)
  weights = np.ascontiguousarray(prompt, np.float32)
  # The weights first: a config never points at missing or partly written weights.
  write_atomically(paths[0], lambda f: f.write(safetensors.numpy.save(
      {WEIGHTS_KEY: weights}, metadata={"format": "pt"})))
  write_atomically(paths[1], lambda f: f.write(json.dumps(config, indent=2).encode() + b"\n"))


def import_peft_adapter(adapter_dir: str) -> np.ndarray:
  """The prompt `[P, E]` (float32) that a PEFT prompt-tuning adapter prepends to T5's encoder input.

  Raises:
    FileNotFoundError: `adapter_dir` lacks `adapter_config.json` or `adapter_model.safetensors`.
    AdapterError: not a `PROMPT_TUNING` adapter of a supported task type, or its table does not match
      its config.
  """
  return _read_adapter(adapter_dir, TASK_TYPES)


def import_causal_lm_adapter(adapter_dir: str) -> np.ndarray:
  """The prompt `[P, E]` (float32) that a PEFT `CAUSAL_LM` prompt-tuning adapter prepends to a
  decoder-only model's input: our `PromptConfig(combine="prefix")`'s (errors as
  `import_peft_adapter`'s)."""
  return _read_adapter(adapter_dir, (CAUSAL_LM,))


def _read_adapter(adapter_dir: str, task_types: tuple[str, ...]) -> np.ndarray:
  """`import_peft_adapter` of an adapter whose task type is one of `task_types`."""
  config_path = os.path.join(adapter_dir, CONFIG_FILE)
  weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No PEFT adapter at {adapter_dir!r}: {CONFIG_FILE} is missing.")
  if not os.path.isfile(weights_path):
    legacy = " (it has adapter_model.bin: re-save it with safe_serialization=True)" if os.path.isfile(
        os.path.join(adapter_dir, "adapter_model.bin")) else ""
    raise FileNotFoundError(f"No PEFT adapter weights at {weights_path!r}{legacy}.")
  config = read_adapter_config(config_path)
  if config.get("peft_type") != PEFT_TYPE:
    raise AdapterError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not {PEFT_TYPE!r}; "
                       "only prompt-tuning adapters hold a prompt.")
  task_type = config.get("task_type")
  if task_type not in task_types:
    raise AdapterError(f"{config_path}: task_type {task_type!r} does not put the prompt where this "
                       f"model's goes; supported: {task_types}.")
  length, embed_dim = config.get("num_virtual_tokens"), config.get("token_dim")
  if not all(isinstance(n, int) and n > 0 for n in (length, embed_dim)):
    raise AdapterError(f"{config_path}: num_virtual_tokens ({length!r}) and token_dim ({embed_dim!r}) "
                       "must be positive integers.")
  # PEFT's default when the config leaves it out.
  submodules = config.get("num_transformer_submodules") or (2 if task_type == "SEQ_2_SEQ_LM" else 1)
  if submodules not in (1, 2):
    raise AdapterError(f"{config_path}: num_transformer_submodules is {submodules!r}; T5 has 1 "
                       "(encoder) or 2 (encoder and decoder).")
  if task_type != "SEQ_2_SEQ_LM" and submodules != 1:
    raise AdapterError(f"{config_path}: a {task_type} adapter with num_transformer_submodules="
                       f"{submodules} prepends all {submodules} tables; only 1 is supported.")
  tensors = read_adapter_weights(weights_path)
  if set(tensors) != {WEIGHTS_KEY}:
    raise AdapterError(f"{weights_path} holds {sorted(tensors)}; a prompt-tuning adapter holds only "
                       f"{WEIGHTS_KEY!r}.")
  table = tensors[WEIGHTS_KEY]
  expected = (length * submodules, embed_dim)
  if table.shape != expected:
    raise AdapterError(f"{weights_path}: {WEIGHTS_KEY} has shape {table.shape}, but the config "
                       f"(num_virtual_tokens={length}, num_transformer_submodules={submodules}, "
                       f"token_dim={embed_dim}) implies {expected}.")
  if not jnp.issubdtype(table.dtype, jnp.floating):  # bfloat16 included
    raise AdapterError(f"{weights_path}: {WEIGHTS_KEY} holds {table.dtype}, not floats.")
  # Rows `length:` are the decoder's table, which prompt tuning never reads.
  return np.asarray(table[:length], np.float32)


def load_released_prompt(path: str, config: T5Config) -> np.ndarray:
  """A released prompt `.npy` (e.g. `t5_1_1_lm100k_base/sst2.npy`, `[100, 768]`) checked for `config`.

  Returns:
    The float `[P, config.emb_dim]` prompt.
  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not a float 2-D array, or its embed dim is not `config.emb_dim`.
  """
  prompt = prompt_initializers.load_prompt_file(path)
  if prompt.shape[1] != config.emb_dim:
    raise ValueError(f"Prompt {path!r} has shape {prompt.shape}: embed dim {prompt.shape[1]}, but the "
                     f"model's config has emb_dim={config.emb_dim}. Use the config of the model the "
                     "prompt was trained for (e.g. t5_config('t5_1_1_lm100k', 'base') for 768).")
  return prompt


def write_atomically(path: str, write: Callable[[IO[bytes]], Any]) -> None:
  """Calls `write(file)` on a temporary file beside `path`, then renames it to `path`."""
  fd, temp_path = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                                   prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(temp_path, 0o644)  # mkstemp's 0o600 would hide the adapter from other users.
    os.replace(temp_path, path)
  except BaseException:
    os.remove(temp_path)
    raise


def read_adapter_config(path: str) -> dict[str, Any]:
  """A PEFT adapter's `adapter_config.json` as a dict; AdapterError if it is not a JSON object."""
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise AdapterError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise AdapterError(f"{path} holds a {type(config).__name__}, not a JSON object.")
  return config


def read_adapter_weights(path: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file as numpy arrays (bfloat16 through ml_dtypes)."""
  try:
    return {name: np.asarray(array) for name, array in safetensors.flax.load_file(path).items()}
  except Exception as e:  # safetensors raises its own error types for corrupt files.
    raise AdapterError(f"{path} is not a readable safetensors file: {e}") from e
