"""Readers for the public annotation formats of WFLW, 300W, COFW and AFLW.

One entry point, `read_dataset(dataset, src, split)`, returns the faces as
`FaceRecord`s (0-based pixel coordinates in the dataset's own point order)
and a `ReadReport` (counts read and skipped, with reasons naming file:line,
and warnings such as counts that differ from the published ones). The format
is detected from what `src` holds when `fmt` is None:

| fmt         | datasets        | what `src` holds (file names looked for)                  |
|-------------|-----------------|-----------------------------------------------------------|
| `wflw_txt`  | WFLW            | `list_98pt_rect_attr_{split}.txt` and `WFLW_images/`      |
| `300w_pts`  | 300W            | `afw/`, `helen/{trainset,testset}/`, `lfpw/{...}/`, `ibug/` with `.pts` beside the images |
| `cofw_mat`  | COFW            | `COFW_{split}_color.mat` (v7.3) or `COFW_{split}.mat`      |
| `aflw_mat`  | AFLW            | `AFLWinfo_release.mat` (v5 or v7.3) and the images         |
| `hrnet_csv` | WFLW, 300W, AFLW | `face_landmarks_<dataset>_{split}.csv` (+ subset CSVs), `images/` |
| `star_tsv`  | all             | `<dataset>/{split}.tsv` or `{split}.tsv`                   |

When several are present the first in `FORMATS[dataset]` wins (raw formats
before the derived tables). Each format module documents its layout and
conventions; `common` documents the checks and the error policy:
`on_error="raise"` raises `DataError` at the first bad sample, `"skip"` skips
it and counts it in the report. Problems with a whole file always raise.
"""

from __future__ import annotations

import os

from data_pipelines.errors import DataError
from data_pipelines.readers import aflw, cofw, common, tables, w300, wflw
from data_pipelines.readers.aflw import read_aflw_mat
from data_pipelines.readers.cofw import read_cofw_mat
from data_pipelines.readers.common import (EXPECTED_COUNTS, EXPECTED_SUBSET_COUNTS,
                                           ReadReport, SkippedSample)
from data_pipelines.readers.tables import read_hrnet_csv, read_star_tsv
from data_pipelines.readers.w300 import read_300w_pts, read_pts
from data_pipelines.readers.wflw import read_wflw_txt
from data_pipelines.records import FaceRecord
from fgtbt_jax import landmarks

__all__ = [
    "DataError", "ReadReport", "SkippedSample", "FaceRecord", "FORMATS",
    "EXPECTED_COUNTS", "EXPECTED_SUBSET_COUNTS", "read_dataset", "detect_format",
    "read_wflw_txt", "read_300w_pts", "read_pts", "read_cofw_mat",
    "read_aflw_mat", "read_hrnet_csv", "read_star_tsv",
]

# Formats each dataset can be read from, in detection order.
FORMATS: dict[str, tuple[str, ...]] = {
    "WFLW": (wflw.FMT, tables.HRNET_FMT, tables.STAR_FMT),
    "300W": (w300.FMT, tables.HRNET_FMT, tables.STAR_FMT),
    "COFW": (cofw.FMT, tables.STAR_FMT),
    "AFLW": (aflw.FMT, tables.HRNET_FMT, tables.STAR_FMT),
}


def _present(fmt: str, dataset: str, src: str, split: str) -> bool:
  """Whether directory `src` holds `dataset`'s `split` in format `fmt`."""
  if fmt == wflw.FMT:
    return common.find_file(src, [wflw.annotation_name(split)]) is not None
  if fmt == w300.FMT:
    return w300.find_300w_root(src) is not None
  if fmt == cofw.FMT:
    return common.find_file(src, cofw.FILES[split]) is not None
  if fmt == aflw.FMT:
    return common.find_file(src, [aflw.FILE]) is not None
  if fmt == tables.HRNET_FMT:
    return common.find_file(src, [tables.HRNET_FILES[dataset][split]]) is not None
  if fmt == tables.STAR_FMT:
    folder = common.find_dir(src, dataset, max_depth=2)
    return any(os.path.isfile(os.path.join(d, f"{split}.tsv")) for d in (folder, src) if d)
  raise ValueError(f"unknown format {fmt!r}")


def detect_format(dataset: str, src: str, split: str = "train") -> str:
  """The format `read_dataset` would read `dataset` from `src` in.

  A file is recognised by its extension (.txt, .csv, .tsv, .mat), a
  directory by the file names in the table of the module doc.
  """
  name = landmarks.get_protocol(dataset).name
  src = os.fspath(src)
  if os.path.isfile(src):
    by_extension = {".txt": wflw.FMT, ".csv": tables.HRNET_FMT, ".tsv": tables.STAR_FMT,
                    ".mat": cofw.FMT if name == "COFW" else aflw.FMT}
    fmt = by_extension.get(os.path.splitext(src)[1].lower())
    if fmt is None or fmt not in FORMATS[name]:
      raise DataError(src, f"cannot tell the {name} annotation format from this "
                      f"file name; pass fmt= (one of {FORMATS[name]})", "missing_file")
    return fmt
  if not os.path.isdir(src):
    raise DataError(src, "no such file or directory", "missing_file")
  for fmt in FORMATS[name]:
    if _present(fmt, name, src, split):
      return fmt
  raise DataError(src, f"no {name} {split} annotations found in any known format "
                  f"{FORMATS[name]}; see data_pipelines.readers for the file "
                  "names each format expects", "missing_file")


def read_dataset(dataset: str, src: str, split: str, fmt: str | None = None,
                 on_error: str = "raise", image_root: str | None = None
                 ) -> tuple[list[FaceRecord], ReadReport]:
  """Reads one split of one dataset.

  Args:
    dataset: "WFLW", "300W", "COFW" or "AFLW" (case-insensitive).
    src: an annotation file or a directory holding the dataset.
    split: "train" or "test".
    fmt: one of FORMATS[dataset], or None to detect it from `src`.
    on_error: "raise" (DataError at the first bad sample) or "skip" (skip
      and count bad samples in the report).
    image_root: where image paths of the annotation are relative to, when
      not the format's default (not for 300w_pts and cofw_mat, whose images
      sit beside the annotations or inside them).

  Returns:
    (records, report).
  """
  name = landmarks.get_protocol(dataset).name
  fmt = fmt or detect_format(name, src, split)
  if fmt not in FORMATS[name]:
    raise ValueError(f"{name} cannot be read as {fmt!r}; formats: {FORMATS[name]}")
  if image_root is not None and fmt in (w300.FMT, cofw.FMT):
    raise ValueError(f"{fmt} takes no image_root: its images are "
                     + ("beside the .pts files" if fmt == w300.FMT else "in the .mat file"))
  if fmt == wflw.FMT:
    return read_wflw_txt(src, split, on_error, image_root)
  if fmt == w300.FMT:
    return read_300w_pts(src, split, on_error)
  if fmt == cofw.FMT:
    return read_cofw_mat(src, split, on_error)
  if fmt == aflw.FMT:
    return read_aflw_mat(src, split, on_error, image_root)
  if fmt == tables.HRNET_FMT:
    return read_hrnet_csv(name, src, split, on_error, image_root)
  return read_star_tsv(name, src, split, on_error, image_root)
