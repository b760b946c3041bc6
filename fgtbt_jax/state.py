"""The train state of a run and how it is built: optimizer, abstract shapes, creation.

`build_setup(config)` makes, once per run, the model, the mesh, the
optimizer and the abstract train state: `jax.eval_shape` of the initialiser
gives the shapes and the logical-axis boxes, the model's rules turn those
into shardings, and `create_train_state` then creates the state directly in
them (`jax.jit(init, out_shardings=...)`), so no process ever holds a whole
unsharded copy. The same abstract state is the target of a checkpoint
restore. Inference does not need any of this: it restores the EMA
variables alone (`fgtbt_jax.inference.abstract_variables`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax.models import fptn
from fgtbt_jax.models import partitioning


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes, as one pytree.

  `step` counts completed steps. The optimizer updates the model `params`
  and the loss balancer's learnable `balancer_params` together
  (`opt_state` is over {"model": params, "balancer": balancer_params}).
  `rng` is a fixed key; each step folds its step number in. `ema_params`
  and `ema_batch_stats` are the exponential moving averages evaluated and
  deployed; a checkpoint can be read for them alone
  (`checkpointing.Checkpointer.restore_ema`).
  `sht` holds what only training with SHT's pose transfer needs (its own
  optimizer: FPTN is not part of the deployed network).
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
  # SHT's pose transfer (`config.sht`): {"params": FPTN's generator and two
  # discriminators, "batch_stats": the generator's, "opt_state": their Adam};
  # {} when off (no entries: checkpoints of runs without it are unchanged).
  sht: Any = flax.struct.field(default_factory=dict)

  def ema_variables(self) -> dict:
    return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


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


@dataclasses.dataclass
class Setup:
  """The pieces of a training run built once from the config."""

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
  # SHT's pose transfer and the optimizer of its networks (None when off).
  sht: fptn.PoseTransfer | None = None
  sht_tx: optax.GradientTransformation | None = None


# Folded into the init key for SHT's networks (the model's keys stay as they were).
SHT_INIT_STREAM = 0x5

def _init_state_fn(model: nn.Module, tx, loss_config: losses.LossConfig, image_size: int,
                   sht: fptn.PoseTransfer | None = None, sht_tx=None):
  """A function rng -> TrainState with logical boxes on model variables."""

  def init(rng):
    sht_state = {}
    if sht is not None:
      sht_state = sht.init(jax.random.fold_in(rng, SHT_INIT_STREAM), landmarks.NUM_UNIFIED)
      sht_state["opt_state"] = sht_tx.init(sht_state["params"])
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
        balancer_params=balancer_params, balancer_state=balancer_state, rng=state_rng,
        sht=sht_state)

  return init


def build_setup(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Setup:
  """Model, optimizer, mesh and abstract (sharded) train state for a config."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.logical_rules(config.mesh.logical_axis_rules)
  model = models.build_model(config.model)
  tx, schedule = make_optimizer(config.optimizer)
  # One dataset id per benchmark and per own dataset of the run (the loss's D).
  loss_config = losses.LossConfig.from_config(
      config.loss, landmarks.num_dataset_ids(config.data.datasets))
  sht, sht_tx = None, None
  if config.sht.enabled:
    sht = fptn.PoseTransfer.from_config(config.sht, models.compute_options(config.model))
    sht_tx = optax.adam(float(config.sht.learning_rate), b1=0.5, b2=0.999,
                        eps=float(config.optimizer.eps))
  init = _init_state_fn(model, tx, loss_config, config.data.image_size, sht, sht_tx)
  # An abstract key: no array is made, so the mesh's devices may be compile-only
  # (`fgtbt_jax.aot` builds the step for a TPU topology on a CPU host).
  abstract_key = jax.eval_shape(jax.random.PRNGKey, 0)
  with sharding.mesh_and_rules(mesh, rules):
    boxed_state = jax.eval_shape(init, abstract_key)
  state_shardings = partitioning.variable_shardings(boxed_state, mesh, rules)
  unboxed = nn.meta.unbox(boxed_state)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, state_shardings)
  return Setup(config=config, model=model, mesh=mesh, rules=rules, tx=tx, schedule=schedule,
               loss_config=loss_config, state_shardings=state_shardings,
               abstract_state=abstract_state, boxed_params=boxed_state.params, sht=sht,
               sht_tx=sht_tx)


def create_train_state(setup: Setup, seed: int) -> TrainState:
  """A freshly initialised train state, created directly in its shardings."""
  init = _init_state_fn(setup.model, setup.tx, setup.loss_config, setup.config.data.image_size,
                        setup.sht, setup.sht_tx)
  create = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=setup.state_shardings)
  return sharding.CompiledPerShape(create, "init", setup.mesh, setup.rules)(
      jax.random.PRNGKey(seed))
