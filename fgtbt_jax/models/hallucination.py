"""DHLN on the FGTBT head: a face-hallucination stream fused with the landmark stream.

SHT's Dual Hallucination Learning Network (SHT paper, section 3.1) runs two
streams on a low-resolution face: a landmark-heatmap stream (a stacked
hourglass in the paper; here FGTBT's decoder) and a face-hallucination stream
of super-resolution blocks, fused twice:

  FUBlock1 (eq. 1)  Q' = Q + Q * sigmoid(RB(P))   the landmark stream's features
                                                 P as pose attention on the
                                                 super-resolution features Q
  FUBlock2 (eq. 2)  P' = P + conv(P || Q')         the attended features back
                                                 into the landmark stream

and the hallucinated face comes out of Q'. On this network P is the decoder's
upsampled map at half the input size (`DecoderHead`, after its transposed
convolution; `upsample_channels` wide), where the head's heatmaps are made:
the heads (heatmap, HIH, recurrent) then read P' instead of P. The paper's
hourglass repeats the pair of fusions once per stack; FGTBT's decoder is one
stage, so there is one pair.

`DualHallucination`:
  Q0 = conv3x3 stride 2 (the input image)                       (B, S/2, S/2, C)
  Q  = `blocks` residual super-resolution blocks (EDSR form: x + conv(relu(conv(x))))
  Q' = Q + Q * sigmoid(RB(P))          RB: a residual block from P's width to C
  P' = P + conv1x1(P || Q')             zero-initialised: P' = P at the start
  hallucinated = up_u(input) + pixel_shuffle_x2u(conv3x3(Q'))  (B, uS, uS, 3)
with u = `upscale` (1; SHT-M's small input, the model's `input_downsample`:
the face at the crop's size from the reduced input, up_u bilinear), the
output conv zero-initialised too, so an untrained stream returns its
(upsampled) input and a trained FGTBT fine-tunes from exactly its own
outputs. The hallucinated face is in the input's
(ImageNet-normalised) space; `losses.hallucination_loss` compares it with the
high-resolution crop in [0, 1].

Also here: the low-resolution inputs of the training mode (`degrade`,
`random_degrade`: area downsampling by an integer factor and bilinear
upsampling back to the input size, as the `lowres` study's evaluation
degrades test faces; `area_downsample` also reduces the crop of a
small-input network), and SHT's second view of a face (`paired_view`:
rotated and scaled on device with its points) for SHT's weak supervision
(`train.train_loss` with FPTN, `models.fptn`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgtbt_jax.models import heads
from fgtbt_jax.models import layers
from fgtbt_jax.models.compute import Compute

Dtype = Any


def area_downsample(images: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C) -> (B, H / factor, W / factor, C): the mean of each factor x factor cell.

  A separable matrix product (`layers.separable_matmul`), float32 for
  float32 input; H and W must divide by `factor` (ValueError otherwise).
  """
  _, h, w, _ = images.shape
  if h % factor or w % factor:
    raise ValueError(f"area_downsample: {h}x{w} px does not divide by the factor {factor}")
  if factor == 1:
    return images
  return layers.separable_matmul(images, heads.area_matrix(h, h // factor),
                                 heads.area_matrix(w, w // factor))


def bilinear_upsample(images: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C) -> (B, H * factor, W * factor, C), bilinear with half-pixel centres
  (PyTorch's align_corners=False, OpenCV's INTER_LINEAR)."""
  if factor == 1:
    return images
  _, h, w, _ = images.shape
  return layers.separable_matmul(images, layers.bilinear_matrix(h, h * factor),
                                 layers.bilinear_matrix(w, w * factor))


def degrade(images: jax.Array, factor: int) -> jax.Array:
  """(B, S, S, 3) 0-255 images downsampled by `factor` (area) and upsampled back (bilinear).

  The result is rounded to whole values, as a uint8 image would be. Both
  resamplings are separable matrix products (`layers.separable_matmul`); the
  bilinear one has PyTorch's and OpenCV's half-pixel centres.
  """
  images = jnp.asarray(images, jnp.float32)
  if factor == 1:
    return images
  _, h, w, _ = images.shape
  if h % factor or w % factor:
    raise ValueError(f"degrade: {h}x{w} px does not divide by the factor {factor}")
  back = bilinear_upsample(area_downsample(images, factor), factor)
  return jnp.clip(jnp.round(back), 0.0, 255.0)


def random_degrade(images: jax.Array, key: jax.Array, factors: Sequence[int],
                   probability: float) -> jax.Array:
  """Per sample: with `probability`, `degrade` by a factor drawn uniformly from `factors`.

  (B, S, S, 3) 0-255 images -> float32 0-255 images of the same shape; the
  other samples are returned as they are (float32).
  """
  images = jnp.asarray(images, jnp.float32)
  if not factors:
    return images
  pick_key, apply_key = jax.random.split(key)
  batch = images.shape[0]
  pick = jax.random.randint(pick_key, (batch,), 0, len(factors))
  apply = jax.random.uniform(apply_key, (batch,)) < probability
  out = images
  for index, factor in enumerate(factors):
    chosen = (apply & (pick == index))[:, None, None, None]
    out = jnp.where(chosen, degrade(images, int(factor)), out)
  return out


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
  """(B, H, W, C * s * s) -> (B, H * s, W * s, C): sub-pixel rearrangement."""
  b, h, w, c = x.shape
  out = c // (scale * scale)
  x = x.reshape(b, h, w, scale, scale, out)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * scale, w * scale, out)


class SRBlock(nn.Module):
  """A super-resolution residual block: x + conv3x3(relu(conv3x3(x)))."""

  features: int
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.conv(self.features, 3, "decoder", padding=1, dtype=self.compute.dtype,
                    name="conv1")(x)
    y = layers.conv(self.features, 3, "decoder", padding=1, dtype=self.compute.dtype,
                    name="conv2")(nn.relu(y))
    return x + y


class ResidualProjection(nn.Module):
  """SHT's RB: a residual block from one width to another.

  conv1x1(x) + conv3x3(relu(conv3x3(x))), all to `features` channels.
  """

  features: int
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = layers.conv(self.features, 1, "decoder", dtype=self.compute.dtype,
                           pointwise=self.compute.pointwise, name="shortcut")(x)
    y = layers.conv(self.features, 3, "decoder", padding=1, dtype=self.compute.dtype,
                    name="conv1")(x)
    y = layers.conv(self.features, 3, "decoder", padding=1, dtype=self.compute.dtype,
                    name="conv2")(nn.relu(y))
    return shortcut + y


def pose_attention(q: jax.Array, attention_logits: jax.Array) -> jax.Array:
  """FUBlock1, SHT eq. (1): Q' = Q + Q * sigmoid(RB(P)), given RB(P)."""
  return q + q * nn.sigmoid(attention_logits)


class DualHallucination(nn.Module):
  """The face-hallucination stream and its two fusions with the landmark stream.

  Attributes:
    channels: C, the width of the super-resolution features Q.
    blocks: super-resolution blocks before the fusion (SHT: 4 per module).
    upscale: u, how much larger than its input the hallucinated face is (1;
      SHT-M's 64 px input for a 256 px face: 4; the model's
      `input_downsample`): the face is the bilinearly upsampled input plus
      a pixel-shuffled residual of 3 (2u)^2 channels.
    compute: how to compute (`compute.Compute`).

  Call: (pose features P (B, S/2, S/2, Cp), input images (B, S, S, 3)
  normalised) -> (P' of P's shape, hallucinated face (B, uS, uS, 3) in the
  input's normalised space), both in the compute dtype.
  """

  channels: int = 32
  blocks: int = 4
  upscale: int = 1
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, pose: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    dtype = self.compute.dtype
    _, h, w, _ = images.shape
    if pose.shape[1:3] != (h // 2, w // 2):
      raise ValueError(f"DualHallucination: pose features {pose.shape[1:3]} are not half "
                       f"the input {h}x{w}")
    q = layers.conv(self.channels, 3, "decoder", strides=2, padding=1, dtype=dtype,
                    name="stem")(images.astype(dtype))
    for i in range(self.blocks):
      q = SRBlock(self.channels, compute=self.compute, name=f"sr_block_{i}")(q)
    attention = ResidualProjection(self.channels, compute=self.compute, name="pose_attention")(pose)
    q = pose_attention(q, attention)
    fused = layers.conv(pose.shape[-1], 1, "decoder", dtype=dtype, zero_init=True,
                        pointwise=self.compute.pointwise,
                        name="pose_fusion")(jnp.concatenate([pose, q.astype(pose.dtype)], -1))
    pose = pose + fused
    shuffle = 2 * self.upscale
    residual = layers.conv(3 * shuffle * shuffle, 3, "decoder", padding=1, dtype=dtype,
                           zero_init=True, name="image_out")(q)
    hallucinated = bilinear_upsample(images.astype(dtype), self.upscale) + pixel_shuffle(
        residual, shuffle)
    return pose, hallucinated


def paired_view(images: jax.Array, points: jax.Array, key: jax.Array,
                max_rotation: float = 30.0, scale_range: tuple[float, float] = (0.8, 1.2)
                ) -> tuple[jax.Array, jax.Array]:
  """A second view of each face, as SHT pairs views of one image (section 4, "paired images").

  Per sample an angle uniform in (-max_rotation, max_rotation) degrees and a
  scale uniform in `scale_range`, about the crop centre c = (S - 1) / 2:
  p' = s R(angle) (p - c) + c for the points (B, K, 2) x, y in input pixels,
  and the image (B, S, S, C) resampled to match (bilinear; outside the
  crop is 0). Returns (images float32, points float32). SHT draws both from
  a Gaussian clipped to these ranges; uniform draws here.
  """
  images = jnp.asarray(images, jnp.float32)
  points = jnp.asarray(points, jnp.float32)
  batch, height, width, _ = images.shape
  angle_key, scale_key = jax.random.split(key)
  angle = jnp.deg2rad(jax.random.uniform(angle_key, (batch,), minval=-max_rotation,
                                         maxval=max_rotation))
  scale = jax.random.uniform(scale_key, (batch,), minval=scale_range[0], maxval=scale_range[1])
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  rotation = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)  # (B, 2, 2)
  centre = jnp.asarray([(width - 1) / 2.0, (height - 1) / 2.0], jnp.float32)
  moved = scale[:, None, None] * jnp.einsum("bij,bkj->bki", rotation, points - centre) + centre
  # Each output pixel q reads the input at R^T (q - c) / s + c.
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
  grid = jnp.stack([xs.ravel(), ys.ravel()], -1) - centre  # (H W, 2) x, y
  source = jnp.einsum("bji,nj->bni", rotation, grid) / scale[:, None, None] + centre

  def sample(image, where):  # (H, W, C), (H W, 2) -> (H, W, C)
    coords = [where[:, 1], where[:, 0]]
    return jax.vmap(lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, coords, order=1, mode="constant", cval=0.0), in_axes=-1, out_axes=-1)(
            image).reshape(height, width, -1)

  return jax.vmap(sample)(images, source), moved
