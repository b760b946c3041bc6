"""Known-answer tests for the FMB-loss (fgtbt_jax/losses.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgtbt_jax import landmarks
from fgtbt_jax import losses

D = len(landmarks.PROTOCOL_NAMES)
K = landmarks.NUM_UNIFIED


def _awing_by_hand(d, y, omega=14.0, theta=0.5, alpha=2.1, eps=1.0):
  d = abs(d)
  p = alpha - y
  if d < theta:
    return omega * math.log(1 + (d / eps) ** p)
  a = omega * (1 / (1 + (theta / eps) ** p)) * p * (theta / eps) ** (p - 1) / eps
  c = theta * a - omega * math.log(1 + (theta / eps) ** p)
  return a * d - c


@pytest.mark.parametrize("pred,target", [
    (0.3, 0.0), (0.0, 0.3), (0.9, 1.0), (0.49, 0.2),     # |d| < theta: log branch
    (1.5, 0.5), (0.0, 1.0), (-0.7, 0.0), (0.8, 0.05),    # |d| >= theta: linear branch
])
def test_adaptive_wing_matches_formula(pred, target):
  got = float(losses.adaptive_wing(jnp.float32(pred), jnp.float32(target)))
  assert got == pytest.approx(_awing_by_hand(pred - target, target), rel=1e-5, abs=1e-6)


def test_adaptive_wing_literal_values():
  # omega ln(1 + 0.3^2.1) and the linear branch at d = 1, y = 0.5 worked out by hand.
  assert float(losses.adaptive_wing(jnp.float32(0.3), jnp.float32(0.0))) == pytest.approx(
      14 * math.log(1 + 0.3 ** 2.1), rel=1e-6)
  a = 14 / (1 + 0.5 ** 1.6) * 1.6 * 0.5 ** 0.6
  c = 0.5 * a - 14 * math.log(1 + 0.5 ** 1.6)
  assert float(losses.adaptive_wing(jnp.float32(1.5), jnp.float32(0.5))) == pytest.approx(
      a - c, rel=1e-6)


def test_adaptive_wing_is_continuous_at_theta_and_zero_at_target():
  for y in (0.0, 0.4, 1.0):
    below = float(losses.adaptive_wing(jnp.float32(y + 0.5 - 1e-4), jnp.float32(y)))
    above = float(losses.adaptive_wing(jnp.float32(y + 0.5 + 1e-4), jnp.float32(y)))
    assert below == pytest.approx(above, abs=5e-3)
  assert float(losses.adaptive_wing(jnp.float32(0.7), jnp.float32(0.7))) == 0.0
  grad = jax.grad(lambda p: losses.adaptive_wing(p, jnp.float32(0.0)))(jnp.float32(0.0))
  assert np.isfinite(grad) and float(grad) == 0.0


def test_weight_map_dilates_threshold_by_one_pixel():
  target = np.zeros((1, 6, 6, 2), np.float32)
  target[0, 2, 3, 0] = 0.25   # above 0.2: its 3x3 neighbourhood weighs 11
  target[0, 0, 0, 1] = 0.19   # below 0.2 at a corner: nothing
  target[0, 5, 5, 1] = 0.2    # exactly 0.2 at the other corner: in-image 2x2 block
  w = np.asarray(losses.weight_map(jnp.asarray(target)))
  expected0 = np.ones((6, 6))
  expected0[1:4, 2:5] = 11
  expected1 = np.ones((6, 6))
  expected1[4:6, 4:6] = 11
  np.testing.assert_array_equal(w[0, ..., 0], expected0)
  np.testing.assert_array_equal(w[0, ..., 1], expected1)


def _constant_error_batch(errors, dataset_id, height=4, width=4):
  """Targets all zero and predictions constant per (sample, channel).

  With target 0 the weight map is 1 and AWing of a constant e is known, so the
  per-(sample, channel) loss is awing(e) exactly.
  """
  errors = np.asarray(errors, np.float32)
  pred = np.broadcast_to(errors[:, None, None, :], (len(errors), height, width, K))
  target = np.zeros_like(pred)
  mask = landmarks.PROTOCOL_MASKS[np.asarray(dataset_id)]
  return jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), jnp.asarray(dataset_id)


def _expected_total(errors, dataset_id, weights):
  """The FMB loss by hand with Python loops: the definition, step by step."""
  total = 0.0
  per_dataset = np.zeros(D)
  for d in range(D):
    samples = [b for b in range(len(dataset_id)) if dataset_id[b] == d]
    if not samples:
      continue
    points = np.flatnonzero(landmarks.PROTOCOL_MASKS[d])
    landmark_losses = [np.mean([_awing_by_hand(errors[b][p], 0.0) for b in samples])
                       for p in points]
    per_dataset[d] = np.mean([weights[p] * l for p, l in zip(points, landmark_losses)])
    total += per_dataset[d]
  return total, per_dataset


@pytest.mark.parametrize("balancer,beta", [("fmb", 0.9), ("fmb", 0.0), ("uniform", 0.9)])
def test_fmb_loss_aggregate_matches_definition(balancer, beta):
  rng = np.random.default_rng(0)
  dataset_id = np.array([0, 0, 1, 1, 2, 3, 3, 2])
  errors = rng.uniform(-1.0, 1.0, (8, K)).astype(np.float32)
  config = losses.LossConfig(balancer=balancer, beta=beta)
  params, state = losses.init_balancer(config)
  total, aux = losses.fmb_loss(config, *_constant_error_batch(errors, dataset_id),
                               params, state)
  weights = landmarks.fmb_weights(beta) if balancer == "fmb" else np.ones(K)
  expected_total, expected_per_dataset = _expected_total(errors, dataset_id, weights)
  assert float(total) == pytest.approx(expected_total, rel=1e-5)
  np.testing.assert_allclose(aux["dataset_loss"], expected_per_dataset, rtol=1e-5)
  assert np.asarray(aux["present"]).all()


def test_fmb_weights_change_the_loss_as_specified():
  # Same batch, beta 0 vs 0.9: a point annotated by all four datasets (C = 4)
  # weighs 1 at beta 0 and 1 / (1 + .9 + .81 + .729) at beta 0.9.
  counts = landmarks.OCCURRENCE_COUNT
  shared = int(np.flatnonzero(counts == 4)[0])
  errors = np.zeros((4, K), np.float32)
  errors[:, shared] = 0.3
  dataset_id = np.arange(4)
  totals = {}
  for beta in (0.0, 0.9):
    config = losses.LossConfig(balancer="fmb", beta=beta)
    totals[beta] = float(losses.fmb_loss(config, *_constant_error_batch(errors, dataset_id),
                                         {}, {})[0])
  per_point = 14 * math.log(1 + 0.3 ** 2.1)
  num_points = [landmarks.PROTOCOLS[n].num_landmarks for n in landmarks.PROTOCOL_NAMES]
  by_hand = sum(per_point / n for n in num_points)
  assert totals[0.0] == pytest.approx(by_hand, rel=1e-5)
  assert totals[0.9] == pytest.approx(by_hand / (1 + 0.9 + 0.81 + 0.729), rel=1e-5)


def test_channels_outside_a_samples_protocol_do_not_matter():
  rng = np.random.default_rng(1)
  dataset_id = np.array([3, 2, 1, 0])  # AFLW, COFW, 300W, WFLW
  errors = rng.uniform(-1.0, 1.0, (4, K)).astype(np.float32)
  config = losses.LossConfig()
  pred, target, mask, ids = _constant_error_batch(errors, dataset_id)
  loss_fn = lambda p: losses.fmb_loss(config, p, target, mask, ids, {}, {})[0]
  outside = ~landmarks.PROTOCOL_MASKS[3]   # channels AFLW does not annotate
  changed = pred.at[0, :, :, outside].add(5.0)
  assert float(loss_fn(changed)) == float(loss_fn(pred))
  grad = np.asarray(jax.grad(loss_fn)(pred))
  assert np.all(grad[0][..., outside] == 0)
  assert np.any(grad[0][..., ~outside] != 0)


def test_per_dataset_means_are_over_supervising_samples_only():
  # Two WFLW samples; the second does not supervise point p: L[WFLW, p] is
  # the first sample's loss alone.
  sample_losses = jnp.asarray(np.arange(2 * K, dtype=np.float32).reshape(2, K))
  mask = np.ones((2, K), bool)
  mask[1, 5] = False
  landmark_loss, supervised = losses.per_dataset_landmark_losses(
      sample_losses, jnp.asarray(mask), jnp.asarray([0, 0]), D)
  assert float(landmark_loss[0, 5]) == 5.0
  assert float(landmark_loss[0, 6]) == (6.0 + K + 6.0) / 2
  assert bool(supervised[0].all()) and not bool(supervised[1:].any())


def test_absent_dataset_contributes_nothing():
  errors = np.full((2, K), 0.3, np.float32)
  config = losses.LossConfig(balancer="uniform")
  total, aux = losses.fmb_loss(config, *_constant_error_batch(errors, np.array([1, 1])), {}, {})
  np.testing.assert_array_equal(np.asarray(aux["present"]), [False, True, False, False])
  assert float(total) == pytest.approx(14 * math.log(1 + 0.3 ** 2.1), rel=1e-5)


def test_dwa_weights_formula():
  last = jnp.asarray([1.0, 2.0, 0.5, 1.0])
  previous = jnp.asarray([2.0, 1.0, 0.5, 4.0])
  ratios = np.array([0.5, 2.0, 1.0, 0.25])
  expected = 4 * np.exp(ratios / 2) / np.exp(ratios / 2).sum()
  np.testing.assert_allclose(losses.dwa_weights(last, previous, jnp.int32(2), 2.0),
                             expected, rtol=1e-6)
  np.testing.assert_array_equal(losses.dwa_weights(last, previous, jnp.int32(1), 2.0),
                                np.ones(4))


def test_dwa_state_tracks_window_means_and_weights_the_loss():
  config = losses.LossConfig(balancer="dwa", dwa_window=2, dwa_temperature=2.0)
  _, state = losses.init_balancer(config)
  present = jnp.asarray([True, True, True, False])
  history = [[1.0, 2.0, 3.0, 9.0], [3.0, 2.0, 1.0, 9.0],   # window 1 means 2, 2, 2
             [1.0, 4.0, 2.0, 9.0], [1.0, 2.0, 2.0, 9.0]]   # window 2 means 1, 3, 2
  for step, step_losses in enumerate(history):
    state = losses.update_balancer_state(config, state, jnp.asarray(step_losses), present,
                                         jnp.int32(step))
  assert int(state["windows_done"]) == 2
  np.testing.assert_allclose(state["previous_mean"], [2.0, 2.0, 2.0, 1.0])
  np.testing.assert_allclose(state["last_mean"], [1.0, 3.0, 2.0, 1.0])
  np.testing.assert_array_equal(state["window_count"], np.zeros(4))
  ratios = np.array([0.5, 1.5, 1.0, 1.0])
  expected_weights = 4 * np.exp(ratios / 2) / np.exp(ratios / 2).sum()
  dataset_losses = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  total, weights = losses.combine_dataset_losses(config, dataset_losses, present, {}, state)
  np.testing.assert_allclose(weights, expected_weights, rtol=1e-6)
  assert float(total) == pytest.approx(float(expected_weights[:3] @ np.array([1.0, 2.0, 3.0])),
                                       rel=1e-6)


def test_uncertainty_weighting_formula_and_gradient():
  config = losses.LossConfig(balancer="uncertainty")
  params, _ = losses.init_balancer(config)
  params = {"log_variance": jnp.asarray([0.0, 0.5, -1.0, 2.0])}
  dataset_losses = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  present = jnp.asarray([True, True, True, True])
  s = np.array([0.0, 0.5, -1.0, 2.0])
  l = np.array([1.0, 2.0, 3.0, 4.0])
  total, _ = losses.combine_dataset_losses(config, dataset_losses, present, params, {})
  assert float(total) == pytest.approx(float(np.sum(np.exp(-s) * l + s)), rel=1e-6)
  grad = jax.grad(lambda p: losses.combine_dataset_losses(
      config, dataset_losses, present, p, {})[0])(params)
  np.testing.assert_allclose(grad["log_variance"], 1 - np.exp(-s) * l, rtol=1e-6)


def test_loss_config_rejects_bad_settings():
  with pytest.raises(ValueError, match="unknown balancer 'gradnorm'"):
    losses.LossConfig(balancer="gradnorm")
  with pytest.raises(ValueError, match=r"loss.beta must be in \[0, 1\)"):
    losses.LossConfig(beta=1.0)
  with pytest.raises(ValueError, match="loss.sigma"):
    losses.LossConfig(sigma=0.0)


def test_render_targets_maps_input_pixels_to_stride_two_heatmaps():
  points = np.zeros((1, K, 2), np.float32)
  points[0, 0] = [9.5, 5.5]        # input px -> heatmap ((9.5 + .5) / 2 - .5, ...) = (4.5, 2.5)
  points[0, 1] = [np.nan, np.nan]  # unsupervised and NaN: all-zero channel
  mask = np.zeros((1, K), bool)
  mask[0, 0] = True
  target = np.asarray(losses.render_targets(jnp.asarray(points), jnp.asarray(mask),
                                            8, 8, sigma=1.0, stride=2))
  assert target.shape == (1, 8, 8, K)
  yy, xx = np.mgrid[0:8, 0:8]
  expected = np.exp(-((xx - 4.5) ** 2 + (yy - 2.5) ** 2) / 2.0)
  np.testing.assert_allclose(target[0, ..., 0], expected, rtol=1e-5, atol=1e-7)
  assert np.all(target[0, ..., 1:] == 0)
