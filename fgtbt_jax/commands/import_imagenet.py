"""Convert PyTorch MiT / SegFormer encoder weights to FGTBT Flax params.

    fgtbt import-imagenet --input mit_b1.pth --variant b1 --patch-embed plain \\
        --output params.msgpack

writes the model's full 'params' collection (fresh seeded init where nothing
was loaded) with `flax.serialization.msgpack_serialize`; read it back with
`flax.serialization.msgpack_restore(open(path, "rb").read())`. The namings
it reads are in `fgtbt_jax.weights.imagenet`'s docstring.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import flax
import flax.linen as nn
import jax

from fgtbt_jax import models
from fgtbt_jax.weights import imagenet


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="fgtbt import-imagenet",
      description="Convert PyTorch MiT/SegFormer encoder weights to FGTBT Flax params.")
  parser.add_argument("--input", required=True, help=".pth/.pt/.bin or .safetensors")
  parser.add_argument("--output", required=True, help="output .msgpack of the params collection")
  parser.add_argument("--variant", default="paper", choices=models.VARIANTS)
  parser.add_argument("--patch-embed", default="conv_stem", choices=("conv_stem", "plain"))
  parser.add_argument("--fgsa", default=True, action=argparse.BooleanOptionalAction)
  parser.add_argument("--seed", type=int, default=0, help="init seed of non-loaded parameters")
  args = parser.parse_args(argv)
  config = models.model_config(args.variant, patch_embed=args.patch_embed, fgsa=args.fgsa)
  params, report = imagenet.mit_from_torch(imagenet.load_state_dict(args.input), config, seed=args.seed)
  pathlib.Path(args.output).write_bytes(
      flax.serialization.msgpack_serialize(jax.device_get(nn.meta.unbox(params))))
  print(report.summary())
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
