"""Data preparation before a run: synthetic stand-ins on first use, then checks.

`prepare_data(data_config, synthetic_config)` makes sure every dataset in
`data.datasets` is converted under `data.data_dir`. With
`synthetic_data.generate` it first renders and converts the synthetic
stand-in datasets there (`convert.convert_synthetic`; process 0 writes, the
others wait), but only into a folder that is new, empty, or holds nothing but
earlier synthetic conversions: never beside a user's real data, which the
synthetic faces would otherwise be mixed with (or written over).

A folder counts as earlier synthetic output when every entry in it is one of:
* `raw/` holding `synthetic.MARKER_FILE` (written before rendering starts) or
  a synthetic `manifest.json` (written when it ends);
* a builder folder (`fgtbt_wflw/`, ...) whose finished conversions are all
  marked synthetic (`tfds_builders.is_synthetic`), or unfinished ones when
  `raw/` is synthetic (an interrupted run);
* TFDS's `downloads/` folder without files in it.

`synthetic_datasets(data_config)` says which configured datasets are
synthetic conversions, `data_kinds(data_config)` what each one is
(synthetic, benchmark, own folder, unlabeled folder), so tables can label
their rows. `evaluated_datasets(data_config)` are the configured datasets
but unlabeled folders (`tfds_builders.is_unlabeled`), which hold a train
split only: evaluation and the best checkpoints are for those. A
user's own datasets in `data.datasets` have their point schemes read from
their conversions and registered first (`schemes.register_own_datasets`).

Errors are `fgtbt_jax.errors.ConfigError`s naming the config key. This module
needs neither the trainer nor its sharding helpers: multi-process runs
synchronise with `jax.experimental.multihost_utils` directly.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from fgtbt_jax.data import convert
from fgtbt_jax.data import schemes
from fgtbt_jax.data import tfds_builders
from fgtbt_jax.data import datasets
from fgtbt_jax import landmarks
from fgtbt_jax.errors import ConfigError, UnknownProtocolError

# TFDS creates this (empty, with a manual source) beside the builders.
_TFDS_DOWNLOADS = "downloads"
_MAX_LISTED = 5


def _barrier(name: str) -> None:
  """All processes wait here for each other (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _is_synthetic_manifest(path: pathlib.Path) -> bool:
  """Whether `path` is the manifest.json that `write_synthetic_datasets` writes."""
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(manifest, dict) and {"seed", "sizes", "paths"} <= set(manifest)


def _raw_is_synthetic(raw: pathlib.Path) -> bool:
  from fgtbt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return (raw / synthetic.MARKER_FILE).is_file() or _is_synthetic_manifest(raw / "manifest.json")


def _foreign_conversions(data_dir: pathlib.Path, builder_dir: pathlib.Path, dataset: str,
                         raw_synthetic: bool) -> list[str]:
  """The entries of one builder folder that are not synthetic conversions."""
  foreign = []
  for entry in sorted(builder_dir.iterdir()):
    if entry.name.startswith("."):
      continue  # TFDS bookkeeping (".config").
    if not entry.is_dir():
      foreign.append(str(entry))
      continue
    try:
      finished = tfds_builders.converted_dir(data_dir, dataset, entry.name)
    except FileNotFoundError:
      # Unfinished: an interrupted synthetic run when the raw faces are ours.
      if not raw_synthetic:
        foreign.append(f"{entry} (an unfinished {dataset} conversion)")
      continue
    try:
      synthetic = tfds_builders.is_synthetic(data_dir, dataset, entry.name)
    except ValueError as e:
      foreign.append(f"{finished} ({e})")
      continue
    if not synthetic:
      foreign.append(f"{finished} (a {dataset} conversion not marked synthetic)")
  return foreign


def foreign_entries(data_dir: str | pathlib.Path) -> list[str]:
  """What in `data_dir` is not the output of earlier synthetic conversions.

  Empty when synthetic data may be written there: the folder does not exist,
  is empty, or holds only what `convert.convert_synthetic` writes (see the
  module doc). Each entry names a path, with the reason where it helps.
  """
  data_dir = pathlib.Path(data_dir)
  if not data_dir.exists():
    return []
  if not data_dir.is_dir():
    return [f"{data_dir} (not a directory)"]
  builders = {spec.builder_name: name for name, spec in datasets.DATASETS.items()}
  raw_synthetic = _raw_is_synthetic(data_dir / convert.SYNTHETIC_RAW_DIR)
  foreign = []
  for entry in sorted(data_dir.iterdir()):
    if entry.name == convert.SYNTHETIC_RAW_DIR and entry.is_dir():
      if not raw_synthetic:
        foreign.append(f"{entry} (no synthetic marker or manifest in it)")
    elif entry.name == _TFDS_DOWNLOADS and entry.is_dir():
      if any(path.is_file() for path in entry.rglob("*")):
        foreign.append(f"{entry} (holds files)")
    elif entry.name in builders and entry.is_dir():
      foreign.extend(_foreign_conversions(data_dir, entry, builders[entry.name], raw_synthetic))
    else:
      foreign.append(str(entry))
  return foreign


def _configured_datasets(data_config: ml_collections.ConfigDict) -> list[str]:
  try:
    return [datasets.get(name).name for name in data_config.datasets]
  except UnknownProtocolError as e:
    raise ConfigError(f"data.datasets: {e}") from e


def _datasets_flag(names) -> str:
  """The command-line override that configures exactly `names`."""
  items = ",".join(f'"{name}"' for name in names)
  return f"--config.data.datasets='({items}{',' if len(names) == 1 else ''})'"


def _generate_synthetic(data_dir: pathlib.Path, synthetic_config: ml_collections.ConfigDict,
                        barrier: Callable[[str], None]) -> None:
  # Every process looks before any writes: on a shared folder they all see
  # the same contents and all refuse together (none is left waiting).
  foreign = foreign_entries(data_dir)
  if foreign:
    listed = "; ".join(foreign[:_MAX_LISTED])
    more = f"; and {len(foreign) - _MAX_LISTED} more" if len(foreign) > _MAX_LISTED else ""
    raise ConfigError(
        f"synthetic_data.generate: data.data_dir {str(data_dir)!r} holds data that is not "
        f"synthetic ({listed}{more}); synthetic faces are only written into a new or "
        "empty folder, or one holding only earlier synthetic conversions. Point "
        "data.data_dir at another folder, or set synthetic_data.generate=False to use "
        "the data there")
  barrier("synthetic data checked")
  if jax.process_index() == 0:
    logging.info("synthetic datasets: %s (generated on first use)", data_dir)
    convert.convert_synthetic(
        data_dir, {k: tuple(v) for k, v in synthetic_config.sizes.items()},
        seed=synthetic_config.seed, image_size=synthetic_config.image_size)
  barrier("synthetic data ready")


def prepare_data(data_config: ml_collections.ConfigDict,
                 synthetic_config: ml_collections.ConfigDict, *,
                 barrier: Callable[[str], None] | None = None,
                 splits: Sequence[str] | None = None) -> None:
  """Makes sure every dataset of `data.datasets` is converted under `data.data_dir`.

  Args:
    data_config: the `data` config (data_dir, crop_config, datasets).
    synthetic_config: the `synthetic_data` config (generate, sizes, seed,
      image_size). With `generate` the synthetic stand-ins are rendered and
      converted into data_dir on first use (process 0 writes, all processes
      wait for it), unless data_dir holds other data.
    barrier: `barrier(name)` makes all processes wait for each other;
      default: `multihost_utils.sync_global_devices` with several processes.

  Raises:
    ConfigError: naming the config key: data_dir is empty, not a directory,
      or (with `synthetic_data.generate`) holds data that is not synthetic;
      a configured dataset is unknown or not converted there; several crop
      configs are converted and `data.crop_config` does not choose one;
      every configured dataset is an unlabeled folder (nothing to learn
      landmarks from, nothing to evaluate).
    DataError: naming the file, when a converted file is missing, damaged or
      cut short.
  """
  barrier = barrier or _barrier
  schemes.register_own_datasets(data_config)
  names = _configured_datasets(data_config)
  if not data_config.data_dir:
    raise ConfigError("data.data_dir is empty: set it to the --out folder of "
                      "python -m data_pipelines.convert")
  data_dir = pathlib.Path(data_config.data_dir)
  if synthetic_config.generate:
    _generate_synthetic(data_dir, synthetic_config, barrier)
  if not data_dir.is_dir():
    raise ConfigError(f"data.data_dir {str(data_dir)!r} is not a directory; convert the "
                      f"datasets there first (python -m data_pipelines.convert --out DIR)")
  problems = []
  for name in names:
    try:
      tfds_builders.converted_dir(data_dir, name, data_config.crop_config)
    except FileNotFoundError as e:
      problems.append((name, str(e)))
    except ValueError as e:  # Several crop configs converted.
      raise ConfigError(f"data.crop_config: {e}") from e
  if problems:
    missing = [name for name, _ in problems]
    kept = [name for name in names if name not in missing]
    them = "it" if len(missing) == 1 else "them"
    narrow = (f"or leave {them} out with {_datasets_flag(kept)}" if kept else
              "or generate synthetic stand-ins there with "
              "--config.synthetic_data.generate=True")
    reasons = "; ".join(reason for _, reason in problems)
    raise ConfigError(f"data.data_dir {str(data_dir)!r} lacks {', '.join(missing)}: "
                      f"{reasons}, {narrow}")
  unlabeled = _unlabeled(data_config, names)
  if unlabeled == names:
    raise ConfigError(
        f"data.datasets: every dataset is an unlabeled folder of faces without landmarks "
        f"({', '.join(names)}); a run needs at least one dataset with landmarks beside "
        "them to learn and to evaluate on")
  # Every split the run reads must be there before any step (a conversion
  # made with --splits train holds no test split). An unlabeled folder is
  # read for training only.
  needed = tuple(splits) if splits is not None else (data_config.train_split,
                                                     data_config.eval_split)
  for name in names:
    try:
      held = tfds_builders.converted_splits(data_dir, name, data_config.crop_config)
    except ValueError as e:
      raise ConfigError(f"data.data_dir: {e}") from e
    if name in unlabeled:
      absent = [split for split in needed
                if split == data_config.train_split and split not in held]
      if absent:
        raise ConfigError(
            f"data.train_split: the unlabeled folder {name} holds the splits {held} "
            f"({tfds_builders.converted_dir(data_dir, name, data_config.crop_config)}), "
            f"not {data_config.train_split!r}; an unlabeled folder is converted as 'train'")
      continue
    absent = [split for split in needed if split not in held]
    if absent:
      where = tfds_builders.converted_dir(data_dir, name, data_config.crop_config)
      raise ConfigError(
          f"data.data_dir: {where} holds the {name} splits {held}, not {absent} "
          f"(data.train_split / data.eval_split); convert them with `python -m "
          f"data_pipelines.convert --dataset {name.lower()} --splits {','.join(absent)} "
          f"--src DIR --out {data_dir}`")
    for split in needed:  # Each file opened: a truncated one fails here, named.
      tfds_builders.open_split(data_dir, name, split, data_config.crop_config)


def _unlabeled(data_config: ml_collections.ConfigDict, names: Sequence[str]) -> list[str]:
  """Those of `names` converted under data.data_dir as unlabeled folders."""
  found = []
  for name in names:
    try:
      if tfds_builders.is_unlabeled(data_config.data_dir, name, data_config.crop_config):
        found.append(name)
    except FileNotFoundError:
      continue
    except ValueError as e:  # Several crop configs, or unreadable metadata.
      raise ConfigError(f"data.data_dir: {e}") from e
  return found


def evaluated_datasets(data_config: ml_collections.ConfigDict) -> list[str]:
  """The configured datasets that are evaluated (and keep best checkpoints):
  all but the unlabeled folders (faces without landmarks, no test split),
  in config order, as the config names them.

  A dataset not converted under data.data_dir (or no data.data_dir) is
  not known to be unlabeled and is kept; `prepare_data` reports those.

  Raises:
    ConfigError: naming data.data_dir, when a conversion's metadata is
      unreadable or several crop configs leave it ambiguous.
  """
  names = list(data_config.datasets)
  if not data_config.data_dir:
    return names
  unlabeled = set(_unlabeled(data_config, [
      n for n in names if not landmarks.is_benchmark(n)]))
  return [n for n in names if n not in unlabeled]


def synthetic_datasets(data_config: ml_collections.ConfigDict) -> set[str]:
  """Which configured datasets are converted under data.data_dir as synthetic data.

  Protocol names ("WFLW", ...). A dataset not converted there is left out
  (it is not known to be synthetic); `prepare_data` reports those.
  """
  if not data_config.data_dir:
    return set()
  found = set()
  for name in _configured_datasets(data_config):
    try:
      if tfds_builders.is_synthetic(data_config.data_dir, name, data_config.crop_config):
        found.add(name)
    except FileNotFoundError:
      continue
  return found


def data_kinds(data_config: ml_collections.ConfigDict) -> dict[str, str]:
  """{dataset: what its conversion under data.data_dir is} of the configured
  datasets: "synthetic", "benchmark", "own folder" or "unlabeled folder"
  (`tfds_builders.data_kind`); one not converted there is left out."""
  if not data_config.data_dir:
    return {}
  kinds = {}
  for name in _configured_datasets(data_config):
    try:
      kinds[name] = tfds_builders.data_kind(data_config.data_dir, name,
                                            data_config.crop_config)
    except FileNotFoundError:
      continue
  return kinds
