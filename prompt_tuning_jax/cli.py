"""The command line: T5X's flags, gin search paths, configurables, required macros, multi-host.

The library is gin-free; this module, the top of the import graph, registers its plain functions
and classes with `gin.external_configurable` under short names (`train`, `evaluate`, `infer`,
`evaluate_ensemble`, `t5_config`, `causal_lm_config`, `DatasetConfig`, `EvalConfig`,
`CheckpointConfig`, `ExecutionConfig`, `LossConfig`, `DecodingConfig`, `t5_vocabulary`,
`prompt_initializers.from_class_labels`, `optimizers.prompt_tuning_adafactor`, ...), and `run`,
which the tools' `main` call (`train.py`, `eval.py`, `infer.py`, `ensemble.py`), turns a T5X-style
command line

  --gin_file=models/t5_1_1_lm100k_base_prompt.gin --gin_file=runs/prompt_finetune.gin \\
  --gin.MODEL_DIR="'/tmp/run'" --gin_search_paths=/my/configs

into a call of one of them. Gin files are found in the working directory, then in
`--gin_search_paths`, then in the package's own `gin_configs/`. T5X's and the official
prompt-tuning code's gin paths, macros and flags are read as ours or answered in one line
(`migration`), and one of T5X's macros that nothing reads is named in a warning. Bad input
(and a failure such as a full disk or a NaN loss) ends the program with one line, `error: ...`, and
exit status 2; every error ends the process at once (`command`, which wraps each tool's `main`).
"""
import argparse
import copy
import functools
import inspect
import io
import logging
import os
import re
import sys
import tokenize
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

import gin
import jax
import seqio
import tensorflow as tf

import prompt_tuning_jax
from prompt_tuning_jax import checkpoints
from prompt_tuning_jax import config
from prompt_tuning_jax import ensembling
from prompt_tuning_jax import evaluation
from prompt_tuning_jax import hf_causal_lm
from prompt_tuning_jax import inference
from prompt_tuning_jax import methods
from prompt_tuning_jax import migration
from prompt_tuning_jax import optimizers
from prompt_tuning_jax import prompt_initializers
from prompt_tuning_jax import prompt_library
from prompt_tuning_jax import tasks
from prompt_tuning_jax import trainer
from prompt_tuning_jax import training
from prompt_tuning_jax import vocabularies
from prompt_tuning_jax import xla_cpu

PACKAGE_GIN_DIR = os.path.join(os.path.dirname(prompt_tuning_jax.__file__), "gin_configs")
TASK_MODULE_MACRO = "MIXTURE_OR_TASK_MODULE"
TASK_NAME_MACRO = "MIXTURE_OR_TASK_NAME"
CLASS_LABELS_MACRO = "CLASS_LABELS"
# Errors that mean bad input, or a failure the user must act on (a full disk, a NaN loss), rather
# than a bug (`CheckpointError`, `DataNotFoundError`, `training.NonFiniteError`,
# `run_lock.RunLockedError` among them): reported in one line, exit status 2. TensorFlow's errors
# that reach the command line come from reading data.
USER_ERRORS = (ValueError, OSError, ImportError, tf.errors.OpError)
USAGE_EXIT_CODE = 2

ENTRY_POINTS = {
    "train": gin.external_configurable(training.train, "train"),
    "evaluate": gin.external_configurable(inference.evaluate_prompt, "evaluate"),
    "infer": gin.external_configurable(inference.infer, "infer"),
    "evaluate_ensemble": gin.external_configurable(ensembling.evaluate_ensemble,
                                                   "evaluate_ensemble"),
}
gin.external_configurable(config.t5_config, "t5_config")
gin.external_configurable(hf_causal_lm.causal_lm_config, "causal_lm_config")
gin.external_configurable(config.ExecutionConfig, "ExecutionConfig")
gin.external_configurable(training.DatasetConfig, "DatasetConfig")
gin.external_configurable(training.EvalConfig, "EvalConfig")
gin.external_configurable(training.CheckpointConfig, "CheckpointConfig")
gin.external_configurable(trainer.LossConfig, "LossConfig")
gin.external_configurable(evaluation.DecodingConfig, "DecodingConfig")
gin.external_configurable(vocabularies.t5_vocabulary, "t5_vocabulary")
gin.external_configurable(vocabularies.byt5_vocabulary, "byt5_vocabulary")
gin.external_configurable(optimizers.prompt_tuning_adafactor, module="optimizers")
# Each method's factory as gin calls it (its `methods.NAME.*` bindings applied).
METHOD_CONFIGURABLES = {name: gin.external_configurable(factory, module="methods")
                        for name, factory in methods.METHODS.items()}
for _name in ("random_uniform", "from_sampled_vocab", "from_class_labels", "from_string",
              "from_npy"):
  gin.external_configurable(getattr(prompt_initializers, _name), module="prompt_initializers")
gin.external_configurable(prompt_library.from_library, module="prompt_initializers")

# Gin keeps its search paths for the life of the process; each is added once.
_ADDED_SEARCH_PATHS: set[str] = set()
_MACRO_REFERENCE = re.compile(r"%([A-Za-z_]\w*)(?![\w.])")
_GIN_CALL_NOTE = re.compile(r"\s*In call to configurable .*", re.DOTALL)
_TF_FUNCTION_NAME = re.compile(r"^\{\{function_node [^}]*\}\}\s*")


class UsageError(ValueError):
  """The command line or the gin config is incomplete or wrong."""


def tell(kind: str, message: str) -> None:
  """One line on stderr, `note: ...` or `warning: ...`, about how the command line was read."""
  print(f"{kind}: {message}", file=sys.stderr)


class _QuietGinSearch(logging.Filter):
  """Drops gin's log line for each search path that lacks a file (the next one may have it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Path not found: ")


def parse_args(argv: Sequence[str], description: str) -> argparse.Namespace:
  """T5X's flags: `--gin_file` (repeatable), `--gin_search_paths`, `--gin.NAME=VALUE`."""
  parser = argparse.ArgumentParser(
      description=description, allow_abbrev=False,
      epilog="Bind gin macros and parameters with --gin.NAME=VALUE, VALUE in gin syntax, e.g. "
             "--gin.MODEL_DIR=\"'/tmp/run'\" --gin.TRAIN_STEPS=1000.")
  parser.add_argument("--gin_file", action="append", default=[], dest="gin_files",
                      help="a gin file; repeat it, later files override earlier ones")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="comma-separated directories to find gin files (and their includes) in")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a gin binding, e.g. \"MODEL_DIR = '/tmp/run'\"")
  args, rest = parser.parse_known_args(argv)
  for arg in rest:
    name, equals, value = arg.partition("=")
    t5x_flag = migration.flag_error(arg)
    if t5x_flag:
      parser.exit(USAGE_EXIT_CODE, f"error: {t5x_flag}\n")
    if not name.startswith("--gin.") or not equals:
      parser.error(f"unrecognized argument {arg!r}; gin bindings look like --gin.NAME=VALUE")
    args.gin_bindings.append(f"{name[len('--gin.'):]} = {value}")
  args.gin_search_paths = [path for paths in args.gin_search_paths
                           for path in paths.split(",") if path]
  return args


def maybe_initialize_distributed() -> None:
  """Starts JAX's multi-host runtime when the environment describes several processes.

  On a TPU pod slice, under Slurm or Open MPI, JAX finds the processes itself. Elsewhere (GPU or CPU
  hosts of your own) every process sets JAX_COORDINATOR_ADDRESS (process 0's `host:port`),
  JAX_NUM_PROCESSES and its own JAX_PROCESS_ID.
  """
  env = os.environ
  multi_process = (
      bool(env.get("JAX_COORDINATOR_ADDRESS"))
      or int(env.get("SLURM_NTASKS", "1")) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
      or "," in env.get("TPU_WORKER_HOSTNAMES", "")
      or "," in env.get("MEGASCALE_COORDINATOR_ADDRESS", ""))
  if not multi_process or jax.distributed.is_initialized():
    return
  given = {name: env.get(name, "") for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  if not any(given.values()):
    jax.distributed.initialize()
    return
  try:
    num_processes, process_id = (int(value) for value in given.values())
  except ValueError:
    num_processes = process_id = -1
  if not 0 <= process_id < num_processes:
    raise ValueError(
        f"JAX_NUM_PROCESSES={given['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
        f"{given['JAX_PROCESS_ID']!r}: set both, to the number of processes and this process's "
        "index from 0, and JAX_COORDINATOR_ADDRESS to process 0's host:port.")
  jax.distributed.initialize(num_processes=num_processes, process_id=process_id)


def search_paths(user_paths: Sequence[str]) -> list[str]:
  """Where gin files are looked for, in order: the working directory, the user's, the package's."""
  return ["", *user_paths, PACKAGE_GIN_DIR]


def _find_gin_file(name: str, paths: Sequence[str]) -> Optional[str]:
  for prefix in ([""] if os.path.isabs(name) else paths):
    path = os.path.join(prefix, name)
    if os.path.isfile(path):
      return path
  return None


def _parsed_files(parsed) -> list[str]:
  """Every gin file parsed, includes first, as gin named them."""
  names = []
  for result in parsed:
    names += _parsed_files(result.includes)
    names.append(result.filename)
  return names


def _without_comments(text: str) -> str:
  return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _macro_is_bound(name: str) -> bool:
  try:
    value = gin.query_parameter(f"%{name}")
  except ValueError:
    return False
  return repr(value) != "%gin.REQUIRED"


def check_macros(files: Sequence[str], bindings: Sequence[str],
                 paths: Sequence[str]) -> dict[str, list[str]]:
  """Raises a `UsageError` naming each macro that is used (`%NAME`) but not set, and its users;
  returns `{macro: its users}`."""
  users: dict[str, list[str]] = {}
  sources = [(name, _find_gin_file(name, paths)) for name in files]
  for name, path in sources:
    if path is not None:
      with open(path) as f:
        text = _without_comments(f.read())
      for macro in _MACRO_REFERENCE.findall(text):
        users.setdefault(macro, []).append(name)
  for binding in bindings:
    for macro in _MACRO_REFERENCE.findall(binding):
      users.setdefault(macro, []).append("the command line")
  missing = [macro for macro in users if not _macro_is_bound(macro)]
  if missing:
    raise UsageError("; ".join(
        f"{macro} is not set, but {', '.join(dict.fromkeys(users[macro]))} needs it: add "
        f"--gin.{macro}=VALUE or a gin file that sets it" for macro in missing))
  return users


def warn_unread_macros(bindings: Sequence[str], used: Sequence[str], entry: str) -> None:
  """Warns of each of T5X's macros that a binding sets but no gin file or binding uses (`used`),
  saying what to do instead."""
  for binding in bindings:
    name = binding.partition("=")[0].strip()
    if name in migration.T5X_MACROS and name not in used:
      tell("warning", migration.unread_macro_warning(name, entry))


def _resolved_gin_file(name: str, paths: Sequence[str], ours: Sequence[str]) -> str:
  """`name` where a search path has it, else its equivalent among `ours` (`migration.gin_file`,
  which raises a `FileNotFoundError` naming the closest of ours); a file written for T5X's
  `dynamic_registration` is refused in one line."""
  path = _find_gin_file(name, paths)
  if path is None:
    equivalent, note = migration.gin_file(name, ours)
    tell("note", note)
    return equivalent
  with open(path) as f:
    error = migration.dynamic_registration_error(name, f.read(), ours)
  if error:
    raise UsageError(error)
  return name


def check_entry_arguments(entry: str) -> None:
  """Raises a `UsageError` naming each required argument of `entry` that gin does not bind."""
  signature = inspect.signature(ENTRY_POINTS[entry])
  missing = []
  for name, parameter in signature.parameters.items():
    if parameter.default is parameter.empty:
      try:
        gin.query_parameter(f"{entry}.{name}")
      except ValueError:
        missing.append(f"{entry}.{name}")
  if missing:
    raise UsageError(f"{', '.join(missing)} not bound: include the gin files that bind them (a "
                     "models/*.gin file and a runs/*.gin file) or bind them with --gin.NAME=VALUE")


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              user_search_paths: Sequence[str] = ()) -> list[str]:
  """Parses the gin files in order (official paths read as ours), then the bindings; checks that
  every used macro is set. Returns the macros the files and bindings use."""
  gin.clear_config()
  paths = search_paths(user_search_paths)
  for path in paths[1:]:
    if path not in _ADDED_SEARCH_PATHS:
      gin.add_config_file_search_path(path)
      _ADDED_SEARCH_PATHS.add(path)
  ours = migration.package_gin_files(PACKAGE_GIN_DIR)
  gin_files = [_resolved_gin_file(name, paths, ours) for name in gin_files]
  quiet = _QuietGinSearch()
  logging.getLogger().addFilter(quiet)
  try:
    parsed = gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=False)
  except (SyntaxError, tokenize.TokenError) as e:
    raise UsageError(_gin_syntax_error(e, gin_files, gin_bindings, paths)) from None
  finally:
    logging.getLogger().removeFilter(quiet)
  used = list(check_macros(_parsed_files(parsed), gin_bindings, paths))
  gin.finalize()
  return used


def _gin_syntax_error(error: Exception, gin_files: Sequence[str], gin_bindings: Sequence[str],
                      paths: Sequence[str]) -> str:
  """Gin's syntax error in one line: the file and line, or the binding, the column, what is wrong.

  Gin parses the bindings as one text, a line each, and reports an unclosed bracket or quote
  (`tokenize.TokenError`) without saying where: each file and binding is tokenized again to find it.
  """
  if isinstance(error, SyntaxError):
    where = (f"{error.filename}, line {error.lineno}" if error.filename
             else _binding_at(gin_bindings, error.lineno))
    return (f"Gin syntax error in {where}, column {(error.offset or 0) + 1}: {error.msg} Fix the "
            "gin syntax there.")
  texts = []
  for name in gin_files:
    path = _find_gin_file(name, paths)
    if path is not None:
      with open(path) as f:
        texts.append((name, f.read()))
  texts += [(f"the binding {binding!r}", binding) for binding in gin_bindings]
  where = next((name for name, text in texts if not _tokenizes(text)), "a gin file or binding")
  return f"Gin syntax error in {where}: a bracket or quote is not closed. Fix the gin syntax there."


def _binding_at(gin_bindings: Sequence[str], line: int) -> str:
  """`the binding 'NAME = VALUE'` on `line` (from 1) of the bindings gin parsed as one text."""
  for binding in gin_bindings:
    if line <= binding.count("\n") + 1:
      return f"the binding {binding!r}"
    line -= binding.count("\n") + 1
  return "the bindings"


def _tokenizes(text: str) -> bool:
  try:
    list(tokenize.generate_tokens(io.StringIO(text).readline))
  except tokenize.TokenError:
    return False
  return True


def import_task_modules() -> None:
  """Registers our tasks, and the user's from the MIXTURE_OR_TASK_MODULE macro."""
  try:
    module = gin.query_parameter(f"%{TASK_MODULE_MACRO}")
  except ValueError:
    module = None
  if module:
    tasks.import_task_module(module)


def check_task_name() -> None:
  """Raises a `UsageError` naming the closest registered tasks when MIXTURE_OR_TASK_NAME is not
  one."""
  if not _macro_is_bound(TASK_NAME_MACRO):
    return
  name = gin.query_parameter(f"%{TASK_NAME_MACRO}")
  registered = {*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()}
  if isinstance(name, str) and name not in registered:
    suggestion = migration.did_you_mean(name, registered) or "."
    raise UsageError(
        f"MIXTURE_OR_TASK_NAME {name!r} is not registered{suggestion} Import the module that "
        "registers it with --gin.MIXTURE_OR_TASK_MODULE=\"'my.tasks'\".")


def t5x_bindings(bindings: Sequence[str], entry: str) -> list[str]:
  """`bindings` with T5X's macros bound to our settings for `entry`, each noted on stderr."""
  translated, notes = migration.translate_bindings(bindings, entry)
  for note in notes:
    tell("note", note)
  return translated


def warn_t5x_train_steps() -> None:
  """Warns when TRAIN_STEPS looks counted T5X's way, with the checkpoint's pre-training steps."""
  if _macro_is_bound("TRAIN_STEPS"):
    checkpoint = (gin.query_parameter("%INITIAL_CHECKPOINT_PATH")
                  if _macro_is_bound("INITIAL_CHECKPOINT_PATH") else None)
    warning = migration.train_steps_warning(gin.query_parameter("%TRAIN_STEPS"), checkpoint)
    if warning:
      tell("warning", warning)


def one_line(error: BaseException) -> str:
  """The error's message without gin's call notes, on one line; of a TensorFlow error, its first
  line without TensorFlow's function name (the rest quotes the traceback of a function inside
  tf.data). An architecture mismatch keeps its few lines: what differs, then the fix."""
  if isinstance(error, checkpoints.ArchitectureMismatchError):
    return _GIN_CALL_NOTE.sub("", str(error)).strip()
  if isinstance(error, tf.errors.OpError):
    first = _TF_FUNCTION_NAME.sub("", (error.message.strip() or "?").splitlines()[0])
    return f"reading the data failed: {type(error).__name__}: {first}"
  message = _GIN_CALL_NOTE.sub("", str(error)) or type(error).__name__
  return " ".join(line.strip() for line in message.splitlines() if line.strip())


def usage_error(error: BaseException) -> SystemExit:
  """Prints `error: ...` (one line) to stderr; returns the SystemExit (status 2) to raise."""
  print(f"error: {one_line(error)}", file=sys.stderr)
  return SystemExit(USAGE_EXIT_CODE)


def command(main: Callable[[Optional[Sequence[str]]], Any]) -> Callable[..., Any]:
  """A tool's `main(argv=None)` with the command line's ending of every error.

  Bad input, and a failure the user must act on (`USER_ERRORS`), is one line, `error: ...`, and
  status 2. Called with `argv` (in process: tests, the demo), the wrapped `main` returns what `main`
  returns and raises what it raises, `SystemExit(2)` for those. As the process's own command line
  (`argv` None: `python -m ...`, the console scripts) it returns None, and any error ends the
  process at once (`_exit_at_once`), so that no tf.data iterator or orbax thread left behind can
  hold it.
  """
  @functools.wraps(main)
  def command_main(argv: Optional[Sequence[str]] = None) -> Any:
    try:
      try:
        result = main(argv)
      except USER_ERRORS as e:  # raised outside `run`, e.g. writing MODEL_DIR/config.gin
        raise usage_error(e) from None
    except BaseException as e:  # pylint: disable=broad-except (every way out of the process)
      if argv is not None:
        raise
      _exit_at_once(e)
    return result if argv is not None else None
  return command_main


def _exit_at_once(error: BaseException) -> NoReturn:
  """Ends the process with `error`'s exit status (a traceback first, for anything but SystemExit)
  after flushing stdout and stderr, skipping the interpreter's shutdown, which can wait forever on
  the threads of a tf.data iterator or orbax that the error left running."""
  if isinstance(error, SystemExit):
    code = error.code
    if not isinstance(code, int):
      if code is not None:
        print(code, file=sys.stderr)
      code = 0 if code is None else 1
  else:  # a bug, or Ctrl-C
    traceback.print_exception(error)
    code = 130 if isinstance(error, KeyboardInterrupt) else 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _class_labels(entry: str) -> dict[str, Any]:
  """`{'class_labels': CLASS_LABELS}` for `train` when the macro is set (to check them), else `{}`."""
  if entry != "train" or not _macro_is_bound(CLASS_LABELS_MACRO):
    return {}
  return {"class_labels": list(gin.query_parameter(f"%{CLASS_LABELS_MACRO}"))}


def run(entry: str, argv: Optional[Sequence[str]], description: str) -> Any:
  """Parses the command line and gin config, then calls the entry point (`train`, ...).

  First, before JAX starts a backend, has the CPU client run each step in the calling thread
  (`xla_cpu.run_steps_inline`), so a step's temporaries are freed before the next one allocates.

  Returns:
    What the entry point returns.

  Raises:
    SystemExit: with status 2 after printing `error: ...` when the input is bad.
  """
  xla_cpu.run_steps_inline()
  args = parse_args(sys.argv[1:] if argv is None else argv, description)
  logging.getLogger("prompt_tuning_jax").setLevel(logging.INFO)
  try:
    maybe_initialize_distributed()
    bindings = t5x_bindings(args.gin_bindings, entry)
    used = parse_gin(args.gin_files, bindings, args.gin_search_paths)
    warn_unread_macros(bindings, used, entry)
    import_task_modules()
    check_task_name()
    check_entry_arguments(entry)
    if entry == "train":
      warn_t5x_train_steps()
    return ENTRY_POINTS[entry](**_class_labels(entry))
  except USER_ERRORS as e:
    raise usage_error(e) from None


def write_config(directory: str) -> None:
  """Writes the operative gin config to `directory/config.gin` (process 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.gin"), "w") as f:
      f.write(gin.operative_config_str())


def model_settings(gin_files: Sequence[str], gin_bindings: Sequence[str],
                   user_search_paths: Sequence[str] = ()) -> dict[str, Any]:
  """MODEL_CONFIG and PROMPT_LENGTH of a model's gin files alone (`models/*_prompt.gin`, no run
  file), and every method as those files and bindings configure it (`{name: methods.Method}`)."""
  parse_gin(gin_files, gin_bindings, user_search_paths)
  settings = {}
  for macro in ("MODEL_CONFIG", "PROMPT_LENGTH"):
    try:
      settings[macro] = copy.deepcopy(gin.query_parameter(f"{macro}/macro.value"))
    except ValueError:
      raise UsageError(f"The gin files {list(gin_files)} do not set {macro}: give a model's file, "
                       "e.g. --gin_file=models/t5_1_1_xxl_prompt.gin.") from None
  settings["methods"] = {name: configurable() for name, configurable in METHOD_CONFIGURABLES.items()}
  return settings


def train_settings(gin_files: Sequence[str], gin_bindings: Sequence[str],
                   user_search_paths: Sequence[str] = ()) -> dict[str, Any]:
  """The keyword arguments the train entry point would be called with, without calling it.

  Parses the gin config as `run("train", ...)` does; each bound `train.*` parameter is evaluated (its
  `@configurable()` references called, its `%MACRO`s resolved), and unbound ones take `train`'s
  defaults.
  """
  parse_gin(gin_files, t5x_bindings(gin_bindings, "train"), user_search_paths)
  import_task_modules()
  check_entry_arguments("train")
  settings = {}
  for name, parameter in inspect.signature(training.train).parameters.items():
    try:
      # Gin's references evaluate themselves when deep-copied, as gin does when it calls `train`.
      settings[name] = copy.deepcopy(gin.query_parameter(f"train.{name}"))
    except ValueError:
      settings[name] = parameter.default
  return settings
