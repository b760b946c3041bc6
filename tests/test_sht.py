"""SHT's weak supervision in the train step: pairs of views, FPTN between them (issue 33)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablations
from configs import tiny
from fgtbt_jax import checkpointing
from fgtbt_jax import errors
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax import state as state_lib
from fgtbt_jax import train
from fgtbt_jax import validation
from fgtbt_jax.models import fptn
from tests import helpers


def test_views_sit_side_by_side_and_swap_within_each_face():
  first = jnp.arange(4)[:, None] * 10.0
  second = first + 1.0
  both = fptn.interleave_views(first, second)
  np.testing.assert_array_equal(both[:, 0], [0, 1, 10, 11, 20, 21, 30, 31])
  np.testing.assert_array_equal(fptn.swap_views(both)[:, 0], [1, 0, 11, 10, 21, 20, 31, 30])
  np.testing.assert_array_equal(fptn.swap_views(fptn.swap_views(both)), both)


def _sht_config(**sht):
  config = tiny.get_config()
  config.model.hallucination = True
  config.model.hallucination_channels, config.model.hallucination_blocks = 8, 1
  config.lowres.factors = (2, 4)
  config.sht.enabled = True
  config.sht.update(sht)
  return config


def _batch(setup, seed=3, labeled=True):
  batch = helpers.mixed_batch(seed)
  if not labeled:
    batch["mask"] = np.zeros_like(batch["mask"])
  return sharding.global_batch(batch, sharding.batch_sharding(setup.mesh), train.TRAIN_BATCH_KEYS)


def _heatmap_gradient(config, labeled):
  """|d loss / d (the heatmap layer's kernel)|, the largest entry, for one batch."""
  setup = state_lib.build_setup(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = state_lib.create_train_state(setup, seed=0)
  loss = train.train_loss(setup)
  trainable = {"model": state.params, "balancer": state.balancer_params}
  if state.sht:
    trainable["generator"] = state.sht["params"]["generator"]
  with sharding.mesh_and_rules(setup.mesh, setup.rules):
    grads = jax.jit(jax.grad(lambda t, b: loss(t, state.batch_stats, state.balancer_state,
                                                state.rng, b, state.sht)[0]))(
        trainable, _batch(setup, labeled=labeled))
  return float(jnp.abs(grads["model"]["decoder"]["heatmap"]["kernel"]).max())


def test_the_transfer_trains_the_landmark_network_on_faces_without_landmarks():
  """SHT's point: with every mask empty the heatmap layer learns only through FPTN."""
  assert _heatmap_gradient(_sht_config(), labeled=False) > 1e-6
  # With the transfer's weights at zero, nothing reaches it from unlabeled faces.
  silent = _sht_config(adversarial_weight=0.0, l1_weight=0.0)
  assert _heatmap_gradient(silent, labeled=False) == 0.0


def test_a_step_trains_the_generator_and_both_discriminators():
  config = _sht_config()
  validation.validate_config(config, 1)
  setup = state_lib.build_setup(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = state_lib.create_train_state(setup, seed=0)
  before = jax.device_get(state.sht)
  step = train.make_train_step(setup, ema_decay=0.9)
  state, metrics = step(state, _batch(setup))
  for name in ("transfer_l1", "transfer_adversarial", "discriminator_loss", "hallucination_l1"):
    assert np.isfinite(float(metrics[name])) and float(metrics[name]) > 0, name
  after = jax.device_get(state.sht)
  for part in ("generator", "appearance", "shape"):
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), before["params"][part],
                         after["params"][part])
    assert max(jax.tree.leaves(moved)) > 0, part
  # The generator's BatchNorm statistics were updated from the step's faces.
  stats = jax.tree.map(lambda a, b: np.abs(a - b).max(), before["batch_stats"],
                       after["batch_stats"])
  assert max(jax.tree.leaves(stats)) > 0


def test_bad_sht_settings_are_named():
  config = _sht_config()
  config.model.hallucination = False
  with pytest.raises(errors.ConfigError, match="model.hallucination"):
    validation.validate_config(config, 1)
  for key, value, message in [("transfer_size", 24, "sht.transfer_size"),
                              ("transfer_size", 128, "sht.transfer_size"),
                              ("generator_blocks", 0, "sht.generator_blocks"),
                              ("l1_weight", -1.0, "sht.l1_weight"),
                              ("scale_range", (1.2, 0.8), "sht.scale_range")]:
    config = _sht_config(**{key: value})
    with pytest.raises(errors.ConfigError, match=message):
      validation.validate_config(config, 1)


def test_the_sht_ablation_selects_dhln_low_resolution_and_the_transfer():
  config = ablations.get_config("base=default,sht=on")
  assert config.sht.enabled and config.model.hallucination and config.lowres.factors
  validation.validate_config(config, 1)
  assert not ablations.get_config("base=default,sht=off").sht.enabled


@flax.struct.dataclass
class _StateBefore:
  """A train state as checkpoints were written before the `sht` field."""
  step: jax.Array
  params: dict


@flax.struct.dataclass
class _StateAfter:
  step: jax.Array
  params: dict
  sht: dict = flax.struct.field(default_factory=dict)


def test_a_checkpoint_written_before_the_sht_field_restores(tmp_path):
  old = _StateBefore(step=jnp.asarray(7, jnp.int32), params={"w": jnp.arange(3.0)})
  checkpoints = checkpointing.Checkpointer(tmp_path, datasets=(), max_to_keep=1,
                                           save_interval_steps=1, enable_async=False)
  checkpoints.save(7, old, None, force=True)
  checkpoints.wait_until_finished()
  abstract = checkpointing.abstract_like(_StateAfter(step=old.step, params=old.params))
  restored, step = checkpoints.restore(abstract)
  assert step == 7 and isinstance(restored, _StateAfter) and restored.sht == {}
  np.testing.assert_array_equal(restored.params["w"], [0.0, 1.0, 2.0])
  # A field with arrays that the checkpoint lacks is still an incompatible checkpoint.
  wider = checkpointing.abstract_like(_StateAfter(step=old.step, params=old.params,
                                                  sht={"g": jnp.zeros(2)}))
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="sht"):
    checkpoints.restore(wider)
  checkpoints.close()


def _sharded_config(data: int, fsdp: int, rules: str):
  config = ablations.get_config("base=default,sht=on")
  config.model.hallucination_channels, config.model.hallucination_blocks = 8, 1
  config.sht.generator_channels = config.sht.discriminator_channels = 8
  config.sht.generator_blocks = 1
  config.model.depthwise_impl = "conv"  # as configs/tiny.py: faster to compile
  config.optimizer.eps = 1e-3  # see tests/test_train.py
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.mesh.logical_axis_rules = models.logical_axis_rules(rules)
  return config


@pytest.mark.slow  # Two train steps with FPTN compiled.
def test_sht_trains_sharded_like_one_device_and_resumes_exactly(tmp_path):

  def compare(metrics8, metrics1):
    for name in ("loss", "transfer_l1"):
      np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-4, err_msg=name)
    # The discriminators' logits sum long float32 reductions that split differently
    # over 8 devices; the adversarial terms agree to a few 1e-4.
    for name in ("transfer_adversarial", "discriminator_loss"):
      np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=2e-3, err_msg=name)

  initial, state8, state1, _ = helpers.train_sharded_and_single(
      _sharded_config(4, 2, "fsdp"), _sharded_config(1, 1, "data"), tmp_path, compare)
  # FPTN's weights moved alike: each part's update on 8 devices points the way of the
  # one-device update (cosine > 0.9 per weight, 0.99 for all). Not element by element: the generator's
  # BatchNorms normalise near-constant codes of the untrained heatmaps (amplifying
  # float32 rounding), the discriminators' logits sum long reductions split
  # differently over 8 devices, and Adam moves a weight by up to its learning rate
  # whatever its gradient's size: a few weights differ by up to 3e-4 after 3 steps,
  # and one run's order of reductions is not the next's.
  start = jax.tree_util.tree_leaves_with_path(jax.device_get(initial.sht["params"]))
  flat8 = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state8.sht["params"])))
  flat1 = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state1.sht["params"])))
  def cosine(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

  moves8, moves1 = [], []
  for path, before in start:
    moves8.append((flat8[path] - before).ravel())
    moves1.append((flat1[path] - before).ravel())
    if np.abs(moves1[-1]).max() > 1e-6:  # a bias in front of a BatchNorm gets no gradient
      assert cosine(moves8[-1], moves1[-1]) > 0.9, jax.tree_util.keystr(path)
  assert cosine(np.concatenate(moves8), np.concatenate(moves1)) > 0.99
