"""Decoder-only prompt tuning against PEFT on CPU, in one run (ratios): a Llama-shaped model of
about 100M parameters with random weights, written by transformers and read by `hf_causal_lm`.

  - train: one prompt-tuning step (plain SGD on a 20-token `prefix` prompt, the loss on the target
    tokens only), ours `trainer.compile_train_step` (the command line's step: the attention and
    XLA:CPU options resolved for the device, as a run resolves them) on seqio-PrefixLM-shaped
    features, against PEFT's `PeftModelForCausalLM` with torch's SGD;
  - generate: a mixed batch of two tasks (rows alternating between 2 prompts of a bank), greedy:
    ours one `causal_decoding.generate` call (one prefill per prompt, a shared-prompt cache);
    PEFT's one `generate` per task (it takes one adapter a call), with its cache.

  python benchmarks/causal_lm_benchmark.py [--out results/causal_lm_cpu.json] [--layers 8]
"""
import argparse
import functools
import os
import sys
import tempfile

import jax
import numpy as np
import optax
import peft
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks import common  # noqa: E402
from prompt_tuning_jax import (causal_decoding, causal_lm, hf_causal_lm, losses,  # noqa: E402
                               partitioning, prompts, run_setup, trainer)
from prompt_tuning_jax.config import ExecutionConfig  # noqa: E402

PROMPT_LENGTH = 20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=8)  # 8: 101M parameters
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=args.layers,
      num_attention_heads=12, num_key_value_heads=4, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    config, params = hf_causal_lm.load_checkpoint(path)
  rng = np.random.default_rng(0)
  bank = rng.normal(0.0, 0.5, (2, PROMPT_LENGTH, 768)).astype(np.float32)
  tokens = rng.integers(3, 32000, (args.batch, args.length))
  tokens[:, 0] = config.bos_id  # rows start with BOS, as the train step's do
  targets = np.zeros(tokens.shape, bool)
  targets[:, args.length // 2:] = True
  results = dict(params=sum(p.numel() for p in model.parameters()), args=vars(args),
                 torch_threads=torch.get_num_threads())

  # Training: ours, the train step of `training.train`, on PrefixLM features of the same rows
  # (decoder_input_tokens starts with 0, which the model reads as its BOS).
  mesh = partitioning.make_mesh((1, 1), jax.devices()[:1])
  execution = run_setup.resolve_execution(ExecutionConfig(attention="auto"), config, mesh)
  results["attention"] = execution.attention
  ours = causal_lm.CausalLM(config, prompts.PromptConfig(PROMPT_LENGTH, combine="prefix"),
                            execution)
  with_prompt = lambda p: {**params, "decoder": {**params["decoder"],
                                                 "prompt": {"prompt": {"prompt": p}}}}
  batch = {"decoder_input_tokens": np.pad(tokens[:, 1:], ((0, 0), (1, 0))),
           "decoder_target_tokens": np.pad(tokens[:, 1:], ((0, 0), (0, 1))),
           "decoder_loss_weights": np.pad(targets[:, 1:], ((0, 0), (0, 1))).astype(np.int32)}
  sgd = optax.sgd(0.1)
  state = [trainer.TrainState.create({"decoder": {"prompt": {"prompt": {"prompt": bank[0]}}}},
                                     sgd, jax.random.PRNGKey(0))]
  replicated = lambda tree: jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), tree)
  step = trainer.compile_train_step(
      ours, sgd, mesh, replicated(state[0]), replicated(params),
      trainer.LossConfig(z_loss=0.0, loss_normalizing_factor=losses.NUM_REAL_TARGET_TOKENS))

  def ours_train():
    state[0], metrics = step(state[0], params, batch)
    return metrics["loss"]
  results["train_ours"] = common.time_steps(ours_train, args.steps, sync=jax.block_until_ready)

  # Training: PEFT.
  peft_model = peft.get_peft_model(model, peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_LENGTH))
  optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
  labels = torch.tensor(np.where(targets, tokens, -100))

  def peft_train():
    optimizer.zero_grad()
    loss = peft_model(input_ids=torch.tensor(tokens), labels=labels).loss
    loss.backward()
    optimizer.step()
    return loss
  results["train_peft"] = common.time_steps(peft_train, args.steps)

  # Mixed-prompt generation: rows alternate between the bank's 2 prompts.
  prompt_ids = np.arange(args.batch) % 2
  banked = causal_lm.CausalLM(config, prompts.PromptConfig(PROMPT_LENGTH, bank_size=2,
                                                          combine="prefix"))
  generate = jax.jit(functools.partial(causal_decoding.generate, banked,
                                       max_new_tokens=args.new_tokens, eos_id=-1))
  mask = np.ones(tokens.shape, bool)
  results["generate_ours"] = common.time_steps(
      lambda: generate(with_prompt(bank), tokens, mask, prompt_ids=prompt_ids), args.steps,
      sync=jax.block_until_ready)
  peft_model.eval()
  table = peft_model.prompt_encoder["default"].embedding.weight

  def peft_generate():
    with torch.no_grad():
      for task in range(2):
        table.copy_(torch.tensor(bank[task]))
        rows = torch.tensor(tokens[prompt_ids == task])
        peft_model.generate(input_ids=rows, attention_mask=torch.ones_like(rows),
                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False, pad_token_id=0)
  results["generate_peft"] = common.time_steps(peft_generate, args.steps)
  for phase in ("train", "generate"):
    results[f"{phase}_peft_over_ours"] = round(
        results[f"{phase}_peft"]["step_s"] / results[f"{phase}_ours"]["step_s"], 2)
  print({key: value for key, value in results.items()
         if key.endswith("over_ours") or key == "params"})
  for key in ("train_ours", "train_peft", "generate_ours", "generate_peft"):
    print(key, round(results[key]["step_s"], 3), "s; load", results[key]["load_before"])
  if args.out:
    common.write_json(args.out, results)


if __name__ == "__main__":
  main()
