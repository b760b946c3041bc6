"""FPTN: SHT's Facial Pose Transfer Network, its two discriminators and losses.

SHT (issue 33; paper sections 3.2-3.3) trains a landmark network on
unlabeled faces through pose transfer: from a condition face I_con, its
landmark heatmaps H_con and the heatmaps H_tar of another view of the same
face, a generator G draws the face in the target pose, I_ger, and is trained
to make it look like the real target view I_tar. Since the heatmaps can be
the landmark network's own outputs, the transfer losses reach the landmark
network without annotations. FPTN is only used in training.

The pieces, and `PoseTransfer`, which the train step uses with `config.sht`
(both views of each face side by side in the batch, `interleave_views`):

  PoseTransferGenerator  G(I_con, H_con, H_tar) -> I_ger. The pose-attentional
                         transfer network (Zhu et al. 2019, "PATB", SHT's
                         backbone unit): an image encoder and a pose encoder
                         (H_con || H_tar), `blocks` pose-attentional transfer
                         blocks, a decoder back to the input size.
  PatchDiscriminator     a PatchGAN-style logits map. SHT uses two: the
                         appearance discriminator D_A on (I_con || I) and the
                         shape discriminator D_S on (H_tar || I), I the real
                         target or the generated face (`discriminator_inputs`).
  discriminator_loss, generator_adversarial_loss, transfer_l1,
  perceptual_l1, pose_transfer_loss
                         eqs. (5)-(8), written with logits and
                         `jax.nn.log_sigmoid` (finite for any logit), float32.

A pose-attentional transfer block (`PoseAttentionBlock`) moves image
features to where the target pose wants them: the pose code P (which
carries both poses) gives an attention mask M = sigmoid(conv-norm-relu-
conv-norm(P)); the image code is updated residually,
F' = F + M * (conv-norm-relu-conv-norm(F)), and the pose code is updated
from the new image code and itself, P' = conv-norm-relu(F' || P), so that
the next block attends with what has been transferred so far. The last
block does not update P (nothing would read it).

Usage (the caller resizes heatmaps to the image size, and picks the image
space: the generated face is in the same space as the images it is trained
against, e.g. `normalize_images`' ImageNet-normalised float32):

  generator = PoseTransferGenerator(channels=32, blocks=3)
  d_a, d_s = PatchDiscriminator(), PatchDiscriminator()
  g_vars = generator.init(key, image, h_con, h_tar, train=False)
  fake, g_updates = generator.apply(g_vars, image, h_con, h_tar, train=True,
                                    mutable=["batch_stats"])
  a_real, s_real = discriminator_inputs(image, h_tar, target)
  a_fake, s_fake = discriminator_inputs(image, h_tar, fake)
  # d_a_vars = d_a.init(key_a, a_real), d_s_vars = d_s.init(key_s, s_real)
  d_loss = discriminator_loss(d_a.apply(d_a_vars, a_real), d_a.apply(d_a_vars, a_fake),
                              d_s.apply(d_s_vars, s_real), d_s.apply(d_s_vars, s_fake))
  g_loss, terms = pose_transfer_loss(fake, target, d_a.apply(d_a_vars, a_fake),
                                     d_s.apply(d_s_vars, s_fake))

The discriminator step differentiates `d_loss` with respect to the
discriminators' parameters, with `fake` under `jax.lax.stop_gradient`; the
generator step differentiates `g_loss` with respect to the generator's (and,
in SHT, the landmark network's) parameters, the discriminators held fixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgtbt_jax.models import heads
from fgtbt_jax.models import layers
from fgtbt_jax.models.compute import Compute

# Logical axis name of every FPTN channel width (parameters and activations):
# the conv-head widths, split by "fsdp" like the decoder's (`partitioning.py`);
# a width the mesh does not divide (3 colours, 1 logit) stays replicated.
CHANNEL_AXIS = "decoder"
ACTIVATION_AXES = ("batch", "height", "width", CHANNEL_AXIS)

# Leaky ReLU slope of the discriminators (PatchGAN's 0.2).
LEAKY_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class PoseTransferWeights:
  """The weights (lambda1, lambda2, lambda3) of SHT's eq. (5).

  Attributes:
    adversarial: lambda1, of the adversarial term (eq. 6).
    l1: lambda2, of the L1 term (eq. 7).
    perceptual: lambda3, of the perceptual L1 term (eq. 8); used only when a
      feature function is given.
  """

  adversarial: float = 0.05
  l1: float = 0.01
  perceptual: float = 0.01


# SHT's values, section 4 "Implementation Details": (0.05, 0.01, 0.01).
SHT_LOSS_WEIGHTS = PoseTransferWeights()


def _conv(features: int, kernel: int, compute: Compute, *, strides: int = 1,
          use_bias: bool = False, name: str) -> nn.Module:
  """k x k convolution with 'same'-style padding k // 2 (k odd) or 1 (k = 4)."""
  padding = kernel // 2 if kernel % 2 else (kernel - 2) // 2
  return layers.conv(features, kernel, CHANNEL_AXIS, strides=strides, padding=padding,
                     use_bias=use_bias, dtype=compute.dtype, pointwise=compute.pointwise,
                     name=name)


class ConvNorm(nn.Module):
  """Conv (no bias) -> BatchNorm, optionally -> ReLU.

  Attributes:
    features: output channels.
    kernel: kernel size (3 unless said otherwise).
    strides: stride in both directions.
    relu: end with a ReLU.
    compute: how to compute (`compute.Compute`: dtype, 1x1 form).
  """

  features: int
  kernel: int = 3
  strides: int = 1
  relu: bool = True
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _conv(self.features, self.kernel, self.compute, strides=self.strides, name="conv")(x)
    x = layers.batch_norm(dtype=self.compute.dtype, name="norm")(x, use_running_average=not train)
    return nn.relu(x) if self.relu else x


class PoseAttentionBlock(nn.Module):
  """One pose-attentional transfer block (PATB); see the module docstring.

  Attributes:
    update_pose: compute the next pose code (False for the last block).
    compute: how to compute.
  """

  update_pose: bool = True
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, image: jax.Array, pose: jax.Array,
               train: bool) -> tuple[jax.Array, jax.Array | None]:
    """(image code (B, h, w, C), pose code (B, h, w, C)) -> their updates.

    Returns:
      (image', pose'), pose' None when `update_pose` is False.
    """
    width = image.shape[-1]
    mask = ConvNorm(width, compute=self.compute, name="mask_1")(pose, train)
    mask = ConvNorm(width, relu=False, compute=self.compute, name="mask_2")(mask, train)
    mask = nn.sigmoid(mask)
    update = ConvNorm(width, compute=self.compute, name="image_1")(image, train)
    update = ConvNorm(width, relu=False, compute=self.compute, name="image_2")(update, train)
    image = image + mask * update
    image = nn.with_logical_constraint(image, ACTIVATION_AXES)
    if not self.update_pose:
      return image, None
    pose = ConvNorm(pose.shape[-1], compute=self.compute,
                    name="pose")(jnp.concatenate([image, pose], axis=-1), train)
    return image, nn.with_logical_constraint(pose, ACTIVATION_AXES)


class PoseTransferGenerator(nn.Module):
  """FPTN's generator G(I_con, H_con, H_tar) -> I_ger (SHT section 3.2).

  Encoders: a 3x3 ConvNorm-ReLU to `channels`, then `downsamples` stride-2
  3x3 ConvNorm-ReLUs, each doubling the width: the image encoder reads the
  condition image, the pose encoder H_con || H_tar. Then `blocks`
  `PoseAttentionBlock`s at 1 / 2^downsamples of the input size, and a decoder
  of `downsamples` transposed convolutions (4x4, stride 2, exact 2x) each
  halving the width, with BatchNorm-ReLU, and a final 3x3 convolution (with
  bias) to 3 channels. The output has no activation: it lives in the space
  of the images it is trained against (the caller's choice).

  Attributes:
    channels: width of the first encoder level (the blocks run at
      channels * 2^downsamples).
    blocks: number of pose-attentional transfer blocks.
    downsamples: stride-2 levels of each encoder (and of the decoder); H and
      W must be multiples of 2^downsamples.
    compute: how to compute (`compute.Compute`: dtype, 1x1 form).
  """

  channels: int = 32
  blocks: int = 3
  downsamples: int = 2
  compute: Compute = Compute()

  def _encode(self, x: jax.Array, train: bool, prefix: str) -> jax.Array:
    x = ConvNorm(self.channels, compute=self.compute, name=f"{prefix}_in")(x, train)
    for level in range(self.downsamples):
      x = ConvNorm(self.channels * 2 ** (level + 1), strides=2, compute=self.compute,
                   name=f"{prefix}_down_{level}")(x, train)
    return nn.with_logical_constraint(x, ACTIVATION_AXES)

  @nn.compact
  def __call__(self, condition_image: jax.Array, condition_heatmaps: jax.Array,
               target_heatmaps: jax.Array, train: bool) -> jax.Array:
    """The condition face redrawn in the target pose.

    Args:
      condition_image: (B, H, W, 3) float, the face to transfer.
      condition_heatmaps: (B, H, W, K) its pose (landmark heatmaps).
      target_heatmaps: (B, H, W, K) the pose to draw it in.
      train: BatchNorm uses batch statistics and updates 'batch_stats'
        (apply with `mutable=["batch_stats"]`), else running averages.

    Returns:
      (B, H, W, 3) float32 generated face.

    Raises:
      ValueError: the inputs' batch or spatial sizes differ, the heatmap
        stacks differ in shape, or H, W are not multiples of 2^downsamples.
    """
    if condition_image.ndim != 4 or condition_image.shape[-1] != 3:
      raise ValueError(f"condition_image: expected (B, H, W, 3), got {condition_image.shape}")
    if condition_heatmaps.shape != target_heatmaps.shape:
      raise ValueError(f"condition and target heatmaps differ in shape: "
                       f"{condition_heatmaps.shape} vs {target_heatmaps.shape}")
    if condition_heatmaps.shape[:3] != condition_image.shape[:3]:
      raise ValueError(f"heatmaps {condition_heatmaps.shape} and image {condition_image.shape} "
                       f"differ in batch or spatial size (resize the heatmaps to the image)")
    _, height, width, _ = condition_image.shape
    factor = 2 ** self.downsamples
    if height % factor or width % factor:
      raise ValueError(f"image size {height}x{width} is not a multiple of 2^downsamples = {factor}")
    dtype = self.compute.dtype
    image = self._encode(condition_image.astype(dtype), train, "image")
    pose = self._encode(jnp.concatenate([condition_heatmaps, target_heatmaps], axis=-1)
                        .astype(dtype), train, "pose")
    for index in range(self.blocks):
      block = PoseAttentionBlock(update_pose=index < self.blocks - 1, compute=self.compute,
                                 name=f"block_{index}")
      image, pose = block(image, pose, train)
    y = image
    for level in reversed(range(self.downsamples)):
      y = layers.conv_transpose(self.channels * 2 ** level, 4, 2, 1, CHANNEL_AXIS, dtype=dtype,
                                name=f"up_{level}")(y)
      y = layers.batch_norm(dtype=dtype, name=f"up_{level}_norm")(y, use_running_average=not train)
      y = nn.relu(y)
    y = _conv(3, 3, self.compute, use_bias=True, name="out")(y)
    return y.astype(jnp.float32)


class PatchDiscriminator(nn.Module):
  """PatchGAN-style discriminator: a logits map, one logit per image patch.

  `layers` stride-2 4x4 convolutions (width channels * 2^min(i, 3)) with leaky
  ReLU (slope 0.2), then a 3x3 convolution to one logit per position. No
  normalisation: a sample's logits do not depend on the rest of its batch,
  so real and fake batches may be scored in separate calls, and there are
  no batch statistics (no `train` flag, no 'batch_stats').

  SHT's appearance discriminator D_A reads (I_con || I), its shape
  discriminator D_S (H_tar || I), I a real or generated face
  (`discriminator_inputs`); each is one `PatchDiscriminator`.

  Attributes:
    channels: width of the first convolution.
    layers: number of stride-2 convolutions (the logits map is
      H / 2^layers x W / 2^layers for multiples of 2^layers).
    compute: how to compute (`compute.Compute`: dtype).
  """

  channels: int = 64
  layers: int = 3
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) float -> (B, h, w, 1) float32 logits (sigmoid = probability real)."""
    y = x.astype(self.compute.dtype)
    for index in range(self.layers):
      y = _conv(self.channels * 2 ** min(index, 3), 4, self.compute, strides=2, use_bias=True,
                name=f"conv_{index}")(y)
      y = nn.leaky_relu(y, LEAKY_SLOPE)
    y = _conv(1, 3, self.compute, use_bias=True, name="logits")(y)
    return y.astype(jnp.float32)


def discriminator_inputs(condition_image: jax.Array, target_heatmaps: jax.Array,
                         image: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The inputs of D_A and D_S for a real target or generated face `image`.

  Returns:
    (I_con || image, H_tar || image), channel concatenations (eq. 6).
  """
  return (jnp.concatenate([condition_image, image], axis=-1),
          jnp.concatenate([target_heatmaps, image], axis=-1))


def _mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.astype(jnp.float32))


def discriminator_loss(real_logits_a: jax.Array, fake_logits_a: jax.Array,
                       real_logits_s: jax.Array, fake_logits_s: jax.Array) -> jax.Array:
  """The discriminators' loss: eq. (6) negated (they maximise it).

    -mean[log D_A(real) + log D_S(real)] - mean[log(1 - D_A(fake)) + log(1 - D_S(fake))]

  with D = sigmoid(logits), log D = log_sigmoid(logits) and
  log(1 - D) = log_sigmoid(-logits), finite for any logit. Each term is
  averaged over its own logits map (the same as averaging the sums when the
  maps have one shape). Unweighted: lambda1 scales both players of eq. (5)
  alike, the caller may multiply. Pass the fake logits of
  `jax.lax.stop_gradient(generated)` so that this loss trains only D_A, D_S.

  Args:
    real_logits_a, fake_logits_a: D_A's logits on (I_con || I_tar) and
      (I_con || I_ger).
    real_logits_s, fake_logits_s: D_S's logits on (H_tar || I_tar) and
      (H_tar || I_ger).

  Returns:
    Scalar float32.
  """
  real = _mean(jax.nn.log_sigmoid(real_logits_a.astype(jnp.float32))) + _mean(
      jax.nn.log_sigmoid(real_logits_s.astype(jnp.float32)))
  fake = _mean(jax.nn.log_sigmoid(-fake_logits_a.astype(jnp.float32))) + _mean(
      jax.nn.log_sigmoid(-fake_logits_s.astype(jnp.float32)))
  return -(real + fake)


def generator_adversarial_loss(fake_logits_a: jax.Array, fake_logits_s: jax.Array) -> jax.Array:
  """The generator's adversarial loss, non-saturating: -mean[log D_A(fake) + log D_S(fake)].

  Eq. (6) has the generator minimise log(1 - D_A(fake)) + log(1 - D_S(fake));
  this is the standard non-saturating replacement (Goodfellow et al. 2014):
  the same fixed point, but a strong gradient while the discriminators still
  reject the fakes (log(1 - D) is flat as D -> 0). With logits:
  -(mean log_sigmoid(fake_logits_a) + mean log_sigmoid(fake_logits_s)).

  Returns:
    Scalar float32.
  """
  return -(_mean(jax.nn.log_sigmoid(fake_logits_a.astype(jnp.float32)))
           + _mean(jax.nn.log_sigmoid(fake_logits_s.astype(jnp.float32))))


def transfer_l1(generated: jax.Array, target: jax.Array) -> jax.Array:
  """Eq. (7), ||I_ger - I_tar||_1, as the mean absolute difference (float32 scalar).

  No gradient is stopped: in SHT the target may itself be a network output.
  """
  return _mean(jnp.abs(generated.astype(jnp.float32) - target.astype(jnp.float32)))


def perceptual_l1(generated: jax.Array, target: jax.Array,
                  feature_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Eq. (8), ||phi(I_ger) - phi(I_tar)||_1, as a mean absolute difference.

  Args:
    generated, target: (B, H, W, 3) faces.
    feature_fn: phi, images -> features (SHT: VGG-19 conv1_2, which this
      project does not ship or download: the caller brings its own).

  Returns:
    Scalar float32.
  """
  return transfer_l1(feature_fn(generated), feature_fn(target))


def pose_transfer_loss(generated: jax.Array, target: jax.Array, fake_logits_a: jax.Array,
                       fake_logits_s: jax.Array, *,
                       weights: PoseTransferWeights = SHT_LOSS_WEIGHTS,
                       perceptual_fn: Callable[[jax.Array], jax.Array] | None = None,
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The generator's side of eq. (5): L_PT for G (and what feeds it).

    lambda1 * generator_adversarial_loss + lambda2 * transfer_l1
      (+ lambda3 * perceptual_l1 when `perceptual_fn` is given)

  Args:
    generated: (B, H, W, 3) I_ger, the generator's output.
    target: (B, H, W, 3) I_tar, the real face in the target pose.
    fake_logits_a, fake_logits_s: D_A's and D_S's logits on the generated
      face (`discriminator_inputs`), not stopped: the gradient flows to G.
    weights: (lambda1, lambda2, lambda3); SHT's by default.
    perceptual_fn: phi of eq. (8), or None to leave the perceptual term out.

  Returns:
    (total float32 scalar, the unweighted terms {"adversarial", "l1"} plus
    "perceptual" when `perceptual_fn` is given).
  """
  terms = {"adversarial": generator_adversarial_loss(fake_logits_a, fake_logits_s),
           "l1": transfer_l1(generated, target)}
  total = weights.adversarial * terms["adversarial"] + weights.l1 * terms["l1"]
  if perceptual_fn is not None:
    terms["perceptual"] = perceptual_l1(generated, target, perceptual_fn)
    total = total + weights.perceptual * terms["perceptual"]
  return total, terms


# -----------------------------------------------------------------------------
# SHT in the train step: pairs of views, the transfer between them.


def interleave_views(first: jax.Array, second: jax.Array) -> jax.Array:
  """Two (B, ...) views -> (2B, ...) with each face's views side by side (j, k, j, k, ...).

  Side by side, a face's two views stay on one device when the batch is
  split over devices (the split is into contiguous blocks of even length).
  """
  return jnp.stack([first, second], axis=1).reshape(-1, *first.shape[1:])


def swap_views(x: jax.Array) -> jax.Array:
  """Exchanges the two views of every face of an `interleave_views` batch."""
  return x.reshape(x.shape[0] // 2, 2, *x.shape[1:])[:, ::-1].reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class PoseTransfer:
  """SHT's weak supervision: FPTN between the two views of every face (`config.sht`).

  The train step runs both views of each face through the landmark network
  (`interleave_views`); from its outputs, resized to `size`, each view's
  hallucinated face I_SR,j with its heatmaps H_j and the other view's H_k go
  through the generator, and the generated face is trained against the other
  view's high-resolution face I_HR,k (eq. 9's L_PT(I_j, H_j, H_k) and
  L_PT(I_k, H_k, H_j)). The landmark network gets the transfer's gradient
  through both heatmaps and the hallucinated face: that is how faces without
  annotations train it. The discriminators learn in the same step, from the
  same faces with the generated ones' gradient stopped
  (`discriminator_loss`).

  Attributes:
    generator: G.
    discriminator: the definition of D_A and D_S (two parameter sets).
    weights: (lambda1, lambda2) of eq. (5); no perceptual term.
    size: side of the transfer's images and heatmaps (the input size divided
      by an integer).
  """

  generator: PoseTransferGenerator
  discriminator: PatchDiscriminator
  weights: PoseTransferWeights
  size: int

  @classmethod
  def from_config(cls, sht_config, compute: Compute) -> "PoseTransfer":
    """From the config's `sht` section and the network's compute options."""
    return cls(
        generator=PoseTransferGenerator(channels=int(sht_config.generator_channels),
                                        blocks=int(sht_config.generator_blocks),
                                        compute=compute),
        discriminator=PatchDiscriminator(channels=int(sht_config.discriminator_channels),
                                         compute=compute),
        weights=PoseTransferWeights(adversarial=float(sht_config.adversarial_weight),
                                    l1=float(sht_config.l1_weight), perceptual=0.0),
        size=int(sht_config.transfer_size))

  def init(self, rng: jax.Array, num_heatmaps: int) -> dict:
    """{"params": {"generator", "appearance", "shape"}, "batch_stats": the generator's}."""
    image = jnp.zeros((1, self.size, self.size, 3), jnp.float32)
    maps = jnp.zeros((1, self.size, self.size, num_heatmaps), jnp.float32)
    g_key, a_key, s_key = jax.random.split(rng, 3)
    generator = self.generator.init(g_key, image, maps, maps, train=False)
    appearance, shape = discriminator_inputs(image, maps, image)
    return {"params": {"generator": generator["params"],
                       "appearance": self.discriminator.init(a_key, appearance)["params"],
                       "shape": self.discriminator.init(s_key, shape)["params"]},
            "batch_stats": generator["batch_stats"]}

  def resize_images(self, images: jax.Array) -> jax.Array:
    """(B, S, S, C) images -> `size` x `size` (area average; S a multiple of `size`)."""
    _, height, width, _ = images.shape
    return layers.separable_matmul(images, heads.area_matrix(height, self.size),
                                   heads.area_matrix(width, self.size))

  def resize_heatmaps(self, heatmaps: jax.Array) -> jax.Array:
    """(B, h, w, K) heatmaps -> float32 `size` x `size` (bilinear, half-pixel centres)."""
    _, height, width, _ = heatmaps.shape
    return layers.separable_matmul(heatmaps.astype(jnp.float32),
                                   layers.bilinear_matrix(height, self.size),
                                   layers.bilinear_matrix(width, self.size))

  def generator_loss(self, params: dict, batch_stats: Any, hallucinated: jax.Array,
                     heatmaps: jax.Array, high_resolution: jax.Array
                     ) -> tuple[jax.Array, dict, Any, dict]:
    """The transfer losses of both directions of every pair, for G and the network.

    Args:
      params: {"generator", "appearance", "shape"}; only the generator's get
        a gradient through this loss (the caller differentiates those).
      batch_stats: the generator's BatchNorm statistics.
      hallucinated: (2B, T, T, 3) the network's faces in [0, 1], T = `size`.
      heatmaps: (2B, T, T, K) its heatmaps.
      high_resolution: (2B, T, T, 3) the high-resolution views in [0, 1].

    Returns:
      (loss, {"transfer_l1", "transfer_adversarial"}, the generator's new
      BatchNorm statistics, the discriminators' inputs for
      `discriminator_loss`).
    """
    target_heatmaps, target = swap_views(heatmaps), swap_views(high_resolution)
    generated, updates = self.generator.apply(
        {"params": params["generator"], "batch_stats": batch_stats}, hallucinated, heatmaps,
        target_heatmaps, train=True, mutable=["batch_stats"])
    fake_a, fake_s = discriminator_inputs(hallucinated, target_heatmaps, generated)
    total, terms = pose_transfer_loss(
        generated, target, self.discriminator.apply({"params": params["appearance"]}, fake_a),
        self.discriminator.apply({"params": params["shape"]}, fake_s), weights=self.weights)
    faces = {"condition": hallucinated, "target_heatmaps": target_heatmaps, "target": target,
             "generated": generated}
    return (total, {"transfer_l1": terms["l1"], "transfer_adversarial": terms["adversarial"]},
            updates["batch_stats"], faces)

  def discriminator_loss(self, params: dict, faces: dict) -> jax.Array:
    """D_A's and D_S's loss (eq. 6) on the faces of `generator_loss`, none differentiated."""
    faces = jax.lax.stop_gradient(faces)
    real_a, real_s = discriminator_inputs(faces["condition"], faces["target_heatmaps"],
                                          faces["target"])
    fake_a, fake_s = discriminator_inputs(faces["condition"], faces["target_heatmaps"],
                                          faces["generated"])
    apply = self.discriminator.apply
    return discriminator_loss(
        apply({"params": params["appearance"]}, real_a),
        apply({"params": params["appearance"]}, fake_a),
        apply({"params": params["shape"]}, real_s), apply({"params": params["shape"]}, fake_s))
