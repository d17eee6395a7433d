"""Scoring throughput (log-likelihood of given targets): ours (JAX) versus PyTorch PEFT, on CPU.

  PYTHONPATH=. python -m benchmarks.inference_benchmark [--output benchmarks/results/inference.json]

T5 1.1 Small shape (random weights), float32, batch 32, inputs 128 + a 100-position prompt, targets 8;
ours is `scoring.score` under `jax.jit`, PyTorch is the PEFT prompt-tuning model in `torch.no_grad()`.
Each side runs in its own child process; every result records the load average.
"""
import argparse
import json
import subprocess
import sys
from typing import Any, Optional, Sequence

from benchmarks import common

BATCH, INPUTS, PROMPT, TARGETS = 32, 128, 100, 8


def ours(steps: int) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import network, prompts, scoring  # pylint: disable=g-import-not-at-top
  model = network.T5(common.t5_config(), prompts.PromptConfig(PROMPT))
  tokens = jnp.ones((1, 1), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens)["params"])
  batch = common.random_batch(BATCH, INPUTS, TARGETS)
  score = jax.jit(lambda p, x, y: scoring.score(model, p, x, y))
  compiled = score.lower(params, batch["encoder_input_tokens"],
                         batch["decoder_target_tokens"]).compile()
  timing = common.time_steps(
      lambda: compiled(params, batch["encoder_input_tokens"], batch["decoder_target_tokens"]), steps,
      sync=jax.block_until_ready)
  return dict(timing, examples_per_s=BATCH / timing["step_s"],
              flops=compiled.cost_analysis()["flops"], peak_rss_mib=common.peak_rss_mib())


def pytorch(steps: int) -> dict[str, Any]:
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = peft.get_peft_model(transformers.T5ForConditionalGeneration(common.hf_t5_config()),
                              peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                      num_virtual_tokens=PROMPT)).eval()
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


WORKERS = {"ours": ours, "pytorch": pytorch}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmarks/results/inference.json")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(WORKERS[args.worker](args.steps)))
    return 0
  results = {}
  for name in ("ours", "pytorch"):
    done = subprocess.run([sys.executable, "-m", "benchmarks.inference_benchmark", "--worker", name,
                           "--steps", str(args.steps)], capture_output=True, text=True, check=True)
    results[name] = json.loads(done.stdout.strip().splitlines()[-1])
  results["ratio"] = results["ours"]["examples_per_s"] / results["pytorch"]["examples_per_s"]
  for name in ("ours", "pytorch"):
    r = results[name]
    print(f"{name:<8} {r['examples_per_s']:7.2f} examples/s  step {r['step_s']:.3f} s  "
          f"load {r['load_before'][0]}/{r['load_after'][0]}  peak RSS {r['peak_rss_mib']:.0f} MiB")
  print(f"ours / PyTorch: {results['ratio']:.2f}x")
  common.write_json(args.output, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
