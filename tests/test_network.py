"""The Flax T5 and its prompt hook: parameter names and axes, prompt placement, masks, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning_jax import checkpoints, config, network, prompt_initializers, prompts, trees

INPUTS = np.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 1, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([[11, 12, 1, 0], [13, 1, 0, 0]], np.int32)
DECODER_INPUTS = np.array([[0, 11, 12, 1], [0, 13, 1, 0]], np.int32)


def _with_prompt(params, prompt):
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["encoder"] = dict(params["encoder"], prompt={"prompt": {"prompt": prompt}})
  return params


def test_t5x_parameter_names_and_logical_axes():
  cfg = config.t5_config("t5_1_1", "tiny")
  model = network.T5(cfg, prompts.PromptConfig(5))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), INPUTS, DECODER_INPUTS)
  specs = jax.tree_util.tree_map(tuple, nn.get_partition_spec(variables)["params"],
                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(variables)["params"])
  assert shapes["token_embedder"]["embedding"] == (32128, 4)
  assert shapes["encoder"]["relpos_bias"]["rel_embedding"] == (2, 4)
  assert shapes["encoder"]["layers_1"]["attention"]["query"]["kernel"] == (4, 4)
  assert shapes["encoder"]["layers_0"]["mlp"]["wi_1"]["kernel"] == (4, 8)
  assert shapes["decoder"]["layers_1"]["encoder_decoder_attention"]["out"]["kernel"] == (4, 4)
  assert shapes["decoder"]["logits_dense"]["kernel"] == (4, 32128)
  assert shapes["encoder"]["prompt"]["prompt"]["prompt"] == (5, 4)
  assert specs["encoder"]["prompt"]["prompt"]["prompt"] == ("prompt", "prompt_embed")
  assert specs["token_embedder"]["embedding"] == ("vocab", "embed")
  assert specs["encoder"]["layers_0"]["attention"]["out"]["kernel"] == ("joined_kv", "embed")
  assert specs["decoder"]["layers_0"]["mlp"]["wo"]["kernel"] == ("mlp", "embed")
  assert specs["decoder"]["relpos_bias"]["rel_embedding"] == ("heads", "relpos_buckets")
  assert specs["decoder"]["logits_dense"]["kernel"] == ("embed", "vocab")
  # Every parameter is annotated.
  leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, tuple))
  assert len(leaves) == len(jax.tree_util.tree_leaves(variables))
  assert all(len(spec) >= 1 and all(spec) for spec in leaves)


def test_t5_1_0_is_plain_relu_with_tied_logits():
  cfg = config.t5_config("t5_1_0", "tiny")
  variables = jax.eval_shape(network.T5(cfg).init, jax.random.PRNGKey(0), INPUTS, DECODER_INPUTS)
  params = nn.unbox(variables)["params"]
  assert "logits_dense" not in params["decoder"]
  assert set(params["encoder"]["layers_0"]["mlp"]) == {"wi", "wo"}


@pytest.mark.parametrize("version,size,expected", [
    ("t5_1_1", "xxl", (4096, 64, 64, 10240, 24, 24, 32128)),
    ("t5_1_0", "base", (768, 12, 64, 3072, 12, 12, 32128)),
    ("mt5", "small", (512, 6, 64, 1024, 8, 8, 250112)),
    ("byt5", "small", (1472, 6, 64, 3584, 12, 4, 384)),
])
def test_presets_have_the_released_dimensions(version, size, expected):
  cfg = config.t5_config(version, size)
  assert (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.num_encoder_layers,
          cfg.num_decoder_layers, cfg.vocab_size) == expected


def test_bad_config_values_are_named():
  with pytest.raises(ValueError, match="Unknown T5 size 'huge'"):
    config.t5_config("t5_1_1", "huge")
  with pytest.raises(ValueError, match="num_heads must be positive"):
    config.t5_config("t5_1_1", "tiny", num_heads=0)
  with pytest.raises(ValueError, match="combination 'middle'"):
    prompts.PromptConfig(4, combine="middle")


def test_prompt_is_just_extra_input_positions(tiny_config, tiny_params):
  """The prompted encoder equals the plain encoder fed the prompt as embeddings of spare token ids."""
  length = 3
  prompt = jax.random.normal(jax.random.PRNGKey(1), (length, tiny_config.emb_dim))
  prompted = network.T5(tiny_config, prompts.PromptConfig(length))
  encode = jax.jit(lambda p, x: prompted.apply({"params": p}, x, method=network.T5.encode))
  encoded, mask = encode(_with_prompt(tiny_params, prompt), INPUTS)

  spare_ids = np.arange(tiny_config.vocab_size - length, tiny_config.vocab_size)
  plain_params = jax.tree_util.tree_map(lambda x: x, tiny_params)
  plain_params["token_embedder"] = {
      "embedding": tiny_params["token_embedder"]["embedding"].at[spare_ids].set(prompt)}
  plain_inputs = np.concatenate([np.tile(spare_ids, (2, 1)), INPUTS], axis=1)
  plain = network.T5(tiny_config)
  expected, expected_mask = jax.jit(
      lambda p, x: plain.apply({"params": p}, x, method=network.T5.encode))(plain_params, plain_inputs)
  real = np.concatenate([np.ones((2, length), bool), INPUTS > 0], axis=1)
  np.testing.assert_array_equal(mask, real)
  np.testing.assert_array_equal(expected_mask, real)
  np.testing.assert_allclose(np.asarray(encoded)[real], np.asarray(expected)[real], atol=1e-6)

  # The decoder's cross-attention sees the prompt positions: logits agree too.
  logits = jax.jit(lambda p: prompted.apply({"params": p}, INPUTS, DECODER_INPUTS, TARGETS))(
      _with_prompt(tiny_params, prompt))
  expected_logits = jax.jit(lambda p: plain.apply({"params": p}, plain_inputs, DECODER_INPUTS,
                                                  TARGETS))(plain_params)
  np.testing.assert_allclose(np.asarray(logits)[TARGETS > 0], np.asarray(expected_logits)[TARGETS > 0],
                             atol=1e-5)


def _combine(mode, prompt, x, mask):
  fn = {"prefix": prompts.combine_prefix, "prefix_after_bos": prompts.combine_prefix_after_bos,
        "suffix": prompts.combine_suffix}[mode]
  return jax.jit(fn)(prompt, x, mask)


def test_prompt_combinations_place_the_prompt():
  # Token ids stand in for embeddings (embed dim 1); the prompt is -1, -2.
  x = np.array([[[5], [6], [7], [1], [0]], [[8], [1], [0], [0], [0]]], np.float32)
  mask = x[..., 0] > 0
  prompt = np.tile(np.array([[[-1], [-2]]], np.float32), (2, 1, 1))
  expected = {
      "prefix": [[-1, -2, 5, 6, 7, 1, 0], [-1, -2, 8, 1, 0, 0, 0]],
      "prefix_after_bos": [[5, -1, -2, 6, 7, 1, 0], [8, -1, -2, 1, 0, 0, 0]],
      "suffix": [[5, 6, 7, -1, -2, 1, 0], [8, -1, -2, 1, 0, 0, 0]],
  }
  for mode, want in expected.items():
    out, out_mask = _combine(mode, prompt, x, mask)
    np.testing.assert_array_equal(out[..., 0], np.array(want, np.float32), err_msg=mode)
    np.testing.assert_array_equal(out_mask, np.array(want) != 0, err_msg=mode)


def test_bfloat16_activations_stay_close_to_float32(tiny_config, tiny_params):
  logits = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = network.T5(tiny_config.replace(dtype=dtype))
    logits[dtype] = jax.jit(lambda p: model.apply({"params": p}, INPUTS, DECODER_INPUTS, TARGETS))(
        tiny_params)
  assert logits[jnp.bfloat16].dtype == jnp.float32
  np.testing.assert_allclose(logits[jnp.bfloat16], logits[jnp.float32], atol=0.15)


def test_dropout_needs_and_uses_an_rng(tiny_config, tiny_params):
  model = network.T5(tiny_config.replace(dropout_rate=0.5))
  apply = jax.jit(lambda p, key: model.apply({"params": p}, INPUTS, DECODER_INPUTS, TARGETS,
                                             enable_dropout=True, rngs={"dropout": key}))
  a = apply(tiny_params, jax.random.PRNGKey(0))
  b = apply(tiny_params, jax.random.PRNGKey(1))
  assert not np.allclose(a, b)
  deterministic = jax.jit(lambda p: model.apply({"params": p}, INPUTS, DECODER_INPUTS, TARGETS))
  np.testing.assert_array_equal(deterministic(tiny_params), deterministic(tiny_params))


def test_random_uniform_prompt_init_is_in_range(tiny_config, tiny_params):
  init = jax.jit(prompt_initializers.random_uniform(0.3), static_argnums=(1, 2))
  prompt = init(jax.random.PRNGKey(0), (6, tiny_config.emb_dim), jnp.float32)
  assert prompt.shape == (6, tiny_config.emb_dim)
  assert float(jnp.max(jnp.abs(prompt))) <= 0.3


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scanned_layers_equal_one_module_per_layer(tiny_config, tiny_params, remat_policy):
  """`scan_layers` stacks the same parameters on a `layers` axis; logits and prompt gradients agree."""
  cfg = tiny_config
  execution = config.ExecutionConfig(remat_policy=remat_policy)
  scanned = execution.replace(scan_layers=True)
  prompt = jax.random.normal(jax.random.PRNGKey(1), (3, cfg.emb_dim))
  params = _with_prompt(tiny_params, prompt)
  stacked = trees.unflatten(checkpoints.stack_layers(trees.flatten(params), True))
  variables = jax.eval_shape(network.T5(cfg, prompts.PromptConfig(3), scanned).init,
                             jax.random.PRNGKey(0), INPUTS, DECODER_INPUTS)
  assert (jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(variables)["params"])
          == jax.tree_util.tree_map(np.shape, stacked))
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["encoder"]["layers"]["attention"]["query"]["kernel"]) == (
      "layers", "embed", "joined_kv")
  assert stacked["decoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (
      cfg.num_decoder_layers, cfg.mlp_dim, cfg.emb_dim)

  def loss_and_grad(execution, p):
    model = network.T5(cfg, prompts.PromptConfig(3), execution)
    def loss(prompt_value):
      logits = model.apply({"params": _with_prompt(p, prompt_value)}, INPUTS, DECODER_INPUTS, TARGETS)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(prompt)
  (_, logits), grad = loss_and_grad(execution, params)
  (_, scanned_logits), scanned_grad = loss_and_grad(scanned, stacked)
  np.testing.assert_allclose(scanned_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scanned_grad, grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
@pytest.mark.parametrize("implementation", ["cpu"])
def test_every_attention_implementation_gives_xlas_logits_and_prompt_gradients(
    tiny_config, implementation, dropout_rate):
  """Under `jax.jit`, with a prompt, padding, a cross-attention that goes through its inputs and a
  batch split in chunks: the logits and the prompt's gradient of `"xla"`, within float32 rounding.
  With dropout the masks are drawn alike, so they agree too. (`"cudnn"`: tests/test_attention.py,
  on a GPU.)"""
  cfg = tiny_config.replace(num_heads=3, dropout_rate=dropout_rate)
  inputs = np.concatenate([INPUTS, INPUTS[::-1]])  # a batch of 4: two chunks
  decoder_inputs, targets = (np.concatenate([x, x[::-1]]) for x in (DECODER_INPUTS, TARGETS))
  prompt = jax.random.normal(jax.random.PRNGKey(1), (3, cfg.emb_dim))
  results = {}
  for name in ("xla", implementation):
    model = network.T5(cfg, prompts.PromptConfig(3), config.ExecutionConfig(attention=name))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), inputs, decoder_inputs))["params"]

    def loss(prompt_value, params=params, model=model):
      logits = model.apply({"params": _with_prompt(params, prompt_value)}, inputs, decoder_inputs,
                           targets, enable_dropout=dropout_rate > 0,
                           rngs={"dropout": jax.random.PRNGKey(2)})
      return jnp.sum(jax.nn.log_softmax(logits)[..., 1:4]), logits
    results[name] = jax.jit(jax.value_and_grad(loss, has_aux=True))(prompt)
  (_, logits), grad = results["xla"]
  (_, other_logits), other_grad = results[implementation]
  np.testing.assert_allclose(other_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(other_grad, grad, rtol=1e-4, atol=1e-5)


def test_execution_config_is_refused_when_unknown_or_unresolved(tiny_config):
  with pytest.raises(ValueError, match="ATTENTION_IMPLEMENTATION='bogus'"):
    config.ExecutionConfig(attention="bogus")
  with pytest.raises(ValueError, match="attention_chunks=0"):
    config.ExecutionConfig(attention_chunks=0)
  with pytest.raises(ValueError, match="ExecutionConfig.scan_layers"):
    config.t5_config("t5_1_1", "tiny", scan_layers=True)
  auto = config.ExecutionConfig(attention="auto")
  with pytest.raises(ValueError, match="resolved"):
    jax.eval_shape(network.T5(tiny_config, execution=auto).init, jax.random.PRNGKey(0), INPUTS,
                   DECODER_INPUTS)
  bf16 = tiny_config.replace(dtype=jnp.bfloat16, head_dim=8)
  assert auto.for_platform("cpu", tiny_config).attention == "cpu"
  assert auto.for_platform("tpu", tiny_config).attention == "xla"
  assert auto.for_platform("gpu", tiny_config).attention == "xla"  # float32: cuDNN does not apply
  assert auto.for_platform("gpu", bf16).attention == "cudnn"
  assert config.ExecutionConfig(attention="cpu").for_platform("tpu", bf16).attention == "cpu"
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    config.ExecutionConfig(attention="cudnn").for_platform("cpu", bf16)
