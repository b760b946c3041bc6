"""The crop convention: matrices, inverses and exactness for cv2.warpAffine."""

import cv2
import numpy as np
import pytest

from fgtbt_jax import crop


def test_center_scale_from_box():
  center, scale = crop.center_scale_from_box([10, 20, 110, 70])
  np.testing.assert_allclose(center, [60, 45])
  assert scale == pytest.approx(0.5)
  with pytest.raises(ValueError, match="x2 > x1"):
    crop.center_scale_from_box([10, 20, 5, 70])


def test_center_and_edges_land_on_pixel_centre_convention():
  size = 64
  m = crop.crop_affine([100.0, 50.0], 0.4, size)  # side 80 px
  out = crop.apply_affine(np.array([[100.0, 50.0], [60.0, 10.0], [140.0, 90.0]]), m)
  np.testing.assert_allclose(out[0], [(size - 1) / 2] * 2, atol=1e-9)
  np.testing.assert_allclose(out[1], [-0.5, -0.5], atol=1e-9)
  np.testing.assert_allclose(out[2], [size - 0.5, size - 0.5], atol=1e-9)


def test_face_crop_enlarges_by_crop_enlarge():
  a = crop.face_crop_affine([0, 0], 1.0, 100, crop_enlarge=1.25)
  b = crop.crop_affine([0, 0], 1.25, 100)
  np.testing.assert_allclose(a, b)
  assert a[0, 0] == pytest.approx(100 / 250)


def test_rotation_is_counter_clockwise_on_screen_and_flip_mirrors():
  size = 101
  right_of_centre = np.array([[60.0, 50.0]])
  m = crop.crop_affine([50.0, 50.0], 0.505, size, rotation_deg=90)  # 1:1 scale
  np.testing.assert_allclose(crop.apply_affine(right_of_centre, m), [[50.0, 40.0]], atol=1e-9)
  # Agrees with OpenCV's own rotation matrix (positive = counter-clockwise).
  np.testing.assert_allclose(m, cv2.getRotationMatrix2D((50.0, 50.0), 90, 1.0), atol=1e-9)
  plain = crop.crop_affine([50.0, 50.0], 0.3, size, rotation_deg=17)
  flipped = crop.crop_affine([50.0, 50.0], 0.3, size, rotation_deg=17, flip=True)
  pts = np.random.default_rng(0).uniform(0, 100, (10, 2))
  a, b = crop.apply_affine(pts, plain), crop.apply_affine(pts, flipped)
  np.testing.assert_allclose(b[:, 0], size - 1 - a[:, 0], atol=1e-9)
  np.testing.assert_allclose(b[:, 1], a[:, 1], atol=1e-9)


@pytest.mark.parametrize("flip", [False, True])
def test_round_trip_within_a_hundredth_of_a_pixel(flip):
  rng = np.random.default_rng(1)
  for _ in range(50):
    center = rng.uniform(0, 2000, 2)
    m = crop.crop_affine(center, rng.uniform(0.2, 5.0), 480,
                         rotation_deg=rng.uniform(-30, 30), flip=flip,
                         extra_scale=rng.uniform(1.0, 1.25))
    points = center + rng.uniform(-300, 300, (20, 2))
    back = crop.apply_affine(crop.apply_affine(points, m), crop.invert_affine(m))
    np.testing.assert_allclose(back, points, atol=0.01)
    np.testing.assert_allclose(crop.compose_affine(crop.invert_affine(m), m),
                               np.eye(2, 3), atol=1e-9)


def test_matrix_is_exact_for_warp_affine():
  """A linear ramp warped bilinearly must equal the ramp at M^-1(u) exactly."""
  h, w = 90, 120
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
  ramp = 0.7 * xs + 0.3 * ys + 5.0
  size = 40
  m = crop.crop_affine([61.3, 42.8], 0.25, size, rotation_deg=23.0, flip=True,
                       extra_scale=1.1)
  warped = cv2.warpAffine(ramp, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=-1)
  uv = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).reshape(-1, 2)
  src = crop.apply_affine(uv.astype(np.float64), crop.invert_affine(m))
  expected = (0.7 * src[:, 0] + 0.3 * src[:, 1] + 5.0).reshape(size, size)
  # The whole crop lies inside the ramp, so every pixel is interpolated.
  assert (warped > 0).all()
  # Bilinear weights are quantised to 1/32 px in OpenCV: 0.7 / 32 worst case.
  np.testing.assert_allclose(warped, expected, atol=0.7 / 32 + 1e-3)


def test_apply_affine_batched_and_dtype():
  rng = np.random.default_rng(2)
  mats = np.stack([crop.crop_affine(rng.uniform(0, 99, 2), 0.5, 64, rotation_deg=a)
                   for a in (0, 10, -20)])
  pts = rng.uniform(0, 99, (3, 7, 2)).astype(np.float32)
  out = crop.apply_affine(pts, mats)
  assert out.dtype == np.float32 and out.shape == (3, 7, 2)
  for i in range(3):
    np.testing.assert_allclose(out[i], crop.apply_affine(pts[i], mats[i]), rtol=1e-6)
  inv = crop.invert_affine(mats)
  np.testing.assert_allclose(crop.apply_affine(out, inv), pts, atol=1e-3)
  nan = crop.apply_affine(np.array([[np.nan, 1.0]]), mats[1])
  assert np.isnan(nan).all()


def test_apply_affine_on_jax_arrays():
  import jax.numpy as jnp
  m = crop.crop_affine([30.0, 40.0], 0.5, 64, rotation_deg=12)
  pts = np.array([[1.0, 2.0], [30.0, 40.0]], np.float32)
  out = crop.apply_affine(jnp.asarray(pts), jnp.asarray(m, jnp.float32))
  np.testing.assert_allclose(np.asarray(out), crop.apply_affine(pts, m), atol=1e-4)


def test_bad_arguments():
  with pytest.raises(ValueError, match="crop side"):
    crop.crop_affine([0, 0], 0.0, 10)
  with pytest.raises(ValueError, match="output_size"):
    crop.crop_affine([0, 0], 1.0, 0)


# -- warp_to_crop -------------------------------------------------------------------------


@pytest.mark.parametrize("whole_image", [False, True])
def test_warp_to_crop_area_averages_big_shrinks(whole_image):
  # A fine checkerboard averages to grey; bilinear point sampling would not.
  board = (np.indices((1200, 1200)).sum(0) % 2 * 255).astype(np.uint8)
  image = np.repeat(board[..., None], 3, 2)
  to_crop = crop.face_crop_affine([599.5, 599.5], 600 / 200, 64)
  warped = crop.warp_to_crop(image, to_crop, 64, whole_image=whole_image)
  inner = warped[6:-6, 6:-6].astype(np.float64)
  assert abs(inner.mean() - 127.5) < 2 and inner.std() < 3


@pytest.mark.parametrize("whole_image", [False, True])
def test_warp_to_crop_keeps_the_crop_geometry(whole_image):
  # On a smooth image, area-then-bilinear equals plain bilinear sampling, and
  # without a big shrink the warp is cv2.warpAffine itself.
  y, x = np.mgrid[0:1500, 0:1800].astype(np.float64)
  smooth = 127 + 100 * np.sin(2 * np.pi * x / 600) * np.cos(2 * np.pi * y / 500)
  image = np.repeat(np.round(smooth).astype(np.uint8)[..., None], 3, 2)
  for side, tolerance in ((800, 3), (40, 0)):  # Crops inside the image.
    to_crop = crop.face_crop_affine([800.3, 700.7], side / 200, 64, rotation_deg=10.0)
    direct = cv2.warpAffine(image, to_crop, (64, 64), flags=cv2.INTER_LINEAR)
    warped = crop.warp_to_crop(image, to_crop, 64, whole_image=whole_image)
    assert warped.shape == (64, 64, 3) and warped.dtype == np.uint8
    assert np.abs(warped.astype(int) - direct.astype(int)).max() <= tolerance


def test_warp_to_crop_outside_the_image_is_black():
  image = np.full((400, 400, 3), 200, np.uint8)
  to_crop = crop.face_crop_affine([5000.0, 5000.0], 1000 / 200, 32)
  for whole_image in (False, True):
    assert not crop.warp_to_crop(image, to_crop, 32, whole_image=whole_image).any()


# -- the FGTBT authors' test crop ------------------------------------------------------


def test_the_authors_crop_window_is_their_integer_corners():
  """Side 480 at S = 480: no resampling, so the crop is the window's pixels.

  Their corners: T^-1(p - 1) = c + ((p - 1) / S - 0.5) h, truncated, + 1:
  x: int(500.3 - 241) + 1 = 260, y: int(400.7 - 241) + 1 = 160.
  """
  image = np.random.default_rng(0).integers(0, 256, (800, 1000, 3), dtype=np.uint8)
  out, matrix = crop.authors_crop(image, [500.3, 400.7], 2.4, 480)
  np.testing.assert_array_equal(out, image[160:640, 260:740])
  np.testing.assert_allclose(matrix, [[1, 0, -260], [0, 1, -160]], atol=1e-12)
  # The exact crop map puts the same face 0.8 / 1.2 px further up and left.
  exact = crop.face_crop_affine([500.3, 400.7], 2.4 / 1.25, 480)
  np.testing.assert_allclose(exact[:, 2] - matrix[:, 2], [-0.8, -1.2], atol=1e-9)
  # Outside the image the canvas stays black: ul = int(100.5 - 241) + 1 = -139
  # (truncation toward zero: a 479 px window here, br = int(339.5) + 1 = 340).
  edge, matrix = crop.authors_crop(image, [100.5, 100.5], 2.4, 480)
  np.testing.assert_allclose(matrix[0, 0], 480 / 479)
  assert not edge[:137].any() and not edge[:, :137].any() and edge[142:, 142:].all(-1).mean() > 0.9


@pytest.mark.parametrize("scale", [3.1, 6.0])  # a window resampled; the image shrunk first
def test_the_authors_crop_matrix_is_where_its_pixels_come_from(scale):
  """On a linear ramp, bicubic resampling is exact away from the borders, so the
  crop's value at u is the ramp at the returned matrix's inverse of u."""
  ys, xs = np.mgrid[0:1400, 0:1500].astype(np.float64)
  ramp = lambda x, y: 20.0 + 0.1 * x + 0.07 * y
  image = np.repeat(np.round(ramp(xs, ys))[..., None], 3, -1).astype(np.uint8)
  out, matrix = crop.authors_crop(image, [750.4, 690.2], scale, 480)
  grid = np.stack(np.mgrid[40:440:7, 40:440:7][::-1], -1).reshape(-1, 2).astype(np.float64)
  source = crop.apply_affine(grid, crop.invert_affine(matrix))
  values = out[grid[:, 1].astype(int), grid[:, 0].astype(int), 0].astype(np.float64)
  assert np.abs(values - ramp(source[:, 0], source[:, 1])).mean() < 0.6
  # The exact map is about one input pixel (up to one window pixel) away.
  exact = crop.face_crop_affine([750.4, 690.2], scale / 1.25, 480)
  shift = crop.apply_affine(source, exact) - grid
  assert (np.abs(shift) < 1.0 + 480 / (200 * scale)).all() and shift.mean() < 0


def test_the_authors_crop_refuses_what_it_cannot_cut():
  with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image"):
    crop.authors_crop(np.zeros((10, 10), np.uint8), [5, 5], 1.0, 64)
  with pytest.raises(ValueError, match="shrinks below 2 px"):
    crop.authors_crop(np.zeros((3, 3, 3), np.uint8), [1, 1], 40.0, 64)
