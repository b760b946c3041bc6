"""Checkpoints of a training run: the latest train states and the best EMA models.

Layout under `<workdir>/checkpoints/`:

  latest/<step>/state   the whole train state (params, optimizer, EMA, ...)
  latest/<step>/data    the grain iterator state of every process
  best_<DATASET>/<step>/model   the EMA variables with the lowest NME on
                                that dataset's test set so far (metrics kept
                                with the step)

The train state and the data iterator are saved together in one Orbax step,
so a resumed run continues with exactly the batches it would have seen.
Array saves are asynchronous: `save` returns once the arrays are copied off
the accelerator and Orbax commits the step in the background; a step
directory only appears under its final name once committed, so a process
killed mid-save leaves the previous checkpoint intact.

Every committed step is sealed with `fgtbt_checksums.json` (the size and
CRC-32 of each of its files, written by process 0 once Orbax has committed
the step). A restore checks the seal first: a file cut short, emptied,
deleted or changed in place (zeroed bytes restore silently as garbage
weights otherwise) makes the step broken. Without a step named, a restore
falls back to the newest intact step with a warning naming the broken ones,
and a resumed run moves them to `checkpoints/broken/` so its next saves are
not taken for them; `CorruptCheckpointError` (one line) when none is intact.
A step killed before its seal is checked by Orbax's own reads only.

Restores go into an abstract target (`jax.ShapeDtypeStruct` with shardings),
so every process reads only its own shards. A state or model with NaN or
infinite values is never saved, and one restored is refused
(`NonFiniteStateError`, naming the first such array). Inference reads only the EMA
variables: `restore_ema` takes the `ema_params` / `ema_batch_stats` entries
of a train state (an Orbax partial restore: the optimizer moments are never
read) and `restore_best` a dataset's best model.

The run directory around it (config.json, the lock, which checkpoint to
use) is `fgtbt_jax.rundir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import zlib
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fgtbt_jax.rundir import WorkdirError

# The train-state entries that make the deployed (EMA) model.
_EMA_ENTRIES = {"params": "ema_params", "batch_stats": "ema_batch_stats"}


class IncompatibleCheckpointError(ValueError):
  """A checkpoint does not match the configured model or train state."""


class CorruptCheckpointError(OSError):
  """A checkpoint step's files are damaged (its seal, its metadata or its reads fail)."""


CHECKSUM_FILE = "fgtbt_checksums.json"
BROKEN_DIR = "broken"
_CHUNK = 1 << 22


def _file_checksum(path: pathlib.Path) -> tuple[int, int]:
  """(size, CRC-32) of a file."""
  crc, size = 0, 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
      size += len(chunk)
  return size, crc


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def seal_step(step_dir: str | os.PathLike) -> pathlib.Path:
  """Writes `<step_dir>/fgtbt_checksums.json` for a committed step (atomically)."""
  step_dir = pathlib.Path(step_dir)
  files = {}
  for path in _step_files(step_dir):
    size, crc = _file_checksum(path)
    files[str(path.relative_to(step_dir))] = {"size": size, "crc32": crc}
  target = step_dir / CHECKSUM_FILE
  fd, temporary = tempfile.mkstemp(prefix=".checksums.", dir=step_dir)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump({"files": files}, f)
    os.replace(temporary, target)
  except BaseException:
    pathlib.Path(temporary).unlink(missing_ok=True)
    raise
  return target


def _part(relative: str) -> str:
  """What a step's file belongs to, for messages."""
  top = relative.split(os.sep, 1)[0]
  return {"data": "the data-iterator state", "state": "the train state",
          "model": "the model"}.get(top, "the step's metadata")


def verify_step(step_dir: str | os.PathLike) -> str | None:
  """What is wrong with a sealed step's files, None if intact or not sealed."""
  step_dir = pathlib.Path(step_dir)
  seal = step_dir / CHECKSUM_FILE
  if not seal.exists():
    return None
  try:
    files = json.loads(seal.read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its seal {seal} is unreadable ({e})"
  for relative, expected in sorted(files.items()):
    path = step_dir / relative
    try:
      size, crc = _file_checksum(path)
    except FileNotFoundError:
      return f"{path} ({_part(relative)}) is missing"
    except OSError as e:
      return f"{path} ({_part(relative)}) is unreadable: {e}"
    if size != expected["size"]:
      return (f"{path} ({_part(relative)}) has {size} bytes where {expected['size']} "
              "were written")
    if crc != expected["crc32"]:
      return f"{path} ({_part(relative)}) changed since it was written (checksum mismatch)"
  return None


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())[:300]


class NonFiniteStateError(FloatingPointError):
  """A train state or model to save, or just restored, holds NaN or infinite values."""


# Jitted once at module level: a save of the same state reuses the compiled check.
_all_finite = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))


def first_non_finite(tree: Any) -> str | None:
  """The path of the first floating-point array of `tree` with a NaN or an infinity, or None.

  One jitted reduction over all arrays (sharded ones included: every
  process gets the same answer).
  """
  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
  if not leaves:
    return None
  finite = _all_finite([leaf for _, leaf in leaves])
  bad = np.flatnonzero(~np.asarray(jax.device_get(finite)))
  return _path_name(leaves[bad[0]][0]) if bad.size else None


def _check_finite(tree: Any, what: str) -> None:
  bad = first_non_finite(tree)
  if bad is not None:
    raise NonFiniteStateError(f"{what}: {bad} holds NaN or infinite values")


def _path_name(path) -> str:
  """"params/decoder/fuse/kernel" for a tree path of dict, attribute or index keys."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return "/".join(parts)


def describe_mismatch(saved_tree: Any, target: Any) -> str | None:
  """What differs between a checkpoint's array metadata and a target tree, or None.

  Compares entry names and shapes (a dataclass field, a dict key and a
  NamedTuple field of the same name count as the same entry).
  """
  saved = {_path_name(p): tuple(v.shape)
           for p, v in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  wanted = {_path_name(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(wanted.keys() - saved.keys())
  extra = sorted(saved.keys() - wanted.keys())
  reshaped = [k for k in sorted(wanted.keys() & saved.keys()) if wanted[k] != saved[k]]
  problems = []
  if missing:
    problems.append(f"{len(missing)} entries of the configured state are not in it "
                    f"(first: {missing[0]})")
  if extra:
    problems.append(f"{len(extra)} of its entries are not in the configured state "
                    f"(first: {extra[0]})")
  if reshaped:
    key = reshaped[0]
    problems.append(f"{len(reshaped)} entries differ in shape (first: {key}, "
                    f"checkpoint {saved[key]} vs config {wanted[key]})")
  return "; ".join(problems) or None


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (keeping shardings) for every array of `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
  """Distinct multi-process barrier names per manager.

  Several managers save the same step at once (the latest state and the best
  model of each dataset); their Orbax barriers are keyed by step and would
  collide across processes without a prefix.
  """
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def _restore_target(abstract: Any, saved_tree: Any) -> tuple[Any, Callable[[Any], Any]]:
  """The tree to restore into for `abstract`, and how to turn the result back into its form.

  A dataclass (a TrainState) is restored as the dict of its fields, less the
  fields that hold no arrays and that the checkpoint does not have: a field
  added later for an optional part (the TrainState's `sht`, {} without SHT's
  pose transfer) then restores checkpoints written before it existed.
  """
  if not dataclasses.is_dataclass(abstract) or not isinstance(saved_tree, Mapping):
    return abstract, lambda restored: restored
  fields = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)}
  target = {name: value for name, value in fields.items()
            if name in saved_tree or jax.tree_util.tree_leaves(value)}
  return target, lambda restored: abstract.replace(**restored)


def _check_compatible(metadata: Any, target: Any, where: pathlib.Path) -> None:
  """Raises IncompatibleCheckpointError before a restore that cannot fit."""
  problem = describe_mismatch(getattr(metadata, "tree", metadata), target)
  if problem:
    raise IncompatibleCheckpointError(
        f"checkpoint {where} does not match the configured model/train state "
        f"(was it written with another config?): {problem}")


class Checkpointer:
  """Saves and restores one run's checkpoints (see the module docstring).

  Args:
    directory: the checkpoint root, usually `<workdir>/checkpoints`.
    datasets: names of the datasets that get a best-EMA checkpoint each.
    max_to_keep: how many of the latest train states to keep.
    save_interval_steps: `save` without `force` writes only at multiples of it.
    enable_async: write arrays in a background thread.
  """

  def __init__(self, directory: str | pathlib.Path, *, datasets: Iterable[str],
               max_to_keep: int, save_interval_steps: int, enable_async: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"checkpoint max_to_keep must be at least 1, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"checkpoint save_interval_steps must be at least 1, got {save_interval_steps}")
    self.directory = pathlib.Path(directory).resolve()
    self._latest = ocp.CheckpointManager(
        self.directory / "latest", item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=enable_async, create=True,
            multiprocessing_options=_barrier_prefix("latest")))
    self._best = {
        name: ocp.CheckpointManager(
            self.directory / f"best_{name}", item_names=("model",),
            item_handlers={"model": ocp.StandardCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda metrics: metrics["nme"], best_mode="min",
                enable_async_checkpointing=enable_async, create=True,
                multiprocessing_options=_barrier_prefix(f"best_{name}")))
        for name in datasets}
    self._save_interval_steps = save_interval_steps
    # Best NME per dataset so far, read once from the saved metrics (an
    # asynchronous save's metrics only reach the disk when it commits).
    self._best_nme = {}
    for name, manager in self._best.items():
      step = manager.best_step()
      if step is not None:
        self._best_nme[name] = float(manager.metrics(step)["nme"])

  @classmethod
  def for_run(cls, config: Any, workdir: str | pathlib.Path,
              enable_async: bool = True) -> "Checkpointer":
    """The checkpoints of a training run: <workdir>/checkpoints, as its config sets them."""
    return cls(pathlib.Path(workdir) / "checkpoints", datasets=list(config.data.datasets),
               max_to_keep=int(config.train.keep_checkpoints),
               save_interval_steps=int(config.train.checkpoint_every), enable_async=enable_async)

  # -- latest train states ---------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest committed train-state step, or None."""
    return self._latest.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None,
           force: bool = False) -> bool:
    """Saves the train state (and the data iterator state) at `step`.

    Without `force` only at multiples of `save_interval_steps`. A step that
    is already saved is skipped. Returns whether a save was started.
    """
    if not force and step % self._save_interval_steps:
      return False
    if step in self._latest.all_steps():
      return False
    bad = first_non_finite(state)
    if bad is not None:
      self.wait_until_finished()
      last = self.latest_step()
      raise NonFiniteStateError(
          f"the train state of step {step} holds NaN or infinite values (first: {bad}); it "
          "was not saved, and the last good checkpoint is "
          + (f"step {last} in {self.directory / 'latest'}" if last is not None else "none")
          + ". Lower optimizer.learning_rate or set optimizer.grad_clip_norm.")
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    # Orbax waits for the previous asynchronous save before it starts this
    # one; waiting here first lets the committed steps be sealed.
    self._latest.wait_until_finished()
    self._seal(self._latest)
    return self._latest.save(step, args=ocp.args.Composite(**items), force=force)

  def _seal(self, manager: ocp.CheckpointManager) -> None:
    """Seals the committed steps of `manager` that have no seal yet (process 0)."""
    if jax.process_index() != 0:
      return
    for step in manager.all_steps():
      step_dir = pathlib.Path(manager.directory) / str(step)
      if step_dir.is_dir() and not (step_dir / CHECKSUM_FILE).exists():
        try:
          seal_step(step_dir)
        except FileNotFoundError:  # Deleted by retention meanwhile.
          continue

  def _try_steps(self, what: pathlib.Path, steps: list[int], attempt, explicit: bool):
    """attempt(step) for the newest step that is not broken; (result, broken steps).

    A broken step (CorruptCheckpointError) is skipped with a warning unless
    `explicit` (a step the caller named); none intact raises one error
    naming every broken step.
    """
    problems = []
    for step in steps:
      try:
        result = attempt(step)
      except CorruptCheckpointError as e:
        if explicit:
          raise
        logging.warning("%s; trying an older step", e)
        problems.append((step, str(e)))
        continue
      if problems:
        logging.warning("restored step %d from %s: the newer steps %s are broken", step, what,
                        [broken for broken, _ in problems])
      return result, [broken for broken, _ in problems]
    raise CorruptCheckpointError(
        f"no intact checkpoint under {what}: " + "; ".join(problem for _, problem in problems))

  def _checked_metadata(self, manager: ocp.CheckpointManager, step: int, item: str):
    """A step's item metadata, after its seal is verified."""
    where = pathlib.Path(manager.directory) / str(step)
    problem = verify_step(where)
    if problem:
      raise CorruptCheckpointError(f"checkpoint {where} is broken: {problem}")
    try:
      metadata = manager.item_metadata(step)[item]
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"checkpoint {where} is broken: its metadata is unreadable ({_one_line(e)})") from e
    if metadata is None:
      raise CorruptCheckpointError(f"checkpoint {where} is broken: no {item} metadata")
    return metadata, where

  def _quarantine(self, steps: list[int]) -> None:
    """Moves broken latest steps to checkpoints/broken/ (kept, out of Orbax's way)."""
    if not steps:
      return
    if jax.process_index() == 0:
      broken = self.directory / BROKEN_DIR
      broken.mkdir(exist_ok=True)
      for step in steps:
        target = broken / f"latest_{step}"
        suffix = 0
        while target.exists():
          suffix += 1
          target = broken / f"latest_{step}.{suffix}"
        shutil.move(os.fspath(self.directory / "latest" / str(step)), os.fspath(target))
        logging.warning("moved the broken checkpoint of step %d to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("fgtbt_quarantine")
    self._latest.reload()

  def restore(self, abstract_state: Any, data_iterator: Any | None = None,
              step: int | None = None, quarantine: bool = False) -> tuple[Any, int]:
    """Restores the train state of `step` (default: the newest intact one) into the target.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings. With
    `data_iterator`, its position is restored in place too. Without `step`,
    broken steps are skipped with a warning; `quarantine` (a resuming
    trainer) moves them to `checkpoints/broken/`.

    Raises:
      WorkdirError: no checkpoint (of that step).
      IncompatibleCheckpointError: it does not fit the target.
      CorruptCheckpointError: the step (or, without `step`, every step) is broken.
      NonFiniteStateError: the restored state holds NaN or infinite values.
    """
    steps = ([self._existing_step(step)] if step is not None
             else sorted(self._latest.all_steps(), reverse=True))
    if not steps:
      self._existing_step(None)  # Raises WorkdirError.
    (state, restored_step), broken = self._try_steps(
        self.directory / "latest", steps,
        lambda s: self._restore_latest(s, abstract_state, data_iterator), step is not None)
    if quarantine:
      self._quarantine(broken)
    return state, restored_step

  def _restore_latest(self, step: int, abstract_state: Any, data_iterator: Any | None):
    restored, where = self._read_back(self._latest, step, "state", abstract_state,
                                      "the train state")
    if data_iterator is not None:
      try:
        self._latest.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # pylint: disable=broad-except
        raise CorruptCheckpointError(
            f"checkpoint {where} is broken: the data-iterator state ({where / 'data'}) does "
            f"not read back ({_one_line(e)})") from e
    _check_finite(restored["state"], f"checkpoint {where}")
    return restored["state"], step

  def _read_back(self, manager, step: int, item: str, abstract: Any, what: str):
    """Item `item` of `manager`'s step restored onto `abstract`, and where it is.

    Its metadata is checked against `abstract` first (an incompatible
    checkpoint is `IncompatibleCheckpointError`), so a read that then fails
    is a damaged file: `CorruptCheckpointError` naming `what`.
    """
    metadata, where = self._checked_metadata(manager, step, item)
    _check_compatible(metadata, abstract, where)
    target, rebuild = _restore_target(abstract, getattr(metadata, "tree", metadata))
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"checkpoint {where} is broken: {what} does not read back ({_one_line(e)})") from e
    return {item: rebuild(restored[item])}, where

  def _existing_step(self, step: int | None) -> int:
    """`step` (default: the latest) if it is a committed train-state step."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise WorkdirError(f"no train-state checkpoint under {self.directory / 'latest'}")
    if step not in self._latest.all_steps():
      raise WorkdirError(f"no train-state checkpoint of step {step} under "
                         f"{self.directory / 'latest'} (steps: {self._latest.all_steps()})")
    return step

  def restore_ema(self, abstract_variables: Any, step: int | None = None) -> tuple[Any, int]:
    """The EMA variables {"params", "batch_stats"} of a train state, and its step.

    Only the train state's `ema_params` and `ema_batch_stats` are read (an
    Orbax partial restore into `abstract_variables`, a tree of
    `jax.ShapeDtypeStruct` with shardings shaped like the model's variables):
    no optimizer, loss or train-state structure is needed. Without `step`,
    the newest intact step (broken ones are skipped with a warning).
    """
    steps = ([self._existing_step(step)] if step is not None
             else sorted(self._latest.all_steps(), reverse=True))
    if not steps:
      self._existing_step(None)
    result, _ = self._try_steps(self.directory / "latest", steps,
                                lambda s: self._restore_ema(s, abstract_variables),
                                step is not None)
    return result

  def _restore_ema(self, step: int, abstract_variables: Any) -> tuple[Any, int]:
    metadata, where = self._checked_metadata(self._latest, step, "state")
    saved = getattr(metadata, "tree", metadata)
    target = {entry: abstract_variables[name] for name, entry in _EMA_ENTRIES.items()}
    _check_compatible({entry: saved.get(entry, {}) for entry in target}, target, where)
    reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
        multiprocessing_options=_barrier_prefix("restore_ema")))
    try:
      restored = reader.restore(where / "state", args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"checkpoint {where} is broken: the EMA model does not read back "
          f"({_one_line(e)})") from e
    finally:
      reader.close()
    _check_finite(restored, f"checkpoint {where}")
    return {name: restored[entry] for name, entry in _EMA_ENTRIES.items()}, step

  # -- best EMA models ---------------------------------------------------------

  def best_nme(self, dataset: str) -> float | None:
    """The lowest NME saved for `dataset`, or None."""
    return self._best_nme.get(dataset)

  def best_step(self, dataset: str) -> int | None:
    return self._best[dataset].best_step()

  def save_best(self, step: int, variables: Any, nme_by_dataset: Mapping[str, float]) -> list[str]:
    """Saves `variables` for every dataset whose NME improved; returns their names."""
    improved = []
    for name, nme in nme_by_dataset.items():
      if name not in self._best:
        continue
      best = self.best_nme(name)
      manager = self._best[name]
      if (best is not None and nme >= best) or step in manager.all_steps():
        continue
      _check_finite(variables, f"the EMA model of step {step} (best for {name}, not saved)")
      manager.wait_until_finished()
      self._seal(manager)
      manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(variables)),
                   metrics={"nme": float(nme)}, force=True)
      self._best_nme[name] = float(nme)
      improved.append(name)
    return improved

  def restore_best(self, dataset: str, abstract_variables: Any) -> tuple[Any, int]:
    """The best EMA variables for `dataset` and their step."""
    if dataset not in self._best:
      raise KeyError(f"no best-checkpoint slot for dataset {dataset!r}; have {list(self._best)}")
    manager = self._best[dataset]
    step = manager.best_step()
    if step is None:
      raise WorkdirError(f"no best checkpoint for {dataset} under {manager.directory}")
    restored, where = self._read_back(manager, step, "model", abstract_variables, "the model")
    _check_finite(restored["model"], f"checkpoint {where}")
    return restored["model"], step

  # -- lifecycle ---------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until every pending asynchronous save is committed, and seals them."""
    for manager in (self._latest, *self._best.values()):
      manager.wait_until_finished()
      self._seal(manager)

  def close(self) -> None:
    self.wait_until_finished()
    self._latest.close()
    for manager in self._best.values():
      manager.close()
