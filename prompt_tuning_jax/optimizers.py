"""The paper's optimizer: optax's Adafactor with the prompt-tuning recipe as defaults.

Adafactor's second-moment decay is `1 - (t + 1) ** -decay_rate` at optimizer step t: near 0 at the start,
so the first updates follow the newest gradients closely. T5X keeps counting from the step of the
checkpoint it resumed (T5 1.1 LM-adapted checkpoints are at step 1,100,000), so its prompt starts with
a decay of about 1 - 1.1e6 ** -0.8 = 0.99999. Our optimizer counts from 0 for the prompt alone, like a
fresh T5X run; pass `step_offset=1_100_000` to reproduce the official runs' decay exactly.
"""
import optax


def prompt_tuning_adafactor(learning_rate: float = 0.3, decay_rate: float = 0.8,
                            step_offset: int = 0, weight_decay: float = 1e-5,
                            clipping_threshold: float = 1.0,
                            multiply_by_parameter_scale: bool = False
                            ) -> optax.GradientTransformation:
  """Adafactor as in the paper: lr 0.3 constant, decay 0.8, weight decay 1e-5, update clipping 1."""
  # inject_hyperparams keeps the learning rate in the optimizer state, where the trainer logs it.
  return optax.inject_hyperparams(optax.adafactor, static_args=(
      "multiply_by_parameter_scale", "weight_decay_rate", "min_dim_size_to_factor", "factored"))(
          learning_rate=learning_rate, decay_rate=decay_rate, decay_offset=-step_offset,
          multiply_by_parameter_scale=multiply_by_parameter_scale,
          clipping_threshold=clipping_threshold, weight_decay_rate=weight_decay or None)
