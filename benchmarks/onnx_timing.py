"""onnxruntime against JAX on this CPU: the crop -> landmarks predict function, side by side.

    python -m benchmarks.onnx_timing [--configs tiny,paper] [--batches 1,8] \\
        [--repeats 20] [--paper_repeats 3] [--no_flip_test] [--out_dir /tmp/fgtbt_onnx]

For each model variant (random weights: the cost does not depend on the
values) and batch size B: the predict function (`inference.make_predict_fn`,
the one `Predictor` runs; the flip test on unless --no_flip_test) jitted by
JAX and exported to ONNX (`fgtbt_jax.deploy.onnx_export.export_onnx`), both
run on the same random uint8 crops (B, S, S, 3) in this one process, the
calls alternating (JAX, onnxruntime, JAX, ...) so that a change in the
machine's load hits both alike. One JSON line per setting: export and
compile times, per-call median and minimum in ms for each, images/s, and
the largest landmark difference between the two (crop pixels). The first
line describes the machine (CPU model, cores, load average).
Not a test: numbers depend on the machine and its load (docs/onnx.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from fgtbt_jax import models
from fgtbt_jax.deploy import onnx_export
from fgtbt_jax.deploy import predictor as predictor_lib


def cpu_model() -> str:
  """The CPU's model name (`lscpu`), else the platform's processor string."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    out = ""
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def make_predictor(variant: str, batch: int, flip_test: bool, seed: int
                   ) -> predictor_lib.Predictor:
  config = models.model_config(variant)
  model = models.build_model(config)
  variables = models.random_variables(models.abstract_variables(model, config.input_size), seed)
  predictor = predictor_lib.Predictor(config, variables, batch_size=batch)
  predictor.settings = predictor.settings.replace(flip_test=flip_test)
  return predictor


def time_setting(variant: str, batch: int, flip_test: bool, repeats: int, warmup: int,
                 out_dir: pathlib.Path, seed: int, threads: int | None) -> dict:
  predictor = make_predictor(variant, batch, flip_test, seed)
  size = predictor.image_size
  crops = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  path = out_dir / f"{variant}_b{batch}_flip{int(flip_test)}.onnx"

  start = time.perf_counter()
  onnx_export.export_onnx(predictor, path)
  export_s = time.perf_counter() - start
  start = time.perf_counter()
  runtime = onnx_export.OnnxPredictor(path, threads=threads)
  session_s = time.perf_counter() - start

  start = time.perf_counter()
  on_device = jax.device_put(crops)
  compiled = predictor.inference_fn().lower(predictor.variables, on_device).compile()
  compile_s = time.perf_counter() - start

  jax_call = lambda: jax.block_until_ready(compiled(predictor.variables, jax.device_put(crops)))
  onnx_call = lambda: runtime(crops)
  for _ in range(warmup):
    jax_call()
    onnx_call()
  seconds = {"jax": [], "onnxruntime": []}
  for _ in range(repeats):  # Alternating: the load of the moment hits both.
    for name, call in (("jax", jax_call), ("onnxruntime", onnx_call)):
      begin = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - begin)
  jax_points = np.asarray(jax_call()[0])
  onnx_points = onnx_call()[0]
  record = {
      "benchmark": "onnx_timing", "variant": variant, "input_size": size, "batch": batch,
      "flip_test": flip_test, "decoder": predictor.settings.decoder, "repeats": repeats,
      "export_s": round(export_s, 1), "onnx_mb": round(path.stat().st_size / 1e6, 1),
      "session_s": round(session_s, 2), "jax_compile_s": round(compile_s, 2),
      "max_point_difference_px": float(np.abs(onnx_points - jax_points).max()),
  }
  for name, values in seconds.items():
    median = statistics.median(values)
    record[f"{name}_ms"] = round(median * 1e3, 2)
    record[f"{name}_ms_min"] = round(min(values) * 1e3, 2)
    record[f"{name}_images_per_s"] = round(batch / median, 2)
  record["onnxruntime_speedup"] = round(record["jax_ms"] / record["onnxruntime_ms"], 2)
  record["load_average_1min"] = round(os.getloadavg()[0], 2)
  return record


def parse_list(value: str, cast, name: str) -> list:
  try:
    items = [cast(v) for v in value.split(",") if v]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--{name}={value!r}: bad value") from None
  if not items:
    raise argparse.ArgumentTypeError(f"--{name}: give at least one value")
  return items


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_timing",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="tiny,paper",
                      type=lambda v: parse_list(v, str, "configs"),
                      help="model variants (models.model_config names)")
  parser.add_argument("--batches", default="1,8", type=lambda v: parse_list(v, int, "batches"))
  parser.add_argument("--repeats", type=int, default=20, help="timed calls of each runtime")
  parser.add_argument("--paper_repeats", type=int, default=3,
                      help="timed calls for the paper variant (seconds per call on a CPU)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each runtime")
  parser.add_argument("--no_flip_test", dest="flip_test", action="store_false",
                      help="time the predict function without the flip test")
  parser.add_argument("--threads", type=int, default=None,
                      help="onnxruntime intra-op threads (default: its own, all cores)")
  parser.add_argument("--out_dir", default=None,
                      help="where the .onnx files go (default: a temporary folder)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for variant in args.configs:
    models.model_config(variant)  # An unknown name fails before anything runs.
  if min(args.batches) < 1 or min(args.repeats, args.paper_repeats) < 1:
    parser.error("batches and repeats must be at least 1")

  machine = common.machine_record()
  machine.update(cpu_model=cpu_model(), onnxruntime=_version("onnxruntime"),
                 jax2onnx=_version("jax2onnx"), python=platform.python_version())
  common.emit(machine)
  with tempfile.TemporaryDirectory() as scratch:
    out_dir = pathlib.Path(args.out_dir or scratch)
    out_dir.mkdir(parents=True, exist_ok=True)
    for variant in args.configs:
      repeats = args.paper_repeats if variant == "paper" else args.repeats
      for batch in args.batches:
        common.emit(time_setting(variant, batch, args.flip_test, repeats, args.warmup, out_dir,
                                 args.seed, args.threads))
  return 0


def _version(name: str) -> str:
  try:
    from importlib import metadata
    return metadata.version(name)
  except Exception:  # Not installed: the export above would have said so.
    return "not installed"


if __name__ == "__main__":
  sys.exit(main())
