"""The compiled train step does no gradient work for frozen weights (XLA's cost analysis, compile only)."""

from prompt_tuning_jax import config, plan

# T5 1.1's shape at a quarter of Small's widths, so compiling both steps takes seconds.
CONFIG = config.t5_config("t5_1_1", "small", emb_dim=128, num_heads=2, mlp_dim=256, vocab_size=4096,
                          num_encoder_layers=4, num_decoder_layers=4)
LENGTHS = {"inputs": 64, "targets": 8}


def _flops(trainable_patterns=None) -> float:
  return plan.plan_train_step(CONFIG, prompt_length=16, batch_size=8, feature_lengths=LENGTHS,
                              mesh_shape=(1, 1), device="tpu_v3",
                              trainable_patterns=trainable_patterns).flops_per_device


def test_frozen_weights_cost_no_gradient_flops():
  prompt_only, everything = _flops(), _flops((".*",))
  # Weight gradients (and their Adafactor updates) are about a third of a full step; a metric or a
  # global norm that touched frozen gradients would keep them and push the ratio to ~1.
  assert prompt_only <= 0.70 * everything, (prompt_only, everything)
