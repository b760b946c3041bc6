"""Face-alignment metrics: NME, failure rate, AUC and the CED curve.

Host-side numpy, vectorised over images and landmarks. The normalising
distance of every protocol is read from `landmarks.PROTOCOLS[name].normalizers`
(the one place it is defined), e.g. WFLW inter-ocular (points 60 and 72),
300W inter-ocular (36, 45) or inter-pupil (centres of points 36-41 and 42-47),
COFW inter-pupil (16, 17), AFLW box size sqrt(width * height).

NME values are fractions (multiply by 100 for the % the papers report).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fgtbt_jax import landmarks

Protocol = landmarks.Protocol


def _protocol(protocol: str | Protocol) -> Protocol:
  return protocol if isinstance(protocol, Protocol) else landmarks.get_protocol(protocol)


def _check_points(points, protocol: Protocol, what: str) -> np.ndarray:
  points = np.asarray(points, np.float64)
  if points.ndim != 3 or points.shape[1:] != (protocol.num_landmarks, 2):
    raise ValueError(
        f"{what}: expected shape (B, {protocol.num_landmarks}, 2) for "
        f"{protocol.name}, got {points.shape}")
  return points


def normalizing_distance(gt, protocol: str | Protocol, normalizer: str | None = None,
                         box_size=None) -> np.ndarray:
  """(B,) NME normalising distance d of each image.

  Args:
    gt: (B, N, 2) ground-truth points in the protocol's own order.
    protocol: protocol name or `landmarks.Protocol`.
    normalizer: a key of the protocol's `normalizers` (e.g. "inter_ocular");
      None means the protocol's `default_normalizer` (the paper's choice).
    box_size: (B,) face box sizes sqrt(width * height), required by "box".
  """
  p = _protocol(protocol)
  gt = _check_points(gt, p, "ground truth")
  name = p.default_normalizer if normalizer is None else normalizer
  if name not in p.normalizers:
    raise ValueError(
        f"unknown normalizer {name!r} for {p.name}; expected one of {sorted(p.normalizers)}")
  spec = p.normalizers[name]
  if spec.kind == "box":
    if box_size is None:
      raise ValueError(f"{p.name} normalizer {name!r} needs box_size (B,) = sqrt(width * height)")
    box_size = np.asarray(box_size, np.float64)
    if box_size.shape != gt.shape[:1]:
      raise ValueError(f"box_size: expected shape ({gt.shape[0]},), got {box_size.shape}")
    return box_size
  if spec.kind == "points":
    return np.linalg.norm(gt[:, spec.a[0]] - gt[:, spec.b[0]], axis=-1)
  if spec.kind == "centroids":
    a = gt[:, list(spec.a)].mean(axis=1)
    b = gt[:, list(spec.b)].mean(axis=1)
    return np.linalg.norm(a - b, axis=-1)
  raise ValueError(f"{p.name} normalizer {name!r} has unknown kind {spec.kind!r}")


def nme(pred, gt, protocol: str | Protocol, normalizer: str | None = None,
        box_size=None, mask=None) -> np.ndarray:
  """(B,) per-image NME: mean over landmarks of ||pred - gt||_2 / d.

  Args:
    pred, gt: (B, N, 2) points in the protocol's own order.
    protocol, normalizer, box_size: as in `normalizing_distance`.
    mask: optional (B, N) bool; False points are left out of the mean. A NaN
      in pred or gt is an error unless its point is masked out; the
      normalising points of gt must be finite either way.

  Raises:
    ValueError: on shape mismatch, on an unmasked non-finite point, on an
      image with no unmasked point, or on a normalising distance that is not
      a positive finite number (naming the image and point index).
  """
  p = _protocol(protocol)
  pred = _check_points(pred, p, "prediction")
  gt = _check_points(gt, p, "ground truth")
  if pred.shape != gt.shape:
    raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
  if mask is None:
    mask = np.ones(gt.shape[:2], bool)
  mask = np.asarray(mask)
  if mask.shape != gt.shape[:2]:
    raise ValueError(f"mask: expected shape {gt.shape[:2]}, got {mask.shape}")
  mask = mask.astype(bool)
  for what, points in (("prediction", pred), ("ground truth", gt)):
    bad = mask & ~np.isfinite(points).all(-1)
    if bad.any():
      image, point = np.argwhere(bad)[0]
      raise ValueError(
          f"{what} is not finite at image {image}, point {point} "
          f"({int(bad.sum())} such points); mask them out or fix the input")
  empty = ~mask.any(axis=1)
  if empty.any():
    raise ValueError(f"image {int(np.flatnonzero(empty)[0])} has no unmasked landmark")
  distance = normalizing_distance(gt, p, normalizer, box_size)
  bad = ~(np.isfinite(distance) & (distance > 0))
  if bad.any():
    image = int(np.flatnonzero(bad)[0])
    raise ValueError(
        f"normalising distance of image {image} is {distance[image]} "
        f"({p.name}, {normalizer or p.default_normalizer}); it must be positive and finite")
  error = np.linalg.norm(np.where(mask[..., None], pred - gt, 0.0), axis=-1)
  return error.sum(axis=1) / mask.sum(axis=1) / distance


def _check_errors(nmes, threshold: float) -> np.ndarray:
  nmes = np.asarray(nmes, np.float64).reshape(-1)
  if nmes.size == 0:
    raise ValueError("no NME values given (empty input)")
  if not np.isfinite(nmes).all() or (nmes < 0).any():
    index = int(np.flatnonzero(~(np.isfinite(nmes) & (nmes >= 0)))[0])
    raise ValueError(f"NME values must be finite and >= 0; value {index} is {nmes[index]}")
  if not threshold > 0:
    raise ValueError(f"threshold must be positive, got {threshold}")
  return nmes


def failure_rate(nmes, threshold: float = 0.1) -> float:
  """Share of images whose NME exceeds `threshold` (an NME equal to it passes)."""
  nmes = _check_errors(nmes, threshold)
  return float(np.mean(nmes > threshold))


def auc(nmes, threshold: float = 0.1) -> float:
  """Area under the CED curve on [0, threshold], divided by threshold.

  The CED is the step function F(e) = share of images with NME <= e. Each
  image with error e_i adds 1/n to F on [e_i, threshold], so the exact area
  is mean(max(threshold - e_i, 0)): no sampling grid is involved. A perfect
  model scores 1; one with every error at or above the threshold scores 0.
  """
  nmes = _check_errors(nmes, threshold)
  return float(np.mean(np.clip(1.0 - nmes / threshold, 0.0, 1.0)))


def ced_curve(nmes, threshold: float = 0.1, num: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """Cumulative error distribution sampled at `num` errors in [0, threshold].

  Returns (errors, fraction) with fraction[i] = share of images whose NME is
  <= errors[i]; for plotting (use `auc` for the exact area).
  """
  nmes = _check_errors(nmes, threshold)
  if num < 2:
    raise ValueError(f"ced_curve needs num >= 2 samples, got {num}")
  errors = np.linspace(0.0, threshold, num)
  fraction = np.searchsorted(np.sort(nmes), errors, side="right") / nmes.size
  return errors, fraction


def summarize(nmes, threshold: float = 0.1) -> dict[str, float]:
  """Mean NME, failure rate and AUC at `threshold`, and the image count."""
  nmes = _check_errors(nmes, threshold)
  return {"nme": float(nmes.mean()), "fr": failure_rate(nmes, threshold),
          "auc": auc(nmes, threshold), "count": int(nmes.size)}


def dataset_table(protocol: str | Protocol, pred, gt, box_size, subsets=None,
                  threshold: float = 0.1) -> dict[str, dict[str, dict[str, float]]]:
  """{subset: {normaliser: {"nme", "fr", "auc", "count"}}} of one dataset's test images.

  Args:
    protocol: the dataset's protocol (name or `landmarks.Protocol`).
    pred, gt: (B, N, 2) own-order predictions and ground truth; points not
      finite in `gt` are left out.
    box_size: (B,) face box sizes (the box normaliser).
    subsets: {name: (B,) bool} evaluation subsets; subset "full" (every
      image) comes first, subsets without images are left out.
    threshold: failure threshold of FR and AUC.

  Every normaliser the protocol defines gets a column; the default one is
  `landmarks.Protocol.default_normalizer`.
  """
  protocol = _protocol(protocol)
  gt = np.asarray(gt, np.float64)
  mask = np.isfinite(gt).all(-1)
  per_image = {name: nme(pred, gt, protocol, normalizer=name, box_size=box_size, mask=mask)
               for name in protocol.normalizers}
  rows = {"full": np.ones(len(gt), bool)}
  for name, flags in (subsets or {}).items():
    flags = np.asarray(flags, bool)
    if flags.shape != (len(gt),):
      raise ValueError(f"{protocol.name} subset {name!r}: expected flags of shape "
                       f"({len(gt)},), got {flags.shape}")
    rows[name] = flags
  return {subset: {name: summarize(values[flags], threshold) for name, values in per_image.items()}
          for subset, flags in rows.items() if flags.any()}


@dataclasses.dataclass
class SplitPredictions:
  """Per-image results of one pass over a dataset's test split (every process's images).

  Attributes:
    dataset: the protocol name.
    predictions: (B, N, 2) own-order points in stored-crop pixels.
    confidence: (B, N) heatmap peak of each point.
    ground_truth: (B, N, 2) in stored-crop pixels (NaN where not annotated).
    box_size: (B,) face box sizes.
    baseline: (B, N, 2) the mean-shape baseline's points.
    subsets: {name: (B,) bool} evaluation subsets.
    images: the first uint8 input crops this process saw (the report's
      high-frequency images); may be empty.
    signed_error: (B, N, 2) prediction minus the exact ground truth in
      heatmap pixels (NaN where not annotated), or None: the per-axis bias.
  """

  dataset: str
  predictions: np.ndarray
  confidence: np.ndarray
  ground_truth: np.ndarray
  box_size: np.ndarray
  baseline: np.ndarray
  subsets: dict[str, np.ndarray]
  images: np.ndarray
  signed_error: np.ndarray | None = None

  def nme(self) -> float:
    """Mean NME with the protocol's default normaliser."""
    mask = np.isfinite(self.ground_truth).all(-1)
    return float(np.mean(nme(self.predictions, self.ground_truth, self.dataset,
                             box_size=self.box_size, mask=mask)))


# -----------------------------------------------------------------------------
# Hallucinated faces (SHT's DHLN): PSNR and SSIM against the high-resolution crop.


def psnr(images: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> np.ndarray:
  """(B,) peak signal-to-noise ratio in dB of (B, H, W, C) images; inf where equal."""
  images, reference = np.asarray(images, np.float64), np.asarray(reference, np.float64)
  mse = ((images - reference) ** 2).mean(axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range ** 2 / mse)


def _gaussian_valid_matrix(size: int, window: int, sigma: float) -> np.ndarray:
  """(size - window + 1, size) rows of a normalised Gaussian window ('valid' filtering)."""
  taps = np.exp(-0.5 * ((np.arange(window) - (window - 1) / 2) / sigma) ** 2)
  taps /= taps.sum()
  rows = np.zeros((size - window + 1, size))
  for i in range(size - window + 1):
    rows[i, i:i + window] = taps
  return rows


def ssim(images: np.ndarray, reference: np.ndarray, data_range: float = 1.0,
         window: int = 11, sigma: float = 1.5) -> np.ndarray:
  """(B,) structural similarity (Wang et al. 2004) of (B, H, W, C) images, channels averaged.

  The standard form: local means, variances and covariance under an 11-tap
  Gaussian window of sigma 1.5 (population statistics), K1 = 0.01,
  K2 = 0.03, the SSIM map averaged over the window positions inside the
  image ('valid') and over the channels. Images smaller than the window
  use a window of their side.
  """
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)
  y = np.asarray(reference, np.float64).transpose(0, 3, 1, 2)
  _, _, h, w = x.shape
  window = min(window, h, w)
  rows, cols = _gaussian_valid_matrix(h, window, sigma), _gaussian_valid_matrix(w, window, sigma)

  def blur(a):  # (B, C, H, W) maps: two batched matrix products.
    return rows @ a @ cols.T

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x ** 2
  var_y = blur(y * y) - mu_y ** 2
  cov = blur(x * y) - mu_x * mu_y
  value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
      (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return value.mean(axis=(1, 2, 3))
