"""The hierarchical MiT encoder with optional FGSA injection."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax.models.compute import Compute
from fgtbt_jax.models.fgsa import FGSAStage
from fgtbt_jax.models.layers import layer_norm
from fgtbt_jax.models.mit import Block, OverlapPatchEmbed
from fgtbt_jax.models.remat import recompute_module

Dtype = Any


def drop_path_rates(depths: Sequence[int], rate: float) -> tuple[tuple[float, ...], ...]:
  """Per-stage stochastic-depth rates rising linearly from 0 to `rate` over all blocks."""
  flat = np.linspace(0.0, rate, sum(depths)).tolist()
  stages, first = [], 0
  for depth in depths:
    stages.append(tuple(flat[first:first + depth]))
    first += depth
  return tuple(stages)


class EncoderStage(nn.Module):
  """Patch embedding, `depth` blocks (each preceded by FGSA when on), LayerNorm.

  Attributes:
    dim, depth, num_heads, sr_ratio, patch_size, stride: the stage's shape.
    drop_path_rates: one stochastic-depth rate per block.
    patch_embed: "conv_stem" or "plain".
    fgsa: whether the FGSA branch is on.
    fgsa_reduction: r, the structure/prompt width divisor.
    fgsa_compat: "paper" or "authors" (`fgsa.FGSA_COMPAT`).
    batch_norm_unbiased_variance: BatchNorms update their running variance
      with the unbiased batch variance (PyTorch).
    norm_epsilon: block and stage LayerNorm epsilon.
    embed_norm_epsilon: patch-embedding and spatial-reduction LayerNorm epsilon.
    compute: how to compute (`compute.Compute`): dtype, the attention,
      depthwise and 1x1 convolution forms; `remat_blocks` recomputes each
      block's activations in the backward pass
      (`remat.recompute_in_backward`), `remat_segments` the patch embedding,
      the stage's final LayerNorm and FGSA's Refine and injections likewise.
  """

  dim: int
  depth: int
  num_heads: int
  sr_ratio: int
  patch_size: int
  stride: int
  drop_path_rates: tuple[float, ...]
  patch_embed: str = "conv_stem"
  fgsa: bool = False
  fgsa_reduction: int = 4
  fgsa_compat: str = "paper"
  batch_norm_unbiased_variance: bool = False
  norm_epsilon: float = 1e-6
  embed_norm_epsilon: float = 1e-5
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array, structure: jax.Array | None,
               train: bool) -> tuple[jax.Array, jax.Array | None]:
    """Maps (B, H, W, C_in) to the stage's (B, h, w, dim) output map.

    Also returns the next structure map (None when FGSA is off).
    """
    segments = self.compute.remat_segments
    tokens, grid = recompute_module(OverlapPatchEmbed, static_argnums=(2,), enabled=segments)(
        self.dim, self.patch_size, self.stride, kind=self.patch_embed,
        norm_epsilon=self.embed_norm_epsilon,
        batch_norm_unbiased_variance=self.batch_norm_unbiased_variance,
        compute=self.compute, name="patch_embed")(x, train)
    if self.fgsa:
      fgsa = FGSAStage(
          self.dim, self.depth, self.patch_size, self.stride, patch_embed=self.patch_embed,
          reduction=self.fgsa_reduction, embed_norm_epsilon=self.embed_norm_epsilon,
          compat=self.fgsa_compat,
          batch_norm_unbiased_variance=self.batch_norm_unbiased_variance,
          compute=self.compute, name="fgsa")
      prompt, structure = fgsa.prompt(tokens, structure, train)
    block_cls = recompute_module(Block, static_argnums=(2,), enabled=self.compute.remat_blocks)
    for j in range(self.depth):
      if self.fgsa:
        tokens = fgsa.inject(tokens, prompt, j, train)
      tokens = block_cls(
          self.dim, self.num_heads, self.sr_ratio, grid,
          drop_path=self.drop_path_rates[j], norm_epsilon=self.norm_epsilon,
          sr_norm_epsilon=self.embed_norm_epsilon, compute=self.compute,
          name=f"block_{j}")(tokens, train)
    tokens = layer_norm(self.norm_epsilon, dtype=self.compute.dtype, name="norm",
                        recompute=segments)(tokens)
    b = tokens.shape[0]
    out = tokens.reshape(b, *grid, self.dim)
    out = nn.with_logical_constraint(out, ("batch", "height", "width", "embed"))
    return out, (structure if self.fgsa else None)


class MixTransformer(nn.Module):
  """Four-stage MiT encoder; with FGSA when a structure image is given.

  Attributes:
    dims, depths, num_heads, sr_ratios, patch_sizes, strides: per-stage shape.
    drop_path_rate: stochastic depth of the last block; rates rise linearly
      from 0 over all blocks of all stages.
    Other attributes as in `EncoderStage`.
  """

  dims: Sequence[int]
  depths: Sequence[int]
  num_heads: Sequence[int]
  sr_ratios: Sequence[int]
  patch_sizes: Sequence[int] = (7, 3, 3, 3)
  strides: Sequence[int] = (4, 2, 2, 2)
  patch_embed: str = "conv_stem"
  fgsa: bool = False
  fgsa_reduction: int = 4
  fgsa_compat: str = "paper"
  batch_norm_unbiased_variance: bool = False
  drop_path_rate: float = 0.1
  norm_epsilon: float = 1e-6
  embed_norm_epsilon: float = 1e-5
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, images: jax.Array, structure: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, ...]:
    """Returns the four stage maps (B, H / 4, W / 4, C_1) ... (B, H / 32, W / 32, C_4).

    Args:
      images: (B, H, W, 3) normalised images.
      structure: (B, H, W, 3) high-frequency image; required iff `fgsa`.
      train: training mode (stochastic depth, batch statistics).
    """
    if self.fgsa != (structure is not None):
      raise ValueError("MixTransformer: pass a structure image exactly when fgsa is on")
    rates = drop_path_rates(self.depths, self.drop_path_rate)
    x = images.astype(self.compute.dtype)
    if structure is not None:
      structure = structure.astype(self.compute.dtype)
    outputs = []
    for i, depth in enumerate(self.depths):
      x, structure = EncoderStage(
          self.dims[i], depth, self.num_heads[i], self.sr_ratios[i],
          self.patch_sizes[i], self.strides[i], rates[i],
          patch_embed=self.patch_embed, fgsa=self.fgsa, fgsa_reduction=self.fgsa_reduction,
          fgsa_compat=self.fgsa_compat,
          batch_norm_unbiased_variance=self.batch_norm_unbiased_variance,
          norm_epsilon=self.norm_epsilon, embed_norm_epsilon=self.embed_norm_epsilon,
          compute=self.compute, name=f"stage_{i}")(x, structure, train)
      outputs.append(x)
    return tuple(outputs)
