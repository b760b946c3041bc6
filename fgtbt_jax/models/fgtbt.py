"""The FGTBT network and its factory.

Calling convention:
  variables = model.init(rng, images, train=False)
  heatmaps = model.apply(variables, images, train=False)
  heatmaps, updates = model.apply(variables, images, train=True,
                                  rngs={"dropout": key}, mutable=["batch_stats"])
  outputs = model.apply(variables, images, train=False, method=FGTBT.named_outputs)
with `images` float (B, H, W, 3), H and W multiples of 32 (of 32 f with
`input_downsample` f), already normalised by `normalize_images`; `heatmaps`
is float32 (B, H / 2f, W / 2f, num_points) (`FGTBT.heatmap_stride`: 2f).
`named_outputs` returns the landmark head's named outputs (`heads.HEADS`:
{"heatmaps"}, plus "decimal" for HIH, "step_heatmaps" for the recurrent head),
all float32, and "hallucination" (B, H, W, 3) (the crop's size for any f),
the hallucinated face in the input's normalised space, with `model.hallucination` (SHT's DHLN,
`models.hallucination`); the plain call returns their "heatmaps".
Parameters are boxed in `nn.Partitioned` (logical axis names); unbox with
`flax.linen.meta.unbox(variables)` where plain arrays are needed.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fgtbt_jax.models.compute import compute_options
from fgtbt_jax.models.config import ENCODERS, validate_model_config
from fgtbt_jax.models.decoder import DecoderHead
from fgtbt_jax.models.encoder import MixTransformer
from fgtbt_jax.models import heads
from fgtbt_jax.models.fgsa import high_frequency_image
from fgtbt_jax.models.hallucination import area_downsample
from fgtbt_jax.models.remat import recompute_module

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Total stride of the encoder: inputs must divide by it.
ENCODER_STRIDE = 32


def normalize_images(images) -> jax.Array:
  """uint8 or float 0-255 (..., H, W, 3) RGB -> ImageNet-normalised float32."""
  images = jnp.asarray(images)
  if images.shape[-1] != 3:
    raise ValueError(f"normalize_images: expected RGB channels last, got shape {images.shape}")
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  inv_std = 1.0 / (jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0)
  return (images.astype(jnp.float32) - mean) * inv_std


def denormalize_images(images) -> jax.Array:
  """The inverse of `normalize_images`: normalised (..., H, W, 3) -> float32 0-255 RGB."""
  images = jnp.asarray(images, jnp.float32)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
  return images * std + mean


class FGTBT(nn.Module):
  """Frequency-guided MiT encoder + heatmap decoder (FGTBT paper, Fig. 2).

  Attributes:
    encoder: the `MixTransformer` (FGSA is on when `encoder.fgsa`); its
      parameters are the 'encoder' subtree.
    decoder: the `DecoderHead`; parameters under 'decoder'.
    frequency_extractor: "fft", "srm" or "wavelet".
    frequency_sigma: FFT high-pass sigma at a 480 input.
    input_downsample: f, the network runs on the crop area-averaged by f
      (SHT-M's small input: f = 4 runs a 256 px crop at 64 px); its heatmaps
      are f times coarser, and DHLN's face comes out at the crop's size.
      The call still takes the crop (so the data, evaluation, predict and
      export are those of any model); 1 (the default) is the FGTBT network.
  """

  encoder: MixTransformer
  decoder: DecoderHead
  frequency_extractor: str = "fft"
  frequency_sigma: float = 20.0
  input_downsample: int = 1

  @property
  def heatmap_stride(self) -> float:
    """Crop pixels per heatmap cell: the decoder upsamples the first stage's
    features (stride `encoder.strides[0]`, 4) twice, on the crop reduced by
    `input_downsample`."""
    return float(self.encoder.strides[0]) / 2.0 * self.input_downsample

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, H / s, W / s, num_points) float32 heatmaps,
    s = `heatmap_stride` (2; 2f with `input_downsample` f)."""
    return self.named_outputs(images, train)["heatmaps"]

  def named_outputs(self, images: jax.Array, train: bool = False,
                    float32_outputs: bool = True) -> dict[str, Any]:
    """(B, H, W, 3) normalised images -> the head's named outputs, float32 (`heads.HEADS`).

    `float32_outputs=False` leaves them in the compute dtype: the train step's
    loss casts them inside its recomputed segment, so a bfloat16 model keeps
    bfloat16 maps for the backward pass, not float32 copies.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FGTBT: expected (B, H, W, 3) images, got shape {images.shape}")
    _, h, w, _ = images.shape
    multiple = ENCODER_STRIDE * self.input_downsample
    if h % multiple or w % multiple:
      raise ValueError(f"FGTBT: input {h}x{w} is not a multiple of {multiple} (the encoder's "
                       f"stride {ENCODER_STRIDE} x input_downsample {self.input_downsample})")
    images = nn.with_logical_constraint(images, ("batch", "height", "width", None))
    if self.input_downsample > 1:  # SHT-M's small input: the network runs on the reduced crop.
      images = area_downsample(images.astype(jnp.float32), self.input_downsample)
      images = nn.with_logical_constraint(images, ("batch", "height", "width", None))
    structure = None
    if self.encoder.fgsa:
      with jax.named_scope("fgsa_high_frequency"):
        structure = high_frequency_image(
            images, self.frequency_extractor, self.frequency_sigma)
    features = self.encoder(images, structure, train)
    if self.decoder.head.hallucination:  # DHLN's stream reads the input images too.
      outputs = self.decoder(features, train, images)
    else:
      outputs = self.decoder(features, train)
    if not float32_outputs:
      return outputs
    return jax.tree.map(lambda x: x.astype(jnp.float32), outputs)


def build_encoder(config: ml_collections.ConfigDict) -> MixTransformer:
  """The encoder of `build_model(config)` as a standalone module.

  Its parameters are the 'encoder' subtree of the full model's parameters;
  with FGSA on, call it with the structure image as second argument.
  """
  validate_model_config(config)
  spec = ENCODERS[config.encoder]
  return MixTransformer(
      dims=spec.dims, depths=spec.depths, num_heads=spec.num_heads,
      sr_ratios=spec.sr_ratios, patch_sizes=spec.patch_sizes, strides=spec.strides,
      patch_embed=config.patch_embed, fgsa=config.fgsa,
      fgsa_reduction=config.fgsa_reduction, fgsa_compat=config.fgsa_compat,
      batch_norm_unbiased_variance=config.batch_norm_unbiased_variance,
      drop_path_rate=config.drop_path_rate,
      norm_epsilon=config.norm_epsilon, embed_norm_epsilon=config.embed_norm_epsilon,
      compute=compute_options(config), parent=None)


def build_model(config: ml_collections.ConfigDict) -> FGTBT:
  """The FGTBT network described by a `model_config(...)` ConfigDict."""
  encoder = build_encoder(config)
  compute = compute_options(config)
  decoder = recompute_module(DecoderHead, static_argnums=(2,), enabled=compute.remat_segments)(
      decoder_dim=config.decoder_dim, head_channels=config.head_channels,
      upsample_channels=config.upsample_channels, num_points=config.num_points,
      dropout=config.head_dropout,
      batch_norm_unbiased_variance=config.batch_norm_unbiased_variance,
      head=heads.head_options(config), image_upscale=config.input_downsample, compute=compute,
      parent=None)
  return FGTBT(encoder=encoder, decoder=decoder,
               frequency_extractor=config.frequency_extractor,
               frequency_sigma=float(config.frequency_sigma),
               input_downsample=config.input_downsample)


def parameter_count(tree: Any) -> int:
  """Number of scalars in a (boxed or plain, abstract or concrete) tree."""
  leaves = jax.tree.leaves(nn.meta.unbox(tree))
  return int(sum(np.prod(x.shape) for x in leaves))


def abstract_variables(model: nn.Module, input_size: int | Sequence[int], batch: int = 1):
  """`jax.eval_shape` of `model.init`: the variables' shapes without computing them."""
  if isinstance(input_size, int):
    input_size = (input_size, input_size)
  images = jax.ShapeDtypeStruct((batch, *input_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def random_variables(abstract, seed: int = 0):
  """Well-scaled random variables shaped like `abstract` (boxed or not), drawn with numpy.

  For tests and benchmarks, which need a network's shapes and sensible
  activations but not its initialisers (compiling those costs seconds per
  tensor on a small CPU): kernels ~ N(0, 1 / fan_in), LayerNorm/BatchNorm
  scales and running variances near 1, small biases, offsets and running
  means. Plain numpy arrays of the leaves' dtypes in the same tree.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", None)
    if name == "kernel":
      fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
      value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    elif name in ("scale", "var"):
      value = 1.0 + 0.1 * rng.random(leaf.shape)
    else:
      value = 0.05 * rng.standard_normal(leaf.shape)
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))
