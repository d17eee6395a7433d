"""LoRA, IA3 and prefix-tuning adapters interchanged with PEFT on a tiny random T5 1.1: PEFT's
logits and 20-step SGD losses from our model and trainer, and PEFT loading what we export."""
import copy
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from prompt_tuning_jax import (checkpoints, freezing, hf_checkpoint, losses, methods, peft_adapters,
                               trainer, trees)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_reference import COMMON, VOCAB, random_t5  # noqa: E402  (needs torch)

STEPS = 20
# Plain SGD's learning rate per method: where the loss falls smoothly, so float32 rounding between
# PyTorch and XLA stays far below the tolerance (LoRA on every projection is the sharpest).
LEARNING_RATES = {"lora": 0.02, "ia3": 0.5, "prefix_tuning": 0.5}
# The tiny T5 has 3 heads of 6: PEFT's prefix token_dim defaults to d_model (16), not 18, and its
# num_layers to the encoder's (2), which crashes on the 3 decoder layers; both are given.
PREFIX = dict(num_virtual_tokens=4, token_dim=COMMON["num_heads"] * COMMON["d_kv"])
# Every projection and both IA3 sides; `_randomize` sets the weights.
PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=6, lora_dropout=0.0,
                                    target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]),
    "ia3": lambda: peft.IA3Config(task_type="SEQ_2_SEQ_LM",
                                  target_modules=["k", "v", "o", "wi_0", "wo"],
                                  feedforward_modules=["wi_0", "wo"]),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_layers=3,
                                                     **PREFIX),
}


def _batch():
  """Inputs `[3, 10]`, decoder inputs and targets `[3, 7]`, 0-padded, as our trainer's batch."""
  rng = np.random.default_rng(0)
  inputs, targets = rng.integers(2, VOCAB, (3, 10)), rng.integers(2, VOCAB, (3, 7))
  for row, (n_in, n_out) in enumerate([(10, 7), (6, 4), (3, 2)]):
    inputs[row, n_in:] = 0
    targets[row, n_out:] = 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
          "decoder_target_tokens": targets}


def _peft_forward(peft_model):
  batch = _batch()
  targets = batch["decoder_target_tokens"]
  return peft_model(input_ids=torch.tensor(batch["encoder_input_tokens"]),
                    attention_mask=torch.tensor(batch["encoder_input_tokens"] > 0),
                    decoder_input_ids=torch.tensor(batch["decoder_input_tokens"]),
                    labels=torch.tensor(np.where(targets > 0, targets, -100)))


def _peft_logits(peft_model):
  with torch.no_grad():
    return _peft_forward(peft_model.eval()).logits.numpy()


def _assert_close_on_targets(ours, theirs):
  real = _batch()["decoder_target_tokens"] > 0
  assert ours.shape == theirs.shape
  np.testing.assert_array_less(np.abs(ours[real] - theirs[real]).max(), 1e-4)


def _randomize(peft_model, name):
  """Non-trivial adapter weights: LoRA's A and B (B is zeros by default) N(0, 0.1^2), IA3 scales
  U(0.5, 1.5), prefixes N(0, 1)."""
  generator = torch.Generator().manual_seed(5)
  with torch.no_grad():
    for param in (p for p in peft_model.parameters() if p.requires_grad):
      if name == "ia3":
        param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
      else:
        scale = 0.1 if name == "lora" else 1.0
        param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _hf_model(path):
  return transformers.T5ForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """PyTorch's thread pool makes this tiny model's steps 10x slower on a shared machine."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(HF model directory, our config, our frozen params) of a tiny random T5 1.1."""
  path = tmp_path_factory.mktemp("t5_1_1")
  random_t5("t5_1_1", seed=3).save_pretrained(path)
  config, params = checkpoints.load_checkpoint(str(path))
  return path, config, params


@pytest.fixture(scope="module", params=sorted(PEFT_CONFIGS))
def adapter(request, base, tmp_path_factory):
  """A PEFT adapter with random weights, saved and imported: (name, its directory, the PEFT model,
  our method and full params, our model's jitted apply)."""
  path, config, frozen = base
  peft_model = peft.get_peft_model(_hf_model(path), PEFT_CONFIGS[request.param]())
  _randomize(peft_model, request.param)
  directory = tmp_path_factory.mktemp(request.param)
  peft_model.save_pretrained(directory)
  method, imported = peft_adapters.import_adapter(str(directory), config)
  params = trees.unflatten({**trees.flatten(frozen), **imported})
  apply = jax.jit(methods.build_model(method, config, None).apply)
  return request.param, directory, peft_model, method, params, apply


def _our_logits(apply, params):
  batch = _batch()
  return np.asarray(apply({"params": params}, batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"], batch["decoder_target_tokens"]))


def test_import_gives_the_method_peft_trained(adapter, base):
  name, _, _, method, params, _ = adapter
  expected = {"lora": methods.lora(2, 6.0, ("query", "key", "value", "out", "wi_0", "wi_1", "wo")),
              "ia3": methods.ia3(("key", "value", "out", "wi_0", "wo"), ("wi_0", "wo")),
              "prefix_tuning": methods.prefix_tuning(4, ("decoder",), "before")}[name]
  assert method == expected
  counts = methods.param_counts(base[1], 1, {name: method})
  mask = trees.flatten(freezing.freeze_mask(params, method.trainable_patterns))
  assert counts[name] == sum(np.size(v) for k, v in trees.flatten(params).items() if mask[k])


def test_imported_adapter_gives_peft_logits(adapter, base):
  _, directory, _, _, params, apply = adapter
  peft_model = peft.PeftModel.from_pretrained(_hf_model(base[0]), str(directory))
  theirs = _peft_logits(peft_model)
  _assert_close_on_targets(_our_logits(apply, params), theirs)
  with peft_model.disable_adapter():  # the adapter matters: the plain T5's logits are far off
    assert np.abs(_peft_logits(peft_model) - theirs).max() > 1e-2


def test_sgd_trajectory_matches_peft_and_exports(adapter, base, tmp_path):
  """20 steps of plain SGD on the adapter through our train step: PEFT's losses and weights; the
  trained adapter exported gives our logits in PEFT."""
  name, _, peft_model, method, params, apply = adapter
  peft_model = copy.deepcopy(peft_model)  # (PEFT loads prompt-learning adapters frozen only)
  trainable = [p for p in peft_model.parameters() if p.requires_grad]
  learning_rate = LEARNING_RATES[name]
  optimizer = torch.optim.SGD(trainable, lr=learning_rate)
  theirs = []
  for _ in range(STEPS):
    optimizer.zero_grad()
    loss = _peft_forward(peft_model.train()).loss
    loss.backward()
    optimizer.step()
    theirs.append(loss.item())

  learned, frozen = freezing.split(params, freezing.freeze_mask(params, method.trainable_patterns))
  sgd = optax.sgd(learning_rate)
  step = jax.jit(functools.partial(
      trainer.train_step, model=methods.build_model(method, base[1], None), optimizer=sgd,
      loss_config=trainer.LossConfig(z_loss=0.0,
                                     loss_normalizing_factor=losses.NUM_REAL_TARGET_TOKENS)))
  state = trainer.TrainState.create(learned, sgd, jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  ours = []
  for _ in range(STEPS):
    state, metrics = step(state, frozen, batch)
    ours.append(float(metrics["loss"]))
  np.testing.assert_array_less(np.abs(np.array(ours) - np.array(theirs)).max(), 1e-4)
  assert theirs[-1] < theirs[0] - 0.1  # the adapter learned

  trained = {k: np.asarray(v) for k, v in trees.flatten(state.trainable).items()}
  peft_model.save_pretrained(tmp_path / "peft_trained")
  _, peft_trained = peft_adapters.import_adapter(str(tmp_path / "peft_trained"), base[1])
  assert peft_trained.keys() == trained.keys()
  for path, value in trained.items():
    np.testing.assert_allclose(value, peft_trained[path], atol=1e-4, err_msg=path)

  peft_adapters.export_adapter(method, trained, base[1], str(tmp_path / "ours"), str(base[0]))
  exported = peft.PeftModel.from_pretrained(_hf_model(base[0]), str(tmp_path / "ours"))
  our_logits = _our_logits(apply, trees.unflatten({**trees.flatten(frozen), **trained}))
  _assert_close_on_targets(our_logits, _peft_logits(exported))
  assert np.abs(our_logits - _our_logits(apply, params)).max() > 1e-2  # training moved them


def test_round_trip_is_exact(adapter, base, tmp_path):
  _, directory, _, method, params, _ = adapter
  imported = peft_adapters.import_adapter(str(directory), base[1])[1]
  peft_adapters.export_adapter(method, imported, base[1], str(tmp_path), "t5")
  method_again, again = peft_adapters.import_adapter(str(tmp_path), base[1])
  assert method_again == method and again.keys() == imported.keys()
  for path, value in imported.items():
    np.testing.assert_array_equal(again[path], value)
  # The scanned layout (`ExecutionConfig.scan_layers`) exports the same adapter.
  peft_adapters.export_adapter(method, checkpoints.stack_layers(imported, True), base[1],
                               str(tmp_path / "scanned"), "t5")
  assert ((tmp_path / "scanned" / "adapter_model.safetensors").read_bytes()
          == (tmp_path / "adapter_model.safetensors").read_bytes())
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


@pytest.mark.parametrize("decoder_layers, projection", [(2, False), (3, True)])
def test_imported_prefix_is_what_peft_gives_each_decoder_layer(base, tmp_path, decoder_layers,
                                                                projection):
  """PEFT's own per-layer keys and values: with 2 decoder layers both read one pair of slots (and
  export refuses prefixes that differ there); with `prefix_projection` the MLP's output imports."""
  path = base[0]
  if decoder_layers != 3:
    path = tmp_path / "t5"
    torch.manual_seed(4)
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        **{**COMMON, "num_decoder_layers": decoder_layers}, d_ff=20,
        feed_forward_proj="gated-gelu")).save_pretrained(path)
  config = hf_checkpoint.read_config(str(path))
  peft_model = peft.get_peft_model(_hf_model(path), peft.PrefixTuningConfig(
      task_type="SEQ_2_SEQ_LM", num_layers=decoder_layers, prefix_projection=projection,
      encoder_hidden_size=7, **PREFIX))
  _randomize(peft_model, "prefix_tuning")
  peft_model.save_pretrained(tmp_path / "adapter")
  method, params = peft_adapters.import_adapter(str(tmp_path / "adapter"), config)
  assert method == methods.prefix_tuning(4, ("decoder",), "before")
  with torch.no_grad():
    cache = peft_model.get_prompt(batch_size=1).self_attention_cache
  for layer in range(decoder_layers):
    for ours, theirs in ((params["decoder/prefix/key"], cache.layers[layer].keys),
                         (params["decoder/prefix/value"], cache.layers[layer].values)):
      # PEFT's [batch, heads, P, kv]; ours [P, heads, kv].
      np.testing.assert_allclose(ours[layer], theirs[0].numpy().transpose(1, 0, 2), atol=1e-6)
  if decoder_layers == 2:
    np.testing.assert_array_equal(params["decoder/prefix/key"][0], params["decoder/prefix/key"][1])
    params["decoder/prefix/value"][1] += 1.0
    with pytest.raises(ValueError, match="layers 0 and 1 differ"):
      peft_adapters.export_adapter(method, params, config, str(tmp_path / "ours"), "t5")
    assert not (tmp_path / "ours").exists()


@pytest.fixture(scope="module")
def plain_adapters(base, tmp_path_factory):
  """`{name: directory}` of each PEFT adapter as PEFT saves it, for the error tests to edit."""
  directories = {}
  for name, make_config in PEFT_CONFIGS.items():
    directories[name] = tmp_path_factory.mktemp(f"plain_{name}")
    peft.get_peft_model(_hf_model(base[0]), make_config()).save_pretrained(directories[name])
  return directories


def _edited(source, directory, changes=None, edit_tensors=None):
  """A copy of the adapter in `source` with config `changes` and `edit_tensors(tensors)` applied."""
  shutil.copytree(source, directory)
  config_path = directory / "adapter_config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **(changes or {})}))
  if edit_tensors is not None:
    weights_path = directory / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights_path))
    edit_tensors(tensors)
    weights_path.write_bytes(safetensors.numpy.save(tensors))
  return str(directory)


LORA_WO = "base_model.model.decoder.block.2.layer.2.DenseReluDense.wo"


@pytest.mark.parametrize("name, changes, edit_tensors, message", [
    ("lora", {"use_rslora": True}, None, "use_rslora=True is not supported: rsLoRA"),
    ("lora", {"use_dora": True}, None, "use_dora=True is not supported"),
    ("lora", {"bias": "lora_only"}, None, "bias='lora_only' is not supported"),
    ("lora", {"layers_to_transform": [0]}, None, "layers_to_transform=\\[0\\]"),
    ("lora", {"r": 4}, None, "ranks \\[2\\], but the config says r=4"),
    ("lora", {"peft_type": "PROMPT_TUNING"}, None, "peft_interchange.import_peft_adapter"),
    ("lora", {"task_type": "CAUSAL_LM"}, None, "task_type 'CAUSAL_LM'"),
    ("lora", None, lambda t: t.pop(f"{LORA_WO}.lora_B.weight"),
     "does not hold lora on every query, .*: decoder/layers_2/mlp/wo/lora_b missing"),
    ("lora", None, lambda t: t.update({"base_model.model.lm_head.lora_A.weight":
                                       np.zeros((2, 16), np.float32)}),
     "holds base_model.model.lm_head.lora_A.weight \\(2, 16\\), not a LORA tensor"),
    ("lora", None, lambda t: t.update({f"{LORA_WO}.lora_B.weight": np.zeros((8, 2), np.float32)}),
     "decoder/layers_2/mlp/wo/lora_b \\(2, 8\\) \\(not \\(2, 16\\)\\) misshapen"),
    ("ia3", {"fan_in_fan_out": True}, None, "fan_in_fan_out=True"),
    ("ia3", None, lambda t: t.update({f"{LORA_WO}.ia3_l": np.ones((16, 1), np.float32)}),
     "inputs of some wo modules and the outputs of others"),
    ("prefix_tuning", {"num_layers": 2}, None, "num_layers=2, but .* need num_layers=3"),
    ("prefix_tuning", {"token_dim": 16}, None, "token_dim=16, but .* need token_dim=18"),
    ("prefix_tuning", {"num_transformer_submodules": 1}, None, "num_transformer_submodules=1"),
    ("prefix_tuning", None, lambda t: t.update(prompt_embeddings=np.zeros((4, 8), np.float32)),
     "has shape \\(4, 8\\), but its config implies \\(4, 108\\)"),
])
def test_import_refuses_what_we_cannot_represent(plain_adapters, base, tmp_path, name, changes,
                                                  edit_tensors, message):
  directory = _edited(plain_adapters[name], tmp_path / "adapter", changes, edit_tensors)
  with pytest.raises(ValueError, match=message):
    peft_adapters.import_adapter(directory, base[1])


def test_export_refuses_other_methods_and_overwriting(plain_adapters, base, tmp_path):
  config = base[1]
  method, params = peft_adapters.import_adapter(str(plain_adapters["lora"]), config)
  with pytest.raises(ValueError, match="peft_interchange.export_peft_adapter"):
    peft_adapters.export_adapter(methods.prompt_tuning(), params, config, str(tmp_path), "t5")
  with pytest.raises(ValueError, match="stacks=\\('decoder',\\), position_bias='before'"):
    peft_adapters.export_adapter(methods.prefix_tuning(4), params, config, str(tmp_path), "t5")
  missing = {k: v for k, v in params.items() if not k.startswith("decoder/layers_2/mlp/wo/")}
  with pytest.raises(ValueError, match="mlp/wo/lora_a, decoder/layers_2/mlp/wo/lora_b missing"):
    peft_adapters.export_adapter(method, missing, config, str(tmp_path), "t5")
  assert not list(tmp_path.iterdir())
  peft_adapters.export_adapter(method, params, config, str(tmp_path), "t5")
  written = (tmp_path / "adapter_model.safetensors").read_bytes()
  doubled = {k: v * 2 for k, v in params.items()}
  with pytest.raises(FileExistsError, match="overwrite=True"):
    peft_adapters.export_adapter(method, doubled, config, str(tmp_path), "t5")
  assert (tmp_path / "adapter_model.safetensors").read_bytes() == written
  peft_adapters.export_adapter(method, doubled, config, str(tmp_path), "t5", overwrite=True)
  np.testing.assert_array_equal(peft_adapters.import_adapter(str(tmp_path), config)[1][
      "decoder/layers_2/mlp/wo/lora_a"], doubled["decoder/layers_2/mlp/wo/lora_a"])
