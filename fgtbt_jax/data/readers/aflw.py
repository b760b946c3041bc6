"""AFLW raw annotations: `AFLWinfo_release.mat`.

Keys (one row per face, N = 24,386 in the release):
  bbox:     N x 4 face box x1, x2, y1, y2;
  data:     N x 38: the 19 x values, then the 19 y values;
  mask_new: N x 19 visibility (1 = visible);
  nameList: N cells, image paths (relative to AFLW's `flickr/` folder);
  ra:       a 1-based permutation of 1..N: the first 20,000 faces it lists
            are the train split, the rest the test split.
The file is MATLAB v5 in the wild (read with scipy) and may be v7.3 (h5py).

Visibility becomes `point_flags["visible"]` (uint8, 1 = visible); faces with
all 19 points visible get the subset tag "frontal" (AFLW-frontal);
`box_size = sqrt(w * h)` of the box is the NME normaliser. Points marked
invisible are exempt from the range checks (only finiteness is checked).
Coordinates are used as given. Images are looked up under `image_root`,
else `flickr/` beside the .mat file, the .mat file's directory, `src/flickr`
and `src`.
"""

from __future__ import annotations

import os

import numpy as np

from fgtbt_jax.data.readers import common
from fgtbt_jax.data.readers.mat import load_mat
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax.data import datasets
from fgtbt_jax.errors import DataError

NUM_POINTS = 19
NUM_TRAIN = 20000
FMT = datasets.AFLW_MAT
FILE = "AFLWinfo_release.mat"
KEYS = ("bbox", "data", "mask_new", "nameList", "ra")


def read_aflw_mat(src: str, split: str, on_error: str = "raise",
                  image_root: str | None = None, num_train: int = NUM_TRAIN):
  """Reads AFLW from `AFLWinfo_release.mat` (see the module doc).

  Args:
    src: the .mat file or a directory holding it.
    split: "train" (the first `num_train` faces of `ra`) or "test" (the rest).
    on_error: "raise" or "skip".
    image_root: the directory nameList paths are relative to.
    num_train: size of the train split (20,000 in the standard protocol).
  """
  common.check_split(split, ("train", "test"), FMT)
  path = common.locate(src, [FILE], "AFLW .mat file")
  data = load_mat(path, KEYS)
  directory = os.path.dirname(os.path.abspath(path))
  src_dir = os.fspath(src) if os.path.isdir(src) else directory
  roots = [image_root] if image_root else [
      os.path.join(directory, "flickr"), directory,
      os.path.join(src_dir, "flickr"), src_dir]
  coords = _matrix(data["data"], 2 * NUM_POINTS, "data", path)
  n = len(coords)
  boxes = _matrix(data["bbox"], 4, "bbox", path, n)
  visible = _matrix(data["mask_new"], NUM_POINTS, "mask_new", path, n)
  names = np.asarray(data["nameList"], object).reshape(-1)
  if len(names) != n:
    raise DataError(f"{path}:nameList", f"has {len(names)} entries, data has "
                    f"{n} rows", "bad_value")
  order = _permutation(data["ra"], n, path)
  indices = order[:num_train] if split == "train" else order[num_train:]
  report = common.ReadReport("AFLW", split, FMT, path)
  collect = common.Collector(report, on_error)
  for i in indices:
    where = f"{path}[{i}]"
    with collect.sample():
      collect.add(_record(coords[i], boxes[i], visible[i], names[i], where, split, roots))
  return collect.finish()


def _matrix(array, width: int, key: str, path: str, rows: int | None = None) -> np.ndarray:
  array = np.asarray(array, np.float64)
  if array.ndim != 2 or array.shape[1] != width or (rows is not None and len(array) != rows):
    expected = f"{rows if rows is not None else 'N'} x {width}"
    raise DataError(f"{path}:{key}", f"expected an {expected} array, got shape "
                    f"{array.shape}", "bad_value")
  return array


def _permutation(ra, n: int, path: str) -> np.ndarray:
  """`ra` as 0-based indices, checked to be a permutation of 0..n-1."""
  ra = np.asarray(ra, np.float64).reshape(-1)
  if len(ra) != n or not np.array_equal(np.sort(ra), np.arange(1, n + 1)):
    raise DataError(f"{path}:ra", f"must be a 1-based permutation of 1..{n} "
                    f"(got {len(ra)} values)", "bad_value")
  return ra.astype(np.int64) - 1


def _record(coords, bbox, visible, name, where: str, split: str,
            roots: list[str]) -> FaceRecord:
  x1, x2, y1, y2 = bbox
  box = common.check_box([x1, y1, x2, y2], where)
  if not np.isin(visible, (0, 1)).all():
    raise DataError(where, f"mask_new must be 0 or 1, got "
                    f"{sorted(set(visible.tolist()))}", "bad_value")
  visible = visible.astype(np.uint8)
  points = np.stack([coords[:NUM_POINTS], coords[NUM_POINTS:]], 1)
  points = common.check_points(points, NUM_POINTS, box, where, checked=visible.astype(bool))
  if not isinstance(name, str) or not name:
    raise DataError(where, f"nameList entry is not an image path: {name!r}", "bad_value")
  image = common.resolve_image(name, roots, where)
  box_size = float(np.sqrt((box[2] - box[0]) * (box[3] - box[1])))
  return FaceRecord(
      dataset="AFLW", split=split, image=image, landmarks=points, box=box,
      source=where, image_name=name, box_size=box_size,
      point_flags={"visible": visible},
      subsets=("frontal",) if visible.all() else ())
