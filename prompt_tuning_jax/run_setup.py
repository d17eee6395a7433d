"""What every run checks and builds before its work, shared by `training.train`,
`inference.evaluate_prompt`, `inference.infer` and `ensembling.evaluate_ensemble`: the task's
vocabulary, the feature and prompt lengths, the prompt's initialiser, the execution settings for the
devices. Each check raises a `ValueError` whose message names the setting to fix.
"""
import inspect
import logging
from typing import Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from prompt_tuning_jax import methods, prompts
from prompt_tuning_jax.config import ExecutionConfig, T5Config
from prompt_tuning_jax.tasks import common as task_common

logger = logging.getLogger("prompt_tuning_jax")


def task_vocabulary(name: str) -> seqio.Vocabulary:
  """The targets' vocabulary of the registered task or mixture `name` (MIXTURE_OR_TASK_NAME)."""
  try:
    task = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(f"MIXTURE_OR_TASK_NAME {name!r} is not registered ({e}). Import the module "
                     "that registers it with --gin.MIXTURE_OR_TASK_MODULE=\"'my.tasks'\".") from None
  return task.output_features["targets"].vocabulary


def task_indexed(name: str, method: methods.Method) -> tuple[str, methods.Method, list[str]]:
  """A multi-task prompt's mixture: (the mixture `name` with each input's task as its first token,
  `tasks.common.task_indexed_mixture`; `method` for its tasks; their names in index order)."""
  indexed, task_names, first_token = task_common.task_indexed_mixture(name)
  return indexed, method.for_tasks(len(task_names), first_token), task_names


def check_prompt_length(prompt_length: int) -> None:
  if not isinstance(prompt_length, int) or isinstance(prompt_length, bool) or prompt_length <= 0:
    raise ValueError(f"PROMPT_LENGTH must be a positive int, got {prompt_length!r}; the paper uses 100.")


def check_feature_lengths(feature_lengths: Mapping[str, int], prompt_length: int,
                          max_encoder_length: Optional[int]) -> None:
  """TASK_FEATURE_LENGTHS needs positive `inputs` and `targets`; with the prompt, the encoder's
  length (inputs + PROMPT_LENGTH) must fit `max_encoder_length` when one is set. Inputs longer than
  `inputs` are cut, as in T5 (the prompt takes no input positions)."""
  if not isinstance(feature_lengths, Mapping):
    raise ValueError(f"TASK_FEATURE_LENGTHS must be a dict, got {feature_lengths!r}; e.g. "
                     "{'inputs': 512, 'targets': 8}.")
  for key in ("inputs", "targets"):
    if not isinstance(feature_lengths.get(key), int) or feature_lengths[key] <= 0:
      raise ValueError(f"TASK_FEATURE_LENGTHS must give a positive int for {key!r}, got "
                       f"{dict(feature_lengths)}; e.g. {{'inputs': 512, 'targets': 8}}.")
  if max_encoder_length is not None and feature_lengths["inputs"] + prompt_length > max_encoder_length:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS['inputs']={feature_lengths['inputs']} plus PROMPT_LENGTH={prompt_length} "
        f"is {feature_lengths['inputs'] + prompt_length}, more than max_encoder_length="
        f"{max_encoder_length}; shorten the inputs to {max_encoder_length - prompt_length} or less.")


def check_class_labels(class_labels: Sequence[str], targets_length: int,
                       vocabulary: seqio.Vocabulary) -> None:
  """Each class label must tokenise to something, and fit TASK_FEATURE_LENGTHS['targets'] with EOS
  (a label cut short can never be predicted)."""
  lengths = {}
  for label in class_labels:
    lengths[label] = len(vocabulary.encode(label))
    if not lengths[label]:
      raise ValueError(f"CLASS_LABELS: the label {label!r} tokenises to nothing; give the task's "
                       "label words, e.g. ['entailment', 'not_entailment'].")
  longest = max(lengths, key=lengths.get, default=None)
  if longest is not None and lengths[longest] + 1 > targets_length:
    raise ValueError(f"TASK_FEATURE_LENGTHS['targets']={targets_length} is shorter than the label "
                     f"{longest!r}: {lengths[longest]} tokens plus EOS; use 'targets': "
                     f"{lengths[longest] + 1} or more.")


def build_prompt_init(factory: Callable[..., prompts.Initializer], embedding: np.ndarray,
                      vocabulary: seqio.Vocabulary) -> prompts.Initializer:
  """Calls an initialiser factory, handing it the frozen embedding `[vocab, embed]` and the task's
  vocabulary where it takes them (`from_class_labels`, `from_sampled_vocab`, `from_string`),
  nothing otherwise."""
  accepted = inspect.signature(factory).parameters
  kwargs = {name: value for name, value in (("embedding", embedding), ("vocabulary", vocabulary))
            if name in accepted}
  return factory(**kwargs)


def resolve_execution(execution: ExecutionConfig, model_config: T5Config,
                      mesh: Optional[jax.sharding.Mesh] = None) -> ExecutionConfig:
  """`execution` for the mesh's devices (the default device without a mesh), `"auto"` resolved."""
  platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
  resolved = execution.for_platform(platform, model_config)
  logger.debug("Attention: %r on %s.", resolved.attention, platform)
  return resolved
