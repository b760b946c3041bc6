"""Synthetic faces with all 124 unified landmarks, and datasets made of them.

`render_face(seed, index)` draws a face-like image from the unified mean face
(`landmarks.mean_face()`), deterministically for a (seed, index) pair: the
shape and expression are deformed (mouth open or closed, smile, brows up or
down, eyes more or less open, gaze), the head is posed (yaw and pitch as a
rotation of a shallow 3-D face, so one side is foreshortened, then in-plane
roll, scale and shift), and the picture gets a skin tone, hair, neck, a
textured background, an illumination gradient, optional make-up, occluding
patches (the occluded points are recorded), blur and noise. Every landmark
sits on drawn structure: the jaw on the face outline, brows on the edges of
filled brow shapes, eye points on the eyelid contours, pupils at the centres
of iris and pupil discs, nose points on the ridge line and the nostril base,
lip points on the outer and inner lip contours.

`write_synthetic_datasets(out_dir)` renders four datasets, each written in one
real annotation format with only its protocol's points, so that the real
readers (`fgtbt_jax.data.readers`) read them end to end:
  WFLW/ raw txt + WFLW_images/ (attribute flags match the rendering),
  300W/ .pts tree (afw, helen/{trainset,testset}, lfpw/{...}, ibug),
  COFW/ COFW_{train,test}_color.mat (MATLAB v7.3 layout, written with h5py),
  AFLW/ HRNet CSVs face_landmarks_aflw_{train,test,test_frontal}.csv + images/.

`calibration_faces(num_faces, image_size, seed)` yields clean faces with their
124 landmarks, e.g. to fit a face detector's box adjustment
(`fgtbt_jax.deploy.detector.calibrate_box_adjustment`).

The facial part of each point (which contour it is drawn on) comes from
`landmarks.FACE_PARTS`.

The command (data_pipelines/synthetic.py; raw files to try the converter on, e.g.
before the real data arrive):

    python -m data_pipelines.synthetic --out ~/synthetic_raw \
        [--datasets wflw,cofw] [--train 40] [--test 20] [--seed 0] \
        [--image-size 256] [--workers N]
    python -m data_pipelines.convert --dataset wflw --src ~/synthetic_raw/WFLW --out DIR
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import time
from typing import Iterator, Mapping

import cv2
import h5py
import numpy as np

from fgtbt_jax import errors
from fgtbt_jax import landmarks
from fgtbt_jax.images import encode_image

# ---------------------------------------------------------------- face parts


def _part_ids(part: str) -> np.ndarray:
  return np.asarray([u for u, p in landmarks.FACE_PARTS.items() if p == part])


_CLOSED_PARTS = ("right_brow", "left_brow", "right_eye", "left_eye", "outer_lip", "inner_lip")


def _contour_orders(mean: np.ndarray) -> dict[str, np.ndarray]:
  """Each part's ids in drawing order along its contour.

  Unified ids interleave the points of different protocols, so id order is
  not contour order. WFLW lists every part along its contour (closed loops
  for brows, eyes and lips), so its order is the skeleton; each point WFLW
  lacks is inserted where it lengthens the mean-face contour least.
  """
  wflw = landmarks.get_protocol("WFLW").unified_index
  orders = {}
  for part, start, stop in landmarks.OWN_PART_RANGES["WFLW"]:
    chain = wflw[start:stop].tolist()
    closed = part in _CLOSED_PARTS
    for u in _part_ids(part):
      if u not in chain:
        _insert_where_shortest(chain, int(u), mean, closed)
    orders[part] = np.asarray(chain)
  return orders


def _insert_where_shortest(chain: list[int], u: int, mean: np.ndarray, closed: bool) -> None:
  """Inserts point `u` into `chain` where it adds the least length."""
  pts = mean[chain]
  to_u = np.linalg.norm(pts - mean[u], axis=1)
  # Detour through u between point i and point i + 1 (wrapping round).
  detour = to_u + np.roll(to_u, -1) - np.linalg.norm(np.roll(pts, -1, 0) - pts, axis=1)
  if closed:
    chain.insert(int(np.argmin(detour)) + 1, u)
  else:  # Also allowed: before the first or after the last point.
    costs = np.concatenate([to_u[:1], detour[:-1], to_u[-1:]])
    chain.insert(int(np.argmin(costs)), u)


_MEAN = landmarks.mean_face()
_ORDER = _contour_orders(_MEAN)
_ID = {part: _part_ids(part) for part in landmarks.PART_NAMES}


def _wflw(*own: int) -> np.ndarray:
  """Unified ids of WFLW points (WFLW's layout names the mouth's parts)."""
  return landmarks.get_protocol("WFLW").unified_index[list(own)]


# WFLW mouth: outer lip 76 (corner), 77-81 upper, 82 (corner), 83-87 lower;
# inner lip 88 (corner), 89-91 upper, 92 (corner), 93-95 lower.
_INNER_UPPER = _wflw(89, 90, 91)  # right to left
_INNER_LOWER = _wflw(95, 94, 93)  # right to left, paired with the upper ones
_OUTER_LOWER = _wflw(83, 84, 85, 86, 87)
_MOUTH_CORNERS = _wflw(76, 82, 88, 92)

_SHIFT = 4  # cv2 sub-pixel bits: coordinates are drawn at 1/16 px.
_AA = cv2.LINE_AA

# ---------------------------------------------------------------- sampling

_HAIR_COLORS = np.asarray([[25, 20, 18], [60, 40, 30], [110, 75, 45], [200, 170, 110],
                           [150, 70, 35], [165, 160, 155]], np.float64)
_IRIS_COLORS = np.asarray([[70, 45, 25], [40, 25, 15], [70, 110, 150], [80, 110, 70],
                           [110, 100, 60]], np.float64)


def _sometimes(rng: np.random.Generator, probability: float, low: float, high: float) -> float:
  """uniform(low, high) with `probability`, else 0; always two draws."""
  happens, value = rng.uniform() < probability, rng.uniform(low, high)
  return float(value) if happens else 0.0


def _sample(rng: np.random.Generator) -> dict:
  """All random choices of one face, drawn in a fixed order."""
  u = rng.uniform
  p = {
      "face_width": u(0.88, 1.12), "face_length": u(0.92, 1.08),
      "eye_spacing": u(-0.015, 0.015), "nose_length": u(-0.02, 0.02),
      "mouth_width": u(0.88, 1.12),
      "mouth_open": _sometimes(rng, 0.6, 0.0, 0.11),
      "smile": u(-0.4, 1.0), "brow_raise": u(-0.025, 0.04),
      "brow_tilt": u(-0.01, 0.01),
      "eye_open": u(0.6, 1.3), "gaze": rng.uniform(-0.25, 0.25, 2),
      "yaw": u(-35.0, 35.0) * (1.0 if u() < 0.5 else 0.5),
      "pitch": u(-15.0, 15.0),
      "roll": rng.normal(0.0, 12.0), "size": u(0.5, 0.78), "shift": rng.uniform(0, 1, 2),
      "skin_tone": u(), "skin_hue": rng.uniform(-12, 12, 3),
      "hair": u() < 0.75, "hair_rgb": _HAIR_COLORS[rng.integers(len(_HAIR_COLORS))]
      * rng.uniform(0.8, 1.15, 3), "hairline": u(0.13, 0.2),
      "iris_rgb": _IRIS_COLORS[rng.integers(len(_IRIS_COLORS))] * rng.uniform(0.8, 1.2, 3),
      "makeup": u() < 0.2, "lip_paint": rng.uniform(0, 1, 3),
      "background_seed": int(rng.integers(2**31)),
      "illumination": u(0.0, 0.8), "light_angle": u(0, 2 * math.pi),
      "brightness": u(0.75, 1.15),
      "num_occluders": int(rng.choice(3, p=(0.7, 0.22, 0.08))),
      "occluder_seed": int(rng.integers(2**31)),
      "blur_sigma": _sometimes(rng, 0.25, 1.0, 2.2),
      "noise_sigma": u(0.5, 5.0), "noise_seed": int(rng.integers(2**31)),
  }
  p["roll"] = float(np.clip(p["roll"], -40, 40))
  return p


# ---------------------------------------------------------------- geometry


def _deform(p: dict) -> np.ndarray:
  """The mean face with shape and expression changes, in unit coordinates."""
  pts = _MEAN.astype(np.float64).copy()
  # Face proportions around the face centre.
  pts[:, 0] = 0.5 + (pts[:, 0] - 0.5) * p["face_width"]
  pts[:, 1] = 0.45 + (pts[:, 1] - 0.45) * p["face_length"]
  for side, sign in (("right", -1), ("left", 1)):
    for part in (f"{side}_eye", f"{side}_pupil", f"{side}_brow"):
      pts[_ID[part], 0] += sign * p["eye_spacing"]
    tilt = _ID[f"{side}_brow"]
    pts[tilt, 1] += sign * p["brow_tilt"] - p["brow_raise"]
  lower = np.concatenate([_ID["nose_base"], _ID["outer_lip"], _ID["inner_lip"]])
  pts[lower, 1] += p["nose_length"]
  ridge = _ORDER["nose_ridge"]
  pts[ridge, 1] += p["nose_length"] * np.linspace(0, 1, len(ridge))
  # Mouth: width and smile (corners up and out).
  mouth = np.concatenate([_ID["outer_lip"], _ID["inner_lip"]])
  centre = pts[mouth].mean(0)
  pts[mouth, 0] = centre[0] + (pts[mouth, 0] - centre[0]) * p["mouth_width"]
  corner_sign = np.sign(pts[_MOUTH_CORNERS, 0] - centre[0])
  pts[_MOUTH_CORNERS, 0] += 0.012 * p["smile"] * corner_sign
  pts[_MOUTH_CORNERS, 1] -= 0.02 * p["smile"]
  # Close the inner lips, then open the jaw by mouth_open.
  seam = (pts[_INNER_UPPER, 1] + pts[_INNER_LOWER, 1]) / 2
  pts[_INNER_UPPER, 1] = seam
  pts[_INNER_LOWER, 1] = seam
  opening = p["mouth_open"]
  pts[_INNER_LOWER, 1] += opening
  pts[_OUTER_LOWER, 1] += opening
  jaw = _ID["jaw"]
  pts[jaw, 1] += opening * np.clip((pts[jaw, 1] - 0.6) / 0.3, 0, 1)
  # Eyes: lid heights scaled about the line through the corners.
  for side in ("right", "left"):
    eye = _ID[f"{side}_eye"]
    corners = eye[np.argsort(pts[eye, 0])[[0, -1]]]
    (x0, y0), (x1, y1) = pts[corners]
    line = y0 + (pts[eye, 0] - x0) / (x1 - x0) * (y1 - y0)
    pts[eye, 1] = line + (pts[eye, 1] - line) * p["eye_open"]
    pupil = _ID[f"{side}_pupil"][0]
    width, height = x1 - x0, np.ptp(pts[eye, 1])
    px = pts[pupil, 0] + p["gaze"][0] * 0.25 * width
    py_line = y0 + (px - x0) / (x1 - x0) * (y1 - y0)
    pts[pupil] = (px, py_line + p["gaze"][1] * 0.2 * height)
  return pts


def _depth(pts: np.ndarray) -> np.ndarray:
  """Depth of a shallow cylinder-like head at unit coordinates `pts`.

  Points at the face's sides have depth 0 and the middle 0.25 face widths,
  so a yaw rotation foreshortens the far side and moves the middle most.
  """
  return 0.25 * np.sqrt(np.clip(1.0 - ((pts[:, 0] - 0.5) / 0.5) ** 2, 0.0, 1.0))


def _landmark_depth(pts: np.ndarray) -> np.ndarray:
  """The head's depth plus the nose and lips standing out of it."""
  z = _depth(pts)
  ridge = _ORDER["nose_ridge"]
  z[ridge] += np.linspace(0.03, 0.1, len(ridge))
  z[_ID["nose_base"]] += 0.05
  z[_ID["outer_lip"]] += 0.025
  z[_ID["inner_lip"]] += 0.02
  return z


def _auxiliary(p: dict) -> dict[str, np.ndarray]:
  """Outline shapes drawn around the landmarks, in unit coordinates."""
  t = np.linspace(math.pi, 2 * math.pi, 25)
  w = 0.42 * p["face_width"]
  top = 0.39
  forehead = np.stack([0.5 + w * np.cos(t), top + 0.34 * np.sin(t)], 1)
  t_hair = np.linspace(math.pi * 0.92, math.pi * 2.08, 31)
  hair = np.stack([0.5 + (w + 0.06) * np.cos(t_hair), top + 0.04 + 0.42 * np.sin(t_hair)], 1)
  # The fringe covers the forehead above a hairline that drops to the temples.
  hairline = np.minimum(p["hairline"] + 0.12 * ((forehead[:, 0] - 0.5) / w) ** 2, top)
  fringe = np.concatenate([forehead, np.stack(
      [forehead[:, 0], np.maximum(hairline, forehead[:, 1])], 1)[::-1]])
  neck = np.asarray([[0.5 - 0.26 * p["face_width"], 0.7], [0.5 + 0.26 * p["face_width"], 0.7],
                     [0.5 + 0.3 * p["face_width"], 1.6], [0.5 - 0.3 * p["face_width"], 1.6]])
  return {"forehead": forehead, "hair": hair, "fringe": fringe, "neck": neck}


def _pose(points: np.ndarray, z: np.ndarray, yaw: float, pitch: float) -> np.ndarray:
  """Rotates the shallow 3-D face and projects it orthographically."""
  a, b = math.radians(yaw), math.radians(pitch)
  x = points[:, 0] - 0.5
  y = points[:, 1] - 0.45
  x1 = x * math.cos(a) + z * math.sin(a)
  z1 = -x * math.sin(a) + z * math.cos(a)
  y1 = y * math.cos(b) - z1 * math.sin(b)
  return np.stack([x1, y1], 1)


def _place(p: dict, shapes: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
  """Roll, scale and shift every shape so the landmarks fit in the image."""
  roll = math.radians(p["roll"])
  rot = np.asarray([[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]])
  shapes = {k: v @ rot.T for k, v in shapes.items()}
  lm = shapes["landmarks"]
  extent = lm.max(0) - lm.min(0)
  margin = 0.05 * image_size
  fit = (image_size - 1 - 2 * margin) / extent.max()
  scale = min(p["size"] * image_size / max(extent[0], extent[1] * 0.85), fit)
  low = margin - lm.min(0) * scale
  high = image_size - 1 - margin - lm.max(0) * scale
  offset = low + p["shift"] * np.maximum(high - low, 0.0)
  return {k: v * scale + offset for k, v in shapes.items()}


# ---------------------------------------------------------------- drawing


def _fixed(points: np.ndarray) -> np.ndarray:
  return np.round(np.asarray(points) * (1 << _SHIFT)).astype(np.int32)


def _fill(image, points, color):
  cv2.fillPoly(image, [_fixed(points)], _color(color), _AA, _SHIFT)


def _line(image, points, color, thickness, closed=False):
  cv2.polylines(image, [_fixed(points)], closed, _color(color), int(thickness), _AA, _SHIFT)


def _disc(image, centre, radius, color):
  c = _fixed(centre)
  cv2.circle(image, (int(c[0]), int(c[1])), max(int(round(radius * (1 << _SHIFT))), 1),
             _color(color), -1, _AA, _SHIFT)


def _color(rgb) -> tuple[float, float, float]:
  return tuple(float(v) for v in np.clip(rgb, 0, 255))


def _skin(p: dict) -> np.ndarray:
  light, dark = np.asarray([236, 198, 170]), np.asarray([92, 58, 40])
  return light + (dark - light) * p["skin_tone"] + p["skin_hue"]


def _background(p: dict, size: int, skin: np.ndarray) -> np.ndarray:
  rng = np.random.default_rng(p["background_seed"])
  base = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
  # Keep the background's mean brightness away from the skin's.
  if abs(base.mean() - skin.mean()) < 50:
    base = 255 - base if skin.mean() < 128 else base * 0.35
  image = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
  image = np.clip(image, 0, 255).astype(np.uint8)
  for _ in range(int(rng.integers(4, 12))):
    color = rng.uniform(0, 255, 3)
    kind = rng.integers(3)
    a, b = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
    if kind == 0:
      cv2.line(image, tuple(int(v) for v in a), tuple(int(v) for v in b), _color(color),
               int(rng.integers(1, 6)), _AA)
    elif kind == 1:
      cv2.rectangle(image, tuple(int(v) for v in a), tuple(int(v) for v in b), _color(color), -1)
    else:
      cv2.circle(image, tuple(int(v) for v in a), int(rng.uniform(3, size / 5)), _color(color), -1, _AA)
  fine = rng.standard_normal((size, size, 1), dtype=np.float32) * 6.0
  return np.clip(image + fine, 0, 255).astype(np.uint8)


def _draw_face(image: np.ndarray, p: dict, shapes: dict[str, np.ndarray]) -> None:
  """Draws the face onto the background in place (uint8 RGB)."""
  lm = shapes["landmarks"]
  skin = _skin(p)
  outer, inner = _wflw(60, 64)  # the right eye's corners
  eye_width = np.linalg.norm(lm[outer] - lm[inner])
  line_w = max(1, int(round(eye_width / 14)))
  if p["hair"]:
    _fill(image, shapes["hair"], p["hair_rgb"])
  _fill(image, shapes["neck"], skin * 0.82)
  jaw = lm[_ORDER["jaw"]]
  _fill(image, np.concatenate([jaw, shapes["forehead"][::-1][1:-1]]), skin)
  _line(image, jaw, skin * 0.55, line_w)
  if p["hair"]:
    _fill(image, shapes["fringe"], p["hair_rgb"])
  if p["makeup"]:
    # Eye shadow: a half-transparent tint between the upper lid and the brow.
    shadow = image.copy()
    for side in ("right", "left"):
      eye = lm[_ID[f"{side}_eye"]]
      centre = eye.mean(0) - (0, 0.12 * eye_width)
      box = ((float(centre[0]), float(centre[1])), (1.2 * eye_width, 0.5 * eye_width), 0.0)
      cv2.ellipse(shadow, box, _color(skin * 0.6 + np.asarray([70, 30, 90]) * p["lip_paint"]),
                  -1, _AA)
    image[:] = (0.5 * image + 0.5 * shadow).astype(np.uint8)
  for side in ("right", "left"):
    # Hair-coloured, but always clearly darker than the skin (blond brows).
    _fill(image, lm[_ORDER[f"{side}_brow"]], np.minimum(0.5 * p["hair_rgb"] + 0.2 * skin, 0.6 * skin))
    _draw_eye(image, p, lm, side)
  ridge = lm[_ORDER["nose_ridge"]]
  _line(image, ridge, skin * 0.6, line_w)
  base = lm[_ORDER["nose_base"]]
  _line(image, base, skin * 0.45, line_w + 1)
  nostril_r = 0.09 * eye_width
  # The base runs wing, 5 points of WFLW's nostril line, wing: a nostril sits
  # above each of the 2nd and 5th segments.
  for a, b in ((1, 2), (4, 5)):
    _disc(image, (base[a] + base[b]) / 2 - (0, 0.6 * nostril_r), nostril_r, skin * 0.3)
  for wing, toward in ((base[0], base[1]), (base[-1], base[-2])):
    tip = wing + (wing - toward) * 0.2 + (ridge[-1] - wing) * np.asarray([0.15, 0.55])
    _line(image, np.stack([wing, tip]), skin * 0.55, line_w)
  lips = _lip_color(p, skin)
  _fill(image, lm[_ORDER["outer_lip"]], lips)
  _line(image, lm[_ORDER["outer_lip"]], lips * 0.7, 1, closed=True)
  inner = lm[_ORDER["inner_lip"]]
  _fill(image, inner, (40, 10, 15))
  if p["mouth_open"] > 0.05:
    teeth = inner.copy()
    teeth[:, 1] = np.minimum(teeth[:, 1], inner[:, 1].min() + 0.35 * np.ptp(inner[:, 1]))
    _fill(image, teeth, (235, 230, 215))
  _line(image, inner, (40, 10, 15), line_w, closed=True)


def _lip_color(p: dict, skin: np.ndarray) -> np.ndarray:
  if p["makeup"]:
    return np.asarray([150 + 90 * p["lip_paint"][0], 20 + 40 * p["lip_paint"][1],
                       40 + 80 * p["lip_paint"][2]])
  return skin * np.asarray([0.85, 0.55, 0.58])


def _draw_eye(image, p, lm, side) -> None:
  """Sclera, an iris clipped by the lids, pupil at the pupil point, lid lines."""
  contour = lm[_ORDER[f"{side}_eye"]]
  pupil = lm[_ID[f"{side}_pupil"][0]]
  x0, y0 = np.floor(contour.min(0)).astype(int) - 2
  x1, y1 = np.ceil(contour.max(0)).astype(int) + 3
  x0, y0 = max(x0, 0), max(y0, 0)
  region = image[y0:y1, x0:x1]
  offset = np.asarray([x0, y0], np.float64)
  local = contour - offset
  mask = np.zeros(region.shape[:2], np.uint8)
  cv2.fillPoly(mask, [_fixed(local)], 255, _AA, _SHIFT)
  eye = region.copy()
  _fill(eye, local, (238, 236, 230))
  # The iris is about 0.42 eye widths across; the lids clip it.
  iris_r = max(0.21 * np.ptp(contour[:, 0]), 1.5)
  _disc(eye, pupil - offset, iris_r, p["iris_rgb"])
  _disc(eye, pupil - offset, max(0.42 * iris_r, 1.0), (10, 8, 8))
  # A catchlight keeps the pupil visible against a dark iris.
  _disc(eye, pupil - offset - 0.2 * iris_r, max(0.22 * iris_r, 0.7), (250, 250, 250))
  alpha = mask[..., None].astype(np.float32) / 255.0
  region[:] = (eye * alpha + region * (1.0 - alpha)).astype(np.uint8)
  # A thin lid line: a thick one would hide a narrow eye opening.
  _line(image, contour, (25, 20, 20), 1, closed=True)


def _occluders(p: dict, lm: np.ndarray, image: np.ndarray, skin: np.ndarray) -> np.ndarray:
  """Draws occluding patches; returns the (124,) bool occlusion of each point."""
  size = image.shape[0]
  rng = np.random.default_rng(p["occluder_seed"])
  mask = np.zeros(image.shape[:2], np.uint8)
  face = np.ptp(lm, 0).max()
  for _ in range(p["num_occluders"]):
    centre = lm[rng.integers(len(lm))] + rng.normal(0, 0.05 * face, 2)
    axes = rng.uniform(0.1, 0.3, 2) * face
    angle = rng.uniform(0, 180)
    # A hand-like patch (shaded skin) or an object of any colour.
    color = skin * rng.uniform(0.6, 0.8) if rng.uniform() < 0.3 else rng.uniform(0, 255, 3)
    shape = np.zeros_like(mask)
    box = ((float(centre[0]), float(centre[1])), (float(2 * axes[0]), float(2 * axes[1])), float(angle))
    if rng.uniform() < 0.5:
      cv2.ellipse(shape, box, 255, -1, _AA)
    else:
      corners = cv2.boxPoints(box)
      cv2.fillPoly(shape, [_fixed(corners)], 255, _AA, _SHIFT)
    patch = np.broadcast_to(np.asarray(color, np.float32), image.shape).copy()
    stripes = (np.sin(np.arange(size) * rng.uniform(0.2, 0.8)) * rng.uniform(5, 40))
    patch += stripes[None, :, None] if rng.uniform() < 0.5 else stripes[:, None, None]
    alpha = shape[..., None].astype(np.float32) / 255.0
    image[:] = np.clip(patch * alpha + image * (1.0 - alpha), 0, 255).astype(np.uint8)
    mask = np.maximum(mask, shape)
  ix = np.clip(np.round(lm).astype(int), 0, size - 1)
  return mask[ix[:, 1], ix[:, 0]] >= 128


def _photometric(p: dict, image: np.ndarray, clean: bool) -> np.ndarray:
  size = image.shape[0]
  out = image.astype(np.float32)
  ramp = np.arange(size, dtype=np.float32) / size - 0.5
  direction = math.cos(p["light_angle"]) * ramp[None, :] + math.sin(p["light_angle"]) * ramp[:, None]
  out *= (p["brightness"] * (1.0 + p["illumination"] * direction))[..., None]
  if not clean:
    if p["blur_sigma"] > 0:
      out = cv2.GaussianBlur(out, (0, 0), p["blur_sigma"])
    noise_rng = np.random.default_rng(p["noise_seed"])
    out += noise_rng.standard_normal(out.shape, dtype=np.float32) * np.float32(p["noise_sigma"])
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- render


def render_face(seed: int, index: int, image_size: int = 256, clean: bool = False):
  """Renders synthetic face number `index` of `seed`.

  Args:
    seed, index: the same pair always gives the same face (bit-identical).
    image_size: side of the square image in pixels.
    clean: leave out the occluding patches, blur and noise (same face and
      pose otherwise); for tests and visual checks.

  Returns:
    image: (image_size, image_size, 3) uint8 RGB.
    landmarks124: (124, 2) float32 unified landmarks, 0-based pixel
      coordinates (pixel centres at integers), all inside the image.
    info: dict with the rendering parameters ("yaw", "pitch", "roll",
      "mouth_open", "smile", "brow_raise", "eye_open", "blur_sigma",
      "noise_sigma", "illumination", "makeup"), "occluded" ((124,) bool,
      points under an occluding patch) and "attributes" (the six WFLW
      flags pose/expression/illumination/makeup/occlusion/blur as bools).
  """
  rng = np.random.default_rng([int(seed), int(index)])
  p = _sample(rng)
  unit = _deform(p)
  shapes = {"landmarks": _pose(unit, _landmark_depth(unit), p["yaw"], p["pitch"])}
  for name, aux in _auxiliary(p).items():
    shapes[name] = _pose(aux, _depth(aux) * (name != "neck"), p["yaw"], p["pitch"])
  shapes = _place(p, shapes, image_size)
  skin = _skin(p)
  image = _background(p, image_size, skin)
  _draw_face(image, p, shapes)
  lm = shapes["landmarks"]
  if clean or p["num_occluders"] == 0:
    occluded = np.zeros(len(lm), bool)
  else:
    occluded = _occluders(p, lm, image, skin)
  image = _photometric(p, image, clean)
  blur = 0.0 if clean else p["blur_sigma"]
  attributes = {
      "pose": abs(p["yaw"]) > 25 or abs(p["roll"]) > 25 or abs(p["pitch"]) > 12,
      "expression": p["mouth_open"] > 0.05 or p["smile"] > 0.75 or p["brow_raise"] > 0.03,
      "illumination": p["illumination"] > 0.55 or p["brightness"] < 0.8,
      "makeup": bool(p["makeup"]),
      "occlusion": bool(occluded.any()),
      "blur": blur > 0,
  }
  info = {
      "yaw": float(p["yaw"]), "pitch": float(p["pitch"]), "roll": float(p["roll"]),
      "mouth_open": float(p["mouth_open"]), "smile": float(p["smile"]),
      "brow_raise": float(p["brow_raise"]), "eye_open": float(p["eye_open"]),
      "blur_sigma": float(blur), "noise_sigma": 0.0 if clean else float(p["noise_sigma"]),
      "illumination": float(p["illumination"]), "makeup": bool(p["makeup"]),
      "occluded": occluded, "attributes": {k: bool(v) for k, v in attributes.items()},
  }
  return image, lm.astype(np.float32), info


def calibration_faces(num_faces: int = 48, image_size: int = 384,
                      seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Clean synthetic faces for calibrating a face detector.

  Yields `num_faces` pairs (image (S, S, 3) uint8 RGB, landmarks (124, 2)
  float32): `render_face(seed, index, image_size, clean=True)` for index 0,
  1, ..., rendered one at a time as they are consumed.
  """
  for index in range(int(num_faces)):
    image, points, _ = render_face(seed, index, image_size, clean=True)
    yield image, points


# ---------------------------------------------------------------- datasets

DEFAULT_SIZES: Mapping[str, tuple[int, int]] = {
    "WFLW": (500, 100), "300W": (500, 100), "COFW": (300, 100), "AFLW": (500, 100)}
JPEG_QUALITY = 90
# Written into `out_dir` before anything else, so that a folder holding
# synthetic faces is recognised even when the rendering was interrupted
# (manifest.json is written last).
MARKER_FILE = "SYNTHETIC.txt"
# 300W folders with their share of the real split (train: AFW 337, HELEN 2000,
# LFPW 811; test: HELEN 330 + LFPW 224 common, IBUG 135 challenging).
_300W_FOLDERS = {
    "train": (("afw", 337), ("helen/trainset", 2000), ("lfpw/trainset", 811)),
    "test": (("helen/testset", 330), ("lfpw/testset", 224), ("ibug", 135)),
}
_MAT73_HEADER_SIZE = 512


def dataset_index(dataset: str, split: str, i: int) -> int:
  """The `render_face` index of face `i` of a synthetic dataset's split.

  Every dataset and split draws from its own range, so no two images of the
  four datasets are the same face.
  """
  dataset_id = landmarks.get_protocol(dataset).dataset_id
  return dataset_id * 10_000_000 + (5_000_000 if split == "test" else 0) + int(i)


def _render_job(job):
  """Worker: renders one face, writes it as JPEG if given a path."""
  seed, index, image_size, path, keep_image = job
  image, points, info = render_face(seed, index, image_size)
  if path is not None:
    with open(path, "wb") as f:
      f.write(encode_image(image, "jpeg", JPEG_QUALITY))
  return points, info, image if keep_image else None


def _worker_init():
  cv2.setNumThreads(1)


def _run_jobs(jobs: list, num_workers: int) -> list:
  """The jobs' results in order, with a progress bar (faces rendered, rate, ETA)."""
  results = []
  with contextlib.ExitStack() as stack:
    bar = stack.enter_context(errors.progress_bar(total=len(jobs), desc="render synthetic faces",
                                                  unit="face"))
    if num_workers <= 1 or len(jobs) < 2:
      done = map(_render_job, jobs)
    else:
      # spawn, not fork: the caller may have started JAX, whose threads do not
      # survive a fork.
      context = multiprocessing.get_context("spawn")
      pool = stack.enter_context(context.Pool(min(num_workers, len(jobs)),
                                              initializer=_worker_init))
      done = pool.imap(_render_job, jobs,
                       chunksize=max(1, min(32, len(jobs) // (4 * num_workers))))
    for result in done:
      results.append(result)
      bar.update(1)
  return results


def _allocate(total: int, shares: tuple[tuple[str, int], ...]) -> list[str]:
  """Folder of each of `total` faces, in proportion to the real split."""
  weights = np.asarray([w for _, w in shares], np.float64)
  exact = total * weights / weights.sum()
  counts = np.floor(exact).astype(int)
  counts[np.argsort(counts - exact)[:total - counts.sum()]] += 1
  return [name for (name, _), c in zip(shares, counts) for _ in range(c)]


def _padded_box(points: np.ndarray, pad: float = 0.05) -> np.ndarray:
  lo, hi = points.min(0), points.max(0)
  margin = pad * (hi - lo).max()
  return np.concatenate([lo - margin, hi + margin])


def _numbers(values) -> str:
  return " ".join(f"{v:.4f}" for v in np.asarray(values, np.float64).reshape(-1))


def _plan(dataset: str, root: str, split: str, n: int) -> list[tuple[int, str | None]]:
  """(generator index, image path or None) of every face of one split."""
  out = []
  folders = _allocate(n, _300W_FOLDERS[split]) if dataset == "300W" else None
  for i in range(n):
    index = dataset_index(dataset, split, i)
    if dataset == "WFLW":
      path = os.path.join(root, "WFLW_images", f"{i % 8}--Synthetic", f"{index}.jpg")
    elif dataset == "300W":
      path = os.path.join(root, folders[i], f"synthetic_{index}.jpg")
    elif dataset == "AFLW":
      path = os.path.join(root, "images", "flickr", str(i % 3), f"image{index}.jpg")
    else:
      path = None  # COFW embeds its images in the .mat file.
    out.append((index, path))
  return out


def _write_wflw(root: str, split: str, plan, results) -> None:
  protocol = landmarks.get_protocol("WFLW")
  lines = []
  for (_, path), (points, info, _) in zip(plan, results):
    own = points[protocol.unified_index]
    box = _padded_box(own)
    box = np.concatenate([np.floor(box[:2]), np.ceil(box[2:])])
    attributes = dict(info["attributes"])
    attributes["occlusion"] = bool(info["occluded"][protocol.unified_index].any())
    flags = " ".join(str(int(attributes[a])) for a in
                     ("pose", "expression", "illumination", "makeup", "occlusion", "blur"))
    name = os.path.relpath(path, os.path.join(root, "WFLW_images")).replace(os.sep, "/")
    lines.append(f"{_numbers(own)} {' '.join(str(int(v)) for v in box)} {flags} {name}")
  folder = os.path.join(root, "WFLW_annotations", "list_98pt_rect_attr_train_test")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"list_98pt_rect_attr_{split}.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _write_300w(plan, results) -> None:
  protocol = landmarks.get_protocol("300W")
  for (_, path), (points, _, _) in zip(plan, results):
    own = points[protocol.unified_index] + 1.0  # .pts files are 1-based.
    body = "\n".join(f"{x:.4f} {y:.4f}" for x, y in own)
    with open(os.path.splitext(path)[0] + ".pts", "w") as f:
      f.write(f"version: 1\nn_points:  {len(own)}\n{{\n{body}\n}}\n")


def _write_aflw(root: str, split: str, plan, results) -> None:
  protocol = landmarks.get_protocol("AFLW")
  header = ["image_name", "scale", "box_size", "center_w", "center_h"] + [
      f"{a}{i}" for i in range(protocol.num_landmarks) for a in "xy"]
  rows, frontal = [], []
  for (_, path), (points, info, _) in zip(plan, results):
    own = points[protocol.unified_index]
    x1, y1, x2, y2 = _padded_box(own)
    w, h = x2 - x1, y2 - y1
    name = os.path.relpath(path, os.path.join(root, "images")).replace(os.sep, "/")
    row = ",".join([name, f"{max(w, h) / 200:.6f}", f"{math.sqrt(w * h):.4f}",
                    f"{(x1 + x2) / 2:.4f}", f"{(y1 + y2) / 2:.4f}",
                    *(f"{v:.4f}" for v in own.reshape(-1))])
    rows.append(row)
    if not info["occluded"][protocol.unified_index].any():
      frontal.append(row)
  files = {f"face_landmarks_aflw_{split}.csv": rows}
  if split == "test":
    files["face_landmarks_aflw_test_frontal.csv"] = frontal
  for name, content in files.items():
    with open(os.path.join(root, name), "w") as f:
      f.write("\n".join([",".join(header)] + content) + "\n")


def write_cofw_mat(path: str, split: str, images, phis: np.ndarray, boxes: np.ndarray) -> None:
  """Writes COFW arrays as a MATLAB v7.3 file in the layout of the release.

  `images` are H x W x 3 or H x W uint8 arrays; `phis` N x 87 (x, y,
  occlusion); `boxes` N x 4 [x, y, w, h]. As MATLAB does: every array is
  stored transposed (column-major), the image cell array as object
  references into `#refs#`, with `MATLAB_class` attributes and the 512-byte
  MAT-file header in the HDF5 user block.
  """
  keys = {"train": ("IsTr", "phisTr", "bboxesTr"), "test": ("IsT", "phisT", "bboxesT")}[split]
  with h5py.File(path, "w", userblock_size=_MAT73_HEADER_SIZE) as f:
    refs = f.create_group("#refs#")
    handles = np.empty((1, len(images)), h5py.ref_dtype)
    for i, image in enumerate(images):
      cell = refs.create_dataset(f"{keys[0]}_{i}", data=np.ascontiguousarray(np.asarray(image, np.uint8).T))
      cell.attrs["MATLAB_class"] = np.bytes_("uint8")
      handles[0, i] = cell.ref
    cells = f.create_dataset(keys[0], data=handles)
    cells.attrs["MATLAB_class"] = np.bytes_("cell")
    for key, array in zip(keys[1:], (phis, boxes)):
      ds = f.create_dataset(key, data=np.asarray(array, np.float64).T)
      ds.attrs["MATLAB_class"] = np.bytes_("double")
  text = (f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: "
          f"{time.strftime('%a %b %d %H:%M:%S %Y', time.gmtime(0))} HDF5 schema 1.00 .")
  header = text.encode().ljust(116) + b"\x00" * 8 + b"\x00\x02" + b"IM"
  with open(path, "r+b") as f:
    f.write(header.ljust(_MAT73_HEADER_SIZE, b"\x00"))


def _write_cofw(root: str, split: str, results) -> None:
  protocol = landmarks.get_protocol("COFW")
  images, phis, boxes = [], [], []
  for i, (points, info, image) in enumerate(results):
    own = points[protocol.unified_index]
    occluded = info["occluded"][protocol.unified_index].astype(np.float64)
    phis.append(np.concatenate([own[:, 0], own[:, 1], occluded]))
    x1, y1, x2, y2 = _padded_box(own)
    boxes.append([x1, y1, x2 - x1, y2 - y1])
    # Some COFW images are grey; keep a share of them so readers see both.
    images.append(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if i % 7 == 3 else image)
  write_cofw_mat(os.path.join(root, f"COFW_{split}_color.mat"), split, images,
                 np.asarray(phis), np.asarray(boxes))


def write_synthetic_datasets(out_dir: str, sizes: Mapping[str, tuple[int, int]] | None = None,
                             seed: int = 0, image_size: int = 256,
                             num_workers: int | None = None) -> dict[str, str]:
  """Renders synthetic WFLW, 300W, COFW and AFLW in their real formats.

  Args:
    out_dir: where `WFLW/`, `300W/`, `COFW/`, `AFLW/` and `manifest.json`
      are written.
    sizes: {dataset: (num_train, num_test)}; datasets left out are not
      written. Default `DEFAULT_SIZES` (2,200 images).
    seed: the generator seed (face i of a split is `render_face(seed,
      dataset_index(dataset, split, i))`).
    image_size: side of the square images.
    num_workers: rendering processes; default the CPU count, 0 or 1 renders
      in this process.

  Returns:
    {dataset: directory to pass to `readers.read_dataset`} and "manifest":
    the path of `manifest.json` (written last, so its presence means the
    datasets are complete; it records the arguments, counts and speed).
    `MARKER_FILE` is written first, saying the folder holds synthetic faces.
  """
  sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
  for name, counts in sizes.items():
    landmarks.get_protocol(name)
    if name not in DEFAULT_SIZES or len(counts) != 2 or min(counts) < 0:
      raise ValueError(f"sizes[{name!r}] must be (num_train, num_test) >= 0 for one "
                       f"of {list(DEFAULT_SIZES)}, got {counts!r}")
  workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, MARKER_FILE), "w") as f:
    f.write("Synthetic stand-in faces rendered by data_pipelines.synthetic "
            "(not benchmark data).\n")
  start = time.perf_counter()
  jobs, spans, paths = [], [], {}
  for name in DEFAULT_SIZES:
    if name not in sizes:
      continue
    root = os.path.join(out_dir, name)
    paths[name] = root
    for split, n in zip(("train", "test"), sizes[name]):
      plan = _plan(name, root, split, n)
      for _, path in plan:
        if path is not None:
          os.makedirs(os.path.dirname(path), exist_ok=True)
      os.makedirs(root, exist_ok=True)
      spans.append((name, root, split, plan, len(jobs)))
      jobs.extend((seed, index, image_size, path, name == "COFW") for index, path in plan)
  results = _run_jobs(jobs, workers)
  for name, root, split, plan, first in spans:
    part = results[first:first + len(plan)]
    if name == "WFLW":
      _write_wflw(root, split, plan, part)
    elif name == "300W":
      _write_300w(plan, part)
    elif name == "COFW":
      _write_cofw(root, split, part)
    else:
      _write_aflw(root, split, plan, part)
  seconds = time.perf_counter() - start
  manifest = os.path.join(out_dir, "manifest.json")
  with open(manifest, "w") as f:
    json.dump({"seed": seed, "image_size": image_size, "sizes": sizes,
               "paths": paths, "num_images": len(jobs), "num_workers": workers,
               "seconds": round(seconds, 2),
               "images_per_second": round(len(jobs) / max(seconds, 1e-9), 1)}, f, indent=1)
  return {**paths, "manifest": manifest}
