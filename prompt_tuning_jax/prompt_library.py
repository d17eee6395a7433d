"""A prompt library, and SPoT's retrieval from it: which trained prompt to start a new task from.

A library is a folder of trained prompts, one entry a folder:

  LIBRARY/NAME/prompt.npy    the prompt, float32 `[prompt_length, embed]`
  LIBRARY/NAME/entry.json    what it is (`Entry`): the task, the frozen model's architecture, the
                             prompt's shape, the steps trained, the last metrics, where it came from

`publish` writes an entry (atomically: built under a temporary name, then renamed into place; an
existing entry is never replaced), `entries` lists them, `load_prompt` reads one. `read_prompt` reads
a prompt from anything that holds one: a `.npy` file (a released prompt, one of our numpy prompt
files), a numpy checkpoint directory (`MODEL_DIR/numpy_checkpoints/checkpoint_N`, `MODEL_DIR/best`),
a run's MODEL_DIR (its latest numpy checkpoint), a PEFT prompt-tuning adapter or a library entry.
A training run publishes its final prompt with `--gin.train.publish_to=LIBRARY` (`publish_run`).

SPoT (Vu et al., 2022, "SPoT: Better Frozen Model Adaptation through Soft Prompt Transfer") reads a
prompt as an embedding of its task: a prompt trained briefly on a new (target) task is compared with
the library's (source) prompts, and the most similar source is the one to start the target from.
`similarity` has SPoT's two measures, for prompts `S` `[m, embed]` and `T` `[n, embed]`:

  average     cos(mean_i S_i, mean_j T_j): the cosine of the average prompt tokens;
  per_token   1/(m n) sum_i sum_j cos(S_i, T_j): the average cosine of every pair of tokens.

Both compare prompts of any lengths (SPoT's are all 100 long; the per-token mean runs over every
pair); prompts of another width or of another model's architecture are refused. `rank` orders a
library by similarity to a target; `from_library` is the prompt initialiser of SPoT's warm start:
the best-ranked source prompt, or SPoT's top-k weighted average, `sum_i w_i P_i` with
`w_i = score_i / sum_k score_k`.
"""
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Optional

import jax
import numpy as np

from prompt_tuning_jax import checkpoints
from prompt_tuning_jax import peft_interchange
from prompt_tuning_jax import prompt_initializers
from prompt_tuning_jax import run_checkpoints
from prompt_tuning_jax.config import T5Config

PROMPT_FILE = "prompt.npy"
ENTRY_FILE = "entry.json"
MEASURES = ("average", "per_token")
# What a prompt's entry records of its frozen model: the architecture a checkpoint's shapes give.
ARCHITECTURE_FIELDS = checkpoints.STORED_FIELDS
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_PROMPT_FILE_NAME = run_checkpoints.numpy_file_name(checkpoints.PROMPT_PATH)

logger = logging.getLogger("prompt_tuning_jax")


@dataclasses.dataclass(frozen=True)
class Entry:
  """What a library prompt is.

  `model` holds the frozen model's `ARCHITECTURE_FIELDS` where they are known (a released `.npy`
  prompt alone knows only its width), and may add `name` (e.g. `t5_1_1_lm100k_base`) and
  `checkpoint` (the INITIAL_CHECKPOINT_PATH it was trained on); only the architecture is compared.
  `metrics` are the last evaluation's (`{"task/metric": value}`); `source` is where the prompt was
  read or which run wrote it.
  """
  name: str
  prompt_length: int
  embed_dim: int
  task: Optional[str] = None
  model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  steps: Optional[int] = None
  metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
  source: Optional[str] = None

  def to_json(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


def model_identity(config: T5Config, name: Optional[str] = None,
                   checkpoint: Optional[str] = None) -> dict[str, Any]:
  """The `Entry.model` of prompts trained on a model of `config` (JSON values)."""
  identity = {field: getattr(config, field) for field in ARCHITECTURE_FIELDS}
  identity.update({key: value for key, value in (("name", name), ("checkpoint", checkpoint))
                   if value is not None})
  return json.loads(json.dumps(identity))


def check_library(library: str) -> None:
  """Raises a ValueError unless `library` names a local folder that exists or can be made, to
  publish into (`train.publish_to`)."""
  if not isinstance(library, str) or not library:
    raise ValueError(f"train.publish_to must be a prompt library's folder, got {library!r}.")
  if "://" in library:
    raise ValueError(f"train.publish_to={library!r}: a prompt library is a local folder; publish "
                     "to one here and copy it.")
  if os.path.exists(library) and not os.path.isdir(library):
    raise ValueError(f"train.publish_to={library!r} is a file, not a folder; name a prompt "
                     "library's folder (it is made if missing).")
  existing = library
  while not os.path.exists(existing):
    existing = os.path.dirname(os.path.abspath(existing))
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"train.publish_to={library!r}: {existing} is not writable; name a folder "
                     "you can write.")


def publish(library: str, name: str, prompt: np.ndarray, *, task: Optional[str] = None,
            model: Optional[Mapping[str, Any]] = None, steps: Optional[int] = None,
            metrics: Optional[Mapping[str, float]] = None, source: Optional[str] = None) -> Entry:
  """Writes `prompt` `[prompt_length, embed]` as the entry `library/name` and returns its `Entry`.

  The entry is written under a temporary name and renamed into place, so a reader sees all of it
  or none; `library` is made if missing.

  Raises:
    FileExistsError: the library has an entry `name` already (it is left as it is).
    ValueError: `name` is not a plain file name, or `prompt` is not a finite float 2-D array.
  """
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f"A library entry's name is a file name of letters, digits and _.+- (not "
                     f"starting with . + or -), got {name!r}.")
  prompt = _checked_prompt(prompt, f"the prompt of {name!r}")
  entry = Entry(name=name, prompt_length=prompt.shape[0], embed_dim=prompt.shape[1], task=task,
                model=dict(model or {}), steps=steps, metrics=dict(metrics or {}), source=source)
  final = os.path.join(library, name)
  taken = FileExistsError(f"The prompt library {library} has an entry {name!r} already; publish "
                          "under another name (entries are never replaced).")
  if os.path.lexists(final):
    raise taken
  os.makedirs(library, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=library)
  try:
    with open(os.path.join(staging, PROMPT_FILE), "wb") as f:
      np.save(f, prompt, allow_pickle=False)
    with open(os.path.join(staging, ENTRY_FILE), "w") as f:
      json.dump(entry.to_json(), f, indent=2)
    os.chmod(staging, 0o755)  # mkdtemp's 0o700 would hide the entry from other users
    try:
      os.rename(staging, final)  # fails if an entry of that name was published meanwhile
    except OSError as e:
      if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
        raise taken from None
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return entry


def publish_run(library: str, summary: Mapping[str, Any], task: str, model_config: T5Config,
                initial_checkpoint_path: Optional[str]) -> Optional[Entry]:
  """Publishes a finished training run's final prompt (`training.train`'s summary) in `library`.

  The entry is named for the task (`task`, else `task.2`, `task.3`, ...), and records the steps, the
  last evaluation's metrics and the run's MODEL_DIR. A run already published at this step with
  this prompt (a finished run started again) is not published twice. Only process 0 writes.

  Returns:
    The entry (None on other processes).
  """
  if jax.process_index() != 0:
    return None
  step, model_dir = int(summary["final_step"]), summary["model_dir"]
  if summary.get("prompt") is None:
    raise ValueError(f"train.publish_to: the run in {model_dir} trained no prompt "
                     f"({checkpoints.PROMPT_PATH}), so it has none to publish; leave publish_to "
                     "unset for it.")
  prompt = np.asarray(summary["prompt"], np.float32)
  existing = entries(library) if os.path.isdir(library) else []
  for entry in existing:
    if (entry.source == model_dir and entry.steps == step
        and np.array_equal(load_prompt(library, entry.name), prompt)):
      return entry
  names = {entry.name for entry in existing}
  name = next(candidate for candidate in (task, *(f"{task}.{n}" for n in range(2, len(names) + 3)))
              if candidate not in names and not os.path.lexists(os.path.join(library, candidate)))
  evaluations = summary.get("eval") or {}
  last = evaluations[max(evaluations)] if evaluations else {}
  metrics = {f"{task_name}/{metric}": float(value) for task_name, values in last.items()
             for metric, value in values.items() if np.ndim(value) == 0}
  entry = publish(library, name, prompt, task=task,
                  model=model_identity(model_config, checkpoint=initial_checkpoint_path),
                  steps=step, metrics=metrics, source=model_dir)
  logger.info("Published the prompt of step %d in the prompt library as %s.", step,
              os.path.join(library, name))
  return entry


def entries(library: str) -> list[Entry]:
  """The library's entries, by name.

  Raises:
    FileNotFoundError: no folder `library`.
    ValueError: an entry's `entry.json` is unreadable (the message names it).
  """
  if not os.path.isdir(library):
    raise FileNotFoundError(f"No prompt library at {library!r} (a folder of prompts, e.g. "
                            "published with --gin.train.publish_to).")
  return [read_entry(library, name) for name in sorted(os.listdir(library))
          if not name.startswith(".") and os.path.isdir(os.path.join(library, name))]


def read_entry(library: str, name: str) -> Entry:
  """The `Entry` of `library/name`."""
  filename = os.path.join(library, name, ENTRY_FILE)
  try:
    with open(filename) as f:
      fields = json.load(f)
    if not isinstance(fields, dict):
      raise ValueError(f"a JSON {type(fields).__name__}, not an object")
    entry = Entry(**fields)
  except FileNotFoundError:
    raise ValueError(f"{os.path.join(library, name)} is not a library entry (it has no "
                     f"{ENTRY_FILE}); move it out of the library.") from None
  except (ValueError, TypeError) as e:
    raise ValueError(f"{filename} is unreadable ({e}); restore it or move the entry out of the "
                     "library.") from None
  if entry.name != name:
    raise ValueError(f"{filename} names the entry {entry.name!r}, but its folder is {name!r}; "
                     "rename the folder back.")
  return entry


def load_prompt(library: str, name: str) -> np.ndarray:
  """The prompt `[prompt_length, embed]` of the entry `library/name`."""
  return prompt_initializers.load_prompt_file(os.path.join(library, name, PROMPT_FILE))


def read_prompt(path: str, model_config: Optional[T5Config] = None) -> tuple[np.ndarray, Entry]:
  """(the prompt `[length, embed]`, what is known of it) from anything that holds a prompt.

  `path` is a `.npy` file (a released prompt; one of our numpy prompt files), a numpy checkpoint
  directory (`numpy_checkpoints/checkpoint_N`, `best`), a run's MODEL_DIR (its latest numpy
  checkpoint), a PEFT prompt-tuning adapter or a library entry. The model is known from a run's
  `run_config.json`, an entry, or `model_config`, which a released prompt must fit
  (`peft_interchange.load_released_prompt`).

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: `path` holds no prompt, or one that does not fit `model_config`.
  """
  name = os.path.basename(os.path.normpath(path))
  if os.path.isfile(path):
    prompt = (prompt_initializers.load_prompt_file(path) if model_config is None
              else peft_interchange.load_released_prompt(path, model_config))
    run = _run_of_numpy_dir(os.path.dirname(path))
    return prompt, _described(prompt, os.path.splitext(name)[0], path, run, model_config)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No prompt at {path!r}: give a .npy file, a numpy checkpoint "
                            "directory, a MODEL_DIR, a PEFT adapter or a library entry.")
  if os.path.isfile(os.path.join(path, ENTRY_FILE)):
    library, entry_name = os.path.split(os.path.normpath(path))
    return load_prompt(library, entry_name), read_entry(library, entry_name)
  if os.path.isfile(os.path.join(path, peft_interchange.CONFIG_FILE)):
    prompt = peft_interchange.import_peft_adapter(path)
    with open(os.path.join(path, peft_interchange.CONFIG_FILE)) as f:
      base_model = json.load(f).get("base_model_name_or_path")
    entry = _described(prompt, name, path, None, model_config)
    return prompt, dataclasses.replace(entry, model={**entry.model, "name": base_model}
                                       if base_model else entry.model)
  if os.path.isfile(os.path.join(path, _PROMPT_FILE_NAME)):
    prompt = prompt_initializers.load_prompt_file(os.path.join(path, _PROMPT_FILE_NAME))
    return prompt, _described(prompt, name, path, _run_of_numpy_dir(path), model_config)
  numpy_dir = os.path.join(path, run_checkpoints.NUMPY_DIR)
  steps = sorted(int(step) for step in (entry.rpartition("_")[2] for entry in (
      os.listdir(numpy_dir) if os.path.isdir(numpy_dir) else ())
      if entry.startswith("checkpoint_")) if step.isdigit())
  if steps:
    return read_prompt(os.path.join(numpy_dir, f"checkpoint_{steps[-1]}"), model_config)
  raise ValueError(f"{path!r} holds no prompt: give a .npy file, a numpy checkpoint directory (with "
                   f"{_PROMPT_FILE_NAME}), a MODEL_DIR with {run_checkpoints.NUMPY_DIR}/, a PEFT "
                   f"adapter ({peft_interchange.CONFIG_FILE}) or a library entry ({ENTRY_FILE}).")


def similarity(source: np.ndarray, target: np.ndarray, measure: str = "average") -> float:
  """SPoT's task-embedding similarity of two prompts `[m, embed]` and `[n, embed]` (module
  docstring): `"average"` or `"per_token"`, in float64."""
  source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
  if measure == "average":
    return float(_cosines(source.mean(axis=0, keepdims=True),
                          target.mean(axis=0, keepdims=True))[0, 0])
  if measure == "per_token":
    return float(_cosines(source, target).mean())
  raise ValueError(f"Unknown similarity measure {measure!r}; use one of {MEASURES}.")


def rank(library: str, target: np.ndarray, target_entry: Optional[Entry] = None,
         measure: str = "average") -> list[tuple[Entry, float]]:
  """The library's entries with their similarity to `target` `[length, embed]`, best first (ties
  by name).

  Raises:
    ValueError: the library is empty, or holds a prompt of another width than the target's or of
      another architecture than `target_entry.model`'s (one line naming them).
  """
  if measure not in MEASURES:
    raise ValueError(f"Unknown similarity measure {measure!r}; use one of {MEASURES}.")
  target = _checked_prompt(target, "the target prompt")
  sources = entries(library)
  if not sources:
    raise ValueError(f"The prompt library {library} is empty; publish source prompts into it first "
                     "(--gin.train.publish_to).")
  target_model = dict(target_entry.model) if target_entry else {}
  for entry in sources:
    mismatch = _mismatch(entry, target.shape[1], target_model)
    if mismatch:
      raise ValueError(f"The library prompt {entry.name!r} is for another model than the target "
                       f"({mismatch}); compare prompts of one frozen model: keep a library per "
                       "model.")
  scored = [(entry, similarity(load_prompt(library, entry.name), target, measure))
            for entry in sources]
  return sorted(scored, key=lambda pair: (-pair[1], pair[0].name))


def warm_start(library: str, target: str, top_k: int = 1, measure: str = "average"
               ) -> tuple[np.ndarray, list[tuple[Entry, float]]]:
  """SPoT's warm start: (the prompt to start the target task from, `[(source entry, its weight)]`).

  The prompt is the library prompt most similar to the prompt at `target` (anything `read_prompt`
  reads: e.g. the MODEL_DIR of a brief run on the target task), or, with `top_k` > 1, the average of
  the `top_k` most similar weighted by their similarity, `w_i = score_i / sum_k score_k`. The
  sources averaged must have one length (a prompt is not cut or padded to fit).

  Raises:
    ValueError: `top_k` is not a positive integer; the top `top_k` differ in length, or (to average)
      a similarity is not positive; or `rank` refuses the library.
  """
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"The SPoT warm start's top_k must be a positive integer, got {top_k!r}.")
  prompt, entry = read_prompt(target)
  ranked = rank(library, prompt, entry, measure)[:top_k]
  lengths = [source.prompt_length for source, _ in ranked]
  if len(set(lengths)) > 1:
    raise ValueError(f"The top {top_k} library prompts have lengths {lengths}; an average needs one "
                     "length: use top_k=1, or a library of prompts of one length.")
  scores = np.array([score for _, score in ranked])
  if len(ranked) > 1 and np.any(scores <= 0):
    raise ValueError(f"The top {top_k} similarities {scores.tolist()} are not all positive, so they "
                     "cannot weigh an average; use top_k=1.")
  weights = scores / scores.sum()
  average = sum(weight * load_prompt(library, source.name).astype(np.float64)
                for weight, (source, _) in zip(weights, ranked))
  return (np.asarray(average, np.float32),
          [(source, float(weight)) for weight, (source, _) in zip(weights, ranked)])


def from_library(library: str, target: str, top_k: int = 1,
                 measure: str = "average") -> prompt_initializers.Initializer:
  """A prompt initialiser of SPoT's warm start (`warm_start`): the library prompt most similar to
  the prompt at `target`, or the similarity-weighted average of the `top_k` most similar. The run's
  PROMPT_LENGTH must be their length."""
  prompt, sources = warm_start(library, target, top_k, measure)
  names = ", ".join(f"{source.name} ({weight:.3g})" for source, weight in sources)
  return prompt_initializers.from_array(prompt, name=f"from_library({library!r}: {names})")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`[m, n]` cosines of the rows of `a` `[m, e]` and `b` `[n, e]`; a zero row's are 0."""
  a_norms, b_norms = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
  a_unit = a / np.where(a_norms == 0, 1, a_norms)[:, None]
  b_unit = b / np.where(b_norms == 0, 1, b_norms)[:, None]
  return a_unit @ b_unit.T


def _mismatch(entry: Entry, embed_dim: int, model: Mapping[str, Any]) -> Optional[str]:
  """What differs between `entry`'s model and a target's (width `embed_dim`, architecture
  `model`), or None."""
  if entry.embed_dim != embed_dim:
    return f"embed dim {entry.embed_dim}, the target's {embed_dim}"
  differing = [f"{field} {entry.model[field]!r}, the target's {model[field]!r}"
               for field in ARCHITECTURE_FIELDS
               if field in entry.model and field in model and entry.model[field] != model[field]]
  return ", ".join(differing) or None


def _checked_prompt(prompt: Any, what: str) -> np.ndarray:
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or not prompt.size or not np.issubdtype(prompt.dtype, np.floating):
    raise ValueError(f"{what} is a {prompt.dtype} array of shape {prompt.shape}; a prompt is a float "
                     "[prompt_length, embed_dim] array.")
  if not np.all(np.isfinite(prompt)):
    raise ValueError(f"{what} holds NaN or Inf values.")
  return np.asarray(prompt, np.float32)


def _run_of_numpy_dir(directory: str) -> Optional[str]:
  """The MODEL_DIR whose numpy checkpoint (`numpy_checkpoints/checkpoint_N`) or best prompt
  (`best`) `directory` is, or None."""
  directory = os.path.normpath(os.path.abspath(directory))
  parent, base = os.path.split(directory)
  if base == run_checkpoints.BEST_DIR:
    model_dir = parent
  elif os.path.basename(parent) == run_checkpoints.NUMPY_DIR:
    model_dir = os.path.dirname(parent)
  else:
    return None
  return model_dir if os.path.isfile(os.path.join(model_dir,
                                                  run_checkpoints.RUN_CONFIG_FILE)) else None


def _described(prompt: np.ndarray, name: str, path: str, model_dir: Optional[str],
               model_config: Optional[T5Config]) -> Entry:
  """The `Entry` of a prompt read from `path`: its run's task, model and step where it has a run
  (`model_dir`), else the model of `model_config` if given."""
  entry = Entry(name=name, prompt_length=prompt.shape[0], embed_dim=prompt.shape[1], source=path,
                model=model_identity(model_config) if model_config else {})
  if model_dir is None:
    return entry
  with open(os.path.join(model_dir, run_checkpoints.RUN_CONFIG_FILE)) as f:
    run = json.load(f)
  step = os.path.basename(os.path.normpath(path) if os.path.isdir(path) else os.path.dirname(path))
  model = {field: run["model_config"][field] for field in ARCHITECTURE_FIELDS
           if field in run.get("model_config", {})}
  if run.get("initial_checkpoint_path"):
    model["checkpoint"] = run["initial_checkpoint_path"]
  return dataclasses.replace(
      entry, task=run.get("mixture_or_task_name"), model=model,
      steps=int(step.rpartition("_")[2]) if step.rpartition("_")[2].isdigit() else None)
