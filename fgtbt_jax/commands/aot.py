"""Ahead-of-time compilation for a device topology: per-chip memory, cost and a roofline.

    fgtbt aot --config=configs/fgtbt_paper.py --topology=v5e:2x2 \\
        --config.model.dtype=bfloat16 [--config.data.samples_per_dataset=8] \\
        [--num_slices=2] [--hbm_gib=16] [--nopredict] [--json=aot.json] [--hlo_dir=DIR]

    fgtbt aot --config=configs/tiny.py --topology=cpu:8

The command over `fgtbt_jax.aot` (what it compiles and prints is in its
docstring). Exit status: 0 done; 1 a program does not fit ("does not fit:
needs X GiB of Y GiB per chip"); 2 a bad flag or config.

Large programs can overflow the compiler's stack: run big compiles under
`ulimit -s 524288` (the v5p and v6e compiles of benchmarks/README.md, "Other
chips", needed it). The paper step at 8 images per v6e chip crashes libtpu
0.0.42.1 even so (SIGSEGV, a stack overflow in one of its compiler threads,
after 55 min): a libtpu bug; 2 per chip compiles.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import flags
import jax
from ml_collections import config_flags

from fgtbt_jax import aot


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """The command's flags for the command line `argv`, in a `FlagValues` of their own.

  `config_flags` finds the --config.* overrides in the command line it is
  given (by default sys.argv), so `main` can be called with any `argv`.
  """
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", "configs/default.py", "Experiment config file; --config.x=y overrides fields.",
      flag_values=values, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string(
      "topology", "cpu:8", "Devices to compile for: v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB "
      "(compile-only TPU devices; needs libtpu) or cpu:N (N simulated CPU devices).",
      flag_values=values)
  flags.DEFINE_integer("num_slices", 1, "Slices of the TPU topology.", flag_values=values)
  flags.DEFINE_float(
      "hbm_gib", None, "Memory per device to check against, GiB (default: the chip's HBM; "
      "none for cpu).", flag_values=values)
  flags.DEFINE_bool("predict", True, "Also compile the predict function.", flag_values=values)
  flags.DEFINE_string("json", None, "Write the figures to this JSON file.", flag_values=values)
  flags.DEFINE_string("hlo_dir", None, "Write each compiled program's HLO text into this "
                      "folder (<program>.hlo.txt).", flag_values=values)
  return values


def main(argv: Sequence[str] | None = None, configure_host: bool = True) -> int:
  """Parses the flags `argv` (default sys.argv[1:]), compiles, prints; the exit status.

  `configure_host`: this is the command's own process, so make its JAX
  backend the CPU (the host only traces and compiles) with as many devices as
  a cpu:N topology asks for; a caller's process (a test) passes False and
  keeps its devices.
  """
  argv = ["fgtbt aot", *(sys.argv[1:] if argv is None else argv)]
  values = define_flags(argv)
  try:
    values(list(argv))
  except flags.Error as error:
    print(f"fgtbt aot: {error}", file=sys.stderr)
    return 2
  config_file = config_flags.get_config_filename(values["config"])
  try:
    if configure_host:
      chip_name, shape = aot.parse_topology(values.topology)
      _configure_host(int(shape) if chip_name == "cpu" else None)
    target = aot.make_target(values.topology, values.num_slices, values.hbm_gib)
    report = aot.compile_report(values.config, target, values.predict, values.hlo_dir)
  except aot.ConfigError as error:
    print(f"fgtbt aot: {error}", file=sys.stderr)
    return 2
  except aot.DoesNotFit as error:
    print(str(error), file=sys.stderr)
    _write_json(values.json, {"config": config_file, "topology": values.topology,
                              "fits": False, "program": error.program, **error.figures})
    return 1
  report["config"] = config_file
  print(aot.format_report(report), flush=True)
  _write_json(values.json, report)
  return 0


def _configure_host(cpu_devices: int | None) -> None:
  """The host backend: CPU unless JAX_PLATFORMS says otherwise, with `cpu_devices` devices.

  Before JAX's backends start (the command's first JAX work comes after).
  """
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  if cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", cpu_devices)


def _write_json(path: str | None, record: dict) -> None:
  """Writes `record` to `path` (--json), when given."""
  if path:
    with open(path, "w") as f:
      json.dump(record, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  sys.exit(main())
