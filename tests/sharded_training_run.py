"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices: 3 train steps per mesh.

Prints one JSON object: for each mesh shape, the losses and the final prompt.
"""
import json
import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import make_batch  # noqa: E402

from prompt_tuning_jax import (checkpoints, config, freezing, network, optimizers,  # noqa: E402
                               partitioning, prompts, trainer, trees)


def run(mesh_shape, devices, execution=config.ExecutionConfig()):
  """With `execution.scan_layers`, the same parameters stacked on the `layers` axis."""
  cfg = config.t5_config("t5_1_1", "tiny", vocab_size=64, emb_dim=8, num_heads=2, head_dim=4,
                         mlp_dim=16)
  batch = make_batch(cfg.vocab_size, batch=16)
  tokens = batch["encoder_input_tokens"][:1]
  params = nn.unbox(jax.jit(network.T5(cfg, prompts.PromptConfig(3)).init)(
      jax.random.PRNGKey(0), tokens, tokens))["params"]
  params = trees.unflatten(checkpoints.stack_layers(trees.flatten(params),
                                                         execution.scan_layers))
  model = network.T5(cfg, prompts.PromptConfig(3), execution)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)["params"]
  mask = freezing.freeze_mask(params)
  trainable, frozen = freezing.split(params, mask)
  mesh = partitioning.make_mesh(mesh_shape, devices)
  partitioning.check_batch_divides(batch["encoder_input_tokens"].shape[0], mesh, 2)
  trainable_sh, frozen_sh = freezing.split(partitioning.param_shardings(boxed, mesh), mask)
  optimizer = optimizers.prompt_tuning_adafactor()
  state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(1))
  state_sh = jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), state).replace(
      trainable=trainable_sh)
  state = jax.device_put(state, state_sh)
  frozen = jax.device_put(frozen, frozen_sh)
  step = trainer.compile_train_step(model, optimizer, mesh, state_sh, frozen_sh, num_microbatches=2)
  losses = []
  for _ in range(3):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  sharded_kernel = frozen["encoder"]["layers" if execution.scan_layers else "layers_0"]["mlp"]["wi_0"]["kernel"]
  return {"losses": losses,
          "prompt": np.asarray(state.trainable["encoder"]["prompt"]["prompt"]["prompt"]).tolist(),
          "kernel_shards": sharded_kernel.shape[-1]
                           // sharded_kernel.sharding.shard_shape(sharded_kernel.shape)[-1]}


if __name__ == "__main__":
  devices = jax.devices()
  assert len(devices) == 8, devices
  results = {"1x1": run((1, 1), devices[:1])}
  for shape in ((8, 1), (4, 2), (2, 4)):
    results[f"{shape[0]}x{shape[1]}"] = run(shape, devices)
  results["2x4 scanned layers"] = run((2, 4), devices, config.ExecutionConfig(scan_layers=True))
  results["2x4 cpu attention"] = run((2, 4), devices, config.ExecutionConfig(attention="cpu"))
  print(json.dumps(results))
