"""Tiny random Hugging Face decoder-only models (Llama, Gemma 2, Gemma 3 text), the reference the
decoder-only parity, PEFT and decoding tests compare against, and the masks that feed them our
attention rules."""
import numpy as np
import torch
import transformers

VOCAB = 64
BOS, EOS = 1, 2
# Shorter than the test sequences, so the sliding layers' window cuts.
WINDOW = 5
# 4 query heads of 6 over 2 key/value heads (GQA); joined 24 != hidden 16 shows transposed kernels.
COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_attention_heads=4,
              num_key_value_heads=2, head_dim=6, bos_token_id=BOS, eos_token_id=EOS,
              pad_token_id=0, attn_implementation="eager")
FAMILIES = {
    # Llama 3.1's RoPE scaling; with head_dim 6 its frequencies' wavelengths (6, 135, 2920) fall
    # below, between and above original_max_positions / (4, 1), so each of its branches is used.
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, dict(
        num_hidden_layers=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=256))),
    # Soft-capping small enough to bite; query_pre_attn_scalar != head_dim; layer 0 slides.
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config, dict(
        num_hidden_layers=2, sliding_window=WINDOW, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0, query_pre_attn_scalar=8)),
    # Layers 0 and 2 slide with RoPE base 100; layer 1 is global, its RoPE linearly scaled.
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig, dict(
        num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=dict(full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e4),
                             sliding_attention=dict(rope_type="default", rope_theta=100.0)))),
}


def random_causal_lm(family: str, seed: int = 0, **changes) -> transformers.PreTrainedModel:
  """A random HF model of `family` (`changes` override its config) with weights large enough for
  logits of order 1 and norms away from their initial 1 (Llama) or 0 (Gemma)."""
  model_class, config_class, fields = FAMILIES[family]
  torch.manual_seed(seed)
  model = model_class(config_class(**{**COMMON, **fields, **changes}))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" not in name:
        param.normal_(0.0, 0.3)
      elif family == "llama":
        param.uniform_(0.5, 1.5)
      else:
        param.uniform_(-0.5, 0.5)
  return model.eval()


def additive_mask(mask: np.ndarray, pinned: np.ndarray, window=None) -> torch.Tensor:
  """Our attention rule as transformers' 4-D additive mask `[batch, 1, q, k]` over a sequence
  `mask` `[batch, k]` of real positions: causal, only real keys, and with a `window` only the last
  `window` positions or `pinned` ones (the prompt). Rows hold their real positions in one run, so
  distances between indices are distances between positions."""
  index = np.arange(mask.shape[1])
  query, key = index[None, :, None], index[None, None, :]
  allowed = mask[:, None, :] & (key <= query)
  if window is not None:
    allowed &= (query - key < window) | pinned[:, None, :]
  return torch.tensor(np.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None],
                      dtype=torch.float32)
