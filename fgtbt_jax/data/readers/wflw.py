"""WFLW raw annotations: `list_98pt_rect_attr_{train,test}.txt`.

One face per line, 207 space-separated fields: x0 y0 ... x97 y97 (196
floats), the box x_min y_min x_max y_max, six 0/1 attribute flags (pose,
expression, illumination, make-up, occlusion, blur) and the image path
relative to `WFLW_images/`. The flags become the subset tags "pose",
"expression", "illumination", "makeup", "occlusion", "blur" (the six WFLW
test subsets). Coordinates are used as given (0-based).

Expected layout (the official download):
  WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_train.txt
  WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_test.txt
  WFLW_images/<event>/<name>.jpg
"""

from __future__ import annotations

import os

from fgtbt_jax.data.readers import common
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax.data import datasets
from fgtbt_jax.errors import DataError

NUM_POINTS = 98
NUM_FIELDS = 2 * NUM_POINTS + 4 + 6 + 1
FMT = datasets.WFLW_TXT


def annotation_name(split: str) -> str:
  return f"list_98pt_rect_attr_{split}.txt"


def read_wflw_txt(src: str, split: str, on_error: str = "raise",
                  image_root: str | None = None):
  """Reads a WFLW raw annotation file.

  Args:
    src: the annotation file, or a directory holding it (searched 3 levels
      deep for `list_98pt_rect_attr_{split}.txt`).
    split: "train" or "test".
    on_error: "raise" at the first bad sample, or "skip" and count it.
    image_root: the `WFLW_images` directory; found beside the annotation
      file or one of its parents, or under `src`, when None.

  Returns:
    (list of FaceRecord, ReadReport).
  """
  common.check_split(split, ("train", "test"), FMT)
  path = common.locate(src, [annotation_name(split)], "WFLW annotation file")
  if image_root is None:
    image_root = _find_image_root(path, os.fspath(src))
  report = common.ReadReport("WFLW", split, FMT, path)
  collect = common.Collector(report, on_error)
  for line_no, line in enumerate(
      common.read_lines(path, "WFLW annotation file", per_line=True), 1):
    if not line.strip():
      continue
    with collect.sample():
      where = f"{path}:{line_no}"
      collect.add(_parse_line(common.check_text(line, where), where, split, image_root))
  return collect.finish()


def _find_image_root(annotation: str, src: str) -> str:
  parent = os.path.dirname(os.path.abspath(annotation))
  for _ in range(4):
    candidate = os.path.join(parent, "WFLW_images")
    if os.path.isdir(candidate):
      return candidate
    parent = os.path.dirname(parent)
  if os.path.isdir(src):
    found = common.find_dir(src, "WFLW_images")
    if found:
      return found
  raise DataError(annotation, "no WFLW_images directory found beside the "
                  "annotation file, in its parents or under the source "
                  "directory; pass image_root", "missing_image")


def _parse_line(line: str, where: str, split: str, image_root: str) -> FaceRecord:
  fields = line.split()
  if len(fields) != NUM_FIELDS:
    raise DataError(where, f"expected {NUM_FIELDS} space-separated fields "
                    f"(196 coordinates, 4 box values, 6 flags, image path), "
                    f"found {len(fields)}", "field_count")
  coords = common.parse_floats(fields[:2 * NUM_POINTS], where, "coordinates")
  box = common.check_box(common.parse_floats(fields[196:200], where, "box"), where)
  flags = fields[200:206]
  if any(f not in ("0", "1") for f in flags):
    raise DataError(where, f"attribute flags must be 0 or 1, got {flags}", "bad_value")
  points = common.check_points(coords.reshape(NUM_POINTS, 2), NUM_POINTS, box, where)
  name = fields[206]
  image = common.resolve_image(name, [image_root], where)
  subsets = tuple(a for a, f in zip(common.WFLW_ATTRIBUTES, flags) if f == "1")
  return FaceRecord(dataset="WFLW", split=split, image=image, landmarks=points,
                    box=box, source=where, image_name=name, subsets=subsets)
