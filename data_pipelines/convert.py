"""Converts a face dataset into TFDS ArrayRecord files of loose face crops.

    python -m data_pipelines.convert --dataset wflw --src ~/data/WFLW \\
        --out ~/fgtbt_data [--format wflw_txt] [--image-root DIR] \\
        [--on-error skip] [--max-side 512] [--image-format jpeg] \\
        [--splits train,test] [--convention project|authors] \\
        [--authors-crop-size 480] [--overwrite]

reads the dataset with data_pipelines.readers (the format is detected unless
`--format` names it), crops every face (data_pipelines/tfds_builders.py) and
writes `OUT/fgtbt_<dataset>/<crop config>/1.0.0/`. It prints what was read,
written and skipped (and why), and exits non-zero with a one-line message when
the source is missing, the dataset unknown, or a file is bad under
`--on-error raise`. With `--on-error skip` bad samples and images that fail to
load are left out and counted instead. `--convention authors` reads the STAR
TSV scale and the COFW crop extent as the FGTBT authors' loaders do (see
data_pipelines.readers.tables / cofw; what their released weights expect)
and stores the test splits as their own test crops (integer window, PIL
bicubic, PNG) at `--authors-crop-size` px, the network input their
numbers were measured on;
`--format` forces a format where several are present (the authors read WFLW
and AFLW from the HRNet CSVs).

Library use: `convert_dataset(...)` and `convert_records(...)` return a
`ConversionSummary`; `convert_synthetic(out_root)` writes the synthetic stand-in
datasets and converts all four (run.py calls it on first use).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
from typing import Mapping, Sequence

import tensorflow_datasets as tfds

from data_pipelines import tfds_builders
from data_pipelines.records import FaceRecord
from fgtbt_jax import landmarks as lm

# `convert_synthetic` renders the raw synthetic files into this subfolder of
# its output root.
SYNTHETIC_RAW_DIR = "raw"


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
                    splits: Sequence[str] = tfds_builders.SPLITS,
                    on_error: str = "raise", max_side: int = tfds_builders.DEFAULT_MAX_SIDE,
                    image_format: str = "jpeg",
                    jpeg_quality: int = tfds_builders.DEFAULT_JPEG_QUALITY,
                    num_threads: int = 4, overwrite: bool = False,
                    synthetic: bool = False, convention: str = "project",
                    authors_crop_size: int = tfds_builders.AUTHORS_CROP_SIZE
                    ) -> ConversionSummary:
  """Reads `dataset` from `src` (a folder or annotation file) into crops under `out`.

  `fmt` names the source format (None: detected), `image_root` where the
  annotation's image paths are relative to (None: the format's default); see
  data_pipelines.readers.read_dataset. `synthetic` marks the conversion as
  generated stand-in data (`convert_synthetic` sets it). `convention`:
  the readers' ("project" or "authors"; data_pipelines.readers.read_dataset);
  "authors" also stores the test splits as the authors' own test crops at
  `authors_crop_size` px (data_pipelines.tfds_builders).

  Raises:
    FileNotFoundError: `src` does not exist.
    UnknownProtocolError: unknown dataset name.
    DataError: a bad file, or a bad sample with `on_error="raise"`.
  """
  protocol = lm.get_protocol(dataset)
  if not os.path.exists(src):
    raise FileNotFoundError(f"{src}: {protocol.name} source not found")
  return _build(protocol.name, src, out, read_split=None, fmt=fmt,
                image_root=image_root, splits=splits,
                on_error=on_error, max_side=max_side, image_format=image_format,
                jpeg_quality=jpeg_quality, num_threads=num_threads, overwrite=overwrite,
                synthetic=synthetic, convention=convention,
                authors_crop_size=authors_crop_size)


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
           authors_crop_size=tfds_builders.AUTHORS_CROP_SIZE) -> ConversionSummary:
  config = tfds_builders.crop_config(max_side, image_format, jpeg_quality)
  builder = tfds_builders.build(
      dataset, src, out, source_format=fmt, image_root=image_root,
      read_split=read_split, splits=splits,
      config=config, on_error=on_error, num_threads=num_threads, overwrite=overwrite,
      synthetic=synthetic, convention=convention, authors_crop_size=authors_crop_size)
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
      data_pipelines.synthetic.DEFAULT_SIZES.
    seed, image_size: of the synthetic generator.
    max_side: the stored crops' longest side.
    render_workers: processes rendering faces (default: the CPU count).
    num_threads: threads cropping and encoding during conversion.

  Datasets already converted under `out_root` with this `max_side` are kept
  as they are (and not rendered again).
  """
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
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


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.convert",
      description="Convert a face landmark dataset to TFDS ArrayRecord crops.")
  parser.add_argument("--dataset", required=True,
                      help=f"one of {', '.join(n.lower() for n in lm.PROTOCOL_NAMES)}")
  parser.add_argument("--src", required=True,
                      help="folder holding the dataset files, or an annotation file")
  parser.add_argument("--out", required=True, help="root folder of converted datasets")
  parser.add_argument("--format", default=None,
                      help="source format (default: detected from the files)")
  parser.add_argument("--image-root", default=None,
                      help="folder the annotation's image paths are relative to")
  parser.add_argument("--splits", default=",".join(tfds_builders.SPLITS),
                      help="comma-separated splits to convert")
  parser.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                      help="stop at the first bad sample, or skip and count it")
  parser.add_argument("--max-side", type=int, default=tfds_builders.DEFAULT_MAX_SIDE,
                      help="longest side of a stored crop in pixels")
  parser.add_argument("--image-format", default="jpeg", choices=("jpeg", "png"))
  parser.add_argument("--jpeg-quality", type=int, default=tfds_builders.DEFAULT_JPEG_QUALITY)
  parser.add_argument("--threads", type=int, default=4,
                      help="threads decoding, cropping and encoding images")
  parser.add_argument("--convention", default="project", choices=("project", "authors"),
                      help="read STAR TSV scales and COFW crop extents as this project "
                           "documents, or as the FGTBT authors' loaders do (and store "
                           "the test splits as their test crops)")
  parser.add_argument("--authors-crop-size", type=int, default=tfds_builders.AUTHORS_CROP_SIZE,
                      help="with --convention authors: the side of the stored test crops "
                           "(the network input size of the evaluation)")
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild even if a finished conversion exists")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    summary = convert_dataset(
        args.dataset, args.src, args.out, fmt=args.format, image_root=args.image_root,
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        on_error=args.on_error, max_side=args.max_side,
        image_format=args.image_format, jpeg_quality=args.jpeg_quality,
        num_threads=args.threads, overwrite=args.overwrite, convention=args.convention,
        authors_crop_size=args.authors_crop_size)
  # DataError and UnknownProtocolError are ValueErrors with one-line messages;
  # an OSError (a read-only or full --out, a file where a folder goes) names
  # its path. What was converted before stays (TFDS writes into a temporary
  # folder and renames it when done).
  except (OSError, ValueError) as error:
    print(f"convert: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1
  print(summary.text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
