"""Where our train step's wall time goes, op by op, on XLA:CPU.

  PYTHONPATH=. python -m benchmarks.profile_step [--steps 3] [--top 20] [--output PATH]

Runs the fixed-shape step of `train_benchmark` (T5 1.1 Small shape, batch 32, 128 + 100 inputs, 8
targets) under the JAX profiler with XLA:CPU's per-thunk trace (`--xla_cpu_enable_xprof_traceme`), in a
child process started as the benchmark's are (the CPU opt-in environment) but with Eigen's dots (see
`run_child`), and reads the trace back against the compiled program's HLO:
  - each op's span runs from its start to its completion (an `end: <op>` event for ops that finish
    asynchronously, as Eigen's multi-threaded dots do);
  - the step's wall time is shared out among the ops active at each moment, by class: dots (one
    matrix product, which Eigen spreads over the cores), batched dots (many small products, each run
    on one thread), and elementwise fusions, copies and reductions;
  - how long one op, two or more, or none were active;
  - the float32 matmul peak (`common.jax_matmul_peak`), measured just before, to read them against;
  - the model's parts with the largest share (ops grouped by class and by the source op that XLA
    records, every layer's counterpart together), with their GFLOP over that share.
"""
import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Optional, Sequence

from benchmarks import common

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
DOT, BATCHED_DOT, OTHER = "dot", "batched dot", "fusion, copy, reduce"
# `  %name = shape opcode(operands), attributes`; a tuple shape is parenthesised and holds spaces.
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\((.*)$", re.M)


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
  """The entry computation's ops of a compiled module's text: name -> class, GFLOP (dots), source op."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  shapes, found = {}, []
  for name, shape, opcode, rest in _INSTRUCTION.findall(entry):
    shapes[name] = shape
    found.append((name, opcode, rest))
  dims = lambda shape: [int(d) for d in re.match(r"\w+\[([\d,]*)\]", shape).group(1).split(",") if d]
  ops = {}
  for name, opcode, rest in found:
    source = re.search(r'op_name="([^"]*)"', rest)
    op = dict(cls=OTHER, gflop=0.0, source=source.group(1) if source else "")
    if opcode == "dot":
      lhs = dims(shapes[re.match(r"%([\w.\-]+)", rest).group(1)])
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
      k = math.prod(lhs[int(i)] for i in contracting.split(",") if i)
      op.update(cls=BATCHED_DOT if "lhs_batch_dims" in rest else DOT,
                gflop=2 * math.prod(dims(shapes[name])) * k / 1e9)
    ops[name] = op
  return ops


def read_trace(trace_dir: str) -> list[dict[str, Any]]:
  """The complete ('X') events of the Perfetto trace the profiler wrote under `trace_dir`."""
  path, = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"]


def op_spans(events: list[dict[str, Any]], ops: dict[str, Any], start: float, stop: float
             ) -> list[tuple[float, float, str]]:
  """`(start_us, end_us, op)` of every op that started within `[start, stop]`: from its thunk's
  start to the later of its event's end and its completion (`end: op`)."""
  begun = collections.defaultdict(list)
  completed = collections.defaultdict(list)
  for e in events:
    name = e["name"]
    if name.startswith("end: ") and start <= e["ts"]:
      completed[name[5:]].append(e["ts"])
    elif name in ops and start <= e["ts"] <= stop:
      begun[name].append((e["ts"], e["ts"] + e["dur"]))
  spans = []
  for name, runs in begun.items():
    ends = sorted(completed[name])
    for run_start, run_end in sorted(runs):
      after = [t for t in ends if t >= run_start]
      spans.append((run_start, max(run_end, after[0] if after else run_end), name))
  return sorted(spans)


def attribute(spans: list[tuple[float, float, str]], ops: dict[str, Any], start: float, stop: float
              ) -> dict[str, Any]:
  """Shares the wall time `[start, stop]` among the ops active at each moment (equal parts)."""
  edges = sorted([(s, 1, n) for s, _, n in spans] + [(e, -1, n) for _, e, n in spans])
  active = collections.Counter()
  by_op, by_class, concurrency = collections.Counter(), collections.Counter(), collections.Counter()
  last = start
  for moment, change, name in edges + [(stop, 0, None)]:
    moment = min(max(moment, start), stop)
    running = [n for n, count in active.items() if count > 0]
    elapsed = (moment - last) / 1e3  # ms
    concurrency[min(len(running), 2)] += elapsed
    for n in running:
      by_op[n] += elapsed / len(running)
      by_class[ops[n]["cls"]] += elapsed / len(running)
    last = moment
    if name is not None:
      active[name] += change
  return dict(by_op=by_op, by_class=by_class, concurrency=concurrency)


def profile(steps: int, top: int) -> dict[str, Any]:
  """Profiles `steps` steps after two warm-up steps (runs in the child with XLA's trace flag)."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import train_benchmark  # pylint: disable=g-import-not-at-top
  step, state, frozen = train_benchmark.our_step({})
  batch = common.random_batch(train_benchmark.BATCH, train_benchmark.INPUTS, train_benchmark.TARGETS)
  compiled = step.lower(state, frozen, batch).compile()
  ops = hlo_ops(compiled.as_text())
  for _ in range(2):
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
  peak = common.jax_matmul_peak()["flops_per_s"] / 1e9
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for i in range(steps):
        with jax.profiler.TraceAnnotation(f"profiled step {i}"):
          state, metrics = compiled(state, frozen, batch)
          jax.block_until_ready(metrics)
    events = read_trace(trace_dir)
  results = []
  for marker in sorted((e for e in events if e["name"].startswith("profiled step")),
                       key=lambda e: e["ts"]):
    start, stop = marker["ts"], marker["ts"] + marker["dur"]
    spans = op_spans(events, ops, start, stop)
    shares = attribute(spans, ops, start, stop)
    results.append(dict(step_ms=marker["dur"] / 1e3, **shares))
  best = min(results, key=lambda r: r["step_ms"])
  groups = collections.defaultdict(lambda: dict(ops=0, wall_share_ms=0.0, gflop=0.0))
  for name, ms in best["by_op"].items():
    op = ops[name]
    group = groups[(op["cls"], re.sub(r"layers_\d+", "layers_*", op["source"]))]
    group["ops"] += 1
    group["wall_share_ms"] += ms
    group["gflop"] += op["gflop"]
  rows = [dict(cls=cls, source=source, ops=g["ops"], wall_share_ms=round(g["wall_share_ms"], 1),
               gflop=round(g["gflop"], 2))
          for (cls, source), g in sorted(groups.items(), key=lambda kv: -kv[1]["wall_share_ms"])[:top]]
  totals = collections.Counter()
  for name, op in ops.items():
    totals[op["cls"]] += op["gflop"]
  return dict(step_ms=[round(r["step_ms"], 1) for r in results], profiled_step_ms=best["step_ms"],
              matmul_peak_gflop_per_s=round(peak, 1),
              by_class_ms={k: round(v, 1) for k, v in best["by_class"].items()},
              gflop_by_class={k: round(v, 1) for k, v in totals.items() if v},
              concurrency_ms={("none", "one op", "two or more")[k]: round(v, 1)
                              for k, v in sorted(best["concurrency"].items())},
              top_groups=rows, load=common.load())


def table(result: dict[str, Any]) -> str:
  """The profile as text: classes, concurrency, then the model parts with the largest shares."""
  step = result["profiled_step_ms"]
  lines = [f"steps under the profiler (ms): {result['step_ms']}; the fastest, {step:.0f} ms, below",
           f"float32 matmul peak just before: {result['matmul_peak_gflop_per_s']:.0f} GFLOP/s",
           f"{'class':<22} {'wall ms':>8} {'share':>6} {'GFLOP':>7} {'GFLOP/s of wall':>16}"]
  for cls, ms in sorted(result["by_class_ms"].items(), key=lambda kv: -kv[1]):
    gflop = result["gflop_by_class"].get(cls)
    rate = f"{gflop / ms * 1e3:16.1f}" if gflop else f"{'':>16}"
    lines.append(f"{cls:<22} {ms:8.0f} {ms / step:6.0%} {gflop or '':>7} {rate}")
  lines.append("active ops: " + ", ".join(f"{k} {v:.0f} ms ({v / step:.0%})"
                                         for k, v in result["concurrency_ms"].items()))
  lines.append(f"{'share ms':>8} {'ops':>4} {'GFLOP':>6} {'GFLOP/s':>8}  {'class':<21} "
               "source (layers merged)")
  for row in result["top_groups"]:
    rate = f"{row['gflop'] / row['wall_share_ms'] * 1e3:8.1f}" if row["gflop"] else f"{'':>8}"
    gflop = f"{row['gflop']:6.1f}" if row["gflop"] else f"{'':>6}"
    lines.append(f"{row['wall_share_ms']:8.1f} {row['ops']:4d} {gflop} {rate}  {row['cls']:<21} "
                 f"{row['source'][-70:]}")
  return "\n".join(lines)


def run_child(steps: int, top: int) -> dict[str, Any]:
  """`profile` in a child process with the trace flag and the CPU opt-in environment."""
  from prompt_tuning_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  env = dict(xla_cpu.host_tool_environ() or os.environ)
  # With oneDNN's dots (`xla_cpu.dot_compiler_options`) the trace's spans came out too short (the dots
  # at 857 GFLOP/s of wall, twice the peak: nothing marks when their work ends), so the profile is of
  # the step with Eigen's dots (the flag in `XLA_FLAGS` keeps oneDNN out of the step's options).
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {TRACE_FLAG} {common.EIGEN_DOTS_FLAG}".strip()
  command = [sys.executable, "-m", "benchmarks.profile_step", "--child", "--steps", str(steps),
             "--top", str(top)]
  done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  if done.returncode:
    raise RuntimeError(f"the profiled child failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="profiled steps after 2 warm-up steps")
  parser.add_argument("--top", type=int, default=20, help="model parts listed")
  parser.add_argument("--output", default="benchmarks/results/profile.json")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    from prompt_tuning_jax import xla_cpu  # pylint: disable=g-import-not-at-top
    xla_cpu.run_steps_inline()  # as our tools run, and the other benchmarks' workers
    print(json.dumps(profile(args.steps, args.top)))
    return 0
  result = run_child(args.steps, args.top)
  print(table(result))
  common.write_json(args.output, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
