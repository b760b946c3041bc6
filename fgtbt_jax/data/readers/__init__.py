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
| `folder`    | all, and user schemes | images with a `.pts`/`.json`/`.csv` beside each (`folder`) |

When several are present the first in `FORMATS[dataset]` wins (raw formats
before the derived tables; the order is `datasets.get(name).formats`). Each format module documents its layout and
conventions; `common` documents the checks and the error policy:
`on_error="raise"` raises `DataError` at the first bad sample, `"skip"` skips
it and counts it in the report. Problems with a whole file always raise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from fgtbt_jax.data.readers import aflw, cofw, common, folder, tables, w300, wflw
from fgtbt_jax.data.readers.aflw import read_aflw_mat
from fgtbt_jax.data.readers.cofw import read_cofw_mat
from fgtbt_jax.data.readers.folder import read_folder
from fgtbt_jax.data.readers.common import ReadReport, SkippedSample
from fgtbt_jax.data.readers.tables import read_hrnet_csv, read_star_tsv
from fgtbt_jax.data.readers.w300 import read_300w_pts, read_pts
from fgtbt_jax.data.readers.wflw import read_wflw_txt
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax.data import datasets
from fgtbt_jax import landmarks
from fgtbt_jax.errors import DataError

__all__ = [
    "DataError", "ReadReport", "SkippedSample", "FaceRecord", "FORMATS",
    "read_dataset", "detect_format",
    "read_wflw_txt", "read_300w_pts", "read_pts", "read_cofw_mat",
    "read_aflw_mat", "read_hrnet_csv", "read_star_tsv", "read_folder",
]


@dataclasses.dataclass(frozen=True)
class _Format:
  """How one format is recognised in a directory and read.

  present(dataset, src, split): whether directory `src` holds the split.
  read(dataset, src, split, on_error, image_root[, convention]) -> (records, report).
  image_root: whether the format takes an image_root, else why not.
  """

  present: Callable[[str, str, str], bool]
  read: Callable[..., tuple]
  image_root: bool | str = True
  # Whether `read` takes a `convention` (common.CONVENTIONS) after image_root.
  conventions: bool = False
  # Keyword options `read` takes (read_dataset's `options`).
  options: tuple[str, ...] = ()


def _star_present(dataset: str, src: str, split: str) -> bool:
  folder = common.find_dir(src, dataset, max_depth=2)
  return any(os.path.isfile(os.path.join(d, f"{split}.tsv")) for d in (folder, src) if d)


_FORMATS: dict[str, _Format] = {
    wflw.FMT: _Format(
        present=lambda d, src, split: common.find_file(
            src, [wflw.annotation_name(split)]) is not None,
        read=lambda d, src, split, on_error, root: read_wflw_txt(src, split, on_error, root)),
    w300.FMT: _Format(
        present=lambda d, src, split: w300.find_300w_root(src) is not None,
        read=lambda d, src, split, on_error, root: read_300w_pts(src, split, on_error),
        image_root="its images are beside the .pts files"),
    cofw.FMT: _Format(
        present=lambda d, src, split: common.find_file(src, cofw.FILES[split]) is not None,
        read=lambda d, src, split, on_error, root, convention: read_cofw_mat(
            src, split, on_error, convention),
        conventions=True,
        image_root="its images are in the .mat file"),
    aflw.FMT: _Format(
        present=lambda d, src, split: common.find_file(src, [aflw.FILE]) is not None,
        read=lambda d, src, split, on_error, root: read_aflw_mat(src, split, on_error, root)),
    tables.HRNET_FMT: _Format(
        present=lambda d, src, split: common.find_file(
            src, [tables.HRNET_FILES[d][split]]) is not None,
        read=read_hrnet_csv),
    tables.STAR_FMT: _Format(present=_star_present, read=read_star_tsv, conventions=True),
    folder.FMT: _Format(
        present=lambda d, src, split: folder.has_annotated_images(src),
        read=read_folder, image_root="its images are beside the annotation files",
        options=("split_ratio", "split_list", "unlabeled")),
}

# Formats each dataset can be read from, in detection order.
FORMATS: dict[str, tuple[str, ...]] = {
    name: spec.formats for name, spec in datasets.DATASETS.items()}
for _name, _formats in FORMATS.items():
  if set(_formats) - set(_FORMATS):
    raise ValueError(f"datasets.{_name}.formats names formats without a reader: "
                     f"{sorted(set(_formats) - set(_FORMATS))}")
del _name, _formats


def formats_of(dataset: str) -> tuple[str, ...]:
  """The formats `dataset` (a benchmark or a registered own dataset) is read from."""
  return datasets.get(dataset).formats


def detect_format(dataset: str, src: str, split: str = "train") -> str:
  """The format `read_dataset` would read `dataset` from `src` in.

  A file is recognised by its extension (.txt, .csv, .tsv, .mat), a
  directory by the file names in the table of the module doc.
  """
  name = landmarks.get_protocol(dataset).name
  formats = formats_of(name)
  src = os.fspath(src)
  if os.path.isfile(src):
    by_extension = {".txt": wflw.FMT, ".csv": tables.HRNET_FMT, ".tsv": tables.STAR_FMT,
                    ".mat": cofw.FMT if name == "COFW" else aflw.FMT}
    fmt = by_extension.get(os.path.splitext(src)[1].lower())
    if fmt is None or fmt not in formats:
      raise DataError(src, f"cannot tell the {name} annotation format from this "
                      f"file name; pass fmt= (one of {formats})", "missing_file")
    return fmt
  if not os.path.isdir(src):
    raise DataError(src, "no such file or directory", "missing_file")
  for fmt in formats:
    if _FORMATS[fmt].present(name, src, split):
      return fmt
  raise DataError(src, f"no {name} {split} annotations found in any known format "
                  f"{formats}; see fgtbt_jax.data.readers for the file "
                  "names each format expects", "missing_file")


def read_dataset(dataset: str, src: str, split: str, fmt: str | None = None,
                 on_error: str = "raise", image_root: str | None = None,
                 convention: str = "project", options=None
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
    convention: "project" or "authors" (`common.CONVENTIONS`): how the STAR
      TSV scale and the COFW crop extent are read; formats without such a
      choice read the same either way.
    options: keyword options of the format's reader, e.g. `folder`'s
      {"split_ratio": 0.9} or {"split_list": "test.txt"} (None values are
      dropped).

  Returns:
    (records, report).
  """
  name = landmarks.get_protocol(dataset).name
  fmt = fmt or detect_format(name, src, split)
  if fmt not in formats_of(name):
    raise ValueError(f"{name} cannot be read as {fmt!r}; formats: {formats_of(name)}")
  reader = _FORMATS[fmt]
  if image_root is not None and reader.image_root is not True:
    raise ValueError(f"{fmt} takes no image_root: {reader.image_root}")
  common.check_convention(convention)
  options = {k: v for k, v in dict(options or {}).items() if v is not None}
  unknown = sorted(set(options) - set(reader.options))
  if unknown:
    raise ValueError(f"{fmt} takes no {', '.join(unknown)} (a split ratio or list is "
                     f"for the {folder.FMT} format)")
  if reader.conventions:
    return reader.read(name, src, split, on_error, image_root, convention, **options)
  return reader.read(name, src, split, on_error, image_root, **options)
