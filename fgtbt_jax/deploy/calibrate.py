"""Fit a face detector's box calibration on your own annotated faces.

    fgtbt calibrate-detector --faces=my_faces.json [--detector=dlib_hog] [--out=fit.json]

The predictor crops a face from its box, and the model is sensitive to the
box convention (the training annotations' box: the landmarks' bounding box
padded by 5% of its longer side, `detector.landmark_box`). A detector's raw
boxes follow its own convention, which `detector.BoxAdjustment` maps to the
annotation style. `detector.BOX_ADJUSTMENTS` holds the ones measured for
the built-in detectors; on your kind of photos (camera, pose, resolution)
a fit on a few dozen of your faces may do better.

The faces file is JSON, per image (a path, relative to the faces file's
folder or absolute) a list of faces, each a list of landmark points [x, y]
in the image's pixels (any landmark scheme that spans brows to chin and
ear to ear: WFLW's 98, 300W's 68, ...; null for a missing point):

    {"photos/a.jpg": [[[x, y], [x, y], ...], [[x, y], ...]],
     "b.png": [[[x, y], ...]]}

It prints the fitted adjustment, how many faces the raw detector found, the
adjusted boxes' centre error and side ratio against the annotation boxes,
and the form `run.py predict --config.predict.box_adjustment=scale,shift_x,shift_y`
takes;
`--out` writes the same as JSON. From Python:

    from fgtbt_jax.deploy import calibrate, detector
    calibration = calibrate.calibrate_detector("dlib_hog", calibrate.read_annotated_faces(path))
    my_detector = detector.DlibHogDetector(adjustment=calibration.adjustment)
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator

import numpy as np

from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax.errors import DataError, read_json_object
from fgtbt_jax.images import load_image


def read_annotated_faces(path: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(image (H, W, 3) uint8 RGB, landmarks (N, 2)) per face of the faces file (module docstring).

  The whole file is checked before any image is loaded; images are loaded
  one at a time as the pairs are consumed.

  Raises:
    DataError: naming the file (and the key): missing, empty, not JSON,
      not an object of non-empty face lists, a face that is not a list of at
      least two finite [x, y] points, an image that does not exist (or
      does not load).
  """
  where = os.fspath(path)
  path = pathlib.Path(path)
  content = read_json_object(path, "faces file", "{image: [[[x, y], ...], ...]}")
  faces = []
  for key, value in content.items():
    spot = f"{where}:{key}"
    image_path = pathlib.Path(key) if pathlib.Path(key).is_absolute() else path.parent / key
    if not image_path.is_file():
      raise DataError(spot, f"image {image_path} does not exist", "missing_image")
    if not isinstance(value, list) or not value:
      raise DataError(spot, "expected a non-empty list of faces, each a list of [x, y] points",
                      "bad_landmarks")
    if all(p is None or (isinstance(p, list) and len(p) == 2 and not isinstance(p[0], list))
           for p in value):
      value = [value]  # One face given directly as its points.
    for number, face in enumerate(value):
      try:
        points = np.array([[np.nan, np.nan] if p is None else p for p in face], np.float64)
      except (TypeError, ValueError):
        points = np.zeros((0, 3))
      if points.ndim != 2 or points.shape[1] != 2 or np.isfinite(points).all(1).sum() < 2:
        raise DataError(f"{spot}[{number}]", "expected a face as a list of at least two "
                        f"finite [x, y] points, got {json.dumps(face)[:80]}", "bad_landmarks")
      faces.append((image_path, spot, points))

  def pairs():
    loaded, image = None, None
    for image_path, spot, points in faces:
      if image_path != loaded:
        image, loaded = load_image(image_path, where=spot), image_path
      yield image, points
  return pairs()


def raw_detector(name: str, **kwargs) -> detector_lib.FaceDetector:
  """Detector `name` of `detector.DETECTORS` with no box adjustment (its own boxes)."""
  if name not in detector_lib.DETECTORS:
    raise ValueError(f"unknown detector {name!r}; expected one of "
                     f"{', '.join(detector_lib.DETECTORS)}")
  return detector_lib.DETECTORS[name](adjustment=detector_lib.BoxAdjustment(), **kwargs)


def calibrate_detector(name: str, faces, *, min_matched: int = 8,
                       **kwargs) -> detector_lib.Calibration:
  """`detector.calibrate_box_adjustment` of the raw detector `name` on (image, landmarks) pairs.

  `kwargs` go to the detector (e.g. upsample=2 for dlib_hog).
  """
  return detector_lib.calibrate_box_adjustment(raw_detector(name, **kwargs), faces,
                                               min_matched=min_matched)


if __name__ == "__main__":  # The command moved; say where instead of doing nothing.
  raise SystemExit("this module is a library now; the command is `fgtbt calibrate-detector` "
                   "(or `python -m fgtbt_jax.commands calibrate-detector`)")
