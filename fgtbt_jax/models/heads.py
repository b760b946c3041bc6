"""Landmark heads: what the decoder's upsampled features become (`HEADS`).

The decoder (`decoder.DecoderHead`) fuses the encoder stages and upsamples
them to half the input resolution; a head turns those features into named
outputs, read by the loss (`losses.head_loss`) and by the decoders
(`heatmaps.decode_outputs`):

  "heatmap"    the FGTBT head (default): a 3x3 convolution to one heatmap per
               landmark. Outputs {"heatmaps"}.
  "hih"        Heatmap in Heatmap (HIH paper, CNN form): the same integer
               heatmaps plus per landmark a d x d decimal heatmap of the
               offset inside the integer peak pixel (`DecimalHead`).
               Outputs {"heatmaps", "decimal"}.
  "recurrent"  coarse-to-fine recurrent refinement (the CFDRNN paper's
               recurrent heat-map level): the FGTBT heatmaps, then K steps
               of one shared `RefinementStep` that each read the features
               and the previous heatmaps and add a correction to them. Outputs {"heatmaps": the last
               step's, "step_heatmaps": all K + 1, first to last}.

Every map is channels last, (B, h, w, num_points), float32 out of the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax import heatmaps as heatmaps_lib
from fgtbt_jax.models import layers
from fgtbt_jax.models.compute import Compute

Dtype = Any
# Name scope of the decimal branch's area pooling: interpolation, like the
# decoder's bilinear resizes, so `cost.count_macs` leaves its products out.
AREA_SCOPE = "area_pool"


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """What a head returns and how it is decoded.

  Attributes:
    outputs: the names of its outputs.
    decoders: the `heatmaps.decode_outputs` methods its outputs support.
    description: one line for docs and logs.
  """

  outputs: tuple[str, ...]
  decoders: tuple[str, ...]
  description: str


HEADS: dict[str, HeadSpec] = {
    "heatmap": HeadSpec(("heatmaps",), heatmaps_lib.DECODERS,
                        "FGTBT heatmaps (3x3 conv)"),
    "hih": HeadSpec(("heatmaps", "decimal"), heatmaps_lib.ALL_DECODERS,
                    "Heatmap in Heatmap: integer heatmaps + d x d decimal heatmaps"),
    "recurrent": HeadSpec(("heatmaps", "step_heatmaps"), heatmaps_lib.DECODERS,
                          "coarse-to-fine recurrent refinement, K shared steps"),
}


@dataclasses.dataclass(frozen=True)
class HeadOptions:
  """What the decoder puts on its upsampled features: the landmark head and DHLN.

  The fields are the model config's fields of the same names (`head_options`).

  Attributes:
    head: the landmark head, a name of `HEADS`.
    hih_decimal_size, hih_channels: the "hih" head's d and width.
    recurrent_steps, recurrent_channels, recurrent_kernel: the "recurrent"
      head's K, width and wide-kernel size.
    hallucination: SHT's DHLN (`hallucination.DualHallucination`): a
      face-hallucination stream from the input images fused with the
      upsampled features before the landmark head.
    hallucination_channels, hallucination_blocks: that stream's width and
      super-resolution blocks.
  """

  head: str = "heatmap"
  hih_decimal_size: int = 8
  hih_channels: int = 64
  recurrent_steps: int = 2
  recurrent_channels: int = 32
  recurrent_kernel: int = 7
  hallucination: bool = False
  hallucination_channels: int = 32
  hallucination_blocks: int = 4


HEAD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(HeadOptions))


def head_options(config) -> HeadOptions:
  """The `HeadOptions` of a model config (its `HEAD_FIELDS`)."""
  return HeadOptions(**{name: config[name] for name in HEAD_FIELDS})


def get_head(name: str) -> HeadSpec:
  """The registry entry of head `name`; ValueError naming the known heads."""
  if name not in HEADS:
    raise ValueError(f"unknown landmark head {name!r}; expected one of {tuple(HEADS)}")
  return HEADS[name]


def decode(outputs, method: str, smoothing_sigma: float = 0.0):
  """A head's named outputs -> (coords (B, K, 2) heatmap pixels, confidence (B, K))."""
  return heatmaps_lib.decode_outputs(outputs, method, smoothing_sigma)


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of area averaging: out cell o is the mean of input [o, o + 1) in / out.

  Each input pixel contributes the fraction of it that falls in the output
  cell (exact for any sizes; a plain mean of in / out pixels when out divides in).
  """
  edges = np.arange(out_size + 1) * (in_size / out_size)
  pixels = np.arange(in_size)
  overlap = (np.minimum(edges[1:, None], pixels[None] + 1.0)
             - np.maximum(edges[:-1, None], pixels[None]))
  weights = np.maximum(overlap, 0.0)
  return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def area_pool(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) by area averaging (`area_matrix`)."""
  _, h, w, _ = x.shape
  with jax.named_scope(AREA_SCOPE):
    return layers.separable_matmul(x, area_matrix(h, size), area_matrix(w, size))


class DecimalHead(nn.Module):
  """HIH's decimal heatmaps from the fused features and the integer heatmaps (CNN form).

  concat(features, heatmaps) -> 1x1 conv (no bias) + BN + ReLU at the heatmap
  resolution -> area pooling to d x d -> a basic residual block (two 3x3
  convs with BN, ReLU; the paper's resnet block, which lets the d x d cells
  exchange information) -> 1x1 conv + BN + ReLU -> 1x1 conv -> num_points
  decimal maps (B, d, d, num_points). The HIH paper's CNN branch has the same
  order (conv-BN-ReLU, downsampling, basic blocks, Eq. 6 conv-BN-ReLU-conv);
  its input here is this network's upsampled decoder features, whose
  stage-4 part already mixes the whole face through attention.

  Attributes:
    decimal_size: d, cells per side of a decimal map (8 in the paper).
    channels: width of the branch.
    num_points: landmarks.
    batch_norm_unbiased_variance: as in `decoder.DecoderHead`.
    compute: how to compute (`compute.Compute`: dtype, the 1x1 convolutions).
  """

  decimal_size: int = 8
  channels: int = 64
  num_points: int = 124
  batch_norm_unbiased_variance: bool = False
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, features: jax.Array, heatmaps: jax.Array, train: bool) -> jax.Array:
    def conv(y, features, k, name, use_bias=False, axis="decoder"):
      return layers.conv(features, k, axis, padding=k // 2, use_bias=use_bias,
                         dtype=self.compute.dtype, pointwise=self.compute.pointwise, name=name)(y)

    def norm(y, name):
      return layers.batch_norm(dtype=self.compute.dtype, unbiased_variance=self.batch_norm_unbiased_variance,
                               name=name)(y, use_running_average=not train)

    x = jnp.concatenate([features.astype(self.compute.dtype), heatmaps.astype(self.compute.dtype)], axis=-1)
    x = nn.relu(norm(conv(x, self.channels, 1, "reduce"), "reduce_norm"))
    x = area_pool(x, self.decimal_size)
    y = nn.relu(norm(conv(x, self.channels, 3, "block_conv1"), "block_norm1"))
    y = norm(conv(y, self.channels, 3, "block_conv2"), "block_norm2")
    x = nn.relu(x + y)
    x = nn.relu(norm(conv(x, self.channels, 1, "regress"), "regress_norm"))
    return conv(x, self.num_points, 1, "decimal", use_bias=True, axis="heatmaps")


class RefinementStep(nn.Module):
  """One coarse-to-fine step: (features, previous heatmaps H) -> H + correction.

  correction = concat(features, H) -> 1x1 conv -> ReLU -> k x k conv -> ReLU
  -> 1x1 conv (2 x channels) -> ReLU -> 1x1 conv (zero-initialised) ->
  num_points maps. The CFDRNN paper's heat-map-level branch (Table 3: wide
  7x7 and 13x13 convolutions, then two 1x1) with a 1x1 reduction in front, so
  the wide convolution runs on `channels` maps rather than on all the inputs;
  no BatchNorm (a step runs K times per forward) and no output ReLU (the
  heatmaps of the other heads are not rectified either). Unlike the paper's
  stages, a step predicts a correction of the previous heatmaps, starting at
  zero: the plain form (new heatmaps from the branch alone) collapsed to
  constant maps on the synthetic benchmark (ReLUs dead within 600 steps,
  NME far above the mean-shape baseline), while a step that can only add to
  H_{k-1} never makes it worse at the start.

  Attributes:
    channels: width of the step.
    kernel_size: the wide convolution's k.
    num_points: landmarks.
    compute: how to compute (`compute.Compute`: dtype, the 1x1 convolutions).
  """

  channels: int = 32
  kernel_size: int = 7
  num_points: int = 124
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, features: jax.Array, heatmaps: jax.Array) -> jax.Array:
    def conv(y, features, k, name, axis="decoder"):
      return layers.conv(features, k, axis, padding=k // 2, dtype=self.compute.dtype,
                         pointwise=self.compute.pointwise, name=name)(y)

    x = jnp.concatenate([features.astype(self.compute.dtype), heatmaps.astype(self.compute.dtype)], axis=-1)
    x = nn.relu(conv(x, self.channels, 1, "reduce"))
    x = nn.relu(conv(x, self.channels, self.kernel_size, "wide"))
    x = nn.relu(conv(x, 2 * self.channels, 1, "expand"))
    correction = layers.conv(self.num_points, 1, "heatmaps", dtype=self.compute.dtype, zero_init=True,
                             pointwise=self.compute.pointwise, name="heatmap")(x)
    return heatmaps.astype(self.compute.dtype) + correction


def refine(step: RefinementStep, features: jax.Array, heatmaps: jax.Array,
           steps: int) -> tuple[jax.Array, ...]:
  """(H_0, H_1, ..., H_steps): H_k = step(features, H_{k-1}), one shared step module."""
  maps = [heatmaps]
  for _ in range(steps):
    maps.append(step(features, maps[-1]))
  return tuple(maps)
