"""Landmark overlays and prediction on files: images, folders and videos.

`draw_landmarks` draws predicted points on an image, coloured by facial part
(jaw, brows, nose ridge and base, eyes, lips, pupils; the parts of
`data_pipelines.synthetic.FACE_PARTS`, mapped through the protocol's
`unified_index`).

`predict_files` runs a `Predictor` on image files, a folder of them, or
videos, and writes for every image `<name>.json` (landmarks, confidence,
boxes, protocol, image size) and `<name>.overlay.png`; for a video
`<name>.frame<NNNNNN>.json` per frame and one `<name>.overlay.avi` (MJPG).
A file that cannot be read, or an image with no face found, is reported in
the returned `PredictReport` and the others go on; the caller decides the
exit status (`predict_main` returns 1 when any file failed).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
from typing import Iterable, Iterator, Sequence

from absl import logging
import cv2
import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.images import load_image
from data_pipelines.synthetic import FACE_PARTS
from fgtbt_jax import detector as detector_lib
from fgtbt_jax import predictor as predictor_lib

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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_SHIFT = 4  # Sub-pixel bits for cv2 drawing: points are placed at 1/16 px.


def point_colors(protocol: str) -> np.ndarray:
  """(N, 3) uint8 RGB colour of each of the protocol's points, by facial part."""
  _, index = predictor_lib.protocol_index(protocol)
  return np.asarray([PART_COLORS[FACE_PARTS[int(u)]] for u in index], np.uint8)


def draw_landmarks(image: np.ndarray, points, protocol: str = predictor_lib.UNIFIED, *,
                   boxes=None, confidence=None, min_confidence: float | None = None,
                   radius: float | None = None) -> np.ndarray:
  """An RGB copy of `image` with landmarks drawn as dots coloured by facial part.

  Args:
    image: H x W x 3 uint8 RGB (grey or RGBA are converted).
    points: (N, 2) or (F, N, 2) landmarks of `protocol` in image pixels;
      non-finite points are skipped.
    protocol: "unified" or a protocol name (fixes N and the colours).
    boxes: optional (F, 4) face boxes, drawn as white rectangles.
    confidence: optional (F, N); with `min_confidence`, points below it are
      drawn as rings instead of dots.
    radius: dot radius in pixels; default about 1% of each face's size.
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
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
      corner_a = tuple(int(v) for v in np.round(np.array([x1, y1]) * (1 << _SHIFT)))
      corner_b = tuple(int(v) for v in np.round(np.array([x2, y2]) * (1 << _SHIFT)))
      cv2.rectangle(canvas, corner_a, corner_b, BOX_COLOR, 1, cv2.LINE_AA, _SHIFT)
  for face, face_points in enumerate(points):
    finite = np.isfinite(face_points).all(1)
    if not finite.any():
      continue
    extent = float(np.ptp(face_points[finite], 0).max()) if finite.sum() > 1 else 100.0
    dot = float(radius) if radius is not None else max(1.5, 0.01 * extent)
    for k in np.flatnonzero(finite):
      centre = tuple(int(v) for v in np.round(face_points[k] * (1 << _SHIFT)))
      weak = (confidence is not None and min_confidence is not None
              and confidence[face, k] < min_confidence)
      cv2.circle(canvas, centre, int(round(dot * (1 << _SHIFT))),
                 tuple(int(c) for c in colors[k]), 1 if weak else -1, cv2.LINE_AA, _SHIFT)
  return canvas


@dataclasses.dataclass
class FileResult:
  """What happened to one input file.

  Attributes:
    source: the input path.
    outputs: files written for it.
    num_faces: faces found (summed over frames for a video).
    num_frames: frames read (1 for an image).
    error: why the file failed, or None.
  """

  source: str
  outputs: list[str] = dataclasses.field(default_factory=list)
  num_faces: int = 0
  num_frames: int = 0
  error: str | None = None


@dataclasses.dataclass
class PredictReport:
  """Results of `predict_files`, one per input file."""

  files: list[FileResult]

  @property
  def failed(self) -> list[FileResult]:
    return [f for f in self.files if f.error is not None]

  def summary(self) -> str:
    lines = [f"{len(self.files) - len(self.failed)} of {len(self.files)} files done"]
    lines += [f"  FAILED {f.error if f.source in f.error else f'{f.source}: {f.error}'}"
              for f in self.failed]
    return "\n".join(lines)


def list_inputs(sources) -> list[pathlib.Path]:
  """Input files: each source is a file, or a folder whose image and video files are taken.

  Folders are read non-recursively, sorted by name; files in them with other
  extensions are skipped. A named file is always taken (and fails later if it
  is not an image or video).
  """
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  files = []
  for source in sources:
    path = pathlib.Path(source)
    if path.is_dir():
      files.extend(sorted(p for p in path.iterdir() if p.is_file() and
                          p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS))
    else:
      files.append(path)
  return files


def _write_json(path: pathlib.Path, content: dict) -> None:
  path.write_text(json.dumps(content) + "\n")


def _write_png(path: pathlib.Path, rgb: np.ndarray) -> None:
  if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
    raise OSError(f"{path}: could not write the overlay image")


def _face_boxes(image: np.ndarray, box, predictor: predictor_lib.Predictor, where: str) -> np.ndarray:
  if box is not None:
    return detector_lib.check_boxes(box, image.shape, where)
  boxes = detector_lib.detect_faces(image, predictor.detector, predictor.max_detection_side)
  return detector_lib.check_boxes(boxes, image.shape, where)


def _batches(items: Iterable, size: int) -> Iterator[list]:
  """Consecutive lists of `size` items (the last may be shorter)."""
  iterator = iter(items)
  while batch := list(itertools.islice(iterator, size)):
    yield batch


def predict_files(predictor: predictor_lib.Predictor, sources, out_dir: str | os.PathLike, *,
                  box=None, protocol: str = predictor_lib.UNIFIED, flip_test: bool = True,
                  decoder: str = "subpixel", min_confidence: float | None = None) -> PredictReport:
  """Predicts landmarks for image files, folders of them and videos; writes JSON and overlays.

  Args:
    predictor: the `Predictor` to run.
    sources: a path or a list of paths (files or folders, see `list_inputs`).
    out_dir: where the outputs go (created).
    box: one face box x1, y1, x2, y2 used for every image and frame (e.g.
      for pre-cropped faces); default: the predictor's face detector.
    protocol, flip_test, decoder: as in `Predictor.predict`.
    min_confidence: overlays draw points below this confidence as rings.

  Returns:
    A `PredictReport`; failed files carry their error. A face detector that
    cannot run at all (`DetectorUnavailableError`) is raised instead.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = list_inputs(sources)
  videos = [f for f in files if f.suffix.lower() in VIDEO_EXTENSIONS]
  images = [f for f in files if f.suffix.lower() not in VIDEO_EXTENSIONS]
  results = {str(f): FileResult(str(f)) for f in files}
  settings = {"flip_test": bool(flip_test), "decoder": decoder}
  for chunk in _batches(images, predictor.batch_size):
    frames = []
    for path in chunk:
      result = results[str(path)]
      try:
        image = load_image(path)
        boxes = _face_boxes(image, box, predictor, str(path))
      except (DataError, ValueError) as e:
        result.error = str(e)
        continue
      result.num_frames = 1
      if len(boxes) == 0:
        result.error = f"{path}: no face found"
        continue
      frames.append((path, image, boxes))
    _predict_and_write(predictor, frames, protocol, flip_test, decoder, min_confidence,
                       settings, lambda path, _: out / path.name, results)
  for path in videos:
    _predict_video(predictor, path, out, box, protocol, flip_test, decoder, min_confidence,
                   settings, results[str(path)])
  return PredictReport([results[str(f)] for f in files])


def _predict_and_write(predictor, frames, protocol, flip_test, decoder, min_confidence,
                       settings, stem_of, results, frame_indices=None) -> list[np.ndarray]:
  """Predicts (path, image, boxes) frames, writes a JSON (and PNG for images) each.

  Returns the overlays.
  """
  if not frames:
    return []
  predictions = predictor.predict([image for _, image, _ in frames],
                                  boxes=[boxes for _, _, boxes in frames], protocol=protocol,
                                  flip_test=flip_test, decoder=decoder)
  overlays = []
  for n, ((path, image, boxes), prediction) in enumerate(zip(frames, predictions)):
    prediction = dataclasses.replace(prediction, source=str(path))
    content = {**prediction.to_json(), **settings}
    frame = None if frame_indices is None else frame_indices[n]
    if frame is not None:
      content["frame"] = int(frame)
    stem = stem_of(path, frame)
    _write_json(stem.with_name(stem.name + ".json"), content)
    overlay = draw_landmarks(image, prediction.landmarks, protocol, boxes=boxes,
                             confidence=prediction.confidence, min_confidence=min_confidence)
    result = results[str(path)]
    result.num_faces += prediction.num_faces
    result.outputs.append(str(stem.with_name(stem.name + ".json")))
    if frame is None:
      png = stem.with_name(stem.name + ".overlay.png")
      _write_png(png, overlay)
      result.outputs.append(str(png))
    overlays.append(overlay)
  return overlays


def read_video_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
  """The frames of a video as RGB uint8 arrays (cv2.VideoCapture).

  Raises:
    DataError: the file is missing or OpenCV cannot open it as a video.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, "video file not found", "missing_image")
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    raise DataError(path, "not a readable video (OpenCV could not open it)", "corrupt_image")
  try:
    while True:
      ok, frame = capture.read()
      if not ok:
        return
      yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
  finally:
    capture.release()


def _predict_video(predictor, path: pathlib.Path, out: pathlib.Path, box, protocol, flip_test,
                   decoder, min_confidence, settings, result: FileResult) -> None:
  overlay_path = out / f"{path.name}.overlay.avi"
  stem_of = lambda p, frame: out / f"{p.name}.frame{frame:06d}"
  writer = None
  try:
    for chunk in _batches(enumerate(read_video_frames(path)), predictor.batch_size):
      result.num_frames += len(chunk)
      frames = [(path, image, _face_boxes(image, box, predictor, f"{path} frame {index}"))
                for index, image in chunk]
      overlays = _predict_and_write(predictor, frames, protocol, flip_test, decoder,
                                    min_confidence, settings, stem_of, {str(path): result},
                                    frame_indices=[index for index, _ in chunk])
      for overlay in overlays:
        if writer is None:
          height, width = overlay.shape[:2]
          writer = cv2.VideoWriter(str(overlay_path), cv2.VideoWriter_fourcc(*"MJPG"),
                                   _video_fps(path), (width, height))
        writer.write(np.ascontiguousarray(overlay[..., ::-1]))
  except (DataError, ValueError) as e:
    result.error = str(e)
  finally:
    if writer is not None:
      writer.release()
      result.outputs.append(str(overlay_path))
  if result.error is None and result.num_frames == 0:
    result.error = f"{path}: the video has no readable frames"
  elif result.error is None and result.num_faces == 0:
    result.error = f"{path}: no face found in any of its {result.num_frames} frames"


def _video_fps(path: pathlib.Path) -> float:
  capture = cv2.VideoCapture(str(path))
  fps = capture.get(cv2.CAP_PROP_FPS)
  capture.release()
  return float(fps) if fps and np.isfinite(fps) and fps > 0 else 25.0


def predict_main(workdir: str, inputs: Sequence[str], out_dir: str, *, which: str = "best",
                 dataset: str | None = None, box: Sequence[float] | None = None,
                 protocol: str = predictor_lib.UNIFIED, flip_test: bool = True,
                 decoder: str = "subpixel", batch_size: int = predictor_lib.DEFAULT_BATCH_SIZE,
                 dtype: str | None = None) -> int:
  """The `predict` command: a run's EMA model on files; returns the exit status.

  0 when every file was processed, 1 when any failed. Prints the summary
  (each failure with its reason) to stdout.
  """
  predictor = predictor_lib.Predictor.from_checkpoint(
      workdir, which, dataset=dataset, batch_size=batch_size, dtype=dtype)
  report = predict_files(predictor, list(inputs), out_dir, box=box, protocol=protocol,
                         flip_test=flip_test, decoder=decoder)
  for done in report.files:
    if done.error is None:
      logging.info("%s: %d face(s) in %d frame(s) -> %s", done.source, done.num_faces,
                   done.num_frames, ", ".join(done.outputs))
  print(f"{report.summary()}\noutputs in {out_dir}", flush=True)
  return 1 if report.failed else 0

