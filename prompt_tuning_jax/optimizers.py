"""The paper's optimizer: optax's Adafactor with the prompt-tuning recipe as defaults.

Adafactor's second-moment decay is `1 - (t + 1) ** -decay_rate` at optimizer step t: near 0 at the start,
so the first updates follow the newest gradients closely. T5X keeps counting from the step of the
checkpoint it resumed (T5 1.1 LM-adapted checkpoints are at step 1,100,000), so its prompt starts with
a decay of about 1 - 1.1e6 ** -0.8 = 0.99999. Our optimizer counts from 0 for the prompt alone, like a
fresh T5X run; pass `step_offset=1_100_000` to reproduce the official runs' decay exactly.

Its numeric hyperparameters (the learning rate among them) live in the optimizer state
(`optax.inject_hyperparams`), where the trainer logs them; a resumed run puts its own settings there
(`with_hyperparameters`), so a new LEARNING_RATE takes effect.
"""
import math
from typing import Any

import numpy as np
import optax


def prompt_tuning_adafactor(learning_rate: float = 0.3, decay_rate: float = 0.8,
                            step_offset: int = 0, weight_decay: float = 1e-5,
                            clipping_threshold: float = 1.0,
                            multiply_by_parameter_scale: bool = False
                            ) -> optax.GradientTransformation:
  """Adafactor as in the paper: lr 0.3 constant, decay 0.8, weight decay 1e-5, update clipping 1.

  Raises:
    ValueError: a setting is not a number in its range (LEARNING_RATE: positive, or a schedule).
  """
  if not callable(learning_rate):  # a schedule is optax's to call
    _check_number("LEARNING_RATE (optimizers.prompt_tuning_adafactor.learning_rate)",
                  learning_rate, positive=True)
  _check_number("optimizers.prompt_tuning_adafactor.decay_rate", decay_rate, positive=True)
  _check_number("optimizers.prompt_tuning_adafactor.step_offset", step_offset)
  _check_number("optimizers.prompt_tuning_adafactor.weight_decay", weight_decay)
  _check_number("optimizers.prompt_tuning_adafactor.clipping_threshold", clipping_threshold,
                positive=True)
  return optax.inject_hyperparams(optax.adafactor, static_args=(
      "multiply_by_parameter_scale", "weight_decay_rate", "min_dim_size_to_factor", "factored"))(
          learning_rate=learning_rate, decay_rate=decay_rate, decay_offset=-step_offset,
          multiply_by_parameter_scale=multiply_by_parameter_scale,
          clipping_threshold=clipping_threshold, weight_decay_rate=weight_decay or None)


def hyperparameters(opt_state: Any) -> dict[str, float]:
  """The numeric hyperparameters `optax.inject_hyperparams` keeps in `opt_state`, as floats of
  float32's shortest form (0.3, not 0.30000001192092896); `{}` for other optimizers."""
  return {name: float(str(np.float32(value)))
          for name, value in getattr(opt_state, "hyperparams", {}).items()}


def state_layout(opt_state: Any) -> list[str]:
  """The names of the optimizer state's parts in order (`FactoredState`, `EmptyState`, ...). A
  checkpoint restores only into a state of its layout, which the optimizer's other settings shape
  (weight decay 0 or not, `multiply_by_parameter_scale`): a run records it, to refuse a change."""
  parts = []

  def visit(node: Any) -> None:
    if isinstance(node, tuple):
      if hasattr(node, "_fields"):
        parts.append(type(node).__name__)
      for child in node:
        visit(child)
  visit(opt_state)
  return parts


def with_hyperparameters(opt_state: Any, source: Any) -> Any:
  """`opt_state` (restored from a checkpoint) with the hyperparameters of `source` (a fresh state of
  this run's optimizer), so a resumed run uses its own learning rate; other state is unchanged."""
  if not hasattr(opt_state, "hyperparams"):
    return opt_state
  return opt_state._replace(hyperparams=dict(source.hyperparams))


def _check_number(name: str, value: Any, positive: bool = False) -> None:
  valid = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
           and (value > 0 if positive else value >= 0))
  if not valid:
    raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got "
                     f"{value!r}.")
