"""Decoding with the key/value cache, checked against full forward passes without a cache."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import checkpoints, config, decoding, network, prompts, scoring, trees

INPUTS = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0], [11, 12, 13, 14, 15, 1]], np.int32)
LENGTH = 7


@pytest.fixture(scope="module")
def model_and_params(tiny_config, tiny_params):
  """A prompted tiny model: decoding must carry the prompt through the encoder."""
  model = network.T5(tiny_config, prompts.PromptConfig(2))
  params = dict(tiny_params, encoder=dict(
      tiny_params["encoder"],
      prompt={"prompt": {"prompt": jax.random.normal(jax.random.PRNGKey(3), (2, tiny_config.emb_dim))}}))
  return model, params


@pytest.fixture(scope="module")
def score_fn(model_and_params):
  model, _ = model_and_params
  return jax.jit(functools.partial(scoring.score, model))


@pytest.fixture(scope="module")
def greedy(model_and_params):
  model, params = model_and_params
  return jax.jit(functools.partial(decoding.greedy_decode, model, max_decode_length=LENGTH))(
      params, INPUTS)


def _scorable(tokens) -> np.ndarray:
  """Rows whose only 0s (pad) follow EOS: a decoded 0 elsewhere is masked out when scoring."""
  tokens = np.asarray(tokens)
  after_eos = np.cumsum(tokens == 1, axis=1) - (tokens == 1) > 0
  return np.all((tokens != 0) | after_eos, axis=1)


def _reference_greedy(model, params, inputs, length):
  """Greedy decoding by re-running the whole decoder for every position (no cache)."""
  forward = jax.jit(lambda p, d: model.apply({"params": p}, inputs, d))
  tokens = np.zeros((inputs.shape[0], length), np.int32)
  done = np.zeros(inputs.shape[0], bool)
  for i in range(length):
    logits = forward(params, np.asarray(scoring.shift_right(tokens)))
    chosen = np.where(done, 0, np.argmax(np.asarray(logits[:, i]), axis=-1))
    tokens[:, i] = chosen
    done |= chosen == 1
  return tokens


def test_greedy_with_cache_equals_uncached_greedy(model_and_params, greedy, score_fn):
  model, params = model_and_params
  tokens, log_likelihood = greedy
  np.testing.assert_array_equal(tokens, _reference_greedy(model, params, INPUTS, LENGTH))
  ok = _scorable(tokens)
  assert ok.any()
  np.testing.assert_allclose(np.asarray(log_likelihood)[ok],
                             np.asarray(score_fn(params, INPUTS, tokens))[ok], rtol=1e-5)


def test_sampling_with_top_k_1_or_tiny_top_p_is_greedy(model_and_params, greedy):
  model, params = model_and_params
  for kwargs in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
    sample = jax.jit(functools.partial(decoding.temperature_sample, model, max_decode_length=LENGTH,
                                       **kwargs))
    np.testing.assert_array_equal(sample(params, INPUTS, jax.random.PRNGKey(7))[0], greedy[0])


def test_sampling_is_seeded_and_scores_its_own_tokens(model_and_params, score_fn):
  model, params = model_and_params
  sample = jax.jit(functools.partial(decoding.temperature_sample, model, max_decode_length=LENGTH,
                                     temperature=2.0, top_k=20))
  a, a_ll = sample(params, INPUTS, jax.random.PRNGKey(1))
  b, _ = sample(params, INPUTS, jax.random.PRNGKey(1))
  c, _ = sample(params, INPUTS, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  ok = _scorable(a)
  assert ok.any()
  np.testing.assert_allclose(np.asarray(a_ll)[ok], np.asarray(score_fn(params, INPUTS, a))[ok],
                             rtol=1e-5)


def test_top_k_filter_keeps_exactly_k_tokens():
  logits = jnp.array([[0.1, 2.0, -1.0, 3.0, 0.5]])
  kept = jax.jit(decoding.filter_logits, static_argnums=(1, 2))(logits, 2, 1.0)
  np.testing.assert_array_equal(kept > decoding.NEG_INF / 2, [[False, True, False, True, False]])
  # Probabilities ~[.06, .38, .02, .52, .09]: the 0.8 nucleus is the top two tokens.
  kept = jax.jit(decoding.filter_logits, static_argnums=(1, 2))(logits, 0, 0.8)
  np.testing.assert_array_equal(kept > decoding.NEG_INF / 2, [[False, True, False, True, False]])


def test_beam_search_finds_at_least_greedy_and_scores_consistently(model_and_params, greedy,
                                                                   score_fn):
  model, params = model_and_params
  search = jax.jit(functools.partial(decoding.beam_search, model, max_decode_length=LENGTH,
                                     beam_size=4, alpha=0.0))
  beams, scores = search(params, INPUTS)
  assert beams.shape == (3, 4, LENGTH)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)  # best first
  greedy_tokens, greedy_ll = greedy
  finished = np.any(np.asarray(greedy_tokens) == 1, axis=1)
  assert np.all(np.asarray(scores[:, 0])[finished] >= np.asarray(greedy_ll)[finished] - 1e-5)
  for k in range(4):
    ok = _scorable(beams[:, k])
    np.testing.assert_allclose(np.asarray(scores[:, k])[ok],
                               np.asarray(score_fn(params, INPUTS, beams[:, k]))[ok], rtol=1e-5)

  one_beam, _ = jax.jit(functools.partial(decoding.beam_search, model, max_decode_length=LENGTH,
                                          beam_size=1, alpha=0.0))(params, INPUTS)
  np.testing.assert_array_equal(np.asarray(one_beam[:, 0])[finished],
                                np.asarray(greedy_tokens)[finished])


def test_length_penalty_divides_finished_scores(model_and_params, greedy, score_fn):
  model, params = model_and_params
  # A random model rarely says EOS: give EOS the logits of a token greedy picks, so beams end.
  kernel = params["decoder"]["logits_dense"]["kernel"]
  kernel = kernel.at[:, 1].set(kernel[:, int(greedy[0][0, 1])])
  params = dict(params, decoder=dict(params["decoder"], logits_dense={"kernel": kernel}))
  beams, scores = jax.jit(functools.partial(decoding.beam_search, model, max_decode_length=LENGTH,
                                            beam_size=3, alpha=0.8))(params, INPUTS)
  tokens = np.asarray(beams[:, 0])
  lengths = np.argmax(tokens == 1, axis=1) + 1
  ended = np.any(tokens == 1, axis=1) & _scorable(tokens)
  assert ended.any()
  expected = np.asarray(score_fn(params, INPUTS, beams[:, 0])) / decoding.length_penalty(lengths, 0.8)
  np.testing.assert_allclose(np.asarray(scores[:, 0])[ended], expected[ended], rtol=1e-5)


def test_rank_classify_equals_scoring_each_label(model_and_params, score_fn):
  model, params = model_and_params
  labels = np.array([[20, 21, 1], [22, 1, 0], [23, 24, 1]], np.int32)
  best, log_likelihood = jax.jit(functools.partial(scoring.rank_classify, model))(params, INPUTS,
                                                                                   labels)
  for j in range(3):
    np.testing.assert_allclose(log_likelihood[:, j],
                               score_fn(params, INPUTS, np.tile(labels[j], (3, 1))), rtol=1e-5)
  np.testing.assert_array_equal(best, np.argmax(log_likelihood, axis=1))


def test_bad_decoding_arguments_are_named(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="top_p"):
    decoding.temperature_sample(model, params, INPUTS, None, max_decode_length=3, top_p=0.0)
  with pytest.raises(ValueError, match="beam_size must be at least 1"):
    decoding.beam_search(model, params, INPUTS, max_decode_length=3, beam_size=0)



def test_scanned_layers_decode_like_one_module_per_layer(model_and_params, greedy):
  """The key/value cache is stacked with the scanned layers' parameters and decodes the same."""
  model, params = model_and_params
  scanned = network.T5(model.config, model.prompt_config, config.ExecutionConfig(scan_layers=True))
  stacked = trees.unflatten(checkpoints.stack_layers(trees.flatten(params), True))
  tokens, log_likelihood = jax.jit(functools.partial(
      decoding.greedy_decode, scanned, max_decode_length=LENGTH))(stacked, INPUTS)
  np.testing.assert_array_equal(tokens, greedy[0])
  np.testing.assert_allclose(log_likelihood, greedy[1], rtol=1e-5)
