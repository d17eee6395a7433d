"""Scoring throughput (log-likelihood of given targets): ours (JAX) versus PyTorch PEFT, on CPU.

  PYTHONPATH=. python -m benchmarks.inference_benchmark [--output benchmarks/results/inference.json]

T5 1.1 Small shape (random weights), float32, batch 32, a 100-position prompt, targets 8:
  - fixed shapes, inputs 128: ours is `scoring.score` under `jax.jit`, PyTorch is the PEFT
    prompt-tuning model in `torch.no_grad()`;
  - SuperGLUE RTE validation (277 examples, T5 vocabulary) as evaluation scores it: ours through
    `evaluation.Predictor.score_fn` with inputs padded to TASK_FEATURE_LENGTHS' 512 as T5X pads them,
    and with length buckets (examples sorted by length, each batch cut to a bucket); PyTorch pads
    each batch to its longest example;
  - greedy decoding of 8 and 32 tokens on the fixed shapes (no early stop): ours is
    `decoding.greedy_decode` under `jax.jit`, PyTorch is the PEFT model's `generate`.
Each side runs in its own child process, started with the CPU opt-in environment (`python -m
prompt_tuning_jax.xla_cpu`: tcmalloc and glibc's huge-page tunable, where this machine has them),
ours running its steps inline as the tools do; every result records the load average.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from benchmarks import common
from prompt_tuning_jax import xla_cpu

BATCH, INPUTS, PROMPT, TARGETS = 32, 128, 100, 8


def ours(steps: int) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import scoring, xla_cpu  # pylint: disable=g-import-not-at-top
  model, params = common.small_model(PROMPT)
  batch = common.random_batch(BATCH, INPUTS, TARGETS)
  # Compiled as `evaluation.Predictor` compiles its scoring.
  score = jax.jit(lambda p, x, y: scoring.score(model, p, x, y),
                  compiler_options=xla_cpu.dot_compiler_options())
  compiled = score.lower(params, batch["encoder_input_tokens"],
                         batch["decoder_target_tokens"]).compile()
  timing = common.time_steps(
      lambda: compiled(params, batch["encoder_input_tokens"], batch["decoder_target_tokens"]), steps,
      sync=jax.block_until_ready)
  return dict(timing, examples_per_s=BATCH / timing["step_s"],
              flops=compiled.cost_analysis()["flops"], peak_rss_mib=common.peak_rss_mib())


def _peft_model():
  """The PEFT prompt-tuning model of the same shape (random weights), in eval mode."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  return peft.get_peft_model(transformers.T5ForConditionalGeneration(common.hf_t5_config()),
                             peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                     num_virtual_tokens=PROMPT)).eval()


def pytorch(steps: int) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  model = _peft_model()
  batch = common.random_batch(BATCH, INPUTS, TARGETS)
  inputs = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)

  def score():
    with torch.no_grad():
      logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels).logits
      return torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0].sum(-1)
  timing = common.time_steps(score, steps)
  return dict(timing, examples_per_s=BATCH / timing["step_s"], torch_threads=torch.get_num_threads(),
              peak_rss_mib=common.peak_rss_mib())


def ours_rte(length_buckets: Sequence[int] = ()) -> dict[str, Any]:
  """`Predictor.score_fn` over RTE validation padded to `common.RTE_EVAL_INPUTS`, as seqio's evaluator
  hands it over: a first pass (compiling each shape) and a timed second pass."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import evaluation, freezing  # pylint: disable=g-import-not-at-top
  model, params = common.small_model(PROMPT)
  trainable, frozen = freezing.split(params, freezing.freeze_mask(params))
  predictor = evaluation.Predictor(model, frozen, BATCH, length_buckets=length_buckets)
  predictor.trainable = trainable
  examples = common.rte_examples(common.RTE_VALIDATION)
  pad = lambda seq, n: np.array(seq + [0] * (n - len(seq)), np.int32)
  features = tf.data.Dataset.from_tensor_slices({
      "encoder_input_tokens": np.stack([pad(x, common.RTE_EVAL_INPUTS) for x, _ in examples]),
      "decoder_target_tokens": np.stack([pad(t, TARGETS) for _, t in examples])}).enumerate()
  start = time.perf_counter()
  predictor.score_fn(features)
  first_pass_s = time.perf_counter() - start
  load_before = common.load()
  start = time.perf_counter()
  scores = predictor.score_fn(features)
  seconds = time.perf_counter() - start
  return dict(examples=len(scores), seconds=seconds, examples_per_s=len(scores) / seconds,
              first_pass_s=first_pass_s, load_before=load_before, load_after=common.load(),
              peak_rss_mib=common.peak_rss_mib())


def pytorch_rte() -> dict[str, Any]:
  """The PEFT model scoring RTE validation in batches of `BATCH`, each padded to its longest input
  and target; timed after one warm-up batch."""
  import torch  # pylint: disable=g-import-not-at-top
  model = _peft_model()
  examples = common.rte_examples(common.RTE_VALIDATION)
  batches = []
  for i in range(0, len(examples), BATCH):
    chunk = examples[i:i + BATCH]
    width, target_width = max(len(x) for x, _ in chunk), max(len(t) for _, t in chunk)
    inputs = torch.tensor([x + [0] * (width - len(x)) for x, _ in chunk])
    labels = torch.tensor([t + [0] * (target_width - len(t)) for _, t in chunk])
    batches.append((inputs, labels))

  def score(inputs, labels):
    with torch.no_grad():
      logits = model(input_ids=inputs, attention_mask=(inputs > 0).long(), labels=labels).logits
      token_scores = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
      return (token_scores * (labels > 0)).sum(-1)
  score(*batches[0])
  load_before = common.load()
  start = time.perf_counter()
  for batch in batches:
    score(*batch)
  seconds = time.perf_counter() - start
  return dict(examples=len(examples), seconds=seconds, examples_per_s=len(examples) / seconds,
              load_before=load_before, load_after=common.load(), peak_rss_mib=common.peak_rss_mib())


def ours_decode(steps: int, length: int) -> dict[str, Any]:
  """`length` greedy tokens for each row of the fixed-shape batch (EOS never ends a row)."""
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import decoding  # pylint: disable=g-import-not-at-top
  model, params = common.small_model(PROMPT)
  inputs = common.random_batch(BATCH, INPUTS, TARGETS)["encoder_input_tokens"]
  decode = jax.jit(lambda p, x: decoding.greedy_decode(model, p, x, max_decode_length=length,
                                                       eos_id=-1)[0])
  compiled = decode.lower(params, inputs).compile()
  timing = common.time_steps(lambda: compiled(params, inputs), steps, warmup=1,
                             sync=jax.block_until_ready)
  return dict(timing, tokens_per_s=BATCH * length / timing["step_s"],
              peak_rss_mib=common.peak_rss_mib())


def pytorch_decode(steps: int, length: int) -> dict[str, Any]:
  """The PEFT model's greedy `generate` of exactly `length` tokens for each row."""
  import torch  # pylint: disable=g-import-not-at-top
  model = _peft_model()
  inputs = torch.tensor(common.random_batch(BATCH, INPUTS, TARGETS)["encoder_input_tokens"],
                        dtype=torch.long)

  def generate():
    with torch.no_grad():
      return model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                            max_new_tokens=length, min_new_tokens=length, do_sample=False,
                            num_beams=1)
  timing = common.time_steps(generate, steps, warmup=1)
  return dict(timing, tokens_per_s=BATCH * length / timing["step_s"],
              torch_threads=torch.get_num_threads(), peak_rss_mib=common.peak_rss_mib())


WORKERS = {"ours": ours, "pytorch": pytorch, "ours_rte": ours_rte, "pytorch_rte": pytorch_rte,
           "ours_decode": ours_decode, "pytorch_decode": pytorch_decode}


def run_worker(name: str, **kwargs) -> dict[str, Any]:
  """`WORKERS[name](**kwargs)` in a child process with the CPU opt-in environment; its JSON."""
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.inference_benchmark", "--worker", name, "--worker_args",
       json.dumps(kwargs)], capture_output=True, text=True, check=True,
      env=xla_cpu.host_tool_environ() or os.environ)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmarks/results/inference.json")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--no_rte", action="store_true", help="skip RTE validation")
  parser.add_argument("--decode_lengths", default="8,32", help="greedy decoding lengths; \"\" for none")
  parser.add_argument("--decode_steps", type=int, default=3, help="timed decodes after one warm-up")
  parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  parser.add_argument("--worker_args", default="{}", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    xla_cpu.run_steps_inline()  # as our tools run
    print(json.dumps(WORKERS[args.worker](**json.loads(args.worker_args))))
    return 0
  results = {name: run_worker(name, steps=args.steps) for name in ("ours", "pytorch")}
  results["ratio"] = results["ours"]["examples_per_s"] / results["pytorch"]["examples_per_s"]
  for name in ("ours", "pytorch"):
    r = results[name]
    print(f"{name:<8} {r['examples_per_s']:7.2f} examples/s  step {r['step_s']:.3f} s  "
          f"load {r['load_before'][0]}/{r['load_after'][0]}  peak RSS {r['peak_rss_mib']:.0f} MiB")
  print(f"ours / PyTorch: {results['ratio']:.2f}x")
  if not args.no_rte:
    rte = results["rte_validation"] = {
        f"ours, inputs padded to {common.RTE_EVAL_INPUTS}": run_worker("ours_rte"),
        f"ours, length buckets {list(common.RTE_BUCKETS)}": run_worker("ours_rte",
                                                                 length_buckets=common.RTE_BUCKETS),
        "PyTorch, each batch padded to its longest": run_worker("pytorch_rte")}
    print("RTE validation, scoring all 277 examples:")
    for name, r in rte.items():
      first = f"  first pass (compiling) {r['first_pass_s']:.1f} s" if "first_pass_s" in r else ""
      print(f"  {name:<50} {r['examples_per_s']:6.2f} examples/s  {r['seconds']:.1f} s{first}")
  lengths = [int(n) for n in args.decode_lengths.split(",") if n]
  if lengths:
    decode = results["greedy_decoding"] = {
        str(n): {name: run_worker(f"{name}_decode", steps=args.decode_steps, length=n)
                 for name in ("ours", "pytorch")} for n in lengths}
    print(f"Greedy decoding, batch {BATCH}, {INPUTS} input tokens + a {PROMPT}-position prompt:")
    for n, sides in decode.items():
      ours_r, torch_r = sides["ours"], sides["pytorch"]
      print(f"  {n:>3} tokens: ours {ours_r['step_s']:.2f} s ({ours_r['tokens_per_s']:.0f} tokens/s), "
            f"PyTorch {torch_r['step_s']:.2f} s ({torch_r['tokens_per_s']:.0f} tokens/s), "
            f"{torch_r['step_s'] / ours_r['step_s']:.2f}x")
  common.write_json(args.output, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
