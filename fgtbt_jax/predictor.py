"""Landmark prediction on whole images: faces in, landmarks in image pixels out.

    predictor = Predictor.from_checkpoint("workdir")          # or Predictor(config, variables)
    [result] = predictor.predict("photo.jpg", protocol="WFLW")  # detector finds the faces
    result.landmarks   # (F, 98, 2) x, y in photo.jpg's pixels
    result.confidence  # (F, 98) heatmap peak per point
    result.boxes       # (F, 4) the face boxes used

Per face, the network crop is cut from the original image with the crop
convention of `fgtbt_jax.crop` (box centre, scale max(w, h) / 200, enlarged
1.25x, resized to S x S; area-averaged first when it shrinks more than 2x,
as the stored training crops were). All crops of all images run in
fixed-size batches (the last one padded), so the jitted function compiles
once per batch shape. On device: the model on the crop and, with the flip
test, on its mirror in the same batch; the two heatmap sets merged with the
unified flip permutation; decoding (argmax / quarter / subpixel) to input
pixels. Back on the host, the inverse crop matrix maps them to original
image pixels; a protocol's points are the unified output gathered by its
`unified_index`.

Face boxes come from the caller (x1, y1, x2, y2 in the training annotation
style: landmarks' bounding box padded by ~5%) or from a face detector
(`fgtbt_jax.detector`), which sees a copy of huge images downscaled to
`max_detection_side`; the crop itself always comes from the original pixels.
An image where the detector finds no face gives a result with F = 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.images import load_image
from fgtbt_jax import crop
from fgtbt_jax import detector as detector_lib
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import models
from fgtbt_jax import sharding

UNIFIED = "unified"
PROTOCOL_CHOICES: tuple[str, ...] = landmarks.PROTOCOL_NAMES + (UNIFIED,)
DEFAULT_BATCH_SIZE = 8
# The crop is area-averaged before the bilinear warp when the warp shrinks
# by more than this factor (bilinear sampling alone would alias).
_AREA_SHRINK_BELOW = 0.5


def make_inference_fn(apply_fn: Callable[[Any, jax.Array], jax.Array], *, flip_test: bool,
                      output: str = "landmarks", decoder: str = "subpixel") -> Callable:
  """The device side of prediction: (variables, uint8 crops) -> outputs.

  Args:
    apply_fn: (variables, normalised images (B, S, S, 3)) -> heatmaps
      (B, S / stride, S / stride, 124), e.g. the model's eval-mode apply.
    flip_test: also run the mirrored crops (in the same batch) and average
      the heatmaps with the mirror's, flipped back with the unified flip
      permutation.
    output: "landmarks" -> (points (B, 124, 2) in crop input pixels,
      confidence (B, 124) heatmap peaks); "heatmaps" -> the (merged)
      heatmaps.
    decoder: a name of `heatmaps.DECODERS`.

  Returns:
    A pure function of (variables, crops uint8 (B, S, S, 3)); jit it.
  """
  if output not in ("landmarks", "heatmaps"):
    raise ValueError(f"unknown inference output {output!r}; expected 'landmarks' or 'heatmaps'")
  if decoder not in heatmaps.DECODERS:
    raise ValueError(f"unknown heatmap decoder {decoder!r}; expected one of {heatmaps.DECODERS}")
  flip_permutation = landmarks.UNIFIED_FLIP_PERMUTATION

  def infer(variables, crops):
    images = models.normalize_images(crops)
    if flip_test:
      both = apply_fn(variables, jnp.concatenate([images, images[:, :, ::-1, :]]))
      maps = heatmaps.merge_flipped(both[:len(images)], both[len(images):], flip_permutation)
    else:
      maps = apply_fn(variables, images)
    if output == "heatmaps":
      return maps
    coords, confidence = heatmaps.decode(maps, decoder)
    stride = crops.shape[1] / maps.shape[1]
    return heatmaps.heatmap_to_input(coords, stride), confidence

  return infer


def warp_to_crop(image: np.ndarray, to_crop: np.ndarray, size: int) -> np.ndarray:
  """Warps `image` with the 2x3 matrix `to_crop` into a size x size crop.

  Bilinear, black outside the image. When the warp shrinks by more than 2x,
  only the image region the crop covers is first area-averaged to about
  twice the crop's resolution (cheap on huge images), and the resize's exact
  pixel-centre map x' = r (x + 0.5) - 0.5 is folded into the matrix.
  """
  shrink = float(np.sqrt(abs(np.linalg.det(to_crop[:, :2]))))
  if shrink < _AREA_SHRINK_BELOW:
    height, width = image.shape[:2]
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    covered = crop.apply_affine(corners, crop.invert_affine(to_crop))
    margin = 2.0 / shrink  # A few crop pixels: the bilinear footprint at the edge.
    x0 = int(np.clip(np.floor(covered[:, 0].min() - margin), 0, width))
    y0 = int(np.clip(np.floor(covered[:, 1].min() - margin), 0, height))
    x1 = int(np.clip(np.ceil(covered[:, 0].max() + margin) + 1, 0, width))
    y1 = int(np.clip(np.ceil(covered[:, 1].max() + margin) + 1, 0, height))
    if x1 <= x0 or y1 <= y0:
      return np.zeros((size, size, 3), np.uint8)
    region = image[y0:y1, x0:x1]
    new_w = max(1, round((x1 - x0) * shrink * 2))
    new_h = max(1, round((y1 - y0) * shrink * 2))
    region = cv2.resize(region, (new_w, new_h), interpolation=cv2.INTER_AREA)
    rx, ry = new_w / (x1 - x0), new_h / (y1 - y0)
    # Original pixel (x, y) -> resized region pixel.
    to_region = np.array([[rx, 0.0, rx * (0.5 - x0) - 0.5], [0.0, ry, ry * (0.5 - y0) - 0.5]])
    image, to_crop = region, crop.compose_affine(to_crop, crop.invert_affine(to_region))
  return cv2.warpAffine(np.ascontiguousarray(image), to_crop, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


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
  """

  landmarks: np.ndarray
  confidence: np.ndarray
  boxes: np.ndarray
  protocol: str
  image_size: tuple[int, int]
  source: str

  @property
  def num_faces(self) -> int:
    return int(self.boxes.shape[0])

  def to_json(self) -> dict:
    """A JSON-serialisable dict of everything above, one entry per face."""
    return {
        "source": self.source,
        "image_size": {"height": int(self.image_size[0]), "width": int(self.image_size[1])},
        "protocol": self.protocol,
        "num_landmarks": int(self.landmarks.shape[1]),
        "faces": [{"box": [float(v) for v in box],
                   "landmarks": [[float(x), float(y)] for x, y in points],
                   "confidence": [float(c) for c in conf]}
                  for box, points, conf in zip(self.boxes, self.landmarks, self.confidence)],
    }


def protocol_index(protocol: str) -> tuple[str, np.ndarray]:
  """(canonical name, unified ids of its points in its own order) of a protocol or "unified"."""
  if str(protocol).lower() == UNIFIED:
    return UNIFIED, np.arange(landmarks.NUM_UNIFIED)
  found = landmarks.get_protocol(protocol)
  return found.name, np.asarray(found.unified_index)


def _is_single_image(images) -> bool:
  if isinstance(images, (str, os.PathLike, bytes)):
    return True
  return isinstance(images, np.ndarray) and images.ndim in (2, 3)


class Predictor:
  """Facial landmarks of whole images with an FGTBT model; see the module docstring.

  Args:
    model_config: the model config (`models.model_config`), or the `model`
      entry of a training config.
    variables: {"params": ..., "batch_stats": ...} of the network (boxed or
      plain arrays), e.g. the EMA variables of a checkpoint.
    image_size: side S of the network crop; default `model_config.input_size`.
    detector: face detector used when `predict` gets no boxes; default
      `detector.default_detector()`, created when first needed.
    dtype: compute dtype override ("float32" or "bfloat16").
    batch_size: faces per device batch (fixed: one compilation per size).
    crop_enlarge: the crop side over the face box side (1.25).
    max_detection_side: the detector sees images downscaled to this longer side.
    model: a Flax module to run instead of `models.build_model(model_config)`
      (same call signature); for wrapped or test models.
  """

  def __init__(self, model_config: ml_collections.ConfigDict, variables: Any, *,
               image_size: int | None = None, detector: detector_lib.FaceDetector | None = None,
               dtype: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               crop_enlarge: float = crop.CROP_ENLARGE,
               max_detection_side: int = detector_lib.DEFAULT_MAX_DETECTION_SIDE,
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
    self.model = models.build_model(config) if model is None else model
    self.variables = jax.device_put(nn.meta.unbox(variables))
    self._detector = detector
    self._compiled: dict[tuple[bool, str], Callable] = {}

  # -- construction from a training run ----------------------------------------

  @classmethod
  def from_checkpoint(cls, workdir_or_path: str | os.PathLike, which: str = "best", *,
                      dataset: str | None = None, **kwargs) -> "Predictor":
    """A predictor with the EMA model of a training run.

    Args:
      workdir_or_path: the run's workdir (holding config.json and
        checkpoints/), or its checkpoints/ directory.
      which: "best" (the EMA model with the lowest NME on `dataset`) or
        "latest" (the EMA variables of the newest train state).
      dataset: whose best checkpoint; default the run's first dataset.
      **kwargs: passed to the constructor (image_size and crop_enlarge
        default to the run's data config).
    """
    workdir = find_workdir(workdir_or_path)
    config = load_run_config(workdir)
    variables, _ = restore_ema_variables(config, workdir, which, dataset=dataset)
    kwargs.setdefault("image_size", int(config.data.image_size))
    kwargs.setdefault("crop_enlarge", float(config.data.crop_enlarge))
    return cls(config.model, variables, **kwargs)

  # -- prediction ----------------------------------------------------------------

  @property
  def detector(self) -> detector_lib.FaceDetector:
    if self._detector is None:
      self._detector = detector_lib.default_detector()
    return self._detector

  def inference_fn(self, flip_test: bool = True, decoder: str = "subpixel") -> Callable:
    """The jitted (variables, uint8 crops (B, S, S, 3)) -> (points, confidence)."""
    key = (bool(flip_test), decoder)
    if key not in self._compiled:
      model = self.model
      apply_fn = lambda variables, images: model.apply(variables, images, train=False)
      self._compiled[key] = jax.jit(make_inference_fn(apply_fn, flip_test=flip_test,
                                                      decoder=decoder))
    return self._compiled[key]

  def crop_faces(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Network crops (F, S, S, 3) uint8 and their (F, 2, 3) image-to-crop matrices."""
    crops = np.zeros((len(boxes), self.image_size, self.image_size, 3), np.uint8)
    matrices = np.zeros((len(boxes), 2, 3), np.float64)
    for i, box in enumerate(boxes):
      center, scale = crop.center_scale_from_box(box)
      matrices[i] = crop.face_crop_affine(center, scale, self.image_size,
                                          crop_enlarge=self.crop_enlarge)
      crops[i] = warp_to_crop(image, matrices[i], self.image_size)
    return crops, matrices

  def run_crops(self, crops: np.ndarray, flip_test: bool = True,
                decoder: str = "subpixel") -> tuple[np.ndarray, np.ndarray]:
    """(M, 124, 2) points in crop pixels and (M, 124) confidence of (M, S, S, 3) crops.

    Runs fixed batches of `batch_size` crops, the last padded with zeros.
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
    infer = self.inference_fn(flip_test, decoder)
    padded = -(-count // self.batch_size) * self.batch_size
    crops = np.concatenate([crops, np.zeros((padded - count, size, size, 3), np.uint8)])
    # Dispatch every batch before fetching any: the host prepares the next
    # transfer while the device computes.
    outputs = [infer(self.variables, crops[i:i + self.batch_size])
               for i in range(0, padded, self.batch_size)]
    points = np.concatenate([np.asarray(p) for p, _ in outputs])[:count]
    confidence = np.concatenate([np.asarray(c) for _, c in outputs])[:count]
    return points, confidence

  def predict(self, images, boxes=None, protocol: str = UNIFIED, flip_test: bool = True,
              decoder: str = "subpixel") -> list[ImagePrediction]:
    """Landmarks of every face in `images`.

    Args:
      images: one image or a sequence of them; an image is a path, encoded
        bytes, or an array H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA),
        uint8 or uint16 (`data_pipelines.images.load_image`). A 4-D array is
        a batch of RGB images.
      boxes: None (run the detector on every image), or per image its face
        boxes (F, 4) / one box (4,) x1, y1, x2, y2, or None to detect; for a
        single image, its boxes directly.
      protocol: "unified" (124 points) or a protocol name, whose points are
        the unified output gathered by its `unified_index`.
      flip_test: average with the mirrored crop's heatmaps (the paper's test).
      decoder: "argmax", "quarter" or "subpixel".

    Returns:
      One `ImagePrediction` per image, in order.

    Raises:
      DataError: an image does not load (naming the file).
      ValueError: a box is zero-size, not finite or outside its image (naming
        the image and the box); boxes do not match the images.
      DetectorUnavailableError: boxes are missing and no detector can run.
    """
    name, index = protocol_index(protocol)
    single = _is_single_image(images)
    if single:
      images, boxes = [images], None if boxes is None else [boxes]
    images = list(images)
    if boxes is None:
      boxes = [None] * len(images)
    boxes = list(boxes)
    if len(boxes) != len(images):
      raise ValueError(f"predict: got {len(boxes)} box entries for {len(images)} images")
    loaded, sources, face_boxes, crops, matrices = [], [], [], [], []
    for i, (source, image_boxes) in enumerate(zip(images, boxes)):
      where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<image {i}>"
      image = load_image(source, where=where)
      if image_boxes is None:
        image_boxes = detector_lib.detect_faces(image, self.detector, self.max_detection_side)
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
    for shape, where, image_boxes, image_matrices in zip(loaded, sources, face_boxes, matrices):
      stop = start + len(image_boxes)
      to_image = crop.invert_affine(image_matrices)
      own = points[start:stop][:, index].astype(np.float64)
      results.append(ImagePrediction(
          landmarks=crop.apply_affine(own, to_image).astype(np.float32),
          confidence=confidence[start:stop][:, index].astype(np.float32),
          boxes=image_boxes.astype(np.float32), protocol=name,
          image_size=(int(shape[0]), int(shape[1])), source=where))
      start = stop
    return results


# -- training runs -----------------------------------------------------------------


def find_workdir(path: str | os.PathLike) -> pathlib.Path:
  """The run directory holding config.json, given it or its checkpoints/ folder."""
  path = pathlib.Path(path).resolve()
  for candidate in (path, path.parent):
    if (candidate / "config.json").is_file() and (candidate / "checkpoints").is_dir():
      return candidate
  raise FileNotFoundError(
      f"{path}: not a training workdir (expected config.json and checkpoints/ in it "
      "or in its parent)")


def _tuples(value):
  """JSON lists back to the tuples the configs declare."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The experiment config a run saved as `<workdir>/config.json`.

  Raises:
    FileNotFoundError: there is no config.json.
    ValueError: it is not a readable JSON config.
  """
  path = pathlib.Path(workdir) / "config.json"
  try:
    raw = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist: not a training workdir") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not a readable config: {e}") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{path} is not a readable config: expected a JSON object")
  return ml_collections.ConfigDict(_tuples(raw))


def restore_ema_variables(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                          which: str = "best", dataset: str | None = None) -> tuple[Any, int]:
  """The EMA variables {"params", "batch_stats"} of a run and their step, on one device.

  `which` is "best" (lowest NME on `dataset`, default the run's first
  dataset) or "latest" (EMA part of the newest train state).
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}; expected 'best' or 'latest'")
  if which == "latest":
    return _restore_ema(config, workdir, None)[0]
  return _restore_ema(config, workdir, [config.data.datasets[0] if dataset is None else dataset])[0]


def restore_best_ema_variables(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                               datasets) -> list[tuple[Any, int]]:
  """(EMA variables, step) of each dataset's best model, on one device, in `datasets` order."""
  return _restore_ema(config, workdir, list(datasets))


def _restore_ema(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 best_of: list[str] | None) -> list[tuple[Any, int]]:
  """The latest state's EMA variables (`best_of` None) or the best of each dataset named.

  The abstract train state is built once for all of them.
  """
  from jax.sharding import AxisType, Mesh
  from fgtbt_jax import checkpointing
  from fgtbt_jax import train
  checkpoints = checkpointing.Checkpointer.for_run(config, workdir, enable_async=False)
  try:
    names = []
    for dataset in best_of or ():
      name = landmarks.get_protocol(dataset).name
      if name not in config.data.datasets:
        raise KeyError(f"the run in {workdir} trained on {list(config.data.datasets)}; "
                       f"it has no best checkpoint for {name}")
      # Fail before building the abstract state when there is nothing to load.
      if checkpoints.best_step(name) is None:
        raise FileNotFoundError(f"no best checkpoint for {name} under "
                                f"{checkpoints.directory / ('best_' + name)}")
      names.append(name)
    if best_of is None and checkpoints.latest_step() is None:
      raise FileNotFoundError(f"no train-state checkpoint under {checkpoints.directory / 'latest'}")
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES,
                axis_types=(AxisType.Auto,) * 2)
    abstract_state = train.build_setup(config, mesh=mesh).abstract_state
    if best_of is None:
      state, step = checkpoints.restore(abstract_state)
      return [(state.ema_variables(), step)]
    abstract = {"params": abstract_state.ema_params, "batch_stats": abstract_state.ema_batch_stats}
    return [checkpoints.restore_best(name, abstract) for name in names]
  finally:
    checkpoints.close()
