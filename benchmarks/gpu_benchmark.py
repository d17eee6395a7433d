"""Prompt-tuning train step on one GPU: T5 1.1 Small, Base and Large in bfloat16, with MFU, for each
attention implementation side by side (`--attention xla,cudnn`; `ExecutionConfig.attention`).

  PYTHONPATH=. python -m benchmarks.gpu_benchmark [--output benchmarks/results/gpu.json]
      [--batch_sizes 32,128] [--attention xla,cudnn,cpu]

Batch 32 (each of `--batch_sizes`), inputs 128 + a 100-position prompt, targets 8, random weights, bfloat16 activations and
frozen weights (the prompt and its Adafactor state stay float32). MFU is the model's FLOPs per step
(XLA's count of the textbook step, keys and values projected, `textbook_flops`) over the step time,
over a bfloat16 matmul peak measured on the same card in the same run. The JSON's `flops` is the
compiled step's count by the card's XLA, which leaves out the GEMMs it hands to cuBLAS (10-56% of
the textbook count on an H200), so no HFU is printed. "step GiB" is the compiled step's arguments and
temporaries (XLA's memory analysis); the JSON's `peak_bytes_in_use` is the process's peak so far, over
every size measured before. "loop ms" is a step in a loop like `train`'s (numpy batches placed on
the mesh, no tf.data): the next batch placed while the device runs the step, then the wait; "old ms"
waits first and places after; "lag ms" waits for the loss of the step before, so the device always
has the next step queued (`train`'s order, on every backend). Each size's row is printed and the JSON rewritten as soon as it is measured, and a size that
fails records its error and the run goes on; each stage (init, compile, steps, loops, FLOP count)
prints its seconds to stderr as it ends. On an H200 the three sizes took under two minutes, most of it
compiling (20-31 s a size) and the process's start.
"""
import argparse
import functools
import sys
import time
import traceback
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from prompt_tuning_jax import (checkpoints, config, freezing, network, optimizers, partitioning,
                               prompts, trainer, trees)

INPUTS, PROMPT, TARGETS = 128, 100, 8
HEADER = (f"{'size':<6} {'attention':<9} {'batch':>5} {'ex/s':>8} {'tok/s':>9} {'step ms':>8} {'compile s':>9} {'GFLOP':>8} "
          f"{'MFU':>5} {'step GiB':>8} {'loop ms':>7} {'old ms':>7} {'lag ms':>7}")


def initial_state(model: network.T5, optimizer,
                  frozen: dict[str, Any]) -> tuple[trainer.TrainState, Any]:
  """The prompt's train state (float32, a normal `[prompt, embed]` prompt) and the frozen params, flat
  `{path: array}` in `model`'s layout, as a tree in bfloat16."""
  prompt = jax.random.normal(jax.random.PRNGKey(1), (PROMPT, model.config.emb_dim))
  params = trees.unflatten({**frozen, checkpoints.PROMPT_PATH: prompt})
  trainable, frozen = freezing.split(params, freezing.freeze_mask(params))
  frozen = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), frozen)
  return trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(0)), frozen


def compile_step(model: network.T5, optimizer, state, frozen, mesh):
  """The jitted train step on `mesh` (one device), everything replicated."""
  replicated = lambda tree: jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), tree)
  return trainer.compile_train_step(model, optimizer, mesh, replicated(state), replicated(frozen))


LOOP_ORDERS = ("wait_then_place", "place_then_wait", "one_step_behind")


def loop_step_s(compiled, state, frozen, host_batches: Sequence[dict[str, Any]], sharding,
                steps: int, order: str) -> tuple[float, Any]:
  """Mean seconds a step in a loop like `train`'s, without tf.data, and the last state (the step
  donates the one it gets). After dispatching a step, the loop places the next host batch on the
  mesh and waits for the step's loss (`place_then_wait`, `train`'s order on CPU), waits and then
  places (`wait_then_place`, its order before), or places and waits for the loss of the step before
  this one (`one_step_behind`, `train`'s order on accelerators: the device always has the next step
  queued). `host_batches` are numpy batches, used in turn."""
  place = lambda b: {k: jax.make_array_from_process_local_data(sharding, v) for k, v in b.items()}
  batch, pending = place(host_batches[0]), None
  for i in range(steps + 2):  # the first 2 steps warm up
    if i == 2:
      start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    if order == "wait_then_place":
      jax.device_get(metrics["loss"])
    batch = place(host_batches[(i + 1) % len(host_batches)])
    if order == "place_then_wait":
      jax.device_get(metrics["loss"])
    elif order == "one_step_behind":
      if pending is not None:
        jax.device_get(pending)
      pending = metrics["loss"]
  jax.device_get(pending)
  return (time.perf_counter() - start) / steps, state


def textbook_flops(size: str, batch: dict[str, Any]) -> float:
  """The model's FLOPs per step: the train step of `size` with unscanned layers (XLA counts a loop's
  body once) and the `"xla"` attention (textbook T5: every attention projects its keys and values),
  counted by XLA on the program lowered for the CPU backend from
  abstract shapes: before XLA's passes, so the count does not depend on the card (GPU backends give no
  cost analysis for a lowered program, and their compiled count of our Small step is 0.63x XLA:CPU's)."""
  model = network.T5(config.t5_config("t5_1_1", size, dtype=jnp.bfloat16), prompts.PromptConfig(PROMPT))
  optimizer = optimizers.prompt_tuning_adafactor()
  shapes = {name: jax.ShapeDtypeStruct(shape, jnp.float32)
            for name, shape in checkpoints.param_shapes(model.config).items()}
  state, frozen = jax.eval_shape(functools.partial(initial_state, model, optimizer), shapes)
  step = compile_step(model, optimizer, state, frozen,
                      partitioning.make_mesh((1, 1), jax.devices("cpu")[:1]))
  return step.lower(state, frozen, batch).cost_analysis()["flops"]


def measure(size: str, steps: int, batch_size: int,
            execution: config.ExecutionConfig) -> dict[str, Any]:
  """Compile time, median step time, FLOPs and memory of the bfloat16 train step of one size. Each
  stage's end goes to stderr with its seconds, so a run cut short shows where its time went."""
  begin = time.perf_counter()
  stage_s = {}

  def done(stage: str, start: float) -> float:
    stage_s[stage] = time.perf_counter() - start
    print(f"  {size} {execution.attention} {batch_size}: {stage} {stage_s[stage]:.1f} s (size so far {time.perf_counter() - begin:.1f} s)",
          file=sys.stderr, flush=True)
    return time.perf_counter()

  model = network.T5(config.t5_config("t5_1_1", size, dtype=jnp.bfloat16),
                     prompts.PromptConfig(PROMPT), execution)
  optimizer = optimizers.prompt_tuning_adafactor()
  params = checkpoints.stack_layers(checkpoints.init_params(model.config, jax.random.PRNGKey(0)),
                                    execution.scan_layers)
  state, frozen = jax.block_until_ready(initial_state(model, optimizer, params))
  start = done("init", begin)
  mesh = partitioning.make_mesh((1, 1), jax.devices()[:1])
  step = compile_step(model, optimizer, state, frozen, mesh)
  batch = common.random_batch(batch_size, INPUTS, TARGETS)
  compiled = step.lower(state, frozen, batch).compile()
  start = done("compile", start)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], frozen, batch)
    return metrics
  timing = common.time_steps(run, steps, warmup=3, sync=jax.block_until_ready)
  start = done(f"{steps} steps after 3 warm-ups", start)
  host_batches = [common.random_batch(batch_size, INPUTS, TARGETS, seed) for seed in range(2)]
  sharding = partitioning.batch_sharding(mesh)
  loop_s = {}
  for order in LOOP_ORDERS:
    loop_s[order], holder["state"] = loop_step_s(compiled, holder["state"], frozen, host_batches,
                                                 sharding, steps, order)
  start = done(f"{steps} loop steps in each order", start)
  memory = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  model_flops = textbook_flops(size, batch)
  done("FLOP count on the CPU backend", start)
  return dict(timing, size=size, batch_size=batch_size, attention=execution.attention,
              scan_layers=execution.scan_layers, loop_step_s=loop_s,
              compile_s=stage_s["compile"], stage_s=stage_s, wall_s=time.perf_counter() - begin,
              flops=compiled.cost_analysis()["flops"], model_flops=model_flops,
              examples_per_s=batch_size / timing["step_s"],
              tokens_per_s=batch_size * (INPUTS + PROMPT + TARGETS) / timing["step_s"],
              temp_bytes=memory.temp_size_in_bytes, argument_bytes=memory.argument_size_in_bytes,
              peak_bytes_in_use=stats.get("peak_bytes_in_use"))


def row(r: dict[str, Any], peak_flops_per_s: float) -> str:
  """One size's table row; adds its MFU to `r`."""
  r["mfu"] = r["model_flops"] / r["step_s"] / peak_flops_per_s
  step_gib = (r["argument_bytes"] + r["temp_bytes"]) / 2**30
  loop = r["loop_step_s"]
  return (f"{r['size']:<6} {r['attention']:<9} {r['batch_size']:>5} {r['examples_per_s']:8.1f} {r['tokens_per_s']:9.0f} {r['step_s'] * 1e3:8.1f} "
          f"{r['compile_s']:9.1f} {r['model_flops'] / 1e9:8.0f} {r['mfu']:5.0%} "
          f"{step_gib:8.2f} {loop['place_then_wait'] * 1e3:7.1f} {loop['wait_then_place'] * 1e3:7.1f} "
          f"{loop['one_step_behind'] * 1e3:7.1f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmarks/results/gpu.json")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch_sizes", default="32", help="comma-separated global batch sizes")
  parser.add_argument("--sizes", default="small,base,large")
  parser.add_argument("--attention", default="xla,cudnn",
                      help="comma-separated attention implementations, each measured in turn")
  parser.add_argument("--scan_layers", action="store_true",
                      help="nn.scan over each stack's layers")
  parser.add_argument("--matmul_n", type=int, default=8192, help="side of the square peak matmul")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  peak = common.jax_matmul_peak(n=args.matmul_n, dtype="bfloat16", repeats=20)
  results = dict(device=str(device.device_kind), matmul_peak=peak, sizes=[], failed={},
                 versions=dict(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__))
  print(f"{device.device_kind}: bfloat16 matmul peak {peak['flops_per_s'] / 1e12:.1f} TFLOP/s "
        f"(jax {jax.__version__}, flax {flax.__version__})")
  print(HEADER, flush=True)
  runs = [(size, attention, int(batch)) for size in args.sizes.split(",")
          for batch in args.batch_sizes.split(",") for attention in args.attention.split(",")]
  for size, attention, batch_size in runs:
    name = f"{size} {attention} {batch_size}"
    try:
      r = measure(size, args.steps, batch_size,
                  config.ExecutionConfig(attention=attention, scan_layers=args.scan_layers))
    except Exception:  # pylint: disable=broad-except
      results["failed"][name] = traceback.format_exc()
      print(f"{name} failed:\n{results['failed'][name]}", flush=True)
    else:
      results["sizes"].append(r)
      print(row(r, peak["flops_per_s"]), flush=True)
    common.write_json(args.output, results)
  return 1 if results["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
