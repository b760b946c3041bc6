"""The unified 124-point landmark protocol (FGTBT paper, section 3.2.1).

Four datasets with different annotation protocols are trained jointly: WFLW (98
points), 300W (68), COFW (29) and AFLW (19). Their union is a set of 124
semantically distinct points. This module is the one place that defines:

* each protocol's mapping into the unified set (`Protocol.unified_index`),
* each protocol's left/right flip permutation in its own point order,
* the NME normalisers of each protocol and the one the paper reports,
* the facial part of every unified point (`FACE_PARTS`),
* the unified flip permutation and the occurrence count C(p) of every point,
* the FMB weights derived from C(p);
* a name for every unified point (`POINT_NAMES`) and the protocols of user
  point schemes (`user_protocol`, `register_protocol`, `dataset_ids`).

The tables are read from `assets/unified_124.json` (shipped with the package);
everything else is derived and checked here at import time. A table missing
from the asset raises a ValueError naming its key. A leaf module: it imports
nothing from the project but `fgtbt_jax.errors`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Mapping

import numpy as np

from fgtbt_jax.errors import UnknownProtocolError

NUM_UNIFIED = 124
_ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
_TABLES = "unified_124.json"

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


def _require(table: Mapping, key: str, where: str):
  """`table[key]`, or a ValueError naming the missing key of the asset."""
  if key not in table:
    raise ValueError(f"{_TABLES}: {where} has no {key!r}")
  return table[key]


def _point_pair(value, key: str, where: str) -> tuple[int, int]:
  if (not isinstance(value, list) or len(value) != 2
      or not all(isinstance(v, int) for v in value)):
    raise ValueError(f"{_TABLES}: {where}.{key} must be two point indices, got {value!r}")
  return int(value[0]), int(value[1])


def _normalizers(spec: Mapping, where: str) -> tuple[dict[str, Normalizer], str]:
  """The NME normalisers of one protocol's table, and its default's name.

  "nme_<kind>" (kind inter_ocular or inter_pupil) is two point indices, or a
  text describing a rule: "nme_<kind>_centroids" (two lists of points) when
  the protocol has one, else the protocol lacks that normaliser. "nme_box"
  says whether the face box size is one; "default_normalizer" names the one
  the paper reports.
  """
  out = {}
  for kind in ("inter_ocular", "inter_pupil"):
    key = f"nme_{kind}"
    value = _require(spec, key, where)
    if isinstance(value, list):
      a, b = _point_pair(value, key, where)
      out[kind] = Normalizer("points", (a,), (b,))
    elif f"{key}_centroids" in spec:
      sides = spec[f"{key}_centroids"]
      if len(sides) != 2 or not all(sides):
        raise ValueError(f"{_TABLES}: {where}.{key}_centroids must be two non-empty "
                         f"lists of point indices, got {sides!r}")
      out[kind] = Normalizer("centroids", tuple(map(int, sides[0])), tuple(map(int, sides[1])))
  box = _require(spec, "nme_box", where)
  if not isinstance(box, bool):
    raise ValueError(f"{_TABLES}: {where}.nme_box must be true or false, got {box!r}")
  if box:
    out["box"] = Normalizer("box")
  default = _require(spec, "default_normalizer", where)
  if default not in out:
    raise ValueError(f"{_TABLES}: {where}.default_normalizer {default!r} is not one of "
                     f"its normalisers {list(out)}")
  return out, default


def _parse_protocols(raw: Mapping) -> dict[str, Protocol]:
  tables = _require(raw, "protocols", "the top level")
  protocols = {}
  for dataset_id, name in enumerate(PROTOCOL_NAMES):
    where = f"protocols.{name}"
    spec = _require(tables, name, "protocols")
    n = _require(spec, "num_landmarks", where)
    index = np.asarray(_require(spec, "unified_index", where), np.int32)
    if index.shape != (n,) or len(set(index.tolist())) != n:
      raise ValueError(f"{_TABLES}: {where}.unified_index is not {n} distinct ids")
    pairs = tuple((int(a), int(b)) for a, b in _require(spec, "flip_pairs", where))
    normalizers, default = _normalizers(spec, where)
    protocols[name] = Protocol(
        name=name, dataset_id=dataset_id, num_landmarks=n,
        unified_index=index, flip_pairs=pairs,
        flip_permutation=_flip_permutation(n, pairs, name),
        normalizers=normalizers, default_normalizer=default)
  return protocols


def _parse_face_parts(raw: Mapping, protocols: Mapping[str, Protocol]):
  """(part names, own point ranges per protocol, {unified id: part})."""
  table = _require(raw, "face_parts", "the top level")
  names = tuple(_require(table, "names", "face_parts"))
  ranges = {}
  for name, rows in _require(table, "own_ranges", "face_parts").items():
    ranges[name] = tuple((str(part), int(start), int(stop)) for part, start, stop in rows)
  parts: dict[int, str] = {}
  for name, rows in ranges.items():
    if name not in protocols:
      raise ValueError(f"{_TABLES}: face_parts.own_ranges names an unknown protocol {name!r}")
    index = protocols[name].unified_index
    for part, start, stop in rows:
      if part not in names:
        raise ValueError(f"{_TABLES}: face_parts.own_ranges.{name}: {part!r} is not in "
                         f"face_parts.names")
      for u in index[start:stop].tolist():
        if parts.setdefault(u, part) != part:
          raise ValueError(f"{_TABLES}: face_parts: unified point {u} is {parts[u]} and {part}")
  if sorted(parts) != list(range(NUM_UNIFIED)):
    missing = sorted(set(range(NUM_UNIFIED)) - set(parts))
    raise ValueError(f"{_TABLES}: face_parts do not cover unified points {missing}")
  return names, ranges, dict(sorted(parts.items()))


def _load(raw: Mapping):
  """Every table of the parsed asset: protocols, face parts, occurrence counts."""
  if _require(raw, "num_unified", "the top level") != NUM_UNIFIED:
    raise ValueError(f"{_TABLES}: num_unified must be {NUM_UNIFIED}")
  protocols = _parse_protocols(raw)
  part_names, part_ranges, face_parts = _parse_face_parts(raw, protocols)
  count = np.asarray(_require(raw, "occurrence_count", "the top level"), np.int32)
  if count.shape != (NUM_UNIFIED,):
    raise ValueError(f"{_TABLES}: occurrence_count must have {NUM_UNIFIED} entries")
  return protocols, count, part_names, part_ranges, face_parts


def _read_asset() -> dict:
  return json.loads((_ASSETS / _TABLES).read_text())


PROTOCOLS: Mapping[str, Protocol]
# The facial part names, each protocol's own point ranges [part, start, stop)
# per part ("right"/"left" are the subject's: "right" is on the image's left)
# and the part of every unified id, derived through the unified index.
PART_NAMES: tuple[str, ...]
OWN_PART_RANGES: Mapping[str, tuple[tuple[str, int, int], ...]]
FACE_PARTS: Mapping[int, str]
PROTOCOLS, OCCURRENCE_COUNT, PART_NAMES, OWN_PART_RANGES, FACE_PARTS = _load(_read_asset())
for _p in PROTOCOLS.values():
  _p.unified_index.setflags(write=False)
  _p.flip_permutation.setflags(write=False)
del _p


def get_protocol(name: str) -> Protocol:
  """The protocol called `name` (case-insensitive): a benchmark's, or a
  user scheme's registered with `register_protocol`.

  Raises:
    UnknownProtocolError: (a ValueError) no protocol has that name.
  """
  known = {**PROTOCOLS, **_REGISTERED}
  key = {k.upper(): k for k in known}.get(str(name).upper())
  if key is None:
    raise UnknownProtocolError(name, known)
  return known[key]


# ----------------------------------------------------------------------------
# User point schemes: a dataset of the user's own that annotates a subset of
# the unified points (named by `POINT_NAMES`), trained jointly with the
# benchmarks and masked like them. Its dataset id follows the benchmarks':
# the k-th user dataset of a run's `data.datasets` is id 4 + k
# (`dataset_ids`), so the ids are a function of the config alone.

# A user dataset's name: a letter, then letters, digits or "_" (it becomes
# part of a TFDS builder name).
USER_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_]{0,39}"

_REGISTERED: dict[str, Protocol] = {}


def _point_names() -> tuple[str, ...]:
  """One name per unified point: its face part and its rank in that part
  (unified order), "jaw_00" ... ; a part of one point is its own name."""
  counts: dict[str, int] = {}
  for part in FACE_PARTS.values():
    counts[part] = counts.get(part, 0) + 1
  seen: dict[str, int] = {}
  names = []
  for u in range(NUM_UNIFIED):
    part = FACE_PARTS[u]
    k = seen.get(part, 0)
    seen[part] = k + 1
    names.append(part if counts[part] == 1 else f"{part}_{k:02d}")
  return tuple(names)


# The name of every unified point, in unified order ("jaw_00", ...,
# "right_eye_03", ..., "left_pupil").
POINT_NAMES: tuple[str, ...] = _point_names()


def point_ids(names, where: str = "scheme") -> np.ndarray:
  """The unified ids of points named as in `POINT_NAMES`, or as
  "<benchmark>:<i>" (the benchmark's own 0-based point i, e.g. "300W:36").

  Raises:
    ValueError: naming `where`, the position and the name that is unknown
      or repeated.
  """
  by_name = {n: u for u, n in enumerate(POINT_NAMES)}
  ids = []
  for i, raw in enumerate(names):
    name = str(raw).strip()
    u = by_name.get(name)
    if u is None and ":" in name:
      protocol, _, index = name.rpartition(":")
      p = {k.upper(): v for k, v in PROTOCOLS.items()}.get(protocol.strip().upper())
      if p is not None and index.strip().isdigit() and int(index) < p.num_landmarks:
        u = int(p.unified_index[int(index)])
    if u is None:
      raise ValueError(f"{where}: point {i} {name!r} is not a unified point name (one of "
                       f"{POINT_NAMES[0]!r} ... {POINT_NAMES[-1]!r}, or <benchmark>:<0-based "
                       "index> such as '300W:36'; `fgtbt convert --list-points` lists them)")
    if u in ids:
      raise ValueError(f"{where}: point {i} {name!r} repeats point {ids.index(u)} "
                       f"({POINT_NAMES[u]})")
    ids.append(u)
  if not ids:
    raise ValueError(f"{where}: names no points")
  return np.asarray(ids, np.int32)


def _benchmark_pair(protocol: str, normalizer: str) -> tuple[int, int]:
  """The unified ids of a benchmark normaliser's two points."""
  p = PROTOCOLS[protocol]
  n = p.normalizers[normalizer]
  return int(p.unified_index[n.a[0]]), int(p.unified_index[n.b[0]])


# Outer eye corners (WFLW's and 300W's inter-ocular points) and pupils
# (WFLW's inter-pupil points), in unified ids.
OUTER_EYE_CORNERS = _benchmark_pair("300W", "inter_ocular")
PUPILS = _benchmark_pair("WFLW", "inter_pupil")


def user_protocol(name: str, unified_index, dataset_id: int) -> Protocol:
  """The protocol of a user point scheme: its points are `unified_index`
  (unified ids, in the user's own order).

  Flip pairs are the unified ones; every point's mirror must be in the
  scheme (the flip augmentation swaps them). Normalisers: a benchmark's
  points in its order keep the benchmark's (and its default); otherwise
  "inter_ocular" when both outer eye corners are among its points (its
  default), "inter_pupil" when both pupils are, and always "box" (the
  default otherwise).

  Raises:
    ValueError: the name is not a valid user dataset name, is a
      benchmark's, or a point's mirror is missing (naming both).
  """
  if not re.fullmatch(USER_NAME_PATTERN, str(name)):
    raise ValueError(f"dataset name {name!r}: a letter then letters, digits or '_' "
                     "(at most 40)")
  if str(name).upper() in {k.upper() for k in PROTOCOLS} | {UNIFIED.upper()}:
    raise ValueError(f"dataset name {name!r} is a benchmark's; name your own data otherwise")
  index = np.asarray(unified_index, np.int32).reshape(-1)
  if len(set(index.tolist())) != index.size or index.size == 0 or (
      index.min() < 0 or index.max() >= NUM_UNIFIED):
    raise ValueError(f"{name}: the scheme's points must be distinct unified ids")
  own = {int(u): j for j, u in enumerate(index)}
  pairs = []
  for j, u in enumerate(index.tolist()):
    m = int(UNIFIED_FLIP_PERMUTATION[u])
    if m not in own:
      raise ValueError(f"{name}: point {j} {POINT_NAMES[u]!r} has its mirror "
                       f"{POINT_NAMES[m]!r} outside the scheme; add it (the flip "
                       "augmentation swaps the two)")
    if own[m] > j:
      pairs.append((j, own[m]))
  normalizers = {}
  for kind, (a, b) in (("inter_ocular", OUTER_EYE_CORNERS), ("inter_pupil", PUPILS)):
    if a in own and b in own:
      normalizers[kind] = Normalizer("points", (own[a],), (own[b],))
  normalizers["box"] = Normalizer("box")
  default = "inter_ocular" if "inter_ocular" in normalizers else "box"
  for benchmark in PROTOCOLS.values():
    if np.array_equal(benchmark.unified_index, index):
      normalizers, default = dict(benchmark.normalizers), benchmark.default_normalizer
  index.setflags(write=False)
  perm = _flip_permutation(index.size, pairs, name)
  perm.setflags(write=False)
  return Protocol(name=str(name), dataset_id=int(dataset_id), num_landmarks=int(index.size),
                  unified_index=index, flip_pairs=tuple(pairs), flip_permutation=perm,
                  normalizers=normalizers, default_normalizer=default)


def register_protocol(protocol: Protocol) -> None:
  """Makes a user scheme's protocol known to `get_protocol` (replacing one
  of the same name; benchmarks cannot be replaced)."""
  if protocol.name.upper() in {k.upper() for k in PROTOCOLS}:
    raise ValueError(f"{protocol.name} is a benchmark protocol")
  for key in [k for k in _REGISTERED if k.upper() == protocol.name.upper()]:
    del _REGISTERED[key]
  _REGISTERED[protocol.name] = protocol


def unregister_protocols() -> None:
  """Forgets every registered user scheme."""
  _REGISTERED.clear()


def is_benchmark(name: str) -> bool:
  """Whether `name` (case-insensitive) is one of the four benchmark protocols."""
  return str(name).upper() in {k.upper() for k in PROTOCOL_NAMES}


def dataset_ids(names) -> dict[str, int]:
  """{name: dataset id} of a run's `data.datasets`: a benchmark's fixed id,
  and 4 + k for the k-th user dataset among `names` (config order)."""
  ids, k = {}, 0
  for name in names:
    if is_benchmark(name):
      ids[name] = get_protocol(name).dataset_id
    else:
      ids[name] = len(PROTOCOL_NAMES) + k
      k += 1
  return ids


def num_dataset_ids(names) -> int:
  """How many dataset ids a run over `names` uses (the loss's D): the four
  benchmarks' and one per user dataset."""
  return len(PROTOCOL_NAMES) + sum(not is_benchmark(n) for n in names)


# The name of the whole 124-point unified set where a protocol is asked for.
UNIFIED = "unified"


def protocol_index(protocol: str) -> tuple[str, np.ndarray]:
  """(canonical name, unified ids of its points in its own order) of a protocol or "unified"."""
  if str(protocol).lower() == UNIFIED:
    return UNIFIED, np.arange(NUM_UNIFIED)
  found = get_protocol(protocol)
  return found.name, np.asarray(found.unified_index)


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
