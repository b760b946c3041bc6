"""The predict command: a run's model on image files, folders of them and videos.

    python run.py predict --workdir=runs/paper --image=photos/ --config.predict.protocol=WFLW

`predict_files` runs a `Predictor` on image files, a folder of them, or
videos, and writes for every image `<name>.json` (per face: box,
landmarks, confidence, face confidence and quality flag; the protocol,
image size, predict settings, where the boxes came from and the detector)
and `<name>.overlay.png`; for a video `<name>.json` (the same metadata,
frame count, tracking and smoothing settings), `<name>.frames.jsonl` (one
JSON line per frame, faces with track ids) and `<name>.overlay.avi`
(MJPG). Video frames go through `video.FaceTracker`: the detector runs
every `detect_every` frames, the landmarks carry the box in between, and
a One Euro filter smooths them (still images are never smoothed).
`<name>` is the input's file name, with its folders in front where two
inputs share a name (`output_names`). A file that cannot be read, or an
image with no face found, is reported in the returned `PredictReport` and
the others go on; the caller decides the exit status (`predict_main`
returns 1 when any file failed).

Face boxes: the detector's, one box for every input (`box`), or per input
file from a boxes JSON file (`read_boxes_file`):
    {"photos/a.jpg": [[x1, y1, x2, y2], ...], "b.png": [[...]]}
keyed by the input's path (as given, or resolving to the same file) or by
its file name; inputs it does not name are detected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import pathlib
import tempfile
from typing import Iterable, Iterator, Sequence

from absl import logging
import cv2
import ml_collections
import numpy as np

from fgtbt_jax.data import schemes
from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax import errors
from fgtbt_jax import landmarks
from fgtbt_jax.deploy import predictor as predictor_lib
from fgtbt_jax import rundir
from fgtbt_jax.deploy import video
from fgtbt_jax.errors import ConfigError, DataError, OutputError, read_json_object
from fgtbt_jax.images import load_image
from fgtbt_jax.inference import PredictSettings
from fgtbt_jax.deploy.visualization import draw_landmarks

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
# The endings of the overlays this command writes: a folder's files with
# them are outputs of an earlier run, not inputs (a named file is still taken).
OVERLAY_SUFFIXES = (".overlay.png", ".overlay.avi")


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


def check_inputs(inputs: Sequence[str]) -> list[pathlib.Path]:
  """The input files (`list_inputs`); InputError unless every input exists and they hold one."""
  if not inputs:
    raise InputError("predict needs --image=PATH (an image, a folder or a video)")
  missing = [str(p) for p in inputs if not pathlib.Path(p).exists()]
  if missing:
    raise InputError(f"--image: {', '.join(missing)} does not exist")
  files = list_inputs(inputs)
  if not files:
    raise InputError(f"--image: no image or video files in {', '.join(map(str, inputs))} "
                     f"(extensions {' '.join(IMAGE_EXTENSIONS)} and {' '.join(VIDEO_EXTENSIONS)})")
  return files


def list_inputs(sources) -> list[pathlib.Path]:
  """Input files: each source is a file, or a folder whose image and video files are taken.

  Folders are searched with their subfolders (hidden ones, named ".*", left
  out), files sorted by path; files with other extensions, and this command's
  own overlays (`OVERLAY_SUFFIXES`), are skipped. A named file is always
  taken (and fails later if it is not an image or video). `output_names`
  keeps the outputs of same-named files in different subfolders apart.
  """
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  files, seen = [], set()
  for source in sources:
    path = pathlib.Path(source)
    found = (sorted(p for p in path.rglob("*") if p.is_file() and
                    p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS and
                    not p.name.lower().endswith(OVERLAY_SUFFIXES) and
                    not any(part.startswith(".") for part in p.relative_to(path).parts))
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


def _only_numbers(value) -> bool:
  """Whether a JSON value is a number or nested lists of numbers (true and false are not)."""
  if isinstance(value, list):
    return all(_only_numbers(v) for v in value)
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_boxes_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The boxes JSON file: {input path or file name: [[x1, y1, x2, y2], ...]} -> (F, 4) arrays.

  A key may also map to one box [x1, y1, x2, y2].

  Raises:
    DataError: naming the file (and line and column, or key): missing, not
      JSON, not an object, empty, or a value that is not a non-empty list
      of four finite numbers each with x2 > x1 and y2 > y1.
  """
  where = os.fspath(path)
  content = read_json_object(path, "boxes file", "{image: [[x1, y1, x2, y2], ...]}")
  boxes = {}
  for key, value in content.items():
    spot = f"{where}:{key}"
    try:
      array = np.asarray(value, np.float64) if _only_numbers(value) else None
    except (TypeError, ValueError):
      array = None
    if array is not None and array.shape == (4,):
      array = array[None]
    if array is None or array.ndim != 2 or array.shape[1] != 4 or len(array) == 0:
      raise DataError(spot, f"expected a non-empty list of boxes [x1, y1, x2, y2], got "
                      f"{json.dumps(value)[:80]}", "bad_boxes")
    # Finite, positive size; against the image when it is loaded.
    for i, box in enumerate(array):
      values = [float(v) for v in box]
      if not np.isfinite(box).all():
        raise DataError(spot, f"face box {i} {values} is not finite", "bad_boxes")
      if not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(spot, f"face box {i} {values} has zero or negative size (needs "
                        "x2 > x1 and y2 > y1)", "bad_boxes")
    boxes[key] = array
  return boxes


def match_boxes_to_inputs(boxes: dict, files: Sequence[pathlib.Path],
                          where: str = "boxes") -> dict[pathlib.Path, np.ndarray]:
  """The boxes of each input file, from keys naming its path or file name.

  A key matches a file whose path is the key as written, resolves to the
  same file, or (when no path matches) whose file name is the key.

  Raises:
    DataError: `where:key` for a key that names no input file, or a file
      name shared by several inputs, or two keys naming one file.
  """
  by_resolved = {f.resolve(): f for f in files}
  by_name: dict[str, list[pathlib.Path]] = {}
  for file in files:
    by_name.setdefault(file.name, []).append(file)
  matched: dict[pathlib.Path, np.ndarray] = {}
  for key, value in boxes.items():
    file = by_resolved.get(pathlib.Path(key).resolve())
    if file is None:
      same_name = by_name.get(key, [])
      if len(same_name) > 1:
        raise DataError(f"{where}:{key}", f"{len(same_name)} inputs are named {key} "
                        f"({', '.join(map(str, same_name))}); key the boxes by path",
                        "ambiguous_key")
      file = same_name[0] if same_name else None
    if file is None:
      raise DataError(f"{where}:{key}", "no such input image or video among the --image "
                      f"inputs ({len(files)} files)", "missing_image")
    if file in matched:
      raise DataError(f"{where}:{key}", f"a second box list for {file}", "duplicate_key")
    matched[file] = value
  return matched


def _write_json(path: pathlib.Path, content: dict) -> None:
  path.write_text(json.dumps(content) + "\n")


def _write_png(path: pathlib.Path, rgb: np.ndarray) -> None:
  if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
    raise OSError(f"{path}: could not write the overlay image")


def _given_boxes(image: np.ndarray, box, where: str) -> np.ndarray | None:
  """The caller's boxes checked against the image, or None: the predictor detects."""
  return None if box is None else detector_lib.check_boxes(box, image.shape, where)


def _draw(image: np.ndarray, points, confidence, boxes, protocol: str,
          min_confidence: float | None, min_face_confidence: float,
          labels: Sequence[str] | None = None) -> np.ndarray:
  """The overlay of one image's faces; low-quality faces are flagged on it."""
  face_confidence = predictor_lib.face_confidence(confidence)
  return draw_landmarks(image, points, protocol, boxes=boxes, confidence=confidence,
                        min_confidence=min_confidence,
                        low_quality=face_confidence < min_face_confidence,
                        face_confidence=face_confidence, labels=labels)


def _batches(items: Iterable, size: int) -> Iterator[list]:
  """Consecutive lists of `size` items (the last may be shorter)."""
  iterator = iter(items)
  while batch := list(itertools.islice(iterator, size)):
    yield batch


def predict_files(predictor: predictor_lib.Predictor, sources, out_dir: str | os.PathLike, *,
                  box=None, boxes: dict | None = None, boxes_source: str = "boxes",
                  protocol: str = landmarks.UNIFIED, min_confidence: float | None = None,
                  tracking: video.TrackerSettings = video.TrackerSettings(),
                  video_detector: detector_lib.FaceDetector | None = None,
                  progress: bool = True) -> PredictReport:
  """Predicts landmarks for image files, folders of them and videos; writes JSON and overlays.

  Args:
    predictor: the `Predictor` to run (its `max_faces` and
      `min_face_confidence` apply).
    sources: a path or a list of paths (files or folders, see `list_inputs`).
    out_dir: where the outputs go (created).
    box: one face box x1, y1, x2, y2 used for every image and frame (e.g.
      for pre-cropped faces); default: the predictor's face detector.
    boxes: per input file its boxes (F, 4), keyed by path or file name
      (`match_boxes_to_inputs`; e.g. from `read_boxes_file`); inputs not
      named are detected. Not together with `box`.
    boxes_source: the name of `boxes` in error messages (its file).
    protocol: as in `Predictor.predict`; the decoder, flip test and smoothing
      are the predictor's settings.
    min_confidence: overlays draw points below this confidence as rings.
    tracking: detection interval and landmark smoothing of videos.
    video_detector: the face detector of video frames (`make_detector(...,
      input_kind="video")`: "auto" is faster there); default the predictor's.
    progress: a progress bar over the files (and one over a video's frames)
      with rate and ETA, on stderr (`errors.progress_bar`).

  Returns:
    A `PredictReport`; failed files carry their error (a given box outside
    its image among them). A face detector that cannot run at all
    (`DetectorUnavailableError`) is raised instead.

  Raises:
    InputError: both `box` and `boxes`.
    DataError: a `boxes` key that names no input (`match_boxes_to_inputs`).
  """
  if box is not None and boxes is not None:
    raise InputError("give one face box for every input (--box) or a boxes file (--boxes), "
                     "not both")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # Inputs may share the output folder: only earlier overlays are skipped
  # (`list_inputs`), never an input.
  files = list_inputs(sources)
  per_file = {} if boxes is None else match_boxes_to_inputs(boxes, files, boxes_source)
  # Errors name a box list by its file and key, as written there.
  keys = {} if boxes is None else match_boxes_to_inputs({k: k for k in boxes}, files,
                                                        boxes_source)
  given = lambda path: (box, str(path)) if box is not None else (
      (per_file[path], f"{boxes_source}:{keys[path]}") if path in per_file
      else (None, str(path)))
  videos = [f for f in files if f.suffix.lower() in VIDEO_EXTENSIONS]
  images = [f for f in files if f.suffix.lower() not in VIDEO_EXTENSIONS]
  results = {str(f): FileResult(str(f)) for f in files}
  names = output_names(files)
  # Files done, a batch of images at a time; the first batch includes the compile.
  bar = errors.progress_bar(total=len(files), desc="predict", unit="file", enabled=progress)
  with bar, (contextlib.nullcontext() if bar.disable else errors.logs_above_bars()):
    for chunk in _batches(images, predictor.batch_size):
      frames = []
      for path in chunk:
        result = results[str(path)]
        try:
          image = load_image(path, orient=True)
          image_boxes = _given_boxes(image, *given(path))
        except (DataError, ValueError) as e:
          result.error = str(e)
          continue
        result.num_frames = 1
        frames.append((path, image, image_boxes))
      _predict_and_write(predictor, frames, protocol, min_confidence,
                         lambda path: out / names[path], results)
      bar.update(len(chunk))
    for path in videos:
      _predict_video(predictor, path, out / names[path], given(path), protocol, min_confidence,
                     tracking, results[str(path)], progress=not bar.disable,
                     face_detector=video_detector)
      bar.update(1)
  return PredictReport([results[str(f)] for f in files])


def _predict_and_write(predictor: predictor_lib.Predictor, frames: list, protocol: str,
                       min_confidence: float | None, stem_of, results: dict) -> None:
  """Predicts (path, image, boxes or None to detect) images; writes a JSON and PNG each.

  An image without a face is marked failed.
  """
  if not frames:
    return
  predictions = predictor.predict([image for _, image, _ in frames],
                                  boxes=[boxes for _, _, boxes in frames], protocol=protocol)
  settings = dataclasses.asdict(predictor.settings)
  for (path, image, _), prediction in zip(frames, predictions):
    result = results[str(path)]
    if prediction.num_faces == 0:
      result.error = f"{path}: no face found"
      continue
    prediction = dataclasses.replace(prediction, source=str(path))
    stem = stem_of(path)
    json_path, png = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".overlay.png")
    try:
      _write_json(json_path, {**prediction.to_json(), **settings,
                              "max_faces": predictor.max_faces})
      _write_png(png, _draw(image, prediction.landmarks, prediction.confidence, prediction.boxes,
                            protocol, min_confidence, predictor.min_face_confidence))
    except OSError as e:  # A full disk mid-run: this file fails, named; the run goes on.
      result.error = f"{path}: cannot write its outputs in {stem.parent} ({e.strerror or e})"
      continue
    result.num_faces += prediction.num_faces
    result.outputs += [str(json_path), str(png)]


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
                   given: tuple, protocol: str, min_confidence: float | None,
                   tracking: video.TrackerSettings, result: FileResult,
                   progress: bool = False,
                   face_detector: detector_lib.FaceDetector | None = None) -> None:
  """Tracks and predicts the faces of every frame of the video at `path`; outputs from `stem`.

  `given` is (boxes or None, where): given boxes are used in every frame
  (as a detector that runs on each), else `face_detector` (default the
  predictor's) runs every `tracking.detect_every` frames. `progress`: a bar over the frames
  (its total the video's frame count, where the file says it).
  """
  name, index = landmarks.protocol_index(protocol)
  box, where = given
  fps = _video_fps(path)
  overlay_path = stem.with_name(f"{stem.name}.overlay.avi")
  lines_path = stem.with_name(f"{stem.name}.frames.jsonl")
  face_detector = predictor.detector if face_detector is None else face_detector
  if box is None:
    settings, boxes_label = tracking, None

    def detect(image):
      boxes = detector_lib.detect_faces(image, face_detector, predictor.max_detection_side)
      return detector_lib.largest_faces(boxes, predictor.max_faces)
  else:
    detect = lambda image: detector_lib.check_boxes(box, image.shape, where)
    settings, boxes_label = dataclasses.replace(tracking, detect_every=1), "given"

  def locate(image, boxes):
    [prediction] = predictor.predict(image, boxes=boxes)  # Unified points: they make the box.
    return prediction.landmarks, prediction.confidence

  tracker = video.FaceTracker(detect, locate, fps, settings,
                              min_face_confidence=predictor.min_face_confidence,
                              max_faces=predictor.max_faces if box is None else None)
  writer, image_shape = None, None
  frame_count = _video_frame_count(path)
  try:
    with open(lines_path, "w") as lines, errors.progress_bar(
        total=frame_count or None, desc=path.name, unit="frame", leave=False,
        enabled=progress) as bar:
      for frame_index, image in enumerate(read_video_frames(path)):
        result.num_frames += 1
        frame = tracker.step(frame_index, image)
        image_shape = image.shape
        points, confidence = frame.landmarks[:, index], frame.confidence[:, index]
        faces = []
        for k in range(len(frame.track_ids)):
          face = predictor_lib.face_json(frame.boxes[k], points[k], confidence[k],
                                         predictor.min_face_confidence)
          faces.append({"track_id": int(frame.track_ids[k]),
                        "box_from": boxes_label or frame.boxes_from[k], **face})
        lines.write(json.dumps({"frame": frame.index, "time_s": frame.time,
                                "detector_ran": frame.detected and box is None,
                                "faces": faces}) + "\n")
        result.num_faces += len(faces)
        overlay = _draw(image, points, confidence, frame.boxes, protocol, min_confidence,
                        predictor.min_face_confidence,
                        labels=[f"#{t}" for t in frame.track_ids])
        if writer is None:
          writer = cv2.VideoWriter(str(overlay_path), cv2.VideoWriter_fourcc(*"MJPG"), fps,
                                   (overlay.shape[1], overlay.shape[0]))
        writer.write(np.ascontiguousarray(overlay[..., ::-1]))
        bar.update(1)
  except (DataError, ValueError) as e:
    result.error = str(e)
  finally:
    if writer is not None:
      writer.release()
      result.outputs.append(str(overlay_path))
  if result.num_frames:
    result.outputs.append(str(lines_path))
  else:  # Nothing was read: no empty per-frame file is left behind.
    lines_path.unlink(missing_ok=True)
  if result.error is None and result.num_frames == 0:
    result.error = f"{path}: the video has no readable frames"
  elif result.error is None and result.num_faces == 0:
    result.error = f"{path}: no face found in any of its {result.num_frames} frames"
  if result.error is not None:
    return
  summary = stem.with_name(f"{stem.name}.json")
  _write_json(summary, {
      "source": str(path), "image_size": {"height": int(image_shape[0]),
                                          "width": int(image_shape[1])},
      "protocol": name, "num_landmarks": int(len(index)), "fps": fps,
      "num_frames": result.num_frames, "num_faces": result.num_faces,
      "frames": lines_path.name,
      "boxes_from": "given" if box is not None else "detector",
      "detector": None if box is not None else detector_lib.describe_detector(face_detector),
      "detector_runs": 0 if box is not None else tracker.detector_runs,
      "tracking": {"detect_every": settings.detect_every, "min_iou": settings.min_iou,
                   "max_size_change": settings.max_size_change},
      "smoothing": None if settings.smoothing is None else dataclasses.asdict(settings.smoothing),
      "min_face_confidence": predictor.min_face_confidence, "max_faces": predictor.max_faces,
      **dataclasses.asdict(predictor.settings)})
  result.outputs.append(str(summary))


def _video_frame_count(path: pathlib.Path) -> int:
  """The frame count the video file states (0 where it does not say)."""
  capture = cv2.VideoCapture(str(path))
  count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
  capture.release()
  return int(count) if count and count > 0 else 0


def _video_fps(path: pathlib.Path) -> float:
  capture = cv2.VideoCapture(str(path))
  fps = capture.get(cv2.CAP_PROP_FPS)
  capture.release()
  return float(fps) if fps and np.isfinite(fps) and fps > 0 else 25.0


def tracker_settings(predict_config) -> video.TrackerSettings:
  """A config's `predict` section's video options as `video.TrackerSettings`."""
  smoothing = (video.OneEuroSettings(min_cutoff=float(predict_config.one_euro_min_cutoff),
                                     beta=float(predict_config.one_euro_beta))
               if predict_config.video_smoothing else None)
  return video.TrackerSettings(detect_every=int(predict_config.detect_every), smoothing=smoothing)


def parse_box(values: Sequence[str] | None) -> list[float] | None:
  """--box=x1,y1,x2,y2 (split at the commas) as four numbers; InputError otherwise."""
  if values is None:
    return None
  try:
    box = [float(v) for v in values]
  except ValueError:
    box = []
  if len(box) != 4:
    raise InputError(f"--box={','.join(values)}: expected four numbers x1,y1,x2,y2")
  return box


@contextlib.contextmanager
def config_errors(key: str = "") -> Iterator[None]:
  """Raises a ValueError from the block as a ConfigError, "key: message"
  (the message alone without `key`); `validation` checks with it too."""
  try:
    yield
  except ValueError as e:
    raise ConfigError(f"{key}: {e}" if key else str(e)) from e


def _own_dataset(config: ml_collections.ConfigDict, name: str) -> str | None:
  """The run's own dataset (not a benchmark) of `data.datasets` called `name`
  (case-insensitive), else None."""
  own = {str(n).upper(): str(n) for n in config.data.datasets if not landmarks.is_benchmark(n)}
  return own.get(str(name).upper())


def check_protocol(config: ml_collections.ConfigDict, schemes_registered: bool) -> None:
  """predict.protocol: "unified", a benchmark, or one of the run's own datasets;
  else a ConfigError naming the valid choices.

  With `schemes_registered` (predict, after `predictor.register_run_schemes`)
  an own dataset's scheme must be registered; without (a training config,
  checked before its data registers them), its name is enough.
  """
  wanted = str(config.predict.protocol)
  own = _own_dataset(config, wanted)
  try:
    landmarks.protocol_index(wanted)
    return
  except errors.UnknownProtocolError as e:
    if own is not None and not schemes_registered:
      return
    choices = [landmarks.UNIFIED, *e.known]
    if not schemes_registered:
      choices += [n for n in config.data.datasets if n not in e.known]
  if own is not None:
    raise ConfigError(
        f"predict.protocol {wanted!r}: the point scheme of the run's own dataset {own} is "
        f"neither in the run's {schemes.RUN_FILE} (training writes it) nor converted under "
        f"data.data_dir {str(config.data.data_dir)!r}; expected one of {choices}")
  raise ConfigError(f"predict.protocol: unknown protocol {wanted!r}; expected one of {choices}")


def validate_predict_config(config: ml_collections.ConfigDict,
                            schemes_registered: bool = False) -> None:
  """Checks what `run.py predict` reads (`validation.validate_config` checks it too): the predict section and the decoding (eval) settings.

  `schemes_registered`: the run's own point schemes are registered
  (`predictor.register_run_schemes`), so predict.protocol may name an own
  dataset only if its scheme was found (`check_protocol`).
  """
  p = config.predict
  if p.detector not in detector_lib.DETECTOR_CHOICES:
    raise ConfigError(f"predict.detector must be one of {detector_lib.DETECTOR_CHOICES}, got "
                      f"{p.detector!r}")
  with config_errors("predict.box_adjustment"):
    detector_lib.parse_box_adjustment(p.box_adjustment)
  for key in ("batch_size", "detect_every"):
    if p[key] < 1:
      raise ConfigError(f"predict.{key} must be at least 1, got {p[key]}")
  if p.max_faces < 0:
    raise ConfigError(f"predict.max_faces must be >= 0 (0 = every face), got {p.max_faces}")
  if math.isnan(p.min_face_confidence):  # -inf flags no face, +inf every face.
    raise ConfigError("predict.min_face_confidence must be a number, not nan")
  check_protocol(config, schemes_registered)
  with config_errors("predict.dataset"):
    trained = (not p.dataset or _own_dataset(config, p.dataset) is not None
               or landmarks.get_protocol(p.dataset).name in config.data.datasets)
  if not trained:
    raise ConfigError(f"predict.dataset {p.dataset!r}: the run trained on "
                      f"{tuple(config.data.datasets)}")
  with config_errors("predict.one_euro_*"):
    video.OneEuroSettings(min_cutoff=p.one_euro_min_cutoff, beta=p.one_euro_beta)
  with config_errors("eval.smoothing_sigma"):
    PredictSettings.from_config(config.eval)


def predict_main(workdir: str | os.PathLike, inputs: Sequence[str], out_dir: str | None = None,
                 *, config: ml_collections.ConfigDict | None = None, which: str = "best",
                 box: Sequence[float] | None = None, boxes_file: str | None = None) -> int:
  """The `predict` command: a run's EMA model on files; returns the exit status.

  `config` is the run's config with the command line's overrides
  (`rundir.load_run_config`; default its config.json, read once the inputs,
  the workdir and the output folder are checked). Its `predict` section
  says how (detector and box adjustment, faces per image, quality
  threshold, batch size, protocol, video tracking and smoothing), its
  `eval` section how to decode (the run is predicted as it was evaluated),
  its `model.dtype` the compute dtype. `out_dir` defaults to
  <workdir>/predictions. `boxes_file` is a boxes JSON file
  (`read_boxes_file`), checked against the inputs before the model loads.
  Returns 0 when every file was processed (and there was one at least), 1
  when any failed or none was found. Prints the summary (each failure with
  its reason).

  Raises:
    UsageError-worthy project errors: `predict_files.InputError` (no such
    input, no image or video in a folder, --box with --boxes),
    `errors.DataError` (a bad boxes file, naming it and the key),
    `errors.ConfigError` (a predict option that cannot work),
    `rundir.WorkdirError`, `checkpointing.IncompatibleCheckpointError`,
    `detector.DetectorUnavailableError`, `errors.OutputError` (the output
    folder cannot be made or written).
  """
  files = check_inputs(inputs)  # Folders are walked once.
  if box is not None and boxes_file is not None:
    raise InputError("--box and --boxes: give one face box for every input or a boxes file, "
                     "not both")
  boxes = None
  if boxes_file is not None:
    boxes = read_boxes_file(boxes_file)
    match_boxes_to_inputs(boxes, files, boxes_file)
  workdir = rundir.find_workdir(workdir)
  out_dir = workdir / "predictions" if out_dir is None else out_dir
  try:  # Before the model loads: a read-only run's default --out, or a file there.
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):  # An existing folder may still be read-only.
      pass
  except OSError as e:
    reason = ("exists and is not a folder" if isinstance(e, FileExistsError)
              else f"cannot be written ({e.strerror or e})")
    raise OutputError(f"{out_dir}: the output folder {reason}; pass --out=DIR") from None
  config = rundir.load_run_config(workdir) if config is None else config
  # The run's own point schemes are protocols too (predict.protocol=<own dataset>).
  predictor_lib.register_run_schemes(workdir, config)
  validate_predict_config(config, schemes_registered=True)
  options = config.predict
  # Made up front (a missing detector fails before the model loads), unless
  # every input has its boxes.
  face_detector = video_detector = None
  if box is None and not (boxes is not None and len(boxes) >= len(files)):
    adjustment = detector_lib.parse_box_adjustment(options.box_adjustment)
    face_detector = detector_lib.make_detector(options.detector, adjustment)
    if options.detector == "auto" and any(p.suffix.lower() in VIDEO_EXTENSIONS for p in files):
      # "auto" picks per input kind (stills: the CNN; frames: HOG, faster); a
      # named detector serves both (the predictor's, not loaded twice).
      video_detector = detector_lib.make_detector(options.detector, adjustment, input_kind="video")
  predictor = predictor_lib.Predictor.from_checkpoint(workdir, which, config=config,
                                                      detector=face_detector)
  report = predict_files(predictor, list(inputs), out_dir, box=box, boxes=boxes,
                         boxes_source=boxes_file or "boxes", protocol=options.protocol,
                         tracking=tracker_settings(options), video_detector=video_detector)
  for done in report.files:
    if done.error is None:
      logging.info("%s: %d face(s) in %d frame(s) -> %s", done.source, done.num_faces,
                   done.num_frames, ", ".join(done.outputs))
  print(f"{report.summary()}\noutputs in {out_dir}", flush=True)
  overlays = [output for done in report.files if done.error is None
              for output in done.outputs if output.endswith(OVERLAY_SUFFIXES)]
  if overlays:
    first = ((f"see {rundir.shown_path(overlays[0])}",
              "an overlay; the landmarks are in the .json beside it"),)
    own = [str(n) for n in config.data.datasets if not landmarks.is_benchmark(n)]
    print(rundir.next_commands(workdir, "predict", first=first, own_scheme=(own or [None])[0]),
          flush=True)
  return 1 if report.failed or not report.files else 0
