"""Tiny random Hugging Face T5 models, the reference the parity and PEFT tests compare against."""
import torch
import transformers

VOCAB = 64
# 8 buckets (4 per direction in the encoder, 2 of them exact) and max distance 20: with sequences of
# 24 the log-spaced buckets and the clipping at the last bucket are both exercised. 3 heads of 6
# (joined 18 != d_model 16) catch transposed kernels.
COMMON = dict(vocab_size=VOCAB, d_model=16, d_kv=6, num_heads=3, num_layers=2, num_decoder_layers=3,
              relative_attention_num_buckets=8, relative_attention_max_distance=20,
              dropout_rate=0.0, decoder_start_token_id=0)
VERSIONS = {
    # T5 1.0: ReLU MLP, logits through the shared embedding scaled by d_model**-0.5.
    "t5_1_0": dict(d_ff=24, feed_forward_proj="relu"),
    # T5 1.1: gated GELU, a separate lm_head, no output scaling.
    "t5_1_1": dict(d_ff=20, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def random_t5(version: str, seed: int) -> "transformers.T5ForConditionalGeneration":
  """A random HF T5; for T5 1.1 with its own `lm_head` like the released T5 1.1 checkpoints."""
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**COMMON, **VERSIONS[version]))
  if version == "t5_1_1":
    # transformers 5 still ties lm_head to `shared` for `tie_word_embeddings=False` (it only drops
    # the output scaling); give it its own weight, as real T5 1.1 checkpoints have.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, COMMON["d_model"]) * 0.3)
    model.all_tied_weights_keys.pop("lm_head.weight")
  with torch.no_grad():  # Non-trivial layer norms and position biases.
    for name, param in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        param.uniform_(0.5, 1.5)
      elif "relative_attention_bias" in name:
        param.normal_(0.0, 1.0)
  return model.eval()
