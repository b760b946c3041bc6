"""Ahead-of-time compilation for a device topology: per-chip memory, cost and a roofline.

    fgtbt aot --config=configs/fgtbt_paper.py --topology=v5e:2x2 \\
        --config.model.dtype=bfloat16 [--config.data.samples_per_dataset=8] \\
        [--num_slices=2] [--hbm_gib=16] [--nopredict] [--json=aot.json] [--hlo_dir=DIR]

    fgtbt aot --config=configs/tiny.py --topology=cpu:8

Compiles the run's own programs for the devices it will train on, on any
machine and without them: the train step (`state.build_setup` +
`train.make_train_step`, lowered on abstract `jax.ShapeDtypeStruct` state and
batch; no weights are made, nothing runs) and the predict function
(`inference.compile_predict_fn`, on the config's eval batch). `--topology`
names the target:

* `v4:AxBxC`, `v5e:AxB`, `v5p:AxBxC`, `v6e:AxB` (and `--num_slices` of them):
  compile-only TPU devices from `jax.experimental.topologies`, compiled by
  libtpu's own compiler on this host (needs `pip install libtpu`, the
  version `jax[tpu]` pins for the installed jax; libtpu lets one process
  load it at a time, ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets the tool compile
  beside another; XLA's persistent cache cannot serve these programs, so
  every run compiles: minutes for the paper network);
* `cpu:N`: N simulated CPU devices (XLA:CPU), which needs nothing more and
  is what the tests run.

The mesh is the config's `mesh.data` x `mesh.fsdp` over the topology's
devices, the global batch the config's (`data.samples_per_dataset` x the
number of datasets). The model's "auto" choices (`remat_policy`,
`depthwise_impl`) resolve for the target devices' platform, as they do when
the run traces on them (`models.partitioning.target_platform`).

For each program it prints, per chip (per device on v4, whose compile-only
description has one device per TensorCore, two per chip):

* memory: XLA's memory analysis of one device's program: arguments,
  temporaries, outputs (less what the outputs alias: the donated state) and
  their total against the chip's HBM (`CHIPS`, or `--hbm_gib`);
* cost: FLOPs and bytes accessed from the compiler's cost analysis (its own
  count of memory traffic, which on TPU includes the memory-space
  assignment's prefetches into on-chip memory);
* collectives: each kind in the compiled HLO (all-reduce, all-gather, ...),
  how many it has and their payload bytes (the bytes of each one's result on
  one device, async pairs counted once; a collective inside a loop body is
  counted once);
* roofline: step time = max(FLOPs / peak, bytes / HBM bandwidth), with the
  FLOPs utilisation and images/s per chip that it implies. Two MFUs: on the
  compiler's FLOP count (recomputed FLOPs count too: the hardware's
  utilisation) and on the model's own FLOPs (6 per multiply-add of
  `models.count_macs` for the train step, 2 for predict, twice with the
  flip test), which compares remat policies as images/s does. A bound, not
  a measurement: it takes compute and memory traffic to overlap fully and
  leaves the collectives' time out;
* traffic: the compiled program's memory traffic instruction by instruction
  (`instruction_traffic`), split by memory space: on TPU the compiler's
  "bytes accessed" also counts the on-chip vector memory that the
  memory-space assignment prefetches values into, so the bytes that cross
  to HBM are a fraction of it (about a fifth for the paper step,
  benchmarks/README.md); the roofline on HBM bytes, and the network parts
  that move the most (`module_of`: forward / backward, stage, block, layer).

A program that does not fit ends the command with one line, "does not fit:
needs X GiB of Y GiB per chip", the largest values of the compiled program
(or the compiler's own out-of-memory report) and exit status 1. `--json`
writes every figure for scripts. Exit status 2: a bad flag or config (one
line on stderr naming it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from fgtbt_jax import inference
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax import state as state_lib
from fgtbt_jax import train
from fgtbt_jax import validation
from fgtbt_jax.errors import ConfigError
from fgtbt_jax.models import mit

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of an accelerator, for the roofline and the memory limit."""

  device_kind: str         # `device.device_kind` of its compile-only devices
  peak_bf16_tflops: float  # dense bfloat16 matmul peak, TFLOP/s
  hbm_gib: float           # HBM capacity
  hbm_gb_per_s: float      # HBM bandwidth, 1e9 bytes/s


# Public source: the Google Cloud TPU documentation (cloud.google.com/tpu/docs),
# the system architecture tables of its pages "TPU v4", "TPU v5e", "TPU v5p"
# and "TPU v6e": peak bf16 compute per chip, HBM capacity and bandwidth. The
# pages write the capacity as "32 GiB" (v4) and "16 GB", "95 GB", "32 GB"
# (v5e, v5p, v6e), taken here as GiB; the compiler keeps part of it for
# itself (v5e's compile-only devices offer a program 15.75 GiB), so a program
# near the limit is settled by the TPU compiler's own out-of-memory error.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275.0, 32.0, 1200.0),
    "v5e": Chip("TPU v5 lite", 197.0, 16.0, 819.0),
    "v5p": Chip("TPU v5", 459.0, 95.0, 2765.0),
    "v6e": Chip("TPU v6 lite", 918.0, 32.0, 1638.0),
}

# The collectives of an HLO module, by opcode; "-done" closes an async "-start".
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all")
_COLLECTIVE_LINE = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-done)?\(")
_ARRAY = re.compile(r"\b(pred|token|[a-z]+\d+(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
# "%fused_computation.12 (param_0: f32[8]) -> f32[8] {" or "ENTRY %main.5 (...) -> ... {"
_COMPUTATION_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_VIEWS = ("parameter", "get-tuple-element", "tuple", "bitcast")
_TPU_OUT_OF_MEMORY = re.compile(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


class DoesNotFit(Exception):
  """A program needs more memory per chip than the chip has.

  `str(error)` is the verdict line and what is known of the largest values;
  `program` names the program, `figures` holds what was measured of it.
  """

  def __init__(self, message: str, program: str, figures: dict):
    super().__init__(message)
    self.program = program
    self.figures = figures


# -----------------------------------------------------------------------------
# The target: topology, devices, mesh.


@dataclasses.dataclass
class Target:
  """The devices compiled for.

  Attributes:
    topology: the --topology value.
    chip_name: a key of `CHIPS`, or "cpu".
    devices: the devices, compile-only for TPU topologies.
    devices_per_chip: 2 on v4 (one device per TensorCore), else 1.
    chip: the chip's figures (None for cpu).
    hbm_bytes: the memory limit per device (None: no limit known).
  """

  topology: str
  chip_name: str
  devices: list
  devices_per_chip: int
  chip: Chip | None
  hbm_bytes: float | None

  @property
  def unit(self) -> str:
    """What one device's figures are: a chip, or a v4 TensorCore."""
    return "chip" if self.devices_per_chip == 1 else "device"

  @property
  def process_count(self) -> int:
    """Hosts of the target (each feeds its own devices)."""
    return len({d.process_index for d in self.devices})


def parse_topology(topology: str) -> tuple[str, str]:
  """("v5e", "2x2") of "v5e:2x2"; ("cpu", "8") of "cpu:8".

  Raises:
    ConfigError: not CHIP:SHAPE with a chip of `CHIPS` or cpu.
  """
  match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", topology.strip())
  known = (*CHIPS, "cpu")
  if match is None or match.group(1) not in known:
    raise ConfigError(
        f"--topology={topology!r}: expected CHIP:SHAPE with CHIP one of {known}, e.g. "
        "v5e:2x2, v5p:2x2x1, v6e:16x16, v4:2x2x1, or cpu:N for N simulated CPU devices")
  if match.group(1) == "cpu" and "x" in match.group(2):
    raise ConfigError(f"--topology={topology!r}: cpu takes a device count, e.g. cpu:8")
  return match.group(1), match.group(2)


def _cpu_devices(count: int) -> list:
  """The first `count` of this process's CPU devices (`main` asks for as many)."""
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise ConfigError(
        f"--topology=cpu:{count}: this process has {len(devices)} CPU devices; start it with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
  return devices[:count]


def _tpu_devices(topology: str, num_slices: int) -> list:
  """The compile-only devices of a TPU topology (libtpu's description of it)."""
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, num_slices=num_slices)
  except RuntimeError as error:  # JaxRuntimeError too: libtpu's own refusals.
    message = " ".join(str(error).split())
    if "TPU support not installed" in message:
      message = (f"compiles with libtpu, which is not installed: pip install libtpu (the "
                 f"version jax[tpu]=={jax.__version__} pins), or use --topology=cpu:N")
    elif "lockfile" in message:
      message = (f"libtpu is in use by another process (one at a time, by its lockfile; "
                 f"{message}): wait for it, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile "
                 "beside it")
    raise ConfigError(f"--topology={topology}: {message}") from error
  return list(description.devices)


def make_target(topology: str, num_slices: int = 1, hbm_gib: float | None = None) -> Target:
  """The devices of `topology` (`num_slices` slices of it) and their limits."""
  chip_name, shape = parse_topology(topology)
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices}: must be at least 1")
  if hbm_gib is not None and not hbm_gib > 0:
    raise ConfigError(f"--hbm_gib={hbm_gib}: must be positive")
  if chip_name == "cpu":
    if num_slices != 1:
      raise ConfigError(f"--num_slices={num_slices} applies to TPU topologies, not {topology}")
    devices = _cpu_devices(int(shape))
    chip, per_chip = None, 1
  else:
    devices = _tpu_devices(topology, num_slices)
    chip = CHIPS[chip_name]
    if devices[0].device_kind != chip.device_kind:
      # The figures of `CHIPS` would be another chip's.
      raise ConfigError(f"--topology={topology}: libtpu describes its devices as "
                        f"{devices[0].device_kind!r}, not {chip.device_kind!r} as CHIPS expects")
    per_chip = len(devices) // len({(getattr(d, "slice_index", 0), tuple(d.coords))
                                    for d in devices})
  if hbm_gib is not None:
    hbm = hbm_gib * GIB
  elif chip is not None:
    hbm = chip.hbm_gib * GIB / per_chip
  else:
    hbm = None
  return Target(topology, chip_name, devices, per_chip, chip, hbm)


def target_config(config: ml_collections.ConfigDict, target: Target,
                  predict: bool = True) -> ml_collections.ConfigDict:
  """A copy of `config` checked for the target's devices and hosts.

  `validation.validate_config` with the target's device and process counts
  (the batch divides by the devices, the mesh covers them, ...); the data
  directory is not read, so an empty one is allowed. Without `predict` the
  eval batch is not compiled: the copy's is set to one crop per device, so
  a config's eval batch need not divide by a pod's devices.

  Raises:
    ConfigError: naming the config field.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.data.data_dir:
    config.data.data_dir = "(none: not read by fgtbt_jax.aot)"
  if not predict:
    config.data.eval_batch_size = len(target.devices)
  validation.validate_config(config, num_devices=len(target.devices),
                             process_count=target.process_count)
  return config


# -----------------------------------------------------------------------------
# The programs, lowered on abstract inputs.


def jitted_function(compiled_per_shape: sharding.CompiledPerShape):
  """The `jax.jit` function inside a `sharding.CompiledPerShape`.

  `train.make_train_step` and `inference.compile_predict_fn` return the jitted
  program wrapped so that it compiles on its first call with each input
  shape; lowering it ahead of time (here, and in the benchmarks' memory and
  cost figures of the very program that runs) needs the jitted function it
  keeps as `_jitted`.
  """
  jitted = getattr(compiled_per_shape, "_jitted", None)
  if jitted is None or not hasattr(jitted, "lower"):
    raise RuntimeError(f"{type(compiled_per_shape).__name__} holds no jitted function "
                       "'_jitted' to lower")
  return jitted


def lower_train_step(setup: state_lib.Setup) -> jax.stages.Lowered:
  """The run's train step lowered on its abstract state and an abstract global batch."""
  config = setup.config
  step = train.make_train_step(setup, state_lib.ema_decay_per_step(config))
  batch = train.abstract_batch(config, sharding.batch_sharding(setup.mesh))
  with sharding.mesh_and_rules(setup.mesh, setup.rules):
    return jitted_function(step).lower(setup.abstract_state, batch)


def lower_predict(setup: state_lib.Setup) -> jax.stages.Lowered:
  """The run's predict function (its eval settings) on an abstract eval batch of crops."""
  config = setup.config
  settings = inference.PredictSettings.from_config(config.eval)
  predict = inference.compile_predict_fn(setup.model, setup.mesh, setup.rules, settings)
  variables = inference.abstract_variables(config.model, config.data.image_size, setup.mesh,
                                           setup.rules)
  size = int(config.data.image_size)
  crops = jax.ShapeDtypeStruct((int(config.data.eval_batch_size), size, size, 3), jnp.uint8,
                               sharding=sharding.batch_sharding(setup.mesh))
  with sharding.mesh_and_rules(setup.mesh, setup.rules):
    return jitted_function(predict).lower(variables, crops)


# -----------------------------------------------------------------------------
# Figures of a compiled program.


def memory_figures(analysis) -> dict:
  """XLA's memory analysis of one device's program, in bytes, with the total it holds.

  total = arguments + outputs + temporaries - aliased (outputs written into
  donated arguments are counted once).
  """
  figures = {name: int(getattr(analysis, f"{name}_size_in_bytes"))
             for name in ("argument", "output", "alias", "temp", "generated_code")}
  figures["total"] = (figures["argument"] + figures["output"] + figures["temp"]
                      - figures["alias"])
  return figures


def cost_figures(compiled: jax.stages.Compiled) -> dict:
  """FLOPs, bytes accessed and transcendentals of one device's program (compiler's count)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per module.
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
          "transcendentals": float(analysis.get("transcendentals", 0.0))}


def array_bytes(shape_text: str) -> int:
  """Bytes of the arrays in an HLO shape ("f32[8,64]{1,0}", or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype == "token":
      continue
    bits = 1 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
    count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += count * max(bits, 8) // 8
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "payload_bytes"}} of the collectives in an HLO module's text.

  A synchronous collective counts by its result; an asynchronous one by its
  "-done" (whose result is the collective's, where the "-start" holds
  operands and buffers too). Payload: the bytes of the results on one device.
  """
  found: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE_LINE.match(line)
    if match is None:
      continue
    shape, kind, _ = match.groups()
    entry = found.setdefault(kind, {"count": 0, "payload_bytes": 0})
    entry["count"] += 1
    entry["payload_bytes"] += array_bytes(shape)
  return dict(sorted(found.items()))


def largest_values(hlo_text: str, top: int = 5) -> list[dict]:
  """The `top` largest results of an HLO module's buffer-making instructions.

  Instructions of the entry computation and of what it calls (loop bodies,
  ...), not of fusions' inner computations or reducers (their values never
  reach memory as buffers, `_buffer_instructions`); views of other buffers
  (bitcasts, tuple elements) and tuples left out. Not all of them are live
  at once.
  """
  sizes = []
  for _, result, opcode, _ in _buffer_instructions(hlo_text.splitlines()):
    if opcode in _VIEWS or result.startswith("("):
      continue
    sizes.append((array_bytes(result), re.sub(r"\{[^}]*\}", "", result), opcode))
  sizes.sort(reverse=True)
  return [{"bytes": b, "shape": shape, "op": op} for b, shape, op in sizes[:top]]


# One operand or result array with its layout: "bf16[8,120,120,64]{3,2,1,0:T(8,128)(2,1)S(1)}".
_ARRAY_WITH_LAYOUT = re.compile(
    r"\b(pred|[a-z]+\d+(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?")
# "  %name = bf16[8,64]{1,0:T(8,128)} opcode(..." with the result's text (a tuple may have spaces).
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Instructions that make no traffic of their own (views, bookkeeping, async
# halves whose partner is counted, control flow whose bodies are walked).
_NO_TRAFFIC = frozenset((
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
    "while", "conditional", "call", "opt-barrier", "partition-id", "replica-id",
    "copy-done", "slice-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
    "send-done", "recv-done", "async-done", "async-update"))


def _array_bytes_by_space(text: str) -> tuple[int, int]:
  """(bytes in HBM, bytes in other memory spaces) of the arrays written in `text`.

  A TPU layout names its memory space with "S(n)"; none (or S(0)) is HBM,
  S(1) the on-chip vector memory the memory-space assignment prefetches into.
  """
  hbm = other = 0
  for dtype, dims, layout in _ARRAY_WITH_LAYOUT.findall(text):
    bits = 1 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
    count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    size = count * max(bits, 8) // 8
    space = re.search(r"S\((\d+)\)", layout or "")
    if space and space.group(1) != "0":
      other += size
    else:
      hbm += size
  return hbm, other


def instruction_traffic(hlo_text: str) -> list[dict]:
  """Per buffer-level instruction of a compiled HLO module: the bytes it moves, by memory.

  Walks the entry computation and what it runs (loop bodies, branches,
  calls), not fusions' inner computations or reducers. A fusion, copy,
  convolution or custom call reads its operands and writes its result once:
  its bytes are those of its operands and result, split by where they live
  (TPU layouts name the memory space: none or S(0) is HBM, S(1) the on-chip
  vector memory), `hbm_bytes` and `on_chip_bytes`. An asynchronous copy or
  slice ("copy-start", "slice-start": the memory-space assignment's
  prefetches into on-chip memory and evictions out of it) moves its
  destination's bytes across the HBM boundary: counted once, as HBM, and its
  "-done" as nothing. On a backend with one memory space (CPU) every byte is
  `hbm_bytes`, and their sum is the compiler's "bytes accessed".

  `source` is the JAX op name of the instruction's metadata (the Flax module
  path and primitive); an instruction without one (the prefetches) takes
  that of the first instruction that uses its value.
  """
  lines = hlo_text.splitlines()
  results: dict[str, str] = {}
  sources: dict[str, str] = {}
  users: dict[str, list[str]] = {}
  for line in lines:
    match = _DEFINITION.match(line)
    if match:
      name, rest = match.group(1), match.group(4)
      results[name] = match.group(2)
      source = _OP_NAME.search(rest)
      if source:
        sources[name] = source.group(1)
      for operand in re.findall(r"%([\w.\-]+)", rest[:_operands_end(rest)]):
        users.setdefault(operand, []).append(name)

  def source_of(name: str) -> str:
    for _ in range(16):
      if name in sources:
        return sources[name]
      following = users.get(name)
      if not following:
        return ""
      name = following[0]
    return sources.get(name, "")

  rows = []
  for name, result, opcode, rest in _buffer_instructions(lines):
    if opcode in _NO_TRAFFIC:
      continue
    if opcode in ("copy-start", "slice-start"):
      # (source, destination, context): the destination's bytes cross once.
      parts = _ARRAY_WITH_LAYOUT.findall(result)
      moved = _array_bytes_by_space("%s[%s]" % parts[1][:2]) if len(parts) > 1 else (0, 0)
      hbm, other = sum(moved), 0
    else:
      end = _operands_end(rest)
      operands = " ".join(results.get(operand, "")
                          for operand in re.findall(r"%([\w.\-]+)", rest[:end]))
      operand_hbm, operand_other = _array_bytes_by_space(operands)
      result_hbm, result_other = _array_bytes_by_space(result)
      hbm, other = operand_hbm + result_hbm, operand_other + result_other
    kind = re.search(r"kind=(\w+)", rest)
    rows.append({
        "name": name, "opcode": opcode, "kind": kind.group(1) if kind else "",
        "result": re.sub(r"\{[^}]*\}", "", result),
        "hbm_bytes": hbm, "on_chip_bytes": other, "source": source_of(name)})
  return rows


def module_of(source: str) -> str:
  """The network part an instruction's JAX op name belongs to, for grouping traffic.

  "forward encoder/stage_0/patch_embed", "backward decoder/heatmap",
  "backward encoder/stage_2/block_*" (blocks of a stage together), or
  "outside the network" (the optimizer, EMA, loss, ...); "unknown" without
  an op name.
  """
  if not source:
    return "unknown"
  direction = "backward" if "transpose(" in source else "forward"
  match = re.search(r"FGTBT\.named_outputs\)*/(encoder/[^/]+/[^/]+|decoder/[^/]+|[^/]+)", source)
  if match is None:
    return "outside the network"
  name = re.sub(r"block_\d+", "block_*", match.group(1))
  return f"{direction} {name}"


def traffic_summary(hlo_text: str, top: int = 10) -> dict:
  """Where a compiled program's memory traffic goes (`instruction_traffic`), summed and ranked.

  `hbm_bytes` / `on_chip_bytes`: the module's totals; `top_instructions`:
  the `top` instructions by HBM bytes; `by_module`: HBM bytes per
  `module_of` group, the `top` largest.
  """
  rows = instruction_traffic(hlo_text)
  modules: dict[str, int] = {}
  for row in rows:
    key = module_of(row["source"])
    modules[key] = modules.get(key, 0) + row["hbm_bytes"]
  ranked = sorted(rows, key=lambda r: -r["hbm_bytes"])[:top]
  return {
      "hbm_bytes": sum(r["hbm_bytes"] for r in rows),
      "on_chip_bytes": sum(r["on_chip_bytes"] for r in rows),
      "instructions": len(rows),
      "top_instructions": [{k: r[k] for k in ("name", "opcode", "result", "hbm_bytes", "source")}
                           for r in ranked],
      "by_module": [{"module": k, "hbm_bytes": v}
                    for k, v in sorted(modules.items(), key=lambda kv: -kv[1])[:top]],
  }


def _buffer_instructions(lines: list[str]):
  """(name, result text, opcode, text after "opcode(") of the instructions whose values are buffers.

  Those of the entry computation and of what it runs (loop bodies, branches,
  calls); the instructions of fusions' inner computations and of reducers
  (`calls=` of a fusion, `to_apply=`) make values that never reach memory.
  """
  inner: set[str] = set()
  for line in lines:
    if " fusion(" in line or "to_apply=" in line:
      inner.update(re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line))
  skip = False
  for line in lines:
    header = _COMPUTATION_HEADER.match(line)
    if header:
      skip = header.group(1) in inner
      continue
    match = _DEFINITION.match(line)
    if not skip and match is not None:
      yield match.groups()


def _operands_end(rest: str) -> int:
  """Where the operand list of an instruction's text after "opcode(" ends."""
  depth = 1
  for i, char in enumerate(rest):
    if char in "({":
      depth += 1
    elif char in ")}":
      depth -= 1
      if depth == 0:
        return i
  return len(rest)


def roofline(flops: float, bytes_accessed: float, chip: Chip, devices_per_chip: int,
             images_per_device: float, model_flops_per_image: float | None = None) -> dict:
  """Step time bound max(FLOPs / peak, bytes / bandwidth) of one device's program.

  A device gets 1 / devices_per_chip of its chip's peak and bandwidth. MFU
  is the compute time's share of the bound (the utilisation if the step ran
  at the bound), on the compiler's FLOPs: recomputation counts.
  `model_mfu` (with `model_flops_per_image`) is the same on the model's own
  FLOPs, which no remat policy changes: the work the chip would do at the
  bound, as a share of its peak. images/s per chip = images per device x
  devices per chip / the bound.
  """
  peak = chip.peak_bf16_tflops * 1e12 / devices_per_chip
  bandwidth = chip.hbm_gb_per_s * 1e9 / devices_per_chip
  compute_s, memory_s = flops / peak, bytes_accessed / bandwidth
  step_s = max(compute_s, memory_s)
  return {
      "compute_s": compute_s,
      "memory_s": memory_s,
      "step_s": step_s,
      "bound": "compute" if compute_s >= memory_s else "memory",
      "arithmetic_intensity": flops / bytes_accessed if bytes_accessed else math.inf,
      "ridge_flops_per_byte": peak / bandwidth,
      "mfu": compute_s / step_s if step_s else 0.0,
      "images_per_s_per_chip": (images_per_device * devices_per_chip / step_s
                                if step_s else math.inf),
      **({"model_mfu": (model_flops_per_image * images_per_device / peak / step_s
                        if step_s else 0.0)} if model_flops_per_image is not None else {}),
  }


def model_flops_per_image(config: ml_collections.ConfigDict, program: str, macs: int) -> float:
  """The model's FLOPs per image of a program, from its multiply-adds per image.

  `macs`: `models.count_macs(config.model)["total"]` (traced once per run).

  The train step runs the forward pass and a backward pass of twice its
  multiply-adds (gradients of the activations and of the weights): 6 FLOPs
  per multiply-add. Predict runs the forward pass, twice with the flip test.
  Attention's activation products are counted; interpolation, normalisation
  and the FFT are not (`models.cost`), nor anything a remat policy recomputes.
  """
  if program == "train_step":
    return 6.0 * macs
  flips = 2 if inference.PredictSettings.from_config(config.eval).flip_test else 1
  return 2.0 * macs * flips


def out_of_memory_needs(message: str) -> tuple[float, float] | None:
  """(needed GiB, available GiB) of the TPU compiler's out-of-memory error, if it says."""
  match = _TPU_OUT_OF_MEMORY.search(message)
  return (float(match.group(1)), float(match.group(2))) if match else None


def compile_program(name: str, lower: Callable[[], jax.stages.Lowered], target: Target,
                    images_per_device: float, hlo_dir: str | None = None,
                    model_flops_per_image: float | None = None) -> dict:
  """Lowers and compiles one program; its figures (see the module docstring).

  `model_flops_per_image` adds the model-FLOPs MFU to the rooflines.

  Raises:
    DoesNotFit: the compiler ran out of the device's memory, or the program
      needs more than `target.hbm_bytes`; the message is the one-line
      verdict followed by the largest values or the compiler's report.
  """
  start = time.perf_counter()
  lowered = lower()
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    needs = out_of_memory_needs(str(error))
    verdict = (f"needs {needs[0]:.2f} GiB of {needs[1]:.2f} GiB per {target.unit}" if needs
               else f"the compiler ran out of memory per {target.unit}")
    figures = {"fits": False, "compiler_error": " ".join(str(error).split())}
    if needs:
      figures.update(needs_gib=needs[0], available_gib=needs[1])
    raise DoesNotFit(f"{name} does not fit: {verdict}\n  {figures['compiler_error']}",
                     name, figures) from None
  record = {"lower_s": round(lower_s, 2), "compile_s": round(time.perf_counter() - start, 2),
            "memory_bytes": memory_figures(compiled.memory_analysis()),
            "cost": cost_figures(compiled)}
  text = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
      f.write(text)
  record["collectives"] = collectives(text)
  record["traffic"] = traffic_summary(text)
  if target.chip is not None:
    record["roofline"] = roofline(record["cost"]["flops"], record["cost"]["bytes_accessed"],
                                  target.chip, target.devices_per_chip, images_per_device,
                                  model_flops_per_image)
    record["roofline_hbm"] = roofline(record["cost"]["flops"], record["traffic"]["hbm_bytes"],
                                      target.chip, target.devices_per_chip, images_per_device,
                                      model_flops_per_image)
  total = record["memory_bytes"]["total"]
  record["fits"] = target.hbm_bytes is None or total <= target.hbm_bytes
  if not record["fits"]:
    largest = "\n".join(f"  {v['bytes'] / GIB:8.3f} GiB  {v['shape']}  ({v['op']})"
                        for v in largest_values(text))
    raise DoesNotFit(
        f"{name} does not fit: needs {total / GIB:.2f} GiB of {target.hbm_bytes / GIB:.2f} GiB "
        f"per {target.unit}\n  largest values of the compiled program:\n{largest}",
        name, record)
  return record


def resolved_choices(model_config: ml_collections.ConfigDict, platform: str) -> dict:
  """The model's "auto" settings as the target platform resolves them."""
  return {
      "remat_policy": models.resolve_remat_policy(model_config.remat_policy, platform),
      "depthwise_impl": mit.resolve_depthwise_impl(model_config.depthwise_impl, platform),
  }


def compile_report(config: ml_collections.ConfigDict, target: Target,
                   predict: bool = True, hlo_dir: str | None = None) -> dict:
  """Compiles the train step (and the predict function) of `config` for `target`.

  Returns every figure (the --json record). Raises DoesNotFit as
  `compile_program` does, ConfigError for a config the target cannot run.
  """
  config = target_config(config, target, predict)
  mesh = sharding.make_mesh(config.mesh, target.devices)
  setup = state_lib.build_setup(config, mesh)
  devices = len(target.devices)
  platform = target.devices[0].platform
  batch = int(config.data.samples_per_dataset) * len(config.data.datasets)
  report = {
      "topology": target.topology,
      "devices": devices,
      "devices_per_chip": target.devices_per_chip,
      "device_kind": target.devices[0].device_kind,
      "platform": platform,
      "processes": target.process_count,
      "mesh": dict(mesh.shape),
      "hbm_bytes_per_device": target.hbm_bytes,
      "chip": dataclasses.asdict(target.chip) if target.chip else None,
      "jax": jax.__version__,
      "libtpu": _libtpu_version() if platform == "tpu" else None,
      "dtype": config.model.dtype,
      "input_size": int(config.model.input_size),
      "resolved": resolved_choices(config.model, platform),
      "programs": {},
  }
  programs = {"train_step": (lambda: lower_train_step(setup), batch)}
  if predict:
    programs["predict"] = (lambda: lower_predict(setup), int(config.data.eval_batch_size))
  macs = models.count_macs(config.model)["total"]
  with _persistent_cache(enabled=platform != "tpu"):
    for name, (lower, images) in programs.items():
      flops = model_flops_per_image(config, name, macs)
      record = compile_program(name, lower, target, images / devices, hlo_dir, flops)
      record["global_batch"] = images
      record["model_flops_per_image"] = flops
      report["programs"][name] = record
  return report


@contextlib.contextmanager
def _persistent_cache(enabled: bool):
  """Within: JAX's persistent compilation cache on as configured, or off.

  Off for compile-only TPU devices: their executables are written to the
  cache but cannot be read back without a TPU client (libtpu 0.0.42.1:
  "PjRtCompiler must be constructed with a Client"), so every entry would be
  a wasted write and a warning on the next run.
  """
  configured = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", configured and enabled)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", configured)


def _libtpu_version() -> str | None:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


# -----------------------------------------------------------------------------
# The command.


def _gib(value: float) -> str:
  return f"{value / GIB:.3f} GiB"


def _model_mfu(bound: dict) -> str:
  return f" ({bound['model_mfu']:.1%} on the model's FLOPs)" if "model_mfu" in bound else ""


def format_report(report: dict) -> str:
  """The human-readable summary of `compile_report`'s figures."""
  unit = "chip" if report["devices_per_chip"] == 1 else "device"
  resolved = ", ".join(f"{k} {v}" for k, v in report["resolved"].items())
  lines = [f"{report['topology']}: {report['devices']} x {report['device_kind']}"
           + (f" ({report['devices_per_chip']} per chip)" if unit == "device" else "")
           + f", mesh {report['mesh']}, {report['dtype']} at {report['input_size']} px, "
           f"{resolved}; jax {report['jax']}"
           + (f", libtpu {report['libtpu']}" if report["libtpu"] else "")]
  hbm = report["hbm_bytes_per_device"]
  for name, record in report["programs"].items():
    memory, cost = record["memory_bytes"], record["cost"]
    per_device = record["global_batch"] / report["devices"]
    lines.append(f"{name}: global batch {record['global_batch']} ({per_device:g} per device), "
                 f"compiled in {record['compile_s']:.1f} s (lowered in {record['lower_s']:.1f} s)")
    limit = f" of {_gib(hbm)} ({memory['total'] / hbm:.0%})" if hbm else ""
    lines.append(f"  memory per {unit}: arguments {_gib(memory['argument'])}, temporaries "
                 f"{_gib(memory['temp'])}, outputs {_gib(memory['output'])} (aliased "
                 f"{_gib(memory['alias'])}), total {_gib(memory['total'])}{limit}")
    lines.append(f"  cost per {unit}: {cost['flops']:.3g} FLOP ({cost['flops'] / per_device:.3g} "
                 f"per image; the model's own {record['model_flops_per_image']:.3g}), "
                 f"{cost['bytes_accessed']:.3g} bytes accessed, "
                 f"{cost['transcendentals']:.3g} transcendentals")
    found = record["collectives"]
    lines.append("  collectives: " + (", ".join(
        f"{kind} x{c['count']} ({c['payload_bytes'] / 2 ** 20:.2f} MiB)"
        for kind, c in found.items()) or "none"))
    bound = record.get("roofline")
    if bound:
      lines.append(
          f"  roofline: compute {bound['compute_s'] * 1e3:.2f} ms, memory "
          f"{bound['memory_s'] * 1e3:.2f} ms -> {bound['step_s'] * 1e3:.2f} ms "
          f"({bound['bound']}-bound; {bound['arithmetic_intensity']:.1f} FLOP/byte, ridge "
          f"{bound['ridge_flops_per_byte']:.0f}): MFU {bound['mfu']:.1%}"
          f"{_model_mfu(bound)}, {bound['images_per_s_per_chip']:.1f} images/s per chip")
    traffic = record["traffic"]
    lines.append(f"  traffic by memory space: {traffic['hbm_bytes']:.3g} bytes in HBM, "
                 f"{traffic['on_chip_bytes']:.3g} on chip")
    bound = record.get("roofline_hbm")
    if bound:
      lines.append(
          f"  roofline on HBM bytes: memory {bound['memory_s'] * 1e3:.2f} ms -> "
          f"{bound['step_s'] * 1e3:.2f} ms ({bound['bound']}-bound): MFU {bound['mfu']:.1%}"
          f"{_model_mfu(bound)}, {bound['images_per_s_per_chip']:.1f} images/s per chip")
    lines.append("  HBM bytes by part: " + ", ".join(
        f"{m['module']} {m['hbm_bytes'] / traffic['hbm_bytes']:.0%}"
        for m in traffic["by_module"][:6] if traffic["hbm_bytes"]))
  return "\n".join(lines)


if __name__ == "__main__":  # The command moved; say where instead of doing nothing.
  raise SystemExit("this module is a library now; the command is `fgtbt aot` "
                   "(or `python -m fgtbt_jax.commands aot`)")
