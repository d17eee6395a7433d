"""Serve jsonl requests for many tasks from one frozen model: `python -m prompt_tuning_jax.serve`.

  python -m prompt_tuning_jax.serve --checkpoint /ckpt/t5_1_1_lm100k_base/checkpoint_1100000 \\
    --prompt rte=rte.npy --prompt sst2=sst2.npy --requests in.jsonl --output out.jsonl \\
    --labels rte=entailment,not_entailment

Each request line is `{"task": ..., "inputs": ...}`; each output line adds `"prediction"` (greedy
decoding) and, for a task given `--labels`, `"scores"`: `{label: log-likelihood}`. Requests of all
tasks share batches (`serving.PromptServer`). Bad input ends with one line, `error: ...`, exit 2;
the output is written only once every request is answered, in strict JSON (a NaN score is an error).
"""
import argparse
import json
import sys
from typing import Optional, Sequence

from prompt_tuning_jax import (batching, checkpoints, config, prompt_initializers, prompts, serving,
                               trees, vocabularies)
from prompt_tuning_jax.tasks import readers

USAGE_EXIT_CODE = 2
VOCABULARIES = {"t5": vocabularies.t5_vocabulary, "byt5": vocabularies.byt5_vocabulary}


class _ArgumentParser(argparse.ArgumentParser):
  """Reports a bad command line as a ValueError, so that it ends in one line like other bad input."""

  def error(self, message):
    raise ValueError(message)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = _ArgumentParser(description="Serve jsonl requests for many tasks from one frozen model.",
                           allow_abbrev=False)
  parser.add_argument("--checkpoint", required=True, help="a T5X or Hugging Face T5 checkpoint")
  parser.add_argument("--prompt", action="append", required=True, metavar="TASK=FILE",
                      help="a task's prompt file (.npy [length, embed]); repeat for each task")
  parser.add_argument("--requests", required=True, help="jsonl: {\"task\": ..., \"inputs\": ...}")
  parser.add_argument("--output", required=True, help="where to write the jsonl predictions")
  parser.add_argument("--labels", action="append", default=[], metavar="TASK=A,B",
                      help="score these labels for the task's requests; repeatable")
  parser.add_argument("--vocabulary", choices=sorted(VOCABULARIES), default="t5")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--max_input_length", type=int, default=512)
  parser.add_argument("--max_decode_length", type=int, default=16)
  parser.add_argument("--length_buckets", default="", metavar="L1,L2,...",
                      help="input lengths to cut batches to, e.g. 64,128,256 (requests then go "
                      "sorted by length; one compile per bucket used)")
  parser.add_argument("--prompt_combine", choices=prompts.COMBINATIONS, default="prefix")
  parser.add_argument("--relative_attention_max_distance", type=int, default=None,
                      help="not stored in T5X checkpoints (default 128)")
  parser.add_argument("--attention_implementation", choices=config.ATTENTION_IMPLEMENTATIONS,
                      default="auto", help="the attention core; 'auto' picks for the devices")
  return parser.parse_args(argv)


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
  """`["TASK=VALUE", ...]` -> `{TASK: VALUE}`."""
  pairs = {}
  for value in values:
    task, equals, rest = value.partition("=")
    if not task or not equals or not rest:
      raise ValueError(f"{flag} {value!r}: expected TASK=VALUE.")
    if task in pairs:
      raise ValueError(f"{flag} names task {task!r} twice.")
    pairs[task] = rest
  return pairs


def _input_lengths(value: str, flag: str) -> list[int]:
  """`"64,128"` -> `[64, 128]`; `""` -> `[]`."""
  try:
    return [int(part) for part in value.split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"{flag} {value!r}: expected comma-separated input lengths, e.g. 64,128,256."
                     ) from None


def read_requests(path: str, tasks: Sequence[str]) -> list[serving.Request]:
  """The (task, inputs) of each jsonl line; a bad line (not UTF-8, not a JSON object, a lone
  surrogate, see `readers.numbered_jsonl`) or an unknown task is an error naming the line."""
  requests = []
  for number, row in readers.numbered_jsonl(path):
    if not isinstance(row.get("task"), str) or not isinstance(row.get("inputs"), str):
      raise ValueError(f"{path}:{number}: expected {{\"task\": str, \"inputs\": str}}.")
    if row["task"] not in tasks:
      raise ValueError(f"{path}:{number}: unknown task {row['task']!r}; prompts were given for "
                       f"{sorted(tasks)} (--prompt TASK=FILE).")
    requests.append((row["task"], row["inputs"]))
  return requests


def serve(args: argparse.Namespace) -> int:
  """Loads the model and prompts once, answers every request, writes the output; returns the count."""
  length_buckets = _input_lengths(args.length_buckets, "--length_buckets")
  batching.check_length_buckets(length_buckets, args.max_input_length, "--length_buckets",
                                "--max_input_length")  # before the checkpoint is read
  prompt_files = _pairs(args.prompt, "--prompt")
  labels = {task: words.split(",") for task, words in _pairs(args.labels, "--labels").items()}
  unknown = sorted(set(labels) - set(prompt_files))
  if unknown:
    raise ValueError(f"--labels for {unknown}, which have no --prompt.")
  prompt_arrays = {task: prompt_initializers.load_prompt_file(path)
                   for task, path in prompt_files.items()}
  requests = read_requests(args.requests, list(prompt_files))
  model_config, params = checkpoints.load_checkpoint(
      args.checkpoint, relative_attention_max_distance=args.relative_attention_max_distance)
  frozen = {k: v for k, v in trees.flatten(params).items() if k != checkpoints.PROMPT_PATH}
  server = serving.PromptServer(
      model_config, frozen, capacity=len(prompt_arrays),
      max_prompt_length=max(len(p) for p in prompt_arrays.values()),
      vocabulary=VOCABULARIES[args.vocabulary](), batch_size=args.batch_size,
      max_input_length=args.max_input_length, max_decode_length=args.max_decode_length,
      prompt_combine=args.prompt_combine,
      length_buckets=length_buckets,
      execution=config.ExecutionConfig(attention=args.attention_implementation))
  for task, prompt in prompt_arrays.items():
    server.add_prompt(task, prompt)

  rows = [{"task": task, "inputs": text, "prediction": prediction}
          for (task, text), prediction in zip(requests, server.predict(requests))]
  # Tasks with the same label set share scoring batches.
  by_label_set: dict[tuple[str, ...], list[int]] = {}
  for index, (task, _) in enumerate(requests):
    if task in labels:
      by_label_set.setdefault(tuple(labels[task]), []).append(index)
  for label_set, indices in by_label_set.items():
    scores = server.score([requests[i] for i in indices], label_set)
    for i, row_scores in zip(indices, scores):
      rows[i]["scores"] = dict(zip(label_set, map(float, row_scores)))
  lines = [_json_line(row, index) for index, row in enumerate(rows)]  # all, before the file
  with open(args.output, "w") as f:
    f.writelines(lines)
  return len(rows)


def _json_line(row: dict[str, object], index: int) -> str:
  """A row as a line of strict JSON: a NaN or Inf score is an error, never written."""
  try:
    return json.dumps(row, allow_nan=False) + "\n"
  except ValueError:
    raise ValueError(f"Request {index + 1} ({row['task']!r}) scored NaN or Inf: "
                     f"{row.get('scores')}; nothing was written. Check the task's prompt file and "
                     "the checkpoint.") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (0, or 2 with one `error:` line on bad input)."""
  try:
    args = parse_args(argv)
    count = serve(args)
  except (ValueError, OSError) as e:  # checkpoints.CheckpointError is a ValueError
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return USAGE_EXIT_CODE
  print(f"Wrote {count} predictions to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
