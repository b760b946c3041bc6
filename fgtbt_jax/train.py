"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One jitted step trains the model on a mixed batch (k samples from each
dataset) with the FMB-loss, updates the EMA copy of the weights and batch
statistics, and returns the loss and per-dataset losses. Around it:

* a device mesh ("data", "fsdp") built from the config; parameters and
  optimizer state are sharded from the model's logical axis names with the
  rules table in the config, and created directly sharded (abstract shapes
  first, then `jax.jit(init, out_shardings=...)`);
* process-local batches from the grain pipeline assembled into global arrays
  with `jax.make_array_from_process_local_data` (multi-host ready;
  `jax.distributed.initialize` runs when the config or the environment names
  a coordinator);
* Orbax checkpoints of the train state and the data iterator, resumed from
  the latest on restart, saved on SIGTERM/SIGINT before a clean exit;
* evaluation of the EMA model every `eval_every` steps and at the end, with
  the best EMA checkpoint per dataset kept;
* safety rails: config validation before any work, a loud stop on a
  non-finite loss (the last good checkpoint stays), a parameter table and
  the config in the log, and the transfer guard around the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import convert
from data_pipelines import pipeline
from data_pipelines import tfds_builders
from fgtbt_jax import checkpointing
from fgtbt_jax import evaluate
from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax.models import partitioning

# The keys of a training batch that the step reads.
TRAIN_BATCH_KEYS = ("image", "landmarks", "mask", "dataset_id")


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes, as one pytree.

  `step` counts completed steps. The optimizer updates the model `params`
  and the loss balancer's learnable `balancer_params` together
  (`opt_state` is over {"model": params, "balancer": balancer_params}).
  `rng` is a fixed key; each step folds its step number in.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  balancer_params: Any
  balancer_state: Any
  rng: jax.Array

  def ema_variables(self) -> dict:
    return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


# -----------------------------------------------------------------------------
# Configuration checks.


class ConfigError(ValueError):
  """A config value that cannot work, named with its key."""


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    process_count: int | None = None) -> None:
  """Checks the config before any work starts; raises ConfigError naming the key.

  Args:
    config: the full experiment config.
    num_devices: global device count (default: jax.device_count()).
    process_count: number of processes (default: jax.process_count()).
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  opt, train, data = config.optimizer, config.train, config.data
  try:
    models.validate_model_config(config.model)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if not opt.learning_rate > 0:
    raise ConfigError(f"optimizer.learning_rate must be positive, got {opt.learning_rate}")
  if opt.weight_decay < 0:
    raise ConfigError(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
  if opt.grad_clip_norm < 0:
    raise ConfigError(f"optimizer.grad_clip_norm must be >= 0 (0 = off), got {opt.grad_clip_norm}")
  if not 0 < opt.lr_decay_factor <= 1:
    raise ConfigError(f"optimizer.lr_decay_factor must be in (0, 1], got {opt.lr_decay_factor}")
  if list(opt.lr_decay_steps) != sorted(opt.lr_decay_steps) or any(
      s <= 0 for s in opt.lr_decay_steps):
    raise ConfigError(f"optimizer.lr_decay_steps must be increasing positive steps, "
                      f"got {tuple(opt.lr_decay_steps)}")
  try:
    losses.LossConfig.from_config(config.loss, len(landmarks.PROTOCOL_NAMES))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  for key in ("steps", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints"):
    if train[key] < 1:
      raise ConfigError(f"train.{key} must be at least 1, got {train[key]}")
  if not train.ema_half_life_images > 0:
    raise ConfigError(f"train.ema_half_life_images must be positive, got {train.ema_half_life_images}")
  if config.model.input_size != data.image_size:
    raise ConfigError(f"data.image_size ({data.image_size}) must equal model.input_size "
                      f"({config.model.input_size})")
  unknown = [d for d in data.datasets if d not in landmarks.PROTOCOL_NAMES]
  if unknown or not data.datasets:
    raise ConfigError(f"data.datasets must be a non-empty subset of {landmarks.PROTOCOL_NAMES}, "
                      f"got {tuple(data.datasets)}")
  if data.samples_per_dataset < 1:
    raise ConfigError(f"data.samples_per_dataset must be at least 1, got {data.samples_per_dataset}")
  if data.samples_per_dataset % process_count:
    raise ConfigError(
        f"data.samples_per_dataset ({data.samples_per_dataset}) must divide by the number of "
        f"processes ({process_count}): each process feeds the same share of every dataset")
  global_batch = data.samples_per_dataset * len(data.datasets)
  if global_batch % num_devices:
    raise ConfigError(
        f"the global batch (data.samples_per_dataset {data.samples_per_dataset} x "
        f"{len(data.datasets)} datasets = {global_batch}) must divide by the number of "
        f"devices ({num_devices})")
  if data.eval_batch_size % num_devices:
    raise ConfigError(f"data.eval_batch_size ({data.eval_batch_size}) must divide by the number "
                      f"of devices ({num_devices})")
  try:
    sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if config.eval.decoder not in evaluate.DECODERS:
    raise ConfigError(f"eval.decoder must be one of {evaluate.DECODERS}, got {config.eval.decoder!r}")
  if not str(data.data_dir):
    raise ConfigError("data.data_dir is required: the directory of converted datasets "
                      "(see data_pipelines/convert.py)")


# -----------------------------------------------------------------------------
# Devices: distributed start-up and batches.


def initialize_distributed(distributed_config: ml_collections.ConfigDict) -> bool:
  """Starts jax.distributed when the config or the environment asks for it.

  The coordinator comes from `distributed.coordinator_address` or the
  JAX_COORDINATOR_ADDRESS variable; the process count and id from the config
  (> 0 / >= 0) or JAX_NUM_PROCESSES / JAX_PROCESS_ID; with
  `distributed.auto_detect` JAX reads a supported cluster environment (TPU
  pods, SLURM, ...). Must run before anything touches a JAX backend.
  Returns whether the distributed system is (now) initialized.
  """
  if jax.distributed.is_initialized():
    return True
  address = distributed_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not address and not distributed_config.auto_detect:
    return False
  num_processes = distributed_config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
  process_id = distributed_config.process_id
  if process_id < 0:
    process_id = int(os.environ.get("JAX_PROCESS_ID", -1))
  jax.distributed.initialize(
      coordinator_address=address or None,
      num_processes=num_processes or None,
      process_id=process_id if process_id >= 0 else None)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def feed_batch(local_batch: Mapping[str, np.ndarray], batch_sharding: NamedSharding) -> dict:
  """The step's global batch from this process's numpy batch (the keys it reads)."""
  return sharding.global_batch(local_batch, batch_sharding, TRAIN_BATCH_KEYS)


# -----------------------------------------------------------------------------
# Optimizer, EMA and state creation.


def make_optimizer(opt_config: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the paper's step decay, optional warmup and gradient clipping.

  The learning rate is multiplied by `lr_decay_factor` at each of
  `lr_decay_steps`. Weight decay applies to the model (as PyTorch AdamW does
  to every parameter) but not to the loss balancer's log-variances.
  """
  boundaries = {int(s): float(opt_config.lr_decay_factor) for s in opt_config.lr_decay_steps}
  schedule = optax.piecewise_constant_schedule(float(opt_config.learning_rate), boundaries)
  if opt_config.warmup_steps > 0:
    warmup = optax.linear_schedule(0.0, float(opt_config.learning_rate), opt_config.warmup_steps)
    decayed = schedule

    def schedule(step):
      # The decay steps stay absolute (optax.join_schedules would shift them).
      return jnp.where(step < opt_config.warmup_steps, warmup(step), decayed(step))

  adamw = optax.adamw(
      learning_rate=schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
      weight_decay=opt_config.weight_decay,
      mask=lambda tree: {"model": jax.tree.map(lambda _: True, tree["model"]),
                         "balancer": jax.tree.map(lambda _: False, tree["balancer"])})
  if opt_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), adamw), schedule
  return adamw, schedule


def ema_decay_per_step(config: ml_collections.ConfigDict) -> float:
  """0.5 ** (images per step / half-life in images) (paper: 0.5 ** (8 / 10000))."""
  images = config.data.samples_per_dataset * len(config.data.datasets)
  return 0.5 ** (images / config.train.ema_half_life_images)


def _ema(average: Any, value: Any, decay: float) -> Any:
  return jax.tree.map(lambda a, v: decay * a + (1.0 - decay) * v, average, value)


@dataclasses.dataclass
class Setup:
  """The pieces of a run built once from the config."""

  config: ml_collections.ConfigDict
  model: nn.Module
  mesh: Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loss_config: losses.LossConfig
  state_shardings: Any
  abstract_state: Any      # ShapeDtypeStructs with shardings, unboxed
  boxed_params: Any        # abstract params with their logical-name boxes


def _init_state_fn(model: nn.Module, tx, loss_config: losses.LossConfig, image_size: int):
  """A function rng -> TrainState with logical boxes on model variables."""

  def init(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, images, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    balancer_params, balancer_state = losses.init_balancer(loss_config)
    opt_state = tx.init({"model": params, "balancer": balancer_params})
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=opt_state, ema_params=params, ema_batch_stats=batch_stats,
        balancer_params=balancer_params, balancer_state=balancer_state, rng=state_rng)

  return init


def build_setup(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Setup:
  """Model, optimizer, mesh and abstract (sharded) train state for a config."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.logical_rules(config.mesh.logical_axis_rules)
  model = models.build_model(config.model)
  tx, schedule = make_optimizer(config.optimizer)
  loss_config = losses.LossConfig.from_config(config.loss, len(landmarks.PROTOCOL_NAMES))
  init = _init_state_fn(model, tx, loss_config, config.data.image_size)
  with sharding.mesh_and_rules(mesh, rules):
    boxed_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_shardings = partitioning.variable_shardings(boxed_state, mesh, rules)
  unboxed = nn.meta.unbox(boxed_state)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, state_shardings)
  return Setup(config=config, model=model, mesh=mesh, rules=rules, tx=tx, schedule=schedule,
               loss_config=loss_config, state_shardings=state_shardings,
               abstract_state=abstract_state, boxed_params=boxed_state.params)


def create_train_state(setup: Setup, seed: int) -> TrainState:
  """A freshly initialised train state, created directly in its shardings."""
  init = _init_state_fn(setup.model, setup.tx, setup.loss_config, setup.config.data.image_size)
  create = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=setup.state_shardings)
  return sharding.CompiledOnFirstCall(create, "init", setup.mesh, setup.rules)(
      jax.random.PRNGKey(seed))


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


def make_train_step(setup: Setup, ema_decay: float) -> Callable:
  """The jitted step (state, batch) -> (state, metrics); the state is donated.

  The batch holds uint8 images (B, S, S, 3), landmarks (B, 124, 2) in input
  pixels, the supervision mask (B, 124) and dataset ids (B,). Targets are
  rendered on device. Metrics: total loss, per-dataset losses, weights and
  presence, gradient global norm and the learning rate used.
  """
  model, tx, loss_config, schedule = setup.model, setup.tx, setup.loss_config, setup.schedule

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    images = models.normalize_images(batch["image"])

    def loss_fn(trainable):
      variables = {"params": trainable["model"], "batch_stats": state.batch_stats}
      heatmaps, updates = model.apply(variables, images, train=True,
                                      rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
      height, width = heatmaps.shape[1:3]
      stride = images.shape[1] / height
      target = losses.render_targets(batch["landmarks"], batch["mask"], height, width,
                                     loss_config.sigma, stride, loss_config.rounded_targets)
      total, aux = losses.fmb_loss(loss_config, heatmaps, target, batch["mask"],
                                   batch["dataset_id"], trainable["balancer"],
                                   state.balancer_state)
      return total, (aux, updates.get("batch_stats", {}))

    trainable = {"model": state.params, "balancer": state.balancer_params}
    (total, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(
        step=state.step + 1, params=trainable["model"], batch_stats=batch_stats,
        opt_state=opt_state, balancer_params=trainable["balancer"],
        ema_params=_ema(state.ema_params, trainable["model"], ema_decay),
        ema_batch_stats=_ema(state.ema_batch_stats, batch_stats, ema_decay),
        balancer_state=losses.update_balancer_state(
            loss_config, state.balancer_state, aux["dataset_loss"], aux["present"], state.step))
    metrics = {"loss": total, "grad_norm": optax.tree.norm(grads["model"]),
               "learning_rate": schedule(state.step), **aux}
    return new_state, metrics

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  batch_shardings = {k: sharding.batch_sharding(setup.mesh) for k in TRAIN_BATCH_KEYS}
  jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_shardings),
                   out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
  return sharding.CompiledOnFirstCall(jitted, "train step", setup.mesh, setup.rules)


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


def _save_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Makes sure every configured dataset is converted under data.data_dir.

  With `synthetic_data.generate` the synthetic stand-ins are rendered and
  converted there on first use (process 0 writes, the others wait).
  """
  data_dir = pathlib.Path(config.data.data_dir)
  if config.synthetic_data.generate:
    if jax.process_index() == 0:
      logging.info("synthetic datasets: %s (generated on first use)", data_dir)
      convert.convert_synthetic(
          data_dir, {k: tuple(v) for k, v in config.synthetic_data.sizes.items()},
          seed=config.synthetic_data.seed, image_size=config.synthetic_data.image_size)
    sharding.barrier("synthetic data ready")
  if not data_dir.is_dir():
    raise ConfigError(f"data.data_dir {str(data_dir)!r} is not a directory; convert the "
                      f"datasets there first (python -m data_pipelines.convert --out DIR)")
  for name in config.data.datasets:
    try:
      tfds_builders.converted_dir(data_dir, name, config.data.crop_config)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"data.data_dir: {e}") from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  Returns the final metrics: for each dataset {"nme", "baseline_nme", "fr",
  "auc"} (NME as a fraction), plus "steps" trained in total and
  "wall_time_s" of this call; also written to `<workdir>/final_metrics.json`.
  When stopped by SIGTERM/SIGINT it saves a checkpoint and returns
  {"stopped_at_step": step} without the final evaluation.
  """
  start_time = time.time()
  initialize_distributed(config.distributed)
  validate_config(config)
  workdir = pathlib.Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("workdir: %s\nconfig: %s", workdir, config.to_json_best_effort(indent=2))
  _save_config(config, workdir)
  prepare_data(config)

  setup = build_setup(config)
  table, total_params = parameter_table(setup.boxed_params)
  logging.info("model %s: %s parameters\n%s", config.model.variant, f"{total_params:,}", table)

  train_iterator = pipeline.make_train_iterator(
      config.data, process_index=jax.process_index(), process_count=jax.process_count())
  checkpoints = checkpointing.Checkpointer.for_run(config, workdir)
  evaluator = evaluate.Evaluator(config, setup.model, setup.mesh, setup.rules, workdir)
  try:
    state = _restore_or_init(config, setup, checkpoints, train_iterator)
    start_step = int(jax.device_get(state.step))
    train_step = make_train_step(setup, ema_decay_per_step(config))
    result = _train_loop(config, setup, state, start_step, train_step, train_iterator,
                         checkpoints, evaluator, workdir)
  finally:
    checkpoints.close()
    evaluator.close()
    close = getattr(train_iterator, "close", None)
    if close is not None:
      close()
  if "stopped_at_step" not in result:
    result["wall_time_s"] = time.time() - start_time
    if jax.process_index() == 0:
      (workdir / "final_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
  return result


def _restore_or_init(config, setup: Setup, checkpoints: checkpointing.Checkpointer,
                     train_iterator) -> TrainState:
  latest = checkpoints.latest_step()
  if config.train.resume and latest is not None:
    state, step = checkpoints.restore(setup.abstract_state, train_iterator)
    logging.info("resumed from step %d (%s)", step, checkpoints.directory / "latest")
    return state
  if latest is not None:
    raise ConfigError(
        f"{checkpoints.directory} already holds checkpoints (latest step {latest}) and "
        f"train.resume is False; use another workdir or --config.train.resume=True")
  return create_train_state(setup, config.seed)


def _train_loop(config, setup: Setup, state: TrainState, start_step: int, train_step,
                train_iterator: Iterator, checkpoints: checkpointing.Checkpointer,
                evaluator: "evaluate.Evaluator", workdir: pathlib.Path) -> dict:
  train = config.train
  batches = sharding.batch_sharding(setup.mesh)
  names = config.data.datasets
  log_start, log_step = time.time(), start_step
  previous = None
  with _StopSignal() as stop:
    for step in range(start_step, train.steps):
      if stop.requested():
        checkpoints.save(step, state, train_iterator, force=True)
        checkpoints.wait_until_finished()
        logging.warning("signal %s: saved step %d to %s and stopped", stop.received, step,
                        checkpoints.directory / "latest")
        return {"stopped_at_step": step}
      batch = feed_batch(next(train_iterator), batches)
      with jax.transfer_guard("disallow" if train.transfer_guard else "allow"):
        state, metrics = train_step(state, batch)
      if previous is not None:
        _check_finite(previous, step, checkpoints)
      previous = metrics
      done = step + 1
      if done % train.log_every == 0 or done == train.steps:
        loss = _check_finite(metrics, done, checkpoints)
        host = jax.device_get(metrics)
        rate = (done - log_step) / max(time.time() - log_start, 1e-9)
        log_start, log_step = time.time(), done
        per_dataset = {n: float(host["dataset_loss"][landmarks.get_protocol(n).dataset_id])
                       for n in names}
        evaluator.log_train(done, {"loss": loss, "grad_norm": float(host["grad_norm"]),
                                   "learning_rate": float(host["learning_rate"]),
                                   "steps_per_second": rate,
                                   **{f"loss/{n}": v for n, v in per_dataset.items()}})
        logging.info("step %d/%d  loss %.5f  %s  lr %.3g  %.2f steps/s", done, train.steps, loss,
                     "  ".join(f"{n} {v:.4f}" for n, v in per_dataset.items()),
                     float(host["learning_rate"]), rate)
      if done % train.checkpoint_every == 0 and done < train.steps:
        _check_finite(metrics, done, checkpoints)
        checkpoints.save(done, state, train_iterator)
      if done % train.eval_every == 0 and done < train.steps:
        results = evaluator.evaluate(state.ema_variables(), done)
        checkpoints.save_best(done, state.ema_variables(), evaluate.nme_by_dataset(results))
  final_step = int(jax.device_get(state.step))
  if previous is not None:
    _check_finite(previous, final_step, checkpoints)
  checkpoints.save(final_step, state, train_iterator, force=True)
  results = evaluator.evaluate(state.ema_variables(), final_step)
  checkpoints.save_best(final_step, state.ema_variables(), evaluate.nme_by_dataset(results))
  final = evaluate.final_table(results)
  final["steps"] = final_step
  return final


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                     checkpoint: str = "latest", samples: dict | None = None) -> dict:
  """Evaluates a run's EMA model from its checkpoints.

  Args:
    config: the run's config (run.py reads it from <workdir>/config.json).
    workdir: the run's directory.
    checkpoint: "latest" (the newest train state) or "best" (each dataset's
      best EMA checkpoint, evaluated on that dataset).
    samples: if given, filled with the per-image arrays of every dataset
      (`Evaluator.evaluate`), for `report.build_report`.

  Returns:
    {dataset: {"nme", "baseline_nme", "fr", "auc"}} and "steps": the step
    evaluated (for "best", {dataset: step}); also written to
    <workdir>/eval_<checkpoint>.json.
  """
  if checkpoint not in ("latest", "best"):
    raise ValueError(f"checkpoint must be 'latest' or 'best', got {checkpoint!r}")
  initialize_distributed(config.distributed)
  validate_config(config)
  workdir = pathlib.Path(workdir).resolve()
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir} holds no checkpoints/ directory: not a training workdir")
  prepare_data(config)
  setup = build_setup(config)
  checkpoints = checkpointing.Checkpointer.for_run(config, workdir)
  evaluator = evaluate.Evaluator(config, setup.model, setup.mesh, setup.rules, workdir)
  try:
    if checkpoint == "latest":
      state, step = checkpoints.restore(setup.abstract_state)
      results = evaluator.evaluate(state.ema_variables(), step, samples=samples)
      steps: Any = step
    else:
      abstract = {"params": setup.abstract_state.ema_params,
                  "batch_stats": setup.abstract_state.ema_batch_stats}
      results, steps = {}, {}
      for name in config.data.datasets:
        variables, steps[name] = checkpoints.restore_best(name, abstract)
        results.update(evaluator.evaluate(variables, steps[name], datasets=[name],
                                          samples=samples))
  finally:
    checkpoints.close()
    evaluator.close()
  final = evaluate.final_table(results)
  final["steps"] = steps
  if jax.process_index() == 0:
    (workdir / f"eval_{checkpoint}.json").write_text(json.dumps(final, indent=2) + "\n")
  return final
