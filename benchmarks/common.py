"""Shared pieces of the benchmarks: timing with the machine's load, a matmul peak, and the two models.

Both sides build the same T5 1.1 shape with random weights: ours (`network.T5` plus a prompt, the
trainer's compiled step) and Hugging Face's `T5ForConditionalGeneration` wrapped by PEFT prompt tuning.
"""
import json
import os
import resource
import statistics
import time
from typing import Any, Callable, Optional

import numpy as np

# XLA_FLAGS that keep Eigen's dots where `xla_cpu.dot_compiler_options` would pick oneDNN's (it
# leaves out what the user's flags set).
EIGEN_DOTS_FLAG = "--xla_cpu_use_onednn=false"
SMALL = dict(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
             num_encoder_layers=8, num_decoder_layers=8)


def load() -> list[float]:
  """The 1, 5 and 15 minute load averages, rounded."""
  return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mib() -> float:
  """This process's peak resident memory (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step: Callable[[], Any], steps: int, warmup: int = 2,
               sync: Callable[[Any], Any] = lambda x: x) -> dict[str, Any]:
  """Median, best and all wall times (the list rounded to 0.1 ms) of `steps` calls of `step()` after
  `warmup` calls, with the load, and per timed call the page faults and this process's user and system
  CPU seconds (all threads; the system time is mostly the kernel zeroing freshly faulted pages)."""
  for _ in range(warmup):
    sync(step())
  times = []
  load_before = load()
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    start = time.perf_counter()
    sync(step())
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return dict(step_s=statistics.median(times), best_s=min(times),
              step_times_s=[round(t, 4) for t in times],
              load_before=load_before, load_after=load(),
              page_faults_per_step=(after.ru_minflt - before.ru_minflt) / steps,
              user_cpu_s_per_step=(after.ru_utime - before.ru_utime) / steps,
              system_cpu_s_per_step=(after.ru_stime - before.ru_stime) / steps)


def jax_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> dict[str, Any]:
  """FLOP/s of an `[n, n] @ [n, n]` matmul with XLA on the default device: best and median of repeats."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  matmul = jax.jit(jnp.dot)
  timing = time_steps(lambda: matmul(a, b), repeats, sync=jax.block_until_ready)
  flops = 2.0 * n ** 3
  return dict(n=n, dtype=dtype, flops_per_s=flops / timing["best_s"],
              median_flops_per_s=flops / timing["step_s"], load=timing["load_after"])


def t5_config(**overrides):
  """Our T5 1.1 Small-shaped config (random weights)."""
  from prompt_tuning_jax import config  # pylint: disable=g-import-not-at-top
  return config.t5_config("t5_1_1", "small", **{**SMALL, **overrides})


def small_model(prompt_length: int, **overrides):
  """(our T5 1.1 Small-shaped model with a `prompt_length` prompt, its random params, unboxed).

  `overrides` are `T5Config` or `ExecutionConfig` fields; the execution is resolved from `"auto"`
  for JAX's default devices, as the command-line tools resolve it.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import config, network, prompts  # pylint: disable=g-import-not-at-top
  execution_fields = {f.name for f in dataclasses.fields(config.ExecutionConfig)}
  model_config = t5_config(**{k: v for k, v in overrides.items() if k not in execution_fields})
  execution = config.ExecutionConfig(**{"attention": "auto", **{
      k: v for k, v in overrides.items() if k in execution_fields}})
  model = network.T5(model_config, prompts.PromptConfig(prompt_length),
                     execution.for_platform(jax.devices()[0].platform, model_config))
  tokens = jnp.ones((1, 1), jnp.int32)
  return model, nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens)["params"])


def hf_t5_config(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                 num_encoder_layers=8, num_decoder_layers=8):
  """The same shape as a `transformers.T5Config` (gated GELU, untied logits, no dropout)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.T5Config(
      vocab_size=vocab_size, d_model=emb_dim, d_kv=head_dim, d_ff=mlp_dim, num_heads=num_heads,
      num_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def random_batch(batch_size: int, input_length: int, target_length: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """T5X features of random non-pad tokens: every position is real."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, 32000, (batch_size, target_length)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(2, 32000, (batch_size, input_length)).astype(np.int32),
          "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
          "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones_like(targets, np.float32)}


RTE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "superglue", "RTE")
RTE_TRAIN, RTE_VALIDATION = (os.path.join(RTE_DIR, name) for name in ("train_full.jsonl", "val.jsonl"))
RTE_EVAL_INPUTS = 512  # TASK_FEATURE_LENGTHS['inputs'] of our RTE eval config
# Input lengths (before the prompt) of the compiled shapes for RTE; its longest input is 317 tokens.
RTE_BUCKETS = (64, 96, 128, 192, 256, 320)


def rte_texts(path: str) -> list[tuple[str, str]]:
  """SuperGLUE RTE `(input text, label)` in T5's text format, in the file's order."""
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  return [(f"rte sentence1: {row['premise']} sentence2: {row['hypothesis']}",
           row["label"] if isinstance(row["label"], str)
           else ("entailment", "not_entailment")[row["label"]]) for row in rows]


def rte_examples(path: str, limit: Optional[int] = None,
                 seed: int = 0) -> list[tuple[list[int], list[int]]]:
  """SuperGLUE RTE `(input ids, target ids)` with EOS, T5's text format and vocabulary, shuffled."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  from prompt_tuning_jax import vocabularies  # pylint: disable=g-import-not-at-top
  spm = sentencepiece.SentencePieceProcessor(model_file=vocabularies.T5_SPM_PATH)
  examples = [(spm.encode(text) + [1], spm.encode(label) + [1]) for text, label in rte_texts(path)]
  order = np.random.default_rng(seed).permutation(len(examples))
  return [examples[i] for i in order[:limit]]


def write_json(path: str, results: Any) -> None:
  """Writes a benchmark's results, creating its folder."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
