"""Render synthetic WFLW, 300W, COFW and AFLW in their real file formats.

    python -m data_pipelines.synthetic --out DIR [--datasets wflw,300w] [--train N]
        [--test N] [--seed 0] [--image-size 256] [--workers N]

The command-line layer over `fgtbt_jax.data.synthetic` (the renderer and
`write_synthetic_datasets`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fgtbt_jax import landmarks
from fgtbt_jax.data.synthetic import DEFAULT_SIZES
from fgtbt_jax.data.synthetic import write_synthetic_datasets


def main(argv: Sequence[str] | None = None) -> int:
  """The CLI (see the module docstring); returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.synthetic",
      description="Render synthetic WFLW, 300W, COFW and AFLW in their real file formats.")
  parser.add_argument("--out", required=True, help="folder to write the datasets into")
  parser.add_argument("--datasets", default=",".join(n.lower() for n in DEFAULT_SIZES),
                      help="comma-separated datasets (default: all four)")
  parser.add_argument("--train", type=int, default=None,
                      help="train faces per dataset (default: DEFAULT_SIZES)")
  parser.add_argument("--test", type=int, default=None,
                      help="test faces per dataset (default: DEFAULT_SIZES)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image-size", type=int, default=256)
  parser.add_argument("--workers", type=int, default=None,
                      help="rendering processes (default: the CPU count)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    names = [landmarks.get_protocol(n.strip()).name
             for n in args.datasets.split(",") if n.strip()]
    if not names:
      raise ValueError("--datasets names no dataset")
    for flag, value in (("--train", args.train), ("--test", args.test)):
      if value is not None and value < 0:
        raise ValueError(f"{flag} must be >= 0, got {value}")
    if args.image_size < 64:
      raise ValueError(f"--image-size must be at least 64, got {args.image_size}")
    sizes = {name: (DEFAULT_SIZES[name][0] if args.train is None else args.train,
                    DEFAULT_SIZES[name][1] if args.test is None else args.test)
             for name in names}
    paths = write_synthetic_datasets(args.out, sizes, seed=args.seed,
                                     image_size=args.image_size, num_workers=args.workers)
  except (OSError, ValueError) as error:
    print(f"synthetic: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1
  for name in names:
    train, test = sizes[name]
    print(f"{name}: {train} train + {test} test faces in {paths[name]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
