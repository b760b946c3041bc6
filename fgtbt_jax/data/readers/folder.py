"""A folder of face images with one annotation file beside each.

The layout of a user's own data, under any point scheme (a benchmark's, or a
user scheme naming unified points; `fgtbt_jax.data.schemes`):

    faces/
      img_0001.jpg   img_0001.pts      (or img_0001.json, img_0001.csv)
      img_0002.png   img_0002.pts
      ...

subfolders included (names are paths relative to the folder). Images are
.jpg/.jpeg/.png/.bmp/.webp; the annotation has the image's stem and one of:

* `.pts` (iBUG: "version: 1", "n_points: N", "{", N lines "x y", "}"),
  1-based pixel coordinates like 300W's;
* `.json`: a list of [x, y] pairs, or an object with "landmarks" (that
  list) and optionally "box" ([x1, y1, x2, y2]), 0-based pixel coordinates;
* `.csv`: one "x,y" row per point (an optional header row), 0-based.

The face box is the annotation's "box", else the points' extent. The split:
`split_list`, a text file naming the test images (paths relative to the
folder, or stems; one per line, `#` comments), the rest being train; else,
when the folder has `train/` and `test/` subfolders, those; else a seeded
random `split_ratio` of the images (default 0.9) is train, the rest test
(the same files always split the same way).

Errors name the file (and line or key): an image without an annotation, an
annotation without an image, two annotations of one image, a point count
other than the scheme's, a bad coordinate. An image without an annotation
is reported in the train split's read (once).

An unlabeled folder (`unlabeled=True`; `fgtbt convert --unlabeled`) holds
face images and no annotation files: every image is one face whose box is
the whole image ([-0.5, -0.5, w - 0.5, h - 0.5] in the pixel-centre
convention, so the crop is centred on the image and its side is the
image's longer side times the run's `data.crop_enlarge`: crop the faces as
tightly as a face detector's box). Its landmarks are NaN (no point is
annotated: training masks them all), and it has a train split only.
Errors name the file: an annotation file in it, an image whose header
does not read; an unlabeled folder without images names the folder.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from fgtbt_jax.data import datasets
from fgtbt_jax.data.readers import common
from fgtbt_jax.data.readers.w300 import read_pts
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax import landmarks
from fgtbt_jax.errors import DataError

FMT = datasets.FOLDER
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ANNOTATION_EXTENSIONS = (".pts", ".json", ".csv")
DEFAULT_SPLIT_RATIO = 0.9
SPLITS = ("train", "test")
_SPLIT_SEED = 0


def _walk(src: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """({stem: image path}, {stem: annotation paths}); stems relative to `src`."""
  images, annotations = {}, {}
  for folder, dirs, files in os.walk(src):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      if name.startswith("."):
        continue
      stem, ext = os.path.splitext(name)
      rel = os.path.relpath(os.path.join(folder, stem), src)
      if ext.lower() in IMAGE_EXTENSIONS:
        if rel in images:
          raise DataError(os.path.join(folder, name), f"two images named {stem} "
                          f"({os.path.basename(images[rel])} too); keep one", "invalid")
        images[rel] = os.path.join(folder, name)
      elif ext.lower() in ANNOTATION_EXTENSIONS:
        annotations.setdefault(rel, []).append(os.path.join(folder, name))
  return images, annotations


def has_annotated_images(src: str) -> bool:
  """Whether folder `src` holds an image with an annotation file beside it."""
  if not os.path.isdir(src):
    return False
  for folder, dirs, files in os.walk(src):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    stems = {}
    for name in files:
      stem, ext = os.path.splitext(name)
      stems.setdefault(stem, set()).add(ext.lower())
    if any(exts & set(IMAGE_EXTENSIONS) and exts & set(ANNOTATION_EXTENSIONS)
           for exts in stems.values()):
      return True
  return False


def _split_of(stems: list[str], src: str, split_ratio: float | None,
              split_list: str | None) -> tuple[dict[str, str], str]:
  """({stem: split}, how the split was made)."""
  if split_list is not None:
    if split_ratio is not None:
      raise ValueError("give a split list or a split ratio, not both")
    wanted = {}
    for line_no, line in enumerate(common.read_lines(split_list, "split list"), 1):
      name = line.split("#", 1)[0].strip()
      if name:
        wanted[os.path.normpath(os.path.splitext(name)[0])] = f"{split_list}:{line_no}"
    by_base = {}
    for stem in stems:
      by_base.setdefault(os.path.basename(stem), []).append(stem)
    test = set()
    for name, where in wanted.items():
      if name in stems:
        test.add(name)
      elif len(by_base.get(name, ())) == 1:
        test.add(by_base[name][0])
      else:
        found = "names several images" if by_base.get(name) else "is no annotated image"
        raise DataError(where, f"{name!r} {found} in {src}", "missing_image")
    return ({s: "test" if s in test else "train" for s in stems},
            f"test images listed in {split_list}")
  tops = {s.split(os.sep, 1)[0] for s in stems if os.sep in s}
  if split_ratio is None and {"train", "test"} <= tops and all(os.sep in s for s in stems):
    return {s: s.split(os.sep, 1)[0] for s in stems if s.split(os.sep, 1)[0] in SPLITS}, \
        "the train/ and test/ subfolders"
  ratio = DEFAULT_SPLIT_RATIO if split_ratio is None else float(split_ratio)
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"split ratio must be in (0, 1), got {ratio}")
  n_test = 0 if len(stems) < 2 else max(1, int(round(len(stems) * (1.0 - ratio))))
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(stems))
  test = {stems[i] for i in order[:n_test]}
  return ({s: "test" if s in test else "train" for s in stems},
          f"a seeded {ratio:g} train ratio ({len(stems) - n_test} train, {n_test} test)")


def read_points(path: str) -> tuple[np.ndarray, np.ndarray | None, str]:
  """(N, 2) 0-based points, the box or None, and where a count error points."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".pts":
    return read_pts(path) - 1.0, None, f"{path}:2"
  if ext == ".json":
    try:
      with open(path, encoding="utf-8") as f:
        value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(path, f"not a JSON file: {e}", "bad_value") from None
    box = None
    if isinstance(value, dict):
      if "landmarks" not in value:
        raise DataError(path, f"no 'landmarks' key (keys: {sorted(value)}); expected "
                        "{\"landmarks\": [[x, y], ...], \"box\": [x1, y1, x2, y2]}",
                        "missing_key")
      if value.get("box") is not None:
        box = common.check_box(common.parse_floats(
            [str(v) for v in np.ravel(value["box"])], f"{path}[box]", "box"), f"{path}[box]")
      value = value["landmarks"]
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 for p in value):
      raise DataError(f"{path}[landmarks]", "expected a list of [x, y] pairs", "bad_value")
    points = common.parse_floats([str(v) for p in value for v in p], f"{path}[landmarks]",
                                 "coordinates")
    return points.reshape(-1, 2), box, f"{path}[landmarks]"
  rows = []
  lines = common.read_lines(path, ".csv file")
  for line_no, line in enumerate(lines, 1):
    fields = [f.strip() for f in line.replace(";", ",").split(",")]
    if not any(fields):
      continue
    where = f"{path}:{line_no}"
    if len(fields) != 2:
      raise DataError(where, f"expected 2 values 'x,y', found {len(fields)}", "field_count")
    if not rows and not _is_number(fields[0]):
      continue  # A header row.
    rows.append(common.parse_floats(fields, where, "coordinates"))
  if not rows:
    raise DataError(path, "no 'x,y' rows", "empty_file")
  return np.stack(rows), None, f"{path}:{len(lines)}"


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def read_folder(dataset: str, src: str, split: str, on_error: str = "raise",
                image_root: str | None = None, *, split_ratio: float | None = None,
                split_list: str | None = None, unlabeled: bool = False):
  """Reads one split of a folder of images with annotation files (module doc).

  `dataset` names the point scheme the annotations follow (a benchmark's or
  a registered user scheme's); each annotation must hold its number of
  points in its order. `image_root` is not used (images sit beside their
  annotations). `unlabeled`: a folder of face images without annotations
  (`read_unlabeled_folder`).

  Returns:
    (list of FaceRecord, ReadReport).
  """
  del image_root
  if unlabeled:
    if split_ratio is not None or split_list is not None:
      raise ValueError("an unlabeled folder has a train split only: give it no split ratio "
                       "or split list")
    return read_unlabeled_folder(dataset, src, split, on_error)
  common.check_split(split, SPLITS, FMT)
  protocol = landmarks.get_protocol(dataset)
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise DataError(src, "not a folder of images and annotation files", "missing_file")
  images, annotations = _walk(src)
  paired = sorted(s for s in images if s in annotations)
  if not paired:
    raise DataError(src, f"no images with an annotation file beside them (an image and a "
                    f"{'/'.join(ANNOTATION_EXTENSIONS)} file of the same name) found in "
                    f"the folder or its subfolders ({len(images)} images, "
                    f"{sum(map(len, annotations.values()))} annotation files)", "missing_file")
  splits, how = _split_of(paired, src, split_ratio, split_list)
  report = common.ReadReport(protocol.name, split, FMT, src)
  report.notes.append(f"split by {how}")
  collect = common.Collector(report, on_error)
  if split == "train":
    for stem in sorted(set(images) - set(annotations)):
      with collect.sample():
        raise DataError(images[stem], "image without an annotation file (looked for "
                        f"{os.path.basename(stem)}{'/'.join(ANNOTATION_EXTENSIONS)} beside it)",
                        "missing_annotation")
  for stem in sorted(annotations):
    if stem not in images and splits.get(stem, split) == split:
      with collect.sample():
        raise DataError(annotations[stem][0], "annotation without an image (looked for "
                        f"{os.path.basename(stem)}{'/'.join(IMAGE_EXTENSIONS)} beside it)",
                        "missing_image")
  for stem in paired:
    if splits.get(stem) != split:
      continue
    with collect.sample():
      collect.add(_record(protocol, images[stem], annotations[stem], split, src))
  return collect.finish(check_counts=False)  # Not a benchmark's published files.


def _record(protocol: landmarks.Protocol, image: str, paths: list[str], split: str,
            src: str) -> FaceRecord:
  if len(paths) > 1:
    raise DataError(paths[0], f"image {os.path.basename(image)} has several annotation "
                    f"files ({', '.join(os.path.basename(p) for p in paths)}); keep one",
                    "invalid")
  path = paths[0]
  points, box, count_where = read_points(path)
  n = protocol.num_landmarks
  if len(points) != n:
    raise DataError(count_where, f"{len(points)} points, the {protocol.name} scheme has "
                    f"{n}", "point_count")
  if box is None:
    box = common.box_from_points(points, path)
  points = common.check_points(points, n, box, path)
  return FaceRecord(dataset=protocol.name, split=split, image=image, landmarks=points,
                    box=box, source=path, image_name=os.path.relpath(image, src))


# The only split of an unlabeled folder.
UNLABELED_SPLITS = ("train",)


def read_unlabeled_folder(dataset: str, src: str, split: str, on_error: str = "raise"):
  """Reads a folder of face images without annotations (module doc).

  Each image is one face: its box is the whole image (its size read from
  the header), its landmarks are NaN in the number of `dataset`'s scheme.

  Returns:
    (list of FaceRecord, ReadReport).

  Raises:
    DataError: naming the folder when it holds no images, or the file: an
      annotation file in the folder (it is read as labeled data, without
      `unlabeled`), or (with `on_error="raise"`) an image whose header does
      not read.
    ValueError: a split other than "train".
  """
  common.check_split(split, UNLABELED_SPLITS, f"{FMT} (unlabeled)")
  protocol = landmarks.get_protocol(dataset)
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise DataError(src, "not a folder of face images", "missing_file")
  images, annotations = _walk(src)
  if annotations:
    first = sorted(annotations)[0]
    raise DataError(annotations[first][0], f"an unlabeled folder holds an annotation file "
                    f"({sum(map(len, annotations.values()))} in all); convert annotated faces "
                    "as a labeled dataset (without --unlabeled) and use "
                    "data.labeled_fraction to leave some of them unlabeled, or move the "
                    "annotation files away", "invalid")
  if not images:
    raise DataError(src, f"no face images ({'/'.join(IMAGE_EXTENSIONS)}) found in the "
                    "unlabeled folder or its subfolders", "missing_file")
  report = common.ReadReport(protocol.name, split, f"{FMT} (unlabeled)", src)
  report.notes.append("unlabeled: every image is a face crop, its box the whole image")
  collect = common.Collector(report, on_error)
  for stem in sorted(images):
    with collect.sample():
      collect.add(_unlabeled_record(protocol, images[stem], split, src))
  return collect.finish(check_counts=False)


def _unlabeled_record(protocol: landmarks.Protocol, image: str, split: str,
                      src: str) -> FaceRecord:
  """The face of an unlabeled image: the whole image as its box, NaN points."""
  try:
    with Image.open(image) as opened:
      width, height = opened.size
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(image, f"not a readable image ({type(e).__name__}: {e})",
                    "corrupt_image") from None
  if width < 1 or height < 1:
    raise DataError(image, f"an empty image ({width}x{height})", "corrupt_image")
  box = np.array([-0.5, -0.5, width - 0.5, height - 0.5], np.float32)
  points = np.full((protocol.num_landmarks, 2), np.nan, np.float32)
  return FaceRecord(dataset=protocol.name, split=split, image=image, landmarks=points,
                    box=box, source=image, image_name=os.path.relpath(image, src))
