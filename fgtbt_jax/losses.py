"""FMB-loss: Adaptive Wing heatmap loss balanced across landmarks and datasets.

FGTBT paper, sections 3.2.2-3.2.3. A mixed batch holds samples of several
datasets; the model predicts all 124 unified heatmaps for every sample, and a
sample supervises only the channels its protocol annotates. The loss is

  l[b, p]   = mean over pixels of W * AWing(pred, target)   (sample b, point p)
  L[X, p]   = mean of l[b, p] over the samples b of dataset X supervising p
  L_X       = mean over X's points p of  w_p * L[X, p]      (w_p: FMB weight)
  total     = sum over datasets X present in the batch of  balance(L_X)

computed for the whole mixed batch in one vectorised pass: the per-dataset
means are one-hot matmuls over the batch, no Python loop over samples or
datasets. `balance` is the dataset balancer chosen by name (`BALANCERS`):
FMB and uniform use plain sums, DWA scales by dynamic weights from the loss
history, uncertainty weighting adds learnable log-variances.

Every function here is pure and jit-able; the balancer's learnable parameters
and history live in the train state as plain pytrees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks as landmarks_lib

BALANCERS = ("fmb", "uniform", "dwa", "uncertainty")


@dataclasses.dataclass(frozen=True)
class AWingConstants:
  """Adaptive Wing constants (paper eq. 12); the paper's values are defaults."""

  omega: float = 14.0
  theta: float = 0.5
  alpha: float = 2.1
  epsilon: float = 1.0


def adaptive_wing(pred: jax.Array, target: jax.Array,
                  constants: AWingConstants = AWingConstants()) -> jax.Array:
  """Per-pixel Adaptive Wing loss, same shape as `pred` and `target`.

  With d = pred - target and power = alpha - target:
    |d| < theta:  omega * ln(1 + |d / eps|^power)
    otherwise:    A |d| - C, where
      A = omega / (1 + (theta/eps)^power) * power * (theta/eps)^(power - 1) / eps
      C = theta A - omega ln(1 + (theta/eps)^power)
  which makes the two branches meet with equal value and slope at theta.
  The target is treated as a constant (no gradient flows into it).
  """
  c = constants
  target = jax.lax.stop_gradient(target)
  abs_diff = jnp.abs(pred - target)
  power = c.alpha - target
  ratio = c.theta / c.epsilon
  ratio_pow = jnp.power(ratio, power)
  a = c.omega / (1.0 + ratio_pow) * power * jnp.power(ratio, power - 1.0) / c.epsilon
  offset = c.theta * a - c.omega * jnp.log1p(ratio_pow)
  # The log branch is evaluated at min(|d|, theta) so that its value (and
  # gradient) stays finite where the linear branch is the one selected.
  small = jnp.minimum(abs_diff, c.theta)
  log_branch = c.omega * jnp.log1p(jnp.power(small / c.epsilon, power))
  return jnp.where(abs_diff < c.theta, log_branch, a * abs_diff - offset)


def weight_map(target: jax.Array, threshold: float = 0.2,
               scale: float = 10.0) -> jax.Array:
  """W = scale * [maxpool3x3(target) >= threshold] + 1, per channel.

  `target` is (..., H, W, K) channels last; the 3x3 max pool runs over H, W
  with stride 1 and edge pixels pooled over their in-image neighbours only
  (grey dilation, as in the Adaptive Wing paper). It widens the foreground
  of each Gaussian by one pixel so that the loss stresses the pixels near a
  landmark.
  """
  window = (1,) * (target.ndim - 3) + (3, 3, 1)
  pooled = jax.lax.reduce_window(
      target, -jnp.inf, jax.lax.max, window, (1,) * target.ndim, "SAME")
  return scale * (pooled >= threshold).astype(target.dtype) + 1.0


def render_targets(points: jax.Array, mask: jax.Array, height: int, width: int,
                   sigma: float, stride: int, rounded: bool = False) -> jax.Array:
  """Gaussian target heatmaps (B, height, width, K) for input-pixel points.

  `points` (B, K, 2) are in input pixels; they are mapped to heatmap pixels
  with the heatmaps module's convention for the given stride. Channels whose
  `mask` is False are all zero, and NaN points there never reach the loss.
  """
  points = jnp.where(mask[..., None], points, 0.0)
  heatmap_points = heatmaps.input_to_heatmap(points, stride)
  target = heatmaps.render_gaussian(heatmap_points, mask, height, width, sigma,
                                    rounded=rounded)
  return jnp.where(mask[:, None, None, :], target, 0.0)


def sample_landmark_losses(pred: jax.Array, target: jax.Array,
                           constants: AWingConstants = AWingConstants(),
                           weight_threshold: float = 0.2,
                           weight_scale: float = 10.0) -> jax.Array:
  """(B, K) mean over pixels of W * AWing for every sample and channel.

  The per-pixel terms (the AWing branches, its power and logarithm, the
  weight map) are recomputed in the backward pass (`jax.checkpoint`): only
  `pred` and `target` are kept, not the half-dozen float32 per-pixel
  tensors in between (about 0.1 GiB each per 4 images at 240 x 240 x 124).
  `pred` may be bfloat16: it is cast to float32 inside, so only its own
  bytes are kept.
  """
  return _recomputed_losses(pred, (target,), lambda target: target, constants,
                            weight_threshold, weight_scale)


def rendered_landmark_losses(pred: jax.Array, points: jax.Array, mask: jax.Array,
                             render: Callable[[jax.Array, jax.Array], jax.Array],
                             constants: AWingConstants = AWingConstants(),
                             weight_threshold: float = 0.2,
                             weight_scale: float = 10.0) -> jax.Array:
  """`sample_landmark_losses(pred, render(points, mask), ...)` without keeping the target.

  The target maps are rendered inside the recomputed segment, so the
  backward pass renders them again from the (B, K, 2) points instead of
  holding a (B, H, W, K) float32 target (0.21 GiB at the paper's batch 8 at
  240 x 240 x 124). The value and gradient are those of
  `sample_landmark_losses` on the rendered target.
  """
  return _recomputed_losses(pred, (jax.lax.stop_gradient(points), mask), render, constants,
                            weight_threshold, weight_scale)


def _recomputed_losses(pred: jax.Array, target_inputs: tuple, make_target: Callable,
                       constants: AWingConstants, weight_threshold: float,
                       weight_scale: float) -> jax.Array:
  """(B, K) losses of `pred` against `make_target(*target_inputs)` in one recomputed segment.

  Under `jax.checkpoint` the backward pass keeps only `pred` and
  `target_inputs` and computes the target and every per-pixel term again.
  """
  threshold, scale = float(weight_threshold), float(weight_scale)

  @jax.checkpoint
  def losses_of(pred, target_inputs):
    pred = pred.astype(jnp.float32)
    target = make_target(*target_inputs).astype(jnp.float32)
    per_pixel = adaptive_wing(pred, target, constants) * jax.lax.stop_gradient(
        weight_map(target, threshold, scale))
    return per_pixel.mean(axis=(-3, -2))

  return losses_of(pred, target_inputs)


def per_dataset_landmark_losses(sample_losses: jax.Array, mask: jax.Array,
                                dataset_id: jax.Array, num_datasets: int
                                ) -> tuple[jax.Array, jax.Array]:
  """Means of (B, K) sample losses over each dataset's supervising samples.

  Returns `landmark_loss` (D, K), the mean of sample_losses[b, p] over the
  samples b of dataset d with mask[b, p] (0 where there are none), and
  `supervised` (D, K) bool, whether dataset d supervises point p in this
  batch. Masked-out entries contribute exactly zero to value and gradient.
  """
  mask = mask.astype(jnp.float32)
  one_hot = jax.nn.one_hot(dataset_id, num_datasets, dtype=jnp.float32)  # (B, D)
  masked = jnp.where(mask > 0, sample_losses, 0.0)
  total = one_hot.T @ masked  # (D, K)
  count = one_hot.T @ mask    # (D, K)
  landmark_loss = total / jnp.maximum(count, 1.0)
  return landmark_loss, count > 0


def dataset_losses(landmark_loss: jax.Array, supervised: jax.Array,
                   landmark_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """L_X = mean over X's supervised points of w_p * L[X, p]; and presence.

  Returns (D,) losses (0 for a dataset absent from the batch) and (D,) bool
  `present`.
  """
  supervised_f = supervised.astype(jnp.float32)
  weighted = jnp.sum(landmark_weights[None, :] * landmark_loss * supervised_f, -1)
  num_points = supervised_f.sum(-1)
  return weighted / jnp.maximum(num_points, 1.0), num_points > 0


# ----------------------------------------------------------------------------
# Dataset balancers.


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The static settings of the loss, read once from the config's `loss` block."""

  balancer: str = "fmb"
  beta: float = 0.9
  awing: AWingConstants = AWingConstants()
  weight_threshold: float = 0.2
  weight_scale: float = 10.0
  sigma: float = 3.0
  target_rounding: str = "none"  # heatmaps.TARGET_ROUNDINGS
  hih_decimal_sigma: float = 1.0  # decimal cells (`head_loss`)
  hih_decimal_weight: float = 0.1
  dwa_temperature: float = 2.0
  dwa_window: int = 100
  hallucination_l1_weight: float = 1.0  # DHLN (`hallucination_loss`)
  hallucination_gradient_weight: float = 1.0
  num_datasets: int = len(landmarks_lib.PROTOCOL_NAMES)

  def __post_init__(self):
    if self.balancer not in BALANCERS:
      raise ValueError(
          f"loss.balancer: unknown balancer {self.balancer!r}; expected one of {BALANCERS}")
    if not 0.0 <= self.beta < 1.0:
      raise ValueError(f"loss.beta must be in [0, 1), got {self.beta}")
    if self.sigma <= 0:
      raise ValueError(f"loss.sigma must be positive, got {self.sigma}")
    if self.target_rounding not in heatmaps.TARGET_ROUNDINGS:
      raise ValueError(f"loss.target_rounding must be one of {heatmaps.TARGET_ROUNDINGS}, "
                       f"got {self.target_rounding!r}")
    if not self.hih_decimal_sigma > 0:
      raise ValueError(f"loss.hih_decimal_sigma must be positive, got {self.hih_decimal_sigma}")
    if not self.hih_decimal_weight >= 0:
      raise ValueError(f"loss.hih_decimal_weight must be >= 0, got {self.hih_decimal_weight}")
    if self.dwa_temperature <= 0:
      raise ValueError(f"loss.dwa_temperature must be positive, got {self.dwa_temperature}")
    if self.dwa_window < 1:
      raise ValueError(f"loss.dwa_window must be at least 1, got {self.dwa_window}")
    for field in ("hallucination_l1_weight", "hallucination_gradient_weight"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"loss.{field} must be >= 0, got {getattr(self, field)}")

  @classmethod
  def from_config(cls, loss_config: Mapping[str, Any], num_datasets: int) -> "LossConfig":
    """Builds it from a config's `loss` ConfigDict (every field required)."""
    return cls(
        balancer=loss_config["balancer"], beta=float(loss_config["beta"]),
        awing=AWingConstants(
            omega=float(loss_config["awing_omega"]), theta=float(loss_config["awing_theta"]),
            alpha=float(loss_config["awing_alpha"]), epsilon=float(loss_config["awing_epsilon"])),
        weight_threshold=float(loss_config["weight_threshold"]),
        weight_scale=float(loss_config["weight_scale"]),
        sigma=float(loss_config["sigma"]),
        target_rounding=str(loss_config["target_rounding"]),
        hih_decimal_sigma=float(loss_config["hih_decimal_sigma"]),
        hih_decimal_weight=float(loss_config["hih_decimal_weight"]),
        dwa_temperature=float(loss_config["dwa_temperature"]),
        dwa_window=int(loss_config["dwa_window"]),
        hallucination_l1_weight=float(loss_config["hallucination_l1_weight"]),
        hallucination_gradient_weight=float(loss_config["hallucination_gradient_weight"]),
        num_datasets=num_datasets)

  def landmark_weights(self) -> np.ndarray:
    """(124,) per-point weights: FMB weights for "fmb", ones otherwise."""
    if self.balancer == "fmb":
      return landmarks_lib.fmb_weights(self.beta)
    return np.ones(landmarks_lib.NUM_UNIFIED, np.float32)


def init_balancer(config: LossConfig) -> tuple[dict, dict]:
  """(learnable params, non-learnable state) of the configured balancer.

  uncertainty: params {"log_variance": (D,) zeros}.
  dwa: state with the running window sums and the means of the last two
  completed windows. fmb / uniform: empty.
  """
  d = config.num_datasets
  if config.balancer == "uncertainty":
    return {"log_variance": jnp.zeros((d,), jnp.float32)}, {}
  if config.balancer == "dwa":
    return {}, {
        "window_sum": jnp.zeros((d,), jnp.float32),
        "window_count": jnp.zeros((d,), jnp.float32),
        "last_mean": jnp.ones((d,), jnp.float32),
        "previous_mean": jnp.ones((d,), jnp.float32),
        "windows_done": jnp.zeros((), jnp.int32),
    }
  return {}, {}


def dwa_weights(last_mean: jax.Array, previous_mean: jax.Array,
                windows_done: jax.Array, temperature: float) -> jax.Array:
  """Dynamic weight average (Liu et al. 2019): D softmax(r / T), r = L(t-1)/L(t-2).

  Until two windows have completed the weights are all ones.
  """
  ratio = last_mean / jnp.maximum(previous_mean, 1e-12)
  weights = ratio.shape[0] * jax.nn.softmax(ratio / temperature)
  return jnp.where(windows_done >= 2, weights, jnp.ones_like(weights))


def combine_dataset_losses(config: LossConfig, losses: jax.Array, present: jax.Array,
                           balancer_params: Mapping[str, jax.Array],
                           balancer_state: Mapping[str, jax.Array]
                           ) -> tuple[jax.Array, jax.Array]:
  """Total loss and the (D,) dataset weights used, over datasets present.

  fmb/uniform: sum of L_X. dwa: sum of lambda_X L_X with the DWA weights.
  uncertainty: sum of exp(-s_X) L_X + s_X (the weights reported are exp(-s_X)).
  """
  present_f = present.astype(jnp.float32)
  if config.balancer == "uncertainty":
    s = balancer_params["log_variance"]
    weights = jnp.exp(-s)
    return jnp.sum(present_f * (weights * losses + s)), weights
  if config.balancer == "dwa":
    weights = jax.lax.stop_gradient(dwa_weights(
        balancer_state["last_mean"], balancer_state["previous_mean"],
        balancer_state["windows_done"], config.dwa_temperature))
    return jnp.sum(present_f * weights * losses), weights
  weights = jnp.ones_like(losses)
  return jnp.sum(present_f * losses), weights


def update_balancer_state(config: LossConfig, balancer_state: Mapping[str, jax.Array],
                          losses: jax.Array, present: jax.Array, step: jax.Array) -> dict:
  """The balancer state after training step `step` (0-based) saw `losses`.

  DWA accumulates each dataset's loss over a window of `dwa_window` steps; at
  the end of a window its mean becomes `last_mean` and the old `last_mean`
  becomes `previous_mean` (a dataset absent for a whole window keeps its old
  mean). Other balancers have no state.
  """
  if config.balancer != "dwa":
    return dict(balancer_state)
  present_f = present.astype(jnp.float32)
  window_sum = balancer_state["window_sum"] + present_f * jax.lax.stop_gradient(losses)
  window_count = balancer_state["window_count"] + present_f
  window_end = (step + 1) % config.dwa_window == 0
  window_mean = jnp.where(window_count > 0, window_sum / jnp.maximum(window_count, 1.0),
                          balancer_state["last_mean"])
  return {
      "window_sum": jnp.where(window_end, 0.0, window_sum),
      "window_count": jnp.where(window_end, 0.0, window_count),
      "last_mean": jnp.where(window_end, window_mean, balancer_state["last_mean"]),
      "previous_mean": jnp.where(window_end, balancer_state["last_mean"],
                                 balancer_state["previous_mean"]),
      "windows_done": balancer_state["windows_done"] + window_end.astype(jnp.int32),
  }


def fmb_loss(config: LossConfig, pred: jax.Array, target: jax.Array, mask: jax.Array,
             dataset_id: jax.Array, balancer_params: Mapping[str, jax.Array],
             balancer_state: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Total loss of a mixed batch and its parts.

  Args:
    config: static loss settings.
    pred: (B, H, W, K) predicted heatmaps.
    target: (B, H, W, K) target heatmaps (zero on unsupervised channels).
    mask: (B, K) bool, the channels each sample supervises.
    dataset_id: (B,) int, each sample's dataset.
    balancer_params, balancer_state: from `init_balancer` / the train state.

  Returns:
    (total, aux) with aux = {"dataset_loss": (D,), "present": (D,) bool,
    "dataset_weight": (D,)}.
  """
  sample_losses = sample_landmark_losses(
      pred, target, config.awing, config.weight_threshold, config.weight_scale)
  return _balanced_loss(config, sample_losses, mask, dataset_id, balancer_params,
                        balancer_state)


def _balanced_loss(config: LossConfig, sample_losses: jax.Array, mask: jax.Array,
                   dataset_id: jax.Array, balancer_params: Mapping[str, jax.Array],
                   balancer_state: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
  """`fmb_loss` from the (B, K) sample losses on."""
  landmark_loss, supervised = per_dataset_landmark_losses(
      sample_losses, mask, dataset_id, config.num_datasets)
  losses, present = dataset_losses(
      landmark_loss, supervised, jnp.asarray(config.landmark_weights()))
  total, weights = combine_dataset_losses(
      config, losses, present, balancer_params, balancer_state)
  return total, {"dataset_loss": losses, "present": present, "dataset_weight": weights}


def head_loss(config: LossConfig, outputs: Mapping[str, Any], points: jax.Array, mask: jax.Array,
              dataset_id: jax.Array, stride: float, balancer_params: Mapping[str, jax.Array],
              balancer_state: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
  """The FMB-loss of a landmark head's named outputs (`models.heads`), targets rendered here.

  The targets are rendered from `points` inside each map's recomputed loss
  segment (`rendered_landmark_losses`), so the backward pass keeps no
  (B, h, w, K) target; the maps may be in the compute dtype (bfloat16), and
  are cast to float32 inside that segment.

  Every supervised map gets the same per-landmark AWing loss and FMB
  weighting; the per-dataset losses of the maps are summed (weighted) before
  the dataset balancer, so DWA and uncertainty weighting see one loss per
  dataset:

    {"heatmaps"}                 the heatmap loss alone (`fmb_loss`, as always);
    {"step_heatmaps": maps, ...} each step's heatmaps against the heatmap
                                 targets, all steps weight 1 (the recurrent head);
    {"decimal": maps, ...}       plus the HIH decimal maps against
                                 `heatmaps.render_decimal_targets` of sigma
                                 `hih_decimal_sigma`, weight `hih_decimal_weight`.

  Args:
    config: static loss settings.
    outputs: the model's named outputs ((B, h, w, K) maps).
    points: (B, K, 2) landmarks in input pixels; mask (B, K); dataset_id (B,).
    stride: input pixels per heatmap pixel.
    balancer_params, balancer_state: as in `fmb_loss`.

  Returns:
    (total, aux) as `fmb_loss`, aux also with "map_loss": {map name:
    (D,) per-dataset losses of that map (decimal: before its weight)}.
  """
  maps = outputs["heatmaps"]
  height, width = maps.shape[-3:-1]

  def render_heatmaps(points, mask):
    return render_targets(points, mask, height, width, config.sigma, stride,
                          config.target_rounding)

  def sample_losses_of(pred, render):
    # Targets rendered inside the loss's recomputed segment: none is kept.
    return rendered_landmark_losses(pred, points, mask, render, config.awing,
                                    config.weight_threshold, config.weight_scale)

  if set(outputs) == {"heatmaps"}:
    return _balanced_loss(config, sample_losses_of(maps, render_heatmaps), mask, dataset_id,
                          balancer_params, balancer_state)
  weights = jnp.asarray(config.landmark_weights())

  def losses_of(pred, render):
    landmark_loss, supervised = per_dataset_landmark_losses(
        sample_losses_of(pred, render), mask, dataset_id, config.num_datasets)
    return dataset_losses(landmark_loss, supervised, weights)

  terms = {}
  for k, step_maps in enumerate(outputs.get("step_heatmaps", (maps,))):
    terms[f"heatmaps_{k}" if "step_heatmaps" in outputs else "heatmaps"] = (
        losses_of(step_maps, render_heatmaps), 1.0)
  if "decimal" in outputs:
    decimal_size = outputs["decimal"].shape[-2]

    def render_decimal(points, mask):
      heatmap_points = heatmaps.input_to_heatmap(jnp.where(mask[..., None], points, 0.0), stride)
      decimal_target = heatmaps.render_decimal_targets(
          heatmap_points, mask, decimal_size, config.hih_decimal_sigma, config.target_rounding)
      return jnp.where(mask[:, None, None, :], decimal_target, 0.0)

    terms["decimal"] = (losses_of(outputs["decimal"], render_decimal), config.hih_decimal_weight)
  present = next(iter(terms.values()))[0][1]
  losses = sum(weight * map_losses for (map_losses, _), weight in terms.values())
  total, dataset_weights = combine_dataset_losses(
      config, losses, present, balancer_params, balancer_state)
  return total, {"dataset_loss": losses, "present": present, "dataset_weight": dataset_weights,
                 "map_loss": {name: map_losses for name, ((map_losses, _), _) in terms.items()}}


# -----------------------------------------------------------------------------
# DHLN's face-hallucination terms (SHT paper, eqs. 3-4 and 10).


def gradient_map(images: jax.Array) -> jax.Array:
  """SHT eq. (3): per channel, the magnitude of the central differences.

  I_x(x, y) = I(x + 1, y) - I(x - 1, y), I_y(x, y) = I(x, y + 1) - I(x, y - 1),
  G(I) = sqrt(I_x^2 + I_y^2): fixed-kernel convolutions with zero padding
  (pixels outside the image are 0). (B, H, W, C) -> (B, H, W, C) float32.
  The square root's gradient at a zero difference is taken as 0.
  """
  images = jnp.asarray(images, jnp.float32)
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
  along_x = padded[:, 1:-1, 2:, :] - padded[:, 1:-1, :-2, :]  # x: columns
  along_y = padded[:, 2:, 1:-1, :] - padded[:, :-2, 1:-1, :]  # y: rows
  squared = along_x * along_x + along_y * along_y
  positive = squared > 0.0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def hallucination_loss(hallucinated: jax.Array, target: jax.Array, l1_weight: float,
                       gradient_weight: float, weight: jax.Array | None = None
                       ) -> tuple[jax.Array, dict]:
  """DHLN's image terms: l1_weight * |I_SR - I_HR| + gradient_weight * |G(I_SR) - G(I_HR)|.

  SHT eq. (4)'s gamma_2 and gamma_3 terms (eq. (10) on unlabeled faces is the
  same two terms). Both are means over pixels and channels of each sample,
  averaged over the samples with `weight` (B,) (default: all of them).

  Args:
    hallucinated, target: (B, H, W, C) images in [0, 1] (any float dtype).
    l1_weight, gradient_weight: the two weights.
    weight: (B,) sample weights (e.g. 0 for samples without a
      high-resolution target).

  Returns:
    (weighted sum, {"hallucination_l1": mean L1, "hallucination_gradient":
    mean gradient-map L1}).
  """
  hallucinated = jnp.asarray(hallucinated, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  per_sample_l1 = jnp.abs(hallucinated - target).mean(axis=(1, 2, 3))
  per_sample_gradient = jnp.abs(gradient_map(hallucinated) - gradient_map(target)).mean(
      axis=(1, 2, 3))
  if weight is None:
    weight = jnp.ones(per_sample_l1.shape, jnp.float32)
  weight = jnp.asarray(weight, jnp.float32)
  count = jnp.maximum(weight.sum(), 1e-6)
  l1 = (weight * per_sample_l1).sum() / count
  gradient = (weight * per_sample_gradient).sum() / count
  total = l1_weight * l1 + gradient_weight * gradient
  return total, {"hallucination_l1": l1, "hallucination_gradient": gradient}
