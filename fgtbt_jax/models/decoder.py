"""Decoder head: SegFormer all-MLP fusion + heatmap upsampling (SPEC 2.3)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgtbt_jax.models import layers

Dtype = Any

# Name scope of the bilinear resizes: interpolation, not a learned layer, so
# the MAC counter (`cost.py`) leaves its internal matrix products out.
RESIZE_SCOPE = "bilinear_resize"


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize with half-pixel centres (PyTorch `align_corners=False`).

  Without antialiasing, so it also matches PyTorch when shrinking.
  """
  b, _, _, c = x.shape
  with jax.named_scope(RESIZE_SCOPE):
    return jax.image.resize(x, (b, height, width, c), method="bilinear", antialias=False)


class ConvBlock(nn.Module):
  """Pre-activation bottleneck residual block (in -> features).

  BN-ReLU-1x1(features / 2)-BN-ReLU-3x3(features / 2)-BN-ReLU-1x1(features),
  plus a BN-ReLU-1x1(features) shortcut when the width changes. Convolutions
  have no bias (each feeds a BatchNorm or the residual sum).
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = self.features // 2

    def bn_relu(y, name):
      y = layers.batch_norm(dtype=self.dtype, name=name)(y, use_running_average=not train)
      return nn.relu(y)

    def conv(y, features, k, name):
      return layers.conv(features, k, "decoder", padding=k // 2, use_bias=False,
                         dtype=self.dtype, name=name)(y)

    y = conv(bn_relu(x, "norm1"), hidden, 1, "conv1")
    y = conv(bn_relu(y, "norm2"), hidden, 3, "conv2")
    y = conv(bn_relu(y, "norm3"), self.features, 1, "conv3")
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = conv(bn_relu(x, "shortcut_norm"), self.features, 1, "shortcut")
    return y + shortcut


class DecoderHead(nn.Module):
  """Fuses the four stage maps and decodes heatmaps at half the input size.

  Per stage Linear(C_i, decoder_dim) and bilinear resize to the stage-1 grid;
  concat (stage 4 first) -> 1x1 conv (no bias) + BN + ReLU -> dropout ->
  1x1 conv -> ConvBlock -> ConvTranspose(4, stride 2, padding 1) ->
  3x3 conv (no bias) -> num_points channels.

  Attributes:
    decoder_dim: per-stage embedding width (768 in the paper).
    head_channels: width after the fusion (256).
    upsample_channels: ConvBlock / transposed-conv width (128).
    num_points: output heatmaps (124).
    dropout: dropout rate after the fusion (0.1).
    dtype: compute dtype.
  """

  decoder_dim: int = 768
  head_channels: int = 256
  upsample_channels: int = 128
  num_points: int = 124
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
    _, h, w, _ = features[0].shape
    embedded = []
    for i in reversed(range(len(features))):
      y = layers.dense(self.decoder_dim, "embed", "decoder", dtype=self.dtype,
                       name=f"embed_{i}")(features[i])
      if y.shape[1:3] != (h, w):
        y = resize_bilinear(y, h, w)
      embedded.append(y)
    y = jnp.concatenate(embedded, axis=-1)
    y = layers.conv(self.decoder_dim, 1, "decoder", use_bias=False, dtype=self.dtype,
                    name="fuse")(y)
    y = layers.batch_norm(dtype=self.dtype, name="fuse_norm")(y, use_running_average=not train)
    y = nn.relu(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = layers.conv(self.head_channels, 1, "decoder", dtype=self.dtype, name="project")(y)
    y = nn.with_logical_constraint(y, ("batch", "height", "width", "decoder"))
    y = ConvBlock(self.upsample_channels, dtype=self.dtype, name="conv_block")(y, train)
    y = layers.conv_transpose(self.upsample_channels, 4, 2, 1, "decoder", dtype=self.dtype,
                              name="upsample")(y)
    return layers.conv(self.num_points, 3, "heatmaps", padding=1, use_bias=False,
                       dtype=self.dtype, name="heatmap")(y)
