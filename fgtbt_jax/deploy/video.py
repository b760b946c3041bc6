"""Landmarks across video frames: One Euro smoothing and face tracking between detections.

Smoothing (`OneEuroFilter`, Casiraghi, Roussel and Vogel, CHI 2012): each
landmark is low-pass filtered with a cut-off frequency that rises with its
speed, `cutoff = min_cutoff + beta * speed`, so a still face is smoothed
hard (jitter gone) and a moving one lightly (little lag). Speeds are
measured in face sides per second (the point's filtered velocity in pixels
per second over the face box's longer side), so one setting serves faces of
any size in any resolution. With a smoothing factor
alpha(f, dt) = 1 / (1 + 1 / (2 pi f dt)) the filter is
    d_t = d_{t-1} + alpha(d_cutoff, dt) * ((x_t - y_{t-1}) / dt - d_{t-1})
    y_t = y_{t-1} + alpha(min_cutoff + beta * |d_t| / side, dt) * (x_t - y_{t-1}),
per point (|d_t| the length of its 2-D velocity), y_0 = x_0, d_0 = 0.

Tracking (`FaceTracker`): the detector runs on the first frame and then
every `detect_every` frames (or at once when a face is lost). Between
detections each face's box for the next frame is the annotation-style box
(`detector.landmark_box`) of its landmarks in this frame: the landmark model
itself follows the face (its side changing by at most `max_size_change`,
10%, a frame). On a detection frame, detections are matched to
the tracked faces by box overlap (IoU, greedily from the largest), matched
faces take the detector's box and keep their track id and filter, new
detections start tracks; a face whose mean point confidence falls below
`min_face_confidence` is lost (its track ends and the detector runs on the
next frame). Given boxes (the predict command's --box / --boxes) act as a
detector that runs on every frame.

This module is pure numpy: it gets the detector and the landmark model as
callables, so it sits below the predictor.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import numpy as np

from fgtbt_jax.deploy import detector as detector_lib


@dataclasses.dataclass(frozen=True)
class OneEuroSettings:
  """One Euro filter parameters (see the module docstring).

  Attributes:
    min_cutoff: cut-off frequency (Hz) of a still point; lower smooths more.
    beta: cut-off increase (Hz) per face side per second of speed; higher
      lags less on fast motion.
    d_cutoff: cut-off frequency (Hz) of the velocity estimate.
  """

  min_cutoff: float = 1.0
  beta: float = 10.0
  d_cutoff: float = 1.0

  def __post_init__(self):
    for name in ("min_cutoff", "d_cutoff"):
      if not getattr(self, name) > 0:
        raise ValueError(f"OneEuroSettings: {name} must be > 0, got {getattr(self, name)}")
    if not self.beta >= 0:
      raise ValueError(f"OneEuroSettings: beta must be >= 0, got {self.beta}")


def smoothing_factor(cutoff, dt: float) -> np.ndarray:
  """alpha = 1 / (1 + 1 / (2 pi cutoff dt)): the exponential smoothing weight of the new sample."""
  return 1.0 / (1.0 + 1.0 / (2.0 * np.pi * np.asarray(cutoff, np.float64) * dt))


@dataclasses.dataclass(frozen=True)
class OneEuroState:
  """The filter's memory: the last output (N, 2), its velocity (N, 2) and time."""

  value: np.ndarray
  velocity: np.ndarray
  time: float


def one_euro_step(state: OneEuroState | None, points, time: float, side: float,
                  settings: OneEuroSettings) -> OneEuroState:
  """The filter's state after the sample `points` (N, 2) at `time` (s); its `value` is the output.

  `side` is the face's size in pixels (speeds are in sides per second). The
  first sample (state None) passes unchanged; a sample at or before the last
  time (a repeated timestamp) is treated as 1 ms later.
  """
  points = np.asarray(points, np.float64)
  if state is None:
    return OneEuroState(points, np.zeros_like(points), float(time))
  dt = max(float(time) - state.time, 1e-3)
  raw_velocity = (points - state.value) / dt
  velocity = state.velocity + smoothing_factor(settings.d_cutoff, dt) * (
      raw_velocity - state.velocity)
  speed = np.linalg.norm(velocity, axis=-1, keepdims=True) / max(float(side), 1e-6)
  alpha = smoothing_factor(settings.min_cutoff + settings.beta * speed, dt)
  return OneEuroState(state.value + alpha * (points - state.value), velocity, float(time))


def box_iou(a, b) -> np.ndarray:
  """(A, B) intersection over union of boxes a (A, 4) and b (B, 4)."""
  a = np.asarray(a, np.float64).reshape(-1, 1, 4)
  b = np.asarray(b, np.float64).reshape(1, -1, 4)
  width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = width * height
  area = lambda box: (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
  return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def limit_size_change(box, previous, max_change: float) -> np.ndarray:
  """`box` (4,) scaled about its centre: its longer side within 1 +- max_change of `previous`'s."""
  box, previous = np.asarray(box, np.float64), np.asarray(previous, np.float64)
  side, before = (box[2:] - box[:2]).max(), (previous[2:] - previous[:2]).max()
  target = np.clip(side, before / (1 + max_change), before * (1 + max_change))
  if not side > 0 or target == side:
    return box
  centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 2 * (target / side)
  return np.concatenate([centre - half, centre + half])


def match_boxes(tracked, detected, min_iou: float) -> list[tuple[int, int]]:
  """(tracked index, detected index) pairs: greedy by IoU, each box used once, IoU >= min_iou."""
  iou = box_iou(tracked, detected)
  pairs = []
  while iou.size and iou.max() >= min_iou:
    i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
    pairs.append((int(i), int(j)))
    iou[i, :], iou[:, j] = -1.0, -1.0
  return pairs


@dataclasses.dataclass(frozen=True)
class TrackerSettings:
  """How `FaceTracker` follows faces.

  Attributes:
    detect_every: run the detector every this many frames (1: every frame);
      between detections boxes come from the landmarks.
    smoothing: One Euro settings, or None for no smoothing.
    min_iou: box overlap that makes a detection the same face as a track.
    max_size_change: between detections a face's box side changes by at
      most this fraction per frame (its landmarks' box is shrunk or grown
      to that about its centre), so a poor prediction cannot balloon or
      collapse the box it is tracked with.
  """

  detect_every: int = 10
  smoothing: OneEuroSettings | None = OneEuroSettings()
  min_iou: float = 0.3
  max_size_change: float = 0.1

  def __post_init__(self):
    if int(self.detect_every) < 1:
      raise ValueError(f"TrackerSettings: detect_every must be at least 1, got "
                       f"{self.detect_every}")
    if not self.max_size_change > 0:
      raise ValueError(f"TrackerSettings: max_size_change must be > 0, got "
                       f"{self.max_size_change}")


@dataclasses.dataclass
class TrackedFrame:
  """The faces of one frame.

  Attributes:
    index: the frame number (from 0); time: index / fps in seconds.
    detected: whether the detector ran on this frame.
    track_ids: (F,) int, the same for a face across frames.
    boxes: (F, 4) the boxes the landmarks were predicted in.
    boxes_from: per face "detector" or "tracked" (from the last frame's
      landmarks).
    raw_landmarks: (F, N, 2) the model's landmarks; landmarks: the smoothed
      ones (the same when smoothing is off).
    confidence: (F, N) per point.
  """

  index: int
  time: float
  detected: bool
  track_ids: np.ndarray
  boxes: np.ndarray
  boxes_from: list[str]
  raw_landmarks: np.ndarray
  landmarks: np.ndarray
  confidence: np.ndarray


def _overlaps_image(box, image_shape) -> bool:
  """Whether `box` passes `detector.check_boxes` for an image of `image_shape`."""
  try:
    detector_lib.check_boxes(box, image_shape)
  except ValueError:
    return False
  return True


@dataclasses.dataclass
class _Track:
  track_id: int
  box: np.ndarray
  filter_state: OneEuroState | None = None


Locate = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class FaceTracker:
  """Follows faces through frames; see the module docstring.

  Args:
    detect: image (H, W, 3) uint8 -> (F, 4) annotation-style face boxes.
    locate: (image, boxes (F, 4)) -> (landmarks (F, N, 2), confidence (F, N))
      in image pixels; N must be points whose `landmark_box` is the
      annotation box (the unified 124 points or WFLW's 98).
    fps: frames per second (the filter's clock).
    settings: `TrackerSettings`.
    min_face_confidence: a face whose mean point confidence falls below
      this is lost (the predictor's quality threshold).
    max_faces: follow at most this many faces (None: all).
  """

  def __init__(self, detect: Callable[[np.ndarray], np.ndarray], locate: Locate, fps: float,
               settings: TrackerSettings = TrackerSettings(), *,
               min_face_confidence: float = 0.0, max_faces: int | None = None):
    if not fps > 0:
      raise ValueError(f"FaceTracker: fps must be > 0, got {fps}")
    self.detect, self.locate, self.fps, self.settings = detect, locate, float(fps), settings
    self.min_face_confidence = float(min_face_confidence)
    self.max_faces = max_faces
    self.detector_runs = 0
    self._tracks: list[_Track] = []
    self._next_id = 0
    self._since_detection = 0
    self._lost = False

  def _start_track(self, box) -> _Track:
    track = _Track(self._next_id, np.asarray(box, np.float64))
    self._next_id += 1
    return track

  def _update_tracks(self, image: np.ndarray) -> list[str]:
    """Runs the detector and merges its boxes into the tracks; returns each track's box source."""
    detections = np.asarray(self.detect(image), np.float64).reshape(-1, 4)
    self.detector_runs += 1
    self._since_detection = 0
    previous = self._tracks
    pairs = match_boxes([t.box for t in previous], detections, self.settings.min_iou)
    matched = {j: i for i, j in pairs}
    tracks, sources = [], []
    for j, box in enumerate(detections):
      if j in matched:
        track = previous[matched[j]]
        track.box = box
      else:
        track = self._start_track(box)
      tracks.append(track)
      sources.append("detector")
    # Faces the detector missed this time stay while their landmarks are
    # confident; an unmatched track overlapping a detection is a duplicate.
    for i, track in enumerate(previous):
      if i not in matched.values() and not (
          len(detections) and box_iou(track.box, detections).max() >= self.settings.min_iou):
        tracks.append(track)
        sources.append("tracked")
    limit = len(tracks) if self.max_faces is None else int(self.max_faces)
    self._tracks = tracks[:limit]
    return sources[:limit]

  def step(self, index: int, image: np.ndarray) -> TrackedFrame:
    """The faces of frame `index` (frames must come in order)."""
    time = index / self.fps
    detected = (not self._tracks or self._lost
                or self._since_detection >= self.settings.detect_every)
    if detected:
      sources = self._update_tracks(image)
    else:
      sources = ["tracked"] * len(self._tracks)
    self._since_detection += 1
    # A tracked face that left the picture ends (its box no longer overlaps it).
    inside = [_overlaps_image(t.box, image.shape) for t in self._tracks]
    self._tracks = [t for t, ok in zip(self._tracks, inside) if ok]
    sources = [source for source, ok in zip(sources, inside) if ok]
    boxes = np.array([t.box for t in self._tracks], np.float64).reshape(-1, 4)
    raw, confidence = self.locate(image, boxes)
    raw = np.asarray(raw, np.float64)
    confidence = np.asarray(confidence, np.float64)
    smoothed = raw.copy()
    keep, self._lost = [], False
    for k, track in enumerate(self._tracks):
      side = float((boxes[k, 2:] - boxes[k, :2]).max())
      if self.settings.smoothing is not None:
        track.filter_state = one_euro_step(track.filter_state, raw[k], time, side,
                                           self.settings.smoothing)
        smoothed[k] = track.filter_state.value
      track.box = limit_size_change(detector_lib.landmark_box(raw[k]), boxes[k],
                                    self.settings.max_size_change)
      if confidence[k].mean() >= self.min_face_confidence:
        keep.append(track)
      else:
        self._lost = True
    frame = TrackedFrame(index=int(index), time=time, detected=detected,
                         track_ids=np.array([t.track_id for t in self._tracks], np.int64),
                         boxes=boxes, boxes_from=sources, raw_landmarks=raw,
                         landmarks=smoothed, confidence=confidence)
    self._tracks = keep
    return frame

  def run(self, frames: Iterable[np.ndarray]) -> Iterator[TrackedFrame]:
    """`step` over frames in order."""
    for index, image in enumerate(frames):
      yield self.step(index, image)
