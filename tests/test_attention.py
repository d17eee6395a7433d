"""`attention.dot_product_attention`'s cores and `attention.attention_over_inputs` against JAX's own
attention and softmaxes differentiated by JAX."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import attention

BATCH, Q, K, HEADS, KV = 2, 5, 7, 3, 4


def _inputs(bias_shape, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  query = jax.random.normal(keys[0], (BATCH, Q, HEADS, KV))
  key = jax.random.normal(keys[1], (BATCH, K, HEADS, KV))
  value = jax.random.normal(keys[2], (BATCH, K, HEADS, KV))
  bias = jax.random.normal(keys[3], bias_shape)
  d_context = jax.random.normal(keys[4], (BATCH, Q, HEADS, KV))
  return query, key, value, bias, d_context


def _reference(query, key, value, bias, dropout_scale=None):
  """Softmax attention as written (logits, softmax, dropout, context), differentiated by JAX."""
  weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", query, key) + bias, axis=-1)
  if dropout_scale is not None:
    weights = weights * dropout_scale
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _value_and_grads(fn, *inputs_and_d_context):
  """`fn`'s output on all but the last argument, and the gradients of `<output, last argument>` for
  each of them, jitted."""
  *inputs, d_context = inputs_and_d_context

  def run(*inputs):
    out, vjp = jax.vjp(fn, *inputs)
    return out, vjp(d_context)
  return jax.jit(run)(*inputs)


def _core(implementation):
  return functools.partial(attention.dot_product_attention, implementation=implementation)


CPU_CORES = ("xla", "cpu")  # the cores that run on any device


@pytest.mark.parametrize("implementation", CPU_CORES)
@pytest.mark.parametrize("bias_shape", [(BATCH, HEADS, Q, K), (1, HEADS, Q, K), (BATCH, 1, Q, K), (Q, K)])
def test_values_and_gradients_match_jax_attention(bias_shape, implementation):
  query, key, value, bias, d_context = _inputs(bias_shape)
  ours, our_grads = _value_and_grads(_core(implementation), query, key, value, bias, d_context)
  # JAX's own implementation (no 1/sqrt(kv) scaling in T5), [batch, length, heads, kv] as ours.
  theirs, their_grads = _value_and_grads(
      lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, bias=jnp.broadcast_to(
          b, (BATCH, HEADS, Q, K)), scale=1.0, implementation="xla"),
      query, key, value, bias, d_context)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  for name, mine, other in zip(("query", "key", "value", "bias"), our_grads, their_grads):
    assert mine.shape == other.shape, name
    np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_in_bfloat16():
  query, key, value, bias, d_context = (x.astype(jnp.bfloat16) for x in _inputs((1, HEADS, Q, K)))
  ours = _value_and_grads(_core("cudnn"), query, key, value, bias, d_context)
  theirs = _value_and_grads(_core("xla"), query, key, value, bias, d_context)
  for mine, other in zip(jax.tree_util.tree_leaves(ours)[:4], jax.tree_util.tree_leaves(theirs)):
    np.testing.assert_allclose(np.float32(mine), np.float32(other), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("implementation", CPU_CORES)
def test_dropout_scale_matches_dropout_on_the_weights(implementation):
  """T5X's dropout: one keep mask per key for every query, the weights scaled by 1 / keep."""
  query, key, value, bias, d_context = _inputs((1, HEADS, Q, K), seed=1)
  scale = jax.jit(attention.dropout_scale, static_argnums=(1, 2, 3))(
      jax.random.PRNGKey(7), 0.4, (BATCH, HEADS, Q, K), jnp.float32)
  assert scale.shape == (BATCH, HEADS, 1, K)
  np.testing.assert_allclose(np.unique(np.asarray(scale)), [0.0, 1 / 0.6], rtol=1e-6)
  ours = _value_and_grads(lambda *a: _core(implementation)(*a, scale), query, key, value, bias,
                          d_context)
  theirs = _value_and_grads(lambda *a: _reference(*a, scale), query, key, value, bias, d_context)
  for mine, other in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
    np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", CPU_CORES)
def test_masked_rows(implementation):
  """A query row whose keys are all masked: finite, the average of the values, as a softmax over
  equal logits gives."""
  query, key, value, bias, d_context = _inputs((BATCH, HEADS, Q, K), seed=2)
  bias = bias.at[:, :, 0, :].set(-1e10)
  ours, our_grads = _value_and_grads(_core(implementation), query, key, value, bias, d_context)
  theirs, their_grads = _value_and_grads(_reference, query, key, value, bias, d_context)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[:, 0], value.mean(axis=1), rtol=1e-5, atol=1e-5)
  for mine, other in zip(our_grads, their_grads):
    assert np.all(np.isfinite(mine))
    np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", CPU_CORES)
def test_dtypes(implementation):
  """bfloat16 inputs: logits and softmax in `logits_dtype`, the context in the values' dtype."""
  query, key, value, bias, _ = _inputs((1, HEADS, Q, K), seed=3)
  low = [x.astype(jnp.bfloat16) for x in (query, key, value)]
  out = jax.jit(_core(implementation))(*low, bias)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), _reference(*low, bias).astype(np.float32),
                             rtol=5e-2, atol=5e-2)
  with pytest.raises(ValueError, match="'bogus'"):
    attention.dot_product_attention(query, key, value, bias, implementation="bogus")


EMBED = 6


def _over_inputs_inputs(bias_shape, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  query = jax.random.normal(keys[0], (BATCH, Q, HEADS, EMBED))
  inputs = jax.random.normal(keys[1], (BATCH, K, EMBED))
  bias = jax.random.normal(keys[2], bias_shape)
  d_context = jax.random.normal(keys[3], (BATCH, Q, HEADS, EMBED))
  return query, inputs, bias, d_context


def _over_inputs_reference(query, inputs, bias, dropout_scale=None):
  """Softmax over the keys of `[batch, k, q, heads]` logits, differentiated by JAX."""
  weights = jax.nn.softmax(jnp.einsum("bqhe,bke->bkqh", query, inputs) + bias, axis=1)
  if dropout_scale is not None:
    weights = weights * dropout_scale
  return jnp.einsum("bkqh,bke->bqhe", weights, inputs)


@pytest.mark.parametrize("bias_shape", [(BATCH, K, Q, HEADS), (BATCH, K, Q, 1), (1, K, Q, HEADS)])
def test_over_inputs_matches_jax_attention(bias_shape):
  """Against `jax.nn.dot_product_attention` with the inputs as every head's keys and values: the
  inputs' gradient is the sum of the keys' and the values' over heads."""
  query, inputs, bias, d_context = _over_inputs_inputs(bias_shape)
  ours, our_grads = _value_and_grads(attention.attention_over_inputs, query, inputs, bias,
                                       d_context)

  def theirs_fn(query, inputs, bias):
    per_head = jnp.broadcast_to(inputs[:, :, None, :], (BATCH, K, HEADS, EMBED))
    bias = jnp.transpose(jnp.broadcast_to(bias, (BATCH, K, Q, HEADS)), (0, 3, 2, 1))
    return jax.nn.dot_product_attention(query, per_head, per_head, bias=bias, scale=1.0,
                                        implementation="xla")

  theirs, their_grads = _value_and_grads(theirs_fn, query, inputs, bias, d_context)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  for name, mine, other in zip(("query", "inputs", "bias"), our_grads, their_grads):
    assert mine.shape == other.shape, name
    np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-5, err_msg=name)


def test_over_inputs_dropout_masked_rows_and_dtypes():
  """Dropout against the softmax differentiated by JAX; a query whose keys are all masked is finite
  (the mean of the inputs); bfloat16 inputs give a bfloat16 context."""
  query, inputs, bias, d_context = _over_inputs_inputs((BATCH, K, Q, 1), seed=4)
  bias = bias.at[:, :, 0].set(-1e10)
  keep = jax.random.bernoulli(jax.random.PRNGKey(8), 0.7, (BATCH, K, Q, HEADS))
  scale = jnp.where(keep, 1 / 0.7, 0.0)
  ours = _value_and_grads(lambda *a: attention.attention_over_inputs(*a, scale), query, inputs,
                            bias, d_context)
  theirs = _value_and_grads(lambda *a: _over_inputs_reference(*a, scale), query, inputs, bias,
                              d_context)
  for mine, other in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
    assert np.all(np.isfinite(mine))
    np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-5)
  plain = jax.jit(attention.attention_over_inputs)(query, inputs, bias)
  mean = np.broadcast_to(inputs.mean(axis=1)[:, None], (BATCH, HEADS, EMBED))
  np.testing.assert_allclose(plain[:, 0], mean, rtol=1e-5, atol=1e-5)
  low = [x.astype(jnp.bfloat16) for x in (query, inputs)]
  out = jax.jit(attention.attention_over_inputs)(*low, bias)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32),
                             _over_inputs_reference(*low, bias).astype(np.float32), rtol=5e-2, atol=5e-2)
