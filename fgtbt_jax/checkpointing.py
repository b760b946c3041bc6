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

Restores go into an abstract target (`jax.ShapeDtypeStruct` with shardings),
so every process reads only its own shards.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterable, Mapping

import grain
import jax
import orbax.checkpoint as ocp


class IncompatibleCheckpointError(ValueError):
  """A checkpoint does not match the configured model or train state."""


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
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=enable_async, create=True,
            multiprocessing_options=_barrier_prefix("latest")))
    self._best = {
        name: ocp.CheckpointManager(
            self.directory / f"best_{name}", item_names=("model",),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda metrics: metrics["nme"], best_mode="min",
                enable_async_checkpointing=enable_async, create=True,
                multiprocessing_options=_barrier_prefix(f"best_{name}")))
        for name in datasets}

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
    if step in self._latest.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._latest.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iterator: Any | None = None,
              step: int | None = None) -> tuple[Any, int]:
    """Restores the train state of `step` (default: latest) into the target.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings. With
    `data_iterator`, its position is restored in place too. Raises
    FileNotFoundError when there is no checkpoint and
    IncompatibleCheckpointError when it does not fit the target.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no train-state checkpoint under {self.directory / 'latest'}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    where = self.directory / "latest" / str(step)
    try:
      restored = self._latest.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise IncompatibleCheckpointError(
          f"checkpoint {where} does not match the configured model/train state "
          f"(was it written with another config?): {e}") from e
    return restored["state"], step

  # -- best EMA models ---------------------------------------------------------

  def best_nme(self, dataset: str) -> float | None:
    """The lowest NME saved for `dataset`, or None."""
    manager = self._best[dataset]
    step = manager.best_step()
    if step is None:
      return None
    return float(manager.metrics(step)["nme"])

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
      manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(variables)),
                   metrics={"nme": float(nme)}, force=True)
      improved.append(name)
    return improved

  def restore_best(self, dataset: str, abstract_variables: Any) -> tuple[Any, int]:
    """The best EMA variables for `dataset` and their step."""
    if dataset not in self._best:
      raise KeyError(f"no best-checkpoint slot for dataset {dataset!r}; have {list(self._best)}")
    manager = self._best[dataset]
    step = manager.best_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint for {dataset} under {manager.directory}")
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract_variables)))
    except (ValueError, KeyError, TypeError) as e:
      raise IncompatibleCheckpointError(
          f"checkpoint {manager.directory / str(step)} does not match the configured "
          f"model: {e}") from e
    return restored["model"], step

  # -- lifecycle ---------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until every pending asynchronous save is committed."""
    self._latest.wait_until_finished()
    for manager in self._best.values():
      manager.wait_until_finished()

  def close(self) -> None:
    self.wait_until_finished()
    self._latest.close()
    for manager in self._best.values():
      manager.close()
