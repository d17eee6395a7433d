"""Prompt-tuning training throughput: ours (JAX) versus Hugging Face PEFT (PyTorch), on CPU.

  PYTHONPATH=. python -m benchmarks.train_benchmark [--quick] [--output benchmarks/results/train.json]

T5 1.1 Small shape (random weights), float32, a 100-position prompt, prompt-only Adafactor:
  - fixed shapes: batch 32, inputs 128 (+ prompt 100), targets 8;
  - real data: SuperGLUE RTE train tokenised with the T5 vocabulary; PEFT pads each random batch to its
    longest example, ours batches within a few length buckets (one compiled shape per bucket);
  - MFU: XLA's FLOPs per step over step time, over a float32 matmul peak measured in the same run
    (the best of all its measurements: at the start, before each pair, at the end) and over the peak
    measured just before each pair;
  - FLOPs of the compiled step with frozen weights versus all parameters trainable;
  - memory options: bfloat16 activations and frozen weights, rematerialisation policies; scanned
    layers and their compile time at 24 + 24 layers; glibc's malloc, with huge pages and without the
    opt-in environment at all, as against gperftools' tcmalloc; JAX's asynchronous CPU dispatch.
Each measurement runs in its own child process, one after another, so peak RSS is per side and
neither framework's thread pools disturb the other; every result records the load average. Both sides'
children start with the CPU opt-in environment (`python -m prompt_tuning_jax.xla_cpu`: tcmalloc and
glibc's huge-page tunable, where this machine has them; the option row "no process opt-in (system
malloc)" runs without it), and ours run their steps inline as the tools do
(`xla_cpu.run_steps_inline`).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from benchmarks import common
from prompt_tuning_jax import xla_cpu

BATCH, INPUTS, PROMPT, TARGETS = 32, 128, 100, 8
TOKENS_PER_EXAMPLE = INPUTS + PROMPT + TARGETS


def _xla_flags(options: dict[str, Any]) -> str:
  """`compiler_options` written as `XLA_FLAGS`."""
  return " ".join(f"--{name}={'true' if value is True else value}"
                  for name, value in options.items())


YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
YNN_OFF = _xla_flags({YNN_FUSIONS: xla_cpu.CPU_OPTIONS[YNN_FUSIONS]})
YNN_DOTS = _xla_flags({YNN_FUSIONS: "LIBRARY_FUSION_TYPE_DOT"})
# oneDNN's dots, as `xla_cpu.dot_compiler_options` compiles our steps where the CPU has AVX-512.
ONEDNN_DOTS = _xla_flags({YNN_FUSIONS: xla_cpu.CPU_OPTIONS[YNN_FUSIONS], **xla_cpu.ONEDNN_DOTS})


# ---- Ours. ----

def our_step(config_overrides: dict[str, Any], frozen_dtype: Optional[str] = None,
              trainable_patterns: Optional[Sequence[str]] = None):
  """(compiled-on-demand step, state, frozen params) for our model on one CPU device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import freezing, optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
  overrides = dict(config_overrides)
  if "dtype" in overrides:
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  model, params = common.small_model(PROMPT, **overrides)
  trainable, frozen = freezing.split(params, freezing.freeze_mask(
      params, trainable_patterns or freezing.PROMPT_ONLY))
  if frozen_dtype:
    frozen = jax.tree_util.tree_map(lambda x: x.astype(frozen_dtype), frozen)
  mesh = partitioning.make_mesh()
  optimizer = optimizers.prompt_tuning_adafactor()
  state = trainer.TrainState.create(trainable, optimizer, jax.random.PRNGKey(0))
  replicated = lambda tree: jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), tree)
  step = trainer.compile_train_step(model, optimizer, mesh, replicated(state), replicated(frozen))
  return step, state, frozen


def ours_fixed(steps: int, config_overrides: Optional[dict[str, Any]] = None,
               frozen_dtype: Optional[str] = None) -> dict[str, Any]:
  """Our compiled train step on the fixed shapes: compile time, step time, FLOPs, memory."""
  import jax  # pylint: disable=g-import-not-at-top
  step, state, frozen = our_step(config_overrides or {}, frozen_dtype)
  batch = common.random_batch(BATCH, INPUTS, TARGETS)
  start = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  flops = compiled.cost_analysis()["flops"]
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], frozen, batch)
    return metrics
  timing = common.time_steps(run, steps, sync=jax.block_until_ready)
  leaves = lambda tree: jax.tree_util.tree_leaves(tree)
  return dict(timing, compile_s=compile_s, flops=flops, examples_per_s=BATCH / timing["step_s"],
              tokens_per_s=BATCH * TOKENS_PER_EXAMPLE / timing["step_s"],
              temp_bytes=memory.temp_size_in_bytes, argument_bytes=memory.argument_size_in_bytes,
              frozen_bytes=sum(x.nbytes for x in leaves(frozen)),
              optimizer_state_bytes=sum(x.nbytes for x in leaves(holder["state"].opt_state)),
              peak_rss_mib=common.peak_rss_mib())


def ours_rte(num_examples: int) -> dict[str, Any]:
  """Our step over RTE batched by `batching.batch` in length buckets (what `train.length_buckets`
  does): examples/s over all batches, compile time per shape apart. Each bucket's last partial
  batch is dropped, as in training."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import batching  # pylint: disable=g-import-not-at-top
  step, state, frozen = our_step({})
  examples = common.rte_examples(common.RTE_TRAIN, num_examples)
  pad = lambda seq, n: np.array(seq + [0] * (n - len(seq)), np.int32)
  targets = np.stack([pad(t, TARGETS) for _, t in examples])
  converted = tf.data.Dataset.from_tensor_slices({
      "encoder_input_tokens": np.stack([pad(x, common.RTE_BUCKETS[-1]) for x, _ in examples]),
      "decoder_target_tokens": targets,
      "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
      "decoder_loss_weights": (targets > 0).astype(np.float32)})
  buckets = common.RTE_BUCKETS
  batches = list(batching.batch(converted, BATCH, buckets[-1], buckets[:-1]).as_numpy_iterator())
  compiled, compile_s = {}, 0.0
  for batch in batches:  # compile every shape first: a run compiles each once, then reuses it
    shape = batch["encoder_input_tokens"].shape
    if shape not in compiled:
      start = time.perf_counter()
      compiled[shape] = step.lower(state, frozen, batch).compile()
      compile_s += time.perf_counter() - start
  state, metrics = compiled[shape](state, frozen, batch)  # warm-up
  jax.block_until_ready(metrics)
  load_before = common.load()
  start = time.perf_counter()
  for batch in batches:
    state, metrics = compiled[batch["encoder_input_tokens"].shape](state, frozen, batch)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  real_tokens = sum(int((b["encoder_input_tokens"] > 0).sum()) for b in batches)
  padded_tokens = sum(b["encoder_input_tokens"].size for b in batches)
  return dict(examples=len(batches) * BATCH, seconds=seconds,
              examples_per_s=len(batches) * BATCH / seconds, compile_s=compile_s,
              shapes=sorted(s[1] for s in compiled), input_padding=1 - real_tokens / padded_tokens,
              load_before=load_before, load_after=common.load(), peak_rss_mib=common.peak_rss_mib())


def flops_frozen_vs_trainable() -> dict[str, Any]:
  """XLA's FLOPs of the step with the `"xla"` attention (T5 as written: every attention projects its
  keys and values for every example, as PEFT runs it): prompt-only, the model's FLOPs
  (`model_flops`), versus every parameter trainable."""
  from prompt_tuning_jax import plan  # pylint: disable=g-import-not-at-top
  count = lambda patterns: plan.plan_train_step(
      common.t5_config(), PROMPT, BATCH, {"inputs": INPUTS, "targets": TARGETS}, (1, 1), "tpu_v3",
      trainable_patterns=patterns).flops_per_device
  flops = {"prompt_only": count(None), "all_trainable": count((".*",))}
  flops["model_flops"] = flops["prompt_only"]
  return dict(flops, ratio=flops["prompt_only"] / flops["all_trainable"])


# ---- PEFT. ----

def _peft_model():
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = peft.get_peft_model(transformers.T5ForConditionalGeneration(common.hf_t5_config()),
                              peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                      num_virtual_tokens=PROMPT))
  model.train()
  # The paper's optimizer on the prompt only: lr 0.3, decay 0.8, clipping 1, weight decay 1e-5.
  optimizer = Adafactor([p for p in model.parameters() if p.requires_grad], lr=0.3,
                        scale_parameter=False, relative_step=False, warmup_init=False,
                        decay_rate=-0.8, clip_threshold=1.0, weight_decay=1e-5)

  def step(input_ids, attention_mask, labels):
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss
  return step


def peft_fixed(steps: int) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  step = _peft_model()
  batch = common.random_batch(BATCH, INPUTS, TARGETS)
  inputs = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)
  mask = torch.ones_like(inputs)
  timing = common.time_steps(lambda: step(inputs, mask, labels), steps)
  return dict(timing, examples_per_s=BATCH / timing["step_s"],
              tokens_per_s=BATCH * TOKENS_PER_EXAMPLE / timing["step_s"],
              torch_threads=torch.get_num_threads(), peak_rss_mib=common.peak_rss_mib())


def peft_rte(num_examples: int) -> dict[str, Any]:
  """PEFT over random RTE batches, each padded to its longest input and target (its collator's way)."""
  import torch  # pylint: disable=g-import-not-at-top
  step = _peft_model()
  examples = common.rte_examples(common.RTE_TRAIN, num_examples)
  batches = []
  for i in range(0, len(examples) - BATCH + 1, BATCH):
    chunk = examples[i:i + BATCH]
    width = max(len(x) for x, _ in chunk)
    target_width = max(len(t) for _, t in chunk)
    inputs = torch.tensor([x + [0] * (width - len(x)) for x, _ in chunk])
    labels = torch.tensor([t + [-100] * (target_width - len(t)) for _, t in chunk])
    batches.append((inputs, (inputs > 0).long(), labels))
  step(*batches[0])  # warm-up
  load_before = common.load()
  start = time.perf_counter()
  for batch in batches:
    step(*batch)
  seconds = time.perf_counter() - start
  return dict(examples=len(batches) * BATCH, seconds=seconds,
              examples_per_s=len(batches) * BATCH / seconds, load_before=load_before,
              load_after=common.load(), peak_rss_mib=common.peak_rss_mib())


WORKERS = {"matmul": common.jax_matmul_peak, "ours_fixed": ours_fixed, "peft_fixed": peft_fixed,
           "ours_rte": ours_rte, "peft_rte": peft_rte, "flops": flops_frozen_vs_trainable}


def run_worker(name: str, xla_flags: Optional[str] = None, env: Optional[dict[str, str]] = None,
               async_dispatch: bool = False, opt_in: bool = True, **kwargs) -> dict[str, Any]:
  """Runs `WORKERS[name](**kwargs)` in a child process (with `XLA_FLAGS` and `env` if given, JAX's
  asynchronous CPU dispatch if `async_dispatch`, and the CPU opt-in environment if `opt_in`);
  returns its JSON."""
  command = [sys.executable, "-m", "benchmarks.train_benchmark", "--worker", name,
             "--worker_args", json.dumps(kwargs), *(["--async_dispatch"] if async_dispatch else [])]
  # The opt-in process settings (tcmalloc, glibc's huge pages), for both sides alike.
  child_env = dict((xla_cpu.host_tool_environ() if opt_in else None) or os.environ, **(env or {}))
  if xla_flags is not None:
    child_env["XLA_FLAGS"] = xla_flags
  done = subprocess.run(command, capture_output=True, text=True, check=False, env=child_env)
  if done.returncode:
    raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  print(f"  {name} {kwargs}: {json.dumps(result)[:240]}", file=sys.stderr, flush=True)
  return result


# XLA:CPU expands jax.checkpoint's barriers early and CSE then undoes rematerialisation; the remat
# options compile as TPU and GPU do, with that pass skipped (see `plan.xla_flags`). A pass list in
# `XLA_FLAGS` takes the place of the steps' own (`xla_cpu.dot_compiler_options`), so it names that
# one too, as the other rows compile.
KEEP_REMAT = _xla_flags({"xla_disable_hlo_passes": "cse_barrier_expander,"
                         + xla_cpu.CPU_OPTIONS["xla_disable_hlo_passes"]})
DEEP = {"num_encoder_layers": 24, "num_decoder_layers": 24}
OPTIONS = {
    "float32": dict(),
    # What the opt-in environment (`xla_cpu.host_tool_environ`) changes: the system's malloc
    # instead of tcmalloc, with glibc's huge pages and without any of it (the default); JAX's
    # default asynchronous dispatch (the step's temporaries freed on a worker thread), with
    # tcmalloc and with glibc.
    "glibc malloc": dict(env={"LD_PRELOAD": ""}),
    "no process opt-in (system malloc)": dict(opt_in=False),
    "asynchronous dispatch": dict(async_dispatch=True),
    "glibc malloc, asynchronous dispatch": dict(env={"LD_PRELOAD": ""}, async_dispatch=True),
    # What the package's CPU defaults add, one at a time: Eigen's dots instead of oneDNN's, and
    # attention in one batch chunk.
    "Eigen dots": dict(xla_flags=common.EIGEN_DOTS_FLAG),
    "attention in one chunk": dict(config_overrides={"attention_chunks": 1}),
    "attention 'xla' (T5X's)": dict(config_overrides={"attention": "xla"}),
    "bf16 activations": dict(config_overrides={"dtype": "bfloat16"}),
    "bf16 activations + frozen weights": dict(config_overrides={"dtype": "bfloat16"},
                                              frozen_dtype="bfloat16"),
    "remat full": dict(config_overrides={"remat_policy": "full"}, xla_flags=KEEP_REMAT),
    "remat dots": dict(config_overrides={"remat_policy": "dots"}, xla_flags=KEEP_REMAT),
    "scan layers": dict(config_overrides={"scan_layers": True}),
    # Compile time at depth: 24 + 24 layers (T5 1.1 Large's depth at Small's width).
    "24+24 layers": dict(config_overrides=DEEP),
    "24+24 layers, scanned": dict(config_overrides={**DEEP, "scan_layers": True}),
    "24+24 layers, remat full": dict(config_overrides={**DEEP, "remat_policy": "full"},
                                     xla_flags=KEEP_REMAT),
    "24+24 layers, remat full, scanned": dict(
        config_overrides={**DEEP, "remat_policy": "full", "scan_layers": True}, xla_flags=KEEP_REMAT),
}


def matmul_peaks() -> dict[str, Any]:
  """The float32 matmul peak of XLA:CPU's YNNPACK dots (jaxlib's default), of its Eigen dots and of
  oneDNN's (what our steps compile with, see `prompt_tuning_jax/xla_cpu.py`), each in its own
  child."""
  return {"ynn": run_worker("matmul", xla_flags=YNN_DOTS),
          "eigen": run_worker("matmul", xla_flags=YNN_OFF),
          "onednn": run_worker("matmul", xla_flags=ONEDNN_DOTS)}


def _best_flops_per_s(peaks: dict[str, Any]) -> float:
  return max(run["flops_per_s"] for run in peaks.values())


def run_all(steps: int, option_steps: int, rte_examples: int, with_options: bool,
            pairs: int, option_names: Sequence[str] = ()) -> dict[str, Any]:
  results: dict[str, Any] = {"machine": dict(platform=platform.platform(), cpus=os.cpu_count(),
                                             processor=platform.processor())}
  # The run's peak: the best of the dot backends, measured before and after the steps (and before
  # each pair, below).
  results["matmul_peak"] = matmul_peaks()
  # Ours and PEFT alternate `pairs` times: this machine's speed drifts by 10-20% over minutes, so
  # the fixed-shape ratio is the median of the pairs' ratios, each from neighbouring runs. Each pair
  # also has its own matmul peak, measured just before it, for an MFU from neighbouring runs too.
  results["fixed_pairs"], results["pair_peaks"] = [], []
  for _ in range(pairs):
    results["pair_peaks"].append(matmul_peaks())
    results["fixed_pairs"].append(
        (run_worker("ours_fixed", steps=steps), run_worker("peft_fixed", steps=steps)))
  results["ours_fixed"], results["peft_fixed"] = results["fixed_pairs"][0]
  results["ours_rte"] = run_worker("ours_rte", num_examples=rte_examples)
  results["peft_rte"] = run_worker("peft_rte", num_examples=rte_examples)
  results["matmul_peak_end"] = matmul_peaks()
  results["flops"] = run_worker("flops")
  if with_options:
    results["options"] = {name: run_worker("ours_fixed", steps=option_steps, **kwargs)
                          for name, kwargs in OPTIONS.items()
                          if not option_names or name in option_names}
  results["summary"] = summarize(results)
  return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
  """Ratios, throughput and MFU from the measurements in `results`."""
  # The run's peak: the best of every peak it measured, at the start, before each pair and at the end.
  peak = max(_best_flops_per_s(peaks) for peaks in [results["matmul_peak"], results["matmul_peak_end"],
                                                    *results.get("pair_peaks", [])])
  # MFU counts the model's FLOPs (forward and input gradients of textbook T5, the same for both
  # sides); HFU counts the FLOPs our compiled step really executes, fewer after the reassociation.
  model_flops = results["flops"]["model_flops"]
  # Each side's step time for throughput and MFU: the median of all its timed steps in the pairs.
  ours_step, peft_step = (statistics.median(
      t for pair in results["fixed_pairs"] for t in pair[side]["step_times_s"]) for side in (0, 1))
  pair_ratios = [p["step_s"] / o["step_s"] for o, p in results["fixed_pairs"]]
  cpu_s = {f"{name}_{kind}_cpu_s_per_step": statistics.median(
      pair[side][f"{kind}_cpu_s_per_step"] for pair in results["fixed_pairs"])
           for side, name in enumerate(("ours", "peft")) for kind in ("user", "system")}
  # MFU from neighbouring runs: each pair's median step over the peak measured just before it
  # (runs from before the pairs had their own peaks have none).
  pair_mfu = [
      [model_flops / statistics.median(pair[side]["step_times_s"]) / _best_flops_per_s(peaks)
       for peaks, pair in zip(results.get("pair_peaks", []), results["fixed_pairs"])]
      for side in (0, 1)]
  by_pair = {} if not pair_mfu[0] else dict(
      pair_peaks_gflops=[_best_flops_per_s(p) / 1e9 for p in results["pair_peaks"]],
      ours_mfu_by_pair=pair_mfu[0], peft_mfu_by_pair=pair_mfu[1],
      ours_mfu_pair_median=statistics.median(pair_mfu[0]),
      peft_mfu_pair_median=statistics.median(pair_mfu[1]))
  return dict(
      cpu_s, **by_pair,
      timed_steps=sum(len(pair[0]["step_times_s"]) for pair in results["fixed_pairs"]),
      fixed_ratio=statistics.median(pair_ratios), fixed_pair_ratios=pair_ratios,
      rte_ratio=results["ours_rte"]["examples_per_s"] / results["peft_rte"]["examples_per_s"],
      ours_step_s=ours_step, peft_step_s=peft_step,
      ours_examples_per_s=BATCH / ours_step, peft_examples_per_s=BATCH / peft_step,
      ours_mfu=model_flops / ours_step / peak,
      ours_hfu=results["ours_fixed"]["flops"] / ours_step / peak,
      peft_mfu=model_flops / peft_step / peak,
      matmul_peak_gflops=peak / 1e9, frozen_over_trainable_flops=results["flops"]["ratio"])


def table(results: dict[str, Any]) -> str:
  s, ours, peft = results["summary"], results["ours_fixed"], results["peft_fixed"]
  rows = [
      (f"fixed: step s, median of all {s['timed_steps']} timed steps a side, ours | PEFT",
       f"{s['ours_step_s']:.3f} | {s['peft_step_s']:.3f}"),
      ("fixed: examples/s | tokens/s from that step, ours | PEFT",
       f"{s['ours_examples_per_s']:.2f} | {s['ours_examples_per_s'] * TOKENS_PER_EXAMPLE:.0f} | "
       f"{s['peft_examples_per_s']:.2f} | {s['peft_examples_per_s'] * TOKENS_PER_EXAMPLE:.0f}"),
      ("fixed: ratio per pair | median",
       f"{' '.join(f'{r:.2f}' for r in s['fixed_pair_ratios'])} | {s['fixed_ratio']:.2f}x"),
      ("fixed: load before/after ours | PEFT",
       f"{ours['load_before'][0]}/{ours['load_after'][0]} | "
       f"{peft['load_before'][0]}/{peft['load_after'][0]}"),
      ("fixed: CPU s a step, user | system, median of the pairs, ours | PEFT",
       " | ".join(f"{s[f'{name}_{kind}_cpu_s_per_step']:.2f}" for name in ("ours", "peft")
                  for kind in ("user", "system"))),
      ("ours: compile s", f"{ours['compile_s']:.1f}"),
      ("peak RSS MiB ours | PEFT", f"{ours['peak_rss_mib']:.0f} | {peft['peak_rss_mib']:.0f}"),
      ("ours: frozen weights | optimizer state bytes",
       f"{ours['frozen_bytes'] / 2**20:.0f} MiB | {ours['optimizer_state_bytes']} B"),
      ("RTE: examples/s ours | PEFT | ratio",
       f"{results['ours_rte']['examples_per_s']:.2f} | {results['peft_rte']['examples_per_s']:.2f} | "
       f"{s['rte_ratio']:.2f}x"),
      ("RTE: our shapes | input padding | compile s",
       f"{results['ours_rte']['shapes']} | {results['ours_rte']['input_padding']:.0%} | "
       f"{results['ours_rte']['compile_s']:.1f}"),
      ("matmul peak GFLOP/s (f32)", f"{s['matmul_peak_gflops']:.0f}"),
      ("model GFLOP | MFU ours | PEFT",
       f"{results['flops']['model_flops'] / 1e9:.0f} | {s['ours_mfu']:.1%} | {s['peft_mfu']:.1%}"),
      *([] if "ours_mfu_by_pair" not in s else [
          ("each pair's own peak GFLOP/s",
           " ".join(f"{g:.0f}" for g in s["pair_peaks_gflops"])),
          ("MFU over each pair's own peak: ours per pair | median, PEFT median",
           f"{' '.join(f'{m:.1%}' for m in s['ours_mfu_by_pair'])} | "
           f"{s['ours_mfu_pair_median']:.1%}, {s['peft_mfu_pair_median']:.1%}")]),
      ("our step's GFLOP (XLA) | HFU ours", f"{ours['flops'] / 1e9:.0f} | {s['ours_hfu']:.1%}"),
      ("FLOPs frozen / all trainable",
       f"{results['flops']['prompt_only'] / 1e9:.0f} / {results['flops']['all_trainable'] / 1e9:.0f}"
       f" = {s['frozen_over_trainable_flops']:.2f}"),
  ]
  for name, option in results.get("options", {}).items():
    rows.append((f"option {name}: step s | compile s | temp MiB | RSS MiB | faults, sys s a step",
                 f"{option['step_s']:.3f} | {option['compile_s']:.1f} | "
                 f"{option['temp_bytes'] / 2**20:.0f} | {option['peak_rss_mib']:.0f} | "
                 f"{option['page_faults_per_step'] / 1e3:.0f}k, {option['system_cpu_s_per_step']:.2f}"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmarks/results/train.json")
  parser.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
  parser.add_argument("--option_steps", type=int, default=4)
  parser.add_argument("--rte_examples", type=int, default=512)
  parser.add_argument("--no_options", action="store_true", help="skip the memory options")
  parser.add_argument("--options", default="",
                      help="run only these option rows (names separated by '|'; default: all)")
  parser.add_argument("--pairs", type=int, default=3, help="alternating ours/PEFT fixed-shape runs")
  parser.add_argument("--quick", action="store_true",
                      help="3 steps, 1 pair, 128 RTE examples, no options")
  parser.add_argument("--resummarize", action="store_true",
                      help="measure nothing: recompute the summary of --output's results, print its table")
  parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  parser.add_argument("--worker_args", default="{}", help=argparse.SUPPRESS)
  parser.add_argument("--async_dispatch", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    if not args.async_dispatch:
      xla_cpu.run_steps_inline()
    print(json.dumps(WORKERS[args.worker](**json.loads(args.worker_args))))
    return 0
  if args.quick:
    args.steps, args.pairs, args.rte_examples, args.no_options = 3, 1, 128, True
  if args.resummarize:
    with open(args.output) as f:
      results = json.load(f)
    results["summary"] = summarize(results)
  else:
    results = run_all(args.steps, args.option_steps, args.rte_examples, not args.no_options,
                      args.pairs, [name for name in args.options.split("|") if name])
  print(table(results))
  common.write_json(args.output, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
