"""How much NME heatmap decoding alone costs: the Markdown table of docs/quantization.md.

    fgtbt decoding-error [--setting 480:240:3 ...] [--num_faces 500] [--protocol WFLW]
        [--methods ...] [--decimal_sizes 4 8] [--decimal_sigma 1.0]

The command over `fgtbt_jax.decoding_error`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fgtbt_jax import decoding_error
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks


def _parse_setting(text: str) -> tuple[int, int, float]:
  try:
    input_size, heatmap_size, sigma = text.split(":")
    return int(input_size), int(heatmap_size), float(sigma)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"setting {text!r} is not INPUT:HEATMAP:SIGMA, e.g. 480:240:3") from None


def table(argv: Sequence[str] | None = None) -> str:
  """Prints (and returns) the decoding-error table for the command line `argv`."""
  parser = argparse.ArgumentParser(
      prog="fgtbt decoding-error", description=__doc__.split("\n\n")[0])
  parser.add_argument("--setting", type=_parse_setting, action="append",
                      help="INPUT:HEATMAP:SIGMA, repeatable (default 480:240:3 and 256:64:1.5)")
  parser.add_argument("--num_faces", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--protocol", default="WFLW", choices=["WFLW", "300W", "COFW"],
                      help="protocol whose points and default normaliser are used "
                           "(not AFLW: its box normaliser needs annotated boxes)")
  parser.add_argument("--methods", nargs="+", default=list(heatmaps.DECODERS),
                      choices=list(heatmaps.DECODERS))
  parser.add_argument("--decimal_sizes", type=int, nargs="*", default=[],
                      help="also the HIH decoders on perfect d x d decimal maps, per d "
                           "(columns 'hih d=D', 'hih_subpixel d=D')")
  parser.add_argument("--decimal_sigma", type=float, default=1.0,
                      help="the decimal maps' Gaussian sigma, decimal cells")
  args = parser.parse_args(argv)
  settings = args.setting or [(480, 240, 3.0), (256, 64, 1.5)]
  methods = tuple(args.methods)
  columns = methods + tuple(f"{m} d={d}" for d in args.decimal_sizes
                            for m in heatmaps.HIH_DECODERS)
  rows = []
  for setting in settings:
    input_size, heatmap_size, sigma = setting
    faces = decoding_error.random_meanface_landmarks(args.num_faces, input_size, args.seed, args.protocol)
    for rounded in (False, True):
      result = decoding_error.decoding_error(input_size, heatmap_size, sigma, faces, args.protocol,
                              methods=methods, rounded_targets=rounded)
      for d in args.decimal_sizes:
        hih = decoding_error.decoding_error(input_size, heatmap_size, sigma, faces, args.protocol,
                             methods=heatmaps.HIH_DECODERS, rounded_targets=rounded,
                             decimal_size=d, decimal_sigma=args.decimal_sigma)
        result.update({f"{m} d={d}": v for m, v in hih.items()})
      rows.append((setting, rounded, result))
  protocol = landmarks.get_protocol(args.protocol)
  text = decoding_error.markdown_table(rows, columns, protocol.name, protocol.default_normalizer)
  print(text)
  return text


def main(argv: Sequence[str] | None = None) -> int:
  """The command: prints the table; the exit status."""
  table(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
