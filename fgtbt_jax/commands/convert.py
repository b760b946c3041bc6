"""Converts a face dataset into TFDS ArrayRecord files of loose face crops.

Your own faces (a folder of images with a `.pts`, `.json` or `.csv` of
points beside each; fgtbt_jax/data/readers/folder.py), as a dataset of
their own that trains jointly with the benchmarks:

    python -m data_pipelines.convert --dataset mine --format folder \
        --src ~/faces --scheme 300W --out ~/fgtbt_data \
        [--split-ratio 0.9 | --split-list test.txt]

`--scheme` is the points each annotation holds, in order: a benchmark's
(WFLW, 300W, COFW, AFLW) or a file listing unified point names
(`--list-points` prints them; fgtbt_jax/data/schemes.py). Then train with
configs/own_data.py (docs/training.md).

Face images without annotations (weak supervision: trained on with no
landmark loss, never evaluated), each image one face crop:

    python -m data_pipelines.convert --dataset mine_unlabeled --unlabeled \\
        --src ~/more_faces --out ~/fgtbt_data

Benchmarks:

    python -m data_pipelines.convert --dataset wflw --src ~/data/WFLW \\
        --out ~/fgtbt_data [--format wflw_txt] [--image-root DIR] \\
        [--on-error skip] [--max-side 512] [--image-format jpeg] \\
        [--splits train,test] [--convention project|authors] \\
        [--authors-crop-size 480] [--overwrite]

reads the dataset with fgtbt_jax.data.readers (the format is detected unless
`--format` names it), crops every face (fgtbt_jax/data/tfds_builders.py) and
writes `OUT/fgtbt_<dataset>/<crop config>/1.0.0/`. It prints what was read,
written and skipped (and why), and exits non-zero with a one-line message when
the source is missing, the dataset unknown, or a file is bad under
`--on-error raise`. With `--on-error skip` bad samples and images that fail to
load are left out and counted instead. `--convention authors` reads the STAR
TSV scale and the COFW crop extent as the FGTBT authors' loaders do (see
fgtbt_jax.data.readers.tables / cofw; what their released weights expect)
and stores the test splits as their own test crops (integer window, PIL
bicubic, PNG) at `--authors-crop-size` px, the network input their
numbers were measured on;
`--format` forces a format where several are present (the authors read WFLW
and AFLW from the HRNet CSVs).

The command-line layer over `fgtbt_jax.data.convert` (the library).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from fgtbt_jax import landmarks as lm
from fgtbt_jax.data import tfds_builders
from fgtbt_jax.data.convert import convert_dataset


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.convert",
      description="Convert a face landmark dataset to TFDS ArrayRecord crops.")
  parser.add_argument("--dataset",
                      help=f"one of {', '.join(n.lower() for n in lm.PROTOCOL_NAMES)}, or "
                           "a name of your own (with --scheme)")
  parser.add_argument("--src",
                      help="folder holding the dataset files, or an annotation file")
  parser.add_argument("--out", help="root folder of converted datasets")
  parser.add_argument("--scheme", default=None,
                      help="own data: the points of each annotation, in order: WFLW, "
                           "300W, COFW, AFLW, or a JSON/text file of unified point names")
  parser.add_argument("--split-ratio", type=float, default=None,
                      help="--format folder: the share of images for train (default 0.9; "
                           "train/ and test/ subfolders are used when present)")
  parser.add_argument("--split-list", default=None,
                      help="--format folder: a file naming the test images, one a line")
  parser.add_argument("--unlabeled", action="store_true",
                      help="--src is a folder of face images without annotation files "
                           "(each image one face, its box the whole image): a train split "
                           "of faces without landmarks, under a name of your own")
  parser.add_argument("--list-points", action="store_true",
                      help="print the unified point names (and each benchmark's index of "
                           "them) for a --scheme file, and exit")
  parser.add_argument("--format", default=None,
                      help="source format (default: detected from the files)")
  parser.add_argument("--image-root", default=None,
                      help="folder the annotation's image paths are relative to")
  parser.add_argument("--splits", default=None,
                      help="comma-separated splits to convert (default "
                           f"{','.join(tfds_builders.SPLITS)}; train with --unlabeled)")
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
  args = parser.parse_args(argv)
  if not args.list_points:
    missing = [f"--{k}" for k in ("dataset", "src", "out") if not getattr(args, k)]
    if missing:
      parser.error(f"the following arguments are required: {', '.join(missing)}")
  return args


def points_table() -> str:
  """The unified point names, each with its index in every benchmark that has it."""
  head = f"{'name':<14} {'unified':>7}  " + "  ".join(f"{n:>5}" for n in lm.PROTOCOL_NAMES)
  lines = [head]
  own = {n: {int(u): j for j, u in enumerate(lm.PROTOCOLS[n].unified_index)}
         for n in lm.PROTOCOL_NAMES}
  for u, name in enumerate(lm.POINT_NAMES):
    cells = "  ".join(f"{own[n].get(u, '-'):>5}" for n in lm.PROTOCOL_NAMES)
    lines.append(f"{name:<14} {u:>7}  {cells}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  if args.list_points:
    print(points_table())
    return 0
  try:
    summary = convert_dataset(
        args.dataset, args.src, args.out, fmt=args.format, image_root=args.image_root,
        splits=(None if args.splits is None
                else tuple(s.strip() for s in args.splits.split(",") if s.strip())),
        on_error=args.on_error, max_side=args.max_side,
        image_format=args.image_format, jpeg_quality=args.jpeg_quality,
        num_threads=args.threads, overwrite=args.overwrite, convention=args.convention,
        authors_crop_size=args.authors_crop_size, scheme=args.scheme,
        split_ratio=args.split_ratio, split_list=args.split_list, unlabeled=args.unlabeled)
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
