"""Training augmentation: one warp moves pixels and landmarks together; flips
permute left/right points; unified scatter; reduced JPEG decoding."""

import cv2
import numpy as np
import pytest

from fgtbt_jax.data import pipeline
from fgtbt_jax import crop
from fgtbt_jax import images
from fgtbt_jax import landmarks as lm

STORED = 256  # Side of the fixture's stored crop.


def _colours(n):
  """n clearly distinct RGB colours (pairwise L1 distance >= 60)."""
  levels = (0, 85, 170, 255)
  grid = [(r, g, b) for r in levels for g in levels for b in levels]
  grid = [c for c in grid if sum(c) > 0]  # Black is the background.
  return np.asarray(grid[:n], np.uint8)


def _separated_points(rng, n, low, high, min_dist):
  points = []
  while len(points) < n:
    p = rng.uniform(low, high, 2)
    if all(np.hypot(*(p - q)) >= min_dist for q in points):
      points.append(p)
  return np.asarray(points, np.float32)


def _stored_example(points, colours, radius=4, scale=0.5):
  """A stored example whose image has a disc of colour i at point i (PNG)."""
  image = np.zeros((STORED, STORED, 3), np.uint8)
  for (x, y), c in zip(points, colours):
    cv2.circle(image, (int(round(x)), int(round(y))), radius, tuple(int(v) for v in c), -1)
  return {"image": images.encode_image(image, "png"), "landmarks": points,
          "center": np.array([(STORED - 1) / 2] * 2, np.float32),
          "scale": np.float32(scale)}


def _augment(dataset, size=128, **overrides):
  kwargs = dict(image_size=size, crop_enlarge=1.25, scale_range=(1.0, 1.25),
                rotation_deg=30.0, rotation_prob=0.6, flip_prob=0.5)
  kwargs.update(overrides)
  return pipeline.TrainAugment(dataset, **kwargs)


@pytest.mark.parametrize("dataset", ["COFW", "AFLW"])
def test_landmarks_stay_on_their_drawn_marks(dataset):
  protocol = lm.get_protocol(dataset)
  n = protocol.num_landmarks
  rng = np.random.default_rng(3)
  # Points within +-60 px of the centre stay inside every augmented crop
  # (side 200 * 0.8 * 1.25 = 200 px, rotated by up to 30 degrees).
  points = _separated_points(rng, n, STORED / 2 - 60, STORED / 2 + 60, 12)
  colours = _colours(n).astype(int)
  example = _stored_example(points, colours, scale=0.8)
  augment = _augment(dataset)
  flips = 0
  for seed in range(12):
    out = augment.random_map(example, np.random.default_rng(seed))
    _, _, flip = augment.draw(np.random.default_rng(seed))
    flips += flip
    own = lm.from_unified(out["landmarks"], protocol)
    # After a flip, point i sits where the mirror partner's mark was drawn.
    source_of = protocol.flip_permutation if flip else np.arange(n)
    for i in range(n):
      x, y = np.round(own[i]).astype(int)
      assert 0 <= x < 128 and 0 <= y < 128
      pixel = out["image"][y, x].astype(int)
      np.testing.assert_allclose(pixel, colours[source_of[i]], atol=12,
                                 err_msg=f"seed {seed} point {i} flip {flip}")
  assert 0 < flips < 12  # Both branches were exercised.


@pytest.mark.parametrize("dataset", lm.PROTOCOL_NAMES)
def test_flip_keeps_left_points_on_the_left(dataset):
  """On a mean face, a flipped crop has every left/right pair on the same side."""
  protocol = lm.get_protocol(dataset)
  face = lm.mean_face()[protocol.unified_index]
  points = (face - face.mean(0)) * 100 + (STORED - 1) / 2
  example = _stored_example(points.astype(np.float32), _colours(1).repeat(len(points), 0),
                            radius=1)
  plain = _augment(dataset, rotation_prob=0.0, flip_prob=0.0, scale_range=(1.0, 1.0))
  flipped = _augment(dataset, rotation_prob=0.0, flip_prob=1.0, scale_range=(1.0, 1.0))
  a = lm.from_unified(plain.random_map(example, np.random.default_rng(0))["landmarks"], protocol)
  b = lm.from_unified(flipped.random_map(example, np.random.default_rng(0))["landmarks"], protocol)
  for left, right in protocol.flip_pairs:
    assert np.sign(b[left, 0] - b[right, 0]) == np.sign(a[left, 0] - a[right, 0]), (left, right)
  # The mean face is nearly symmetric: the flipped face lies on the plain one.
  face_size = np.ptp(a, axis=0).max()
  assert np.abs(b - a).max() < 0.1 * face_size
  # And it is exactly the protocol's flip of the plain crop.
  np.testing.assert_allclose(b, lm.flip_points(a, 128, protocol), atol=1e-3)


def test_unified_scatter_and_mask():
  protocol = lm.get_protocol("300W")
  rng = np.random.default_rng(0)
  points = _separated_points(rng, 68, 70, 186, 3)
  out = _augment("300W").random_map(_stored_example(points, _colours(68)),
                                    np.random.default_rng(1))
  assert out["image"].shape == (128, 128, 3) and out["image"].dtype == np.uint8
  assert out["landmarks"].shape == (124, 2) and out["landmarks"].dtype == np.float32
  assert out["dataset_id"] == protocol.dataset_id and out["dataset_id"].dtype == np.int32
  np.testing.assert_array_equal(out["mask"], lm.PROTOCOL_MASKS[protocol.dataset_id])
  assert (out["landmarks"][~out["mask"]] == 0).all()
  # A point that is not finite is masked out and carried as 0, not NaN.
  example = _stored_example(points, _colours(68))
  example["landmarks"] = points.copy()
  example["landmarks"][5] = np.nan
  out = _augment("300W").random_map(example, np.random.default_rng(1))
  assert not out["mask"][protocol.unified_index[5]] and out["mask"].sum() == 67
  assert np.isfinite(out["landmarks"]).all() and out["landmarks"].dtype == np.float32
  assert (out["landmarks"][~out["mask"]] == 0).all()


def test_crop_geometry_without_augmentation():
  """No scale/rotation/flip: face centre at the crop centre, size S / (1.25 * 200 * s)."""
  points = np.array([[100.0, 128.0], [156.0, 128.0]] + [[128.0, 60.0]] * 27, np.float32)
  example = _stored_example(points, _colours(29), scale=0.5)
  out = _augment("COFW", size=100, rotation_prob=0.0, flip_prob=0.0,
                 scale_range=(1.0, 1.0)).random_map(example, np.random.default_rng(0))
  own = lm.from_unified(out["landmarks"], "COFW")
  zoom = 100 / (1.25 * 200 * 0.5)
  assert own[1, 0] - own[0, 0] == pytest.approx(56 * zoom, abs=1e-4)
  centre = crop.apply_affine(example["center"][None].astype(np.float64),
                             crop.face_crop_affine(example["center"], 0.5, 100))
  np.testing.assert_allclose(centre, [[49.5, 49.5]], atol=1e-9)


def test_draws_follow_the_configured_distribution():
  augment = _augment("WFLW", scale_range=(1.0, 1.25), rotation_deg=30, rotation_prob=0.6,
                     flip_prob=0.5)
  rng = np.random.default_rng(0)
  draws = [augment.draw(rng) for _ in range(4000)]
  scales = np.array([d[0] for d in draws])
  angles = np.array([d[1] for d in draws])
  flips = np.array([d[2] for d in draws])
  assert scales.min() >= 1.0 and scales.max() <= 1.25
  assert np.abs(angles).max() <= 30
  assert abs((angles != 0).mean() - 0.6) < 0.04
  assert abs(flips.mean() - 0.5) < 0.04
  # Same generator state, same draws: augmentation is a function of the seed.
  assert augment.draw(np.random.default_rng(7)) == augment.draw(np.random.default_rng(7))
  with pytest.raises(ValueError, match="scale_range"):
    _augment("WFLW", scale_range=(1.2, 1.0))


def test_reduced_jpeg_decoding_matches_full_decoding():
  ys, xs = np.mgrid[0:1024, 0:1024].astype(np.float32)
  smooth = 128 + 100 * np.stack([np.sin(xs / 15), np.sin(ys / 13), np.sin((xs + ys) / 20)], -1)
  data = images.encode_image(smooth.round().astype(np.uint8), "jpeg", 95)
  # Output pixels per stored pixel: decoded at 1/2, 1/4, 1/8, and in full.
  for zoom, factor in ((0.45, 2), (0.22, 4), (0.11, 8), (0.6, 1)):
    m = crop.crop_affine([511.5, 511.5], 64 / zoom / 200, 64, rotation_deg=10)
    full = pipeline.decode_and_warp(data, m, 64, reduced_decode=False).astype(float)
    fast = pipeline.decode_and_warp(data, m, 64, reduced_decode=True).astype(float)
    if factor == 1:
      np.testing.assert_array_equal(full, fast)
      continue
    # The same reduced image warped with the corner convention (x_full = r x)
    # instead of pixel centres: misregistered by (r - 1) / 2 pixels.
    reduced = cv2.imdecode(np.frombuffer(data, np.uint8),
                           {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                            8: cv2.IMREAD_REDUCED_COLOR_8}[factor])
    shifted = cv2.warpAffine(reduced, crop.compose_affine(m, np.diag([factor, factor, 1.0])[:2]),
                             (64, 64))[..., ::-1].astype(float)
    inner = (slice(4, -4), slice(4, -4))
    good, bad = np.abs(full - fast)[inner].mean(), np.abs(full - shifted)[inner].mean()
    assert good < bad / 3, (zoom, good, bad)


def test_undecodable_stored_image_names_its_source():
  example = {"image": b"\xff\xd8garbage", "landmarks": np.zeros((19, 2), np.float32),
             "center": np.array([50.0, 50.0], np.float32), "scale": np.float32(0.5),
             "source": b"aflw.csv:7"}
  with pytest.raises(ValueError, match="aflw.csv:7: the stored image could not be decoded"):
    _augment("AFLW").random_map(example, np.random.default_rng(0))
