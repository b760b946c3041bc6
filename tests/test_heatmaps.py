import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgtbt_jax import heatmaps as H
from fgtbt_jax import landmarks as L

# Compiled once per method and shape: much faster than op-by-op dispatch.
_decode = jax.jit(H.decode, static_argnames=("method", "smoothing_sigma"))


def _render(points, height, width, sigma, **kwargs):
  points = np.asarray(points, np.float32)
  return np.asarray(H.render_gaussian(points, np.ones(points.shape[:-1], bool),
                                      height, width, sigma, **kwargs))


def _random_points(rng, n, height, width, margin=0.0):
  """Sub-pixel centres anywhere in [-0.5 + margin, size - 0.5 - margin)."""
  x = rng.uniform(-0.5 + margin, width - 0.5 - margin, n)
  y = rng.uniform(-0.5 + margin, height - 0.5 - margin, n)
  return np.stack([x, y], -1).astype(np.float32)


def test_input_heatmap_mapping_known_values_and_inverse():
  x = np.array([-0.5, 0.0, 1.0, 479.0, 479.5])
  # Input edges map to heatmap edges; pixel centres land between heatmap centres.
  np.testing.assert_allclose(H.input_to_heatmap(x, 2), [-0.5, -0.25, 0.25, 239.25, 239.5])
  # Heatmap pixel 0 at stride 4 is centred on input pixels 0..3, i.e. at 1.5.
  np.testing.assert_allclose(H.input_to_heatmap(np.array([1.5, 5.5]), 4), [0.0, 1.0])
  np.testing.assert_allclose(H.heatmap_to_input(H.input_to_heatmap(x, 4), 4), x)
  np.testing.assert_allclose(H.heatmap_to_input(jnp.asarray([0.0, 239.0]), 2), [0.5, 478.5])


def test_render_matches_dense_formula_at_subpixel_centres():
  points = np.array([[3.3, 4.7], [0.0, 0.0], [9.2, -0.4]], np.float32)
  sigma = 1.7
  maps = _render(points, 8, 11, sigma)
  assert maps.shape == (8, 11, 3) and maps.dtype == np.float32
  yy, xx = np.mgrid[0:8, 0:11]
  for k, (cx, cy) in enumerate(points):
    expected = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
    np.testing.assert_allclose(maps[..., k], expected, rtol=1e-5, atol=1e-7)


def test_render_peak_one_at_integer_centres():
  points = np.array([[2.0, 5.0], [0.0, 0.0], [15.0, 9.0]], np.float32)
  maps = _render(points, 10, 16, 2.0)
  for k, (x, y) in enumerate(points.astype(int)):
    assert maps[y, x, k] == 1.0
    assert maps[..., k].max() == 1.0
    assert np.unravel_index(maps[..., k].argmax(), (10, 16)) == (y, x)
  np.testing.assert_allclose(maps[5, 3, 0], np.exp(-1 / 8), rtol=1e-6)


def test_render_zeroes_masked_nonfinite_and_outside_channels():
  height, width = 6, 9
  points = np.array([
      [4.0, 3.0],                  # 0 valid
      [4.0, 3.0],                  # 1 masked out
      [np.nan, 3.0],               # 2 NaN
      [4.0, np.inf],               # 3 inf
      [-0.6, 3.0],                 # 4 left of the map
      [width - 0.5, 3.0],          # 5 right edge is exclusive
      [4.0, height - 0.5],         # 6 bottom edge is exclusive
      [-0.5, -0.5],                # 7 top-left corner is inside
      [width - 0.51, height - 0.51],  # 8 just inside
  ], np.float32)
  mask = np.ones(len(points), bool)
  mask[1] = False
  maps = np.asarray(H.render_gaussian(points, mask, height, width, 1.5))
  assert np.isfinite(maps).all()
  peaks = maps.max(axis=(0, 1))
  np.testing.assert_array_equal(peaks[[1, 2, 3, 4, 5, 6]], 0.0)
  assert peaks[0] == 1.0 and peaks[7] > 0.8 and peaks[8] > 0.8


def test_rounded_variant_centres_on_nearest_pixel():
  points = np.array([[3.4, 2.6], [3.5, 1.5], [-0.5, 4.49]], np.float32)
  rounded = _render(points, 7, 8, 2.0, rounded=True)
  # Ties round up, the same for x and y.
  expected = _render([[3.0, 3.0], [4.0, 2.0], [0.0, 4.0]], 7, 8, 2.0)
  np.testing.assert_allclose(rounded, expected, rtol=1e-6)
  assert (rounded.max(axis=(0, 1)) == 1.0).all()
  assert not np.allclose(rounded, _render(points, 7, 8, 2.0))


def test_authors_targets_sit_at_trunc_x_plus_one():
  points = np.array([[3.4, 2.6], [3.0, 1.99], [-0.5, 4.49]], np.float32)
  authors = _render(points, 7, 8, 2.0, rounded="authors")
  expected = _render(np.trunc(points + 1.0), 7, 8, 2.0)  # The definition, directly.
  np.testing.assert_allclose(authors, expected, rtol=1e-6)
  assert H.target_rounding(True) == "nearest" and H.target_rounding(False) == "none"
  with pytest.raises(ValueError, match="target rounding 'floor'"):
    _render(points, 7, 8, 2.0, rounded="floor")


def test_render_dtype_and_full_size_memory():
  """B=8, 240x240, 124 channels: no (H, W, K)-sized temporaries beyond the output."""
  render = jax.jit(functools.partial(H.render_gaussian, height=240, width=240, sigma=3.0))
  points = jnp.asarray(np.random.default_rng(0).uniform(0, 239, (8, 124, 2)), jnp.float32)
  mask = jnp.ones((8, 124), bool)
  compiled = render.lower(points, mask).compile()
  stats = compiled.memory_analysis()
  assert stats.output_size_in_bytes == 8 * 240 * 240 * 124 * 4
  assert stats.temp_size_in_bytes < 0.05 * stats.output_size_in_bytes
  maps = compiled(points, mask)
  assert maps.shape == (8, 240, 240, 124)
  np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, atol=0.05)
  half = H.render_gaussian(points[:1, :3], mask[:1, :3], 16, 16, 2.0, dtype=jnp.bfloat16)
  assert half.dtype == jnp.bfloat16


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_decoders_on_clean_gaussians(sigma):
  rng = np.random.default_rng(int(sigma * 10))
  height, width = 40, 48
  points = _random_points(rng, 300, height, width, margin=0.01)
  # Near but inside every border.
  points[:4] = [[-0.45, 20.0], [width - 0.55, 7.3], [12.6, -0.4], [30.2, height - 0.52]]
  maps = _render(points, height, width, sigma)
  errors = {}
  for method in H.DECODERS:
    coords, confidence = _decode(maps, method)
    coords = np.asarray(coords)
    assert coords.shape == points.shape and coords.dtype == np.float32
    np.testing.assert_allclose(confidence, maps.max(axis=(0, 1)))
    errors[method] = np.linalg.norm(coords - points, axis=-1)
    if method == "argmax":
      assert np.abs(coords - points).max() <= 0.5 + 1e-5
      np.testing.assert_array_equal(coords, np.round(coords))
  assert errors["subpixel"].max() < 0.05
  assert errors["quarter"].mean() < 0.6 * errors["argmax"].mean()
  # Uniform sub-pixel phase: argmax's mean error is (sqrt(2) + asinh(1)) / 6.
  np.testing.assert_allclose(errors["argmax"].mean(), 0.3826, rtol=0.1)


def test_quarter_known_answers():
  points = np.array([[5.1, 3.0], [5.0, 2.8], [0.3, 3.0], [9.0, 0.0]], np.float32)
  coords, _ = _decode(_render(points, 7, 10, 1.5), "quarter")
  # Shift towards the higher neighbour; none on the border or when neighbours tie.
  np.testing.assert_allclose(coords, [[5.25, 3.0], [5.0, 2.75], [0.0, 3.0], [9.0, 0.0]])


def test_subpixel_smoothing_clean_and_noisy():
  rng = np.random.default_rng(1)
  points = _random_points(rng, 100, 48, 48, margin=10.0)
  clean = _render(points, 48, 48, 2.0)
  coords, _ = _decode(clean, "subpixel", smoothing_sigma=1.0)
  assert np.linalg.norm(np.asarray(coords) - points, axis=-1).max() < 0.05
  noisy = clean + 0.05 * rng.standard_normal(clean.shape).astype(np.float32)
  raw, _ = _decode(noisy, "subpixel")
  smoothed, _ = _decode(noisy, "subpixel", smoothing_sigma=1.0)
  argmax, _ = _decode(noisy, "argmax")
  error = lambda c: np.linalg.norm(np.asarray(c) - points, axis=-1).mean()
  assert error(smoothed) < 0.8 * error(raw) < error(argmax)
  # The refinement never leaves the argmax pixel's cell.
  assert np.abs(np.asarray(raw) - np.asarray(argmax)).max() <= 0.5 + 1e-6
  with pytest.raises(ValueError, match="subpixel"):
    H.decode(clean, "argmax", smoothing_sigma=1.0)


def test_subpixel_falls_back_to_argmax_on_flat_maps():
  maps = np.zeros((9, 9, 2), np.float32)
  maps[4, 6, 1] = 1.0  # A lone spike: a symmetric peak, no offset.
  coords, confidence = _decode(maps, "subpixel")
  # An all-zero channel has a flat log (no maximum): the argmax is kept.
  np.testing.assert_array_equal(coords[0], [0.0, 0.0])
  np.testing.assert_allclose(coords[1], [6.0, 4.0], atol=1e-6)
  np.testing.assert_array_equal(confidence, [0.0, 1.0])


def _decode_all(maps):
  return {method: H.decode(maps, method) for method in H.DECODERS}


def test_render_and_decode_jit_and_vmap():
  rng = np.random.default_rng(2)
  points = np.stack([_random_points(rng, 5, 20, 24) for _ in range(3)])  # (3, 5, 2)
  mask = np.ones((3, 5), bool)
  mask[1, 2] = False
  render = functools.partial(H.render_gaussian, height=20, width=24, sigma=2.0)
  eager = render(points, mask)
  assert (np.asarray(eager)[1, :, :, 2] == 0).all()
  np.testing.assert_allclose(jax.jit(render)(points, mask), eager, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(render))(points, mask), eager, rtol=1e-6)
  compiled = jax.jit(_decode_all)(eager)
  vmapped = jax.jit(jax.vmap(_decode_all))(eager)
  for method in H.DECODERS:
    np.testing.assert_allclose(vmapped[method][0], compiled[method][0], atol=1e-5)
    np.testing.assert_allclose(vmapped[method][1], compiled[method][1], rtol=1e-6)
  np.testing.assert_allclose(compiled["subpixel"][0][mask], points[mask], atol=1e-3)
  # Eager (op by op) agrees with the compiled decoder.
  np.testing.assert_array_equal(H.decode(eager, "argmax")[0], compiled["argmax"][0])
  # Extra leading dims work too.
  assert _decode(eager[None], "subpixel")[0].shape == (1, 3, 5, 2)


@pytest.mark.parametrize("protocol", [None, "WFLW"])
def test_flip_round_trip_through_image_space(protocol):
  """Render, mirror the image-space points, render, flip back: the same maps."""
  stride, input_size = 2, 64
  if protocol is None:
    perm, n = L.UNIFIED_FLIP_PERMUTATION, L.NUM_UNIFIED
  else:
    perm, n = L.get_protocol(protocol).flip_permutation, L.get_protocol(protocol).num_landmarks
  rng = np.random.default_rng(3)
  points = rng.uniform(0, input_size - 1, (2, n, 2)).astype(np.float32)
  mask = rng.uniform(size=(2, n)) > 0.2
  size = input_size // stride
  maps = H.render_gaussian(H.input_to_heatmap(points, stride), mask, size, size, 1.5)
  mirrored_points = L.flip_points(points, input_size, protocol)
  mirrored_mask = mask[..., perm]
  mirrored = H.render_gaussian(
      H.input_to_heatmap(mirrored_points, stride), mirrored_mask, size, size, 1.5)
  np.testing.assert_allclose(H.flip_heatmaps(mirrored, perm), maps, atol=1e-6)
  np.testing.assert_allclose(H.merge_flipped(maps, mirrored, perm), maps, atol=1e-6)
  np.testing.assert_array_equal(H.flip_heatmaps(H.flip_heatmaps(maps, perm), perm), maps)
  # Permutation matters: without it the channels would not line up.
  assert not np.allclose(np.asarray(mirrored)[..., ::-1, :], maps, atol=1e-3)


def test_merge_flipped_averages():
  perm = np.array([1, 0, 2])
  a = np.random.default_rng(4).uniform(size=(2, 4, 5, 3)).astype(np.float32)
  b = np.random.default_rng(5).uniform(size=(2, 4, 5, 3)).astype(np.float32)
  merged = np.asarray(H.merge_flipped(a, b, perm))
  np.testing.assert_allclose(merged[..., 0], 0.5 * (a[..., 0] + b[..., ::-1, 1]), rtol=1e-6)
  np.testing.assert_allclose(merged[..., 2], 0.5 * (a[..., 2] + b[..., ::-1, 2]), rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  points = np.zeros((4, 2), np.float32)
  mask = np.ones(4, bool)
  with pytest.raises(ValueError, match=r"\(\.\.\., K, 2\)"):
    H.render_gaussian(np.zeros((4, 3)), mask, 8, 8, 1.0)
  with pytest.raises(ValueError, match=r"mask shape \(3,\)"):
    H.render_gaussian(points, np.ones(3, bool), 8, 8, 1.0)
  with pytest.raises(ValueError, match="sigma must be positive, got 0"):
    H.render_gaussian(points, mask, 8, 8, 0)
  render = jax.jit(functools.partial(H.render_gaussian, height=8, width=8, sigma=1.0))
  with pytest.raises(ValueError, match="mask shape"):  # At trace time under jit.
    render(points, np.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"'argmax', 'quarter', 'subpixel'"):
    H.decode(np.zeros((8, 8, 4)), "dark")
  with pytest.raises(ValueError, match=r"\(\.\.\., H, W, K\)"):
    H.decode(np.zeros((8, 8)), "argmax")
  with pytest.raises(ValueError, match="at least 3x3"):
    H.decode(np.zeros((2, 8, 4)), "subpixel")
  with pytest.raises(ValueError, match=r"flip_permutation has shape \(124,\)"):
    H.flip_heatmaps(np.zeros((8, 8, 98)), L.UNIFIED_FLIP_PERMUTATION)
  with pytest.raises(ValueError, match="differ in shape"):
    H.merge_flipped(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)), [0, 1, 2])
