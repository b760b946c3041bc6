"""A PNG grid of augmented training samples with their landmarks drawn.

    python -m data_pipelines.visualize --data-dir ~/fgtbt_data --out grid.png \\
        [--datasets mine,300W] [--num 16] [--image-size 480] [--tile 160] \\
        [--seed 0] [--crop-config NAME]

One row per dataset (`--datasets`, default every dataset converted under
`--data-dir`: the benchmarks, then your own), `--num` samples each,
exactly as the training pipeline augments them: a quick check that crops,
rotations, flips and landmarks line up. Of each left/right pair, the point on
the image-left side of the mean face is drawn red and its partner blue;
unpaired (midline) points are green. After a flip the permuted labels must
keep red on the left and blue on the right.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

import cv2
import ml_collections
import numpy as np

from fgtbt_jax.data import config as data_config_lib
from fgtbt_jax.data import datasets as datasets_lib
from fgtbt_jax.data import pipeline
from fgtbt_jax.data import schemes
from fgtbt_jax import landmarks as lm

_LEFT_OF_PAIR = (230, 40, 40)
_RIGHT_OF_PAIR = (40, 90, 240)
_UNPAIRED = (40, 200, 40)
_LABEL_HEIGHT = 24


def _point_colours(protocol: lm.Protocol) -> np.ndarray:
  colours = np.tile(np.asarray(_UNPAIRED, np.uint8), (protocol.num_landmarks, 1))
  x = lm.mean_face()[protocol.unified_index, 0]
  for a, b in protocol.flip_pairs:
    left, right = (a, b) if x[a] < x[b] else (b, a)
    colours[left], colours[right] = _LEFT_OF_PAIR, _RIGHT_OF_PAIR
  return colours


def draw_sample(sample: dict, tile: int, protocol: lm.Protocol | None = None) -> np.ndarray:
  """One augmented sample resized to tile x tile RGB with its landmarks drawn
  (`protocol`: its dataset's; default the benchmark of its dataset id)."""
  size = sample["image"].shape[0]
  image = cv2.resize(sample["image"], (tile, tile), interpolation=cv2.INTER_AREA)
  protocol = protocol or lm.PROTOCOLS[lm.PROTOCOL_NAMES[int(sample["dataset_id"])]]
  points = lm.from_unified(sample["landmarks"], protocol)
  present = lm.from_unified(np.repeat(sample["mask"][:, None], 2, 1), protocol)[:, 0]
  # Pixel centres: x_tile = (x + 0.5) * tile / size - 0.5.
  points = (points + 0.5) * (tile / size) - 0.5
  radius = max(1, tile // 100)
  for (x, y), colour, ok in zip(points, _point_colours(protocol), present):
    if ok:
      cv2.circle(image, (int(round(x)), int(round(y))), radius,
                 tuple(int(c) for c in colour), -1, lineType=cv2.LINE_AA)
  return image


def sample_grid(config: ml_collections.ConfigDict, num: int, tile: int = 160) -> np.ndarray:
  """RGB grid: one labelled row per dataset of `num` augmented samples."""
  rows = []
  for name in config.datasets:
    samples = pipeline.augmented_samples(config, name)
    protocol = lm.get_protocol(name)
    tiles = [draw_sample(samples[i % len(samples)], tile, protocol) for i in range(num)]
    label = np.full((_LABEL_HEIGHT, tile * num, 3), 255, np.uint8)
    cv2.putText(label, name, (4, _LABEL_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                (0, 0, 0), 1, cv2.LINE_AA)
    rows.extend([label, np.concatenate(tiles, axis=1)])
  return np.concatenate(rows, axis=0)


def converted_datasets(data_dir: str) -> list[str]:
  """The datasets converted under `data_dir`: benchmarks (protocol order),
  then own datasets (by name)."""
  found = [name for name, spec in datasets_lib.DATASETS.items()
           if (pathlib.Path(data_dir) / spec.builder_name).is_dir()]
  root = pathlib.Path(data_dir)
  if root.is_dir():
    found += sorted(p.name[len(datasets_lib.OWN_BUILDER_PREFIX):] for p in root.iterdir()
                    if p.is_dir() and p.name.startswith(datasets_lib.OWN_BUILDER_PREFIX))
  return found


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.visualize",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", required=True, help="root of converted datasets")
  parser.add_argument("--out", required=True, help="PNG file to write")
  parser.add_argument("--datasets", default="",
                      help="comma-separated datasets, one row each (default: every one "
                           "converted under --data-dir)")
  parser.add_argument("--num", type=int, default=16, help="samples per dataset")
  parser.add_argument("--image-size", type=int, default=480)
  parser.add_argument("--tile", type=int, default=160, help="tile side in the grid")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--crop-config", default="")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  config = data_config_lib.data_config()
  config.data_dir = args.data_dir
  config.image_size = args.image_size
  config.seed = args.seed
  config.crop_config = args.crop_config
  try:
    names = [n.strip() for n in args.datasets.split(",") if n.strip()] or converted_datasets(
        args.data_dir)
    if not names:
      raise FileNotFoundError(f"{args.data_dir}: no converted datasets (python -m "
                              "data_pipelines.convert --out writes them)")
    config.datasets = tuple(names)
    schemes.register_own_datasets(config)
    grid = sample_grid(config, args.num, args.tile)
  except (FileNotFoundError, KeyError, ValueError) as error:
    print(f"visualize: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1
  if not cv2.imwrite(args.out, grid[..., ::-1]):
    print(f"visualize: error: could not write {args.out}", file=sys.stderr)
    return 1
  print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
