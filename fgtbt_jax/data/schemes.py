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

A training run also keeps its own datasets' schemes: `write_run_schemes`
writes `<workdir>/schemes.json` ({"schemes": {name: [point names]}}) when
it starts, and `register_run_schemes` registers them again for the run's
predict and export (`Predictor.from_checkpoint`, `run.py predict`), so
`--config.predict.protocol=<own dataset>` gives that scheme's points in
its order without the converted data. A run trained before the file
existed reads them from its conversions under `data.data_dir`, where still
there.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np

from fgtbt_jax import landmarks
from fgtbt_jax.errors import ConfigError, DataError

# The conversion metadata key holding an own dataset's scheme.
METADATA_KEY = "scheme"
# The file of a run's workdir holding its own datasets' schemes.
RUN_FILE = "schemes.json"


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
  # Here, not at the top: it loads tensorflow_datasets, which predict does not need.
  from fgtbt_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
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


def own_dataset_names(datasets: Sequence[str]) -> list[str]:
  """The names of `datasets` (a run's `data.datasets`) that are not benchmarks."""
  return [str(n) for n in datasets if not landmarks.is_benchmark(n)]


def write_run_schemes(workdir, data_config) -> pathlib.Path | None:
  """Writes `<workdir>/schemes.json`: the point names of the config's own
  datasets as registered now (`register_own_datasets` ran); None (nothing
  written) when the run has no own dataset.

  Written whole to a temporary file and renamed, so a kill leaves the
  previous file.
  """
  names = own_dataset_names(data_config.datasets)
  if not names:
    return None
  held = {name: scheme_metadata(landmarks.get_protocol(name))["points"] for name in names}
  path = pathlib.Path(workdir) / RUN_FILE
  temporary = path.with_name(f".{RUN_FILE}.{os.getpid()}")
  try:
    temporary.write_text(json.dumps({"schemes": held}, indent=1) + "\n")
    os.replace(temporary, path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise
  return path


def run_schemes(workdir, data_config) -> dict[str, list[str]]:
  """{own dataset: its point names} of a run: from `<workdir>/schemes.json`,
  else (a run trained before it) from the conversions under `data.data_dir`;
  an own dataset found in neither is left out.

  Raises:
    DataError: naming schemes.json, when it is not the file training writes.
  """
  names = own_dataset_names(data_config.datasets)
  path = pathlib.Path(workdir) / RUN_FILE
  held: dict = {}
  if names and path.is_file():
    try:
      held = json.loads(path.read_text(encoding="utf-8"))["schemes"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise DataError(os.fspath(path), f"not a run's point schemes ({type(e).__name__}: {e}); "
                      "training writes it", "bad_value") from None
    if not isinstance(held, dict):
      raise DataError(os.fspath(path), "'schemes' is not an object", "bad_value")
  found = {}
  for name in names:
    points = held.get(name)
    if points is not None and (not isinstance(points, list)
                               or not all(isinstance(p, str) for p in points)):
      raise DataError(f"{os.fspath(path)}[schemes][{name}]", "expected a list of unified "
                      "point names", "bad_value")
    if points is None and data_config.data_dir:
      try:
        points = stored_scheme(data_config.data_dir, name, data_config.crop_config)
      except DataError:
        points = None
    if points is not None:
      found[name] = list(points)
  return found


def register_run_schemes(workdir, config) -> dict[str, landmarks.Protocol]:
  """Registers the own datasets' schemes of the run in `workdir` (`run_schemes`)
  with their dataset ids, forgetting those registered before; returns them.

  Raises:
    DataError: naming the file, for a stored scheme that names an unknown
      or repeated point.
  """
  landmarks.unregister_protocols()
  ids = landmarks.dataset_ids(config.data.datasets)
  registered = {}
  where = os.fspath(pathlib.Path(workdir) / RUN_FILE)
  for name, points in run_schemes(workdir, config.data).items():
    try:
      protocol = landmarks.user_protocol(name, landmarks.point_ids(points, name), ids[name])
    except ValueError as e:
      raise DataError(where, str(e), "bad_value") from None
    landmarks.register_protocol(protocol)
    registered[protocol.name] = protocol
  return registered
