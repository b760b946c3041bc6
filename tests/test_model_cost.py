"""Multiply-add counts (fgtbt_jax/models/cost.py) against the paper and XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fgtbt_jax.models import build_model, abstract_variables, model_config
from fgtbt_jax.models import cost
from fgtbt_jax.models.decoder import RESIZE_SCOPE


_PAPER_COUNTS = {}


def _paper_macs(size, **overrides):
  key = (size, tuple(sorted(overrides.items())))
  if key not in _PAPER_COUNTS:
    _PAPER_COUNTS[key] = cost.count_macs(model_config("paper", **overrides), size)
  return _PAPER_COUNTS[key]


CONCAT = {"decoder_fusion": "concat"}  # The SegFormer head as the paper counts it.


@pytest.mark.parametrize("overrides,size,expected_g", [
    (CONCAT, 480, 91.8),                # SPEC 2.4, paper config
    (CONCAT, 512, 104.4),               # the paper's 103.45 "GFLOPs" match this size
    ({**CONCAT, "fgsa": False}, 480, 84.5),   # the "w/o FGSA" network
    ({}, 480, 57.8),                    # the same network, head fusion composed
    ({"fgsa": False}, 480, 50.6),
])
def test_paper_config_multiply_adds(overrides, size, expected_g):
  macs = _paper_macs(size, **overrides)
  assert abs(macs["layers"] / 1e9 - expected_g) / expected_g < 0.05
  assert macs["layers"] == macs["encoder"] + macs["fgsa"] + macs["decoder"]
  assert macs["total"] == macs["layers"] + macs["attention"]
  assert (macs["fgsa"] == 0) == (overrides.get("fgsa") is False)
  assert macs["attention"] > 0


def test_paper_config_breakdown_at_480():
  macs = _paper_macs(480, **CONCAT)
  # Exact values of this implementation (see docs/model.md).
  assert macs["encoder"] == 32_995_123_200
  assert macs["fgsa"] == 7_225_502_976
  assert macs["decoder"] == 51_535_872_000
  assert macs["attention"] == 4_976_640_000
  # The composed fusion changes the head only: 33.4 G fewer multiply-adds.
  composed = _paper_macs(480)
  assert {k: composed[k] for k in ("encoder", "fgsa", "attention")} == {
      k: macs[k] for k in ("encoder", "fgsa", "attention")}
  assert composed["decoder"] == 17_562_009_600


def test_counts_scale_with_batch_and_follow_remat():
  config = model_config("tiny")
  one = cost.count_macs(config)
  assert cost.count_macs(config, batch=3)["total"] == 3 * one["total"]
  assert cost.count_macs(model_config("tiny", remat=True)) == one


def _explicit_equivalent(eqn):
  """The equation as an op whose every multiply-add XLA's cost analysis sees.

  XLA counts only the kernel taps that land on real pixels; PyTorch counters
  (and `count_macs`) count padded taps too. Padding and dilating the input
  explicitly and convolving with VALID makes the two conventions agree,
  except for transposed convolutions, where XLA then also counts the
  zeros between dilated pixels: a factor of prod(lhs_dilation) on our
  input-based count.

  Returns (function of the equation's inputs, factor).
  """
  if eqn.primitive.name == "dot_general":
    return (lambda a, b: lax.dot_general(a, b, eqn.params["dimension_numbers"])), 1
  params = eqn.params
  dims = params["dimension_numbers"]
  spatial = dims.lhs_spec[2:]

  def conv(lhs, rhs):
    config = [(0, 0, 0)] * lhs.ndim
    for axis, (low, high), dilation in zip(spatial, params["padding"], params["lhs_dilation"]):
      config[axis] = (low, high, dilation - 1)
    lhs = lax.pad(lhs, jnp.zeros((), lhs.dtype), config)
    return lax.conv_general_dilated(
        lhs, rhs, params["window_strides"], "VALID", rhs_dilation=params["rhs_dilation"],
        dimension_numbers=dims, feature_group_count=params["feature_group_count"])

  return conv, int(np.prod(params["lhs_dilation"]))


def test_per_layer_counts_equal_xla_cost_analysis():
  jaxpr = cost.forward_jaxpr(model_config("tiny"), 64).jaxpr
  ops = [eqn for path, eqn in cost.walk_equations(jaxpr)
         if cost.equation_macs(eqn) and RESIZE_SCOPE not in path]
  kinds = {eqn.primitive.name for eqn in ops}
  assert kinds == {"dot_general", "conv_general_dilated"}
  assert any(any(d > 1 for d in e.params.get("lhs_dilation", (1,))) for e in ops)
  assert any(e.params.get("feature_group_count", 1) > 1 for e in ops)
  expected = 0
  functions, arguments = [], []
  for eqn in ops:
    function, factor = _explicit_equivalent(eqn)
    functions.append(function)
    arguments.append(tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
                           for v in eqn.invars[:2]))
    expected += cost.equation_macs(eqn) * factor
  all_ops = lambda args: [f(*a) for f, a in zip(functions, args)]
  flops = jax.jit(all_ops).lower(arguments).cost_analysis()["flops"]
  # Explicit pads add at most one flop each in XLA's accounting.
  assert 0 <= flops / 2 - expected <= len(ops)


def test_whole_tiny_forward_against_xla():
  config = model_config("tiny")
  model = build_model(config)
  variables = abstract_variables(model, 64)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  flops = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, images).cost_analysis()["flops"]
  macs = cost.count_macs(config)
  # XLA also counts element-wise work and the resize products but skips
  # padded taps: it lands a little above, not below.
  assert macs["total"] < flops / 2 < 1.3 * macs["total"]


def test_model_part_classification():
  assert cost.model_part("FGTBT/encoder/stage_0/block_1/attention/q") == "encoder"
  assert cost.model_part("FGTBT/encoder/stage_0/fgsa.inject/conv") == "fgsa"
  assert cost.model_part("FGTBT/fgsa_high_frequency") == "fgsa"
  assert cost.model_part("FGTBT/encoder/stage_3/block_0/attention/attention_core") == "attention"
  assert cost.model_part("FGTBT/decoder/fuse") == "decoder"
  assert cost.model_part("FGTBT") == "other"


def test_macs_of_single_ops():
  dn = lax.conv_dimension_numbers((1, 8, 8, 4), (3, 3, 4, 5), ("NHWC", "HWIO", "NHWC"))
  spec = (dn.lhs_spec, dn.rhs_spec, dn.out_spec)
  assert cost.conv_macs((1, 8, 8, 4), (3, 3, 4, 5), (1, 8, 8, 5), spec, (1, 1)) == 8 * 8 * 5 * 9 * 4
  # Transposed conv: every input pixel meets all 16 taps for each in/out pair.
  assert cost.conv_macs((1, 8, 8, 4), (4, 4, 4, 5), (1, 16, 16, 5), spec, (2, 2)) == \
      8 * 8 * 16 * 4 * 5
  assert cost.dot_general_macs((2, 3, 4), (4, 6), (((2,), (0,)), ((), ()))) == 2 * 3 * 4 * 6
  assert cost.dot_general_macs((2, 3, 4), (2, 4, 6), (((2,), (1,)), ((0,), (0,)))) == 2 * 3 * 4 * 6
