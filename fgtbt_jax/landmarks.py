"""The unified 124-point landmark protocol (FGTBT paper, section 3.2.1).

Four datasets with different annotation protocols are trained jointly: WFLW (98
points), 300W (68), COFW (29) and AFLW (19). Their union is a set of 124
semantically distinct points. This module is the one place that defines:

* each protocol's mapping into the unified set (`Protocol.unified_index`),
* each protocol's left/right flip permutation in its own point order,
* the NME normalisers of each protocol,
* the unified flip permutation and the occurrence count C(p) of every point,
* the FMB weights derived from C(p).

The tables are read from `assets/unified_124.json` (shipped with the package);
everything else is derived and checked here at import time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping

import numpy as np

NUM_UNIFIED = 124
_ASSETS = pathlib.Path(__file__).resolve().parent / "assets"

# Fixed dataset order: the dataset id used in batches, losses and metrics is
# the position in this tuple.
PROTOCOL_NAMES: tuple[str, ...] = ("WFLW", "300W", "COFW", "AFLW")


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """How the NME normalising distance of a protocol is measured.

  kind:
    "points": distance between landmarks `a[0]` and `b[0]`.
    "centroids": distance between the mean of landmarks `a` and the mean of
      landmarks `b` (300W inter-pupil).
    "box": sqrt(width * height) of the face box, supplied with the sample.
  Indices are in the protocol's own order.
  """

  kind: str
  a: tuple[int, ...] = ()
  b: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Protocol:
  """One dataset's landmark protocol."""

  name: str
  dataset_id: int
  num_landmarks: int
  unified_index: np.ndarray  # (N,) int32: unified id of each own point.
  flip_pairs: tuple[tuple[int, int], ...]
  flip_permutation: np.ndarray  # (N,) int32, own order, an involution.
  normalizers: Mapping[str, Normalizer]
  default_normalizer: str  # The normaliser the paper reports for this set.

  @property
  def unified_mask(self) -> np.ndarray:
    """(124,) bool: which unified points this protocol annotates."""
    mask = np.zeros(NUM_UNIFIED, bool)
    mask[self.unified_index] = True
    return mask


def _flip_permutation(n: int, pairs, name: str) -> np.ndarray:
  perm = np.arange(n, dtype=np.int32)
  seen = set()
  for a, b in pairs:
    if a in seen or b in seen or a == b:
      raise ValueError(f"{name}: flip pair ({a}, {b}) repeats a point")
    seen.update((a, b))
    perm[a], perm[b] = b, a
  return perm


def _normalizers(name: str, spec: Mapping) -> tuple[dict[str, Normalizer], str]:
  out = {}
  io, ip = spec["nme_inter_ocular"], spec["nme_inter_pupil"]
  if isinstance(io, list):
    out["inter_ocular"] = Normalizer("points", (io[0],), (io[1],))
  if isinstance(ip, list):
    out["inter_pupil"] = Normalizer("points", (ip[0],), (ip[1],))
  if name == "300W":
    # Inter-pupil: centres of the two eyes' six contour points each.
    out["inter_pupil"] = Normalizer(
        "centroids", tuple(range(36, 42)), tuple(range(42, 48)))
  if name == "AFLW":
    out["box"] = Normalizer("box")
  default = {"WFLW": "inter_ocular", "300W": "inter_ocular",
             "COFW": "inter_pupil", "AFLW": "box"}[name]
  return out, default


def _load() -> tuple[dict[str, Protocol], np.ndarray]:
  raw = json.loads((_ASSETS / "unified_124.json").read_text())
  if raw["num_unified"] != NUM_UNIFIED:
    raise ValueError("unified_124.json: num_unified must be 124")
  protocols = {}
  for dataset_id, name in enumerate(PROTOCOL_NAMES):
    spec = raw["protocols"][name]
    n = spec["num_landmarks"]
    index = np.asarray(spec["unified_index"], np.int32)
    if index.shape != (n,) or len(set(index.tolist())) != n:
      raise ValueError(f"unified_124.json: {name}.unified_index is not {n} distinct ids")
    pairs = tuple((int(a), int(b)) for a, b in spec["flip_pairs"])
    normalizers, default = _normalizers(name, spec)
    protocols[name] = Protocol(
        name=name, dataset_id=dataset_id, num_landmarks=n,
        unified_index=index, flip_pairs=pairs,
        flip_permutation=_flip_permutation(n, pairs, name),
        normalizers=normalizers, default_normalizer=default)
  count = np.asarray(raw["occurrence_count"], np.int32)
  return protocols, count


PROTOCOLS: Mapping[str, Protocol]
PROTOCOLS, OCCURRENCE_COUNT = _load()
for _p in PROTOCOLS.values():
  _p.unified_index.setflags(write=False)
  _p.flip_permutation.setflags(write=False)
del _p


def get_protocol(name: str) -> Protocol:
  """The protocol called `name` (case-insensitive), with a clear error."""
  key = {k.upper(): k for k in PROTOCOLS}.get(str(name).upper())
  if key is None:
    raise KeyError(f"unknown protocol {name!r}; expected one of {list(PROTOCOLS)}")
  return PROTOCOLS[key]


def _unified_flip_permutation() -> np.ndarray:
  """Union of every protocol's flip pairs, mapped to unified ids."""
  perm = np.full(NUM_UNIFIED, -1, np.int32)
  for p in PROTOCOLS.values():
    mirrored = p.unified_index[p.flip_permutation]
    for u, m in zip(p.unified_index, mirrored):
      if perm[u] not in (-1, m):
        raise ValueError(
            f"{p.name}: unified point {u} mirrors to {m}, another protocol says {perm[u]}")
      perm[u] = m
  if (perm < 0).any():
    raise ValueError(f"unified points not covered: {np.flatnonzero(perm < 0)}")
  return perm


UNIFIED_FLIP_PERMUTATION = _unified_flip_permutation()
UNIFIED_FLIP_PERMUTATION.setflags(write=False)

# (4, 124) bool: row d says which unified points dataset d annotates.
PROTOCOL_MASKS = np.stack([PROTOCOLS[n].unified_mask for n in PROTOCOL_NAMES])
PROTOCOL_MASKS.setflags(write=False)

MAX_LANDMARKS = max(p.num_landmarks for p in PROTOCOLS.values())


def padded_unified_index() -> tuple[np.ndarray, np.ndarray]:
  """(4, 98) int32 unified ids per dataset padded with 0, and its (4, 98) mask.

  Lets device code gather each sample's own channels by dataset id.
  """
  index = np.zeros((len(PROTOCOL_NAMES), MAX_LANDMARKS), np.int32)
  valid = np.zeros((len(PROTOCOL_NAMES), MAX_LANDMARKS), bool)
  for d, name in enumerate(PROTOCOL_NAMES):
    p = PROTOCOLS[name]
    index[d, :p.num_landmarks] = p.unified_index
    valid[d, :p.num_landmarks] = True
  return index, valid


def fmb_weights(beta: float) -> np.ndarray:
  """FMB weight 1/E_p = (1 - beta) / (1 - beta**C(p)) of every unified point.

  beta = 0 gives ones (no re-weighting); beta -> 1 approaches 1 / C(p).
  Computed as 1 / (1 + beta + ... + beta**(C-1)), which is the same quotient
  without the 0/0 at beta = 0 and without cancellation near 1.
  """
  beta = float(beta)
  if not (0.0 <= beta < 1.0) or not np.isfinite(beta):
    raise ValueError(f"FMB beta must be in [0, 1), got {beta}")
  powers = beta ** np.arange(OCCURRENCE_COUNT.max())
  geometric = np.cumsum(powers)[OCCURRENCE_COUNT - 1]
  return (1.0 / geometric).astype(np.float32)


def _check_points(points: np.ndarray, n: int, what: str) -> np.ndarray:
  points = np.asarray(points, np.float32)
  if points.ndim < 2 or points.shape[-2:] != (n, 2):
    raise ValueError(f"{what}: expected shape (..., {n}, 2), got {points.shape}")
  return points


def to_unified(points, protocol: str | Protocol) -> tuple[np.ndarray, np.ndarray]:
  """Scatters a protocol's (..., N, 2) points into (..., 124, 2) unified order.

  Returns the unified points (NaN where the protocol has no point) and a
  (..., 124) bool mask that is True where a finite point was given. NaN
  input points stay NaN and are masked out.
  """
  p = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
  points = _check_points(points, p.num_landmarks, f"{p.name} points")
  out = np.full(points.shape[:-2] + (NUM_UNIFIED, 2), np.nan, np.float32)
  out[..., p.unified_index, :] = points
  mask = np.isfinite(out).all(-1)
  return out, mask


def from_unified(points, protocol: str | Protocol) -> np.ndarray:
  """Gathers a protocol's (..., N, 2) points from (..., 124, 2) unified points."""
  p = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
  points = _check_points(points, NUM_UNIFIED, "unified points")
  return points[..., p.unified_index, :]


def flip_points(points, width: float, protocol: str | Protocol | None = None) -> np.ndarray:
  """Mirrors (..., N, 2) points horizontally in an image of `width` pixels.

  Uses the pixel-centre convention: x -> width - 1 - x. Point identities are
  swapped with the protocol's flip permutation (`protocol=None`: unified).
  """
  if protocol is None:
    perm, n = UNIFIED_FLIP_PERMUTATION, NUM_UNIFIED
  else:
    p = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
    perm, n = p.flip_permutation, p.num_landmarks
  points = _check_points(points, n, "points")
  flipped = points[..., perm, :].copy()
  flipped[..., 0] = width - 1 - flipped[..., 0]
  return flipped


def mean_face() -> np.ndarray:
  """(124, 2) float32 mean face in a unit square (x right, y down), unified order."""
  face = np.asarray(json.loads((_ASSETS / "meanface124.json").read_text()), np.float32)
  if face.shape != (NUM_UNIFIED, 2):
    raise ValueError(f"meanface124.json: expected (124, 2), got {face.shape}")
  return face
