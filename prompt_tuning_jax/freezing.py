"""Which parameters learn: a mask from regular expressions over `/`-joined parameter paths.

The default trains the prompt only. `split` separates the trainable subtree from the frozen one, so the
optimizer (and its state) sees only what learns and gradients are taken only with respect to it: the
backward pass never forms the weight gradients of the frozen model.
"""
import re
from typing import Any, Sequence

from prompt_tuning_jax.trees import flatten, unflatten

PROMPT_ONLY = (r"encoder/prompt/.*",)
Params = dict[str, Any]


def freeze_mask(params: Params, trainable_patterns: Sequence[str] = PROMPT_ONLY) -> Params:
  """A tree like `params` whose leaves are True where a full-match pattern marks the path trainable."""
  compiled = [re.compile(p) for p in trainable_patterns]
  flat = {path: any(c.fullmatch(path) for c in compiled) for path in flatten(params)}
  if not any(flat.values()):
    raise ValueError(f"No parameter matches the trainable patterns {list(trainable_patterns)}; the "
                     f"model has e.g. {sorted(flat)[:5]}. Was the model built with a prompt?")
  return unflatten(flat)


def split(params: Params, mask: Params) -> tuple[Params, Params]:
  """(trainable, frozen): two partial trees that together hold every leaf of `params` once."""
  flat, flat_mask = flatten(params), flatten(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable: Params, frozen: Params) -> Params:
  """The full parameter tree again; a path in both is an error (the split was not a partition)."""
  flat_trainable, flat_frozen = flatten(trainable), flatten(frozen)
  both = flat_trainable.keys() & flat_frozen.keys()
  if both:
    raise ValueError(f"Parameters are both trainable and frozen: {sorted(both)[:5]}.")
  return unflatten({**flat_frozen, **flat_trainable})
