"""The methods a run can train on one frozen T5, each a config object after PEFT's tuners: what the
model gets (an input prompt, `adapters.Adapters` inside its layers), which parameters learn, and how
the learned ones fold into what a checkpoint of the plain method holds.

| name | what learns | folded after training |
| --- | --- | --- |
| `prompt_tuning` | the input prompt `[P, embed]` (the paper) | |
| `model_tuning` | every weight (the paper's baseline), or those `trainable_patterns` match | |
| `prefix_tuning` | key/value prefixes in every self-attention of the chosen stacks | the MLP, into prefixes |
| `per_layer_prompt` | a prompt at every encoder layer (deep prompts) | |
| `residual_prompt` | the input prompt and its residual MLP | the MLP, into the prompt |
| `multitask_prompt` | a shared prompt and one per task of a mixture | each task's whole prompt |
| `ia3` | rescaling vectors of key, value and the MLP's `wo` inputs | |
| `lora` | low-rank updates of the query and value kernels | |

`train(method=methods.lora(rank=4))` in Python, `include 'methods/lora.gin'` in a run's gin files.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning_jax import adapters, freezing, prompt_initializers, prompts, trees
from prompt_tuning_jax.adapters import Adapters
from prompt_tuning_jax.config import ExecutionConfig, T5Config
from prompt_tuning_jax.network import T5


@dataclasses.dataclass(frozen=True)
class Method:
  """One method's model additions and trainable parameters.

  `input_prompt`: whether the encoder gets the run's prompt (PROMPT_LENGTH, PROMPT_INIT);
  `residual_hidden`: its residual MLP's width (`prompts.PromptConfig.residual_hidden`);
  `multitask_combine`, `multitask_task_length`: a multi-task prompt's (`prompts.MultitaskPrompt`),
  whose `tasks`, (number of tasks, token of task 0), a run reads off its mixture (`for_tasks`);
  `trainable_patterns`: full-match regular expressions over `/`-joined parameter paths.
  """
  name: str
  trainable_patterns: tuple[str, ...]
  input_prompt: bool = True
  adapters: Adapters = Adapters()
  residual_hidden: Optional[int] = None
  multitask_combine: Optional[str] = None
  multitask_task_length: Optional[int] = None
  tasks: Optional[tuple[int, int]] = None

  def for_tasks(self, num_tasks: int, first_task_token: int) -> "Method":
    """This multi-task method for a mixture of `num_tasks` tasks whose inputs begin with
    `first_task_token - task index` (`tasks.common.task_indexed_mixture`)."""
    return dataclasses.replace(self, tasks=(num_tasks, first_task_token))

  def prompt_config(self, length: int, init: prompts.Initializer,
                    combine: str = "prefix") -> Optional[prompts.PromptConfig]:
    """The input prompt's config, or None for methods without one."""
    if not self.input_prompt:
      return None
    return prompts.PromptConfig(length, init, combine, residual_hidden=self.residual_hidden,
                                multitask=self.multitask())

  def multitask(self) -> Optional[prompts.MultitaskPrompt]:
    """The multi-task prompt's config, or None for other methods."""
    if self.multitask_combine is None:
      return None
    if self.tasks is None:
      raise ValueError("A multi-task prompt needs its mixture's tasks: Method.for_tasks.")
    return prompts.MultitaskPrompt(*self.tasks, self.multitask_combine, self.multitask_task_length)

  def description(self, prompt_length: int) -> str:
    """What trains, for a run's opening line: "a 100-token prompt", "LoRA of rank 8 on query,
    value", ..."""
    ad = self.adapters
    if self.name == "model_tuning":
      everything = self.trainable_patterns == (".*",)
      return "every weight (model tuning)" if everything else (
          f"the weights matching {', '.join(self.trainable_patterns)} (model tuning)")
    if ad.prefix is not None:
      return (f"{ad.prefix.length}-position key/value prefixes in the "
              f"{' and '.join(ad.prefix.stacks)} (prefix tuning)")
    if ad.lora is not None:
      return f"LoRA of rank {ad.lora.rank} on {', '.join(ad.lora.targets)}"
    if ad.ia3 is not None:
      return f"IA3 scales of {', '.join(ad.ia3.targets)}"
    if ad.layer_prompts is not None:
      return f"a {prompt_length}-token prompt at every encoder layer ({ad.layer_prompts.combine})"
    if self.residual_hidden is not None:
      return f"a {prompt_length}-token residual prompt (MLP width {self.residual_hidden})"
    if self.multitask_combine is not None:
      return (f"a {prompt_length}-token prompt shared by {self.tasks[0]} tasks and one per task "
              f"({self.multitask_combine})")
    return f"a {prompt_length}-token prompt"

  def fold(self, trainable: dict[str, Any], config: T5Config) -> dict[str, Any]:
    """`/`-joined trained parameters -> those of the method without its training-time
    reparameterisation (a plain prompt, plain prefixes); the same dict where there is none."""
    flat = dict(trainable)
    if self.residual_hidden is not None:
      prompt_tree, flat = _take_subtree(flat, "encoder/prompt/")
      flat[prompts.PROMPT_PATH] = np.asarray(prompts.fold_residual(prompt_tree, self.residual_hidden))
    prefix = self.adapters.prefix
    if prefix is not None and prefix.hidden is not None:
      for stack in prefix.stacks:
        params, flat = _take_subtree(flat, f"{stack}/prefix/")
        layers = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
        folded = adapters.fold_prefix(params, prefix, layers, config.num_heads, config.head_dim,
                                      config.emb_dim)
        flat.update({f"{stack}/prefix/{k}": np.asarray(v) for k, v in folded.items()})
    return flat

  def folded(self) -> "Method":
    """The method whose model reads `fold`'s output."""
    prefix = self.adapters.prefix
    if prefix is not None and prefix.hidden is not None:
      prefix = dataclasses.replace(prefix, hidden=None)
    return dataclasses.replace(self, residual_hidden=None,
                               adapters=dataclasses.replace(self.adapters, prefix=prefix))


def _take_subtree(flat: dict[str, Any], start: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the nested tree of the `/`-joined paths under `start`, the other paths)."""
  return (trees.unflatten({k[len(start):]: v for k, v in flat.items() if k.startswith(start)}),
          {k: v for k, v in flat.items() if not k.startswith(start)})


def prompt_tuning() -> Method:
  """The paper's method: the input prompt alone learns."""
  return Method("prompt_tuning", tuple(freezing.PROMPT_ONLY))


def model_tuning(trainable_patterns: tuple[str, ...] = (".*",)) -> Method:
  """Every weight learns (no prompt), or those `trainable_patterns` match: e.g.
  `(r"encoder/.*",)` tunes the encoder only."""
  return Method("model_tuning", tuple(trainable_patterns), input_prompt=False)


def prefix_tuning(length: int = 10, stacks: tuple[str, ...] = adapters.STACKS,
                  position_bias: str = "none", hidden: Optional[int] = None) -> Method:
  """Key/value prefixes (`adapters.Prefix`); PEFT's PREFIX_TUNING on T5 is
  `stacks=("decoder",), position_bias="before"`."""
  prefix = adapters.Prefix(length, tuple(stacks), position_bias, hidden)
  return Method("prefix_tuning", (r"(encoder|decoder)/prefix/.*",), input_prompt=False,
                adapters=Adapters(prefix=prefix))


def per_layer_prompt(combine: str = "replace") -> Method:
  """Deep prompts: the input prompt and one more at every later encoder layer
  (`adapters.LayerPrompts`)."""
  return Method("per_layer_prompt", (r"encoder/prompt/.*", r"encoder/layer_prompts/.*"),
                adapters=Adapters(layer_prompts=adapters.LayerPrompts(combine)))


def residual_prompt(hidden: int = 400) -> Method:
  """Residual prompt tuning: the input prompt through a residual MLP of width `hidden`."""
  return Method("residual_prompt", (r"encoder/prompt/.*",), residual_hidden=hidden)


def multitask_prompt(combine: str = "add", task_length: Optional[int] = None) -> Method:
  """A prompt shared by the tasks of the run's mixture and one per task (`prompts.MultitaskPrompt`);
  a run writes each task's whole prompt to `MODEL_DIR/task_prompts/TASK.npy` at the end, for the
  prompt bank (`serving.PromptServer`)."""
  if combine not in prompts.MULTITASK_COMBINATIONS:
    raise ValueError(f"methods.multitask_prompt.combine={combine!r}: use one of "
                     f"{prompts.MULTITASK_COMBINATIONS}.")
  return Method("multitask_prompt", (r"encoder/prompt/.*",), multitask_combine=combine,
                multitask_task_length=task_length)


def ia3(targets: tuple[str, ...] = ("key", "value", "wo"),
        feedforward: tuple[str, ...] = ("wo",)) -> Method:
  """IA3 (`adapters.IA3`; PEFT's defaults for T5)."""
  return Method("ia3", (r".*/ia3_scale",), input_prompt=False,
                adapters=Adapters(ia3=adapters.IA3(tuple(targets), tuple(feedforward))))


def lora(rank: int = 8, alpha: float = 8.0,
         targets: tuple[str, ...] = ("query", "value")) -> Method:
  """LoRA (`adapters.Lora`; PEFT's defaults for T5)."""
  return Method("lora", (r".*/lora_[ab]",), input_prompt=False,
                adapters=Adapters(lora=adapters.Lora(rank, alpha, tuple(targets))))


# Every method by its name, built with its defaults.
METHODS = {f.__name__: f for f in (prompt_tuning, model_tuning, prefix_tuning, per_layer_prompt,
                                   residual_prompt, multitask_prompt, ia3, lora)}


def build_model(method: Method, config: T5Config, prompt_config: Optional[prompts.PromptConfig],
                execution: ExecutionConfig = ExecutionConfig()) -> T5:
  """The `network.T5` that trains `method` (`prompt_config` from `Method.prompt_config`)."""
  return T5(config, prompt_config, execution, adapters=method.adapters)


def init_new_params(model: T5, known: set[str], rng: jax.Array) -> dict[str, np.ndarray]:
  """`model`'s `/`-joined parameters that are not among `known` (the frozen checkpoint's, the
  prompt), from their initialisers; XLA prunes the rest of the initialisation."""
  tokens = jnp.ones((1, 4), jnp.int32)

  def new_params(rng):
    params = trees.flatten(nn.meta.unbox(model.init(rng, tokens, tokens)["params"]))
    return {path: value for path, value in params.items() if path not in known}
  return {path: np.asarray(value) for path, value in jax.jit(new_params)(rng).items()}


def param_shapes(model: T5) -> dict[str, tuple[int, ...]]:
  """`model`'s `/`-joined parameter shapes, from abstract shapes: nothing is allocated."""
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens))["params"]
  return {path: tuple(leaf.shape) for path, leaf in trees.flatten(nn.meta.unbox(shapes)).items()}


def param_counts(config: T5Config, prompt_length: int,
                 methods: Optional[dict[str, Method]] = None, num_tasks: int = 2) -> dict[str, int]:
  """Each method's trainable parameter count on `config` with `prompt_length` prompts (the paper's
  Figure 4 x-axis), multi-task prompts for `num_tasks` tasks, from abstract shapes: nothing is
  allocated."""
  methods = methods or {name: factory() for name, factory in METHODS.items()}
  counts = {}
  for name, method in methods.items():
    if method.multitask_combine is not None and method.tasks is None:
      method = method.for_tasks(num_tasks, 0)
    shapes = param_shapes(build_model(method, config, method.prompt_config(
        prompt_length, prompt_initializers.random_uniform())))
    mask = trees.flatten(freezing.freeze_mask(trees.unflatten(shapes), method.trainable_patterns))
    counts[name] = sum(int(np.prod(shape)) for path, shape in shapes.items() if mask[path])
  return counts
