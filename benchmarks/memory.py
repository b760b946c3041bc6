"""Memory budget of the train step: XLA's memory analysis and where the bytes go.

    python -m benchmarks.memory --config=configs/fgtbt_paper.py \\
        --batch=4,8 --dtype=float32,bfloat16 [--breakdown] [--residuals] \\
        [--config.model.remat=True --config.model.remat_parts=...]

For each (global batch, compute dtype) it compiles the real sharded train
step (`train.make_train_step` on `state.build_setup`) ahead of time on
abstract inputs (no weights are made, nothing runs) and prints one JSON line
with XLA's memory analysis of one device's program: argument, output, alias
and temporary bytes and `total_bytes` (arguments + outputs + temporaries -
aliased), the figure a device must hold.

--breakdown also asks XLA for its buffer assignment (a dump into a
temporary folder) and reads the live buffers at the program's peak: their
bytes grouped by the model component that made them (the module path in
the op's metadata, e.g. "encoder/stage_2/blocks", "decoder", "loss"), the
largest buffers with their shapes, and how much of the peak lies in the
forward pass's saved values ("forward") versus the backward pass.

--residuals reports what JAX itself saves for the backward pass, before
XLA compiles anything: `jax.vjp` of the step's loss evaluated abstractly
(`jax.eval_shape`), the saved arrays summed by dtype. It does not depend on
the backend: XLA:CPU upcasts many bfloat16 operations to float32 and so
keeps float32 copies that a GPU or TPU does not, which the compiled CPU
figure includes and this one does not.

--threefry=unrolled compiles the random bits of the dropout masks as jax
lowers them for GPUs and TPUs. On CPU jax lowers its threefry generator as a
rolled loop (`jax._src.random.threefry2x32`, for compile time), and the
loop's full-size uint32 state cannot be fused into the mask's consumers:
the decoder's head dropout keeps several 4-byte-an-element buffers of the
(B, H/4, W/4, 768) map live at the peak of the paper step. Unrolled, as on
GPU and TPU, XLA fuses the generator into its consumers and no such buffer
exists; the bits are the same (`tests/test_benchmarks.py`). It changes only
the CPU figure, to show what the step needs once the generator is fused.

--probe measures, instead of the step, one operation alone: the gradient of
the decoder's 1x1 projection (decoder_dim -> head_channels channels at a
quarter of the input size, the config's batch), written as a convolution
and as a matmul over channels (`layers.conv` with `pointwise_impl` "conv"
and "dot"), in each --dtype. One JSON line each
with XLA's temporary bytes and the float32 copies of the input the compiled
program makes (`convert` to float32 at the input's shape). On XLA:CPU the
bfloat16 gradient needs more temporary memory than the float32 one, because
XLA:CPU computes bfloat16 dots and convolutions in float32 and materialises
float32 copies of their operands; a GPU or TPU computes them in bfloat16.

Not a test; `tests/test_benchmarks.py` runs it once on the tiny config.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
import sys
import tempfile

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from benchmarks import common
from benchmarks import train_step as train_step_bench
from fgtbt_jax import aot
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax import state as state_lib
from fgtbt_jax import train
from fgtbt_jax.models import layers

FLAGS = flags.FlagValues()
_CONFIG, _BATCH, _DTYPE = common.define_step_flags(FLAGS)
_BREAKDOWN = flags.DEFINE_bool("breakdown", False,
                               "Group the live buffers at XLA's peak by model component.",
                               flag_values=FLAGS)
_RESIDUALS = flags.DEFINE_bool("residuals", False,
                               "Also sum the values JAX saves for the backward pass.",
                               flag_values=FLAGS)
_COMPILE = flags.DEFINE_bool("compile", True,
                             "Compile the step for XLA's memory analysis (--nocompile: "
                             "residuals only).", flag_values=FLAGS)
_DUMP_DIR = flags.DEFINE_string(
    "dump_dir", None, "With --breakdown: keep XLA's dump in this folder (default: a "
    "temporary folder, removed).", flag_values=FLAGS)
_TOP = flags.DEFINE_integer("top", 12, "Largest buffers (--breakdown) and saved kinds "
                            "(--residuals) listed.",
                            lower_bound=0, flag_values=FLAGS)

_THREEFRY = flags.DEFINE_enum(
    "threefry", "backend", ["backend", "unrolled"],
    "How the dropout masks' random bits are lowered on CPU: 'backend', jax's CPU "
    "lowering (a rolled loop); 'unrolled', the lowering jax uses on GPU and TPU, which "
    "XLA fuses (see the module docstring). No effect on other backends.",
    flag_values=FLAGS)

_PROBE = flags.DEFINE_bool(
    "probe", False, "Measure the decoder projection's gradient alone (conv and dot forms) "
    "in place of the step (see the module docstring).", flag_values=FLAGS)

GIB = 1024 ** 3


@contextlib.contextmanager
def threefry_lowering(mode: str):
  """Within: jax's threefry generator lowered on CPU as `mode` says.

  "backend" changes nothing; "unrolled" registers the GPU/TPU lowering (the
  same bits, unrolled rounds) for the CPU platform, and puts jax's CPU rule
  back on exit. Only programs lowered inside see it.
  """
  if mode not in ("backend", "unrolled"):
    raise ValueError(f"unknown threefry lowering {mode!r}; expected 'backend' or 'unrolled'")
  if mode == "backend":
    yield
    return
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top
    primitive = threefry2x32.threefry2x32_p
    unrolled = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    rolled = threefry2x32._threefry2x32_cpu_lowering_rule  # pylint: disable=protected-access
  except (ImportError, AttributeError) as error:
    raise RuntimeError(
        f"--threefry=unrolled needs jax's threefry lowering rules in "
        f"jax._src.random.threefry2x32, which jax {jax.__version__} does not have "
        f"({error}); run with --threefry=backend") from error
  mlir.register_lowering(primitive, unrolled, platform="cpu")
  try:
    yield
  finally:
    mlir.register_lowering(primitive, rolled, platform="cpu")


def memory_record(analysis) -> dict:
  """XLA's memory analysis as a dict of bytes, with the total a device holds
  (`aot.memory_figures`)."""
  figures = aot.memory_figures(analysis)
  record = {f"{name}_bytes": value for name, value in figures.items()}
  record["total_gib"] = round(figures["total"] / GIB, 3)
  record["temp_gib"] = round(figures["temp"] / GIB, 3)
  return record


# -----------------------------------------------------------------------------
# The buffers live at XLA's peak, grouped by component.

# "Live ranges at 1234 (peak):" followed by one buffer name per line.
_PEAK_HEADER = re.compile(r"Live ranges at (\d+) \(peak\):")
# A buffer-assignment line: "value: <N name @0> (size=..., offset=...): f32[4,8]{1,0}"
_VALUE = re.compile(r"value: <\d+ ([^ >]+)(?: @\d+)?> \(size=(\d+),offset=\d+\): (\S+)")
# A peak line: "    add_divide_fusion{}: 4063232 bytes (cumulative: 4063232 bytes)"
_LIVE = re.compile(r"^\s+(\S+): (\d+) bytes")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# "%fused_computation.12 (param_0: f32[8]) -> f32[8] {" or "ENTRY %main.123 (...) -> ... {"
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [(].*[{]\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")


def _one(pattern: str, folder: str) -> str:
  paths = sorted(glob.glob(os.path.join(folder, pattern)))
  paths = [p for p in paths if "jit_step_fn" in os.path.basename(p)] or paths
  if not paths:
    raise FileNotFoundError(f"benchmarks.memory: XLA wrote no {pattern} into {folder}")
  return max(paths, key=os.path.getsize)


def peak_buffers(dump_dir: str) -> list[tuple[str, int, str]]:
  """(buffer name, bytes, shape) of every buffer live at the peak of the dumped program."""
  with open(_one("*after_optimizations-live-range.txt", dump_dir)) as f:
    text = f.read()
  match = _PEAK_HEADER.search(text)
  if match is None:
    raise ValueError(f"benchmarks.memory: no 'Live ranges at N (peak)' in the dump in {dump_dir}")
  live = []
  for line in text[match.end():].splitlines():
    entry = _LIVE.match(line)
    if entry is None:
      if live:
        break
      continue
    live.append((entry.group(1), int(entry.group(2))))
  shapes = {}
  with open(_one("*after_optimizations-buffer-assignment.txt", dump_dir)) as f:
    for line in f:
      value = _VALUE.search(line)
      if value:
        shapes.setdefault(value.group(1), value.group(3))
  return [(name, size, shapes.get(name.split("{")[0], "?")) for name, size in live]


def instruction_origins(dump_dir: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op_name metadata it came from.

  Parameters map to "parameter"; a fusion without metadata of its own takes
  that of its fused computation's root instruction.
  """
  origins, calls, roots = {}, {}, {}
  computation = None
  with open(_one("*after_optimizations.txt", dump_dir)) as f:
    for line in f:
      header = _COMPUTATION.match(line)
      if header:
        computation = header.group(1)
        continue
      inst = _INSTRUCTION.match(line)
      if not inst:
        continue
      name = inst.group(1)
      op = _OP_NAME.search(line)
      if " parameter(" in line and computation and computation.startswith("main"):
        origins[name] = "parameter"
      elif op:
        origins[name] = op.group(1)
      called = _CALLS.search(line)
      if called and not op:
        calls[name] = called.group(1)
      if line.lstrip().startswith("ROOT") and op and computation:
        roots[computation] = op.group(1)
  for name, called in calls.items():
    if name not in origins and called in roots:
      origins[name] = roots[called]
  return origins


def component(op_name: str) -> tuple[str, str]:
  """(pass, component) of an op_name: forward/backward and a short module path."""
  backward = "transpose(" in op_name
  path = re.sub(r"(jvp|transpose|checkpoint|remat|pjit|jit)\(([^()]*)\)", r"\2", op_name)
  parts = [p for p in path.split("/") if p]
  # Module paths look like ".../FGTBT/encoder/stage_0/block_1/attn/..."
  keep = []
  for part in parts:
    if part.startswith(("jit_step_fn", "step_fn", "loss_fn", "jit", "pjit", "while", "body")):
      continue
    keep.append(part)
  head = [p for p in keep if re.fullmatch(r"[A-Za-z_][\w]*", p)]
  if len(head) < 2:
    # No module path: the loss, its targets and weight maps, the optimizer.
    where = "outside modules (loss, targets, optimizer)"
  else:
    where = re.sub(r"block_\d+", "blocks", "/".join(head[:3]))
  return ("backward" if backward else "forward"), where


def peak_breakdown(dump_dir: str, top: int) -> dict:
  """The peak's live bytes by component and pass, and its largest buffers."""
  buffers = peak_buffers(dump_dir)
  origins = instruction_origins(dump_dir)
  by_component = collections.Counter()
  by_pass = collections.Counter()
  rows = []
  for name, size, shape in buffers:
    inst = name.split("{")[0]
    op = origins.get(inst, "")
    if op == "parameter":
      which, where = "other", "train state and batch (arguments)"
    elif not op:
      which, where = "other", "no JAX origin (XLA's own buffers)"
    else:
      which, where = component(op)
    by_component[where] += size
    by_pass[which] += size
    rows.append((size, name, shape, where, which))
  rows.sort(reverse=True)
  return {
      "peak_live_bytes": int(sum(s for _, s, _ in buffers)),
      "peak_live_gib": round(sum(s for _, s, _ in buffers) / GIB, 3),
      "peak_by_pass_gib": {k: round(v / GIB, 3) for k, v in by_pass.most_common()},
      "peak_by_component_gib": {k: round(v / GIB, 3) for k, v in by_component.most_common(20)},
      "largest_buffers": [{"bytes": s, "shape": shape, "component": where, "pass": which}
                          for s, _, shape, where, which in rows[:top]],
  }


# -----------------------------------------------------------------------------
# What JAX saves for the backward pass.


def residual_bytes(setup: state_lib.Setup, state, batch, top: int = 10) -> dict:
  """Bytes of the values `jax.vjp` of the step's loss keeps for the backward pass.

  By dtype, and the `top` largest (dtype, shape) kinds summed over their copies.
  """
  loss = train.train_loss(setup)  # the train step's own loss, under the config's remat policy

  def residuals(params, batch_stats, balancer_params, balancer_state, rng, batch):
    fixed = lambda p: loss({"model": p, "balancer": balancer_params}, batch_stats,
                           balancer_state, rng, batch)[0]
    return jax.vjp(fixed, params)[1]

  with sharding.mesh_and_rules(setup.mesh, setup.rules):
    saved = jax.eval_shape(residuals, state.params, state.batch_stats, state.balancer_params,
                           state.balancer_state, state.rng, batch)
  param_ids = {id(x) for x in jax.tree.leaves(state.params)}
  by_dtype = collections.Counter()
  by_kind = collections.Counter()  # (dtype, shape) -> bytes
  for leaf in jax.tree.leaves(saved):
    if id(leaf) in param_ids:
      continue
    size = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    by_dtype[str(leaf.dtype)] += size
    by_kind[(str(leaf.dtype), tuple(leaf.shape))] += size
  total = sum(by_dtype.values())
  return {"residual_bytes": int(total), "residual_gib": round(total / GIB, 3),
          "residual_gib_by_dtype": {k: round(v / GIB, 3) for k, v in by_dtype.most_common()},
          "largest_residuals": [{"dtype": dtype, "shape": list(shape),
                                 "gib": round(size / GIB, 3)}
                                for (dtype, shape), size in by_kind.most_common(top)]}


def compile_with_dump(lowered, folder: str):
  """`lowered.compile()` with XLA's dump into `folder`, past the persistent cache.

  A program read from the persistent compilation cache is not compiled, so
  XLA would write no buffer assignment: the cache is off for this compile.
  """
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return lowered.compile({"xla_dump_to": folder, "xla_dump_hlo_as_text": True})
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)


def measure(config: ml_collections.ConfigDict, breakdown: bool, residuals: bool,
            compile_step: bool, top: int, dump_dir: str | None = None,
            threefry: str = "backend") -> dict:
  """One JSON record of the step's memory for `config` (see the module docstring)."""
  setup = state_lib.build_setup(config)
  state = setup.abstract_state
  batch = train.abstract_batch(config, sharding.batch_sharding(setup.mesh))
  model = config.model
  record = {
      "benchmark": "memory",
      "variant": model.variant,
      "input_size": model.input_size,
      "dtype": model.dtype,
      "remat": bool(model.remat),
      "remat_policy": model.remat_policy,
      "remat_policy_resolved": models.resolve_remat_policy(model.remat_policy),
      "batch": int(batch["image"].shape[0]),
      "devices": jax.device_count(),
      "threefry": threefry,
  }
  if residuals:
    record.update(residual_bytes(setup, state, batch, top))
  if not compile_step:
    return record
  step = train.make_train_step(setup, state_lib.ema_decay_per_step(config))
  with sharding.mesh_and_rules(setup.mesh, setup.rules), threefry_lowering(threefry):
    lowered = aot.jitted_function(step).lower(state, batch)
  if breakdown:
    with tempfile.TemporaryDirectory(prefix="fgtbt_memory_") as temporary:
      folder = dump_dir or temporary
      compiled = compile_with_dump(lowered, folder)
      record.update(memory_record(compiled.memory_analysis()))
      record.update(peak_breakdown(folder, top))
  else:
    record.update(memory_record(lowered.compile().memory_analysis()))
  return record


def float32_copies(hlo_text: str, shape: tuple[int, ...]) -> int:
  """Instructions of an optimised HLO module that convert to float32 at `shape`."""
  dims = ",".join(str(d) for d in shape)
  pattern = re.compile(r"= f32\[" + dims + r"\](\{[^}]*\})? convert\(")
  return sum(1 for line in hlo_text.splitlines() if pattern.search(line))


def projection_probe(config: ml_collections.ConfigDict) -> list[dict]:
  """XLA's temporaries for the gradient of the decoder's 1x1 projection alone.

  The input is (batch, input_size / 4, input_size / 4, decoder_dim) in the
  config's compute dtype, the kernel (decoder_dim, head_channels) float32
  cast to it, the loss the float32 sum of squares of the output; the gradient
  is taken for both. One record per form of the model's own layer
  (`layers.conv` with `pointwise` "conv", an `nn.Conv`, and "dot", a
  `layers.PointwiseConv`).
  """
  model = config.model
  dtype = jnp.dtype(model.dtype)
  side = model.input_size // 4
  shape = (config.data.samples_per_dataset * len(config.data.datasets), side, side,
           model.decoder_dim)
  records = []
  for form in layers.POINTWISE_IMPLEMENTATIONS:
    layer = layers.conv(model.head_channels, 1, "decoder", dtype=dtype, use_bias=False,
                        pointwise=form)

    def loss(x, kernel, layer=layer):
      return jnp.sum(jnp.square(layer.apply({"params": {"kernel": kernel}}, x)
                                .astype(jnp.float32)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        jax.ShapeDtypeStruct(shape, dtype),
        jax.ShapeDtypeStruct((1, 1, model.decoder_dim, model.head_channels),
                             jnp.float32)).compile()
    analysis = compiled.memory_analysis()
    records.append({
        "benchmark": "memory_probe", "op": "decoder_projection_grad", "form": form,
        "dtype": dtype.name, "input_shape": list(shape), "output_channels": model.head_channels,
        "backend": jax.default_backend(),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "temp_gib": round(analysis.temp_size_in_bytes / GIB, 3),
        "input_bytes": int(np.prod(shape)) * dtype.itemsize,
        "float32_copies_of_input": float32_copies(compiled.as_text(), shape),
    })
  return records


def main(argv: list[str]) -> int:
  FLAGS(argv)
  common.emit(common.machine_record())
  for dtype, batch, config in train_step_bench.step_configs(_CONFIG.value, _BATCH.value,
                                                            _DTYPE.value):
    if _PROBE.value:
      for record in projection_probe(config):
        common.emit(record)
      continue
    dump_dir = None
    if _DUMP_DIR.value:
      dump_dir = os.path.join(_DUMP_DIR.value, f"{dtype}_b{batch}")
    record = measure(config, _BREAKDOWN.value, _RESIDUALS.value, _COMPILE.value, _TOP.value,
                     dump_dir, _THREEFRY.value)
    record["config"] = config_flags.get_config_filename(FLAGS["config"])
    common.emit(record)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
