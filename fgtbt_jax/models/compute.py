"""How the network is computed, apart from what it is: one frozen options object.

The model config says what the network is (widths, depths, FGSA, head) and,
in seven fields, how to compute it: `dtype`, `remat`, `remat_policy`,
`attention_impl`, `depthwise_impl`, `pointwise_impl`, `decoder_fusion`. None
of the seven changes the parameters or (within float rounding) the outputs;
a run may change them on resume (`COMPUTE_FIELDS`). `compute_options` turns
them into one `Compute` that every module of the network takes as its
`compute` attribute, instead of each constructor threading the fields one by
one. The "auto" choices resolve when `compute_options` runs, for the devices
the network is traced for (`partitioning.target_platform`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from fgtbt_jax.models.remat import resolve_remat_policy

# The model config fields that say how the network is computed.
COMPUTE_FIELDS = ("dtype", "remat", "remat_policy", "attention_impl", "depthwise_impl",
                  "pointwise_impl", "decoder_fusion")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Compute:
  """How every module of the network computes.

  Attributes:
    dtype: compute dtype (parameters stay float32).
    remat_blocks: each Transformer block keeps only its input and runs again
      in the backward pass (`remat.recompute_in_backward`): `model.remat`,
      or the "segments" policy.
    remat_segments: the patch embeddings, stage-end LayerNorms, FGSA's
      Refine and injections too (the "segments" policy; the decoder is
      wrapped by `build_model`).
    attention: the attention core (`mit.attention_core`).
    depthwise: the Mix-FFN depthwise convolution (`mit.MixFFN`; "auto"
      resolves when the module runs).
    pointwise: the 1x1 convolutions (`layers.conv`).
    decoder_fusion: how the decoder fuses the stages (`decoder.FUSIONS`).
  """

  dtype: Any = jnp.float32
  remat_blocks: bool = False
  remat_segments: bool = False
  attention: str = "xla"
  depthwise: str = "auto"
  pointwise: str = "conv"
  decoder_fusion: str = "composed"


def compute_options(config: ml_collections.ConfigDict) -> Compute:
  """The `Compute` of a model config (its `COMPUTE_FIELDS`)."""
  if config.dtype not in DTYPES:
    raise ValueError(f"model config: dtype={config.dtype!r}; expected one of {tuple(DTYPES)}")
  segments = resolve_remat_policy(config.remat_policy) == "segments"
  return Compute(
      dtype=DTYPES[config.dtype], remat_blocks=bool(config.remat) or segments,
      remat_segments=segments, attention=config.attention_impl,
      depthwise=config.depthwise_impl, pointwise=config.pointwise_impl,
      decoder_fusion=config.decoder_fusion)
