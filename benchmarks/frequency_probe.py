"""FGSA's high-pass filter in its two forms compiled alone for a device topology.

    python -m benchmarks.frequency_probe --topology=v5e:2x2 [--batch=8] [--size=480] [--fsdp=1]
    python -m benchmarks.frequency_probe --topology=cpu:8 --batch=1 --size=64 --fsdp=4   (no libtpu)

The structure image of FGSA (`fgsa.fft_high_frequency`, the paper's eq.
17-20) is a 2-D FFT, a Gaussian high-pass mask and an inverse FFT. The mask
is 1 - g_h g_w, so the same filter is also |x - L_h x L_w^T| per channel with
real circulant low-pass matrices (`deploy.onnx_export.dft_high_frequency`,
the form the ONNX export uses; equal to float32 rounding, tested there).
This compiles both, on images (batch x devices, size, size, 3) float32 split
by batch over a (data, fsdp) mesh of the topology's devices (`--fsdp` the
second axis; a batch split over both axes is what XLA:CPU's partitioner
gathers for the FFT), and prints one JSON line per form: FLOPs and bytes
accessed (the compiler's cost analysis), the bytes that cross to HBM and
those of on-chip memory (`aot.traffic_summary`), the collectives, XLA's
temporaries and the compile time. A part compiled alone is not the step:
the whole step (`fgtbt aot`) decides a default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax import aot
from fgtbt_jax.deploy import onnx_export
from fgtbt_jax.models import fgsa

FORMS = {"fft": fgsa.fft_high_frequency, "matrix": onnx_export.dft_high_frequency}
SIGMA = 20.0  # the paper config's model.frequency_sigma


def probe(target: aot.Target, form: str, batch: int, size: int, fsdp: int = 1) -> dict:
  """One form compiled on images split by batch over a (data, fsdp) mesh of the devices."""
  devices = np.array(target.devices)
  if len(devices) % fsdp:
    raise ValueError(f"frequency_probe: fsdp {fsdp} does not divide {len(devices)} devices")
  mesh = jax.sharding.Mesh(devices.reshape(-1, fsdp), ("data", "fsdp"))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  images = jax.ShapeDtypeStruct((batch * len(devices), size, size, 3), jnp.float32,
                                sharding=split)
  function = FORMS[form]
  start = time.perf_counter()
  compiled = jax.jit(lambda x: function(x, SIGMA), out_shardings=split).lower(images).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  text = compiled.as_text()
  traffic = aot.traffic_summary(text, top=3)
  return {"benchmark": "frequency_probe", "topology": target.topology, "form": form,
          "mesh": dict(mesh.shape), "batch_per_device": batch, "size": size,
          "flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "hbm_bytes": int(traffic["hbm_bytes"]), "on_chip_bytes": int(traffic["on_chip_bytes"]),
          "collectives": aot.collectives(text),
          "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
          "compile_s": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.frequency_probe",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--topology", default="cpu:1", help="as `fgtbt aot --topology`")
  parser.add_argument("--batch", type=int, default=8, help="images per device")
  parser.add_argument("--size", type=int, default=480, help="input side, px")
  parser.add_argument("--fsdp", type=int, default=1, help="devices on the mesh's second axis")
  args = parser.parse_args(argv)
  if args.batch < 1 or args.size < 2 or args.size % 2 or args.fsdp < 1:
    print(f"frequency_probe: --batch >= 1, an even --size and --fsdp >= 1 (got {args.batch} "
          f"{args.size} {args.fsdp})", file=sys.stderr)
    return 2
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")  # The host only compiles.
  chip, shape = aot.parse_topology(args.topology)
  if chip == "cpu":  # cpu:N, N simulated devices (before JAX's backends start)
    jax.config.update("jax_num_cpu_devices", int(shape))
  target = aot.make_target(args.topology)
  for form in FORMS:
    print(json.dumps(probe(target, form, args.batch, args.size, args.fsdp)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
