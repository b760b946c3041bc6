"""Logical axis names of the model and their mapping onto a device mesh.

Every parameter of the model carries logical axis names (through
`nn.with_logical_partitioning`) and the main activations carry logical
constraints (`nn.with_logical_constraint`). The names say what a dimension
is; `logical_axis_rules(mode)` says which mesh axis of a
`Mesh(devices, ("data", "fsdp"))` shards it.

Names:
  batch: the batch dimension of activations.
  tokens: the token (flattened height x width) dimension of activations.
  height, width: spatial dimensions of feature-map activations.
  embed: the channel width C_i of an encoder stage's token stream (the input
    and output of every block, of the stage norm and of the decoder's
    per-stage linear layers).
  qkv: output width of the attention projections q (C_i) and kv (2 C_i).
  mlp: hidden width of the Mix-FFN (4 C_i).
  prompt: narrow FGSA widths: structure/image features (C_i / 4) and the
    channel-attention bottleneck.
  fused: the FGSA concat width 1.5 C_i.
  decoder: channel widths of the decoder head (768, 256, 128, 64 in the
    paper config).
  heatmaps: the output channels (one per unified landmark).
  conv_height, conv_width: spatial dimensions of convolution kernels.
  conv_in: input-channel dimension of convolution kernels (also of 1x1
    convolutions applied to tokens).
  norm: scales and offsets of layer and batch norms.
  depthwise: channels of the Mix-FFN's depthwise 3x3 kernels (replicated:
    they are small, and a kernel split by channel makes the compiler split
    the convolution by channel, gathering the batch's feature maps).

Divisibility: JAX only shards a dimension that divides evenly by the mesh
axes it is mapped to. `variable_shardings` keeps a dimension replicated when
it does not, so every variant works on every mesh.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXIS_NAMES: tuple[str, ...] = (
    "batch", "tokens", "height", "width",
    "embed", "qkv", "mlp", "prompt", "fused", "decoder", "heatmaps",
    "conv_height", "conv_width", "conv_in", "norm", "depthwise",
)

MESH_AXES: tuple[str, ...] = ("data", "fsdp")

# Parameter dimensions that fully-sharded data parallelism splits over the
# "fsdp" mesh axis, in priority order: each array gets "fsdp" on the first of
# its dimensions in this list (one mesh axis shards at most one dimension);
# `variable_shardings` falls back to replication where a width does not divide.
_FSDP_PARAMETER_AXES = ("embed", "mlp", "qkv", "fused", "decoder", "prompt", "conv_in")

LogicalRules = tuple[tuple[str, Any], ...]


def target_platform() -> str:
  """The platform ("cpu", "gpu", "tpu") of the devices a program is being built for.

  That of the mesh in context (`jax.set_mesh`, which `sharding.mesh_and_rules`
  enters; its abstract mesh is visible inside `jax.jit` and `jax.eval_shape`
  too), else JAX's default backend. The two differ when a CPU host builds a
  program for other devices, e.g. `fgtbt_jax.aot` compiling for a TPU
  topology: the model's "auto" choices (`remat_policy`, `depthwise_impl`)
  follow the devices that will run it, not the host that traces it.
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def logical_axis_rules(mode: str) -> LogicalRules:
  """Rules mapping logical axis names to the ("data", "fsdp") mesh axes.

  Args:
    mode: "data": pure data parallelism; the batch is split over every device
      of the mesh and all parameters are replicated. "fsdp": the batch is split
      the same way and every parameter matrix is split over the "fsdp" axis
      along one of its channel dimensions (ZeRO-3 style; XLA gathers it where
      it is used). Norm scales and other vectors named "norm" stay replicated.

  Returns:
    A tuple of (logical name, mesh axis or axes or None) pairs covering every
    name in LOGICAL_AXIS_NAMES, usable with `nn.logical_axis_rules`,
    `nn.logical_to_mesh_sharding` and `variable_shardings`.
  """
  if mode not in ("data", "fsdp"):
    raise ValueError(f"unknown sharding mode {mode!r}; expected 'data' or 'fsdp'")
  rules: list[tuple[str, Any]] = [("batch", MESH_AXES)]
  if mode == "fsdp":
    rules += [(name, "fsdp") for name in _FSDP_PARAMETER_AXES]
  named = {name for name, _ in rules}
  rules += [(name, None) for name in LOGICAL_AXIS_NAMES if name not in named]
  return tuple(rules)


def _mesh_axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """`spec` with every dimension that does not divide evenly replicated."""
  axes = tuple(spec) + (None,) * (len(shape) - len(spec))
  return PartitionSpec(*(
      a if size % _mesh_axis_size(mesh, a) == 0 else None
      for a, size in zip(axes, shape)))


def variable_shardings(abstract_variables: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for a (possibly abstract) variables tree with logical boxes.

  Args:
    abstract_variables: output of `jax.eval_shape(model.init, ...)` (or real
      variables): leaves are `nn.Partitioned` boxes or plain arrays / shape
      structs. Plain leaves (batch statistics) are replicated.
    mesh: the device mesh.
    rules: from `logical_axis_rules`.

  Returns:
    A tree of `NamedSharding` matching the *unboxed* variables tree (use with
    `jax.jit(model.init, out_shardings=...)` followed by `nn.meta.unbox`, or
    to place unboxed arrays). Dimensions that the mapped mesh axes do not
    divide are replicated.
  """
  specs = nn.get_partition_spec(abstract_variables)
  specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(abstract_variables)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _divisible_spec(spec, x.shape, mesh)),
      specs, shapes, is_leaf=lambda s: isinstance(s, PartitionSpec))
