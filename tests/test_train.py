"""The train step and loop: sharding equivalence, optimizer, EMA, safety rails."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fgtbt_jax import checkpointing
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax import state as state_lib
from fgtbt_jax import train
from tests.helpers import mixed_batch as _batch




def _config(data: int, fsdp: int, rules: str):
  config = tiny.get_config()
  # Biases in front of a BatchNorm get gradients that are zero in exact
  # arithmetic; Adam with a tiny eps would blow their float noise (which
  # differs with the reduction order) up to full-size steps. A larger eps
  # keeps the comparison about the sharding.
  config.optimizer.eps = 1e-3
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.mesh.logical_axis_rules = models.logical_axis_rules(rules)
  return config


def test_sharded_step_matches_single_device_and_shards_parameters():
  config8 = _config(4, 2, "fsdp")
  setup8 = state_lib.build_setup(config8)
  config1 = _config(1, 1, "data")
  setup1 = state_lib.build_setup(config1, mesh=sharding.make_mesh(config1.mesh, jax.devices()[:1]))
  state8 = state_lib.create_train_state(setup8, seed=0)
  initial = jax.device_get(state8)
  state1 = jax.device_put(initial, setup1.state_shardings)

  # Parameters and their Adam moments are split over "fsdp": each device
  # holds half of such a kernel.
  sharded = [x for x in jax.tree.leaves(state8.params) if "fsdp" in str(x.sharding.spec)]
  assert len(sharded) > 10
  kernel = sharded[0]
  axis = list(kernel.sharding.spec).index("fsdp")
  assert kernel.addressable_shards[0].data.shape[axis] == kernel.shape[axis] // 2
  moments = [x for x in jax.tree.leaves(state8.opt_state) if "fsdp" in str(x.sharding.spec)]
  assert len(moments) == 2 * len(sharded)

  step8 = train.make_train_step(setup8, ema_decay=0.9)
  step1 = train.make_train_step(setup1, ema_decay=0.9)
  batches = [_batch(seed) for seed in (1, 2)]
  for local in batches:
    state8, metrics8 = step8(state8, sharding.global_batch(local, sharding.batch_sharding(setup8.mesh), train.TRAIN_BATCH_KEYS))
    state1, metrics1 = step1(state1, sharding.global_batch(local, sharding.batch_sharding(setup1.mesh), train.TRAIN_BATCH_KEYS))
    np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics8["dataset_loss"], metrics1["dataset_loss"], rtol=1e-5)
  assert int(state8.step) == int(state1.step) == 2
  assert np.asarray(metrics8["present"]).all()
  flat8 = jax.tree_util.tree_leaves_with_path(jax.device_get(state8.params))
  flat1 = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state1.params)))
  for path, value in flat8:
    # Adam divides by the root of tiny second moments in the first steps, so
    # the reduction order of a near-zero gradient shows at about 4e-5, and at
    # 9.3e-5 in one of 784 elements of FGSA's refine kernel on a 2-core AMD
    # EPYC (2026-12-07, the tree before and after that day's change alike).
    np.testing.assert_allclose(value, flat1[path], rtol=1e-4, atol=1.5e-4,
                               err_msg=jax.tree_util.keystr(path))
  for a, b in zip(jax.tree.leaves(jax.device_get(state8.ema_batch_stats)),
                  jax.tree.leaves(jax.device_get(state1.ema_batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The step really trained: parameters moved and the EMA lags behind them.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                       jax.device_get(state1.params), initial.params))
  assert max(moved) > 1e-4
  ema_gap = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                         jax.device_get(state1.ema_params),
                                         jax.device_get(state1.params)))
  assert max(ema_gap) > 0


@pytest.mark.slow  # A train step compiled.
def test_a_frozen_batch_norm_step_keeps_the_statistics_and_trains_scale_and_bias():
  config = _config(1, 1, "data")
  setup = state_lib.build_setup(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = state_lib.create_train_state(setup, seed=0)
  before = jax.device_get(state)
  batch = sharding.global_batch(_batch(3), sharding.batch_sharding(setup.mesh),
                                train.TRAIN_BATCH_KEYS)
  frozen = train.make_train_step(setup, ema_decay=0.9, frozen_batch_norm=True)
  after, metrics = frozen(state, batch)
  after = jax.device_get(after)
  # The running statistics stay as they were; BatchNorm's scale and bias learn.
  for a, b in zip(jax.tree.leaves(after.batch_stats), jax.tree.leaves(before.batch_stats)):
    np.testing.assert_array_equal(a, b)
  flat_before = dict(jax.tree_util.tree_leaves_with_path(before.params))
  norm_params = [(path, value) for path, value in jax.tree_util.tree_leaves_with_path(after.params)
                 if "norm" in jax.tree_util.keystr(path).lower()
                 and "bias" in jax.tree_util.keystr(path)]
  assert norm_params and any(np.abs(v - flat_before[p]).max() > 0 for p, v in norm_params)
  assert np.isfinite(float(metrics["loss"]))
  # The bias-corrected EMA (the default) starts at the first trained weights: the
  # initial ones have no share in it.
  assert config.train.ema_bias_correction
  for a, b in zip(jax.tree.leaves(after.ema_params), jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(a, b)


def test_learning_rate_schedule_and_weight_decay_mask():
  config = tiny.get_config().optimizer
  config.learning_rate, config.lr_decay_steps, config.lr_decay_factor = 1.0, (10, 20), 0.5
  config.weight_decay, config.warmup_steps = 0.1, 0
  tx, schedule = state_lib.make_optimizer(config)
  assert [float(schedule(s)) for s in (0, 9, 10, 19, 20, 100)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
  params = {"model": {"w": jnp.ones(3)}, "balancer": {"log_variance": jnp.ones(4)}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # Zero gradients: the model decays by lr * wd, the balancer is not decayed.
  np.testing.assert_allclose(updates["model"]["w"], -0.1 * np.ones(3), rtol=1e-6)
  np.testing.assert_array_equal(updates["balancer"]["log_variance"], np.zeros(4))
  config.warmup_steps = 4
  _, warm = state_lib.make_optimizer(config)
  assert [float(warm(s)) for s in (0, 2, 4, 12)] == [0.0, 0.5, 1.0, 0.5]


def test_gradient_clipping_by_global_norm():
  config = tiny.get_config().optimizer
  params = {"model": {"w": jnp.zeros(4)}, "balancer": {}}
  grads = {"model": {"w": jnp.full(4, 5.0)}, "balancer": {}}  # global norm 10
  for clip, expected_norm in ((0.0, 10.0), (1.0, 1.0)):
    config.grad_clip_norm = clip
    tx, _ = state_lib.make_optimizer(config)
    _, state = tx.update(grads, tx.init(params), params)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    # Adam's first moment after one step is (1 - b1) times the (clipped) gradient.
    assert float(jnp.linalg.norm(adam.mu["model"]["w"])) == pytest.approx(
        (1 - config.b1) * expected_norm, rel=1e-5)


def test_ema_decay_follows_images_per_step():
  config = tiny.get_config()
  config.data.samples_per_dataset = 2
  config.train.ema_half_life_images = 10_000.0
  assert state_lib.ema_decay_per_step(config) == pytest.approx(0.5 ** (8 / 10_000))
  config.data.samples_per_dataset = 4
  assert state_lib.ema_decay_per_step(config) == pytest.approx(0.5 ** (16 / 10_000))


def test_mesh_shape():
  config = tiny.get_config().mesh
  config.data, config.fsdp = -1, 2
  assert sharding.mesh_shape(config, 8) == (4, 2)
  config.data, config.fsdp = 2, -1
  assert sharding.mesh_shape(config, 8) == (2, 4)
  config.data, config.fsdp = 3, 1
  with pytest.raises(ValueError, match="does not cover the 8 devices"):
    sharding.mesh_shape(config, 8)
  config.data, config.fsdp = 4, 2
  mesh = sharding.make_mesh(config)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_parameter_table_counts_every_parameter():
  setup = state_lib.build_setup(tiny.get_config())
  table, total = train.parameter_table(setup.boxed_params)
  assert total == models.parameter_count(setup.boxed_params)
  assert "encoder/stage_0" in table and f"{total:,}" in table.splitlines()[-1]


# ---- The loop's safety rails, with a stand-in step (no model compile). ----


class _FakeEvaluator:

  def __init__(self):
    self.evaluated = []

  def evaluate(self, variables, step, datasets=None):
    self.evaluated.append(step)
    return {"WFLW": {"nme": 0.1, "baseline_nme": 0.2, "fr": 0.0, "auc": 0.5}}, {}


class _FakeWriter:

  def __init__(self):
    self.written = []

  def write(self, prefix, step, scalars):
    assert all(np.isfinite(v) for v in scalars.values())
    self.written.append((prefix, step))

  def flush(self):
    pass


class _Setup:

  def __init__(self):
    self.mesh = sharding.make_mesh(tiny.get_config().mesh, jax.devices()[:1])


def _tiny_state():
  w = jnp.zeros((3,))
  return state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params={"w": w}, batch_stats={}, opt_state={},
      ema_params={"w": w}, ema_batch_stats={}, balancer_params={}, balancer_state={},
      rng=jax.random.PRNGKey(0))


def _iterator():
  def make(i):
    batch = _batch(int(i), size=4)
    return batch
  return iter(grain.MapDataset.range(1000).map(make).to_iter_dataset())


def _fake_step(loss_at_step):
  def step_fn(state, batch):
    done = int(state.step) + 1
    loss = loss_at_step(done)
    new = state.replace(step=state.step + 1, params={"w": state.params["w"] + 1.0})
    metrics = {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0),
               "learning_rate": jnp.float32(0.1), "dataset_loss": jnp.zeros(4)}
    return new, metrics
  return step_fn


def _loop(tmp_path, step_fn, steps=6):
  config = tiny.get_config()
  config.train.steps, config.train.checkpoint_every, config.train.eval_every = steps, 2, 100
  config.train.transfer_guard = False
  checkpoints = checkpointing.Checkpointer(tmp_path / "ckpt", datasets=["WFLW"], max_to_keep=5,
                                           save_interval_steps=2)
  try:
    return train._train_loop(config, _Setup(), _tiny_state(), 0, step_fn, _iterator(),
                             checkpoints, _FakeEvaluator(), _FakeWriter()), checkpoints
  finally:
    checkpoints.close()


@pytest.mark.parametrize("bad_step", [3, 4])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad_step):
  step_fn = _fake_step(lambda done: float("nan") if done >= bad_step else 1.0)
  with pytest.raises(train.NonFiniteLossError,
                     match=rf"loss is nan at step {bad_step}.*last good checkpoint is step 2"):
    _loop(tmp_path, step_fn)
  saved = sorted(int(p.name) for p in (tmp_path / "ckpt" / "latest").iterdir()
                 if p.name.isdigit())
  assert saved == [2]


def test_weights_that_blow_up_under_a_finite_loss_are_not_checkpointed(tmp_path):
  def step_fn(state, batch):
    done = int(state.step) + 1
    w = state.params["w"] + (jnp.inf if done >= 4 else 1.0)
    metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0),
               "learning_rate": jnp.float32(0.1), "dataset_loss": jnp.zeros(4)}
    return state.replace(step=state.step + 1, params={"w": w}, ema_params={"w": w}), metrics
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=r"step 4 holds NaN or infinite values \(first: params/w\).*"
                           r"last good checkpoint is step 2"):
    _loop(tmp_path, step_fn)
  saved = sorted(int(p.name) for p in (tmp_path / "ckpt" / "latest").iterdir()
                 if p.name.isdigit())
  assert saved == [2]


def test_sigterm_saves_and_stops_cleanly(tmp_path):
  def loss(done):
    if done == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return 1.0
  previous_handler = signal.getsignal(signal.SIGTERM)
  result, checkpoints = _loop(tmp_path, _fake_step(loss))
  assert result == {"stopped_at_step": 3, "signal": signal.SIGTERM}
  assert signal.getsignal(signal.SIGTERM) is previous_handler
  restored, step = checkpointing.Checkpointer(
      tmp_path / "ckpt", datasets=["WFLW"], max_to_keep=5, save_interval_steps=2).restore(
          checkpointing.abstract_like(_tiny_state()))
  assert step == 3 and int(restored.step) == 3
  np.testing.assert_array_equal(restored.params["w"], np.full(3, 3.0))


def test_loop_trains_to_the_end_and_evaluates(tmp_path):
  result, _ = _loop(tmp_path, _fake_step(lambda done: 1.0), steps=5)
  assert result["steps"] == 5 and result["WFLW"]["nme"] == 0.1
  saved = sorted(int(p.name) for p in (tmp_path / "ckpt" / "latest").iterdir()
                 if p.name.isdigit())
  assert saved == [2, 4, 5]


def test_the_bias_corrected_ema_is_the_average_of_the_trained_weights_only():
  """With correction the EMA after t steps is Adam's m_t / (1 - d^t) (an average from
  zero): the initial weights have no share; without it they keep d^t of it."""
  decay, values, initial = 0.9, np.linspace(1.0, 3.0, 25), -100.0
  for correct in (True, False):
    average = initial
    for t, value in enumerate(values, start=1):
      d = float(train.ema_step_decay(decay, jnp.int32(t), correct))
      average = d * average + (1.0 - d) * value
    moment = sum((1 - decay) * decay ** (len(values) - i) * v for i, v in enumerate(values, 1))
    expected = (moment / (1 - decay ** len(values)) if correct
                else moment + decay ** len(values) * initial)
    assert average == pytest.approx(expected, rel=1e-5)
  assert float(train.ema_step_decay(decay, jnp.int32(1), True)) == 0.0
  assert float(train.ema_step_decay(0.5 ** (8 / 10_000), jnp.int32(100_000), True)) == (
      pytest.approx(0.5 ** (8 / 10_000), rel=1e-6))


@pytest.mark.parametrize("start", [0, 2])
def test_the_loop_shows_a_bar_with_rate_and_eta_and_keeps_the_metric_line(tmp_path, capsys,
                                                                           caplog, start):
  """Process 0's bar counts the steps from the one resumed at, with steps/s, images/s,
  the loss and an ETA; the metric line is still logged; the log handlers are given back."""
  import logging as std_logging
  import re
  handlers = list(std_logging.getLogger().handlers)
  config = tiny.get_config()
  config.train.steps, config.train.checkpoint_every, config.train.eval_every = 6, 2, 100
  config.train.transfer_guard = False
  checkpoints = checkpointing.Checkpointer(tmp_path / "ckpt", datasets=["WFLW"], max_to_keep=5,
                                           save_interval_steps=2)
  state = _tiny_state().replace(step=jnp.int32(start))
  caplog.set_level(std_logging.INFO)
  try:
    result = train._train_loop(config, _Setup(), state, start, _fake_step(lambda done: 0.5),
                               _iterator(), checkpoints, _FakeEvaluator(), _FakeWriter())
  finally:
    checkpoints.close()
  logged = [record.getMessage() for record in caplog.records]
  assert result["steps"] == 6
  err = capsys.readouterr().err
  bars = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("train:")]
  assert bars[0].startswith(f"train:  {100 * start // 6:2d}%") and f" {start}/6 " in bars[0]
  assert re.search(r"train: 100%\|.*\| 6/6 \[\d\d:\d\d elapsed, ETA \d\d:\d\d, +[\d.]+"
                   r"(step/s|s/step), [\d.]+ images/s, loss 0\.5000\]", bars[-1]), bars
  assert any(line.startswith("step 6/6  loss 0.50000") and line.endswith(" images/s")
             for line in logged), logged
  assert std_logging.getLogger().handlers == handlers
