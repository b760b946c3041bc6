"""The 1x1 convolutions' two forms compiled alone for a device topology: HBM traffic and temporaries.

    python -m benchmarks.pointwise_probe --topology=v5e:2x2 [--batch=2] [--size=480]
    python -m benchmarks.pointwise_probe --topology=cpu:1 --batch=2 --size=64   (no libtpu)

`model.pointwise_impl` computes the network's 1x1 convolutions as an XLA
convolution ("conv") or as a matmul over channels ("dot"); on XLA:CPU the
two were within 0.97-1.03x in the whole step (benchmarks/README.md). This
compiles, for one device of `--topology` (`aot.make_target`: compile-only
TPU devices through libtpu on any host, or CPU devices), the gradient of two
parts of the paper network in both forms:

* `decoder_projection`: the decoder's 1x1 projection (768 -> 256 channels)
  on the (batch, size / 4, size / 4, 768) map, loss the sum of squares;
* `conv_stem`: stage 1's conv-stem patch embedding (BN-ReLU-1x1-BN-ReLU-
  7x7/4-BN-ReLU-1x1 to 64 channels, then LayerNorm) on (batch, size, size, 3)
  images, in training mode (batch statistics).

Each prints one JSON line: FLOPs and bytes accessed (the compiler's cost
analysis), the bytes that cross to HBM and those of on-chip memory
(`aot.traffic_summary` of the compiled HLO), XLA's temporaries, the compile
time. Parts compiled alone are not the step (the compiler fuses and lays out
a part by its neighbours there): this shows where a form can matter, the
whole step (`fgtbt aot`) decides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax import aot
from fgtbt_jax.models import layers
from fgtbt_jax.models import mit
from fgtbt_jax.models.compute import Compute

PARTS = ("decoder_projection", "conv_stem")


def _loss_and_inputs(part: str, form: str, batch: int, size: int):
  """(loss(*inputs), abstract inputs) of one part in one form, bfloat16 compute."""
  dtype = jnp.bfloat16
  if part == "decoder_projection":
    layer = layers.conv(256, 1, "decoder", dtype=dtype, use_bias=False, pointwise=form)

    def loss(x, kernel):
      out = layer.apply({"params": {"kernel": kernel}}, x)
      return jnp.sum(jnp.square(out.astype(jnp.float32)))

    return loss, (jax.ShapeDtypeStruct((batch, size // 4, size // 4, 768), dtype),
                  jax.ShapeDtypeStruct((1, 1, 768, 256), jnp.float32))
  stem = mit.OverlapPatchEmbed(64, 7, 4, kind="conv_stem",
                               compute=Compute(dtype=dtype, pointwise=form))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = nn.meta.unbox(jax.eval_shape(
      lambda x: stem.init(jax.random.key(0), x, train=False), images))

  def loss(params, batch_stats, x):
    (tokens, _), _ = stem.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
    return jnp.sum(jnp.square(tokens.astype(jnp.float32)))

  return loss, (variables["params"], variables["batch_stats"], images)


def probe(target: aot.Target, part: str, form: str, batch: int, size: int) -> dict:
  """One part's gradient in one form compiled for the target's first device."""
  loss, inputs = _loss_and_inputs(part, form, batch, size)
  mesh = jax.sharding.Mesh(np.array(target.devices[:1]), ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  inputs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        inputs)
  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs))))).lower(*inputs).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  traffic = aot.traffic_summary(compiled.as_text(), top=3)
  return {"benchmark": "pointwise_probe", "topology": target.topology, "part": part,
          "form": form, "batch": batch, "size": size, "flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "hbm_bytes": int(traffic["hbm_bytes"]), "on_chip_bytes": int(traffic["on_chip_bytes"]),
          "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
          "compile_s": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.pointwise_probe",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--topology", default="cpu:1", help="as `fgtbt aot --topology`")
  parser.add_argument("--batch", type=int, default=2, help="images per device")
  parser.add_argument("--size", type=int, default=480, help="input side, px (a multiple of 16)")
  parser.add_argument("--parts", default=",".join(PARTS))
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown or args.size % 16 or args.batch < 1:
    print(f"pointwise_probe: --parts from {PARTS}, --size a multiple of 16 and --batch >= 1 "
          f"(got {unknown or ''} {args.size} {args.batch})", file=sys.stderr)
    return 2
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")  # The host only compiles.
  target = aot.make_target(args.topology)
  for part in parts:
    for form in layers.POINTWISE_IMPLEMENTATIONS:
      print(json.dumps(probe(target, part, form, args.batch, args.size)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
