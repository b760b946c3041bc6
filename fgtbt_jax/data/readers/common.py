"""What every reader shares: the report, the error policy and the checks.

Checks applied to every sample (a failing sample raises `DataError`, or is
skipped and counted with `on_error="skip"`):

* the number of points is the protocol's;
* every coordinate is finite (NaN / inf are rejected);
* the face box has positive width and height;
* points may lie outside the image and outside the face box, because real
  annotations place occluded jaw points past the image border, but not far:
  a point more than `MAX_OUTSIDE_BOX` face sizes beyond the box, or with a
  coordinate below `-MAX_NEGATIVE` face sizes, is a broken annotation
  (face size = max(width, height) of the box). The image size is not known
  without decoding the image, so only the negative side is checked against
  the image itself;
* an image given as a path exists.

Problems with a whole file (missing, empty, missing .mat keys) always raise:
there is nothing left to read.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
from typing import Iterable, Sequence

import numpy as np

from fgtbt_jax.data import datasets
from fgtbt_jax.errors import DataError

MAX_OUTSIDE_BOX = 0.5
MAX_NEGATIVE = 0.25

ON_ERROR_CHOICES = ("raise", "skip")

# The six attribute flags of a WFLW annotation line, in column order (the
# file format's order, which need not be the order reports list subsets in).
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")

_log = logging.getLogger("fgtbt_jax.data.readers")


@dataclasses.dataclass(frozen=True)
class SkippedSample:
  """One sample left out under `on_error="skip"`."""

  where: str   # file:line or file[index]
  kind: str    # DataError.kind
  reason: str


@dataclasses.dataclass
class ReadReport:
  """What a read found: how many samples were read, skipped and why."""

  dataset: str
  split: str
  fmt: str
  source: str
  num_read: int = 0
  skipped: list[SkippedSample] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)  # e.g. a header row

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def skipped_by_kind(self) -> dict[str, int]:
    """Number of skipped samples per `DataError.kind`."""
    return dict(collections.Counter(s.kind for s in self.skipped))

  def warn(self, message: str) -> None:
    """Records a warning and logs it at WARNING level."""
    self.warnings.append(message)
    _log.warning("%s %s (%s): %s", self.dataset, self.split, self.fmt, message)

  def summary(self) -> str:
    lines = [f"{self.dataset} {self.split} [{self.fmt}] from {self.source}: "
             f"read {self.num_read}, skipped {self.num_skipped}"]
    for kind, count in sorted(self.skipped_by_kind().items()):
      lines.append(f"  skipped {count} x {kind}")
    for s in self.skipped[:10]:
      lines.append(f"    {s.where}: {s.reason}")
    if self.num_skipped > 10:
      lines.append(f"    ... and {self.num_skipped - 10} more")
    lines.extend(f"  note: {n}" for n in self.notes)
    lines.extend(f"  WARNING: {w}" for w in self.warnings)
    return "\n".join(lines)


class Collector:
  """Applies the error policy while a reader walks its samples.

  Usage: `with collector.sample(): collector.add(parse(...))`. A `DataError`
  raised inside the block propagates under `on_error="raise"`; under
  `"skip"` it is recorded in the report and the walk goes on.
  """

  def __init__(self, report: ReadReport, on_error: str):
    if on_error not in ON_ERROR_CHOICES:
      raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    self.report = report
    self.on_error = on_error
    self.records = []

  @contextlib.contextmanager
  def sample(self):
    try:
      yield
    except DataError as e:
      if self.on_error == "raise":
        raise
      self.report.skipped.append(SkippedSample(e.where, e.kind, e.reason))

  def add(self, record) -> None:
    self.records.append(record)
    self.report.num_read += 1

  def finish(self, check_counts: bool = True):
    """Warns about skipped samples and unexpected counts; returns the result."""
    report = self.report
    if report.num_skipped:
      report.warn(f"skipped {report.num_skipped} samples: {report.skipped_by_kind()}")
    if check_counts:
      warn_on_counts(report, self.records)
    return self.records, report


def warn_on_counts(report: ReadReport, records: Sequence) -> None:
  """Adds warnings where counts differ from the published ones.

  The published counts are `datasets.get(name).expected_counts` and
  `.expected_subset_counts`; a read that finds other numbers warns loudly
  but still returns what it read.
  """
  spec = datasets.DATASETS.get(report.dataset)
  if spec is None:
    return
  expected = spec.expected_counts.get(report.split)
  if expected is not None and len(records) != expected:
    report.warn(f"read {len(records)} samples, the published {report.split} "
                f"split has {expected}")
  if report.split != "test":
    return
  for subset, counts in spec.expected_subset_counts.items():
    n = sum(subset in r.subsets for r in records)
    if n not in counts:
      report.warn(f"subset {subset!r} has {n} samples, published: "
                  f"{' or '.join(map(str, counts))}")


def parse_floats(tokens: Iterable[str], where: str, what: str) -> np.ndarray:
  """Parses tokens as float32, naming the first one that is not a number."""
  tokens = list(tokens)
  try:
    return np.asarray([float(t) for t in tokens], np.float32)
  except ValueError:
    for i, t in enumerate(tokens):
      try:
        float(t)
      except ValueError:
        raise DataError(where, f"{what}: value {i} is not a number: {t!r}",
                        "bad_value") from None
    raise


def check_box(box, where: str) -> np.ndarray:
  """(4,) float32 x1, y1, x2, y2 with positive width and height."""
  box = np.asarray(box, np.float32).reshape(-1)
  if box.shape != (4,) or not np.isfinite(box).all():
    raise DataError(where, f"face box is not 4 finite numbers: {box.tolist()}",
                    "bad_box")
  if box[2] <= box[0] or box[3] <= box[1]:
    raise DataError(where, f"face box of zero size: x1, y1, x2, y2 = "
                    f"{box.tolist()}", "zero_box")
  return box


def box_from_points(points: np.ndarray, where: str) -> np.ndarray:
  """The landmarks' extent min/max as a box, checked for zero size."""
  finite = points[np.isfinite(points).all(1)]
  if len(finite) == 0:
    raise DataError(where, "no finite landmark coordinates", "bad_coordinates")
  return check_box(np.concatenate([finite.min(0), finite.max(0)]), where)


def box_from_center_scale(center, scale: float, where: str) -> np.ndarray:
  """The square box of side `scale * 200` around `center` (HRNet convention)."""
  if not np.isfinite(scale) or scale <= 0:
    raise DataError(where, f"scale must be positive, got {scale}", "zero_box")
  half = 100.0 * scale
  cx, cy = center
  return check_box([cx - half, cy - half, cx + half, cy + half], where)


def check_points(points, num_points: int, box: np.ndarray, where: str,
                 checked: np.ndarray | None = None) -> np.ndarray:
  """(N, 2) float32 landmarks, checked against the rules in the module doc.

  `checked` (N,) bool limits the range checks to some points (AFLW does not
  check the points it marks invisible); finiteness is checked for all.
  """
  points = np.asarray(points, np.float32)
  if points.shape != (num_points, 2):
    raise DataError(where, f"expected {num_points} points, got "
                    f"{points.size / 2:g}", "point_count")
  bad = ~np.isfinite(points).all(1)
  if bad.any():
    raise DataError(where, f"non-finite coordinate at point(s) "
                    f"{np.flatnonzero(bad).tolist()}", "bad_coordinates")
  x1, y1, x2, y2 = box
  size = max(x2 - x1, y2 - y1)
  mask = np.ones(num_points, bool) if checked is None else np.asarray(checked, bool)
  low = np.asarray([x1, y1]) - MAX_OUTSIDE_BOX * size
  high = np.asarray([x2, y2]) + MAX_OUTSIDE_BOX * size
  far = mask & ((points < low) | (points > high)).any(1)
  if far.any():
    i = int(np.flatnonzero(far)[0])
    raise DataError(where, f"point {i} at {points[i].tolist()} lies more than "
                    f"{MAX_OUTSIDE_BOX} face sizes outside the face box "
                    f"{np.asarray(box).tolist()}", "bad_coordinates")
  negative = mask & (points < -MAX_NEGATIVE * size).any(1)
  if negative.any():
    i = int(np.flatnonzero(negative)[0])
    raise DataError(where, f"point {i} has a negative coordinate "
                    f"{points[i].tolist()} beyond the allowed -{MAX_NEGATIVE} "
                    f"face sizes ({-MAX_NEGATIVE * size:.1f} px)", "bad_coordinates")
  return points


def require_file(path: str, what: str) -> str:
  """`path` if it is a non-empty file, else a DataError naming it."""
  if not os.path.isfile(path):
    raise DataError(path, f"{what} not found", "missing_file")
  if os.path.getsize(path) == 0:
    raise DataError(path, f"{what} is empty", "empty_file")
  return path


def resolve_image(name: str, roots: Sequence[str], where: str) -> str:
  """The first existing `root/name` (or `name` itself when absolute).

  A relative name that climbs out of its root (`../x.jpg`, `a/../../x.jpg`)
  is refused: annotation files name images inside the dataset.
  """
  if os.path.isabs(name):
    candidates = [name]
  elif os.path.normpath(name).split(os.sep)[0] == os.pardir:
    raise DataError(where, f"image path {name!r} leads out of the image folder "
                    f"({', '.join(repr(r) for r in roots)}); annotation paths must stay "
                    "inside it", "bad_path")
  else:
    candidates = [os.path.join(root, name) for root in roots]
  for path in candidates:
    if os.path.isfile(path):
      return os.path.abspath(path)
  raise DataError(where, f"image file not found: {name!r} (looked in "
                  f"{', '.join(repr(c) for c in candidates)})", "missing_image")


def _is(test) -> bool:
  """A directory entry's is_file / is_dir, False for a broken link or a symlink loop."""
  try:
    return test()
  except OSError:
    return False


def find_file(root: str, names: Sequence[str], max_depth: int = 3) -> str | None:
  """The shallowest file under `root` whose name is in `names` (or None).

  Directories are walked in sorted order, `max_depth` levels deep, so image
  folders with tens of thousands of files are listed at most once.
  """
  wanted = set(names)
  level = [root]
  for _ in range(max_depth + 1):
    next_level = []
    for d in level:
      try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
      except OSError:
        continue
      for e in entries:
        if e.name in wanted and _is(e.is_file):
          return e.path
      next_level.extend(e.path for e in entries if _is(e.is_dir))
    level = next_level
  return None


def find_dir(root: str, name: str, max_depth: int = 3) -> str | None:
  """The shallowest directory called `name` (case-insensitive) under `root`."""
  level = [root]
  for _ in range(max_depth + 1):
    next_level = []
    for d in level:
      try:
        entries = sorted((e for e in os.scandir(d) if _is(e.is_dir)), key=lambda e: e.name)
      except OSError:
        continue
      for e in entries:
        if e.name.lower() == name.lower():
          return e.path
      next_level.extend(e.path for e in entries)
    level = next_level
  return None


def read_lines(path: str, what: str, per_line: bool = False) -> list[str]:
  """The lines of a text annotation file; raises if it has none.

  Text must be UTF-8. A line that is not raises a DataError naming
  `path:line`, unless `per_line`: then its undecodable bytes are kept as
  surrogates and the caller checks each sample's line with `check_text`
  inside its `Collector.sample()` block, so `on_error="skip"` skips only
  that sample.
  """
  require_file(path, what)
  try:
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
      lines = f.read().splitlines()
  except IsADirectoryError:
    raise DataError(path, f"{what} is a directory", "missing_file") from None
  if not per_line:
    for line_no, line in enumerate(lines, 1):
      check_text(line, f"{path}:{line_no}")
  if not any(line.strip() for line in lines):
    raise DataError(path, f"{what} has no lines", "empty_file")
  return lines


def check_text(text: str, where: str) -> str:
  """`text` if it decoded as UTF-8, else a DataError naming `where` and the first bad byte."""
  for column, char in enumerate(text, 1):
    if "\udc80" <= char <= "\udcff":
      raise DataError(where, f"not UTF-8 text (byte 0x{ord(char) - 0xdc00:02x} at column "
                      f"{column}); save the file as UTF-8", "encoding")
  return text


def locate(src: str, names: Sequence[str], what: str) -> str:
  """`src` itself when it is a file, else the first of `names` found under it."""
  src = os.fspath(src)
  if os.path.isfile(src):
    return src
  if not os.path.isdir(src):
    raise DataError(src, f"no such file or directory (looking for {what})",
                    "missing_file")
  path = find_file(src, names)
  if path is None:
    raise DataError(src, f"no {what} found: looked for {' or '.join(names)} "
                    "up to 3 levels deep", "missing_file")
  return path


# How a reader turns a file's numbers into a crop: "project" (the documented
# conventions of each format module) or "authors" (what the FGTBT authors'
# loaders do, which their released weights were trained and measured with:
# a STAR TSV scale used as an HRNet scale, COFW boxes from floor(min) /
# ceil(max) of the points).
CONVENTIONS = ("project", "authors")


def check_convention(convention: str) -> str:
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  return convention


def check_split(split: str, splits: Sequence[str], fmt: str) -> str:
  if split not in splits:
    raise ValueError(f"{fmt}: unknown split {split!r}; expected one of {list(splits)}")
  return split
