"""Conversion of a face dataset into TFDS ArrayRecord files of loose face crops.

The command is `python -m data_pipelines.convert` (its options say what each
argument means). The dataset is read with fgtbt_jax.data.readers (the format
is detected unless `fmt` names it), every face cropped
(fgtbt_jax/data/tfds_builders.py) and `OUT/fgtbt_<dataset>/<crop config>/1.0.0/`
written. `convention="authors"` reads the STAR TSV scale and the COFW crop
extent as the FGTBT authors' loaders do (see fgtbt_jax.data.readers.tables /
cofw; what their released weights expect) and stores the test splits as their
own test crops (integer window, PIL bicubic, PNG) at `authors_crop_size` px.

A user's own folder of faces (images with a `.pts`/`.json`/`.csv` beside
each; fgtbt_jax.data.readers.folder) converts under a benchmark's name and
points, or under its own name with `scheme` (a benchmark's points or a list
of unified point names; fgtbt_jax.data.schemes), stored with it so that a
run reads it back. A folder of face images without annotations converts
under its own name with `unlabeled=True` (`--unlabeled`): a train split of
faces without landmarks (fgtbt_jax.data.readers.folder), under the scheme
of all unified points (`UNLABELED_SCHEME`), marked unlabeled in the
metadata (`tfds_builders.is_unlabeled`).

Library use: `convert_dataset(...)` and `convert_records(...)` return a
`ConversionSummary`; `convert_synthetic(out_root)` writes the synthetic stand-in
datasets and converts all four (run.py calls it on first use).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Mapping, Sequence

import tensorflow_datasets as tfds

from fgtbt_jax.data import datasets
from fgtbt_jax.data import tfds_builders
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax import landmarks as lm

# `convert_synthetic` renders the raw synthetic files into this subfolder of
# its output root.
SYNTHETIC_RAW_DIR = "raw"
# The point scheme an unlabeled folder is stored under: every unified point
# (none of them annotated; the scheme only fixes the stored shape).
UNLABELED_SCHEME = tuple(lm.POINT_NAMES)


@dataclasses.dataclass
class SplitSummary:
  """What the conversion of one split read, wrote and left out."""

  split: str
  read: int = 0
  written: int = 0
  skipped_reading: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped_images: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped_examples: list[str] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)

  @property
  def skipped(self) -> int:
    return sum(self.skipped_reading.values()) + sum(self.skipped_images.values())


@dataclasses.dataclass
class ConversionSummary:
  """The result of converting one dataset."""

  dataset: str
  path: pathlib.Path  # The version directory written (or reused).
  reused: bool  # True: a finished conversion existed and was kept.
  splits: dict[str, SplitSummary]

  def text(self) -> str:
    """A human-readable report."""
    head = f"{self.dataset}: {'reused existing' if self.reused else 'wrote'} {self.path}"
    lines = [head]
    for s in self.splits.values():
      lines.append(f"  {s.split}: read {s.read}, written {s.written}, skipped {s.skipped}")
      for kind, count in sorted(s.skipped_reading.items()):
        lines.append(f"    skipped while reading: {count} x {kind}")
      for kind, count in sorted(s.skipped_images.items()):
        lines.append(f"    skipped while cropping: {count} x {kind}")
      lines.extend(f"      {example}" for example in s.skipped_examples[:10])
      lines.extend(f"    WARNING: {w}" for w in s.warnings)
    return "\n".join(lines)


def convert_dataset(dataset: str, src: str | os.PathLike, out: str | os.PathLike, *,
                    fmt: str | None = None, image_root: str | None = None,
                    splits: Sequence[str] | None = None,
                    on_error: str = "raise", max_side: int = tfds_builders.DEFAULT_MAX_SIDE,
                    image_format: str = "jpeg",
                    jpeg_quality: int = tfds_builders.DEFAULT_JPEG_QUALITY,
                    num_threads: int = 4, overwrite: bool = False,
                    synthetic: bool = False, convention: str = "project",
                    authors_crop_size: int = tfds_builders.AUTHORS_CROP_SIZE,
                    scheme=None, split_ratio: float | None = None,
                    split_list: str | None = None, unlabeled: bool = False
                    ) -> ConversionSummary:
  """Reads `dataset` from `src` (a folder or annotation file) into crops under `out`.

  `fmt` names the source format (None: detected), `image_root` where the
  annotation's image paths are relative to (None: the format's default); see
  fgtbt_jax.data.readers.read_dataset. `synthetic` marks the conversion as
  generated stand-in data (`convert_synthetic` sets it). `convention`:
  the readers' ("project" or "authors"; fgtbt_jax.data.readers.read_dataset);
  "authors" also stores the test splits as the authors' own test crops at
  `authors_crop_size` px (fgtbt_jax.data.tfds_builders).

  `dataset` not a benchmark's name is a user's own dataset, read from a
  folder (fmt "folder") under `scheme`: a benchmark name, a scheme file or
  a list of unified point names (fgtbt_jax.data.schemes; None: the scheme
  of an earlier conversion of it under `out`). `split_ratio` / `split_list`
  split a folder (fgtbt_jax.data.readers.folder). Sources that
  `data_pipelines.synthetic` wrote are marked synthetic. `splits` None:
  train and test (train alone when `unlabeled`).

  `unlabeled`: `src` is a folder of face images without annotation files,
  converted under an own name as a train split of faces without landmarks
  (each image one face, its box the whole image), under
  `UNLABELED_SCHEME`; it takes no scheme, split ratio or list.

  Raises:
    FileNotFoundError: `src` does not exist.
    UnknownProtocolError: unknown dataset name.
    ValueError: `unlabeled` with a benchmark's name, a scheme, a split
      ratio or list, a test split or another format than the folder's.
    DataError: a bad file, or a bad sample with `on_error="raise"`.
  """
  if unlabeled:
    _check_unlabeled(dataset, scheme, fmt, splits, split_ratio, split_list)
    scheme = list(UNLABELED_SCHEME)
  splits = tuple(splits) if splits is not None else (
      ("train",) if unlabeled else tfds_builders.SPLITS)
  if lm.is_benchmark(dataset):
    protocol = lm.get_protocol(dataset)
    if scheme is not None and not (isinstance(scheme, str) and lm.is_benchmark(scheme)
                                   and lm.get_protocol(scheme).name == protocol.name):
      raise ValueError(f"{protocol.name} annotates its own {protocol.num_landmarks} points: "
                       f"a scheme is for a dataset of your own name (--dataset NAME "
                       f"--scheme {scheme})")
  else:
    protocol = _own_protocol(dataset, out, scheme, fmt, overwrite)
    fmt = datasets.FOLDER
  if not os.path.exists(src):
    raise FileNotFoundError(f"{src}: {protocol.name} source not found")
  if fmt is None and os.path.isdir(src):
    from fgtbt_jax.data import readers  # pylint: disable=g-import-not-at-top
    try:  # Recorded in the metadata (the data column); a failure shows below.
      fmt = readers.detect_format(protocol.name, os.fspath(src), tuple(splits)[0])
    except ValueError:
      fmt = None
  options = {"split_ratio": split_ratio, "split_list": split_list,
             "unlabeled": True if unlabeled else None}
  if any(v is not None for v in options.values()) and fmt not in (datasets.FOLDER, None):
    raise ValueError(f"a split ratio or list is for the {datasets.FOLDER} format; "
                     f"{src} holds {protocol.name} as {fmt}")
  return _build(protocol.name, src, out, read_split=None, fmt=fmt,
                image_root=image_root, splits=splits,
                on_error=on_error, max_side=max_side, image_format=image_format,
                jpeg_quality=jpeg_quality, num_threads=num_threads, overwrite=overwrite,
                synthetic=synthetic or is_synthetic_source(src), convention=convention,
                authors_crop_size=authors_crop_size,
                reader_options={k: v for k, v in options.items() if v is not None})


def _check_unlabeled(dataset, scheme, fmt, splits, split_ratio, split_list) -> None:
  """Raises ValueError for what an unlabeled folder's conversion does not take."""
  if lm.is_benchmark(dataset):
    raise ValueError(f"--unlabeled: {lm.get_protocol(dataset).name} is a benchmark, whose "
                     "faces are annotated; convert faces without annotations under a name "
                     "of your own (--dataset NAME --unlabeled)")
  if scheme is not None:
    raise ValueError(f"--unlabeled: an unlabeled folder has no points; leave out --scheme "
                     f"({scheme})")
  if fmt not in (None, datasets.FOLDER):
    raise ValueError(f"--unlabeled: faces without annotations are read from a folder "
                     f"(--format {datasets.FOLDER}), not {fmt}")
  if split_ratio is not None or split_list is not None:
    raise ValueError("--unlabeled: an unlabeled folder has a train split only; leave out "
                     "--split-ratio / --split-list")
  if splits is not None and tuple(splits) != ("train",):
    raise ValueError(f"--unlabeled: an unlabeled folder has a train split only (nothing to "
                     f"evaluate), not {','.join(splits)}; leave out --splits or give "
                     "--splits train")


def _own_protocol(dataset, out, scheme, fmt, overwrite) -> lm.Protocol:
  """The registered protocol of own dataset `dataset` under `scheme` (or the
  scheme its earlier conversion under `out` holds)."""
  from fgtbt_jax.data import schemes  # pylint: disable=g-import-not-at-top
  if fmt not in (None, datasets.FOLDER):
    raise ValueError(f"{dataset} is not a benchmark {lm.PROTOCOL_NAMES}: your own data is "
                     f"read from a folder (--format {datasets.FOLDER}), not {fmt}")
  try:
    held = schemes.stored_scheme(out, dataset) if os.path.isdir(out) else None
  except ValueError:
    held = None  # Several crop configs, or no scheme: the conversion says.
  if scheme is None and held is None:
    raise ValueError(f"unknown protocol {dataset!r}: not a benchmark {lm.PROTOCOL_NAMES}; to "
                     "convert your own data under this name give its point scheme: --scheme "
                     "WFLW|300W|COFW|AFLW, or --scheme points.json (unified point names; "
                     "--list-points)")
  protocol = schemes.own_protocol(dataset, held if scheme is None else scheme)
  if held is not None and not overwrite and schemes.scheme_metadata(protocol)["points"] != held:
    raise ValueError(f"{out}: {dataset} is converted there with another point scheme "
                     f"({len(held)} points); pass --overwrite to replace it, or convert "
                     "under another name")
  lm.register_protocol(protocol)
  return protocol


def is_synthetic_source(src: str | os.PathLike) -> bool:
  """Whether `src` lies in raw files that `data_pipelines.synthetic` wrote
  (its marker file in `src` or up to two folders above)."""
  from fgtbt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(src).resolve()
  folder = path if path.is_dir() else path.parent
  return any((p / synthetic.MARKER_FILE).is_file()
             for p in [folder, *folder.parents][:3])


def convert_records(dataset: str, records: Mapping[str, Sequence[FaceRecord]],
                    out: str | os.PathLike, *, on_error: str = "raise",
                    max_side: int = tfds_builders.DEFAULT_MAX_SIDE,
                    image_format: str = "jpeg",
                    jpeg_quality: int = tfds_builders.DEFAULT_JPEG_QUALITY,
                    num_threads: int = 4, overwrite: bool = False) -> ConversionSummary:
  """Writes already-read records ({split: records}) under `out`."""
  protocol = lm.get_protocol(dataset)
  for split, split_records in records.items():
    for r in split_records:
      if lm.get_protocol(r.dataset).name != protocol.name:
        raise ValueError(f"{r.source}: a {r.dataset} record among "
                         f"{protocol.name} {split} records")
  os.makedirs(out, exist_ok=True)
  return _build(protocol.name, out, out, read_split=lambda _, split: (records[split], None),
                fmt=None, image_root=None, splits=tuple(records), on_error=on_error,
                max_side=max_side, image_format=image_format, jpeg_quality=jpeg_quality,
                num_threads=num_threads, overwrite=overwrite)


def _build(dataset, src, out, *, read_split, fmt, image_root, splits, on_error,
           max_side, image_format, jpeg_quality, num_threads,
           overwrite, synthetic=False, convention="project",
           authors_crop_size=tfds_builders.AUTHORS_CROP_SIZE,
           reader_options=None) -> ConversionSummary:
  config = tfds_builders.crop_config(max_side, image_format, jpeg_quality)
  builder = tfds_builders.build(
      dataset, src, out, source_format=fmt, image_root=image_root,
      read_split=read_split, splits=splits,
      config=config, on_error=on_error, num_threads=num_threads, overwrite=overwrite,
      synthetic=synthetic, convention=convention, authors_crop_size=authors_crop_size,
      reader_options=reader_options)
  path = pathlib.Path(builder.data_dir)
  if not builder.split_stats:  # An existing conversion was reused.
    return _existing_summary(dataset, path, builder.info)
  summaries = {}
  for split, stats in builder.split_stats.items():
    report = stats.read_report
    summaries[split] = SplitSummary(
        split=split, read=stats.records, written=stats.written,
        skipped_reading=report.skipped_by_kind() if report is not None else {},
        skipped_images=dict(stats.skipped),
        skipped_examples=([f"{s.where}: {s.reason}" for s in report.skipped[:10]]
                          if report is not None else []) + stats.skipped_examples,
        warnings=list(report.warnings) if report is not None else [])
  return ConversionSummary(dataset, path, False, summaries)


def _existing_summary(dataset: str, path: pathlib.Path, info) -> ConversionSummary:
  """Summary of a finished conversion from the counts stored in its metadata."""
  summaries = {}
  for split in info.splits:
    meta = info.metadata.get(f"{split}_conversion", {})
    summaries[split] = SplitSummary(
        split=split, read=meta.get("records", 0),
        written=info.splits[split].num_examples,
        skipped_images=dict(meta.get("skipped", {})))
  return ConversionSummary(dataset, path, True, summaries)


def convert_synthetic(out_root: str | os.PathLike,
                      sizes: Mapping[str, tuple[int, int]] | None = None,
                      seed: int = 0, image_size: int = 256,
                      max_side: int = tfds_builders.DEFAULT_MAX_SIDE,
                      render_workers: int | None = None,
                      num_threads: int = 4) -> dict[str, ConversionSummary]:
  """Writes the four synthetic datasets in their real formats and converts them.

  Args:
    out_root: raw files go to `out_root/raw` (`SYNTHETIC_RAW_DIR`),
      converted data to `out_root` (use it as `data.data_dir`).
    sizes: {dataset: (num_train, num_test)}; default
      fgtbt_jax.data.synthetic.DEFAULT_SIZES.
    seed, image_size: of the synthetic generator.
    max_side: the stored crops' longest side.
    render_workers: processes rendering faces (default: the CPU count).
    num_threads: threads cropping and encoding during conversion.

  Datasets already converted under `out_root` with this `max_side` are kept
  as they are (and not rendered again).
  """
  from fgtbt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  out_root = pathlib.Path(out_root)
  sizes = dict(synthetic.DEFAULT_SIZES if sizes is None else sizes)
  config = tfds_builders.crop_config_name(max_side)
  summaries = {}
  for name in lm.PROTOCOL_NAMES:
    try:
      path = tfds_builders.converted_dir(out_root, name, config)
    except FileNotFoundError:
      continue
    info = tfds.builder_from_directory(os.fspath(path)).info
    summaries[name] = _existing_summary(name, path, info)
  missing = [name for name in lm.PROTOCOL_NAMES if name not in summaries]
  if missing:
    paths = synthetic.write_synthetic_datasets(
        os.fspath(out_root / SYNTHETIC_RAW_DIR), {name: tuple(sizes[name]) for name in missing},
        seed=seed, image_size=image_size, num_workers=render_workers)
    for name in missing:
      summaries[name] = convert_dataset(name, paths[name], out_root, max_side=max_side,
                                        num_threads=num_threads, synthetic=True)
  return {name: summaries[name] for name in lm.PROTOCOL_NAMES}
