"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One jitted step trains the model on a mixed batch (k samples from each
dataset) with the FMB-loss, updates the EMA copy of the weights and batch
statistics, and returns the loss and per-dataset losses. Around it:

* a device mesh ("data", "fsdp") built from the config; parameters and
  optimizer state are sharded from the model's logical axis names with the
  rules table in the config, and created directly sharded (abstract shapes
  first, then `jax.jit(init, out_shardings=...)`);
* process-local batches from the grain pipeline assembled into global arrays
  (`sharding.GlobalBatches`; multi-host ready: `jax.distributed.initialize`
  runs when the config or the environment names a coordinator);
* Orbax checkpoints of the train state and the data iterator, resumed from
  the latest on restart, saved on SIGTERM/SIGINT before a clean exit;
* evaluation of the EMA model every `eval_every` steps and at the end, with
  the best EMA checkpoint per dataset kept;
* safety rails: config validation before any work (`validation`), a loud
  stop on a non-finite loss (the last good checkpoint stays), and the
  transfer guard around the step;
* the console: one line that sums the run up (`run_summary`; the full
  config is `<workdir>/config.json`), a progress bar over the steps with
  rate (steps/s, images/s) and ETA on process 0, the metric line every
  `log_every` steps above it.

The train state, optimizer and abstract shapes are built in `state`; data
preparation (synthetic stand-ins, conversion checks) is
`fgtbt_jax.data.prepare`; training and eval scalars go through one
`MetricWriter`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from fgtbt_jax.data import pipeline
from fgtbt_jax.data import prepare
from fgtbt_jax.data import schemes
from fgtbt_jax import checkpointing
from fgtbt_jax import errors
from fgtbt_jax import evaluate
from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax import models
from fgtbt_jax import rundir
from fgtbt_jax import sharding
from fgtbt_jax.errors import ConfigError
from fgtbt_jax.metric_writer import MetricWriter
from fgtbt_jax.state import Setup, TrainState, build_setup, create_train_state, ema_decay_per_step
from fgtbt_jax.validation import validate_config

# The keys of a training batch that the step reads.
TRAIN_BATCH_KEYS = ("image", "landmarks", "mask", "dataset_id")
# Folded into a step's dropout key for the low-resolution mode's draws and
# for SHT's second views.
LOWRES_STREAM = 0x10
PAIR_STREAM = 0x11


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding: NamedSharding) -> dict:
  """`jax.ShapeDtypeStruct`s of a global training batch, placed with `batch_sharding`.

  The layout the grain pipeline makes and the step reads: k samples of each
  dataset (`data.samples_per_dataset` x the datasets), uint8 images
  (B, S, S, 3), landmarks (B, 124, 2) float32, the protocol masks (B, 124)
  and dataset ids (B,). For lowering the step ahead of time (`fgtbt_jax.aot`,
  benchmarks/memory.py) without making a batch.
  """
  size = int(config.data.image_size)
  count = global_batch_size(config)
  shapes = {"image": ((count, size, size, 3), jnp.uint8),
            "landmarks": ((count, landmarks.NUM_UNIFIED, 2), jnp.float32),
            "mask": ((count, landmarks.NUM_UNIFIED), np.asarray(landmarks.PROTOCOL_MASKS).dtype),
            "dataset_id": ((count,), jnp.int32)}
  return {key: jax.ShapeDtypeStruct(*shapes[key], sharding=batch_sharding)
          for key in TRAIN_BATCH_KEYS}


def _ema(average: Any, value: Any, decay) -> Any:
  return jax.tree.map(lambda a, v: decay * a + (1.0 - decay) * v, average, value)


def ema_step_decay(decay: float, step: jax.Array, bias_correction: bool) -> jax.Array:
  """The EMA decay of the update to `step` (1, 2, ...).

  Without correction, `decay`. With it, d (1 - d^(t-1)) / (1 - d^t): the
  average then equals Adam's bias-corrected moment m_t / (1 - d^t) of an
  average started at zero, the weights of steps 1..t summing to one (step
  1's decay is 0: the average starts at the first trained weights, not the
  initial ones).
  """
  if not bias_correction:
    return jnp.float32(decay)
  log_decay = math.log(decay)
  t = jnp.asarray(step, jnp.float32)
  return decay * jnp.expm1((t - 1.0) * log_decay) / jnp.expm1(t * log_decay)


def _warn_short_plain_average(config: ml_collections.ConfigDict, decay: float) -> None:
  """Warns when a plain (uncorrected) EMA would still hold much of the initial weights."""
  kept = decay ** int(config.train.steps)
  if not config.train.ema_bias_correction and kept > 0.01:
    logging.warning(
        "train.steps=%d is short next to train.ema_half_life_images=%g: the evaluated EMA "
        "model (a plain average, train.ema_bias_correction=False) will still hold %.0f%% of "
        "the initial weights at the end; set train.ema_bias_correction=True or a shorter "
        "half-life", config.train.steps, config.train.ema_half_life_images, 100 * kept)


def parameter_table(boxed_params: Any, depth: int = 2) -> tuple[str, int]:
  """A text table of parameter counts per module (first `depth` path parts)."""
  counts: dict[str, int] = {}
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed_params))
  for path, leaf in leaves:
    names = [str(getattr(k, "key", k)) for k in path[:depth]]
    counts["/".join(names)] = counts.get("/".join(names), 0) + math.prod(leaf.shape)
  total = sum(counts.values())
  width = max(len(k) for k in counts) if counts else 10
  lines = [f"{'module':<{width}}  {'parameters':>12}"]
  lines += [f"{k:<{width}}  {v:>12,}" for k, v in counts.items()]
  lines.append(f"{'total':<{width}}  {total:>12,}")
  return "\n".join(lines), total


# -----------------------------------------------------------------------------
# The train step.


def model_forward(model: nn.Module, batch_stats: Any, dropout_rng: jax.Array,
                  remat_policy: str, frozen_batch_norm: bool = False) -> Callable:
  """The train step's forward pass: (params, normalised images) -> (outputs, updates).

  `outputs` are the head's named outputs (heatmaps, and HIH's decimal maps or
  the recurrent head's steps; every one is supervised) in the compute dtype
  (the loss casts them to float32 where it recomputes), `updates` the new
  batch statistics ({} with `frozen_batch_norm`: eval mode). Runs under the
  model's rematerialisation policy (`models.rematerialize`): what the
  backward pass gets kept and what it recomputes.
  """
  apply = functools.partial(model.apply, method=models.FGTBT.named_outputs,
                            float32_outputs=False)

  def forward(params, images):
    variables = {"params": params, "batch_stats": batch_stats}
    if frozen_batch_norm:
      return apply(variables, images, train=False), {}
    return apply(variables, images, train=True, rngs={"dropout": dropout_rng},
                 mutable=["batch_stats"])

  return models.rematerialize(forward, remat_policy)


def train_loss(setup: Setup, frozen_batch_norm: bool = False) -> Callable:
  """The train step's loss, the one function its gradient is taken of.

  `loss(trainable, batch_stats, balancer_state, dropout_rng, batch, sht=None)`
  -> `(total, (aux, new_batch_stats, sht_outputs))`, with `trainable` the
  dict {"model": params, "balancer": balancer parameters} that the optimizer
  updates (and "generator": FPTN's generator parameters with SHT). The
  forward pass is `model_forward` (train mode under the remat policy, or
  eval mode with `frozen_batch_norm`); targets are rendered on device inside
  `losses.head_loss` (the FMB-loss and its per-dataset terms in `aux`). The
  benchmarks measure this same function.

  With SHT (`config.sht.enabled`; `sht` is the state's `sht` entry), every
  face of the batch is paired with a second view of itself
  (`models.hallucination.paired_view`), both go through the network side by
  side (the FMB-loss and DHLN's losses on both), and FPTN's transfer
  between them adds its losses (`models.fptn.PoseTransfer`); `sht_outputs`
  then holds the generator's new BatchNorm statistics and the faces the
  discriminators learn from ({} without SHT).
  """
  model, loss_config = setup.model, setup.loss_config
  remat_policy = setup.config.model.remat_policy
  factors = tuple(int(f) for f in setup.config.lowres.factors)
  probability = float(setup.config.lowres.probability)
  transfer = setup.sht
  if transfer is not None:
    max_rotation = float(setup.config.sht.max_rotation)
    scale_range = tuple(float(x) for x in setup.config.sht.scale_range)

  def loss(trainable, batch_stats, balancer_state, dropout_rng, batch, sht=None):
    high_resolution, points = batch["image"], batch["landmarks"]
    mask, dataset_id = batch["mask"], batch["dataset_id"]
    if transfer is not None:  # SHT: each face and a second view of it, side by side.
      view, moved = models.hallucination.paired_view(
          high_resolution, points, jax.random.fold_in(dropout_rng, PAIR_STREAM),
          max_rotation, scale_range)
      pair = models.fptn.interleave_views
      high_resolution = pair(jnp.asarray(high_resolution, jnp.float32), view)
      points, mask, dataset_id = pair(points, moved), pair(mask, mask), pair(dataset_id, dataset_id)
    inputs = high_resolution
    if factors:  # The low-resolution training mode: a degraded copy goes in.
      inputs = models.hallucination.random_degrade(
          inputs, jax.random.fold_in(dropout_rng, LOWRES_STREAM), factors, probability)
    images = models.normalize_images(inputs)
    forward = model_forward(model, batch_stats, dropout_rng, remat_policy, frozen_batch_norm)
    outputs, updates = forward(trainable["model"], images)
    hallucinated = outputs.pop("hallucination", None)
    stride = images.shape[1] / outputs["heatmaps"].shape[1]
    total, aux = losses.head_loss(loss_config, outputs, points, mask, dataset_id, stride,
                                  trainable["balancer"], balancer_state)
    sht_outputs = {}
    if hallucinated is not None:  # DHLN: the high-resolution crop is the target.
      hallucinated = models.denormalize_images(hallucinated) / 255.0
      target = jnp.asarray(high_resolution, jnp.float32) / 255.0
      image_loss, image_aux = losses.hallucination_loss(
          hallucinated, target, loss_config.hallucination_l1_weight,
          loss_config.hallucination_gradient_weight)
      total = total + image_loss
      aux = {**aux, **image_aux}
      if transfer is not None:  # SHT: each view's face drawn in the other's pose.
        transfer_loss, transfer_aux, generator_stats, discriminated = transfer.generator_loss(
            {**sht["params"], "generator": trainable["generator"]}, sht["batch_stats"],
            transfer.resize_images(hallucinated), transfer.resize_heatmaps(outputs["heatmaps"]),
            transfer.resize_images(target))
        total = total + transfer_loss
        aux = {**aux, **transfer_aux}
        sht_outputs = {"batch_stats": generator_stats, "faces": discriminated}
    return total, (aux, updates.get("batch_stats", batch_stats), sht_outputs)

  return loss


def sht_update(setup: Setup, sht: dict, generator_grads: Any, sht_outputs: dict,
               aux: dict) -> tuple[dict, dict]:
  """One Adam step of FPTN's generator (its gradient from the train loss) and
  discriminators (from `PoseTransfer.discriminator_loss` on the step's faces).

  Returns the new `sht` state and `aux` with "discriminator_loss" added.
  """
  params = sht["params"]
  discriminators = {"appearance": params["appearance"], "shape": params["shape"]}
  d_loss, d_grads = jax.value_and_grad(setup.sht.discriminator_loss)(
      discriminators, sht_outputs["faces"])
  updates, opt_state = setup.sht_tx.update({"generator": generator_grads, **d_grads},
                                           sht["opt_state"], params)
  new = {"params": optax.apply_updates(params, updates),
         "batch_stats": sht_outputs["batch_stats"], "opt_state": opt_state}
  return new, {**aux, "discriminator_loss": d_loss}


def make_train_step(setup: Setup, ema_decay: float, frozen_batch_norm: bool = False) -> Callable:
  """The jitted step (state, batch) -> (state, metrics); the state is donated.

  The batch holds uint8 images (B, S, S, 3), landmarks (B, 124, 2) in input
  pixels, the supervision mask (B, 124) and dataset ids (B,). Targets are
  rendered on device. Metrics: total loss, per-dataset losses, weights and
  presence, gradient global norm and the learning rate used.

  `frozen_batch_norm`: the forward runs in eval mode, as the FGTBT authors'
  model did from step 500 on (`train.freeze_batch_norm_after_step`):
  BatchNorm normalises with its running statistics and leaves them as they
  are (its scale and bias still learn), head dropout and stochastic depth
  are off.
  """
  tx, loss_config, schedule = setup.tx, setup.loss_config, setup.schedule
  loss_fn = train_loss(setup, frozen_batch_norm)
  bias_correction = bool(setup.config.train.ema_bias_correction)

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    trainable = {"model": state.params, "balancer": state.balancer_params}
    if state.sht:
      trainable["generator"] = state.sht["params"]["generator"]
    (total, (aux, batch_stats, sht_outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, state.batch_stats, state.balancer_state, dropout_rng, batch, state.sht)
    new_sht = state.sht
    if state.sht:  # FPTN: the generator by the loss above, the discriminators by theirs.
      new_sht, aux = sht_update(setup, state.sht, grads.pop("generator"), sht_outputs, aux)
      trainable.pop("generator")
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    decay = ema_step_decay(ema_decay, state.step + 1, bias_correction)
    new_state = state.replace(
        step=state.step + 1, params=trainable["model"], batch_stats=batch_stats,
        opt_state=opt_state, balancer_params=trainable["balancer"],
        ema_params=_ema(state.ema_params, trainable["model"], decay),
        ema_batch_stats=_ema(state.ema_batch_stats, batch_stats, decay),
        balancer_state=losses.update_balancer_state(
            loss_config, state.balancer_state, aux["dataset_loss"], aux["present"], state.step),
        sht=new_sht)
    metrics = {"loss": total, "grad_norm": optax.tree.norm(grads["model"]),
               "learning_rate": schedule(state.step), **aux}
    return new_state, metrics

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  batch_shardings = {k: sharding.batch_sharding(setup.mesh) for k in TRAIN_BATCH_KEYS}
  jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_shardings),
                   out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
  return sharding.CompiledPerShape(
      jitted, "train step" + (" (frozen BatchNorm)" if frozen_batch_norm else ""),
      setup.mesh, setup.rules)


# -----------------------------------------------------------------------------
# The loop.


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self) -> bool:
    """Whether any process got a signal (all processes agree on the answer)."""
    return sharding.any_process(self.received is not None)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class DiskFullError(OSError):
  """The workdir's disk filled up; training stopped, its last good checkpoint kept."""


def _close(things: list[tuple[str, Any]], quiet: bool) -> None:
  """Closes each (name, object); with `quiet` (already failing) a failure is logged, not raised."""
  for name, thing in things:
    close = getattr(thing, "close", None)
    if close is None:
      continue
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if not quiet:
        raise
      logging.warning("closing the %s after the failure: %s", name, " ".join(str(e).split())[:300])


def _check_finite(metrics: Mapping[str, Any], step: int,
                  checkpoints: checkpointing.Checkpointer) -> float:
  """The loss of the step that produced train state `step`; raises if not finite."""
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    checkpoints.wait_until_finished()
    last = checkpoints.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpoints.directory / 'latest'}"
             if last is not None else "no checkpoint was saved before it")
    raise NonFiniteLossError(
        f"training loss is {loss} at step {step}; stopped ({where}). Lower "
        f"optimizer.learning_rate or set optimizer.grad_clip_norm.")
  return loss


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       config_name: str | None = None) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  Returns the final metrics: for each dataset {"nme", "baseline_nme", "fr",
  "auc"} (NME as a fraction), plus "steps" trained in total and
  "wall_time_s" of this call; also written to `<workdir>/final_metrics.json`.
  When stopped by SIGTERM/SIGINT it saves a checkpoint and returns
  {"stopped_at_step": step, "signal": signal number} without the final
  evaluation. The workdir is locked for the run (`rundir.WorkdirLock`):
  a second trainer on it stops at start with the holder's pid and host.
  `config_name` (the config file, e.g. "configs/default.py") names the run
  in the opening summary line (`run_summary`).
  """
  start_time = time.time()
  sharding.initialize_distributed(config.distributed)
  validate_config(config)
  workdir = pathlib.Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  lock = rundir.WorkdirLock(workdir)
  if jax.process_index() == 0:  # The processes of one run are one trainer.
    try:
      lock.acquire()
    except rundir.WorkdirError:
      sharding.any_process(True)
      raise
  if sharding.any_process(False):
    raise rundir.WorkdirError(f"{workdir}: process 0 could not lock the workdir")
  try:
    return _train_and_evaluate(config, workdir, start_time, config_name)
  finally:
    lock.release()


def global_batch_size(config: ml_collections.ConfigDict) -> int:
  """Images per training step, over all processes: k samples of each dataset."""
  return int(config.data.samples_per_dataset) * len(config.data.datasets)


def run_summary(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                config_name: str | None = None) -> str:
  """The one line a training run opens with; the full config is `<workdir>/config.json`.

  E.g. "run configs/default.py: model tiny at 64 px, float32; data WFLW, 300W,
  COFW, AFLW (synthetic); 1200 steps x 8 images; 1 cpu device (mesh data 1 x
  fsdp 1); workdir runs/default (full config: runs/default/config.json)".
  """
  data, shown = config.data, rundir.shown_path(workdir)
  devices = jax.device_count()
  try:
    mesh = sharding.mesh_shape(config.mesh, devices)
  except ValueError:  # Named by the mesh's own check when it is built.
    mesh = (config.mesh.data, config.mesh.fsdp)
  where = "synthetic" if config.synthetic_data.generate else str(data.data_dir)
  return (f"run{' ' + str(config_name) if config_name else ''}: model {config.model.variant} "
          f"at {int(data.image_size)} px, {config.model.dtype}; data "
          f"{', '.join(data.datasets)} ({where}); {int(config.train.steps)} steps x "
          f"{global_batch_size(config)} images; {devices} {jax.devices()[0].platform} "
          f"device{'s' if devices > 1 else ''}"
          f"{f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''} "
          f"(mesh data {mesh[0]} x fsdp {mesh[1]}); workdir {shown} (full config: "
          f"{pathlib.Path(shown) / rundir.CONFIG_FILE})")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        start_time: float, config_name: str | None = None) -> dict:
  # One line; the config in full is written to <workdir>/config.json below.
  logging.info("%s", run_summary(config, workdir, config_name))
  prepare.prepare_data(config.data, config.synthetic_data)
  synthetic = prepare.synthetic_datasets(config.data)
  kinds = prepare.data_kinds(config.data)

  setup = build_setup(config)
  table, total_params = parameter_table(setup.boxed_params)
  logging.info("model %s: %s parameters", config.model.variant, f"{total_params:,}")
  logging.debug("parameters per module:\n%s", table)

  checkpoints = checkpointing.Checkpointer.for_run(config, workdir)
  try:
    _check_resume(config, workdir, checkpoints.latest_step())
    if config.train.init_from and checkpoints.latest_step() is None:
      init_source(config.train.init_from)  # A bad source fails before the data is read.
  except ConfigError:
    checkpoints.close()
    raise
  train_iterator = pipeline.make_train_iterator(
      config.data, process_index=jax.process_index(), process_count=jax.process_count())
  evaluator = evaluate.Evaluator(config, setup.model, setup.mesh, setup.rules)
  writer = MetricWriter(workdir)
  failed = False
  try:
    state = _restore_or_init(config, setup, checkpoints, train_iterator)
    start_step = int(jax.device_get(state.step))
    if jax.process_index() == 0:
      _record_config(config, workdir, start_step)
      # The own datasets' point schemes, for predict without the data (#32).
      schemes.write_run_schemes(workdir, config.data)
    # Rows of steps after the one resumed from (lost with the process that
    # wrote them) are dropped, so each step has one row.
    writer.discard_after(start_step)
    decay = ema_decay_per_step(config)
    _warn_short_plain_average(config, decay)
    freeze_after = int(config.train.freeze_batch_norm_after_step)
    train_step = make_train_step(setup, decay)
    # Compiled on its first call only.
    frozen_step = make_train_step(setup, decay, frozen_batch_norm=True) if freeze_after else None
    result = _train_loop(config, setup, state, start_step, train_step, train_iterator,
                         checkpoints, evaluator, writer, frozen_step=frozen_step,
                         freeze_after=freeze_after)
  except Exception as e:
    failed = True
    if not errors.is_disk_full(e):
      raise
    last = checkpoints.latest_step()
    raise DiskFullError(
        f"{workdir}: the disk is full ({' '.join(str(e).split())[:200]}); training stopped. "
        + (f"The last good checkpoint is step {last} in {checkpoints.directory / 'latest'}; "
           if last is not None else "No checkpoint was saved; ")
        + "free space and run the same command again to resume") from None
  finally:
    _close([("checkpoints", checkpoints), ("metric writer", writer),
            ("data iterator", train_iterator)], quiet=failed)
  if "stopped_at_step" not in result:
    result["synthetic"] = sorted(synthetic)
    result["data"] = kinds
    result["failure_threshold"] = float(config.eval.failure_threshold)
    result["wall_time_s"] = time.time() - start_time
    if jax.process_index() == 0:
      (workdir / "final_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
  return result


# What a resumed run must keep: the batch, the datasets and their ids, the
# input geometry, and every field of the sections that define the function
# trained (the network and the loss) but the compute forms of
# `models.COMPUTE_FIELDS`. `train.resume_with_changes` lets a run go on
# anyway (the changed config is recorded beside config.json).
RESUME_FIXED = ("data.datasets", "data.samples_per_dataset", "data.image_size",
                "data.crop_enlarge")
RESUME_FIXED_SECTIONS = ("model", "loss")


def resume_changes(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  """"key old -> new" for each fixed field (`RESUME_FIXED`, `RESUME_FIXED_SECTIONS`)
  that differs between two flat configs; a field the saved config predates is
  not compared (the upgrade of old configs fills the model's)."""
  keys = list(RESUME_FIXED) + sorted(
      key for key in set(saved) & set(wanted)
      if key.partition(".")[0] in RESUME_FIXED_SECTIONS
      and not (key.startswith("model.") and key.partition(".")[2] in models.COMPUTE_FIELDS))
  return [f"{key} {saved.get(key)!r} -> {wanted.get(key)!r}" for key in keys
          if saved.get(key) != wanted.get(key)]


def _check_resume(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  latest: int | None) -> None:
  """Refuses, before anything is written, a resume the config does not allow or cannot continue.

  Raises ConfigError when the workdir holds checkpoints and `train.resume`
  is off, or when a fixed field (`resume_changes`) differs from the run's
  saved config (unless `train.resume_with_changes`), naming the fields.
  """
  if latest is None:
    return
  if not config.train.resume:
    raise ConfigError(
        f"{workdir / rundir.CHECKPOINTS_DIR} already holds checkpoints (latest step "
        f"{latest}) and train.resume is False; use another workdir or --config.train.resume=True")
  if latest > config.train.steps:
    raise ConfigError(
        f"train.steps={config.train.steps} is below step {latest} of the checkpoint in "
        f"{workdir / rundir.CHECKPOINTS_DIR}: nothing to train. Raise train.steps to "
        "go on, or evaluate it with `run.py eval`")
  if not (workdir / rundir.CONFIG_FILE).is_file():
    return
  saved = rundir.flat_config(rundir.load_run_config(workdir))
  wanted = rundir.flat_config(config)
  changed = resume_changes(saved, wanted)
  if changed and not config.train.resume_with_changes:
    raise ConfigError(
        f"{workdir} resumes from step {latest}, but the config changes what the run was "
        f"trained with: {'; '.join(changed)}. Use another workdir, or "
        "--config.train.resume_with_changes=True to go on with the change")
  if changed:
    logging.warning("resuming from step %d with changes (train.resume_with_changes): %s",
                    latest, "; ".join(changed))


def _record_config(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                   start_step: int) -> None:
  """Writes config.json of a new run; a resumed run's is kept, a changed config goes beside it.

  A resume whose config differs from config.json (say, more steps) writes
  `config.resumed_at_<step>.json`, so config.json stays the config the
  checkpoints were made with.
  """
  path = workdir / rundir.CONFIG_FILE
  if start_step == 0 or not path.is_file():
    rundir.write_run_config(config, workdir)
    return
  saved = rundir.flat_config(rundir.load_run_config(workdir))
  if saved != rundir.flat_config(config):
    written = rundir.write_run_config(config, workdir,
                                             name=f"config.resumed_at_{start_step}.json")
    logging.info("resumed with another config than %s; recorded in %s", path, written)


def _restore_or_init(config, setup: Setup, checkpoints: checkpointing.Checkpointer,
                     train_iterator) -> TrainState:
  latest = checkpoints.latest_step()
  if latest is not None:  # `_check_resume` allowed it.
    state, step = checkpoints.restore(setup.abstract_state, train_iterator, quarantine=True)
    logging.info("resumed from step %d (%s)", step, checkpoints.directory / "latest")
    return state
  state = create_train_state(setup, config.seed)
  if config.train.init_from:
    state, summary = initialize_from(state, setup, config.train.init_from)
    logging.info("%s", summary)
  return state


def init_source(workdir: str | os.PathLike) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
  """The run `train.init_from` names, `workdir`: (its config, its path).

  Raises ConfigError naming train.init_from when it is no run's workdir or
  holds no train-state checkpoint.
  """
  where = pathlib.Path(workdir).expanduser()
  try:
    other = rundir.load_run_config(where)
  except (rundir.WorkdirError, OSError, ValueError) as e:
    raise ConfigError(f"train.init_from={str(where)!r} is not a run's workdir: {e}") from None
  checkpoints = checkpointing.Checkpointer.for_run(other, where, enable_async=False)
  try:
    if checkpoints.latest_step() is None:
      raise ConfigError(f"train.init_from={str(where)!r} holds no train-state checkpoint "
                        f"(under {checkpoints.directory / 'latest'})")
  finally:
    checkpoints.close()
  return other, where


def initialize_from(state: TrainState, setup: Setup, workdir: str | os.PathLike
                    ) -> tuple[TrainState, str]:
  """`state` with the deployed (EMA) model of another run's latest step copied in.

  Every parameter and BatchNorm statistic whose name and shape this model
  shares is copied (into the trained and the EMA copies); the others keep
  their initialisation: a part the other run lacks (DHLN's stream on a
  trained FGTBT, zero-initialised so the network starts as that FGTBT), and
  FPTN and the optimizer, which start fresh. SHT's recipe: DHLN trained
  first, then SHT fine-tuned from it (docs/model.md). Returns the state and
  a one-line summary of what was copied, kept and left out.

  Raises ConfigError naming train.init_from: a variable of the same name
  with another shape (another network), or none shared.
  """
  other, where = init_source(workdir)
  [restored] = inference.restore_models(other, where, "latest", setup.mesh, setup.rules)
  copied, fresh, left_out = [], [], []

  def merge(ours, theirs):
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(theirs)}
    used = set()

    def take(path, leaf):
      name = jax.tree_util.keystr(path)
      if name not in flat:
        fresh.append(name)
        return leaf
      value = flat[name]
      used.add(name)
      if value.shape != leaf.shape:
        raise ConfigError(f"train.init_from={str(where)!r}: {name} is {tuple(value.shape)} "
                          f"there and {tuple(leaf.shape)} here (another network)")
      copied.append(name)
      return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

    merged = jax.tree_util.tree_map_with_path(take, ours)
    left_out.extend(sorted(set(flat) - used))
    return merged

  params = merge(state.params, restored.variables["params"])
  batch_stats = merge(state.batch_stats, restored.variables["batch_stats"])
  if not copied:
    raise ConfigError(f"train.init_from={str(where)!r}: its model shares no variable with "
                      "this one")
  state = state.replace(params=params, batch_stats=batch_stats, ema_params=params,
                        ema_batch_stats=batch_stats)

  def names(paths):
    shown = sorted({p.rsplit("']", 2)[0] + "']" for p in paths})
    return ", ".join(shown[:4]) + (f", ... ({len(shown)} modules)" if len(shown) > 4 else "")

  summary = (f"initialised from {where} (step {restored.step}'s EMA model): {len(copied)} "
             f"arrays copied, {len(fresh)} kept as initialised"
             + (f" ({names(fresh)})" if fresh else "")
             + f", {len(left_out)} not in this model" + (f" ({names(left_out)})" if left_out else ""))
  return state, summary


def _evaluate(evaluator: "evaluate.Evaluator", writer: MetricWriter, state: TrainState,
              step: int, checkpoints: checkpointing.Checkpointer,
              best_on_subsets: tuple[str, ...] = ()) -> dict:
  """Evaluates the EMA model, records the results and keeps the best models
  (by the full split's NME, or a subset's: `eval.best_on_subsets`)."""
  results, _ = evaluator.evaluate(state.ema_variables(), step)
  writer.write("eval", step, evaluate.flatten(results))
  writer.flush()
  evaluate.log_results(step, results)
  checkpoints.save_best(step, state.ema_variables(),
                        evaluate.nme_by_dataset(results, best_on_subsets))
  return results


def _train_loop(config, setup: Setup, state: TrainState, start_step: int, train_step,
                train_iterator: Iterator, checkpoints: checkpointing.Checkpointer,
                evaluator: "evaluate.Evaluator", writer: MetricWriter,
                frozen_step: Callable | None = None, freeze_after: int = 0) -> dict:
  """Steps from `start_step` to `train.steps`: `frozen_step` instead of
  `train_step` from step `freeze_after` on (when given)."""
  train = config.train
  batches = sharding.GlobalBatches(train_iterator, sharding.batch_sharding(setup.mesh),
                                   TRAIN_BATCH_KEYS)
  names = config.data.datasets
  best_on_subsets = tuple(config.eval.best_on_subsets)
  log_start, log_step = time.time(), start_step
  previous = None
  images_per_step = global_batch_size(config)
  # Steps dispatched, from the one resumed at; the loss and images/s of the
  # last metric line ride along. Process 0 only.
  bar = errors.progress_bar(total=train.steps, initial=start_step, desc="train", unit="step",
                            enabled=jax.process_index() == 0)
  logs = contextlib.nullcontext() if bar.disable else errors.logs_above_bars()
  with bar, logs, _StopSignal() as stop:
    for step in range(start_step, train.steps):
      if stop.requested():
        checkpoints.save(step, state, train_iterator, force=True)
        checkpoints.wait_until_finished()
        logging.warning("signal %s: saved step %d to %s and stopped", stop.received, step,
                        checkpoints.directory / "latest")
        # Another process's signal stops this one too: report it as SIGTERM.
        return {"stopped_at_step": step, "signal": int(stop.received or signal.SIGTERM)}
      batch = next(batches)
      step_fn = train_step
      if frozen_step is not None and step >= freeze_after:
        if step == max(start_step, freeze_after):
          logging.info("from step %d on: BatchNorm on frozen statistics, dropout and "
                       "stochastic depth off (train.freeze_batch_norm_after_step)", step)
        step_fn = frozen_step
      with jax.transfer_guard("disallow" if train.transfer_guard else "allow"):
        state, metrics = step_fn(state, batch)
      if previous is not None:
        _check_finite(previous, step, checkpoints)
      previous = metrics
      done = step + 1
      bar.update(1)
      if done % train.log_every == 0 or done == train.steps:
        loss = _check_finite(metrics, done, checkpoints)
        host = jax.device_get(metrics)
        rate = (done - log_step) / max(time.time() - log_start, 1e-9)
        log_start, log_step = time.time(), done
        per_dataset = {n: float(host["dataset_loss"][landmarks.get_protocol(n).dataset_id])
                       for n in names}
        writer.write("train", done, {"loss": loss, "grad_norm": float(host["grad_norm"]),
                                   "learning_rate": float(host["learning_rate"]),
                                   "steps_per_second": rate,
                                   **{f"loss/{n}": v for n, v in per_dataset.items()}})
        bar.set_postfix_str(f"{rate * images_per_step:.1f} images/s, loss {loss:.4f}",
                            refresh=False)
        logging.info("step %d/%d  loss %.5f  %s  lr %.3g  %.2f steps/s  %.1f images/s", done,
                     train.steps, loss, "  ".join(f"{n} {v:.4f}" for n, v in per_dataset.items()),
                     float(host["learning_rate"]), rate, rate * images_per_step)
      if done % train.checkpoint_every == 0 and done < train.steps:
        _check_finite(metrics, done, checkpoints)
        checkpoints.save(done, state, train_iterator)
      if done % train.eval_every == 0 and done < train.steps:
        _evaluate(evaluator, writer, state, done, checkpoints, best_on_subsets)
  final_step = int(jax.device_get(state.step))
  if previous is not None:
    _check_finite(previous, final_step, checkpoints)
  checkpoints.save(final_step, state, train_iterator, force=True)
  results = _evaluate(evaluator, writer, state, final_step, checkpoints, best_on_subsets)
  final = evaluate.final_table(results)
  final["steps"] = final_step
  return final
