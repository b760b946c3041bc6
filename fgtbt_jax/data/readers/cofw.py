"""COFW: `COFW_train_color.mat` / `COFW_test_color.mat` (MATLAB v7.3).

Keys: train `IsTr`, `phisTr`, `bboxesTr`; test `IsT`, `phisT`, `bboxesT`.
  Is*:     N cells, each an H x W x 3 (or grey H x W) uint8 image;
  phis*:   N x 87: x1..x29, y1..y29, then 29 occlusion flags (1 = occluded);
  bboxes*: N x 4 [x, y, w, h].
The v7.3 (HDF5) layout stores everything transposed and the cells as object
references; `mat.load_mat` undoes both, and each image's orientation is
checked against its landmarks (an image the landmarks do not fit but fit
when transposed is transposed, and counted in the report's notes). Grey
images are repeated into three channels. Old v5 copies of the same keys are
read too (with scipy).

The record's `box` is the file's [x, y, w, h] box as x1, y1, x2, y2; its
`center` and `scale` follow HRNet's COFW loader, which crops from the
landmarks' min/max extent (the crop the paper's numbers were measured with).
With `convention="authors"` the extent is floor(min) / ceil(max) of the
points, as the FGTBT authors' loader takes it (up to 1 px larger).
Occlusion flags are `point_flags["occluded"]` (uint8, 1 = occluded).
Coordinates are used as given.
"""

from __future__ import annotations

import numpy as np

from fgtbt_jax.data.readers import common
from fgtbt_jax.data.readers.mat import load_mat
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax.data import datasets
from fgtbt_jax.errors import DataError
from fgtbt_jax.images import to_rgb_uint8

NUM_POINTS = 29
FMT = datasets.COFW_MAT
KEYS = {"train": ("IsTr", "phisTr", "bboxesTr"), "test": ("IsT", "phisT", "bboxesT")}
FILES = {"train": ("COFW_train_color.mat", "COFW_train.mat"),
         "test": ("COFW_test_color.mat", "COFW_test.mat")}


def _rows(array, width: int, key: str, path: str, report: common.ReadReport) -> np.ndarray:
  """`array` as N x width, transposing a width x N copy (with a note)."""
  array = np.asarray(array, np.float64)
  if array.ndim == 2 and array.shape[1] == width:
    return array
  if array.ndim == 2 and array.shape[0] == width:
    report.notes.append(f"{path}:{key} is stored {array.shape}; read as its transpose")
    return array.T
  raise DataError(f"{path}:{key}", f"expected an N x {width} array, got shape "
                  f"{array.shape}", "bad_value")


def read_cofw_mat(src: str, split: str, on_error: str = "raise", convention: str = "project"):
  """Reads COFW from its .mat file (see the module doc).

  Args:
    src: the .mat file, or a directory holding `COFW_{split}_color.mat`
      (or `COFW_{split}.mat`).
    split: "train" or "test".
    on_error: "raise" or "skip".
    convention: "project" or "authors" (`common.CONVENTIONS`): the crop extent.
  """
  common.check_split(split, tuple(KEYS), FMT)
  common.check_convention(convention)
  path = common.locate(src, FILES[split], "COFW .mat file")
  images_key, phis_key, boxes_key = KEYS[split]
  data = load_mat(path, KEYS[split])
  report = common.ReadReport("COFW", split, FMT, path)
  images = np.asarray(data[images_key], object).reshape(-1)
  phis = _rows(data[phis_key], 3 * NUM_POINTS, phis_key, path, report)
  boxes = _rows(data[boxes_key], 4, boxes_key, path, report)
  if not len(images) == len(phis) == len(boxes):
    raise DataError(path, f"{images_key} has {len(images)} images, {phis_key} "
                    f"{len(phis)} rows and {boxes_key} {len(boxes)} rows; they "
                    "must match", "bad_value")
  if len(images) == 0:
    raise DataError(path, f"{images_key} holds no images", "empty_file")
  collect = common.Collector(report, on_error)
  transposed = 0
  for i in range(len(images)):
    where = f"{path}:{phis_key}[{i}]"
    with collect.sample():
      record, flipped = _record(images[i], phis[i], boxes[i], where, split, convention)
      transposed += flipped
      collect.add(record)
  if transposed:
    report.notes.append(f"{transposed} images were stored transposed relative "
                        "to their landmarks and were transposed back")
  return collect.finish()


def _record(image, phi: np.ndarray, bbox: np.ndarray, where: str,
            split: str, convention: str = "project") -> tuple[FaceRecord, bool]:
  x, y, w, h = bbox
  box = common.check_box([x, y, x + w, y + h], where)
  points = np.stack([phi[:NUM_POINTS], phi[NUM_POINTS:2 * NUM_POINTS]], 1)
  points = common.check_points(points, NUM_POINTS, box, where)
  occluded = phi[2 * NUM_POINTS:]
  if not np.isin(occluded, (0, 1)).all():
    raise DataError(where, f"occlusion flags must be 0 or 1, got "
                    f"{sorted(set(occluded.tolist()))}", "bad_value")
  if not isinstance(image, np.ndarray) or image.dtype == object or image.ndim not in (2, 3):
    raise DataError(where, "image cell is not an H x W (x 3) array", "corrupt_image")
  image, flipped = _orient(image, points, box, where)
  extent = common.box_from_points(points, where)
  if convention == "authors":
    extent = np.concatenate([np.floor(extent[:2]), np.ceil(extent[2:])])
  center = (extent[:2] + extent[2:]) / 2
  scale = float(max(extent[2] - extent[0], extent[3] - extent[1]) / 200.0)
  record = FaceRecord(
      dataset="COFW", split=split, image=to_rgb_uint8(image, where), landmarks=points,
      box=box, source=where, image_name=where.rsplit(":", 1)[-1],
      center=center, scale=scale,
      point_flags={"occluded": occluded.astype(np.uint8)})
  return record, flipped


def _orient(image: np.ndarray, points: np.ndarray, box: np.ndarray,
            where: str) -> tuple[np.ndarray, bool]:
  """The image in the orientation its landmarks fit, preferring as stored."""
  margin = common.MAX_OUTSIDE_BOX * max(box[2] - box[0], box[3] - box[1])
  def fits(height, width):
    return (points[:, 0].max() <= width - 1 + margin and
            points[:, 1].max() <= height - 1 + margin)
  height, width = image.shape[:2]
  if fits(height, width):
    return image, False
  if fits(width, height):
    return np.swapaxes(image, 0, 1), True
  raise DataError(where, f"landmarks (max x {points[:, 0].max():.1f}, max y "
                  f"{points[:, 1].max():.1f}) do not fit the {height} x {width} "
                  "image in either orientation", "bad_coordinates")
