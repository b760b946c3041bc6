"""How many cores XLA:CPU keeps busy in the train step, and what the XLA:CPU flags change.

    python -m benchmarks.cpu_threads [--variant=small] [--size=128] [--batch=8] \\
        [--steps=5] [--rounds=3] [--settings=default,one_core,...] [--trace]

Each setting runs the real train step (`train.make_train_step`, the
"after" form of `benchmarks.rewrites`, random weights, one synthetic batch)
in a fresh process, because XLA reads its flags and sizes its thread pool
once per process:

* default:          the machine's cores, no flags;
* one_core:         the same pinned to one core (`os.sched_setaffinity` before
                    JAX starts), for the parallel speed-up 2 cores give;
* concurrency:      `--xla_cpu_enable_concurrency_optimized_scheduler=true`
                    (schedules independent operations to overlap);
* no_eigen_threads: `--xla_cpu_multi_thread_eigen=false` (single-threaded
                    matmuls and convolutions: only operation-level parallelism);
* xnnpack:          `--xla_cpu_use_xnnpack=true` (XNNPACK kernels for dots and
                    convolutions where XLA:CPU supports them);
* onednn:           `--xla_cpu_use_onednn=true`;
* no_ynn:           `--xla_cpu_experimental_ynn_fusion_type=` (an empty list:
                    no convolution or dot is handed to YNNPACK, which
                    jaxlib 0.10.2 does by default for every convolution and
                    some dots);

or any `name=--xla_flag=value ...` given in `--settings`. Every round runs
each setting once (interleaved, so a change of load on a shared machine
hits all of them alike); the compiled step is kept in a persistent
compilation cache shared by the rounds (the key includes XLA_FLAGS), so
only the first round compiles.

Each run prints one JSON line: the median step seconds, `cores_used`
(process CPU seconds over wall seconds while stepping: 2.0 is both cores
busy all the time), the final loss (a flag that changes the numbers shows
here), and with `--trace` (in the last round, after the timing) a profile
of one step, compiled again with XLA:CPU's per-operation trace events
(`xla_cpu_enable_xprof_traceme`) and recorded by `jax.profiler`: the share
of the step during which 0, 1 or 2+ threads ran an XLA operation, and the
operations that ran while only one thread was busy, by total time. The
summary line gives each setting's median step time and its ratio to
"default".

Not a test: numbers depend on the machine and its load;
`tests/test_benchmarks.py` runs it once on the tiny model.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags
import jax

from benchmarks import common
from benchmarks import rewrites

SETTINGS = {
    "default": "",
    "one_core": "",
    "concurrency": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "no_eigen_threads": "--xla_cpu_multi_thread_eigen=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
}

FLAGS = flags.FlagValues()
_VARIANT = flags.DEFINE_string("variant", "small", "model variant (configs.default)",
                               flag_values=FLAGS)
_SIZE = flags.DEFINE_integer("size", 128, "input size in pixels", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", 8, "global batch (a multiple of the 4 datasets)",
                              flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per run", flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "rounds (each runs every setting once)",
                               flag_values=FLAGS)
_SETTINGS = flags.DEFINE_list(
    "settings", ["default", "one_core", "no_ynn"],
    f"settings to compare: names of {sorted(SETTINGS)} or name=--xla_flag=value (space-"
    "separated flags)", flag_values=FLAGS)
_TRACE = flags.DEFINE_bool("trace", False,
                           "in the last round, profile one step of each setting after timing",
                           flag_values=FLAGS)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "persistent compilation cache (default: a temporary folder)",
    flag_values=FLAGS)
_WORKER = flags.DEFINE_string("worker", None, "internal: run one setting in this process",
                              flag_values=FLAGS)


def parse_settings(values: list[str]) -> dict[str, str]:
  """`--settings` entries -> {name: XLA flags}; an unknown name is an error naming it."""
  settings = {}
  for value in values:
    name, sep, xla_flags = value.partition("=")
    if sep:
      if not name or not xla_flags.startswith("--"):
        raise ValueError(f"--settings: {value!r} is not name=--xla_flag=value")
      settings[name] = xla_flags
    elif value in SETTINGS:
      settings[value] = SETTINGS[value]
    else:
      raise ValueError(f"--settings: unknown setting {value!r}; known: {sorted(SETTINGS)}, "
                       "or give name=--xla_flag=value")
  return settings


# -----------------------------------------------------------------------------
# The profile: how many threads run XLA operations at each moment.


def op_kind(name: str) -> str:
  """An XLA operation's kind from its name: "ynn_fusion.356" -> "ynn_fusion"."""
  return re.sub(r"(\.\d+)+$", "", name)


def profile_summary(events: list[dict], top: int = 12) -> dict:
  """Where the step's time goes by XLA operation, and how many ran at once.

  `events` are Chrome-trace "X" events (ts and dur in microseconds, tid) of
  XLA:CPU's operations; nested events of one thread count once. Returns the
  traced span; the share of it with 0, 1 or 2+ operations running at once
  (operation-level concurrency; an operation's own worker threads, as in a
  multi-threaded convolution, emit no events); the microseconds of each
  operation kind (`op_kind`) and of each operation ("op_us", all of them, to
  compare settings operation by operation); and the `top` operation kinds
  that ran while no other operation did.
  """
  intervals = collections.defaultdict(list)
  for event in events:
    intervals[event["tid"]].append((event["ts"], event["ts"] + event["dur"], event["name"]))
  changes = []  # (time, +1/-1, tid, name) of each thread's outermost events
  op_us = collections.Counter()
  for tid, spans in intervals.items():
    spans.sort(key=lambda s: (s[0], -s[1]))
    end = -math.inf
    for start, stop, name in spans:
      if start >= end:  # outermost: not nested in the thread's previous span
        changes.append((start, 1, tid, name))
        changes.append((stop, -1, tid, name))
        op_us[name] += stop - start
        end = stop
  if not changes:
    raise ValueError("profile_summary: the trace holds no XLA operation events")
  changes.sort(key=lambda c: (c[0], c[1]))
  running = {}
  share = collections.Counter()
  alone = collections.Counter()
  last = changes[0][0]
  for time_us, delta, tid, name in changes:
    width = time_us - last
    if width > 0:
      share[min(len(running), 2)] += width
      if len(running) == 1:
        alone[op_kind(next(iter(running.values())))] += width
    last = time_us
    if delta > 0:
      running[tid] = name
    else:
      running.pop(tid, None)
  span = changes[-1][0] - changes[0][0]
  kinds = collections.Counter()
  for name, us in op_us.items():
    kinds[op_kind(name)] += us
  return {
      "span_us": round(span, 1),
      "concurrent_ops_share": {("2+" if k == 2 else str(k)): round(v / span, 3)
                               for k, v in sorted(share.items())},
      "op_kind_us": {k: round(us, 1) for k, us in kinds.most_common(top)},
      "alone_op_kind_us": {k: round(us, 1) for k, us in alone.most_common(top)},
      "op_us": {name: round(us, 1) for name, us in op_us.most_common()},
  }


def parallel_speedups(default_ops: dict[str, float], one_core_ops: dict[str, float],
                      top: int = 12, serial_below: float = 1.25) -> dict:
  """Per operation, one-core time over default time: what the second core buys.

  Matches the two profiles' operations by name (the same HLO compiled in
  both), groups them by `op_kind`, and gives each kind's default and one-core
  microseconds and ratio, largest default time first; `serial_share` is the
  share of the default profile's operation time in operations that gain
  less than `serial_below` from the extra cores.
  """
  common = set(default_ops) & set(one_core_ops)
  if not common:
    raise ValueError("parallel_speedups: the two profiles share no operation name")
  kinds = collections.defaultdict(lambda: [0.0, 0.0])
  serial = 0.0
  for name in common:
    kinds[op_kind(name)][0] += default_ops[name]
    kinds[op_kind(name)][1] += one_core_ops[name]
    if one_core_ops[name] < serial_below * default_ops[name]:
      serial += default_ops[name]
  total = sum(default_ops[name] for name in common)
  largest = sorted(kinds.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "matched_ops": len(common), "matched_share": round(total / sum(default_ops.values()), 3),
      "serial_share": round(serial / total, 3),
      "by_kind": {k: {"default_us": round(d, 1), "one_core_us": round(o, 1),
                      "speedup": round(o / d, 2) if d else None} for k, (d, o) in largest},
  }


def _trace_events(trace_dir: str) -> list[dict]:
  """The "X" events of the XLA operations in the perfetto trace `jax.profiler` wrote."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise RuntimeError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[0], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X" and "dur" in e and _is_xla_op(e)]


def _is_xla_op(event: dict) -> bool:
  # XLA:CPU's per-thunk TraceMe events carry the HLO op name; the Python and
  # PjRt-level events (the step call itself, buffer transfers) are left out.
  name = event.get("name", "")
  return not (name.startswith("$") or "PjRt" in name or "Pjit" in name or "Execute" in name
              or name.startswith("jit_") or "::" in name)


# -----------------------------------------------------------------------------
# One setting in this process.


def run_worker(name: str, variant: str, size: int, batch: int, steps: int,
               trace: bool) -> dict:
  """Compiles and times the train step under the process's XLA flags and affinity."""
  lowered, compiled, state, data, compile_s = rewrites.compiled_form_step(
      variant, size, batch, "float32", rewrites.FORMS["after"])
  # The step donates its state: each call continues from the last one's.
  for _ in range(2):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  seconds = []
  # process_time: the CPU time of all the process's threads, at the clock's
  # resolution (os.times counts 10 ms ticks, coarse against a short step).
  cpu_before, wall_before = time.process_time(), time.perf_counter()
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  cpu_after, wall_after = time.process_time(), time.perf_counter()
  cpu = cpu_after - cpu_before
  record = {
      "benchmark": "cpu_threads", "setting": name, "variant": variant, "input_size": size,
      "batch": batch, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "cpus": len(os.sched_getaffinity(0)), "compile_s": round(compile_s, 1),
      "step_s": round(statistics.median(seconds), 4),
      "cores_used": round(cpu / (wall_after - wall_before), 2),
      "loss": float(metrics["loss"]), "load_average_1min": round(os.getloadavg()[0], 2),
  }
  if trace:
    # Compiled again with XLA:CPU's per-operation trace events, after the
    # timing (they slow the step).
    traced = lowered.compile({"xla_cpu_enable_xprof_traceme": True})
    state, metrics = traced(state, data)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory(prefix="fgtbt_cpu_trace_") as folder:
      jax.profiler.start_trace(folder, create_perfetto_trace=True)
      state, metrics = traced(state, data)
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      record["profile"] = profile_summary(_trace_events(folder))
  return record


# -----------------------------------------------------------------------------
# The comparison: every setting in its own process, interleaved rounds.


def _run_setting(name: str, xla_flags: str, cache_dir: str, trace: bool) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  args = [sys.executable, "-m", "benchmarks.cpu_threads", f"--worker={name}",
          f"--variant={_VARIANT.value}", f"--size={_SIZE.value}", f"--batch={_BATCH.value}",
          f"--steps={_STEPS.value}", f"--trace={trace}"]
  one_core = name == "one_core"
  result = subprocess.run(
      args, env=env, capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      preexec_fn=(lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
      if one_core else None)
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode or not lines:
    raise RuntimeError(f"setting {name!r} (XLA_FLAGS={env['XLA_FLAGS']!r}) failed with exit "
                       f"code {result.returncode}:\n{result.stderr[-4000:]}")
  return json.loads(lines[-1])


def main(argv: list[str]) -> int:
  FLAGS(argv)
  if _WORKER.value:
    print(json.dumps(run_worker(_WORKER.value, _VARIANT.value, _SIZE.value, _BATCH.value,
                                _STEPS.value, _TRACE.value)), flush=True)
    return 0
  try:
    settings = parse_settings(_SETTINGS.value)
  except ValueError as e:
    print(f"cpu_threads: {e}", file=sys.stderr)
    return 2
  common.emit(common.machine_record())
  steps = collections.defaultdict(list)
  profiles = {}
  with tempfile.TemporaryDirectory(prefix="fgtbt_cpu_threads_cache_") as temporary:
    cache_dir = _CACHE_DIR.value or temporary
    for round_index in range(_ROUNDS.value):
      last = round_index == _ROUNDS.value - 1
      for name, xla_flags in settings.items():
        record = _run_setting(name, xla_flags, cache_dir, trace=_TRACE.value and last)
        record["round"] = round_index
        if "profile" in record:
          profiles[name] = record["profile"]
          record["profile"] = {k: v for k, v in record["profile"].items() if k != "op_us"}
        common.emit(record)
        steps[name].append(record["step_s"])
  medians = {name: statistics.median(values) for name, values in steps.items()}
  reference = medians.get("default", next(iter(medians.values())))
  summary = {"benchmark": "cpu_threads_summary", "variant": _VARIANT.value,
             "input_size": _SIZE.value, "batch": _BATCH.value, "rounds": _ROUNDS.value,
             "step_s": {k: round(v, 4) for k, v in medians.items()},
             "speedup_vs_default": {k: round(reference / v, 3) for k, v in medians.items()}}
  if "default" in profiles and "one_core" in profiles:
    summary["two_core_speedup_by_op"] = parallel_speedups(profiles["default"]["op_us"],
                                                          profiles["one_core"]["op_us"])
  common.emit(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
