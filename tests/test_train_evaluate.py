"""Evaluation pieces: predictor with flip test, metrics per dataset, baseline, tables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fgtbt_jax import evaluate
from fgtbt_jax import heatmaps
from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import metrics
from fgtbt_jax import sharding

SIZE = 64          # input side
MAP = SIZE // 2    # heatmap side (stride 2)


def _points(seed):
  rng = np.random.default_rng(seed)
  return rng.uniform(4, MAP - 5, (124, 2)).astype(np.float32)


class _BrightSideModel(nn.Module):
  """Stand-in network whose output is mirror-consistent by construction.

  For an image brighter on its left half it draws Gaussians at `points`; for
  one brighter on the right (the mirror image) at the mirrored points with
  left/right identities swapped, i.e. what a perfect model would predict.
  """

  points: np.ndarray

  @nn.compact
  def __call__(self, images, train=False):
    left = images[:, :, : images.shape[2] // 2].mean(axis=(1, 2, 3))
    right = images[:, :, images.shape[2] // 2:].mean(axis=(1, 2, 3))
    mirrored = landmarks.flip_points(self.points, MAP)
    mask = jnp.ones((1, 124), bool)
    direct = heatmaps.render_gaussian(jnp.asarray(self.points)[None], mask, MAP, MAP, 1.5)
    flipped = heatmaps.render_gaussian(jnp.asarray(mirrored)[None], mask, MAP, MAP, 1.5)
    return jnp.where((left > right)[:, None, None, None], direct, flipped)


def _images(batch):
  images = np.zeros((batch, SIZE, SIZE, 3), np.uint8)
  images[:, :, : SIZE // 2] = 200
  return images


@pytest.mark.parametrize("flip_test", [False, True])
def test_predictor_maps_heatmap_peaks_to_input_pixels(flip_test):
  points = _points(0)
  config = tiny.get_config()
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh.logical_axis_rules)
  predict = inference.compile_predict_fn(
      _BrightSideModel(points), mesh, rules,
      inference.PredictSettings(decoder="subpixel", flip_test=flip_test))
  images = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), _images(8))
  predicted, confidence = (sharding.local_rows(a) for a in predict({}, images))
  assert confidence.shape == (8, 124) and (confidence > 0.8).all()  # sub-pixel peaks
  expected = heatmaps.heatmap_to_input(points, 2)
  assert predicted.shape == (8, 124, 2)
  np.testing.assert_allclose(predicted, np.broadcast_to(expected, predicted.shape), atol=2e-3)


def test_flip_test_needs_the_flip_permutation():
  # Merging with an identity permutation instead of the unified one moves
  # every point that has a mirror partner.
  points = _points(1)
  maps = np.asarray(_BrightSideModel(points).apply({}, jnp.asarray(_images(1), jnp.float32)))
  mirror = np.asarray(_BrightSideModel(points).apply(
      {}, jnp.asarray(_images(1)[:, :, ::-1], jnp.float32)))
  right = heatmaps.decode(heatmaps.merge_flipped(
      maps, mirror, landmarks.UNIFIED_FLIP_PERMUTATION), "subpixel")[0][0]
  wrong = heatmaps.decode(heatmaps.merge_flipped(maps, mirror, np.arange(124)), "subpixel")[0][0]
  np.testing.assert_allclose(right, points, atol=2e-3)
  paired = landmarks.UNIFIED_FLIP_PERMUTATION != np.arange(124)
  assert np.abs(np.asarray(wrong) - points)[paired].max() > 1.0


def test_mean_face_baseline_fills_the_face_box_of_the_crop():
  for name in landmarks.PROTOCOL_NAMES:
    points = evaluate.mean_face_input_points(name, 128, 1.25)
    assert points.shape == (landmarks.get_protocol(name).num_landmarks, 2)
    low, high = points.min(0), points.max(0)
    assert (high - low).max() == pytest.approx(128 / 1.25, rel=1e-5)
    np.testing.assert_allclose((low + high) / 2, [63.5, 63.5], atol=1e-4)


def _gt(name, batch, seed=0):
  protocol = landmarks.get_protocol(name)
  face = landmarks.mean_face()[protocol.unified_index] * 100 + 50
  rng = np.random.default_rng(seed)
  return (face[None] + rng.normal(0, 1, (batch, protocol.num_landmarks, 2))).astype(np.float32)


def _split(name, pred, gt, box, subsets, baseline=None):
  return metrics.SplitPredictions(
      dataset=name, predictions=pred, confidence=np.ones(gt.shape[:2]), ground_truth=gt,
      box_size=np.asarray(box, np.float64), baseline=gt if baseline is None else baseline,
      subsets=subsets, images=np.zeros((0, SIZE, SIZE, 3), np.uint8))


def test_summarize_dataset_known_answers():
  gt = _gt("COFW", 4)
  protocol = landmarks.get_protocol("COFW")
  pupil = protocol.normalizers["inter_pupil"]
  distance = np.linalg.norm(gt[:, pupil.a[0]] - gt[:, pupil.b[0]], axis=-1)
  errors = np.array([0.05, 0.2, 0.05, 0.2])  # NME of each image, as fractions
  pred = gt.copy()
  pred[..., 0] += (errors * distance)[:, None]  # every point off by e * d in x
  subsets = {"odd": np.array([False, True, False, True])}
  result = evaluate.summarize_dataset(_split("COFW", pred, gt, np.ones(4), subsets, gt + 0.0), 0.1)
  assert result["nme"] == pytest.approx(0.125, rel=1e-5)
  assert result["fr"] == 0.5 and result["auc"] == pytest.approx(0.25, rel=1e-5)
  assert result["count"] == 4 and result["baseline_nme"] == 0.0
  assert result["subsets"]["odd"]["nme"] == pytest.approx(0.2, rel=1e-5)
  ocular = protocol.normalizers["inter_ocular"]
  ocular_distance = np.linalg.norm(gt[:, ocular.a[0]] - gt[:, ocular.b[0]], axis=-1)
  assert result["normalizers"]["inter_ocular"]["nme"] == pytest.approx(
      np.mean(errors * distance / ocular_distance), rel=1e-5)
  # Points missing from the ground truth are left out, not counted as errors.
  gt[0, 3] = np.nan
  again = evaluate.summarize_dataset(_split("COFW", pred, gt, np.ones(4), {}), 0.1,
                                     with_baseline=False)
  assert "baseline_nme" not in again
  assert again["nme"] == pytest.approx(0.125, rel=1e-5)


def test_300w_reports_inter_pupil_next_to_inter_ocular_and_aflw_uses_the_box():
  gt = _gt("300W", 2)
  result = evaluate.summarize_dataset(_split("300W", gt + 1.0, gt, np.ones(2), {}), 0.1)
  assert set(result["normalizers"]) == {"inter_pupil"}
  assert result["normalizers"]["inter_pupil"]["nme"] > result["nme"]  # pupils are closer
  gt = _gt("AFLW", 2)
  result = evaluate.summarize_dataset(
      _split("AFLW", gt + np.array([3.0, 4.0]), gt, [50.0, 100.0], {}), 0.1)
  assert result["nme"] == pytest.approx((5 / 50 + 5 / 100) / 2, rel=1e-5)


def test_flatten_and_tables():
  results = {"WFLW": {"nme": 0.05, "fr": 0.01, "auc": 0.5, "count": 10, "baseline_nme": 0.2,
                      "normalizers": {}, "subsets": {"pose": {"nme": 0.08, "fr": 0.1,
                                                              "auc": 0.3, "count": 2}}},
             "COFW": {"nme": 0.06, "fr": 0.0, "auc": 0.45, "count": 5, "baseline_nme": 0.25,
                      "normalizers": {"inter_ocular": {"nme": 0.04, "fr": 0.0, "auc": 0.6,
                                                       "count": 5}}, "subsets": {}}}
  flat = evaluate.flatten(results)
  assert flat["WFLW/subset/pose/nme"] == 0.08 and flat["COFW/inter_ocular/nme"] == 0.04
  assert flat["WFLW/baseline_nme"] == 0.2
  final = evaluate.final_table(results)
  assert final["COFW"] == {"nme": 0.06, "baseline_nme": 0.25, "fr": 0.0, "auc": 0.45}
  table = evaluate.format_table(final, 0.1, synthetic=["COFW"]).splitlines()
  assert table[0].split() == ["protocol", "NME", "%", "baseline", "%", "FR@0.1", "%", "AUC@0.1",
                              "data"]
  assert table[1].split() == ["WFLW", "5.00", "20.00", "1.00", "0.5000", "benchmark"]
  assert table[2].split()[0] == "COFW" and table[2].split()[-1] == "synthetic"
  # The headers follow the configured failure threshold.
  assert "FR@0.08 %" in evaluate.format_table(final, 0.08).splitlines()[0]


def test_local_rows_and_process_gather_on_one_process():
  config = tiny.get_config()
  mesh = sharding.make_mesh(config.mesh)
  local = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  array = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local)
  assert len(array.sharding.device_set) == 8
  np.testing.assert_array_equal(sharding.local_rows(array), local)
  np.testing.assert_array_equal(sharding.gather_from_processes(local), local)
  assert sharding.any_process(True) and not sharding.any_process(False)
