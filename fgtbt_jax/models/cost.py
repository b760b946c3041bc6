"""Multiply-add count of the forward pass, read off the traced program.

`count_macs` traces the model's inference forward pass to a jaxpr (no
compilation, no FLOPs spent, so the paper config at 480 x 480 costs a second)
and sums the multiply-adds of every matrix product (`dot_general`) and
convolution (`conv_general_dilated`) in it, with the convention of PyTorch
operation counters that the paper's numbers come from:

* a matmul of (M, K) by (K, N) costs M K N;
* a convolution costs (output pixels) x (output channels) x k_h k_w
  (input channels / groups), padding included;
* a transposed convolution (input dilation s) costs (input pixels) x
  (output channels) x k_h k_w (input channels / groups): every input pixel
  meets every kernel tap once; the zeros of the dilated input are free;
* the two activation-by-activation products inside attention (q k^T and
  weights x v) are reported apart: PyTorch counters do not see them (they
  count nn.Linear / nn.Conv layers), so the paper's figures leave them out;
* a 1x1 convolution of an image computed as multiply-adds
  (`layers.pointwise_conv_batch_norm`) costs what the convolution does;
* interpolation (bilinear resize and the HIH head's area pooling, which
  JAX implements with small matrix products) is not a learned layer and is
  not counted; neither are normalisation, activations, softmax or the FFT.

The counts are exact for the program that runs, so they follow any config
change (input size, variant, FGSA on/off).
"""

from __future__ import annotations

import math
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
from jax.extend import core as jex_core

from fgtbt_jax.models.decoder import RESIZE_SCOPE, WEIGHT_SCOPE
from fgtbt_jax.models.fgtbt import FGTBT, abstract_variables, build_model
from fgtbt_jax.models.heads import AREA_SCOPE
from fgtbt_jax.models.layers import POINTWISE_FMA_SCOPE
from fgtbt_jax.models.mit import ATTENTION_SCOPE

PARTS = ("encoder", "fgsa", "decoder", "attention")


def dot_general_macs(lhs_shape, rhs_shape, dimension_numbers) -> int:
  """Multiply-adds of one `lax.dot_general`: batch x M x K x N."""
  (_, rhs_contract), (_, rhs_batch) = dimension_numbers
  rhs_free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract and i not in rhs_batch]
  return math.prod(lhs_shape) * math.prod(rhs_free)


def conv_macs(lhs_shape, rhs_shape, out_shape, dimension_numbers, lhs_dilation) -> int:
  """Multiply-adds of one `lax.conv_general_dilated` (see module docstring).

  Args:
    lhs_shape, rhs_shape, out_shape: input, kernel and output shapes.
    dimension_numbers: (lhs_spec, rhs_spec, out_spec) index tuples as in
      `lax.ConvDimensionNumbers`.
    lhs_dilation: input dilation (> 1 for transposed convolutions).
  """
  lhs_spec, rhs_spec, _ = dimension_numbers
  kernel_taps = math.prod(rhs_shape[d] for d in rhs_spec[2:])
  in_per_group = rhs_shape[rhs_spec[1]]
  out_channels = rhs_shape[rhs_spec[0]]
  if any(d > 1 for d in lhs_dilation):
    batch = lhs_shape[lhs_spec[0]]
    pixels = math.prod(lhs_shape[d] for d in lhs_spec[2:])
    return batch * pixels * out_channels * kernel_taps * in_per_group
  return math.prod(out_shape) * kernel_taps * in_per_group


def equation_macs(eqn) -> int:
  """Multiply-adds of one jaxpr equation (0 unless a matmul or convolution)."""
  name = eqn.primitive.name
  if name == "dot_general":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    return dot_general_macs(lhs, rhs, eqn.params["dimension_numbers"])
  if name == "conv_general_dilated":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    dims = eqn.params["dimension_numbers"]
    return conv_macs(lhs, rhs, eqn.outvars[0].aval.shape,
                     (dims.lhs_spec, dims.rhs_spec, dims.out_spec),
                     eqn.params["lhs_dilation"])
  return 0


def _subjaxprs(eqn) -> Iterator[jex_core.Jaxpr]:
  for value in eqn.params.values():
    for candidate in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(candidate, jex_core.ClosedJaxpr):
        yield candidate.jaxpr
      elif isinstance(candidate, jex_core.Jaxpr):
        yield candidate


def walk_equations(jaxpr: jex_core.Jaxpr, prefix: str = "") -> Iterator[tuple[str, object]]:
  """Yields (name-stack path, equation) for every equation, nested ones too.

  Sub-jaxprs (jit, remat) carry name stacks relative to their call site,
  hence the prefix.
  """
  for eqn in jaxpr.eqns:
    path = "/".join(p for p in (prefix, str(eqn.source_info.name_stack)) if p)
    yield path, eqn
    for sub in _subjaxprs(eqn):
      yield from walk_equations(sub, path)


def model_part(path: str) -> str:
  """Which model part a name-stack path belongs to ("other" if none).

  Flax puts module paths in the name stack: "attention" is the attention
  core's activation products, "fgsa" anything under an FGSA scope, else the
  "encoder" or "decoder" module.
  """
  if ATTENTION_SCOPE in path:
    return "attention"
  if "fgsa" in path:
    return "fgsa"
  components = path.split("/")
  for part in ("encoder", "decoder"):
    if part in components:
      return part
  return "other"


def forward_jaxpr(config: ml_collections.ConfigDict, input_size: int | None = None,
                  batch: int = 1) -> jex_core.ClosedJaxpr:
  """The traced inference forward pass of `build_model(config)` (abstract, cheap).

  The depthwise convolutions are traced as convolutions whatever the backend
  (`depthwise_impl="conv"`): the count is of the layers, not of how a backend
  computes them. Every named output of the landmark head is traced
  (`FGTBT.named_outputs`: HIH's decimal maps too).
  """
  size = config.input_size if input_size is None else input_size
  config = ml_collections.ConfigDict(config.to_dict())
  config.depthwise_impl = "conv"
  model = build_model(config)
  variables = abstract_variables(model, size)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False, method=FGTBT.named_outputs))(
      variables, images)


def count_macs(config: ml_collections.ConfigDict, input_size: int | None = None,
               batch: int = 1) -> dict[str, int]:
  """Multiply-adds of one inference forward pass of `build_model(config)`.

  Args:
    config: a `model_config(...)`.
    input_size: square input side; defaults to `config.input_size`.
    batch: images per forward pass.

  Returns:
    Multiply-adds by part:
      encoder: MiT layers (linear and convolution layers, FGSA excluded);
      fgsa: FGSA layers, the SRM filter included when it is the extractor;
      decoder: decoder-head layers, the landmark head's included;
      layers: encoder + fgsa + decoder, the count PyTorch operation counters
        give (they see nn.Linear / nn.Conv layers, not the products inside
        attention); this is the convention of the paper's Table 8;
      attention: the q k^T and (softmax) v products of all attention layers;
      total: layers + attention, every multiply-add of the forward pass
        that scales with the batch. Left out: the bilinear resizes
        and area pooling (interpolation) and the composed head's weight products E_i F_i
        (once per pass, about 0.6 G for the paper network).
  """
  totals = dict.fromkeys(PARTS, 0)
  for path, eqn in walk_equations(forward_jaxpr(config, input_size, batch).jaxpr):
    macs = equation_macs(eqn)
    if eqn.primitive.name == "mul" and POINTWISE_FMA_SCOPE in path:
      macs = math.prod(eqn.outvars[0].aval.shape)  # A 1x1 convolution, one input channel.
    if not macs or RESIZE_SCOPE in path or WEIGHT_SCOPE in path or AREA_SCOPE in path:
      continue
    part = model_part(path)
    if part not in totals:
      raise RuntimeError(f"count_macs: {eqn.primitive.name} at {path!r} is in no model part")
    totals[part] += macs
  totals["layers"] = totals["encoder"] + totals["fgsa"] + totals["decoder"]
  totals["total"] = totals["layers"] + totals["attention"]
  return totals
