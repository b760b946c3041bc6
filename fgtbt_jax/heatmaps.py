"""Gaussian heatmap targets, heatmap decoders and the flip test-time merge.

Pure JAX functions that jit and vmap; they run on device in the train step
(targets) and in evaluation (decoding, flip merge).

Conventions, used everywhere in the project:

* Heatmaps are channels last: (..., H, W, K), one channel per landmark.
* Coordinates are (x, y) floats with integer values at pixel centres, so the
  image covers [-0.5, W - 0.5) x [-0.5, H - 0.5).
* A heatmap at 1/stride of the input resolution relates to input pixels by
  `input_to_heatmap` / `heatmap_to_input`, the one definition of that mapping
  (the FGTBT model predicts heatmaps at stride 2: 240x240 for a 480 input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Names accepted by `decode`, in order of increasing accuracy.
DECODERS: tuple[str, ...] = ("argmax", "quarter", "subpixel")
# Decoders of the HIH head's two maps (`decode_hih`): integer argmax plus the
# decimal map's argmax, or its sub-pixel fit.
HIH_DECODERS: tuple[str, ...] = ("hih", "hih_subpixel")
# Every decoder of `decode_outputs`.
ALL_DECODERS: tuple[str, ...] = DECODERS + HIH_DECODERS

# Floor applied before taking the log of heatmap values in the sub-pixel
# decoder, so that zero or negative network outputs stay finite.
_LOG_FLOOR = 1e-10


def input_to_heatmap(points, stride: float):
  """Maps input-pixel coordinates to the coordinates of a 1/stride heatmap.

  With pixel centres at integers, input pixel x covers [x - 0.5, x + 0.5), so
  the continuous position x + 0.5 (measured from the image edge) scales by
  1/stride: h = (x + 0.5) / stride - 0.5. Works on numpy and JAX arrays.
  """
  return (points + 0.5) / stride - 0.5


def heatmap_to_input(points, stride: float):
  """Inverse of `input_to_heatmap`: x = (h + 0.5) * stride - 0.5."""
  return (points + 0.5) * stride - 0.5


def _check_points_and_mask(points, mask) -> None:
  if points.ndim < 2 or points.shape[-1] != 2:
    raise ValueError(f"render_gaussian: points must have shape (..., K, 2), got {points.shape}")
  if mask.shape != points.shape[:-1]:
    raise ValueError(
        f"render_gaussian: mask shape {mask.shape} does not match points shape "
        f"{points.shape} (expected {points.shape[:-1]})")


def render_gaussian(points, mask, height: int, width: int, sigma,
                    rounded: bool = False, dtype=jnp.float32) -> jax.Array:
  """Renders one Gaussian heatmap per landmark, channels last.

  Args:
    points: (..., K, 2) landmark (x, y) in heatmap pixels.
    mask: (..., K) bool; False channels are rendered as all zeros.
    height, width: static heatmap size.
    sigma: Gaussian standard deviation in heatmap pixels.
    rounded: where each Gaussian is centred (`TARGET_ROUNDINGS`): False /
      "none" the exact sub-pixel centre; True / "nearest" the nearest integer
      pixel (ties round up); "authors" trunc(x + 1), the FGTBT authors'
      targets (about +0.5 px right and down of the exact centre).
    dtype: dtype of the returned heatmaps.

  Returns:
    (..., height, width, K) heatmaps with value 1 at the (possibly rounded)
    centre. Channels whose point is masked out, not finite, or outside the
    map (centre outside [-0.5, width - 0.5) x [-0.5, height - 0.5)) are zero.

  The Gaussian is separable, so it is built as the outer product of a column
  and a row profile: the only (H, W, K)-sized array is the output itself.
  """
  points = jnp.asarray(points)
  mask = jnp.asarray(mask)
  _check_points_and_mask(points, mask)
  if isinstance(sigma, (int, float)) and not sigma > 0:
    raise ValueError(f"render_gaussian: sigma must be positive, got {sigma}")
  points = points.astype(jnp.float32)
  x, y = points[..., 0], points[..., 1]
  inside = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
  valid = mask.astype(bool) & jnp.isfinite(x) & jnp.isfinite(y) & inside
  # Park invalid centres at 0 so no NaN reaches the profiles; their channel is
  # zeroed through the row profile below.
  x = jnp.where(valid, x, 0.0)
  y = jnp.where(valid, y, 0.0)
  rounding = target_rounding(rounded)
  if rounding == "nearest":
    x, y = jnp.floor(x + 0.5), jnp.floor(y + 0.5)
  elif rounding == "authors":  # trunc(x + 1) = floor(x) + 1 on the map (x >= -0.5).
    x, y = jnp.floor(x) + 1.0, jnp.floor(y) + 1.0
  inv_two_var = 1.0 / (2.0 * jnp.square(jnp.asarray(sigma, jnp.float32)))
  columns = jnp.arange(width, dtype=jnp.float32)[:, None]  # (W, 1)
  rows = jnp.arange(height, dtype=jnp.float32)[:, None]  # (H, 1)
  profile_x = jnp.exp(-jnp.square(columns - x[..., None, :]) * inv_two_var)  # (..., W, K)
  profile_y = jnp.exp(-jnp.square(rows - y[..., None, :]) * inv_two_var)  # (..., H, K)
  profile_x = jnp.where(valid[..., None, :], profile_x, 0.0)
  return (profile_y.astype(dtype)[..., :, None, :] *
          profile_x.astype(dtype)[..., None, :, :])


TARGET_ROUNDINGS = ("none", "nearest", "authors")


def target_rounding(rounded: bool | str) -> str:
  """A `render_gaussian` rounding as one of TARGET_ROUNDINGS (booleans: none / nearest)."""
  if isinstance(rounded, (bool, np.bool_)):
    return "nearest" if rounded else "none"
  if rounded not in TARGET_ROUNDINGS:
    raise ValueError(f"target rounding {rounded!r}: expected one of {TARGET_ROUNDINGS}")
  return rounded


def _check_heatmaps(heatmaps, what: str) -> None:
  if heatmaps.ndim < 3:
    raise ValueError(f"{what}: heatmaps must have shape (..., H, W, K), got {heatmaps.shape}")


def _gather(flat, y, x, width: int):
  """Values of (..., H*W, K) maps at integer (y, x) of shape (..., K) or (..., S, K)."""
  index = y * width + x
  if index.ndim == flat.ndim - 1:
    return jnp.take_along_axis(flat, index[..., None, :], axis=-2)[..., 0, :]
  return jnp.take_along_axis(flat, index, axis=-2)


def _gaussian_blur(heatmaps, sigma: float):
  """Separable Gaussian blur over H and W of (..., H, W, K), zero padded."""
  radius = max(1, int(np.ceil(3.0 * sigma)))
  taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2.0 * sigma ** 2))
  taps = taps / taps.sum()
  height, width = heatmaps.shape[-3], heatmaps.shape[-2]
  lead = [(0, 0)] * (heatmaps.ndim - 3)
  padded = jnp.pad(heatmaps, lead + [(radius, radius), (0, 0), (0, 0)])
  blurred = sum(float(t) * padded[..., i:i + height, :, :] for i, t in enumerate(taps))
  padded = jnp.pad(blurred, lead + [(0, 0), (radius, radius), (0, 0)])
  return sum(float(t) * padded[..., :, i:i + width, :] for i, t in enumerate(taps))


def _quarter_offset(flat, x, y, height: int, width: int):
  """HRNet's refinement: 0.25 px towards the higher neighbour, per axis.

  Only where both neighbours on that axis exist (not on the map border).
  """
  right = _gather(flat, y, jnp.minimum(x + 1, width - 1), width)
  left = _gather(flat, y, jnp.maximum(x - 1, 0), width)
  down = _gather(flat, jnp.minimum(y + 1, height - 1), x, width)
  up = _gather(flat, jnp.maximum(y - 1, 0), x, width)
  dx = jnp.where((x > 0) & (x < width - 1), 0.25 * jnp.sign(right - left), 0.0)
  dy = jnp.where((y > 0) & (y < height - 1), 0.25 * jnp.sign(down - up), 0.0)
  return dx, dy


def _taylor_refine(flat, x, y, height: int, width: int):
  """Peak of the quadratic fitted to the log heatmap around the argmax (DARK).

  Second-order Taylor expansion of log(heatmap) with central differences on a
  3x3 stencil: offset = -Hessian^-1 gradient. The log of a Gaussian is an
  exact quadratic, so clean Gaussians are recovered to float precision. On
  the map border the stencil is moved one pixel inwards (the derivatives of a
  quadratic are exact anywhere), so peaks at the edge are refined too. Where
  the fit is not a maximum (Hessian not negative definite) the argmax is
  kept; the result is clipped to the argmax pixel's own cell (+-0.5 px),
  since a peak nearer to a neighbour would have made that neighbour the
  argmax.
  """
  cx = jnp.clip(x, 1, width - 2)
  cy = jnp.clip(y, 1, height - 2)
  steps = jnp.asarray([-1, 0, 1])
  dy = jnp.repeat(steps, 3)[:, None]  # (9, 1): row-major 3x3 stencil.
  dx = jnp.tile(steps, 3)[:, None]
  stencil = _gather(flat, cy[..., None, :] + dy, cx[..., None, :] + dx, width)
  log = jnp.log(jnp.maximum(stencil, _LOG_FLOOR))
  log = log.reshape(log.shape[:-2] + (3, 3) + log.shape[-1:])  # (..., 3, 3, K)
  centre = log[..., 1, 1, :]
  grad_x = 0.5 * (log[..., 1, 2, :] - log[..., 1, 0, :])
  grad_y = 0.5 * (log[..., 2, 1, :] - log[..., 0, 1, :])
  dxx = log[..., 1, 2, :] - 2.0 * centre + log[..., 1, 0, :]
  dyy = log[..., 2, 1, :] - 2.0 * centre + log[..., 0, 1, :]
  dxy = 0.25 * (log[..., 2, 2, :] - log[..., 2, 0, :] - log[..., 0, 2, :] + log[..., 0, 0, :])
  det = dxx * dyy - dxy * dxy
  is_maximum = (dxx < 0) & (det > 0)
  safe_det = jnp.where(is_maximum, det, 1.0)
  offset_x = -(dyy * grad_x - dxy * grad_y) / safe_det
  offset_y = -(dxx * grad_y - dxy * grad_x) / safe_det
  xf, yf = x.astype(jnp.float32), y.astype(jnp.float32)
  refined_x = jnp.where(is_maximum, cx + offset_x, xf)
  refined_y = jnp.where(is_maximum, cy + offset_y, yf)
  return jnp.clip(refined_x, xf - 0.5, xf + 0.5), jnp.clip(refined_y, yf - 0.5, yf + 0.5)


def decode(heatmaps, method: str = "argmax", smoothing_sigma: float = 0.0):
  """Landmark coordinates and peak values from (..., H, W, K) heatmaps.

  Methods (`DECODERS`):
    "argmax": the integer pixel of the maximum (the paper's evaluation).
    "quarter": argmax shifted 0.25 px towards the higher neighbour on each
      axis (HRNet); halves argmax's quantisation error on average.
    "subpixel": second-order Taylor refinement of log(heatmap) around the
      argmax (DARK); exact on clean Gaussians. `smoothing_sigma` > 0 first
      blurs the maps with a Gaussian of that sigma (heatmap pixels), which
      steadies the fit on noisy network outputs; the zero padding of the blur
      pulls peaks within about 3 sigma of the border slightly inwards.

  Returns:
    coords (..., K, 2) float32 (x, y) in heatmap pixels, and confidence
    (..., K): each channel's maximum value.
  """
  if method not in DECODERS:
    raise ValueError(f"unknown heatmap decoder {method!r}; expected one of {list(DECODERS)}")
  if smoothing_sigma and method != "subpixel":
    raise ValueError(
        f"smoothing_sigma applies to the 'subpixel' decoder only, got method {method!r}")
  heatmaps = jnp.asarray(heatmaps)
  _check_heatmaps(heatmaps, "decode")
  height, width = heatmaps.shape[-3], heatmaps.shape[-2]
  heatmaps = heatmaps.astype(jnp.float32)
  flat = heatmaps.reshape(heatmaps.shape[:-3] + (height * width, heatmaps.shape[-1]))
  index = jnp.argmax(flat, axis=-2)  # (..., K)
  y, x = index // width, index % width
  confidence = _gather(flat, y, x, width)
  if method == "argmax":
    coords_x, coords_y = x.astype(jnp.float32), y.astype(jnp.float32)
  elif method == "quarter":
    dx, dy = _quarter_offset(flat, x, y, height, width)
    coords_x, coords_y = x + dx, y + dy
  else:
    if height < 3 or width < 3:
      raise ValueError(f"decode: 'subpixel' needs heatmaps of at least 3x3, got {height}x{width}")
    if smoothing_sigma:
      flat = _gaussian_blur(heatmaps, float(smoothing_sigma)).reshape(flat.shape)
    coords_x, coords_y = _taylor_refine(flat, x, y, height, width)
  return jnp.stack([coords_x, coords_y], axis=-1), confidence


def _check_flip_permutation(heatmaps, flip_permutation, what: str) -> np.ndarray:
  _check_heatmaps(heatmaps, what)
  perm = np.asarray(flip_permutation)
  if perm.shape != (heatmaps.shape[-1],):
    raise ValueError(
        f"{what}: flip_permutation has shape {perm.shape}, expected "
        f"({heatmaps.shape[-1]},) for heatmaps of shape {heatmaps.shape}")
  return perm


def flip_heatmaps(heatmaps, flip_permutation) -> jax.Array:
  """Heatmaps of the mirrored image, from those of an image (or back).

  Mirrors along W and swaps channels with the flip permutation (an
  involution, so applying this twice is the identity). Channel k of the
  result is channel flip_permutation[k] mirrored. `flip_permutation` is the
  unified one for 124-channel maps, or a protocol's for its own channels.
  """
  heatmaps = jnp.asarray(heatmaps)
  perm = _check_flip_permutation(heatmaps, flip_permutation, "flip_heatmaps")
  return heatmaps[..., ::-1, :][..., perm]


def merge_flipped(heatmaps, heatmaps_of_mirrored_image, flip_permutation) -> jax.Array:
  """Flip test-time merge: mean of the maps and the flipped-back mirror maps."""
  heatmaps = jnp.asarray(heatmaps)
  mirrored = jnp.asarray(heatmaps_of_mirrored_image)
  if heatmaps.shape != mirrored.shape:
    raise ValueError(
        f"merge_flipped: heatmaps {heatmaps.shape} and mirrored-image heatmaps "
        f"{mirrored.shape} differ in shape")
  return 0.5 * (heatmaps + flip_heatmaps(mirrored, flip_permutation))


# -- Heatmap in Heatmap (HIH): the decimal heatmap of the offset in the peak pixel -------


def peak_pixel(points):
  """The integer pixel where an exact Gaussian centred at `points` peaks: ceil(p - 0.5).

  The nearest pixel, with a tie (p exactly between two pixels) going to the
  lower index, as `jnp.argmax` breaks ties; so the offset p - peak_pixel(p)
  lies in (-0.5, 0.5].
  """
  return jnp.ceil(points - 0.5)


def decimal_coordinates(points, decimal_size: int):
  """(..., 2) position on a decimal_size^2 decimal map of each point's offset in its peak pixel.

  The decimal map spans the peak pixel (HIH paper eq. 1-2): cell c covers the
  offsets [-0.5 + c / d, -0.5 + (c + 1) / d), so the offset o maps to the
  continuous cell coordinate (o + 0.5) d - 0.5 (cell centres at integers, as
  every map here). An offset of exactly +0.5 is put just inside the last cell.
  """
  offset = points - peak_pixel(points)
  cells = (offset + 0.5) * decimal_size - 0.5
  return jnp.minimum(cells, decimal_size - 0.5 - 1e-3)


def decimal_offset(cells, decimal_size: int):
  """Inverse of `decimal_coordinates`: the offset (heatmap pixels) of decimal-map cell coordinates."""
  return (cells + 0.5) / decimal_size - 0.5


def render_decimal_targets(points, mask, decimal_size: int, sigma,
                           rounded: bool | str = False) -> jax.Array:
  """HIH decimal heatmap targets (..., d, d, K) for (..., K, 2) points in heatmap pixels.

  The Gaussian of `sigma` decimal cells at the point's offset within its
  peak pixel (`decimal_coordinates`); `rounded` as in `render_gaussian`
  ("nearest" is the paper's eq. 2-3: the Gaussian on the offset's cell).
  """
  points = jnp.asarray(points, jnp.float32)
  mask = jnp.asarray(mask)
  _check_points_and_mask(points, mask)
  points = jnp.where(mask[..., None], points, 0.0)
  return render_gaussian(decimal_coordinates(points, decimal_size), mask, decimal_size,
                         decimal_size, sigma, rounded=rounded)


def decode_hih(heatmaps, decimal, refine: bool = False):
  """Landmarks from HIH's integer and decimal heatmaps (HIH paper eq. 4).

  Args:
    heatmaps: (..., H, W, K) integer heatmaps.
    decimal: (..., d, d, K) decimal heatmaps, one per landmark.
    refine: locate the decimal map's peak with the sub-pixel fit
      ("subpixel" of `decode`) instead of its argmax cell.

  Returns:
    coords (..., K, 2) = integer argmax + the decimal peak's offset
    (`decimal_offset`), in heatmap pixels; confidence (..., K), the integer
    heatmaps' peaks. With argmax cells the offset is quantised to 1 / d
    pixel: an error of at most 0.5 / d per axis on a perfect pair of maps.
  """
  decimal = jnp.asarray(decimal)
  _check_heatmaps(decimal, "decode_hih")
  size = decimal.shape[-2]
  if decimal.shape[-3] != size:
    raise ValueError(f"decode_hih: decimal maps must be square, got {decimal.shape}")
  integer, confidence = decode(heatmaps, "argmax")
  cells, _ = decode(decimal, "subpixel" if refine else "argmax")
  return integer + decimal_offset(cells, size), confidence


def decoder_inputs(method: str) -> tuple[str, ...]:
  """The named model outputs that decoder `method` reads (`decode_outputs`)."""
  if method in HIH_DECODERS:
    return ("heatmaps", "decimal")
  if method in DECODERS:
    return ("heatmaps",)
  raise ValueError(f"unknown heatmap decoder {method!r}; expected one of {list(ALL_DECODERS)}")


def decode_outputs(outputs, method: str = "argmax", smoothing_sigma: float = 0.0):
  """Landmarks and confidence from a head's named outputs (`models.heads`).

  `outputs` maps names to maps: "heatmaps" (..., H, W, K) always; "decimal"
  (..., d, d, K) from the HIH head. The `DECODERS` read the heatmaps, the
  `HIH_DECODERS` both maps (`decode_hih`, "hih_subpixel" with `refine`).
  """
  missing = [name for name in decoder_inputs(method) if name not in outputs]
  if missing:
    raise ValueError(f"decoder {method!r} needs the model outputs {missing} (the 'hih' head's), "
                     f"got only {sorted(outputs)}")
  if method in HIH_DECODERS:
    if smoothing_sigma:
      raise ValueError(f"smoothing_sigma applies to the 'subpixel' decoder only, got {method!r}")
    return decode_hih(outputs["heatmaps"], outputs["decimal"], refine=method == "hih_subpixel")
  return decode(outputs["heatmaps"], method, smoothing_sigma=smoothing_sigma)
