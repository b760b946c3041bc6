"""Point schemes of a user's own datasets: which unified points they annotate.

A user's own dataset (converted with `--format folder` under its own name)
annotates the points of a scheme:

* a benchmark's: "WFLW", "300W", "COFW" or "AFLW" (its points in its order);
* a user scheme: a JSON file holding a list of unified point names, or an
  object {"points": [...]} (or a text file, one name a line, `#` comments),
  in the order of the points in the user's annotation files. Names are
  `landmarks.POINT_NAMES` ("jaw_00", ..., "left_pupil") or
  "<benchmark>:<0-based index>" ("300W:36"); `fgtbt convert --list-points`
  prints the table.

The conversion stores the scheme (as point names) in the converted data's
metadata (`metadata.json`, key "scheme"), so a run reads it back from
`data.data_dir`: `register_own_datasets(data_config)` registers the
protocols of a config's own datasets (`landmarks.register_protocol`) with
their dataset ids (`landmarks.dataset_ids`: 4 + k for the k-th in
`data.datasets`), after which every part of the code sees them as it sees
the benchmarks, masked by their points.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np

from fgtbt_jax.data import tfds_builders
from fgtbt_jax import landmarks
from fgtbt_jax.errors import ConfigError, DataError

# The conversion metadata key holding an own dataset's scheme.
METADATA_KEY = "scheme"


def scheme_points(scheme: str | os.PathLike | Sequence[str]) -> np.ndarray:
  """The unified ids of a scheme: a benchmark name, a scheme file, or names.

  Raises:
    DataError: naming the file (and the point) when the file is unreadable
      or names an unknown or repeated point.
  """
  if isinstance(scheme, (list, tuple)):
    return landmarks.point_ids(scheme, "scheme")
  text = os.fspath(scheme)
  if landmarks.is_benchmark(text):
    return np.asarray(landmarks.get_protocol(text).unified_index, np.int32)
  if not os.path.isfile(text):
    raise DataError(text, "scheme is neither a benchmark (WFLW, 300W, COFW, AFLW) nor a "
                    "file of unified point names", "missing_file")
  try:
    raw = pathlib.Path(text).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(text, f"unreadable scheme file: {e}", "missing_file") from None
  if text.lower().endswith(".json"):
    try:
      value = json.loads(raw)
    except json.JSONDecodeError as e:
      raise DataError(text, f"not JSON: {e}", "bad_value") from None
    if isinstance(value, dict):
      if "points" not in value:
        raise DataError(text, f"no 'points' key (keys: {sorted(value)}); expected a list "
                        "of unified point names or {\"points\": [...]}", "missing_key")
      value = value["points"]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
      raise DataError(f"{text}[points]", "expected a list of unified point names",
                      "bad_value")
    names = value
  else:
    names = [line.split("#", 1)[0].strip() for line in raw.splitlines()]
    names = [n for n in names if n]
  try:
    return landmarks.point_ids(names, f"{text}[points]")
  except ValueError as e:
    raise DataError(text, str(e).split(": ", 1)[1], "bad_value") from None


def own_protocol(name: str, scheme, dataset_id: int | None = None) -> landmarks.Protocol:
  """The protocol of own dataset `name` under `scheme` (`scheme_points`)."""
  points = scheme_points(scheme)
  try:
    return landmarks.user_protocol(
        name, points, landmarks.num_dataset_ids(()) if dataset_id is None else dataset_id)
  except ValueError as e:
    if isinstance(scheme, (str, os.PathLike)) and os.path.isfile(scheme):
      raise DataError(os.fspath(scheme), str(e), "bad_value") from None
    raise


def scheme_metadata(protocol: landmarks.Protocol) -> dict:
  """What the conversion stores under `METADATA_KEY`: the points' names."""
  return {"name": protocol.name,
          "points": [landmarks.POINT_NAMES[u] for u in protocol.unified_index.tolist()]}


def stored_scheme(data_dir, name: str, crop_config: str = "") -> list[str] | None:
  """The point names stored with own dataset `name` under `data_dir` (None:
  not converted there)."""
  try:
    metadata = tfds_builders.conversion_metadata(data_dir, name, crop_config)
  except FileNotFoundError:
    return None
  held = metadata.get(METADATA_KEY)
  if not isinstance(held, dict) or not isinstance(held.get("points"), list):
    path = tfds_builders.converted_dir(data_dir, name, crop_config) / "metadata.json"
    raise DataError(os.fspath(path), f"no point scheme ({METADATA_KEY!r}) of own dataset "
                    f"{name}; convert it again with --overwrite", "missing_key")
  return [str(p) for p in held["points"]]


def register_own_datasets(data_config) -> dict[str, landmarks.Protocol]:
  """Registers the protocols of `data_config.datasets`' own datasets.

  Each is read from its conversion under `data.data_dir` and gets the id
  `landmarks.dataset_ids(data.datasets)` gives it. Forgets protocols
  registered before (one run's datasets at a time).

  Raises:
    ConfigError: naming data.datasets, for a name that is not a valid own
      dataset name or not converted under data.data_dir.
  """
  landmarks.unregister_protocols()
  names = list(data_config.datasets)
  ids = landmarks.dataset_ids(names)
  registered = {}
  for name in names:
    if landmarks.is_benchmark(name):
      continue
    try:
      points = stored_scheme(data_config.data_dir, name, data_config.crop_config)
    except ValueError as e:
      raise ConfigError(f"data.datasets: {name}: {e}") from e
    if points is None:
      raise ConfigError(
          f"data.datasets: unknown protocol {name!r}: neither a benchmark "
          f"{landmarks.PROTOCOL_NAMES} nor an own dataset converted under data.data_dir "
          f"{str(data_config.data_dir)!r}; convert it with `fgtbt convert --dataset {name} "
          f"--format folder --src DIR --scheme 300W|points.json --out "
          f"{data_config.data_dir or 'DIR'}`")
    try:
      protocol = landmarks.user_protocol(name, landmarks.point_ids(points, name), ids[name])
    except ValueError as e:
      raise ConfigError(f"data.datasets: {e}") from e
    landmarks.register_protocol(protocol)
    registered[protocol.name] = protocol
  return registered
