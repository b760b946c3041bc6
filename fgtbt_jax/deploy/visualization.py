"""Landmark overlays: `draw_landmarks` draws predicted points on an image.

Points are coloured by facial part (jaw, brows, nose ridge and base, eyes,
lips, pupils: `landmarks.FACE_PARTS`, mapped through the protocol's
`unified_index`). Face boxes are white; a face flagged low quality gets a
red box and a "low <confidence>" label above it. Prediction on files is
`fgtbt_jax.deploy.predict_files`.
"""

from __future__ import annotations

import cv2
import numpy as np

from fgtbt_jax import landmarks
from fgtbt_jax.images import load_image

# RGB colour of each facial part in overlays.
PART_COLORS: dict[str, tuple[int, int, int]] = {
    "jaw": (0, 200, 255),
    "right_brow": (255, 140, 0),
    "left_brow": (255, 215, 0),
    "nose_ridge": (0, 230, 0),
    "nose_base": (150, 255, 150),
    "right_eye": (255, 0, 255),
    "left_eye": (190, 110, 255),
    "outer_lip": (255, 30, 30),
    "inner_lip": (255, 160, 160),
    "right_pupil": (255, 255, 0),
    "left_pupil": (255, 255, 170),
}
BOX_COLOR = (255, 255, 255)
LOW_QUALITY_COLOR = (255, 40, 40)
_SHIFT = 4  # Sub-pixel bits for cv2 drawing: points are placed at 1/16 px.


def point_colors(protocol: str) -> np.ndarray:
  """(N, 3) uint8 RGB colour of each of the protocol's points, by facial part."""
  _, index = landmarks.protocol_index(protocol)
  return np.asarray([PART_COLORS[landmarks.FACE_PARTS[int(u)]] for u in index], np.uint8)


def quality_label(confidence: float) -> str:
  """A low-quality face's confidence to two decimals, rounded down: a face just
  under the threshold never reads as the threshold (0.5974 -> "0.59", not "0.60")."""
  return f"{np.floor(confidence * 100.0 + 1e-9) / 100.0:.2f}"  # 0.29 * 100 = 28.999...


def label_style(box_width: float) -> tuple[float, int]:
  """(font scale, line thickness) of a face box's label and outline: readable at any size.

  Scale 0.35 (about 8 px capitals) up to a 120 px box, then growing with it
  (a 600 px face on a 1,920 px photo gets 1.75, about 38 px); the thickness
  follows (1 px up to a box of about 400 px).
  """
  scale = float(np.clip(box_width / 340.0, 0.35, 4.0))
  return scale, max(1, int(round(scale * 1.2)))


def draw_landmarks(image: np.ndarray, points, protocol: str = landmarks.UNIFIED, *,
                   boxes=None, confidence=None, min_confidence: float | None = None,
                   radius: float | None = None, low_quality=None, face_confidence=None,
                   labels=None) -> np.ndarray:
  """An RGB copy of `image` with landmarks drawn as dots coloured by facial part.

  Args:
    image: H x W x 3 uint8 RGB (grey or RGBA are converted).
    points: (N, 2) or (F, N, 2) landmarks of `protocol` in image pixels;
      non-finite points are skipped.
    protocol: "unified" or a protocol name (fixes N and the colours).
    boxes: optional (F, 4) face boxes, drawn as white rectangles.
    confidence: optional (F, N); with `min_confidence`, points below it are
      drawn as rings instead of dots.
    radius: dot radius in pixels; default 1% of each face's size (at least
      0.6 px, so a small face's 124 dots stay apart). Labels and box lines
      grow with the box (`label_style`), so they read on large photos.
    low_quality: optional (F,) bool; flagged faces' boxes are drawn red
      with the label "low" (and their `face_confidence`, (F,), if given).
    labels: optional F strings written above the boxes (e.g. track ids).
  """
  canvas = load_image(np.asarray(image), where="draw_landmarks image").copy()
  colors = point_colors(protocol)
  points = np.asarray(points, np.float64)
  if points.ndim == 2:
    points = points[None]
  if points.ndim != 3 or points.shape[1:] != (len(colors), 2):
    raise ValueError(f"draw_landmarks: {protocol} has {len(colors)} points; expected landmarks "
                     f"of shape (F, {len(colors)}, 2), got {np.shape(points)}")
  if confidence is not None:
    confidence = np.asarray(confidence, np.float64).reshape(points.shape[:2])
  if boxes is not None:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    flagged = (np.zeros(len(boxes), bool) if low_quality is None
               else np.asarray(low_quality, bool).reshape(len(boxes)))
    for face, (x1, y1, x2, y2) in enumerate(boxes):
      color = LOW_QUALITY_COLOR if flagged[face] else BOX_COLOR
      corner_a = tuple(int(v) for v in np.round(np.array([x1, y1]) * (1 << _SHIFT)))
      corner_b = tuple(int(v) for v in np.round(np.array([x2, y2]) * (1 << _SHIFT)))
      font_scale, thickness = label_style(x2 - x1)
      cv2.rectangle(canvas, corner_a, corner_b, color, thickness, cv2.LINE_AA, _SHIFT)
      text = [] if labels is None else [str(labels[face])]
      if flagged[face]:
        text.append("low" if face_confidence is None
                    else f"low {quality_label(float(face_confidence[face]))}")
      if text:
        height = int(np.ceil(22 * font_scale))  # The font's cap height is ~22 px at scale 1.
        cv2.putText(canvas, " ".join(text),
                    (int(round(x1)), max(height, int(round(y1)) - 3 * thickness)),
                    cv2.FONT_HERSHEY_SIMPLEX, font_scale, color, thickness, cv2.LINE_AA)
  for face, face_points in enumerate(points):
    finite = np.isfinite(face_points).all(1)
    if not finite.any():
      continue
    extent = float(np.ptp(face_points[finite], 0).max()) if finite.sum() > 1 else 100.0
    dot = float(radius) if radius is not None else max(0.6, 0.01 * extent)
    for k in np.flatnonzero(finite):
      centre = tuple(int(v) for v in np.round(face_points[k] * (1 << _SHIFT)))
      weak = (confidence is not None and min_confidence is not None
              and confidence[face, k] < min_confidence)
      cv2.circle(canvas, centre, int(round(dot * (1 << _SHIFT))),
                 tuple(int(c) for c in colors[k]), 1 if weak else -1, cv2.LINE_AA, _SHIFT)
  return canvas
