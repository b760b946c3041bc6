"""FGSA: the frequency-guided structure-aware model (FGTBT paper section 3.3).

Two parts:
* a fixed (parameter-free) high-frequency extractor turning the normalised
  input image into a 3-channel structure image: the FFT Gaussian high-pass
  of the paper (eq. 17-20), or the two alternatives of its Table 7 (SRM
  filters, Haar wavelet high band);
* per encoder stage, an `FGSAStage` that refines the structure features to
  the stage's grid, builds the stage's prompt, and injects it before every
  Transformer block of the stage.

`FGSAStage.compat` chooses between the paper's FGSA ("paper") and the one the
authors' released code and weights compute ("authors", see `FGSA_COMPAT`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax.models import layers
from fgtbt_jax.models.compute import Compute
from fgtbt_jax.models.mit import OverlapPatchEmbed
from fgtbt_jax.models.remat import recompute_module

Dtype = Any

FREQUENCY_EXTRACTORS = ("fft", "srm", "wavelet")

# "paper": the FGSA of the paper (eq. 21-25). "authors": the FGSA of the
# authors' released PyTorch code, which their weights need: the concat order
# [x, F_s, F_pa]; the fused tokens reinterpreted raw as a channels-first map
# around channel attention, BN and the 1x1 conv (`raw_channels_first`);
# channel attention with MLP biases, pooled over the batch and space together.
FGSA_COMPAT = ("paper", "authors")

# The frequency sigma of the paper is in frequency-index units for a 480 x 480
# input; a fixed cut-off in cycles per pixel scales with the image size.
SIGMA_REFERENCE_SIZE = 480

# The three 5x5 SRM residual kernels of steganalysis rich models (Fridrich and
# Kodovsky 2012) as used on summed RGB in RGB-N style detectors: the "KV"
# second-order kernel, the 5x5 "square" kernel and a horizontal second
# difference.
SRM_KERNELS = np.stack([
    np.array([[0, 0, 0, 0, 0],
              [0, -1, 2, -1, 0],
              [0, 2, -4, 2, 0],
              [0, -1, 2, -1, 0],
              [0, 0, 0, 0, 0]], np.float32) / 4.0,
    np.array([[-1, 2, -2, 2, -1],
              [2, -6, 8, -6, 2],
              [-2, 8, -12, 8, -2],
              [2, -6, 8, -6, 2],
              [-1, 2, -2, 2, -1]], np.float32) / 12.0,
    np.array([[0, 0, 0, 0, 0],
              [0, 0, 0, 0, 0],
              [0, 1, -2, 1, 0],
              [0, 0, 0, 0, 0],
              [0, 0, 0, 0, 0]], np.float32) / 2.0,
])


def gaussian_highpass_mask(height: int, width: int, sigma_h: float, sigma_w: float) -> np.ndarray:
  """M_h(i, j) = 1 - exp(-((i - H//2)^2 / (2 sigma_h^2) + (j - W//2)^2 / (2 sigma_w^2))).

  The centred (fftshift-ed) Gaussian high-pass of paper eq. 19; with
  sigma_h = sigma_w it is exactly the paper's isotropic mask.
  """
  i = np.arange(height, dtype=np.float64)[:, None] - height // 2
  j = np.arange(width, dtype=np.float64)[None, :] - width // 2
  return 1.0 - np.exp(-(i**2 / (2 * sigma_h**2) + j**2 / (2 * sigma_w**2)))


def fft_high_frequency(images: jax.Array, sigma: float) -> jax.Array:
  """|Re(IFFT2(ifftshift(fftshift(FFT2(I)) * M_h)))| per channel (paper eq. 17-20).

  Args:
    images: (B, H, W, C) float images (normalised input).
    sigma: the Gaussian's sigma at a 480 x 480 input, in frequency-index
      units; it is scaled by H / 480 and W / 480 so the cut-off frequency in
      cycles per pixel is the same at every input size.

  Returns:
    (B, H, W, C) float32 high-frequency magnitude.
  """
  _, h, w, _ = images.shape
  scale = sigma / SIGMA_REFERENCE_SIZE
  mask = gaussian_highpass_mask(h, w, scale * h, scale * w)
  # ifftshift(fftshift(F) * M) == F * ifftshift(M): one precomputed mask.
  unshifted_mask = jnp.asarray(np.fft.ifftshift(mask), jnp.float32)[None, :, :, None]
  spectrum = jnp.fft.fft2(images.astype(jnp.float32), axes=(1, 2))
  filtered = jnp.fft.ifft2(spectrum * unshifted_mask, axes=(1, 2))
  return jnp.abs(jnp.real(filtered))


def srm_high_frequency(images: jax.Array) -> jax.Array:
  """The three SRM residuals of the summed RGB channels ('same' zero padding).

  Returns (B, H, W, 3) float32 residual maps (signed, as in SRM layers).
  """
  gray = jnp.sum(images.astype(jnp.float32), axis=-1, keepdims=True)
  kernel = jnp.asarray(SRM_KERNELS.transpose(1, 2, 0)[:, :, None, :])  # (5, 5, 1, 3)
  return jax.lax.conv_general_dilated(
      gray, kernel, window_strides=(1, 1), padding=((2, 2), (2, 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def wavelet_high_frequency(images: jax.Array) -> jax.Array:
  """|single-level Haar reconstruction from the detail bands only| per channel.

  Zeroing the LL band of a one-level orthonormal Haar transform and inverting
  leaves I - (2x2 block mean of I, repeated over the block): the LH, HL and
  HH content at full resolution. H and W must be even.
  """
  b, h, w, c = images.shape
  if h % 2 or w % 2:
    raise ValueError(f"wavelet extractor needs even height and width, got {h}x{w}")
  x = images.astype(jnp.float32)
  blocks = x.reshape(b, h // 2, 2, w // 2, 2, c)
  low = jnp.mean(blocks, axis=(2, 4), keepdims=True)
  return jnp.abs(blocks - low).reshape(b, h, w, c)


def high_frequency_image(images: jax.Array, extractor: str, sigma: float) -> jax.Array:
  """The 3-channel structure image fed to FGSA, by extractor name."""
  if extractor == "fft":
    return fft_high_frequency(images, sigma)
  if extractor == "srm":
    return srm_high_frequency(images)
  if extractor == "wavelet":
    return wavelet_high_frequency(images)
  raise ValueError(
      f"unknown frequency_extractor {extractor!r}; expected one of {FREQUENCY_EXTRACTORS}")


def raw_channels_first(tokens: jax.Array) -> jax.Array:
  """(B, N, D) tokens read as the raw buffer of a (B, D, N) map, returned channels last.

  The authors' FGSA reshapes its (B, N, D) token tensor to (B, D, A, A)
  without a transpose: channel c of that map is the flat run
  `tokens.reshape(B, -1)[:, c * N:(c + 1) * N]`. This returns that map as
  (B, N, D) (position, channel), so the layers that follow act on its
  channels. BN, channel attention and a 1x1 conv treat all positions alike,
  so the (A, A) grid itself never needs forming.
  """
  b, n, d = tokens.shape
  return tokens.reshape(b, d, n).transpose(0, 2, 1)


def raw_tokens(channels_last: jax.Array) -> jax.Array:
  """The inverse of `raw_channels_first`: the map's raw buffer read back as (B, N, D) tokens."""
  b, n, d = channels_last.shape
  return channels_last.transpose(0, 2, 1).reshape(b, n, d)


class ChannelAttention(nn.Module):
  """CBAM channel attention.

  Average- and max-pooled descriptors of the tokens go through one shared
  MLP (bottleneck width / reduction, ReLU between); their sum through a
  sigmoid rescales the channels. The paper's form pools per sample and has
  no MLP biases; the authors' code (`use_bias`, `pool_batch`) has biases and
  pools over the batch and the tokens together, one scale for the whole
  batch, so a sample's output depends on its batch-mates.

  Attributes:
    reduction: bottleneck width divisor (16).
    use_bias: biases in both MLP layers.
    pool_batch: pool over the batch too.
    compute: how to compute (`compute.Compute`: its dtype).
  """

  reduction: int = 16
  use_bias: bool = False
  pool_batch: bool = False
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Rescales the channels of (B, N, D) tokens."""
    channels = x.shape[-1]
    hidden = max(1, channels // self.reduction)
    dtype = self.compute.dtype
    squeeze = layers.dense(hidden, "fused", "prompt", use_bias=self.use_bias, dtype=dtype,
                           name="squeeze")
    excite = layers.dense(channels, "prompt", "fused", use_bias=self.use_bias, dtype=dtype,
                          name="excite")
    mlp = lambda d: excite(nn.relu(squeeze(d)))
    axes = (0, 1) if self.pool_batch else 1
    logits = mlp(jnp.mean(x, axis=axes)) + mlp(jnp.max(x, axis=axes))
    if self.pool_batch:
      return x * nn.sigmoid(logits)
    return x * nn.sigmoid(logits)[:, None, :]


class FGSAStage(nn.Module):
  """FGSA for one encoder stage of width C (paper eq. 21-25).

  `prompt` runs once per stage: Refine (a patch embedding of the stage's
  shape with C / r channels) turns the previous structure map into structure
  tokens F_s on the stage's grid; Linear(C, C / r) turns the freshly
  embedded image tokens into F_pa; the prompt is concat(F_pa, F_s) (C / 2).
  `inject` runs before every block j:
  f = concat(x, prompt) (1.5 C); f = f + Conv1x1(ReLU(BN(CA(f))));
  x = x + Linear_s(GELU(Linear_us_j(f))) where channel attention CA, BN,
  Conv1x1 and Linear_s(C / r -> C) are shared by the stage and
  Linear_us_j(1.5 C -> C / r) belongs to block j.

  With `compat="authors"` (the released code): the prompt is
  concat(F_s, F_pa), so f = [x, F_s, F_pa]; CA, BN and Conv1x1 act on
  `raw_channels_first(f)` and their output is read back with `raw_tokens`;
  CA has MLP biases and pools over the batch too. Square grids only.

  Attributes:
    dim: C.
    depth: blocks in the stage.
    patch_size, stride, patch_embed: the stage's patch-embedding shape.
    reduction: r (4 in the paper).
    attention_reduction: CA bottleneck reduction (16).
    embed_norm_epsilon: epsilon of Refine's LayerNorm.
    compat: "paper" or "authors" (see above and `FGSA_COMPAT`).
    batch_norm_unbiased_variance: BatchNorms update their running variance
      with the unbiased batch variance (PyTorch).
    compute: how to compute (`compute.Compute`): dtype, the 1x1 convolutions
      of Refine's conv stem; with `remat_segments` Refine and each injection
      keep only their inputs and run again in the backward pass
      (`remat.recompute_in_backward`; the "segments" policy).
  """

  dim: int
  depth: int
  patch_size: int
  stride: int
  patch_embed: str = "conv_stem"
  reduction: int = 4
  attention_reduction: int = 16
  embed_norm_epsilon: float = 1e-5
  compat: str = "paper"
  batch_norm_unbiased_variance: bool = False
  compute: Compute = Compute()

  def setup(self):
    if self.compat not in FGSA_COMPAT:
      raise ValueError(f"unknown fgsa_compat {self.compat!r}; expected one of {FGSA_COMPAT}")
    authors = self.compat == "authors"
    narrow = self.dim // self.reduction
    fused = self.dim + 2 * narrow
    dtype = self.compute.dtype
    self.refine = recompute_module(OverlapPatchEmbed, static_argnums=(2,),
                                   enabled=self.compute.remat_segments)(
        narrow, self.patch_size, self.stride, kind=self.patch_embed,
        norm_epsilon=self.embed_norm_epsilon, axis="prompt",
        batch_norm_unbiased_variance=self.batch_norm_unbiased_variance, compute=self.compute)
    self.image_proj = layers.dense(narrow, "embed", "prompt", dtype=dtype)
    self.channel_attention = ChannelAttention(
        self.attention_reduction, use_bias=authors, pool_batch=authors, compute=self.compute)
    self.norm = layers.batch_norm(dtype=dtype, unbiased_variance=self.batch_norm_unbiased_variance)
    self.conv = layers.dense(fused, "conv_in", "fused", dtype=dtype)
    self.reduce = [layers.dense(narrow, "fused", "prompt", dtype=dtype)
                   for _ in range(self.depth)]
    self.expand = layers.dense(self.dim, "prompt", "embed", dtype=dtype)

  def prompt(self, tokens: jax.Array, structure: jax.Array,
             train: bool) -> tuple[jax.Array, jax.Array]:
    """The stage prompt F_p and the structure map for the next stage.

    Args:
      tokens: (B, h * w, C) image tokens right after the patch embedding.
      structure: (B, H', W', C') previous structure map (the high-frequency
        image for stage 1).
      train: batch-norm mode.

    Returns:
      prompt (B, h * w, C / 2) and structure map (B, h, w, C / r).
    """
    structure_tokens, (h, w) = self.refine(structure, train)
    if structure_tokens.shape[1] != tokens.shape[1]:
      raise ValueError(
          f"FGSA: structure grid {h}x{w} does not match {tokens.shape[1]} image tokens")
    if self.compat == "authors":
      if h != w:
        # Their code reshapes the N tokens to sqrt(N) x sqrt(N).
        raise ValueError(f"FGSA fgsa_compat='authors' needs square inputs; a stage grid is "
                         f"{h}x{w}")
      prompt = jnp.concatenate([structure_tokens, self.image_proj(tokens)], axis=-1)
    else:
      prompt = jnp.concatenate([self.image_proj(tokens), structure_tokens], axis=-1)
    b = structure_tokens.shape[0]
    return prompt, structure_tokens.reshape(b, h, w, -1)

  def inject(self, x: jax.Array, prompt: jax.Array, block: int, train: bool) -> jax.Array:
    """x + FGSA(x, prompt) before block `block` of the stage."""
    if self.compute.remat_segments:
      return _recomputed_inject(self, x, prompt, block, train)
    return self._inject(x, prompt, block, train)

  def _inject(self, x: jax.Array, prompt: jax.Array, block: int, train: bool) -> jax.Array:
    f = jnp.concatenate([x, prompt.astype(x.dtype)], axis=-1)
    if self.compat == "authors":
      f = f + raw_tokens(self._refine_fused(raw_channels_first(f), train))
    else:
      f = f + self._refine_fused(f, train)
    f = self.expand(layers.gelu(self.reduce[block](f)))
    return x + f

  def _refine_fused(self, f: jax.Array, train: bool) -> jax.Array:
    """Conv1x1(ReLU(BN(CA(f)))) over the channels of (B, N, 1.5 C) f."""
    g = self.channel_attention(f)
    g = nn.relu(self.norm(g, use_running_average=not train))
    return self.conv(g)


# The injection with its 1.5 C-wide intermediates recomputed in the backward pass.
_recomputed_inject = recompute_module(FGSAStage._inject, static_argnums=(3, 4))
