"""Throughput of mixed-task serving and of prompt ensembling, on a tiny and a small T5 (random weights).

  PYTHONPATH=. python benchmarks/serving_benchmark.py --output benchmarks/results/serving.json

Measured, for rank classification over two labels (`score`) and a short greedy decode (`decode`):
  - a batch mixing 8 tasks' prompts from a bank, versus a batch of one task with the plain
    one-prompt model (and with the bank), all of the same size;
  - an ensemble of K=5 prompts in one computation, versus 5 separate one-prompt passes;
  - `rte`: `PromptServer.score` over SuperGLUE RTE validation's 277 texts (T5 vocabulary), requests
    alternating between two tasks' prompts, on the Small shape: every batch padded to 512 inputs,
    against `length_buckets` (requests sorted by length, each batch cut to a bucket).
Every time is the median of `--repeats` runs of the compiled function after a warm-up run; the RTE
rows time one pass after a first pass that compiles.
"""
import argparse
import functools
import json
import os
import platform
import statistics
import time
from typing import Callable

import jax
import numpy as np

from benchmarks import common
from prompt_tuning_jax import (checkpoints, config, decoding, ensembling, prompts, scoring, serving,
                               trees, vocabularies, xla_cpu)
from prompt_tuning_jax.network import T5

NUM_TASKS = 8
ENSEMBLE_SIZE = 5


def median_seconds(fn: Callable[[], jax.Array], repeats: int) -> float:
  """The median wall time of `fn()` over `repeats` runs, after one warm-up (compiling) run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _functions(model: T5, decode_length: int) -> dict[str, Callable]:
  """The two workloads, jitted: `(params, inputs, label_targets, ids, lengths) -> outputs`."""
  score = lambda p, x, t, ids, n: scoring.rank_classify(model, p, x, t, ids, n)[1]
  decode = lambda p, x, t, ids, n: decoding.greedy_decode(
      model, p, x, max_decode_length=decode_length, prompt_ids=ids, prompt_lengths=n)[0]
  # Compiled as `serving.PromptServer` compiles them.
  return {"score": jax.jit(score, compiler_options=xla_cpu.dot_compiler_options()),
          "decode": jax.jit(decode)}


def run_config(name: str, model_config: config.T5Config, batch_size: int, input_length: int,
               prompt_length: int, decode_length: int, repeats: int) -> list[dict]:
  """Times every workload on one model; returns one row per (workload, setting)."""
  rng = np.random.RandomState(0)
  frozen = trees.unflatten(checkpoints.load_frozen_params(model_config, None))
  inputs = rng.randint(3, 1000, size=(batch_size, input_length)).astype(np.int32)
  inputs[:, -1] = 1
  label_targets = np.array([[100, 101, 1, 0], [102, 1, 0, 0]], np.int32)  # two labels, with EOS
  task_prompts = rng.normal(size=(NUM_TASKS, prompt_length, model_config.emb_dim)).astype(
      np.float32)

  single = _functions(T5(model_config, prompts.PromptConfig(prompt_length)), decode_length)
  bank = _functions(serving.bank_model(model_config, NUM_TASKS, prompt_length), decode_length)
  bank_params = serving.with_prompt_bank(frozen, task_prompts)
  lengths = np.full(batch_size, prompt_length, np.int32)
  mixed_ids = (np.arange(batch_size) % NUM_TASKS).astype(np.int32)
  one_task_ids = np.zeros(batch_size, np.int32)
  member_params = [serving.with_prompt_bank(frozen, p) for p in task_prompts[:ENSEMBLE_SIZE]]
  ensemble_model = serving.bank_model(model_config, ENSEMBLE_SIZE, prompt_length)
  ensemble_params = serving.with_prompt_bank(frozen, task_prompts[:ENSEMBLE_SIZE])
  ensemble_lengths = np.full(ENSEMBLE_SIZE, prompt_length, np.int32)
  ensemble_run = {
      workload: jax.jit(functools.partial(ensembling.member_outputs, ensemble_model,
                                          max_decode_length=decode_length))
      for workload in ("score", "decode")}

  rows = []
  for workload in ("score", "decode"):
    targets = label_targets if workload == "score" else None
    time_it = lambda fn: median_seconds(fn, repeats)
    one_prompt = time_it(lambda: single[workload](member_params[0], inputs, label_targets, None,
                                                  None))
    one_task_bank = time_it(lambda: bank[workload](bank_params, inputs, label_targets,
                                                   one_task_ids, lengths))
    mixed = time_it(lambda: bank[workload](bank_params, inputs, label_targets, mixed_ids, lengths))
    together = time_it(lambda: ensemble_run[workload](ensemble_params, inputs, ensemble_lengths,
                                                      targets))
    separate = time_it(lambda: [single[workload](p, inputs, label_targets, None, None)
                                for p in member_params])
    rows += [
        dict(config=name, workload=workload, setting="1 task, one-prompt model", seconds=one_prompt,
             examples_per_s=batch_size / one_prompt, relative=1.0),
        dict(config=name, workload=workload, setting="1 task, prompt bank", seconds=one_task_bank,
             examples_per_s=batch_size / one_task_bank, relative=one_prompt / one_task_bank),
        dict(config=name, workload=workload, setting=f"{NUM_TASKS} tasks mixed, prompt bank",
             seconds=mixed, examples_per_s=batch_size / mixed, relative=one_prompt / mixed),
        dict(config=name, workload=workload, setting=f"{ENSEMBLE_SIZE} separate passes",
             seconds=separate, examples_per_s=batch_size / separate, relative=1.0),
        dict(config=name, workload=workload, setting=f"ensemble K={ENSEMBLE_SIZE}, one call",
             seconds=together, examples_per_s=batch_size / together,
             relative=separate / together),
    ]
  return rows


def rte_requests(batch_size: int, prompt_length: int) -> list[dict]:
  """`PromptServer.score` over RTE validation, at full width and with length buckets (Small shape)."""
  requests = [(("rte", "rte_paraphrase")[i % 2], text)
              for i, (text, _) in enumerate(common.rte_texts(common.RTE_VALIDATION))]
  labels = ("entailment", "not_entailment")
  model_config = config.t5_config("t5_1_1", "small")
  frozen = checkpoints.load_frozen_params(model_config, None)
  rng = np.random.RandomState(0)
  task_prompts = {task: rng.normal(size=(prompt_length, model_config.emb_dim))
                  for task in ("rte", "rte_paraphrase")}
  results, reference = [], None
  for buckets in ((), common.RTE_BUCKETS):
    server = serving.PromptServer(model_config, frozen, capacity=2, max_prompt_length=prompt_length,
                                  vocabulary=vocabularies.t5_vocabulary(), batch_size=batch_size,
                                  max_input_length=common.RTE_EVAL_INPUTS, max_decode_length=8,
                                  length_buckets=buckets)
    for task, prompt in task_prompts.items():
      server.add_prompt(task, prompt)
    start = time.perf_counter()
    server.score(requests, labels)
    first = time.perf_counter() - start
    start = time.perf_counter()
    scores = server.score(requests, labels)
    seconds = time.perf_counter() - start
    reference = scores if reference is None else reference
    results.append(dict(config="small", workload="rte",
                        setting=(f"{len(buckets)} length buckets" if buckets
                                 else f"padded to {common.RTE_EVAL_INPUTS}"),
                        length_buckets=list(buckets),
                        seconds=seconds, first_pass_seconds=first, examples=len(requests),
                        examples_per_s=len(requests) / seconds,
                        relative=results[0]["seconds"] / seconds if results else 1.0,
                        max_abs_score_difference=float(np.max(np.abs(scores - reference)))))
  return results


def format_rows(rows: list[dict]) -> str:
  header = (f"{'config':<7} {'workload':<8} {'setting':<28} {'ms/batch':>10} {'examples/s':>11} "
            f"{'vs baseline':>11}")
  lines = [header, "-" * len(header)]
  lines += [f"{r['config']:<7} {r['workload']:<8} {r['setting']:<28} {1000 * r['seconds']:10.2f} "
            f"{r['examples_per_s']:11.1f} {r['relative']:10.3f}x" for r in rows]
  rte = [r for r in rows if r["workload"] == "rte"]
  if rte:
    lines.append(f"rte: PromptServer.score over RTE validation's {rte[0]['examples']} requests, two "
                 f"labels; ms/batch is for all of them; buckets {rte[-1]['length_buckets']}; the "
                 "first pass, compiling, took " + " and ".join(f"{r['first_pass_seconds']:.1f} s"
                                                               for r in rte)
                 + f"; scores differ by at most {rte[-1]['max_abs_score_difference']:.2g}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmarks/results/serving.json")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--prompt_length", type=int, default=20)
  parser.add_argument("--decode_length", type=int, default=4)
  parser.add_argument("--configs", default="tiny,small", help="comma-separated; \"\" for none")
  parser.add_argument("--rte_batch_size", type=int, default=32)
  parser.add_argument("--no_rte", action="store_true", help="skip serving RTE validation's requests")
  args = parser.parse_args()
  rows = []
  for size in filter(None, args.configs.split(",")):
    rows += run_config(size, config.t5_config("t5_1_1", size), args.batch_size, args.input_length,
                       args.prompt_length, args.decode_length, args.repeats)
  if not args.no_rte:
    rows += rte_requests(args.rte_batch_size, args.prompt_length)
  print(format_rows(rows))
  print("vs baseline: the one-prompt model's time over this setting's (mixed, bank), or 5 separate "
        "passes' time over the ensemble's (ensemble).")
  os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
  with open(args.output, "w") as f:
    json.dump({"settings": vars(args), "num_tasks": NUM_TASKS, "ensemble_size": ENSEMBLE_SIZE,
               "device": str(jax.devices()[0]), "platform": platform.platform(),
               "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
