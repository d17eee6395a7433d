"""Prompt initialisers with Flax's initializer signature `init(key, shape, dtype) -> array`.

`shape` is `(prompt_length, embed_dim)`. Initialisers that start from the model's vocabulary take the
token embedding table `[vocab, embed]` (e.g. `params["token_embedder"]["embedding"]` of the frozen model);
text is tokenised once, in Python, when the initialiser is built, so the returned function is pure and
can run under `jax.jit(init, static_argnums=(1, 2))`.
"""
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def _check_shape(name: str, shape: Sequence[int], embed_dim: Optional[int] = None):
  if len(shape) != 2:
    raise ValueError(f"{name}: a prompt is [prompt_length, embed_dim], but the shape asked for is "
                     f"{tuple(shape)}.")
  if embed_dim is not None and shape[1] != embed_dim:
    raise ValueError(f"{name}: the prompt's embed_dim is {shape[1]} but the embedding table's is "
                     f"{embed_dim}; pass the embedding of the model the prompt is for.")


def _as_embedding(name: str, embedding) -> np.ndarray:
  embedding = np.asarray(embedding)
  if embedding.ndim != 2:
    raise ValueError(f"{name}: the embedding table must be [vocab, embed], got shape {embedding.shape}.")
  return embedding


def random_uniform(scale: float = 0.5) -> Initializer:
  """Uniform in `[-scale, scale]` (the paper's random initialisation)."""
  if scale <= 0:
    raise ValueError(f"random_uniform: scale must be positive, got {scale}.")

  def init(key, shape, dtype=jnp.float32):
    _check_shape("random_uniform", shape)
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


def from_sampled_vocab(embedding, population_size: int = 5000) -> Initializer:
  """Each prompt position is the embedding of a token drawn uniformly from the first `population_size`.

  Tokens are drawn without replacement while the prompt is no longer than the population.
  """
  embedding = _as_embedding("from_sampled_vocab", embedding)
  if not 0 < population_size <= embedding.shape[0]:
    raise ValueError(f"from_sampled_vocab: population_size must be in [1, {embedding.shape[0]}] (the "
                     f"vocabulary size), got {population_size}.")
  table = jnp.asarray(embedding[:population_size])

  def init(key, shape, dtype=jnp.float32):
    _check_shape("from_sampled_vocab", shape, embedding.shape[1])
    ids = jax.random.choice(key, population_size, (shape[0],), replace=shape[0] > population_size)
    return table[ids].astype(dtype)
  return init


def _from_rows(name: str, rows: np.ndarray, fallback: Initializer) -> Initializer:
  """The first `len(rows)` positions are `rows`; the rest come from `fallback`."""

  def init(key, shape, dtype=jnp.float32):
    _check_shape(name, shape, rows.shape[1])
    if rows.shape[0] > shape[0]:
      raise ValueError(f"{name}: {rows.shape[0]} rows do not fit a prompt of length {shape[0]}; use a "
                       f"PROMPT_LENGTH of at least {rows.shape[0]}.")
    rest = fallback(key, (shape[0] - rows.shape[0], shape[1]), dtype)
    return jnp.concatenate([jnp.asarray(rows, dtype), rest.astype(dtype)], axis=0)
  return init


def from_class_labels(embedding, vocabulary, class_labels: Sequence[str],
                      fallback: Optional[Initializer] = None) -> Initializer:
  """Position i is the mean embedding of class label i's sub-tokens; the rest come from `fallback`.

  Args:
    embedding: the model's token embedding `[vocab, embed]`.
    vocabulary: anything with `encode(str) -> list[int]` (a seqio vocabulary).
    class_labels: the label words, e.g. `["entailment", "not_entailment"]`.
    fallback: fills the remaining positions; default `from_sampled_vocab(embedding)`.
  """
  embedding = _as_embedding("from_class_labels", embedding)
  if not class_labels:
    raise ValueError("from_class_labels: CLASS_LABELS is empty; give the task's label words.")
  rows = []
  for label in class_labels:
    ids = list(vocabulary.encode(label))
    if not ids:
      raise ValueError(f"from_class_labels: the label {label!r} tokenises to nothing.")
    if max(ids) >= embedding.shape[0]:
      raise ValueError(f"from_class_labels: label {label!r} has token id {max(ids)} outside the "
                       f"embedding table of {embedding.shape[0]} rows; is it the model's vocabulary?")
    rows.append(embedding[ids].mean(axis=0))
  fallback = fallback or from_sampled_vocab(embedding, min(5000, embedding.shape[0]))
  return _from_rows("from_class_labels", np.stack(rows), fallback)


def from_string(embedding, vocabulary, text: str,
                fallback: Optional[Initializer] = None) -> Initializer:
  """The first positions are the embeddings of `text`'s tokens; the rest come from `fallback`."""
  embedding = _as_embedding("from_string", embedding)
  ids = list(vocabulary.encode(text))
  if not ids:
    raise ValueError(f"from_string: {text!r} tokenises to nothing.")
  fallback = fallback or from_sampled_vocab(embedding, min(5000, embedding.shape[0]))
  return _from_rows("from_string", embedding[ids], fallback)


def from_array(array, name: str = "from_array") -> Initializer:
  """A fixed prompt, e.g. a trained one; the shape asked for must be the array's."""
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"{name}: a prompt must hold floats, got dtype {array.dtype}.")

  def init(key, shape, dtype=jnp.float32):
    del key
    _check_shape(name, shape)
    if tuple(shape) != array.shape:
      raise ValueError(f"{name}: the prompt is {array.shape} but the model wants {tuple(shape)} "
                       f"(PROMPT_LENGTH, embed_dim); use a prompt trained for this model and length.")
    return jnp.asarray(array, dtype)
  return init


def load_prompt_file(path: str) -> np.ndarray:
  """A prompt saved with `numpy.save` (with or without `.npy`, e.g. the official code's
  `numpy_checkpoints/checkpoint_N/encoder.prompt.prompt.prompt`): a finite float `[length, embed]`
  array.

  The file is memory-mapped first, so a header that claims more data than the file holds is an error
  rather than an allocation of that size.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No prompt file at {path!r} (PROMPT_FILE).")
  try:
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, EOFError) as e:
    raise ValueError(f"PROMPT_FILE {path!r} is not a numpy .npy array (empty, truncated or of "
                     f"another format: {e}); save the prompt with numpy.save.") from None
  if not isinstance(mapped, np.ndarray):  # an .npz archive
    names = list(mapped.files)
    mapped.close()
    raise ValueError(f"PROMPT_FILE {path!r} is a .npz archive of {names}, not a numpy .npy array; "
                     "save the prompt alone with numpy.save.")
  array = np.array(mapped)
  if array.ndim != 2 or not array.size or not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"PROMPT_FILE {path!r} holds a {array.dtype} array of shape {array.shape}; a "
                     "prompt is a float [prompt_length, embed_dim] array.")
  bad = np.count_nonzero(~np.isfinite(array))
  if bad:
    raise ValueError(f"PROMPT_FILE {path!r} holds {bad} NaN or Inf values; use a prompt saved "
                     "before the run diverged (an earlier numpy_checkpoints/checkpoint_N).")
  return array


def from_npy(path: str) -> Initializer:
  """The prompt in a numpy file (see `load_prompt_file`); the model's shape must be the file's."""
  return from_array(load_prompt_file(path), name=f"from_npy({path!r})")

