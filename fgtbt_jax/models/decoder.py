"""Decoder head: SegFormer all-MLP fusion + heatmap upsampling (SPEC 2.3)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fgtbt_jax.models import heads as heads_lib
from fgtbt_jax.models.hallucination import DualHallucination
from fgtbt_jax.models import layers
from fgtbt_jax.models import remat
from fgtbt_jax.models.layers import bilinear_matrix
from fgtbt_jax.models.compute import Compute

Dtype = Any

# Name scope of the bilinear resizes: interpolation, not a learned layer, so
# the MAC counter (`cost.py`) leaves its internal matrix products out.
RESIZE_SCOPE = "bilinear_resize"
# Name scope of the composed fusion's weight products (E_i F_i): once per
# forward pass whatever the batch, a transform of the parameters; the MAC
# counter leaves them out of the per-image count (`cost.py`).
WEIGHT_SCOPE = "composed_weights"
# How the head fuses the stages (`DecoderHead.fusion`).
FUSIONS = ("composed", "concat")


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of (B, H, W, C) maps, as PyTorch with `align_corners=False`.

  Two small matrix products with weights fixed at trace time (cheaper to
  compile than `jax.image.resize`, and exact PyTorch semantics also when
  shrinking).
  """
  _, h, w, _ = x.shape
  with jax.named_scope(RESIZE_SCOPE):
    return layers.separable_matmul(x, bilinear_matrix(h, height), bilinear_matrix(w, width))


class ConvBlock(nn.Module):
  """Pre-activation bottleneck residual block (in -> features).

  BN-ReLU-1x1(features / 2)-BN-ReLU-3x3(features / 2)-BN-ReLU-1x1(features),
  plus a BN-ReLU-1x1(features) shortcut when the width changes. Convolutions
  have no bias (each feeds a BatchNorm or the residual sum).
  `batch_norm_unbiased_variance` and `compute` as in `DecoderHead`.
  """

  features: int
  batch_norm_unbiased_variance: bool = False
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = self.features // 2

    def bn_relu(y, name):
      y = layers.batch_norm(dtype=self.compute.dtype, unbiased_variance=self.batch_norm_unbiased_variance,
                            name=name)(y, use_running_average=not train)
      return nn.relu(y)

    def conv(y, features, k, name):
      return layers.conv(features, k, "decoder", padding=k // 2, use_bias=False,
                         dtype=self.compute.dtype, pointwise=self.compute.pointwise, name=name)(y)

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

  The fusion is computed in its composed form by default
  (`compute.decoder_fusion`): the
  per-stage linears, the bilinear resize and the fusion 1x1 conv are all
  linear, so

    fuse(concat_i resize(embed_i(c_i))) = sum_i resize(c_i @ (E_i F_i)) + sum_i b_i F_i

  with E_i, b_i embed_i's kernel and bias and F_i fuse's rows of stage i
  (resize keeps constants: its weights sum to 1). Each stage's features are
  mapped by the composed (C_i, decoder_dim) matrix at their own resolution,
  and no (4 * decoder_dim)-channel map is formed: 17.6 G instead of 51.5 G
  multiply-adds per 480 px image for the paper network (57.8 G in all;
  the weight products E_i F_i, 0.6 G, are once per pass). The parameters
  (and so checkpoints) are those of the concatenated form ("concat"), which
  gives the same outputs within float rounding.

  Attributes:
    decoder_dim: per-stage embedding width (768 in the paper).
    head_channels: width after the fusion (256).
    upsample_channels: ConvBlock / transposed-conv width (128).
    num_points: output heatmaps (124).
    dropout: dropout rate after the fusion (0.1).
    batch_norm_unbiased_variance: BatchNorms update their running variance
      with the unbiased batch variance (PyTorch).
    head: the landmark head and DHLN on the upsampled features
      (`heads.HeadOptions`; the FGTBT "heatmap" head by default). The call
      returns the head's named outputs ({"heatmaps": ...} for "heatmap"),
      and with `head.hallucination` needs the input images and adds
      "hallucination", the face at `image_upscale` times the input size.
    image_upscale: how much larger than the images it reads DHLN's face is
      (the model's `input_downsample`: the network's input is the crop
      reduced by it; 1 by default).
    compute: how to compute (`compute.Compute`): dtype, the fusion form
      ("composed", the default, or "concat", `FUSIONS`; see above), the 1x1
      convolutions (`layers.POINTWISE_IMPLEMENTATIONS`: "conv", or "dot", a
      matmul).
  """

  decoder_dim: int = 768
  head_channels: int = 256
  upsample_channels: int = 128
  num_points: int = 124
  dropout: float = 0.1
  batch_norm_unbiased_variance: bool = False
  head: heads_lib.HeadOptions = heads_lib.HeadOptions()
  image_upscale: int = 1
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool,
               images: jax.Array | None = None) -> dict[str, Any]:
    if self.compute.decoder_fusion not in FUSIONS:
      raise ValueError(f"unknown decoder fusion {self.compute.decoder_fusion!r}; expected one of {FUSIONS}")
    options = self.head
    heads_lib.get_head(options.head)
    _, h, w, _ = features[0].shape
    stages = list(reversed(range(len(features))))  # Concatenation order: stage 4 first.
    embeds = {i: layers.dense(self.decoder_dim, "embed", "decoder", dtype=self.compute.dtype,
                              name=f"embed_{i}") for i in stages}
    fuse = layers.conv(self.decoder_dim, 1, "decoder", use_bias=False, dtype=self.compute.dtype,
                       pointwise=self.compute.pointwise, name="fuse")
    if self.compute.decoder_fusion == "concat":
      embedded = []
      for i in stages:
        y = embeds[i](features[i])
        if y.shape[1:3] != (h, w):
          y = resize_bilinear(y, h, w)
        embedded.append(y)
      y = fuse(jnp.concatenate(embedded, axis=-1))
    else:
      y = self._composed(features, stages, embeds, fuse, h, w)
    y = checkpoint_name(y, remat.DECODER_FUSION)
    y = layers.batch_norm(dtype=self.compute.dtype, unbiased_variance=self.batch_norm_unbiased_variance,
                          name="fuse_norm")(y, use_running_average=not train)
    y = nn.relu(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = layers.conv(self.head_channels, 1, "decoder", dtype=self.compute.dtype,
                    pointwise=self.compute.pointwise, name="project")(y)
    y = nn.with_logical_constraint(y, ("batch", "height", "width", "decoder"))
    y = ConvBlock(self.upsample_channels,
                  batch_norm_unbiased_variance=self.batch_norm_unbiased_variance,
                  compute=self.compute,
                  name="conv_block")(y, train)
    y = layers.conv_transpose(self.upsample_channels, 4, 2, 1, "decoder", dtype=self.compute.dtype,
                              name="upsample")(y)
    outputs = {}
    if options.hallucination:
      if images is None:
        raise ValueError("DecoderHead: hallucination needs the input images")
      y, outputs["hallucination"] = DualHallucination(
          options.hallucination_channels, options.hallucination_blocks,
          upscale=self.image_upscale, compute=self.compute, name="hallucination")(y, images)
    heatmaps = layers.conv(self.num_points, 3, "heatmaps", padding=1, use_bias=False,
                           dtype=self.compute.dtype, name="heatmap")(y)
    if options.head == "hih":
      decimal = heads_lib.DecimalHead(
          decimal_size=options.hih_decimal_size, channels=options.hih_channels,
          num_points=self.num_points,
          batch_norm_unbiased_variance=self.batch_norm_unbiased_variance,
          compute=self.compute,
          name="decimal_head")(y, heatmaps, train)
      return {"heatmaps": heatmaps, "decimal": decimal, **outputs}
    if options.head == "recurrent":
      step = heads_lib.RefinementStep(
          channels=options.recurrent_channels, kernel_size=options.recurrent_kernel,
          num_points=self.num_points, compute=self.compute,
          name="refine")
      maps = heads_lib.refine(step, y, heatmaps, options.recurrent_steps)
      return {"heatmaps": maps[-1], "step_heatmaps": maps, **outputs}
    return {"heatmaps": heatmaps, **outputs}

  def _composed(self, features, stages, embeds, fuse, h: int, w: int) -> jax.Array:
    """The fusion as sum_i resize(c_i @ (E_i F_i)) + sum_i b_i F_i (see the class doc)."""
    d = self.decoder_dim
    # The concatenated form's parameter tree, applied the composed way.
    fuse_kernel = layers.bound_params(fuse, (0, 1, 1, len(stages) * d), self.compute.dtype)["kernel"]
    fuse_kernel = fuse_kernel.reshape(len(stages) * d, d)
    total, bias = None, jnp.zeros((d,), jnp.float32)
    for block, i in enumerate(stages):
      params = layers.bound_params(embeds[i], (0, features[i].shape[-1]), self.compute.dtype)
      rows = fuse_kernel[block * d:(block + 1) * d]  # (d, d): F_i
      with jax.named_scope(WEIGHT_SCOPE):
        composed = (params["kernel"] @ rows).astype(self.compute.dtype)  # (C_i, d): E_i F_i
        bias = bias + params["bias"] @ rows
      y = jnp.einsum("bhwc,cd->bhwd", features[i].astype(self.compute.dtype), composed)
      if y.shape[1:3] != (h, w):
        y = resize_bilinear(y, h, w)
      total = y if total is None else total + y
    return total + bias.astype(self.compute.dtype)
