"""Landmark prediction on whole images: faces in, landmarks in image pixels out.

    predictor = Predictor.from_checkpoint("workdir")          # or Predictor(config, variables)
    [result] = predictor.predict("photo.jpg", protocol="WFLW")  # detector finds the faces
    result.landmarks   # (F, 98, 2) x, y in photo.jpg's pixels
    result.confidence  # (F, 98) heatmap peak per point
    result.boxes       # (F, 4) the face boxes used
    result.low_quality # (F,) mean confidence below predictor.min_face_confidence

Per face, the network crop is cut from the original image with the crop
convention of `fgtbt_jax.crop` (box centre, scale max(w, h) / 200, enlarged
1.25x, resized to S x S; area-averaged first when it shrinks more than 2x,
as the stored training crops were). All crops of all images run in
fixed-size batches (the last one padded), so the jitted function compiles
once; a model whose outputs depend on the batch-mates (the authors' FGSA,
`models.batch_dependent`) runs its last batch unpadded instead, compiling
one more shape per remainder size (1 for a single face). On device runs the one predict function of
`fgtbt_jax.inference` (the one the evaluation runs): the model on the crop
and, with the flip test, on its mirror; the two heatmap sets merged with the
unified flip permutation; decoding (argmax / quarter / subpixel, optional
smoothing) to input pixels. Back on the host, the inverse crop matrix maps
them to original image pixels; a protocol's points are the unified output
gathered by its `unified_index`.

`Predictor.from_checkpoint` predicts the way the run was evaluated: its
decoder, flip test and smoothing are the run's `config.eval` unless given;
its batch size and face options are the run's `config.predict` (both with
the command line's `--config.*` overrides when the caller passes them).

Face boxes come from the caller (x1, y1, x2, y2 in the training annotation
style: landmarks' bounding box padded by ~5%) or from a face detector
(`fgtbt_jax.deploy.detector`; default "auto" for still images: dlib's CNN
detector, else dlib's HOG detector, else the Haar cascade),
which sees a copy of huge images downscaled to `max_detection_side`; the
crop itself always comes from the original pixels. Every detected face is
predicted, the `max_faces` largest when that is set. An image where the
detector finds no face gives a result with F = 0.

Face quality: a face's confidence is the mean heatmap peak of its points;
below `min_face_confidence` the face is flagged `low_quality` (a likely
failure: the confidence falls as the error grows, see docs/inference.md).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fgtbt_jax import crop
from fgtbt_jax.data import schemes
from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import models
from fgtbt_jax import rundir
from fgtbt_jax import sharding
from fgtbt_jax.errors import ConfigError
from fgtbt_jax.images import load_image
from fgtbt_jax.inference import PredictSettings

DEFAULT_BATCH_SIZE = 8
# Faces whose mean point confidence is below this are flagged low quality.
# Measured for the default model (`python run.py`) on 260 unseen synthetic
# faces: every face with NME under 10% had a confidence of 0.636 or more,
# and 94% of the failures (NME over 10%) fell below 0.6; the relation to the
# error and how to set it for another model: docs/inference.md, "Face quality".
DEFAULT_MIN_FACE_CONFIDENCE = 0.6


@dataclasses.dataclass
class ImagePrediction:
  """The faces found in one image and their landmarks.

  Attributes:
    landmarks: (F, N, 2) float32 x, y in the original image's pixels (pixel
      centres at integers), N points of `protocol` in its own order.
    confidence: (F, N) float32 heatmap peak of each point (about 1 for a
      confident peak, near 0 for none).
    boxes: (F, 4) float32 face boxes x1, y1, x2, y2 the crops came from.
    protocol: "WFLW", "300W", "COFW", "AFLW" or "unified" (124 points).
    image_size: (height, width) of the original image.
    source: the image's path, or "<image i>" for arrays.
    boxes_from: "given" (the caller's boxes) or "detector".
    detector: `detector.describe_detector` of the detector that found the
      boxes (name, box adjustment, fallback reason), None for given boxes.
    min_face_confidence: the quality threshold (`low_quality`).
  """

  landmarks: np.ndarray
  confidence: np.ndarray
  boxes: np.ndarray
  protocol: str
  image_size: tuple[int, int]
  source: str
  boxes_from: str = "given"
  detector: dict | None = None
  min_face_confidence: float = DEFAULT_MIN_FACE_CONFIDENCE

  @property
  def num_faces(self) -> int:
    return int(self.boxes.shape[0])

  @property
  def face_confidence(self) -> np.ndarray:
    """(F,) mean confidence of each face's points."""
    return face_confidence(self.confidence)

  @property
  def low_quality(self) -> np.ndarray:
    """(F,) bool: the face's mean confidence is below `min_face_confidence`."""
    return self.face_confidence < self.min_face_confidence

  def to_json(self) -> dict:
    """A JSON-serialisable dict of everything above, one entry per face."""
    return {
        "source": self.source,
        "image_size": {"height": int(self.image_size[0]), "width": int(self.image_size[1])},
        "protocol": self.protocol,
        "num_landmarks": int(self.landmarks.shape[1]),
        "boxes_from": self.boxes_from,
        "detector": self.detector,
        "min_face_confidence": float(self.min_face_confidence),
        "faces": [face_json(box, points, conf, self.min_face_confidence)
                  for box, points, conf in zip(self.boxes, self.landmarks, self.confidence)],
    }


def face_confidence(confidence) -> np.ndarray:
  """(...) mean over the last axis of (..., N) per-point confidence."""
  confidence = np.asarray(confidence, np.float64)
  if confidence.shape[-1] == 0:
    return np.zeros(confidence.shape[:-1])
  return confidence.mean(-1)


def face_json(box, points, confidence, min_face_confidence: float) -> dict:
  """One face's JSON record: box, landmarks, per-point and mean confidence, quality flag."""
  mean = float(face_confidence(confidence))
  return {"box": [float(v) for v in box],
          "landmarks": [[float(x), float(y)] for x, y in points],
          "confidence": [float(c) for c in confidence],
          "face_confidence": mean,
          "low_quality": bool(mean < min_face_confidence)}


def _is_single_image(images) -> bool:
  if isinstance(images, (str, os.PathLike, bytes)):
    return True
  return isinstance(images, np.ndarray) and images.ndim in (2, 3)


def register_run_schemes(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Makes the run's own point schemes known as protocols (`schemes.register_run_schemes`:
  from its schemes.json, else its conversions), forgetting any registered before.

  `predict(protocol=<own dataset>)` then gives that dataset's points in its
  order. A run of benchmarks alone registers none.
  """
  schemes.register_run_schemes(workdir, config)


class Predictor:
  """Facial landmarks of whole images with an FGTBT model; see the module docstring.

  Args:
    model_config: the model config (`models.model_config`), or the `model`
      entry of a training config.
    variables: {"params": ..., "batch_stats": ...} of the network (boxed or
      plain arrays), e.g. the EMA variables of a checkpoint.
    image_size: side S of the network crop; default `model_config.input_size`.
    detector: face detector used when `predict` gets no boxes; default
      `detector.default_detector()` (still images: dlib CNN, else dlib HOG, else
      the Haar cascade),
      created when first needed.
    max_faces: predict at most this many detected faces per image, the
      largest (None: every face found). Given boxes are all predicted.
    min_face_confidence: faces whose mean point confidence is below this
      are flagged `low_quality`.
    settings: decoder, flip test and smoothing (`inference.PredictSettings`);
      default the paper's test with the sub-pixel decoder.
    dtype: compute dtype override ("float32" or "bfloat16").
    batch_size: faces per device batch (fixed: one compilation per size).
    crop_enlarge: the crop side over the face box side (1.25).
    max_detection_side: the detector sees images downscaled to this longer side.
    model: a Flax module to run instead of `models.build_model(model_config)`
      (same call signature); for wrapped or test models.
  """

  def __init__(self, model_config: ml_collections.ConfigDict, variables: Any, *,
               image_size: int | None = None, detector: detector_lib.FaceDetector | None = None,
               settings: PredictSettings | None = None,
               dtype: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               crop_enlarge: float = crop.CROP_ENLARGE,
               max_detection_side: int = detector_lib.DEFAULT_MAX_DETECTION_SIDE,
               max_faces: int | None = None,
               min_face_confidence: float = DEFAULT_MIN_FACE_CONFIDENCE,
               model: nn.Module | None = None):
    config = ml_collections.ConfigDict(model_config.to_dict())
    if dtype is not None:
      config.dtype = dtype
    models.validate_model_config(config)
    self.model_config = config
    self.image_size = int(config.input_size if image_size is None else image_size)
    if self.image_size <= 0 or self.image_size % 32:
      raise ValueError(f"Predictor: image_size={self.image_size} must be a positive multiple of 32")
    if int(batch_size) < 1:
      raise ValueError(f"Predictor: batch_size must be at least 1, got {batch_size}")
    self.batch_size = int(batch_size)
    self.crop_enlarge = float(crop_enlarge)
    self.max_detection_side = int(max_detection_side)
    if max_faces is not None and int(max_faces) < 1:
      raise ValueError(f"Predictor: max_faces must be at least 1 (or None), got {max_faces}")
    self.max_faces = None if max_faces is None else int(max_faces)
    self.min_face_confidence = float(min_face_confidence)
    if np.isnan(self.min_face_confidence):  # -inf flags no face, +inf every face.
      raise ValueError(f"Predictor: min_face_confidence must be a number, got "
                       f"{min_face_confidence}")
    self.model = models.build_model(config) if model is None else model
    self.variables = jax.device_put(nn.meta.unbox(variables))
    self.settings = PredictSettings() if settings is None else settings
    self.step: int | None = None  # The training step of a checkpoint's variables.
    self._detector = detector
    self._compiled: dict[PredictSettings, Callable] = {}
    # The authors' FGSA pools over the batch: batches are never padded.
    self.batch_dependent = models.batch_dependent(config)

  # -- construction from a training run ----------------------------------------

  @classmethod
  def from_checkpoint(cls, workdir_or_path: str | os.PathLike, which: str = "best", *,
                      config: ml_collections.ConfigDict | None = None,
                      dataset: str | None = None, **kwargs) -> "Predictor":
    """A predictor with the EMA model of a training run, set up as the run was evaluated.

    Args:
      workdir_or_path: the run's workdir (holding config.json and
        checkpoints/), or its checkpoints/ directory.
      which: "best" (the EMA model with the lowest NME on `dataset`) or
        "latest" (the EMA variables of the newest train state).
      config: the run's config with any overrides, e.g.
        `rundir.load_run_config(workdir, {"eval.flip_test": False})` (the
        one way to set the decoding: the config's `eval`, as eval and the
        predict command read it; `predict(..., flip_test=, decoder=)` overrides
        it per call); default its config.json (upgraded).
      dataset: whose best checkpoint; default the config's `predict.dataset`,
        else the run's first dataset.
      **kwargs: passed to the constructor. image_size and crop_enlarge
        default to the config's `data`, the compute dtype to its `model`,
        batch_size, max_faces and min_face_confidence to its `predict`.
    """
    workdir = rundir.find_workdir(workdir_or_path)
    if config is None:
      config = rundir.load_run_config(workdir)
    register_run_schemes(workdir, config)
    [restored] = inference.restore_models(
        config, workdir, which, sharding.single_device_mesh(),
        sharding.logical_rules(config.mesh.logical_axis_rules),
        datasets=None if which == "latest" else [dataset or rundir.best_model_dataset(config)])
    kwargs.setdefault("image_size", int(config.data.image_size))
    kwargs.setdefault("crop_enlarge", float(config.data.crop_enlarge))
    kwargs.setdefault("batch_size", int(config.predict.batch_size))
    kwargs.setdefault("max_faces", int(config.predict.max_faces) or None)
    kwargs.setdefault("min_face_confidence", float(config.predict.min_face_confidence))
    if "settings" not in kwargs:
      try:
        kwargs["settings"] = PredictSettings.from_config(config.eval)
      except ValueError as e:
        raise ConfigError(f"the run's eval settings: {e}") from None
    predictor = cls(config.model, restored.variables, **kwargs)
    predictor.step = restored.step
    return predictor

  # -- prediction ----------------------------------------------------------------

  @property
  def detector(self) -> detector_lib.FaceDetector:
    if self._detector is None:
      self._detector = detector_lib.default_detector()
    return self._detector

  def detect(self, image: np.ndarray) -> np.ndarray:
    """(F, 4) boxes of the `max_faces` largest faces the detector finds in a loaded image."""
    boxes = detector_lib.detect_faces(image, self.detector, self.max_detection_side)
    return detector_lib.largest_faces(boxes, self.max_faces)

  def _settings(self, flip_test: bool | None, decoder: str | None) -> PredictSettings:
    """The predictor's settings with a call's explicit overrides."""
    changes = {}
    if flip_test is not None:
      changes["flip_test"] = bool(flip_test)
    if decoder is not None:
      changes["decoder"] = decoder
    return self.settings.replace(**changes) if changes else self.settings

  def inference_fn(self, settings: PredictSettings | None = None) -> Callable:
    """The jitted (variables, uint8 crops (B, S, S, 3)) -> (points, confidence)."""
    settings = self.settings if settings is None else settings
    if settings not in self._compiled:
      self._compiled[settings] = jax.jit(inference.make_predict_fn(
          inference.model_apply(self.model), settings))
    return self._compiled[settings]

  def crop_faces(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Network crops (F, S, S, 3) uint8 and their (F, 2, 3) image-to-crop matrices."""
    crops = np.zeros((len(boxes), self.image_size, self.image_size, 3), np.uint8)
    matrices = np.zeros((len(boxes), 2, 3), np.float64)
    for i, box in enumerate(boxes):
      center, scale = crop.center_scale_from_box(box)
      matrices[i] = crop.face_crop_affine(center, scale, self.image_size,
                                          crop_enlarge=self.crop_enlarge)
      crops[i] = crop.warp_to_crop(image, matrices[i], self.image_size)
    return crops, matrices

  def run_crops(self, crops: np.ndarray, flip_test: bool | None = None,
                decoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(M, 124, 2) points in crop pixels and (M, 124) confidence of (M, S, S, 3) crops.

    Runs batches of `batch_size` crops, the last padded with zeros (one
    compiled shape); for a model whose outputs depend on the batch-mates
    (`batch_dependent`) the last batch runs at its true size instead (a
    second compiled shape per remainder size), so padding never changes an
    answer and a single face gets its batch-of-one output.
    `flip_test` and `decoder` override the predictor's settings for this call.
    """
    crops = np.asarray(crops, np.uint8)
    size = self.image_size
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
      raise ValueError(f"run_crops: expected crops of shape (M, {size}, {size}, 3), "
                       f"got {crops.shape}")
    count = len(crops)
    if count == 0:
      return (np.zeros((0, landmarks.NUM_UNIFIED, 2), np.float32),
              np.zeros((0, landmarks.NUM_UNIFIED), np.float32))
    infer = self.inference_fn(self._settings(flip_test, decoder))
    if not self.batch_dependent:
      padded = -(-count // self.batch_size) * self.batch_size
      crops = np.concatenate([crops, np.zeros((padded - count, size, size, 3), np.uint8)])
    # Dispatch every batch before fetching any: the host prepares the next
    # transfer while the device computes.
    outputs = [infer(self.variables, crops[i:i + self.batch_size])
               for i in range(0, len(crops), self.batch_size)]
    points = np.concatenate([np.asarray(p) for p, _ in outputs])[:count]
    confidence = np.concatenate([np.asarray(c) for _, c in outputs])[:count]
    return points, confidence

  def predict(self, images, boxes=None, protocol: str = landmarks.UNIFIED, flip_test: bool | None = None,
              decoder: str | None = None) -> list[ImagePrediction]:
    """Landmarks of every face in `images`.

    Args:
      images: one image or a sequence of them; an image is a path, encoded
        bytes, or an array H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA),
        uint8 or uint16 (`fgtbt_jax.images.load_image`). A 4-D array is
        a batch of RGB images. Files and bytes are turned by their EXIF
        orientation, as viewers show them; landmarks and boxes are in those
        displayed coordinates.
      boxes: None (run the detector on every image), or per image its face
        boxes (F, 4) / one box (4,) x1, y1, x2, y2, or None to detect; for a
        single image, its boxes directly. Detected faces are the
        `max_faces` largest; given boxes are all used.
      protocol: "unified" (124 points) or a protocol name, whose points are
        the unified output gathered by its `unified_index`.
      flip_test: average with the mirrored crop's heatmaps (the paper's test);
        default the predictor's settings.
      decoder: "argmax", "quarter" or "subpixel"; default the predictor's settings.

    Returns:
      One `ImagePrediction` per image, in order.

    Raises:
      DataError: an image does not load (naming the file).
      ValueError: a box is zero-size, not finite or outside its image (naming
        the image and the box); boxes do not match the images.
      DetectorUnavailableError: boxes are missing and no detector can run.
    """
    name, index = landmarks.protocol_index(protocol)
    single = _is_single_image(images)
    if single:
      images, boxes = [images], None if boxes is None else [boxes]
    images = list(images)
    if boxes is None:
      boxes = [None] * len(images)
    boxes = list(boxes)
    if len(boxes) != len(images):
      raise ValueError(f"predict: got {len(boxes)} box entries for {len(images)} images")
    loaded, sources, face_boxes, crops, matrices, detected = [], [], [], [], [], []
    for i, (source, image_boxes) in enumerate(zip(images, boxes)):
      where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<image {i}>"
      image = load_image(source, where=where, orient=True)
      detected.append(image_boxes is None)
      if image_boxes is None:
        image_boxes = self.detect(image)
      image_boxes = detector_lib.check_boxes(image_boxes, image.shape, where)
      image_crops, image_matrices = self.crop_faces(image, image_boxes)
      loaded.append(image.shape[:2])
      sources.append(where)
      face_boxes.append(image_boxes)
      crops.append(image_crops)
      matrices.append(image_matrices)
    all_crops = np.concatenate(crops) if crops else np.zeros(
        (0, self.image_size, self.image_size, 3), np.uint8)
    points, confidence = self.run_crops(all_crops, flip_test, decoder)
    results, start = [], 0
    for shape, where, image_boxes, image_matrices, found in zip(loaded, sources, face_boxes,
                                                                matrices, detected):
      stop = start + len(image_boxes)
      to_image = crop.invert_affine(image_matrices)
      own = points[start:stop][:, index].astype(np.float64)
      results.append(ImagePrediction(
          landmarks=crop.apply_affine(own, to_image).astype(np.float32),
          confidence=confidence[start:stop][:, index].astype(np.float32),
          boxes=image_boxes.astype(np.float32), protocol=name,
          image_size=(int(shape[0]), int(shape[1])), source=where,
          boxes_from="detector" if found else "given",
          detector=detector_lib.describe_detector(self.detector) if found else None,
          min_face_confidence=self.min_face_confidence))
      start = stop
    return results
