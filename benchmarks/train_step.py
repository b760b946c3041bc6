"""Train-step throughput: the real sharded step on synthetic batches already on device.

    python -m benchmarks.train_step [--config=configs/default.py] \\
        [--batch=8,32] [--dtype=float32,bfloat16] [--steps=10] [--warmup=2] \\
        [--breakdown] [--config.model.remat=True ...]

    python -m benchmarks.train_step --config=configs/fgtbt_paper.py \\
        --dtype=bfloat16 --batch=32 --steps=20        # the paper network at 480

For each (global batch, compute dtype) it builds the run's setup
(`state.build_setup`: mesh over all devices, sharded state), compiles the
step of `train.make_train_step` ahead of time and times it on one random
synthetic batch (no input pipeline, random weights), and prints one JSON
line with:

* compile_s (lowering + XLA compilation; a cache read when the persistent
  compilation cache already holds the program), step_s (median), steps/s,
  images/s;
* xla_flops_per_step: FLOPs of the compiled step from XLA's cost analysis,
  for one device's share of the batch; analytic_flops_per_step: the model's
  multiply-adds per image (`fgtbt_jax.models.cost.count_macs`, attention
  products included) x 2 FLOPs x 3 (forward + backward) x images on that
  device, as a cross-check (it leaves out the loss, norms, activations,
  optimizer and EMA, which XLA counts);
* mfu: xla FLOPs / step time / the device's dense peak (`common.PEAK_TFLOPS`;
  float32 against the TF32 peak on NVIDIA, JAX's default precision there),
  and model_mfu from the analytic FLOPs; on CPU, where no peak is listed,
  achieved_gflops_per_s and model_achieved_gflops_per_s instead. The two
  differ: XLA's cost analysis counts the gradient of a depthwise
  convolution's kernel (a batch-grouped convolution) as if it were dense,
  about C times its multiply-adds, which for the paper network's Mix-FFN
  doubles XLA's count; model_mfu is the utilisation to compare with
  published MFU figures;
* peak_memory_bytes: the device's peak bytes in use, or on CPU the process's
  maximum resident set (see `memory_source`), and XLA's own estimate of one
  device's memory for the step.

The batch is global and must be k x (number of datasets) (every step holds
k samples of each dataset) and divide by the device count.

--breakdown also times, on the same state and batch, the model's forward pass
alone (train mode), forward + loss, and the gradient of the loss, to show
where the step's time goes (the remainder is AdamW, EMA and bookkeeping).
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import sys
import time
from typing import Iterator, Sequence

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from benchmarks import common
from fgtbt_jax import aot
from fgtbt_jax import validation
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax import state as state_lib
from fgtbt_jax import train
from fgtbt_jax.models import cost

FLAGS = flags.FlagValues()
_CONFIG, _BATCH, _DTYPE = common.define_step_flags(FLAGS)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1, flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", lower_bound=0,
                               flag_values=FLAGS)
_BREAKDOWN = flags.DEFINE_bool("breakdown", False,
                               "Also time forward, forward + loss and gradient alone.",
                               flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights and batch.",
                             flag_values=FLAGS)

# validate_config wants a data directory; the benchmark reads none.
_NO_DATA_DIR = "(none: synthetic batches on device)"


def benchmark_config(config: ml_collections.ConfigDict, batch: int | None,
                     dtype: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the global batch and the compute dtype set.

  Raises:
    ValueError: the batch is not a positive multiple of the number of
      datasets, or the config fails `validation.validate_config` (e.g. the batch
      does not divide by the device count).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  num_datasets = len(config.data.datasets)
  if batch is not None:
    if batch < 1 or batch % num_datasets:
      raise ValueError(f"--batch={batch}: the global batch must be k x {num_datasets} "
                       f"(k samples of each of {tuple(config.data.datasets)})")
    config.data.samples_per_dataset = batch // num_datasets
  config.model.dtype = dtype
  models.validate_model_config(config.model)
  if not config.data.data_dir:
    config.data.data_dir = _NO_DATA_DIR
  validation.validate_config(config)
  return config


def analytic_flops_per_image(model_config: ml_collections.ConfigDict) -> float:
  """Model multiply-adds per image x 2 FLOPs x 3 (forward + backward)."""
  return 6.0 * cost.count_macs(model_config)["total"]


def out_of_memory(error: jax.errors.JaxRuntimeError) -> bool:
  """Whether a runtime error is XLA's out-of-memory (other errors propagate)."""
  return "RESOURCE_EXHAUSTED" in str(error)


def time_step(config: ml_collections.ConfigDict, steps: int, warmup: int, seed: int,
              breakdown: bool = False) -> list[dict]:
  """Compiles and times the train step of `config`; returns the result records.

  A step that runs out of device memory (when compiled or run) gives a
  record with "error" and the figures known by then (XLA's memory estimate
  among them) instead of timings.
  """
  setup = state_lib.build_setup(config)
  state = common.random_train_state(setup, seed)
  batch = common.synthetic_train_batch(config, sharding.batch_sharding(setup.mesh), seed)
  train_step = train.make_train_step(setup, state_lib.ema_decay_per_step(config))
  device = jax.devices()[0]
  devices = jax.device_count()
  images = config.data.samples_per_dataset * len(config.data.datasets)
  record = {
      "benchmark": "train_step",
      "variant": config.model.variant,
      "input_size": config.model.input_size,
      "dtype": config.model.dtype,
      "remat": bool(config.model.remat),
      "remat_policy": config.model.remat_policy,
      "remat_policy_resolved": models.resolve_remat_policy(config.model.remat_policy),
      "batch": images,
      "samples_per_dataset": config.data.samples_per_dataset,
      "devices": devices,
      "mesh": dict(setup.mesh.shape),
  }

  start = time.perf_counter()
  with sharding.mesh_and_rules(setup.mesh, setup.rules):
    lowered = aot.jitted_function(train_step).lower(state, batch)
  record["lower_s"] = round(time.perf_counter() - start, 2)
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if not out_of_memory(e):
      raise
    return [{**record, **common.peak_memory(device), "error": str(e).splitlines()[0]}]
  record["compile_s"] = round(time.perf_counter() - start, 2)

  xla_flops = common.compiled_flops(compiled)
  analytic = analytic_flops_per_image(config.model) * images / devices
  precision = jax.config.jax_default_matmul_precision
  peak, peak_source = common.peak_tflops(device.device_kind, config.model.dtype, precision)
  record.update({
      "steps": steps,
      "warmup": warmup,
      "xla_flops_per_step": xla_flops,
      "analytic_flops_per_step": analytic,
      "xla_to_analytic": None if xla_flops is None else round(xla_flops / analytic, 3),
      "peak_tflops": peak,
      "peak_source": peak_source,
      "xla_memory_estimate_bytes": common.compiled_memory_bytes(compiled),
  })

  # The compiled step donates its state: thread it through.
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  try:
    common.time_calls(run, warmup)
    seconds = common.time_calls(run, steps)
    loss = float(run())
  except jax.errors.JaxRuntimeError as e:
    if not out_of_memory(e):
      raise
    return [{**record, **common.peak_memory(device), "error": str(e).splitlines()[0]}]
  summary = common.timing_summary(seconds)
  step_s = summary["median_s"]
  record.update({
      "step_s": round(step_s, 5),
      "step_s_mean": round(summary["mean_s"], 5),
      "step_s_min": round(summary["min_s"], 5),
      "steps_per_s": round(1.0 / step_s, 3),
      "images_per_s": round(images / step_s, 2),
      "loss_after": loss,
      **common.peak_memory(device),
  })
  # Per device: XLA's count of the compiled program, and the model's own.
  rates = {"": xla_flops, "model_": analytic}
  for prefix, flops in rates.items():
    if flops is None:
      continue
    if peak is None:
      record[f"{prefix}achieved_gflops_per_s"] = round(flops * devices / step_s / 1e9, 2)
    else:
      record[f"{prefix}achieved_tflops_per_s_per_device"] = round(flops / step_s / 1e12, 2)
      record[f"{prefix}mfu"] = round(flops / step_s / (peak * 1e12), 4)
  records = [record]
  if breakdown:
    breakdown_record = _breakdown(setup, holder["state"], batch, steps)
    breakdown_record["full_step_s"] = round(step_s, 5)
    records.append(breakdown_record)
  return records


def _breakdown(setup: state_lib.Setup, state: state_lib.TrainState, batch: dict, steps: int) -> dict:
  """Median seconds of the forward pass, forward + loss and its gradient alone.

  The train step's own loss (`train.train_loss`: the train-mode forward with
  batch-statistics updates under the remat policy, targets rendered on
  device, FMB-loss) and its forward pass (`train.model_forward`), without
  the optimizer and EMA updates.
  """
  remat_policy = setup.config.model.remat_policy
  train_loss = train.train_loss(setup)

  def forward(params, state, batch):
    images = models.normalize_images(batch["image"])
    outputs, _ = train.model_forward(setup.model, state.batch_stats, state.rng, remat_policy)(
        params, images)
    return outputs

  def loss(params, state, batch):
    trainable = {"model": params, "balancer": state.balancer_params}
    return train_loss(trainable, state.batch_stats, state.balancer_state, state.rng, batch)[0]

  record = {"benchmark": "train_step_breakdown", "variant": setup.config.model.variant,
            "input_size": setup.config.model.input_size, "dtype": setup.config.model.dtype,
            "batch": int(batch["image"].shape[0])}
  for name, fn in (("forward", forward), ("forward_loss", loss),
                   ("forward_backward", jax.grad(loss))):
    start = time.perf_counter()
    with sharding.mesh_and_rules(setup.mesh, setup.rules):
      compiled = jax.jit(fn).lower(state.params, state, batch).compile()
    record[f"{name}_compile_s"] = round(time.perf_counter() - start, 2)
    call = lambda: compiled(state.params, state, batch)
    call()
    record[f"{name}_s"] = round(common.timing_summary(common.time_calls(call, steps))["median_s"], 5)
    record[f"{name}_xla_flops"] = common.compiled_flops(compiled)
  return record


def step_configs(config: ml_collections.ConfigDict, batch_values: Sequence[str],
                 dtypes: Sequence[str]) -> Iterator[tuple[str, int | None,
                                                          ml_collections.ConfigDict]]:
  """(dtype, batch, `benchmark_config`) for every dtype and batch of the
  --dtype and --batch flags (`common.define_step_flags`; no batch: the
  config's)."""
  batches = common.parse_batches(batch_values) or [None]
  for dtype in dtypes:
    for batch in batches:
      yield dtype, batch, benchmark_config(config, batch, dtype)


def main(argv: list[str]) -> int:
  FLAGS(argv)
  common.emit(common.machine_record())
  for _, _, config in step_configs(_CONFIG.value, _BATCH.value, _DTYPE.value):
    for record in time_step(config, _STEPS.value, _WARMUP.value, _SEED.value,
                            _BREAKDOWN.value):
      record["config"] = config_flags.get_config_filename(FLAGS["config"])
      common.emit(record)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
