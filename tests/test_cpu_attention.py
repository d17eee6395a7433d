"""The `"cpu"` attention implementation (`cpu_attention`): the prompt projected once, cross-attention
through its inputs, the core in batch chunks; each gives the plain computation's values and
gradients."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax import config, cpu_attention, layers, network, prompts

INPUTS = np.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 1, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([[11, 12, 1, 0], [13, 1, 0, 0]], np.int32)
DECODER_INPUTS = np.array([[0, 11, 12, 1], [0, 13, 1, 0]], np.int32)
CPU = config.ExecutionConfig(attention="cpu")


def _with_prompt(params, prompt):
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["encoder"] = dict(params["encoder"], prompt={"prompt": {"prompt": prompt}})
  return params


def test_first_layer_with_the_prompt_as_a_shared_prefix_equals_the_full_rows(tiny_config):
  """`EncoderLayer` given its rows also as a `SharedPrefix` computes the same output and prompt gradient."""
  cfg = tiny_config.replace(num_heads=3)  # heads * kv = 12, apart from embed = 8
  layer = network.EncoderLayer(cfg, CPU)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  prefix = jax.random.normal(keys[0], (1, 3, 8))
  rest = jax.random.normal(keys[1], (2, 5, 8))
  bias = jax.random.normal(keys[2], (2, 3, 8, 8))
  rows = lambda p: jnp.concatenate([jnp.broadcast_to(p, (2, 3, 8)), rest], axis=1)
  params = layer.init(keys[3], rows(prefix), bias)
  full = lambda p: layer.apply(params, rows(p), bias)
  shared = lambda p: layer.apply(params, rows(p), bias, False, cpu_attention.SharedPrefix(p, rest))
  np.testing.assert_allclose(jax.jit(shared)(prefix), jax.jit(full)(prefix), rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(f(p)))))(prefix)
  np.testing.assert_allclose(grad(shared), grad(full), rtol=1e-4, atol=1e-5)



def test_a_single_prefix_prompt_is_projected_once_and_input_rows_take_no_input_gradient(
    tiny_config):
  """In the compiled prompt gradient, the first layer's query kernel multiplies the prompt once for the
  batch and the input rows forward only; its input gradient is the prompt's alone, `[P, embed]`."""
  cfg = tiny_config.replace(num_heads=3)  # heads * kv = 12, apart from embed = 8
  model = network.T5(cfg, prompts.PromptConfig(3), CPU)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), INPUTS, DECODER_INPUTS))["params"]

  def loss(prompt, params, inputs):
    logits = model.apply({"params": _with_prompt(params, prompt)}, inputs, DECODER_INPUTS, TARGETS)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0])
  hlo = jax.jit(jax.grad(loss)).lower(params["encoder"]["prompt"]["prompt"]["prompt"], params,
                                      INPUTS).compile().as_text()
  shapes = sorted(tuple(int(n) for n in re.search(r"f32\[([\d,]+)\]\S* dot\(", line)[1].split(","))
                  for line in hlo.splitlines()
                  if " dot(" in line and re.search(r"layers_0/attention/\S*query/dot_general", line))
  batch, length = INPUTS.shape
  # Forward: the prompt [3, heads * kv] once, the inputs [batch * length, heads * kv]; backward:
  # [3, embed]. Without the shared prefix: [batch * (length + 3), ...] both ways.
  assert shapes == sorted([(3, 12), (batch * length, 12), (3, cfg.emb_dim)])



def test_cross_attention_through_inputs_equals_projected_keys_and_values():
  """Few queries over many inputs take the reassociated path; it must equal T5's plain attention."""
  cfg = config.t5_config("t5_1_1", "tiny", emb_dim=16, num_heads=2, head_dim=8, mlp_dim=16)
  batch, queries, keys = 2, 3, 40
  assert cpu_attention.attends_through_inputs(queries, keys, cfg.emb_dim, cfg.head_dim)
  assert not cpu_attention.attends_through_inputs(keys, keys, cfg.emb_dim, cfg.head_dim)
  rng = np.random.default_rng(0)
  inputs_q = rng.normal(size=(batch, queries, cfg.emb_dim)).astype(np.float32)
  inputs_kv = rng.normal(size=(batch, keys, cfg.emb_dim)).astype(np.float32)
  key_mask = np.arange(keys)[None, :] < np.array([[keys], [25]])
  bias = layers.attention_bias(jnp.ones((batch, queries), bool), jnp.asarray(key_mask))
  attention = cpu_attention.CpuMultiHeadAttention(cfg, CPU)
  params = nn.unbox(attention.init(jax.random.PRNGKey(0), inputs_q, inputs_kv, bias))["params"]
  out = jax.jit(attention.apply)({"params": params}, inputs_q, inputs_kv, bias)

  kernel = lambda name: np.asarray(params[name]["kernel"], np.float64)
  heads = lambda x: x.reshape(x.shape[:2] + (cfg.num_heads, cfg.head_dim))
  query, key, value = (heads(x @ kernel(n)) for x, n in ((inputs_q, "query"), (inputs_kv, "key"),
                                                           (inputs_kv, "value")))
  logits = np.einsum("bqhd,bkhd->bhqk", query, key) + np.asarray(bias)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, queries, -1) @ kernel("out")
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)



def test_over_batch_chunks_interleaves_and_restores_the_order():
  x = jnp.arange(6 * 3, dtype=jnp.float32).reshape(6, 3)
  shared = jnp.full((1, 3), 100.0)
  # Each row gets its chunk's sum of first entries: chunk j holds examples j and j + 3.
  fn = lambda a, b: a * 2 + b + jnp.sum(a[:, 0])
  out = jax.jit(lambda a, b: cpu_attention.over_batch_chunks(fn, 3, a, b))(x, shared)
  chunk_sums = np.array([0 + 9, 3 + 12, 6 + 15, 0 + 9, 3 + 12, 6 + 15], np.float32)[:, None]
  np.testing.assert_array_equal(out, x * 2 + 100 + chunk_sums)
  np.testing.assert_array_equal(cpu_attention.over_batch_chunks(fn, 1, x, shared), x * 2 + 100 + 45)



def test_attention_in_batch_chunks_equals_one_chunk():
  """Self-attention's core in interleaved batch chunks: the same outputs and input gradients."""
  cfg = config.t5_config("t5_1_1", "tiny", emb_dim=16, num_heads=2, head_dim=8, mlp_dim=16)
  batch, length = 4, 6
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(size=(batch, length, cfg.emb_dim)), jnp.float32)
  mask = jnp.asarray(np.arange(length)[None, :] < np.array([[6], [4], [6], [2]]))
  bias = layers.attention_bias(mask, mask) + jnp.asarray(rng.normal(size=(1, 2, length, length)),
                                                           jnp.float32)
  params = nn.unbox(cpu_attention.CpuMultiHeadAttention(cfg, CPU).init(jax.random.PRNGKey(0), inputs, inputs,
                                                         bias))["params"]

  def out_and_grad(chunks, bias):
    attention = cpu_attention.CpuMultiHeadAttention(cfg, CPU.replace(attention_chunks=chunks))
    loss = lambda x: jnp.sum(jnp.sin(attention.apply({"params": params}, x, x, bias)))
    return jax.jit(jax.value_and_grad(loss))(inputs)

  for b in (bias, bias[:1]):  # per example, and one bias for the whole batch
    expected = out_and_grad(1, b)
    for chunks in (2, 4, 3):  # 3 does not divide the batch: one chunk
      np.testing.assert_allclose(out_and_grad(chunks, b)[0], expected[0], rtol=1e-6)
      np.testing.assert_allclose(out_and_grad(chunks, b)[1], expected[1], rtol=1e-5, atol=1e-6)
