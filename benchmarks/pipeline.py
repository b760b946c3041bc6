"""Training input pipeline throughput: augmented samples per second per process.

    python -m benchmarks.pipeline [--data-dir /tmp/fgtbt_bench] [--image-size 480] \\
        [--workers 0,1,2] [--batches 40]

Converts the synthetic datasets into `--data-dir` on first use, then times the
training pipeline (decode + one warp per sample + landmarks + mixing and
batching) with 0 (in this process), 1 and 2 worker processes, one reading
thread and one OpenCV thread per process, so "per process" means per core.
Besides wall-clock rates it reports samples per CPU-second of this process
and its worker processes (from /proc), which is the per-core figure even when
other jobs share the cores. It also times the stages of one sample on their
own in CPU milliseconds (reading the stored example, JPEG decoding, the warp)
to show where the time goes. Every result is printed as one JSON line. Not a
test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import cv2
import numpy as np
from absl import flags

from fgtbt_jax.data import config as data_config_lib
from fgtbt_jax.data import convert
from fgtbt_jax.data import pipeline


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def _cpu_seconds() -> float:
  """CPU seconds used by this process and its live child processes (Linux)."""
  total = time.process_time()
  ticks = os.sysconf("SC_CLK_TCK")
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == os.getpid():  # Parent pid; then utime, stime at 11, 12.
      total += (int(fields[11]) + int(fields[12])) / ticks
  return total


def _config(args, workers: int):
  c = data_config_lib.data_config()
  c.data_dir = args.data_dir
  c.image_size = args.image_size
  c.num_workers = workers
  c.read_threads = 1
  c.prefetch_buffer_size = 4
  c.worker_buffer_size = 4
  return c


def time_pipeline(args, workers: int) -> dict:
  """Samples/s of the full training iterator after a warm-up."""
  iterator = pipeline.make_train_iterator(_config(args, workers))
  try:
    batch_size = next(iterator)["image"].shape[0]
    for _ in range(args.warmup):
      next(iterator)
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(args.batches):
      next(iterator)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - start_cpu
  finally:
    iterator.close()
  samples = args.batches * batch_size
  rate = samples / seconds
  return {"benchmark": "train_pipeline", "workers": workers,
          "image_size": args.image_size, "batch": batch_size,
          "samples_per_s": round(rate, 1),
          "samples_per_s_per_process": round(rate / max(workers, 1), 1),
          "samples_per_cpu_s": round(samples / cpu_seconds, 1)}


def time_stages(args, n: int = 200) -> dict:
  """CPU milliseconds per sample of each stage, in this process on one core."""
  config = _config(args, 0)
  source = pipeline.open_source(config, config.datasets[0], config.train_split)
  augment = pipeline.TrainAugment.from_config(config, config.datasets[0])
  rng = np.random.default_rng(0)
  indices = rng.integers(0, len(source), n)

  def per_sample(fn):
    start = time.process_time()
    for i in indices:
      fn(int(i))
    return round((time.process_time() - start) / n * 1e3, 3)

  examples = [source[int(i)] for i in indices[:20]]
  stored_side = cv2.imdecode(np.frombuffer(examples[0]["image"], np.uint8),
                             cv2.IMREAD_COLOR).shape[0]
  matrices = [augment.matrix(e, *augment.draw(rng)) for e in examples]
  size = config.image_size
  return {
      "benchmark": "pipeline_stages_ms_per_sample", "image_size": size,
      "stored_side": int(stored_side),
      "read_example": per_sample(lambda i: source[i]),
      "jpeg_decode": per_sample(lambda i: cv2.imdecode(
          np.frombuffer(examples[i % 20]["image"], np.uint8), cv2.IMREAD_COLOR)),
      "decode_and_warp": per_sample(lambda i: pipeline.decode_and_warp(
          examples[i % 20]["image"], matrices[i % 20], size)),
      "augment_total": per_sample(lambda i: augment.random_map(examples[i % 20], rng)),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline")
  parser.add_argument("--data-dir", default=os.path.join("/tmp", "fgtbt_bench"))
  parser.add_argument("--image-size", type=int, default=480)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags.
  cv2.setNumThreads(1)
  convert.convert_synthetic(args.data_dir, {"WFLW": (200, 20), "300W": (200, 20),
                                            "COFW": (200, 20), "AFLW": (200, 20)})
  _emit({"benchmark": "machine", "date": datetime.date.today().isoformat(),
         "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
         "opencv": cv2.__version__})
  _emit(time_stages(args))
  for workers in (int(w) for w in args.workers.split(",")):
    _emit(time_pipeline(args, workers))
  return 0


if __name__ == "__main__":
  sys.exit(main())
