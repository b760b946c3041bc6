"""The face crop convention, defined once for conversion, training and prediction.

HRNet-style face alignment code describes a face by the centre of its box and a
scale `s = max(w, h) / 200`; the network input is the square of side
`s * 200 * crop_enlarge` (crop_enlarge = 1.25) around the centre, resized to
S x S pixels. Augmentation multiplies the side by a random factor, rotates the
square about the centre and mirrors it.

Coordinates follow the pixel-centre convention: pixel (i, j) is the unit square
centred on the integer point (x=j, y=i), so an image of width W spans
[-0.5, W - 0.5] in x. A crop square of side L around centre c, resized to S
pixels, maps c to the output's centre (S - 1) / 2 and the square's edges to
-0.5 and S - 0.5:

    u = (S / L) * R(theta) (x - c) + (S - 1) / 2

and a horizontal flip mirrors the output, u_x -> S - 1 - u_x. cv2.warpAffine
samples output pixel u at input point M^-1 u with integer coordinates at pixel
centres, so the matrices here are exact for it (no half-pixel shift, unlike
HRNet's own `get_transform`, which maps the centre to S / 2).

All matrices are 2x3 float64 numpy arrays mapping input points (x, y) to output
points: `apply_affine(points, m) = points @ m[:, :2].T + m[:, 2]`.

`warp_to_crop` cuts a crop out of an image with such a matrix, the same way
for stored crops (conversion) and network crops (prediction).

`authors_crop` is the FGTBT authors' test-time crop instead (their
HRNet-style loader): an integer pixel window resampled with PIL's bicubic
filter, its content about one input pixel right and down of the exact crop.
The `--convention authors` conversion stores it for test splits, so that the
released weights see the pixels they were measured on.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

# HRNet's unit: scale 1.0 is a 200 px face box.
SCALE_UNIT = 200.0
# The network crop is the face box enlarged 1.25x (HRNet, FGTBT).
CROP_ENLARGE = 1.25
# The image is area-averaged before the bilinear warp when the warp shrinks
# by more than this factor (bilinear sampling alone would alias).
_AREA_SHRINK_BELOW = 0.5


def center_scale_from_box(box) -> tuple[np.ndarray, float]:
  """Centre (2,) and HRNet scale max(w, h) / 200 of a box (x1, y1, x2, y2)."""
  x1, y1, x2, y2 = np.asarray(box, np.float64).reshape(4)
  if not (x2 > x1 and y2 > y1):
    raise ValueError(f"face box must have x2 > x1 and y2 > y1, got {box!r}")
  center = np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0])
  return center, float(max(x2 - x1, y2 - y1) / SCALE_UNIT)


def crop_affine(center, scale: float, output_size: int, rotation_deg: float = 0.0,
                flip: bool = False, extra_scale: float = 1.0) -> np.ndarray:
  """2x3 matrix mapping image points into an S x S crop (S = output_size).

  Args:
    center: (2,) crop centre (x, y) in the input image.
    scale: crop scale: the square has side `scale * 200 * extra_scale` input
      pixels. Pass the face scale already enlarged by `crop_enlarge` (see
      `face_crop_affine`).
    output_size: S, the side of the output crop in pixels.
    rotation_deg: rotates the image content counter-clockwise on screen (x
      right, y down) by this angle about the centre, like
      cv2.getRotationMatrix2D.
    flip: mirror the crop horizontally (after rotation). Point identities are
      not touched here: permute left/right points with the protocol's
      flip_permutation.
    extra_scale: multiplies the crop side (augmentation: > 1 zooms out).

  Returns:
    (2, 3) float64 matrix from input points to crop points.
  """
  center = np.asarray(center, np.float64).reshape(2)
  side = float(scale) * SCALE_UNIT * float(extra_scale)
  if not (np.isfinite(side) and side > 0):
    raise ValueError(f"crop side must be positive and finite, got scale={scale}, "
                     f"extra_scale={extra_scale}")
  if int(output_size) <= 0:
    raise ValueError(f"output_size must be positive, got {output_size}")
  size = float(output_size)
  theta = np.deg2rad(float(rotation_deg))
  cos, sin = np.cos(theta), np.sin(theta)
  linear = (size / side) * np.array([[cos, sin], [-sin, cos]])
  if flip:
    linear = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ linear
  out_center = np.full(2, (size - 1.0) / 2.0)
  return np.concatenate([linear, (out_center - linear @ center)[:, None]], axis=1)


def face_crop_affine(center, scale: float, output_size: int, *,
                     crop_enlarge: float = CROP_ENLARGE, rotation_deg: float = 0.0,
                     flip: bool = False, extra_scale: float = 1.0) -> np.ndarray:
  """The network crop of a face with HRNet centre/scale: side 200 * scale * crop_enlarge."""
  return crop_affine(center, float(scale) * float(crop_enlarge), output_size,
                     rotation_deg=rotation_deg, flip=flip, extra_scale=extra_scale)


def invert_affine(matrix) -> np.ndarray:
  """Inverse of a (..., 2, 3) affine matrix (maps crop points back)."""
  matrix = np.asarray(matrix, np.float64)
  linear, shift = matrix[..., :2], matrix[..., 2:]
  inverse = np.linalg.inv(linear)
  return np.concatenate([inverse, -inverse @ shift], axis=-1)


def compose_affine(outer, inner) -> np.ndarray:
  """The (..., 2, 3) matrix of `outer(inner(x))`."""
  outer = np.asarray(outer, np.float64)
  inner = np.asarray(inner, np.float64)
  linear = outer[..., :2] @ inner[..., :2]
  shift = outer[..., :2] @ inner[..., 2:] + outer[..., 2:]
  return np.concatenate([linear, shift], axis=-1)


def apply_affine(points, matrix):
  """Maps (..., N, 2) points with a (..., 2, 3) matrix (batch dims broadcast).

  Works on numpy and jax arrays alike (only @, + and swapaxes are used), so
  predictions can be mapped back on device. NaN points stay NaN. numpy points
  keep their floating dtype (float32 in, float32 out).
  """
  if isinstance(points, (list, tuple)):
    points = np.asarray(points, np.float64)
  if isinstance(matrix, (list, tuple)):
    matrix = np.asarray(matrix, np.float64)
  out = points @ matrix[..., :2].swapaxes(-1, -2) + matrix[..., None, :, 2]
  if isinstance(points, np.ndarray) and np.issubdtype(points.dtype, np.floating):
    out = out.astype(points.dtype, copy=False)
  return out


def warp_to_crop(image: np.ndarray, to_crop: np.ndarray, size: int, *,
                 whole_image: bool = False) -> np.ndarray:
  """Warps `image` with the 2x3 matrix `to_crop` into a size x size crop.

  Bilinear, black outside the image. When the warp shrinks by more than 2x,
  the image is first area-averaged (cv2.INTER_AREA) to about twice the
  crop's resolution, and the resize's exact pixel-centre map
  x' = r (x + 0.5) - 0.5 is folded into the matrix.

  Args:
    image: (H, W, C) uint8 image (any channel count OpenCV warps).
    to_crop: (2, 3) map from image pixels to crop pixels.
    size: side of the square output.
    whole_image: area-average the whole image rather than only the region
      the crop covers (plus a margin of a few crop pixels). The region is
      far cheaper on huge images; the results differ by a grey level or two
      where the resize ratios round differently. Conversion (stored crops)
      uses the whole image so that existing conversions stay bit-identical.

  Returns:
    (size, size, C) uint8 crop.
  """
  shrink = float(np.sqrt(abs(np.linalg.det(to_crop[:, :2]))))
  if shrink < _AREA_SHRINK_BELOW and whole_image:
    h, w = image.shape[:2]
    new_w, new_h = max(1, round(w * shrink * 2)), max(1, round(h * shrink * 2))
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    rx, ry = new_w / w, new_h / h
    resize = np.array([[rx, 0, 0.5 * rx - 0.5], [0, ry, 0.5 * ry - 0.5]])
    to_crop = compose_affine(to_crop, invert_affine(resize))
  elif shrink < _AREA_SHRINK_BELOW:
    height, width = image.shape[:2]
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    covered = apply_affine(corners, invert_affine(to_crop))
    margin = 2.0 / shrink  # A few crop pixels: the bilinear footprint at the edge.
    x0 = int(np.clip(np.floor(covered[:, 0].min() - margin), 0, width))
    y0 = int(np.clip(np.floor(covered[:, 1].min() - margin), 0, height))
    x1 = int(np.clip(np.ceil(covered[:, 0].max() + margin) + 1, 0, width))
    y1 = int(np.clip(np.ceil(covered[:, 1].max() + margin) + 1, 0, height))
    if x1 <= x0 or y1 <= y0:
      return np.zeros((size, size) + image.shape[2:], np.uint8)
    region = image[y0:y1, x0:x1]
    new_w = max(1, round((x1 - x0) * shrink * 2))
    new_h = max(1, round((y1 - y0) * shrink * 2))
    region = cv2.resize(region, (new_w, new_h), interpolation=cv2.INTER_AREA)
    rx, ry = new_w / (x1 - x0), new_h / (y1 - y0)
    # Original pixel (x, y) -> resized region pixel.
    to_region = np.array([[rx, 0.0, rx * (0.5 - x0) - 0.5], [0.0, ry, ry * (0.5 - y0) - 0.5]])
    image, to_crop = region, compose_affine(to_crop, invert_affine(to_region))
  return cv2.warpAffine(np.ascontiguousarray(image), to_crop, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _authors_window_corner(point: float, center, side: float, size: int) -> np.ndarray:
  """Their integer window corner: their inverse crop map of (point - 1) per axis,
  truncated toward zero, plus 1 (their `transform_pixel(..., invert=1)`)."""
  # Their 3x3 map: x' = (S / h) x + S (0.5 - c / h); inverted as a matrix, as they do.
  forward = np.array([[size / side, 0.0, size * (-float(center[0]) / side + 0.5)],
                      [0.0, size / side, size * (-float(center[1]) / side + 0.5)],
                      [0.0, 0.0, 1.0]])
  mapped = np.linalg.inv(forward) @ np.array([point - 1.0, point - 1.0, 1.0])
  return mapped[:2].astype(int) + 1


def authors_crop(image: np.ndarray, center, scale: float, size: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
  """The FGTBT authors' test-time face crop (rotation 0) and its exact affine map.

  Their loader's steps (facts from their `datasets/transforms.py`, SPEC): with
  h = 200 * scale and sf = h / S,
  1. when sf >= 2 the whole image is first resized to (floor(W / sf),
     floor(H / sf)) with PIL's bicubic filter, and the centre and scale
     divided by sf (their centre is a float32 tensor);
  2. the window corners are ul = int(T^-1(-1)) + 1 and br = int(T^-1(S - 1)) + 1
     per axis (T their crop map, `int` truncating toward zero);
  3. the integer window [ul, br) is copied into a black canvas (parts outside
     the image stay black) and resized to S x S with PIL's bicubic filter.

  Args:
    image: (H, W, 3) uint8 RGB image.
    center: (2,) their face centre (x, y) in image pixels.
    scale: their scale, already enlarged 1.25x (the crop side is 200 * scale).
    size: S, the crop side.

  Returns:
    (S, S, 3) uint8 crop and the (2, 3) matrix mapping image points (pixel
    centres at integers) to crop points as the pixels were resampled (PIL's
    resize maps pixel centres: x' = (x + 0.5) * out / in - 0.5). The matrix
    differs from `face_crop_affine`'s exact map by up to about one input
    pixel (the integer window) and by the window's rounding per axis.
  """
  image = np.asarray(image, np.uint8)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"authors_crop: expected an (H, W, 3) image, got shape {image.shape}")
  size = int(size)
  center = np.asarray(center, np.float32).reshape(2)
  height, width = image.shape[:2]
  to_source = np.eye(2, 3)
  factor = float(scale) * SCALE_UNIT / size
  if factor >= 2.0:
    new_w, new_h = int(np.floor(width / factor)), int(np.floor(height / factor))
    if max(new_w, new_h) < 2:
      raise ValueError(f"authors_crop: a {width} x {height} image shrinks below 2 px for a "
                       f"crop of scale {scale:g} at {size} px")
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    rx, ry = new_w / width, new_h / height
    to_source = np.array([[rx, 0.0, 0.5 * rx - 0.5], [0.0, ry, 0.5 * ry - 0.5]])
    center = (center / np.float32(factor)).astype(np.float32)
    scale = float(scale) / factor
    height, width = image.shape[:2]
  side = float(scale) * SCALE_UNIT
  ul = _authors_window_corner(0.0, center, side, size)
  br = _authors_window_corner(float(size), center, side, size)
  window_w, window_h = int(br[0] - ul[0]), int(br[1] - ul[1])
  if window_w < 1 or window_h < 1:
    raise ValueError(f"authors_crop: an empty crop window for scale {scale:g}")
  canvas = np.zeros((window_h, window_w, 3), np.uint8)
  x0, y0 = max(0, ul[0]), max(0, ul[1])
  x1, y1 = min(width, br[0]), min(height, br[1])
  if x1 > x0 and y1 > y0:
    canvas[y0 - ul[1]:y1 - ul[1], x0 - ul[0]:x1 - ul[0]] = image[y0:y1, x0:x1]
  crop_image = np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC))
  # Source pixel x -> window pixel x - ul -> crop pixel (x - ul + 0.5) * S / window - 0.5.
  sx, sy = size / window_w, size / window_h
  window_to_crop = np.array([[sx, 0.0, sx * (0.5 - ul[0]) - 0.5],
                             [0.0, sy, sy * (0.5 - ul[1]) - 0.5]])
  return crop_image, compose_affine(window_to_crop, to_source)
