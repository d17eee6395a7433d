"""Prompt-tuning train step on one GPU: T5 1.1 Small, Base and Large in bfloat16, with MFU.

  PYTHONPATH=. python -m benchmarks.gpu_benchmark [--output benchmarks/results/gpu.json]

Batch 32, inputs 128 + a 100-position prompt, targets 8, random weights, bfloat16 activations and
frozen weights (the prompt and its Adafactor state stay float32). MFU is the model's FLOPs per step
(XLA's count of the textbook step, keys and values projected) over the step time, over a bfloat16
matmul peak measured on the same card in the same run; HFU counts the FLOPs our step really runs. Made to finish in
well under 8 minutes on an A100/H100.
"""
import argparse
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from benchmarks import common
from prompt_tuning_jax import config, freezing, network, optimizers, partitioning, prompts, trainer

BATCH, INPUTS, PROMPT, TARGETS = 32, 128, 100, 8


def measure(size: str, steps: int) -> dict[str, Any]:
  """Compile time, median step time, FLOPs and memory of the bfloat16 train step of one size."""
  model = network.T5(config.t5_config("t5_1_1", size, dtype=jnp.bfloat16),
                     prompts.PromptConfig(PROMPT))
  tokens = jnp.ones((1, 1), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens)["params"]
  params = jax.tree_util.tree_map(lambda b: b.unbox(), params, is_leaf=lambda x: hasattr(x, "unbox"))
  trainable, frozen = freezing.split(params, freezing.freeze_mask(params))
  frozen = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), frozen)
  mesh = partitioning.make_mesh((1, 1), jax.devices()[:1])
  optimizer = optimizers.prompt_tuning_adafactor()
  state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(0))
  replicated = lambda tree: jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), tree)
  step = trainer.compile_train_step(model, optimizer, mesh, replicated(state), replicated(frozen))
  batch = common.random_batch(BATCH, INPUTS, TARGETS)
  start = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], frozen, batch)
    return metrics
  timing = common.time_steps(run, steps, warmup=3, sync=jax.block_until_ready)
  memory = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  # The model's FLOPs: the same step with every attention projecting keys and values (textbook T5),
  # before the cross-attention reassociation; a fresh jit, so it traces again.
  with common.textbook_attention():
    textbook = trainer.compile_train_step(model, optimizer, mesh, replicated(state), replicated(frozen))
    model_flops = textbook.lower(holder["state"], frozen, batch).compile().cost_analysis()["flops"]
  return dict(timing, size=size, compile_s=compile_s, flops=compiled.cost_analysis()["flops"],
              model_flops=model_flops,
              examples_per_s=BATCH / timing["step_s"],
              tokens_per_s=BATCH * (INPUTS + PROMPT + TARGETS) / timing["step_s"],
              temp_bytes=memory.temp_size_in_bytes, argument_bytes=memory.argument_size_in_bytes,
              peak_bytes_in_use=stats.get("peak_bytes_in_use"))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmarks/results/gpu.json")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--sizes", default="small,base,large")
  parser.add_argument("--matmul_n", type=int, default=8192, help="side of the square peak matmul")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  peak = common.jax_matmul_peak(n=args.matmul_n, dtype="bfloat16", repeats=20)
  results = dict(device=str(device.device_kind), matmul_peak=peak,
                 sizes=[measure(size, args.steps) for size in args.sizes.split(",")])
  print(f"{device.device_kind}: bfloat16 matmul peak {peak['flops_per_s'] / 1e12:.1f} TFLOP/s")
  print(f"{'size':<6} {'ex/s':>8} {'tok/s':>9} {'step ms':>8} {'compile s':>9} {'GFLOP':>8} {'MFU':>5} "
        f"{'HFU':>5} {'peak GiB':>8}")
  for r in results["sizes"]:
    r["mfu"] = r["model_flops"] / r["step_s"] / peak["flops_per_s"]
    r["hfu"] = r["flops"] / r["step_s"] / peak["flops_per_s"]
    peak_gib = (r["peak_bytes_in_use"] or 0) / 2**30
    print(f"{r['size']:<6} {r['examples_per_s']:8.1f} {r['tokens_per_s']:9.0f} {r['step_s'] * 1e3:8.1f} "
          f"{r['compile_s']:9.1f} {r['model_flops'] / 1e9:8.0f} {r['mfu']:5.0%} {r['hfu']:5.0%} "
          f"{peak_gib:8.2f}")
  common.write_json(args.output, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
