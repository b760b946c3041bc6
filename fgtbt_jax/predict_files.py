"""The predict command: a run's model on image files, folders of them and videos.

    python run.py predict --workdir=runs/paper --image=photos/ --protocol=WFLW

`predict_files` runs a `Predictor` on image files, a folder of them, or
videos, and writes for every image `<name>.json` (landmarks, confidence,
boxes, protocol, image size, the predict settings) and `<name>.overlay.png`;
for a video `<name>.frame<NNNNNN>.json` per frame and one
`<name>.overlay.avi` (MJPG). `<name>` is the input's file name, with its
folders in front where two inputs share a name (`output_names`). A file
that cannot be read, or an image with no face found, is reported in the
returned `PredictReport` and the others go on; the caller decides the exit
status (`predict_main` returns 1 when any file failed).
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

from fgtbt_jax import checkpointing
from fgtbt_jax import detector as detector_lib
from fgtbt_jax import landmarks
from fgtbt_jax import predictor as predictor_lib
from fgtbt_jax.errors import DataError
from fgtbt_jax.images import load_image
from fgtbt_jax.visualization import draw_landmarks

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


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


class InputError(ValueError):
  """The inputs named on the command line are missing or hold no image or video."""


def check_inputs(inputs: Sequence[str]) -> None:
  """Raises InputError unless every input exists and they hold an image or video."""
  if not inputs:
    raise InputError("predict needs --image=PATH (an image, a folder or a video)")
  missing = [str(p) for p in inputs if not pathlib.Path(p).exists()]
  if missing:
    raise InputError(f"--image: {', '.join(missing)} does not exist")
  if not list_inputs(inputs):
    raise InputError(f"--image: no image or video files in {', '.join(map(str, inputs))} "
                     f"(extensions {' '.join(IMAGE_EXTENSIONS)} and {' '.join(VIDEO_EXTENSIONS)})")


def list_inputs(sources) -> list[pathlib.Path]:
  """Input files: each source is a file, or a folder whose image and video files are taken.

  Folders are read non-recursively, sorted by name; files in them with other
  extensions are skipped. A named file is always taken (and fails later if it
  is not an image or video).
  """
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  files, seen = [], set()
  for source in sources:
    path = pathlib.Path(source)
    found = (sorted(p for p in path.iterdir() if p.is_file() and
                    p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
             if path.is_dir() else [path])
    for file in found:  # A file named twice (or in a folder and by name) is done once.
      if file.resolve() not in seen:
        seen.add(file.resolve())
        files.append(file)
  return files


def output_names(files: Sequence[pathlib.Path]) -> dict[pathlib.Path, str]:
  """A distinct output name for every input file: its file name where that is unique.

  Files of the same name in different folders get their folders below the
  deepest folder they share in front, joined with "__" ("a/x.png" and
  "b/x.png" -> "a__x.png" and "b__x.png"), so no output overwrites another.
  """
  by_name: dict[str, list[pathlib.Path]] = {}
  for file in files:
    by_name.setdefault(file.name, []).append(file)
  names = {}
  for name, same in by_name.items():
    if len(same) == 1:
      names[same[0]] = name
      continue
    resolved = [f.resolve() for f in same]
    common = pathlib.Path(os.path.commonpath([str(r.parent) for r in resolved]))
    for file, full in zip(same, resolved):
      names[file] = "__".join(full.relative_to(common).parts)
  return names


def _write_json(path: pathlib.Path, content: dict) -> None:
  path.write_text(json.dumps(content) + "\n")


def _write_png(path: pathlib.Path, rgb: np.ndarray) -> None:
  if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
    raise OSError(f"{path}: could not write the overlay image")


def _given_boxes(image: np.ndarray, box, where: str) -> np.ndarray | None:
  """The caller's box checked against the image, or None: the predictor detects."""
  return None if box is None else detector_lib.check_boxes(box, image.shape, where)


def _batches(items: Iterable, size: int) -> Iterator[list]:
  """Consecutive lists of `size` items (the last may be shorter)."""
  iterator = iter(items)
  while batch := list(itertools.islice(iterator, size)):
    yield batch


def predict_files(predictor: predictor_lib.Predictor, sources, out_dir: str | os.PathLike, *,
                  box=None, protocol: str = landmarks.UNIFIED,
                  min_confidence: float | None = None) -> PredictReport:
  """Predicts landmarks for image files, folders of them and videos; writes JSON and overlays.

  Args:
    predictor: the `Predictor` to run.
    sources: a path or a list of paths (files or folders, see `list_inputs`).
    out_dir: where the outputs go (created).
    box: one face box x1, y1, x2, y2 used for every image and frame (e.g.
      for pre-cropped faces); default: the predictor's face detector.
    protocol: as in `Predictor.predict`; the decoder, flip test and smoothing
      are the predictor's settings.
    min_confidence: overlays draw points below this confidence as rings.

  Returns:
    A `PredictReport`; failed files carry their error. A face detector that
    cannot run at all (`DetectorUnavailableError`) is raised instead.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # An output folder inside an input folder: its overlays are not inputs.
  files = [f for f in list_inputs(sources) if out.resolve() not in f.resolve().parents]
  videos = [f for f in files if f.suffix.lower() in VIDEO_EXTENSIONS]
  images = [f for f in files if f.suffix.lower() not in VIDEO_EXTENSIONS]
  results = {str(f): FileResult(str(f)) for f in files}
  names = output_names(files)
  for chunk in _batches(images, predictor.batch_size):
    frames = []
    for path in chunk:
      result = results[str(path)]
      try:
        image = load_image(path)
        boxes = _given_boxes(image, box, str(path))
      except (DataError, ValueError) as e:
        result.error = str(e)
        continue
      result.num_frames = 1
      frames.append((path, image, boxes))
    _predict_and_write(predictor, frames, protocol, min_confidence,
                       lambda path, _: out / names[path], results)
  for path in videos:
    _predict_video(predictor, path, out / names[path], box, protocol, min_confidence,
                   results[str(path)])
  return PredictReport([results[str(f)] for f in files])


def _predict_and_write(predictor: predictor_lib.Predictor, frames: list, protocol: str,
                       min_confidence: float | None, stem_of, results: dict,
                       frame_indices: list[int] | None = None) -> list[np.ndarray]:
  """Predicts (path, image, boxes or None to detect) frames; writes a JSON (and PNG) each.

  An image (not a video frame) without a face is marked failed. Returns the
  overlays.
  """
  if not frames:
    return []
  predictions = predictor.predict([image for _, image, _ in frames],
                                  boxes=[boxes for _, _, boxes in frames], protocol=protocol)
  settings = dataclasses.asdict(predictor.settings)
  overlays = []
  for n, ((path, image, _), prediction) in enumerate(zip(frames, predictions)):
    if frame_indices is None and prediction.num_faces == 0:
      results[str(path)].error = f"{path}: no face found"
      continue
    boxes = prediction.boxes
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


def _predict_video(predictor: predictor_lib.Predictor, path: pathlib.Path, stem: pathlib.Path,
                   box, protocol: str, min_confidence: float | None, result: FileResult) -> None:
  """Predicts every frame of the video at `path`; outputs are named from `stem`."""
  overlay_path = stem.with_name(f"{stem.name}.overlay.avi")
  stem_of = lambda p, frame: stem.with_name(f"{stem.name}.frame{frame:06d}")
  writer = None
  try:
    for chunk in _batches(enumerate(read_video_frames(path)), predictor.batch_size):
      result.num_frames += len(chunk)
      frames = [(path, image, _given_boxes(image, box, f"{path} frame {index}"))
                for index, image in chunk]
      overlays = _predict_and_write(predictor, frames, protocol, min_confidence, stem_of,
                                    {str(path): result},
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


def predict_main(workdir: str | os.PathLike, inputs: Sequence[str], out_dir: str | None = None,
                 *, which: str = "best", dataset: str | None = None,
                 box: Sequence[float] | None = None, protocol: str = landmarks.UNIFIED,
                 flip_test: bool | None = None, decoder: str | None = None,
                 smoothing_sigma: float | None = None,
                 batch_size: int = predictor_lib.DEFAULT_BATCH_SIZE,
                 dtype: str | None = None) -> int:
  """The `predict` command: a run's EMA model on files; returns the exit status.

  `flip_test`, `decoder` and `smoothing_sigma` default to the run's
  `config.eval` (the run is predicted as it was evaluated). `out_dir`
  defaults to <workdir>/predictions. 0 when every file was processed, 1
  when any failed. Prints the summary (each failure with its reason).

  Raises:
    UsageError-worthy project errors: `predict_files.InputError` (no such
    input, no image or video in a folder), `checkpointing.WorkdirError`,
    `checkpointing.IncompatibleCheckpointError`, `errors.UnknownProtocolError`.
  """
  check_inputs(inputs)
  workdir = checkpointing.find_workdir(workdir)
  out_dir = workdir / "predictions" if out_dir is None else out_dir
  predictor = predictor_lib.Predictor.from_checkpoint(
      workdir, which, dataset=dataset, batch_size=batch_size, dtype=dtype, decoder=decoder,
      flip_test=flip_test, smoothing_sigma=smoothing_sigma)
  report = predict_files(predictor, list(inputs), out_dir, box=box, protocol=protocol)
  for done in report.files:
    if done.error is None:
      logging.info("%s: %d face(s) in %d frame(s) -> %s", done.source, done.num_faces,
                   done.num_frames, ", ".join(done.outputs))
  print(f"{report.summary()}\noutputs in {out_dir}", flush=True)
  return 1 if report.failed else 0

