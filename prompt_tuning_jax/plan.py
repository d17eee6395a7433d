"""Will a run fit? `python -m prompt_tuning_jax.plan --gin_file=... --mesh=DATAxMODEL --device=...`.

Lowers and compiles the real sharded train step on abstract shapes (no weights are allocated) over as
many simulated devices as the mesh has, then reports XLA's per-device memory (parameters and optimizer
state, activations and temporaries) and FLOPs per step, and whether that fits the device.

`python -m prompt_tuning_jax.plan --param_counts [--json] --gin_file=MODEL.gin` prints instead each
method's trainable parameter count on that model (`methods.param_counts`; the paper's Figure 4
x-axis), as `{"param_counts": {name: n}}` with `--json`.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from prompt_tuning_jax import console

GIB = 1024 ** 3
# Per-device memory and peak dense bfloat16 FLOP/s of the accelerators a plan can target.
DEVICES = {
    "tpu_v3": dict(memory=16 * GIB, peak_flops=61.5e12),   # per core (a v3 chip has 2)
    "tpu_v4": dict(memory=32 * GIB, peak_flops=275e12),
    "a100_80g": dict(memory=80 * GIB, peak_flops=312e12),
    "h100_80g": dict(memory=80 * GIB, peak_flops=989e12),
    "h200": dict(memory=140 * GIB, peak_flops=989e12),     # nvidia-smi on an H200: 143771 MiB
}
# XLA reserves some memory for itself; a plan that leaves less than this free does not fit.
HEADROOM = 0.9


@dataclasses.dataclass
class Plan:
  """Per-device bytes and FLOPs of one compiled train step."""
  mesh: tuple[int, int]
  device: str
  argument_bytes: int      # frozen weights, prompt, optimizer state, batch (this device's shards)
  temporary_bytes: int     # activations and other temporaries
  output_bytes: int
  alias_bytes: int         # donated buffers reused for outputs
  flops_per_device: float
  device_memory: int

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.temporary_bytes + self.output_bytes - self.alias_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= HEADROOM * self.device_memory

  def table(self) -> str:
    rows = [("mesh (data x model)", f"{self.mesh[0]} x {self.mesh[1]}"),
            ("device", f"{self.device} ({self.device_memory / GIB:.0f} GiB)"),
            ("parameters + optimizer state + batch", f"{self.argument_bytes / GIB:.3f} GiB"),
            ("activations and temporaries", f"{self.temporary_bytes / GIB:.3f} GiB"),
            ("outputs (less donated buffers)",
             f"{(self.output_bytes - self.alias_bytes) / GIB:.3f} GiB"),
            ("total per device", f"{self.total_bytes / GIB:.3f} GiB"),
            ("FLOPs per step per device", f"{self.flops_per_device:.3e}"),
            ("step time at peak FLOP/s",
             f"{self.flops_per_device / DEVICES[self.device]['peak_flops'] * 1e3:.1f} ms"),
            ("fits", "yes" if self.fits else
             f"NO: needs {self.total_bytes / GIB:.1f} GiB of {HEADROOM * self.device_memory / GIB:.1f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plan_train_step(model_config, prompt_length: int, batch_size: int,
                    feature_lengths: Mapping[str, int], mesh_shape: Sequence[int], device: str,
                    num_microbatches: int = 1, trainable_patterns: Optional[Sequence[str]] = None,
                    execution=None) -> Plan:
  """Compiles the train step for abstract inputs on the current (simulated) devices.

  `trainable_patterns` (default: the prompt only) picks what learns, as `train`'s argument does.
  `execution` (a `config.ExecutionConfig`) gives remat and scan; the step is compiled with the
  `"xla"` attention whatever it names, as the accelerator's own kernels (cuDNN's) cannot be compiled
  on the planning CPU, and they hold no more memory than it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import (config, freezing, network, optimizers,  # pylint: disable=g-import-not-at-top
                                 partitioning, prompts, trainer)
  if device not in DEVICES:
    raise ValueError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
  mesh = partitioning.make_mesh(mesh_shape)
  partitioning.check_batch_divides(batch_size, mesh, num_microbatches)
  execution = (execution or config.ExecutionConfig()).replace(attention="xla")
  model = network.T5(model_config, prompts.PromptConfig(prompt_length), execution)
  tokens = jnp.ones((1, 1), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)["params"]
  params = nn.unbox(boxed)
  mask = freezing.freeze_mask(params, trainable_patterns or freezing.PROMPT_ONLY)
  trainable, frozen = freezing.split(params, mask)
  trainable_sh, frozen_sh = freezing.split(partitioning.param_shardings(boxed, mesh), mask)
  optimizer = optimizers.prompt_tuning_adafactor()
  state = jax.eval_shape(lambda t: trainer.TrainState.create(t, optimizer, jax.random.PRNGKey(0)),
                         trainable)
  state_sh = jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), state).replace(
      trainable=trainable_sh)
  with_sharding = lambda tree, sh: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  batch_sh = partitioning.batch_sharding(mesh)
  batch = {name: jax.ShapeDtypeStruct((batch_size, feature_lengths[key]), dtype, sharding=batch_sh)
           for name, key, dtype in (("encoder_input_tokens", "inputs", jnp.int32),
                                    ("decoder_input_tokens", "targets", jnp.int32),
                                    ("decoder_target_tokens", "targets", jnp.int32),
                                    ("decoder_loss_weights", "targets", jnp.float32))}
  step = trainer.compile_train_step(model, optimizer, mesh, state_sh, frozen_sh,
                                    num_microbatches=num_microbatches, compiler_options={})
  compiled = step.lower(with_sharding(state, state_sh), with_sharding(frozen, frozen_sh),
                        batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  if execution.scan_layers:
    flops = _scanned_flops(model_config, lambda shallow: plan_train_step(
        shallow, prompt_length, batch_size, feature_lengths, mesh_shape, device, num_microbatches,
        trainable_patterns, execution.replace(scan_layers=False)).flops_per_device)
  return Plan(mesh=tuple(mesh.devices.shape), device=device,
              argument_bytes=memory.argument_size_in_bytes,
              temporary_bytes=memory.temp_size_in_bytes, output_bytes=memory.output_size_in_bytes,
              alias_bytes=memory.alias_size_in_bytes, flops_per_device=flops,
              device_memory=DEVICES[device]["memory"])


def _scanned_flops(model_config, count: Callable[[Any], float]) -> float:
  """FLOPs per step of a scanned model, whose loops XLA's cost analysis counts once.

  `count(config)` gives the FLOPs of an unrolled step. Every layer of a stack costs the same, so the
  steps with 1 or 2 layers per stack give each stack's cost per layer.
  """
  shallow = lambda encoder, decoder: count(model_config.replace(
      num_encoder_layers=encoder, num_decoder_layers=decoder))
  base = shallow(1, 1)
  return (base + (model_config.num_encoder_layers - 1) * (shallow(2, 1) - base)
          + (model_config.num_decoder_layers - 1) * (shallow(1, 2) - base))


def xla_flags(num_devices: int) -> str:
  """XLA flags for planning on `num_devices` simulated CPU devices.

  XLA:CPU expands `jax.checkpoint`'s optimization barriers at the start of its pipeline, so CSE and the
  scheduler move the recomputed forward pass back into the forward pass and rematerialisation saves
  nothing; TPU and GPU keep the barriers. Skipping that pass makes the CPU program remat like theirs.
  XLA:CPU's all-reduce combiner also merges every layer's all-reduce of the encoding's gradient (one
  per decoder layer with heads over `model`) into one, which holds all of them at once (7 GiB per
  device for XXL); TPU combines only up to a size threshold, so the plan skips that pass too.
  """
  return (f"--xla_force_host_platform_device_count={num_devices} "
          "--xla_disable_hlo_passes=cse_barrier_expander,cpu-all-reduce-combiner")


def _parse_mesh(text: str) -> tuple[int, int]:
  try:
    data, model = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh {text!r}: write DATAxMODEL, e.g. 2x16.") from None
  if data <= 0 or model <= 0:
    raise argparse.ArgumentTypeError(f"--mesh {text!r}: both sizes must be positive.")
  return data, model


def _print_param_counts(args: argparse.Namespace, own_command_line: bool) -> int:
  """`--param_counts`: each method's trainable parameter count on the gin files' model."""
  if own_command_line:
    console.quiet()
  from prompt_tuning_jax import cli, methods  # pylint: disable=g-import-not-at-top
  try:
    settings = cli.model_settings(args.gin_file, args.gin_bindings,
                                  args.gin_search_paths.split(",") if args.gin_search_paths else [])
    counts = methods.param_counts(settings["MODEL_CONFIG"], settings["PROMPT_LENGTH"],
                                  settings["methods"])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps({"param_counts": counts}))
  else:
    width = max(map(len, counts))
    print("\n".join(f"{name:<{width}}  {count:>16,}" for name, count in counts.items()))
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", default=[], help="gin files, as for train")
  parser.add_argument("--gin", action="append", default=[], dest="gin_bindings",
                      help="gin bindings NAME=VALUE (also accepted as --gin.NAME=VALUE)")
  parser.add_argument("--gin_search_paths", default="")
  parser.add_argument("--mesh", type=_parse_mesh, help="DATAxMODEL, e.g. 2x16")
  parser.add_argument("--device", choices=sorted(DEVICES))
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--param_counts", action="store_true",
                      help="print each method's trainable parameter count on the model instead")
  own_command_line = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  # `--gin.NAME=VALUE` as the train command line writes it.
  argv = [f"--gin={a[len('--gin.'):]}" if a.startswith("--gin.") else a for a in argv]
  args = parser.parse_args(argv)
  if args.param_counts:
    return _print_param_counts(args, own_command_line)
  if args.mesh is None or args.device is None:
    parser.error("--mesh and --device are needed (or --param_counts).")
  devices = args.mesh[0] * args.mesh[1]
  flags = xla_flags(devices)
  if flags not in os.environ.get("XLA_FLAGS", ""):
    # The device count is fixed when JAX starts: plan in a child process with the simulated devices.
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
               JAX_PLATFORMS="cpu")
    return subprocess.call([sys.executable, "-m", "prompt_tuning_jax.plan", *argv], env=env)
  if own_command_line:  # before TensorFlow loads
    console.quiet()
  from prompt_tuning_jax import cli  # pylint: disable=g-import-not-at-top
  try:
    settings = cli.train_settings(args.gin_file, args.gin_bindings,
                                        args.gin_search_paths.split(",") if args.gin_search_paths
                                        else [])
    dataset = settings["dataset_config"]
    result = plan_train_step(settings["model_config"], settings["prompt_length"],
                             dataset.batch_size, dataset.task_feature_lengths, args.mesh,
                             args.device, settings.get("num_microbatches", 1),
                             execution=settings.get("execution"))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(dict(dataclasses.asdict(result), total_bytes=result.total_bytes,
                          fits=result.fits)))
  else:
    print(result.table())
  return 0


if __name__ == "__main__":
  sys.exit(main())
