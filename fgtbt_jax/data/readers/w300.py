"""300W raw annotations: a `.pts` file beside every image.

A `.pts` file reads

    version: 1
    n_points:  68
    {
    x y            (68 lines)
    }

with 1-based pixel coordinates (iBUG convention); the reader subtracts 1.
The image is the file with the same stem and a .jpg or .png extension. The
face box is the landmarks' min/max extent (there is no box in the format).

Expected layout (directory names matched case-insensitively):
  afw/*.pts, helen/trainset/*.pts, lfpw/trainset/*.pts      -> train (3,148)
  helen/testset/*.pts, lfpw/testset/*.pts                    -> test, "common" (554)
  ibug/*.pts                                                 -> test, "challenging" (135)
"""

from __future__ import annotations

import os

import numpy as np

from fgtbt_jax.data.readers import common
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax.data import datasets
from fgtbt_jax.errors import DataError

NUM_POINTS = 68
FMT = datasets.W300_PTS
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")

# split -> ((folder path parts, subset tag or None), ...)
SPLIT_FOLDERS = {
    "train": ((("afw",), None), (("helen", "trainset"), None),
              (("lfpw", "trainset"), None)),
    "test": ((("helen", "testset"), "common"), (("lfpw", "testset"), "common"),
             (("ibug",), "challenging")),
}


def find_300w_root(src: str) -> str | None:
  """The directory holding afw/, helen/, lfpw/ and ibug/: `src` or below it."""
  if not os.path.isdir(src):
    return None
  level = [src]
  for _ in range(3):
    next_level = []
    for d in level:
      names = {e.name.lower() for e in os.scandir(d) if e.is_dir()}
      if {"helen", "lfpw"} <= names and ({"afw"} <= names or {"ibug"} <= names):
        return d
      next_level.extend(sorted(e.path for e in os.scandir(d) if e.is_dir()))
    level = next_level
  return None


def _subdir(parent: str, name: str) -> str | None:
  for e in os.scandir(parent):
    if e.is_dir() and e.name.lower() == name:
      return e.path
  return None


def read_300w_pts(src: str, split: str, on_error: str = "raise"):
  """Reads the 300W `.pts` tree under `src` (see the module doc for the layout).

  Returns:
    (list of FaceRecord, ReadReport). Test records carry the subset tag
    "common" (HELEN and LFPW test sets) or "challenging" (IBUG).
  """
  common.check_split(split, tuple(SPLIT_FOLDERS), FMT)
  src = os.fspath(src)
  root = find_300w_root(os.path.abspath(src))
  if root is None:
    raise DataError(src, "no 300W tree found: expected folders afw/, helen/, "
                    "lfpw/ and ibug/ in it or up to 2 levels below", "missing_file")
  report = common.ReadReport("300W", split, FMT, root)
  collect = common.Collector(report, on_error)
  for parts, subset in SPLIT_FOLDERS[split]:
    folder = root
    for part in parts:
      folder = _subdir(folder, part) if folder else None
    if folder is None:
      report.warn(f"folder {'/'.join(parts)} not found under {root}")
      continue
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pts"))
    if not names:
      report.warn(f"folder {folder} has no .pts files")
    for name in names:
      path = os.path.join(folder, name)
      with collect.sample():
        collect.add(_read_pts_record(path, split, subset, root))
  return collect.finish()


def read_pts(path: str) -> np.ndarray:
  """The (N, 2) float32 points of a .pts file as written (1-based)."""
  lines = [line.strip() for line in common.read_lines(path, ".pts file")]
  if len(lines) < 3 or not lines[0].startswith("version"):
    raise DataError(f"{path}:1", "not a .pts file: the first line must be "
                    "'version: 1'", "bad_value")
  header = lines[1].split(":")
  if header[0].strip() != "n_points" or len(header) != 2:
    raise DataError(f"{path}:2", f"expected 'n_points: N', got {lines[1]!r}", "bad_value")
  try:
    n = int(header[1])
  except ValueError:
    raise DataError(f"{path}:2", f"n_points is not an integer: {header[1]!r}",
                    "bad_value") from None
  if lines[2] != "{":
    raise DataError(f"{path}:3", f"expected '{{', got {lines[2]!r}", "bad_value")
  try:
    end = lines.index("}", 3)
  except ValueError:
    raise DataError(path, "no closing '}'", "bad_value") from None
  body = lines[3:end]
  if len(body) != n:
    raise DataError(f"{path}:{4 + len(body)}", f"n_points says {n} but "
                    f"{len(body)} point lines follow", "point_count")
  points = np.zeros((n, 2), np.float32)
  for i, line in enumerate(body):
    where = f"{path}:{4 + i}"
    fields = line.split()
    if len(fields) != 2:
      raise DataError(where, f"expected 2 coordinates 'x y', found {len(fields)} "
                      "fields", "field_count")
    points[i] = common.parse_floats(fields, where, "coordinates")
  return points


def _read_pts_record(path: str, split: str, subset: str | None, root: str) -> FaceRecord:
  points = read_pts(path)
  if len(points) != NUM_POINTS:
    raise DataError(f"{path}:2", f"n_points is {len(points)}, 300W has "
                    f"{NUM_POINTS}", "point_count")
  points = points - 1.0  # 1-based iBUG convention -> 0-based pixel centres.
  box = common.box_from_points(points, path)
  points = common.check_points(points, NUM_POINTS, box, path)
  stem = path[:-len(".pts")]
  image = next((stem + ext for ext in IMAGE_EXTENSIONS if os.path.isfile(stem + ext)), None)
  if image is None:
    raise DataError(path, "no image beside it (looked for "
                    f"{os.path.basename(stem)}.jpg / .png)", "missing_image")
  return FaceRecord(dataset="300W", split=split, image=image, landmarks=points,
                    box=box, source=path, image_name=os.path.relpath(image, root),
                    subsets=(subset,) if subset else ())
