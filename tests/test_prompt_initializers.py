"""Every prompt initialiser under jax.jit, the class-label one with the real T5 SentencePiece model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import prompt_initializers as inits
from prompt_tuning_jax import vocabularies

VOCAB, EMBED = 32128, 6


@pytest.fixture(scope="module")
def embedding():
  return np.random.RandomState(0).normal(size=(VOCAB, EMBED)).astype(np.float32)


def _run(init, shape):
  return jax.jit(init, static_argnums=(1, 2))(jax.random.PRNGKey(0), shape, jnp.float32)


def test_class_labels_average_sub_token_embeddings(embedding):
  vocab = vocabularies.t5_vocabulary()
  labels = ["entailment", "not_entailment"]
  prompt = _run(inits.from_class_labels(embedding, vocab, labels), (5, EMBED))
  for i, label in enumerate(labels):
    ids = vocab.encode(label)
    assert len(ids) >= 1
    np.testing.assert_allclose(prompt[i], embedding[ids].mean(axis=0), rtol=1e-6)
  # The rest are rows of the first 5000 embeddings (the sampled-vocabulary fallback).
  for row in np.asarray(prompt[2:]):
    assert np.any(np.all(np.isclose(embedding[:5000], row), axis=1))
  # "not_entailment" is several sub-tokens in the real vocabulary, so the mean is not a single row.
  assert len(vocab.encode("not_entailment")) > 1


def test_class_labels_that_do_not_fit_are_named(embedding):
  init = inits.from_class_labels(embedding, vocabularies.t5_vocabulary(), ["yes", "no", "maybe"])
  with pytest.raises(ValueError, match="3 rows do not fit a prompt of length 2"):
    _run(init, (2, EMBED))
  with pytest.raises(ValueError, match="embed_dim is 7 but the embedding table's is 6"):
    _run(init, (4, 7))
  with pytest.raises(ValueError, match="CLASS_LABELS is empty"):
    inits.from_class_labels(embedding, vocabularies.t5_vocabulary(), [])


def test_sampled_vocab_draws_distinct_rows_of_the_population(embedding):
  prompt = np.asarray(_run(inits.from_sampled_vocab(embedding, population_size=50), (20, EMBED)))
  matches = [np.flatnonzero(np.all(embedding[:50] == row, axis=1)) for row in prompt]
  assert all(len(m) == 1 for m in matches)
  assert len({int(m[0]) for m in matches}) == 20
  with pytest.raises(ValueError, match="population_size must be in"):
    inits.from_sampled_vocab(embedding, population_size=VOCAB + 1)


def test_from_string_embeds_the_text_then_falls_back(embedding):
  vocab = vocabularies.t5_vocabulary()
  text = "Is this review positive?"
  ids = vocab.encode(text)
  prompt = _run(inits.from_string(embedding, vocab, text), (len(ids) + 2, EMBED))
  np.testing.assert_array_equal(prompt[:len(ids)], embedding[ids])


def test_from_array_and_npy_check_shape_and_dtype(tmp_path, shared_dir):
  released = shared_dir / "prompts" / "t5_1_1_lm100k_base" / "rte.npy"
  prompt = _run(inits.from_npy(str(released)), (100, 768))
  np.testing.assert_array_equal(prompt, np.load(released))
  with pytest.raises(ValueError, match=r"the prompt is \(100, 768\) but the model wants \(50, 768\)"):
    _run(inits.from_npy(str(released)), (50, 768))
  np.save(tmp_path / "ints.npy", np.zeros((4, 4), np.int32))
  with pytest.raises(ValueError, match=r"holds a int32 array of shape \(4, 4\)"):
    inits.from_npy(str(tmp_path / "ints.npy"))
  (tmp_path / "junk.npy").write_bytes(b"not numpy")
  with pytest.raises(ValueError, match="is not a numpy .npy array"):
    inits.from_npy(str(tmp_path / "junk.npy"))
  with pytest.raises(FileNotFoundError, match="No prompt file"):
    inits.from_npy(str(tmp_path / "missing.npy"))


@pytest.mark.parametrize("contents, message", [
    (b"", "is not a numpy .npy array .*No data left in file"),
    ("truncated", "is not a numpy .npy array .*mmap length is greater than file size"),
    ("huge", "is not a numpy .npy array"),
    ("npz", r"is a .npz archive of \['prompt'\]"),
    (np.zeros(4, np.float32), r"holds a float32 array of shape \(4,\)"),
    (np.zeros((1, 3, 4), np.float32), r"holds a float32 array of shape \(1, 3, 4\)"),
    (np.zeros((0, 4), np.float32), r"holds a float32 array of shape \(0, 4\)"),
    (np.array([[0.0, np.nan], [np.inf, -np.inf]], np.float32), "holds 3 NaN or Inf values"),
], ids=["empty", "truncated", "huge_header", "npz", "1d", "3d", "no_rows", "nan_inf"])
def test_load_prompt_file_refuses_malformed_files(tmp_path, contents, message):
  path = tmp_path / "prompt.npy"
  if isinstance(contents, np.ndarray):
    np.save(path, contents)
  elif contents == "npz":
    with open(path, "wb") as f:
      np.savez(f, prompt=np.zeros((3, 4), np.float32))
  elif contents in ("truncated", "huge"):
    np.save(path, np.zeros((3, 4), np.float32))
    data = path.read_bytes()
    # Truncated: the header and 3 of 12 floats. Huge: a header that claims 4 TB of floats.
    header = data[:data.index(b"\n")]
    huge = header.replace(b"(3, 4)", b"(1000000, 1000000)").rstrip(b" ").ljust(len(header))
    path.write_bytes(data[:140] if contents == "truncated" else huge + data[len(header):])
  else:
    path.write_bytes(contents)
  with pytest.raises(ValueError, match=message):
    inits.load_prompt_file(str(path))


def test_random_uniform_rejects_a_non_matrix_shape():
  with pytest.raises(ValueError, match=r"\[prompt_length, embed_dim\]"):
    _run(inits.random_uniform(), (3, 4, 5))

