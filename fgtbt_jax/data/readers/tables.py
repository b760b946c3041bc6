"""Table formats: HRNet CSV files and STAR/ADNet TSV files.

HRNet CSV (`face_landmarks_<dataset>_<split>.csv`, header row): columns
`image_name, scale, center_w, center_h, x0, y0, ...` (WFLW 200 columns,
300W 140), and for AFLW `image_name, scale, box_size, center_w, center_h,
x0, y0, ..., x18, y18` (43 columns). Images live in `images/` beside the CSV
(HRNet's `data/<dataset>/images/`). Subset tags come from the subset files
beside the main one when present:
  WFLW test: face_landmarks_wflw_test_{largepose,expression,illumination,
             makeup,occlusion,blur}.csv -> "pose", "expression", ...
  300W test (= HRNet's `valid`, 689 faces): face_landmarks_300w_valid_common.csv
             -> "common", face_landmarks_300w_valid_challenge.csv -> "challenging"
  AFLW test: face_landmarks_aflw_test_frontal.csv -> "frontal"

STAR/ADNet TSV (`<dataset>/{train,test}.tsv`, tab-separated, the first row
may or may not be a header: detected from whether its numeric columns are
numbers): col0 image path, col1 5-point landmarks (unused), col2 N-point
landmarks "x1,y1,...", col3 scale, col4 center_w, col5 center_h, col6 (WFLW)
attribute flags "a,b,c,d,e,f" (pose, expression, illumination, make-up,
occlusion, blur). 300W test subsets from `test_common.tsv` /
`test_challenge.tsv` beside `test.tsv` when present. Relative image paths are
looked up under `image_root`, else beside the TSV, its parent and `src`.

Both give a centre and scale but no box; the record's box is the square of
side `scale * 200` around the centre. Coordinates are used as given.

STAR/ADNet code crops `scale * 200 * 1.0` where HRNet-style code (and this
project's pipeline) crops `scale * 200 * 1.25`. The record's `scale` is the
HRNet one, so a STAR scale is divided by `STAR_TO_HRNET_SCALE` = 1.25: the
same pixels end up in the crop whichever file a user has. With
`convention="authors"` the TSV scale is used as the HRNet scale itself, as
the FGTBT authors' 300W loader does (crops 1.25x looser; their released
weights were trained and measured that way).

Either way a backslash in image paths (Windows-made TSVs) is read as `/`, the
300W challenging subset is also found as `test_ibug.tsv` (the FGTBT
authors' name), and when the first row of a 300W TSV is a sample rather than
a header the report notes it: the authors' loader takes the first row as a
header and so drops that face.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from fgtbt_jax.data.readers import common
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax.data import datasets
from fgtbt_jax import landmarks
from fgtbt_jax.errors import DataError

HRNET_FMT = datasets.HRNET_CSV
STAR_FMT = datasets.STAR_TSV
# A STAR scale s crops s * 200 px; an HRNet scale s crops s * 200 * 1.25 px.
STAR_TO_HRNET_SCALE = 1.25

HRNET_FILES = {
    "WFLW": {"train": "face_landmarks_wflw_train.csv", "test": "face_landmarks_wflw_test.csv"},
    "300W": {"train": "face_landmarks_300w_train.csv", "test": "face_landmarks_300w_valid.csv"},
    "AFLW": {"train": "face_landmarks_aflw_train.csv", "test": "face_landmarks_aflw_test.csv"},
}
HRNET_SUBSET_FILES = {
    "WFLW": {"pose": "face_landmarks_wflw_test_largepose.csv",
             "expression": "face_landmarks_wflw_test_expression.csv",
             "illumination": "face_landmarks_wflw_test_illumination.csv",
             "makeup": "face_landmarks_wflw_test_makeup.csv",
             "occlusion": "face_landmarks_wflw_test_occlusion.csv",
             "blur": "face_landmarks_wflw_test_blur.csv"},
    "300W": {"common": "face_landmarks_300w_valid_common.csv",
             "challenging": "face_landmarks_300w_valid_challenge.csv"},
    "AFLW": {"frontal": "face_landmarks_aflw_test_frontal.csv"},
}
# Subset: file names, the first found wins (test_ibug.tsv: the FGTBT authors').
STAR_SUBSET_FILES = {
    "300W": {"common": ("test_common.tsv",),
             "challenging": ("test_challenge.tsv", "test_ibug.tsv")},
}


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


# ---------------------------------------------------------------- HRNet CSV


def _hrnet_columns(dataset: str) -> tuple[int, int | None, int]:
  """(scale column, box_size column or None, first centre column)."""
  return (1, 2, 3) if dataset == "AFLW" else (1, None, 2)


def _hrnet_key(row: list[str], dataset: str) -> tuple:
  """Identifies a face across the main and subset files of one split."""
  _, _, c = _hrnet_columns(dataset)
  return (row[0].strip(), round(float(row[c]), 1), round(float(row[c + 1]), 1))


def _hrnet_subset_keys(path: str, dataset: str) -> list[tuple]:
  """The face keys of an HRNet subset CSV; a short or non-numeric row names its line."""
  _, _, c = _hrnet_columns(dataset)
  keys = []
  for line, row in _read_csv_rows(path):
    if len(row) < c + 2:
      raise DataError(f"{path}:{line}", f"a subset row needs the image name and the face "
                      f"centre (columns 1 and {c + 1}-{c + 2}), got {len(row)} fields",
                      "field_count")
    try:
      keys.append(_hrnet_key(row, dataset))
    except ValueError:
      raise DataError(f"{path}:{line}", f"the face centre {row[c]!r}, {row[c + 1]!r} is not "
                      "two numbers", "bad_value") from None
  return keys


def _read_csv_rows(path: str) -> list[tuple[int, list[str]]]:
  """(line number, fields) of every non-empty row, the header row left out."""
  common.require_file(path, "CSV annotation file")
  with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
    rows = [(i, row) for i, row in enumerate(csv.reader(f), 1)
            if any(field.strip() for field in row)]
  # The header row has no numbers; a first sample with one bad value still
  # has its other numbers, so it is read (and reported) as a sample.
  if rows and not any(_is_number(field) for field in rows[0][1][1:]):
    rows = rows[1:]
  if not rows:
    raise DataError(path, "CSV annotation file has no data rows", "empty_file")
  return rows


def read_hrnet_csv(dataset: str, src: str, split: str, on_error: str = "raise",
                   image_root: str | None = None):
  """Reads an HRNet-style CSV annotation file (see the module doc).

  Args:
    dataset: "WFLW", "300W" or "AFLW".
    src: the CSV file, or a directory holding it (searched 3 levels deep).
    split: "train" or "test" (300W "test" is HRNet's `valid`: all 689 faces).
    on_error: "raise" or "skip".
    image_root: where image_name is relative to; default `images/` beside
      the CSV, else the CSV's directory.
  """
  protocol = landmarks.get_protocol(dataset)
  if protocol.name not in HRNET_FILES:
    raise ValueError(f"{HRNET_FMT}: no HRNet CSV format for {protocol.name}; "
                     f"have {sorted(HRNET_FILES)}")
  files = HRNET_FILES[protocol.name]
  common.check_split(split, tuple(files), HRNET_FMT)
  path = common.locate(src, [files[split]], f"{protocol.name} HRNet CSV")
  directory = os.path.dirname(os.path.abspath(path))
  if image_root is None:
    images = os.path.join(directory, "images")
    image_root = images if os.path.isdir(images) else directory
  report = common.ReadReport(protocol.name, split, HRNET_FMT, path)
  collect = common.Collector(report, on_error)
  n = protocol.num_landmarks
  scale_col, box_size_col, center_col = _hrnet_columns(protocol.name)
  num_columns = center_col + 2 + 2 * n
  keys = []
  for line_no, row in _read_csv_rows(path):
    where = f"{path}:{line_no}"
    with collect.sample():
      common.check_text(",".join(row), where)
      if len(row) != num_columns:
        raise DataError(where, f"expected {num_columns} columns for "
                        f"{protocol.name}, found {len(row)}", "field_count")
      values = common.parse_floats(row[1:], where, "numeric columns")
      scale = float(values[scale_col - 1])
      center = values[center_col - 1:center_col + 1]
      box = common.box_from_center_scale(center, scale, where)
      box_size = None
      if box_size_col is not None:
        box_size = float(values[box_size_col - 1])
        if not box_size > 0:
          raise DataError(where, f"box_size must be positive, got {box_size}", "zero_box")
      points = common.check_points(
          values[center_col + 1:].reshape(n, 2), n, box, where)
      name = row[0].strip()
      image = common.resolve_image(name, [image_root], where)
      collect.add(FaceRecord(
          dataset=protocol.name, split=split, image=image, landmarks=points,
          box=box, source=where, image_name=name, center=center, scale=scale,
          box_size=box_size))
      keys.append(_hrnet_key(row, protocol.name))
  if split == "test":
    subset_files = {s: os.path.join(directory, f)
                    for s, f in HRNET_SUBSET_FILES.get(protocol.name, {}).items()}
    _tag_subsets(collect, keys, subset_files,
                 lambda p: _hrnet_subset_keys(p, protocol.name))
  return collect.finish()


def _tag_subsets(collect: common.Collector, keys: list[tuple],
                 subset_files: dict[str, str], read_keys) -> None:
  """Adds subset tags to the collected records from per-subset files."""
  index = {}
  for i, key in enumerate(keys):
    index.setdefault(key, []).append(i)
  for subset, path in subset_files.items():
    if not os.path.isfile(path):
      collect.report.warn(f"subset file {path} not found: no {subset!r} tags")
      continue
    try:
      subset_keys = read_keys(path)
    except (ValueError, IndexError) as e:
      raise DataError(path, f"unreadable subset file: {e}", "bad_value") from None
    unmatched = 0
    for key in subset_keys:
      for i in index.get(key, ()):
        record = collect.records[i]
        if subset not in record.subsets:
          record.subsets = record.subsets + (subset,)
      unmatched += key not in index
    if unmatched:
      collect.report.warn(f"{unmatched} faces of subset file {path} are not in "
                          "the main file")


# ---------------------------------------------------------------- STAR TSV


def _parse_list(text: str, where: str, what: str) -> np.ndarray:
  return common.parse_floats([t for t in text.split(",") if t.strip()], where, what)


def _looks_like_header(fields: list[str]) -> bool:
  """A header row has a sample's columns but no numbers in the numeric ones.

  A row with the wrong number of columns, or with any numeric column that
  parses, is read as a sample (and reported if it is broken), never dropped.
  """
  if len(fields) not in (6, 7):
    return False
  return not any(f.strip() and all(_is_number(t) for t in f.split(",") if t.strip())
                 for f in fields[1:6])


def _locate_tsv(dataset: str, src: str, name: str) -> str:
  src = os.fspath(src)
  if os.path.isfile(src):
    return src
  if os.path.isdir(src):
    for directory in (common.find_dir(src, dataset, max_depth=2), src):
      if directory and os.path.isfile(os.path.join(directory, name)):
        return os.path.join(directory, name)
  return common.locate(src, [name], f"{dataset} STAR TSV")


def _read_tsv_rows(path: str, report: common.ReadReport | None):
  """(line number, fields) of every non-empty line; a header row is noted."""
  rows = [(i, line.split("\t")) for i, line in
          enumerate(common.read_lines(path, "TSV annotation file", per_line=True), 1)
          if line.strip()]
  if rows and _looks_like_header(rows[0][1]):
    if report is not None:
      report.notes.append(f"{path}:{rows[0][0]} is a header row, not a sample")
    rows = rows[1:]
  elif rows and report is not None and report.dataset == "300W":  # The TSV they read.
    report.notes.append(
        f"{path}:{rows[0][0]} is a sample (the file has no header row); the FGTBT "
        f"authors' loader takes the first row as a header, so it reads {len(rows) - 1} "
        f"of these {len(rows)} faces")
  if not rows:
    raise DataError(path, "TSV annotation file has no data rows", "empty_file")
  return rows


def read_star_tsv(dataset: str, src: str, split: str, on_error: str = "raise",
                  image_root: str | None = None, convention: str = "project"):
  """Reads a STAR/ADNet TSV annotation file (see the module doc).

  Args:
    dataset: "WFLW", "300W", "COFW" or "AFLW".
    src: the TSV file, or a directory holding `<dataset>/<split>.tsv` or
      `<split>.tsv`.
    split: "train" or "test".
    on_error: "raise" or "skip".
    image_root: where relative image paths are looked up first.
    convention: "project" (a STAR scale, divided by 1.25) or "authors" (the
      scale used as an HRNet scale); see the module doc.
  """
  protocol = landmarks.get_protocol(dataset)
  common.check_split(split, ("train", "test"), STAR_FMT)
  common.check_convention(convention)
  path = _locate_tsv(protocol.name, src, f"{split}.tsv")
  directory = os.path.dirname(os.path.abspath(path))
  roots = [image_root] if image_root else [
      directory, os.path.dirname(directory),
      os.fspath(src) if os.path.isdir(src) else directory]
  report = common.ReadReport(protocol.name, split, STAR_FMT, path)
  collect = common.Collector(report, on_error)
  n = protocol.num_landmarks
  keys = []
  missing_attributes = 0
  for line_no, fields in _read_tsv_rows(path, report):
    where = f"{path}:{line_no}"
    with collect.sample():
      common.check_text("\t".join(fields), where)
      if len(fields) not in (6, 7):
        raise DataError(where, f"expected 6 or 7 tab-separated columns (path, "
                        f"5 points, {n} points, scale, center_w, center_h"
                        f"[, attributes]), found {len(fields)}", "field_count")
      coords = _parse_list(fields[2], where, "landmarks")
      if coords.size != 2 * n:
        raise DataError(where, f"expected {2 * n} landmark values ({n} points) "
                        f"for {protocol.name}, found {coords.size}", "point_count")
      scale, cx, cy = common.parse_floats(fields[3:6], where, "scale/center")
      scale = float(scale) / (1.0 if convention == "authors" else STAR_TO_HRNET_SCALE)
      center = np.asarray([cx, cy], np.float32)
      box = common.box_from_center_scale(center, float(scale), where)
      points = common.check_points(coords.reshape(n, 2), n, box, where)
      subsets = ()
      if protocol.name == "WFLW":
        if len(fields) == 7:
          flags = [t.strip() for t in fields[6].split(",")]
          if len(flags) != 6 or any(f not in ("0", "1") for f in flags):
            raise DataError(where, f"attributes must be six 0/1 flags, got "
                            f"{fields[6]!r}", "bad_value")
          subsets = tuple(a for a, f in zip(common.WFLW_ATTRIBUTES, flags) if f == "1")
        else:
          missing_attributes += 1
      name = fields[0].strip().replace("\\", "/")
      image = common.resolve_image(name, roots, where)
      collect.add(FaceRecord(
          dataset=protocol.name, split=split, image=image, landmarks=points,
          box=box, source=where, image_name=name, center=center,
          scale=float(scale), subsets=subsets))
      keys.append(name)
  if missing_attributes:
    report.warn(f"{missing_attributes} WFLW rows have no attribute column: "
                "no subset tags for them")
  if split == "test" and protocol.name in STAR_SUBSET_FILES:
    subset_files = {}
    for subset, names in STAR_SUBSET_FILES[protocol.name].items():
      paths = [os.path.join(directory, name) for name in names]
      subset_files[subset] = next((p for p in paths if os.path.isfile(p)), paths[0])
    _tag_subsets(collect, keys, subset_files,
                 lambda p: [r[0].strip().replace("\\", "/") for _, r in _read_tsv_rows(p, None)])
  return collect.finish()
