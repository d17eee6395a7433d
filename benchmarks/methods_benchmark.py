"""Every method of `methods.py` on one frozen model, side by side: trainable parameters, the compiled
train step's memory (XLA's analysis of this device's arguments and temporaries) and its step time.

  PYTHONPATH=. python -m benchmarks.methods_benchmark [--steps 5] [--batch_size 8] [--methods lora,ia3]

The model is T5 1.1 Small's shape with random weights (`common.SMALL`), the batch RTE-sized
(inputs 256, targets 8) with a 100-token prompt where the method has one, and every method trains
with the same optimizer (Adafactor), so the step times differ by what each method adds and
differentiates. Prints a table and writes benchmarks/results/methods.json.
"""
import argparse
import json
import os
import platform

import jax
import numpy as np
import optax

from benchmarks import common
from prompt_tuning_jax import (freezing, methods, partitioning, prompt_initializers, run_setup,
                               trainer, trees)
from prompt_tuning_jax.config import ExecutionConfig

RESULTS = os.path.join(os.path.dirname(__file__), "results", "methods.json")


def measure(method: methods.Method, model_config, prompt_length: int, batch_size: int,
            lengths: dict[str, int], steps: int) -> dict:
  """One method's trainable parameters, compiled memory and median step time."""
  mesh = partitioning.make_mesh((-1, 1))
  execution = run_setup.resolve_execution(ExecutionConfig(attention="auto"), model_config, mesh)
  if method.multitask_combine is not None:
    method = method.for_tasks(2, 32099)
  prompt_config = method.prompt_config(prompt_length, prompt_initializers.random_uniform())
  model = methods.build_model(method, model_config, prompt_config, execution)
  params = trees.unflatten(methods.init_new_params(model, set(), jax.random.PRNGKey(0)))
  mask = freezing.freeze_mask(params, method.trainable_patterns)
  trainable, frozen = freezing.split(params, mask)
  optimizer = optax.adafactor(learning_rate=1e-3)
  state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(1))
  replicated = jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), state)
  frozen_sh = jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), frozen)
  step = trainer.compile_train_step(model, optimizer, mesh, replicated, frozen_sh)
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, 32000, (batch_size, lengths["inputs"]), dtype=np.int32)
  if method.multitask_combine is not None:
    inputs[:, 0] = 32099 - rng.integers(0, 2, batch_size)
  targets = rng.integers(2, 32000, (batch_size, lengths["targets"]), dtype=np.int32)
  batch = {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_input_tokens": np.concatenate([np.zeros((batch_size, 1), np.int32),
                                                   targets[:, :-1]], axis=1),
           "decoder_loss_weights": np.ones_like(targets, np.float32)}
  memory = step.lower(state, frozen, batch).compile().memory_analysis()
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], frozen, batch)
    return metrics["loss"]
  timing = common.time_steps(run, steps, sync=jax.block_until_ready)
  return dict(trainable_parameters=sum(int(np.prod(x.shape))
                                       for x in jax.tree_util.tree_leaves(trainable)),
              argument_mib=memory.argument_size_in_bytes / 2**20,
              temporary_mib=memory.temp_size_in_bytes / 2**20, step_s=timing["step_s"],
              load=timing["load_after"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=100)
  parser.add_argument("--methods", default=",".join(methods.METHODS),
                      help="comma-separated method names (prompt_tuning is always measured)")
  args = parser.parse_args()
  names = ["prompt_tuning"] + [n for n in args.methods.split(",") if n != "prompt_tuning"]
  model_config = common.t5_config()
  lengths = {"inputs": 256, "targets": 8}
  rows = {}
  for name in names:
    rows[name] = measure(methods.METHODS[name](), model_config, args.prompt_length, args.batch_size, lengths,
                         args.steps)
    print(f"{name}: {rows[name]}", flush=True)
  base = rows["prompt_tuning"]
  print(f"\n| method | trainable | step (s) | vs prompt tuning | temporaries (MiB) |"
        f" arguments (MiB) |\n| --- | --- | --- | --- | --- | --- |")
  for name, row in rows.items():
    print(f"| {name} | {row['trainable_parameters']:,} | {row['step_s']:.3f} | "
          f"{row['step_s'] / base['step_s']:.2f}x | {row['temporary_mib']:.0f} | "
          f"{row['argument_mib']:.0f} |")
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump(dict(rows=rows, batch_size=args.batch_size, lengths=lengths,
                   prompt_length=args.prompt_length, machine=platform.processor() or
                   platform.machine(), cpu_count=os.cpu_count(),
                   device=str(jax.devices()[0].device_kind)), f, indent=2)


if __name__ == "__main__":
  main()
