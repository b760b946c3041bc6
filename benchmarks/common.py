"""Shared pieces of the model benchmarks: machine facts, random state, timing, peaks.

The train-step and inference benchmarks run the project's real jitted
functions on random weights and synthetic inputs already on the device, so
they time the device work alone (no input pipeline, no checkpoint). What
they share lives here:

* `machine_record()`: date, JAX version, devices, load average and whether
  the persistent compilation cache is on (then "compile" times of programs
  compiled before are cache reads);
* `random_train_state` (`models.random_variables`): weights drawn with numpy from
  the abstract shapes. Compiling the model's own initialisers costs about a
  minute for the tiny model on a 2-core CPU (one random kernel per
  parameter tensor) and more for the paper network; a step's cost does not
  depend on the values;
* `time_calls`: per-call wall-clock seconds, each call waited for;
* `PEAK_TFLOPS` / `peak_tflops`: vendor dense peaks per device kind for
  model FLOPs utilisation;
* `peak_memory`: the device's peak bytes in use, or the process's maximum
  resident set on CPU (where devices report no memory statistics).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import resource
import statistics
import time
from typing import Any, Callable, Sequence

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from jax.sharding import NamedSharding

from fgtbt_jax import aot
from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax import models
from fgtbt_jax import sharding as sharding_lib
from fgtbt_jax import state as state_lib
from fgtbt_jax import train


def emit(record: dict) -> None:
  """Prints one benchmark result as a JSON line."""
  print(json.dumps(record), flush=True)


def machine_record() -> dict:
  """Facts that qualify every figure: when, where, what else was running."""
  device = jax.devices()[0]
  return {
      "benchmark": "machine",
      "date": datetime.date.today().isoformat(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      # Other processes sharing the cores slow every figure down.
      "load_average_1min": round(os.getloadavg()[0], 2),
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
  }


def define_step_flags(flag_values: flags.FlagValues) -> tuple:
  """The --config, --batch and --dtype flags of the train-step benchmarks, in `flag_values`."""
  config = config_flags.DEFINE_config_file(
      "config", "configs/default.py", "Experiment config file; --config.x=y overrides fields.",
      flag_values=flag_values, lock_config=True)
  batch = flags.DEFINE_list(
      "batch", [], "Global batch sizes (k x number of datasets); default the config's.",
      flag_values=flag_values)
  dtype = flags.DEFINE_list("dtype", ["float32"], "Compute dtypes: float32, bfloat16.",
                            flag_values=flag_values)
  return config, batch, dtype


def parse_batches(values: Sequence[str]) -> list[int]:
  """Batch sizes from a --batch list; ValueError naming a value that is not >= 1."""
  batches = []
  for value in values:
    try:
      batch = int(value)
    except ValueError:
      batch = 0
    if batch < 1:
      raise ValueError(f"--batch={value!r}: batch sizes must be integers >= 1")
    batches.append(batch)
  return batches


# -----------------------------------------------------------------------------
# Random weights and train state.


def random_train_state(setup: state_lib.Setup, seed: int = 0) -> state_lib.TrainState:
  """A train state with random weights, placed in the setup's shardings.

  Same tree, shapes, dtypes and shardings as `state_lib.create_train_state`;
  the optimizer state comes from the real `tx.init` on these weights, the
  balancer from `losses.init_balancer`, the EMA copies equal the weights.
  """
  shardings = setup.state_shardings
  abstract = setup.abstract_state
  params = models.random_variables(abstract.params, seed)
  batch_stats = models.random_variables(abstract.batch_stats, seed + 1)
  balancer_params, balancer_state = losses.init_balancer(setup.loss_config)
  put = jax.device_put
  params_on_device = put(params, shardings.params)
  balancer_on_device = put(balancer_params, shardings.balancer_params)
  init_opt = jax.jit(setup.tx.init, out_shardings=shardings.opt_state)
  opt_state = init_opt({"model": params_on_device, "balancer": balancer_on_device})
  return state_lib.TrainState(
      step=put(np.zeros((), np.int32), shardings.step),
      params=params_on_device,
      batch_stats=put(batch_stats, shardings.batch_stats),
      opt_state=opt_state,
      # Separate buffers: the step donates the whole state.
      ema_params=put(params, shardings.ema_params),
      ema_batch_stats=put(batch_stats, shardings.ema_batch_stats),
      balancer_params=balancer_on_device,
      balancer_state=put(balancer_state, shardings.balancer_state),
      rng=put(np.asarray(jax.random.PRNGKey(seed)), shardings.rng))


def synthetic_train_batch(config: ml_collections.ConfigDict, sharding: NamedSharding,
                          seed: int = 0) -> dict:
  """A global training batch laid out as the grain pipeline makes it.

  k = data.samples_per_dataset samples of each of data.datasets, grouped by
  dataset in config order; random uint8 images; the mean face jittered and
  scaled into the crop, masked by each sample's protocol.
  """
  rng = np.random.default_rng(seed)
  size = int(config.data.image_size)
  k = int(config.data.samples_per_dataset)
  ids = np.repeat([landmarks.PROTOCOL_NAMES.index(d) for d in config.data.datasets], k)
  count = len(ids)
  mask = landmarks.PROTOCOL_MASKS[ids]
  face = landmarks.mean_face()[None] + 0.02 * rng.standard_normal((count, landmarks.NUM_UNIFIED, 2))
  points = ((0.1 + 0.8 * face) * size).astype(np.float32) * mask[..., None]
  batch = {
      "image": rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
      "landmarks": points,
      "mask": mask,
      "dataset_id": ids.astype(np.int32),
  }
  return sharding_lib.global_batch(batch, sharding, train.TRAIN_BATCH_KEYS)


# -----------------------------------------------------------------------------
# Timing and costs.


def time_calls(fn: Callable[[], Any], count: int) -> list[float]:
  """Wall-clock seconds of `count` calls of fn(), each waited for on device."""
  seconds = []
  for _ in range(count):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return seconds


def timing_summary(seconds: Sequence[float]) -> dict:
  """Median, mean and minimum of per-call seconds."""
  return {"median_s": statistics.median(seconds), "mean_s": statistics.fmean(seconds),
          "min_s": min(seconds)}


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
  """FLOPs of one execution from XLA's cost analysis (per device when SPMD)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per module.
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> int | None:
  """XLA's estimate of one device's memory for the program (args + outputs + temps)."""
  analysis = compiled.memory_analysis()
  return None if analysis is None else aot.memory_figures(analysis)["total"]


def peak_memory(device: jax.Device) -> dict:
  """Peak memory in bytes, and where the number comes from.

  GPUs and TPUs report `peak_bytes_in_use` of the device. CPU devices report
  nothing; the process's maximum resident set size stands in (host memory
  of the whole process since it started: the weights, the compiler and
  every earlier measurement of the same run included).
  """
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"peak_memory_bytes": int(stats["peak_bytes_in_use"]),
            "memory_source": "device.memory_stats()['peak_bytes_in_use']"}
  max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux.
  return {"peak_memory_bytes": int(max_rss_kib) * 1024,
          "memory_source": "process max RSS (CPU devices report no memory stats)"}


@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """Vendor dense (no sparsity) peak TFLOP/s of one device."""

  bfloat16: float
  tensorfloat32: float  # float32 matmuls at JAX's default precision.
  float32: float        # float32 matmuls at "highest" precision.


# Vendor datasheet dense peaks per device (TFLOP/s; NVIDIA quotes tensor-core
# figures "with sparsity", half of which is the dense figure used here):
# NVIDIA H100 SXM5 and H200: bf16 989.4, tf32 494.7, fp32 66.9; H100 PCIe:
# 756, 378, 51.2; A100: 312, 156, 19.5. Google Cloud TPU per chip: v4 275,
# v5e 197, v5p 459, v6e (Trillium) 918 bf16; TPUs run float32 matmuls at the
# default precision as bfloat16 passes, so their bf16 peak is used for both.
PEAK_TFLOPS: dict[str, DevicePeak] = {
    "H200": DevicePeak(989.4, 494.7, 66.9),
    "H100 PCIe": DevicePeak(756.0, 378.0, 51.2),
    "H100": DevicePeak(989.4, 494.7, 66.9),
    "A100": DevicePeak(312.0, 156.0, 19.5),
    "TPU v4": DevicePeak(275.0, 275.0, 275.0),
    "TPU v5 lite": DevicePeak(197.0, 197.0, 197.0),
    "TPU v5e": DevicePeak(197.0, 197.0, 197.0),
    "TPU v5p": DevicePeak(459.0, 459.0, 459.0),
    "TPU v5": DevicePeak(459.0, 459.0, 459.0),
    "TPU v6 lite": DevicePeak(918.0, 918.0, 918.0),
    "TPU v6e": DevicePeak(918.0, 918.0, 918.0),
}


def peak_tflops(device_kind: str, dtype: str, matmul_precision: str | None = None
                ) -> tuple[float | None, str]:
  """(dense peak TFLOP/s of one device for `dtype`, which table entry) or (None, why).

  float32 uses the TF32 tensor-core peak on NVIDIA GPUs, since JAX computes
  float32 matmuls there in TF32 unless `jax_default_matmul_precision` asks
  for "float32"/"highest"; then the plain FP32 peak. Entries are matched as
  substrings of `device.device_kind`, first match wins (so "H100 PCIe"
  before "H100", "TPU v5 lite" before "TPU v5").
  """
  for name, peak in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      if dtype == "bfloat16":
        return peak.bfloat16, f"{name} bf16 dense"
      if (matmul_precision or "").lower() in ("float32", "highest", "f32_f32_f32"):
        return peak.float32, f"{name} fp32 dense"
      return peak.tensorfloat32, f"{name} tf32 dense (JAX default float32 matmul precision)"
  return None, f"no peak listed for device kind {device_kind!r}"
