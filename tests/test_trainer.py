"""Prompt-only training: the freeze mask, the loss, Adafactor's recipe, the train step, accumulation."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_tuning_jax import (config, freezing, losses, network, optimizers, partitioning, prompts,
                               trainer, trees, xla_cpu)

BATCH = 8


def make_batch(vocab: int, seed: int = 0, batch: int = BATCH):
  rs = np.random.RandomState(seed)
  inputs = rs.randint(2, vocab, (batch, 10)).astype(np.int32)
  inputs[:, 7:] = 0
  inputs[:, 6] = 1
  targets = rs.randint(2, vocab, (batch, 4)).astype(np.int32)
  targets[:, 2], targets[:, 3] = 1, 0
  return dict(encoder_input_tokens=inputs, decoder_target_tokens=targets,
              decoder_input_tokens=np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
              decoder_loss_weights=(targets > 0).astype(np.float32))


@pytest.fixture(scope="module")
def setup(tiny_config, tiny_params):
  model = network.T5(tiny_config, prompts.PromptConfig(3))
  prompt = jax.random.uniform(jax.random.PRNGKey(5), (3, tiny_config.emb_dim), minval=-0.5, maxval=0.5)
  params = dict(tiny_params, encoder=dict(tiny_params["encoder"],
                                          prompt={"prompt": {"prompt": prompt}}))
  trainable, frozen = freezing.split(params, freezing.freeze_mask(params))
  optimizer = optimizers.prompt_tuning_adafactor()
  return model, trainable, frozen, optimizer


def test_freeze_mask_selects_the_prompt_and_split_merge_round_trips(setup):
  _, trainable, frozen, _ = setup
  assert list(trees.flatten(trainable)) == ["encoder/prompt/prompt/prompt"]
  merged = freezing.merge(trainable, frozen)
  assert len(trees.flatten(merged)) == len(trees.flatten(frozen)) + 1
  with pytest.raises(ValueError, match="No parameter matches"):
    freezing.freeze_mask(frozen)
  with pytest.raises(ValueError, match="both trainable and frozen"):
    freezing.merge(merged, frozen)
  mask = freezing.freeze_mask(merged, (r"encoder/prompt/.*", r".*layer_norm/scale"))
  assert sum(trees.flatten(mask).values()) == 1 + 2 * 2 + 3 * 2  # prompt + enc and dec norms


def test_only_the_prompt_learns_and_only_it_has_optimizer_state(setup):
  model, trainable, frozen, optimizer = setup
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  step = jax.jit(functools.partial(trainer.train_step, model=model, optimizer=optimizer))
  state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(0))
  batch = make_batch(model.config.vocab_size)
  first_loss = None
  for _ in range(20):
    state, metrics = step(state, frozen, batch)
    first_loss = first_loss if first_loss is not None else float(metrics["loss"])
  assert int(state.step) == 20
  assert float(metrics["loss"]) < 0.97 * first_loss  # the prompt alone lowers the loss
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)
  prompt_size = 3 * model.config.emb_dim
  for leaf in jax.tree_util.tree_leaves(state.opt_state):
    assert np.size(leaf) <= prompt_size
  assert not np.array_equal(state.trainable["encoder"]["prompt"]["prompt"]["prompt"],
                            trainable["encoder"]["prompt"]["prompt"]["prompt"])


def test_compiled_steps_take_the_platforms_dot_options_and_agree_with_a_plain_jit(setup):
  """`compile_train_step` and `compile_eval_step` compile with `xla_cpu.dot_compiler_options` (oneDNN's
  dots on AVX-512 CPUs): the same loss, prompt update and eval metrics as a plain `jax.jit`."""
  model, trainable, frozen, optimizer = setup
  mesh = partitioning.make_mesh()
  replicated = lambda tree: jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), tree)
  state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(0))
  batch = make_batch(model.config.vocab_size)
  compiled = trainer.compile_train_step(model, optimizer, mesh, replicated(state), replicated(frozen))
  onednn = "xla_cpu_use_onednn" in xla_cpu.dot_compiler_options(jax.devices()[0].platform)
  assert ("__onednn_fusion" in compiled.lower(state, frozen, batch).compile().as_text()) == onednn
  plain = jax.jit(trainer.with_finiteness(functools.partial(trainer.train_step, model=model,
                                                            optimizer=optimizer)))
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  (new, metrics), (expected, expected_metrics) = (
      step(copy(state), frozen, batch) for step in (compiled, plain))
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
  jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                         new.trainable, expected.trainable)
  eval_step = trainer.compile_eval_step(model, mesh, replicated(trainable), replicated(frozen))
  got, want = (step(trainable, frozen, batch) for step in (
      eval_step, jax.jit(functools.partial(trainer.eval_step, model=model))))
  jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-5), got, want)


def test_a_nonfinite_step_is_flagged_and_with_skip_dropped_on_the_device(setup):
  """`with_finiteness` under jit: a step whose loss (scaled by a traced factor) is NaN reports it, and
  with `skip_nonfinite` keeps its input's prompt and optimizer state while the step still counts."""
  model, trainable, frozen, optimizer = setup
  batch = make_batch(model.config.vocab_size)

  def scaled_step(state, frozen, batch, scale):
    new_state, metrics = trainer.train_step(state, frozen, batch, model=model, optimizer=optimizer)
    return new_state, dict(metrics, loss=metrics["loss"] * scale)

  state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(0))
  for skip in (False, True):
    step = jax.jit(lambda state, frozen, batch, scale, skip=skip: trainer.with_finiteness(
        functools.partial(scaled_step, scale=scale), skip)(state, frozen, batch))
    good, metrics = step(state, frozen, batch, 1.0)
    assert bool(metrics["loss_finite"]) and bool(metrics["prompt_finite"])
    bad, metrics = step(good, frozen, batch, jnp.nan)
    assert not bool(metrics["loss_finite"]) and bool(metrics["prompt_finite"])
    assert int(bad.step) == 2
    kept = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), (bad.trainable, bad.opt_state),
        (good.trainable, good.opt_state)))
    assert kept == skip


def test_a_prompt_longer_than_the_bound_is_flagged_and_with_skip_dropped(setup):
  """A learning rate of 1e30 leaves the loss finite and makes the prompt 1e30: finite, yet past any
  bound taken from the embeddings, so `prompt_bounded` is False."""
  model, trainable, frozen, _ = setup
  optimizer = optimizers.prompt_tuning_adafactor(learning_rate=1e30)
  batch = make_batch(model.config.vocab_size)
  state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(0))
  bound = 1e3 * float(trainer.max_row_norm(trainable))
  for skip in (False, True):
    step = jax.jit(trainer.with_finiteness(functools.partial(
        trainer.train_step, model=model, optimizer=optimizer), skip, norm_bound=bound))
    new, metrics = step(state, frozen, batch)
    assert bool(metrics["loss_finite"]) and bool(metrics["prompt_finite"])
    assert not bool(metrics["prompt_bounded"])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), new.trainable, state.trainable)) == skip
  _, metrics = jax.jit(trainer.with_finiteness(functools.partial(
      trainer.train_step, model=model, optimizer=optimizers.prompt_tuning_adafactor()),
      norm_bound=bound))(trainer.TrainState.create(trainable, optimizers.prompt_tuning_adafactor(),
                                                   jax.random.PRNGKey(0)), frozen, batch)
  assert bool(metrics["prompt_bounded"])


def _count_dots(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_backward_pass_skips_frozen_weight_gradients(setup):
  model, trainable, frozen, _ = setup
  batch = make_batch(model.config.vocab_size)

  def loss(params):
    logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    return losses.weighted_cross_entropy(logits, batch["decoder_target_tokens"],
                                         batch["decoder_loss_weights"])[0]

  prompt_only = _count_dots(jax.grad(lambda t: loss(freezing.merge(t, frozen))), trainable)
  everything = _count_dots(jax.grad(loss), freezing.merge(trainable, frozen))
  kernels = [path for path, _ in jax.tree_util.tree_leaves_with_path(frozen)
             if jax.tree_util.keystr(path).endswith("['kernel']")]
  assert len(kernels) == 2 * 7 + 2 * 11 + 1  # encoder and decoder layers' kernels, logits_dense
  assert everything - prompt_only >= len(kernels)  # at least one weight-gradient matmul per kernel


def test_microbatches_sum_to_the_full_batch_gradient(setup):
  model, trainable, frozen, optimizer = setup
  batch = make_batch(model.config.vocab_size, seed=1)
  results = {}
  for micro in (1, 4):
    for factor in (None, losses.NUM_REAL_TARGET_TOKENS):
      step = jax.jit(functools.partial(
          trainer.train_step, model=model, optimizer=optimizer, num_microbatches=micro,
          loss_config=trainer.LossConfig(loss_normalizing_factor=factor)))
      state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(0))
      results[micro, factor] = step(state, frozen, batch)
  for factor in (None, losses.NUM_REAL_TARGET_TOKENS):
    (s1, m1), (s4, m4) = results[1, factor], results[4, factor]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(s4.trainable["encoder"]["prompt"]["prompt"]["prompt"],
                               s1.trainable["encoder"]["prompt"]["prompt"]["prompt"], atol=1e-6)
  np.testing.assert_allclose(results[1, None][1]["loss"] / results[1, None][1]["real_tokens"],
                             results[1, losses.NUM_REAL_TARGET_TOKENS][1]["loss"], rtol=1e-5)


def test_cross_entropy_matches_optax_and_adds_z_loss():
  rs = np.random.RandomState(0)
  logits = jnp.asarray(rs.normal(size=(2, 3, 11)) * 3, jnp.float32)
  targets = jnp.array([[1, 4, 0], [7, 2, 9]])
  weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  fn = jax.jit(losses.weighted_cross_entropy, static_argnames=("label_smoothing", "z_loss"))
  loss, z = fn(logits, targets, weights, z_loss=0.0)
  reference = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)
  np.testing.assert_allclose(loss, reference, rtol=1e-6)
  assert float(z) == 0.0
  loss_z, z = fn(logits, targets, weights, z_loss=1e-4)
  log_z = jax.nn.logsumexp(logits, -1)
  np.testing.assert_allclose(z, 1e-4 * jnp.sum(jnp.square(log_z) * weights), rtol=1e-6)
  np.testing.assert_allclose(loss_z, reference + z, rtol=1e-6)
  # Label smoothing: a model that predicts the smoothed distribution exactly scores 0.
  smooth = 0.1
  probs = jax.nn.one_hot(targets, 11) * (1 - smooth - smooth / 10) + smooth / 10
  loss_ls, _ = fn(jnp.log(probs), targets, weights, label_smoothing=smooth, z_loss=0.0)
  np.testing.assert_allclose(loss_ls, 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="loss_normalizing_factor='tokens'"):
    losses.normalizing_factor("tokens", weights)


def test_predicted_tokens_are_jax_argmax_with_its_ties_and_nans():
  rs = np.random.RandomState(1)
  logits = rs.normal(size=(4, 3, 50)).astype(np.float32)
  logits[0, 0] = 0.0  # all tied: the first
  logits[0, 1, [5, 9, 30]] = 10.0  # a tie at the top: the first of them
  logits[1, 2, [7, 20]] = np.nan  # NaN: the first NaN, as jnp.argmax
  logits[2, 0, 3] = -np.inf
  logits[3, 1] = -np.inf
  ours = jax.jit(losses.predicted_tokens)(jnp.asarray(logits))
  assert ours.dtype == jnp.int32
  np.testing.assert_array_equal(ours, jnp.argmax(jnp.asarray(logits), -1))
  assert ours[0, 0] == 0 and ours[0, 1] == 5 and ours[1, 2] == 7 and ours[3, 1] == 0


def test_adafactor_step_offset_reproduces_t5x_decay():
  """With step_offset, the second-moment decay is that of T5X resuming at 1.1M steps."""
  grads = {"p": jnp.ones((2, 3))}
  params = {"p": jnp.zeros((2, 3))}

  def second_moment_after(grad_values, step_offset):
    opt = optimizers.prompt_tuning_adafactor(step_offset=step_offset, weight_decay=0.0)
    state = opt.init(params)
    for g in grad_values:
      _, state = opt.update({"p": grads["p"] * g}, state, params)
    return float(state.inner_state[0].v["p"][0, 0])

  # Fresh: the first step's decay is 1 - 1 ** -0.8 = 0, so v is the newest squared gradient.
  assert second_moment_after([1.0, 3.0], 0) == pytest.approx(
      (1 - 2.0 ** -0.8) * 1.0 + 2.0 ** -0.8 * 9.0, rel=1e-5)
  # Resumed at 1.1M: the first step keeps only 1.1e6 ** -0.8 of the new squared gradient (optax
  # computes the decay in float32, hence the tolerance).
  assert second_moment_after([1.0], 1_100_000) == pytest.approx(1_100_001.0 ** -0.8, rel=5e-3)


@pytest.mark.parametrize("learning_rate", [-1, 0, "fast", float("nan"), None, True])
def test_adafactor_refuses_a_learning_rate_that_is_not_a_positive_number(learning_rate):
  with pytest.raises(ValueError, match=r"LEARNING_RATE \(.*\) must be a positive number"):
    optimizers.prompt_tuning_adafactor(learning_rate=learning_rate)


def test_a_restored_optimizer_state_takes_the_runs_hyperparameters():
  """The learning rate lives in the optimizer state; `with_hyperparameters` puts this run's there,
  and the next update scales with it. Adafactor's statistics are kept."""
  params = {"p": jnp.zeros((2, 3))}
  grads = {"p": jnp.arange(6.0).reshape(2, 3)}
  old, new = (optimizers.prompt_tuning_adafactor(learning_rate=lr) for lr in (0.3, 0.01))
  _, saved = old.update(grads, old.init(params), params)
  restored = optimizers.with_hyperparameters(saved, new.init(params))
  assert optimizers.hyperparameters(saved)["learning_rate"] == 0.3
  assert optimizers.hyperparameters(restored)["learning_rate"] == 0.01
  assert restored.inner_state is saved.inner_state and restored.count is saved.count
  at_old, _ = old.update(grads, saved, params)
  at_new, _ = new.update(grads, restored, params)
  np.testing.assert_allclose(at_new["p"], at_old["p"] * 0.01 / 0.3, rtol=1e-5)


def test_mesh_and_batch_checks_name_the_problem():
  devices = jax.devices()
  with pytest.raises(ValueError, match="needs 4 devices"):
    partitioning.make_mesh((2, 2), devices[:1])
  with pytest.raises(ValueError, match="does not divide the 1 devices"):
    partitioning.make_mesh((-1, 3), devices[:1])
  mesh = partitioning.make_mesh((-1, 1))
  with pytest.raises(ValueError, match="BATCH_SIZE=6 does not divide into 1 data shards x 4"):
    partitioning.check_batch_divides(6, mesh, 4)


def test_rematerialisation_gives_the_same_loss_and_gradients(tiny_config):
  """Recomputing layers in the backward pass (with dropout on) changes nothing but memory."""
  batch = make_batch(tiny_config.vocab_size)
  results = {}
  for remat in ("none", "full", "dots"):
    model = network.T5(tiny_config.replace(dropout_rate=0.1), prompts.PromptConfig(3),
                       config.ExecutionConfig(remat_policy=remat))
    tokens = batch["encoder_input_tokens"][:1]
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens))["params"]
    trainable, frozen = freezing.split(params, freezing.freeze_mask(params))

    def loss(trainable, model=model, frozen=frozen):
      logits = model.apply({"params": freezing.merge(trainable, frozen)},
                           batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                           batch["decoder_target_tokens"], enable_dropout=True,
                           rngs={"dropout": jax.random.PRNGKey(1)})
      return losses.weighted_cross_entropy(logits, batch["decoder_target_tokens"],
                                           batch["decoder_loss_weights"])[0]
    results[remat] = jax.jit(jax.value_and_grad(loss))(trainable)
  for remat in ("full", "dots"):
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                           results[remat], results["none"])


def test_eval_loss_pads_the_last_batch_without_counting_it(setup):
  """evaluation.eval_loss over 8 rows in batches of 3 equals one eval_step over all 8."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import evaluation  # pylint: disable=g-import-not-at-top
  model, trainable, frozen, _ = setup
  batch = make_batch(model.config.vocab_size)
  step = jax.jit(functools.partial(trainer.eval_step, model=model))
  whole = step(trainable, frozen, batch)
  result = evaluation.eval_loss(tf.data.Dataset.from_tensor_slices(batch), step, trainable, frozen,
                                3, tuple(batch))
  tokens = float(whole["real_tokens"])
  assert result["loss_per_token"] == pytest.approx(float(whole["loss"]) / tokens, rel=1e-5)
  assert result["token_accuracy"] == pytest.approx(float(whole["correct_tokens"]) / tokens)


def test_eval_with_length_buckets_equals_eval_on_full_width(setup):
  """eval_loss, score_fn and predict_fn give the same results when buckets cut the input padding,
  and the functions see the bucket's width (inputs of 7 real tokens padded to 10, buckets 4 and 8)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import evaluation  # pylint: disable=g-import-not-at-top
  model, trainable, frozen, _ = setup
  batch = make_batch(model.config.vocab_size)
  widths = []
  jitted = jax.jit(functools.partial(trainer.eval_step, model=model))

  def step(t, f, b):
    widths.append(b["encoder_input_tokens"].shape[1])
    return jitted(t, f, b)
  dataset = tf.data.Dataset.from_tensor_slices(batch)
  full = evaluation.eval_loss(dataset, step, trainable, frozen, 3, tuple(batch))
  cut = evaluation.eval_loss(dataset, step, trainable, frozen, 3, tuple(batch), (4, 8))
  assert widths == [10] * 3 + [8] * 3
  for k in full:
    assert cut[k] == pytest.approx(full[k], rel=1e-5)
  indexed = dataset.enumerate()
  results = {}
  for buckets in ((), (4, 8)):
    predictor = evaluation.Predictor(model, frozen, 3, evaluation.DecodingConfig(max_decode_length=4),
                                     buckets)
    predictor.trainable = trainable
    results[buckets] = (predictor.score_fn(indexed), predictor.predict_fn(indexed))
  (full_scores, full_tokens), (cut_scores, cut_tokens) = results[()], results[(4, 8)]
  assert [i for i, _ in cut_scores] == list(range(BATCH)) and cut_tokens == full_tokens
  np.testing.assert_allclose([s for _, s in cut_scores], [s for _, s in full_scores], rtol=1e-5)
