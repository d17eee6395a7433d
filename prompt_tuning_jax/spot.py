"""SPoT's prompt transfer on the command line: rank a prompt library for a target task, add prompts
to a library, and the whole recipe (a brief run on the target, retrieval, a warm-started run).

  python -m prompt_tuning_jax.spot retrieve --library DIR --target PROMPT [--json]
      [--measure average|per_token] [--top_k K]
  python -m prompt_tuning_jax.spot list --library DIR [--json]
  python -m prompt_tuning_jax.spot add --library DIR --name NAME --prompt PROMPT [--task TASK]
      [--model t5_1_1_lm100k_base]
  python -m prompt_tuning_jax.spot transfer --library DIR --model_dir DIR [--probe_steps N]
      [--top_k K] [--measure M] --gin_file=... --gin.NAME=VALUE ...

PROMPT is a `.npy` file, a numpy checkpoint directory, a run's MODEL_DIR, a PEFT prompt-tuning
adapter or a library entry (`prompt_library.read_prompt`). `retrieve` prints the library's prompts
by SPoT's task-embedding similarity to the target, best first (`--json`: a list of `{"name",
"score"}`). `add` puts a prompt in the library (`--model` names the preset a released prompt was
trained on, which checks its width). `transfer` trains the target task for `--probe_steps` in
`MODEL_DIR/spot/probe` with the gin files and bindings given, ranks the library against that prompt,
writes the warm start (the best source, or the weighted average of the top k) to
`MODEL_DIR/spot/init.npy` with the ranking in `MODEL_DIR/spot/retrieval.json`, and trains MODEL_DIR
from it with the same gin files; run again, it resumes from the same warm start. Bad input is one
line, `error: ...`, and exit status 2.
"""
import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from prompt_tuning_jax import config
from prompt_tuning_jax import console
from prompt_tuning_jax import prompt_library

SPOT_DIR = "spot"
PROBE_DIR = "probe"
INIT_FILE = "init.npy"
RETRIEVAL_FILE = "retrieval.json"
DEFAULT_PROBE_STEPS = 100


def retrieve(library: str, target: str, measure: str = "average",
             top_k: Optional[int] = None) -> list[dict[str, Any]]:
  """`[{"name", "score"}]` of the library's prompts by similarity to the prompt at `target`, best
  first; the first `top_k` of them if given."""
  prompt, entry = prompt_library.read_prompt(target)
  ranked = prompt_library.rank(library, prompt, entry, measure)
  return [{"name": source.name, "score": score} for source, score in ranked[:top_k]]


def transfer(library: str, model_dir: str, gin_args: Sequence[str],
             probe_steps: int = DEFAULT_PROBE_STEPS, top_k: int = 1,
             measure: str = "average") -> dict[str, Any]:
  """SPoT's recipe (module docstring): the brief target run, retrieval, the warm-started run of
  `gin_args` (`--gin_file=...`, `--gin.NAME=VALUE`, as `prompt_tuning_jax.train` takes them) in
  `model_dir`. Returns the warm-started run's summary, with `retrieval` (what `retrieval.json`
  holds) added."""
  from prompt_tuning_jax import cli  # pylint: disable=g-import-not-at-top (a tool imports it last)
  if any(arg.startswith("--gin.MODEL_DIR=") for arg in gin_args):
    raise ValueError("spot transfer: give the run's MODEL_DIR as --model_dir, not --gin.MODEL_DIR "
                     "(the brief target run goes in MODEL_DIR/spot/probe).")
  if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 1:
    raise ValueError(f"spot transfer: --probe_steps must be a positive integer, got {probe_steps!r}.")
  model_dir = os.path.abspath(model_dir)
  spot_dir = os.path.join(model_dir, SPOT_DIR)
  init_file = os.path.join(spot_dir, INIT_FILE)
  retrieval_file = os.path.join(spot_dir, RETRIEVAL_FILE)
  if not os.path.exists(init_file):  # else the run started from it already: it resumes
    prompt_library.entries(library)  # a missing library stops the recipe before the probe
    probe_dir = os.path.join(spot_dir, PROBE_DIR)
    cli.run("train", [*gin_args, f"--gin.MODEL_DIR={probe_dir!r}",
                      f"--gin.TRAIN_STEPS={probe_steps}", "--gin.EVAL_PERIOD=0",
                      "--gin.train.publish_to=None"],
            "SPoT: a brief run on the target task.")
    prompt, sources = prompt_library.warm_start(library, probe_dir, top_k, measure)
    retrieval = {"library": os.path.abspath(library), "target": probe_dir, "measure": measure,
                 "top_k": top_k,
                 "ranking": retrieve(library, probe_dir, measure),
                 "warm_start": [{"name": source.name, "weight": weight}
                                for source, weight in sources]}
    _write_new(retrieval_file, lambda f: f.write(json.dumps(retrieval, indent=2).encode()))
    _write_new(init_file, lambda f: np.save(f, prompt, allow_pickle=False))
  with open(retrieval_file) as f:
    retrieval = json.load(f)
  summary = cli.run("train", [*gin_args, f"--gin.MODEL_DIR={model_dir!r}",
                              "--gin.PROMPT_INIT=@prompt_initializers.from_npy",
                              f"--gin.prompt_initializers.from_npy.path={init_file!r}"],
                    "SPoT: the target task from the retrieved prompt.")
  cli.write_config(summary["model_dir"])
  return {**summary, "retrieval": retrieval}


def _write_new(path: str, write) -> None:
  """Writes `path` through `write(binary file)` under a temporary name, then renames it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = f"{path}.tmp-{os.getpid()}"
  try:
    with open(temporary, "wb") as f:
      write(f)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def _model_config(name: str) -> config.T5Config:
  """The preset `VERSION_SIZE` (`t5_1_1_lm100k_base`) as a T5Config."""
  version, _, size = name.rpartition("_")
  return config.t5_config(version, size)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m prompt_tuning_jax.spot", allow_abbrev=False,
                                   description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  retrieve_parser = commands.add_parser(
      "retrieve", help="rank a library's prompts by SPoT's similarity to a target prompt")
  retrieve_parser.add_argument("--library", required=True, help="the prompt library's folder")
  retrieve_parser.add_argument("--target", required=True,
                               help="the target prompt: .npy, numpy checkpoint, MODEL_DIR, PEFT "
                                    "adapter or library entry")
  retrieve_parser.add_argument("--measure", choices=prompt_library.MEASURES, default="average")
  retrieve_parser.add_argument("--top_k", type=int, default=None, help="print the best K only")
  retrieve_parser.add_argument("--json", action="store_true",
                               help='print a JSON list of {"name", "score"}, best first')
  list_parser = commands.add_parser("list", help="list a library's prompts")
  list_parser.add_argument("--library", required=True)
  list_parser.add_argument("--json", action="store_true", help="print a JSON list of the entries")
  add_parser = commands.add_parser("add", help="add a prompt to a library")
  add_parser.add_argument("--library", required=True)
  add_parser.add_argument("--name", required=True, help="the entry's name")
  add_parser.add_argument("--prompt", required=True,
                          help=".npy, numpy checkpoint, MODEL_DIR, PEFT adapter or library entry")
  add_parser.add_argument("--task", default=None, help="the task it was trained on")
  add_parser.add_argument("--model", default=None,
                          help="the preset it was trained on, VERSION_SIZE: t5_1_1_lm100k_base")
  transfer_parser = commands.add_parser(
      "transfer", help="SPoT's recipe: brief target run, retrieval, warm-started run; takes the "
                       "train command's --gin_file and --gin.NAME=VALUE flags too")
  transfer_parser.add_argument("--library", required=True)
  transfer_parser.add_argument("--model_dir", required=True, help="the warm-started run's MODEL_DIR")
  transfer_parser.add_argument("--probe_steps", type=int, default=DEFAULT_PROBE_STEPS,
                               help="steps of the brief run on the target task")
  transfer_parser.add_argument("--top_k", type=int, default=1,
                               help="start from the similarity-weighted average of the best K")
  transfer_parser.add_argument("--measure", choices=prompt_library.MEASURES, default="average")
  return parser


@console.command
def main(argv: Optional[Sequence[str]] = None) -> None:
  args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
  if rest and args.command != "transfer":
    raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
  if args.command == "retrieve":
    if args.top_k is not None and args.top_k < 1:
      raise ValueError(f"--top_k must be a positive integer, got {args.top_k}.")
    ranking = retrieve(args.library, args.target, args.measure, args.top_k)
    if args.json:
      print(json.dumps(ranking))
      return
    print(f"SPoT similarity ({args.measure}) of the prompts in {args.library} to {args.target}:")
    for position, row in enumerate(ranking, 1):
      print(f"{position:4d}  {row['score']:+.4f}  {row['name']}")
  elif args.command == "list":
    rows = [entry.to_json() for entry in prompt_library.entries(args.library)]
    if args.json:
      print(json.dumps(rows))
      return
    for row in rows:
      print(f"{row['name']}: task {row['task']}, [{row['prompt_length']}, {row['embed_dim']}], "
            f"steps {row['steps']}, metrics {row['metrics']}")
  elif args.command == "add":
    model_config = _model_config(args.model) if args.model else None
    prompt, entry = prompt_library.read_prompt(args.prompt, model_config)
    model = dict(entry.model)
    if args.model:
      model["name"] = args.model
    added = prompt_library.publish(args.library, args.name, prompt, task=args.task or entry.task,
                                   model=model, steps=entry.steps, metrics=entry.metrics,
                                   source=os.path.abspath(args.prompt))
    print(f"Added {args.prompt} to {args.library} as {added.name} "
          f"[{added.prompt_length}, {added.embed_dim}].")
  else:
    summary = transfer(args.library, args.model_dir, rest, args.probe_steps, args.top_k,
                       args.measure)
    sources = ", ".join(f"{row['name']} (weight {row['weight']:.3g})"
                        for row in summary["retrieval"]["warm_start"])
    print(f"Started from {sources}; trained to step {summary['final_step']}; MODEL_DIR: "
          f"{summary['model_dir']}")


if __name__ == "__main__":
  main()
