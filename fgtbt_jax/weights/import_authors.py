"""Import the FGTBT authors' released PyTorch checkpoint into a run directory.

  fgtbt import-authors \\
      --authors-checkpoint full_model_epoch0_best_wflw.pth --workdir runs/authors_wflw
  python run.py eval --workdir runs/authors_wflw --config.data.data_dir=DATA
  python run.py predict --workdir runs/authors_wflw --image face.jpg

The file is read and converted by `weights.authors` (without torch).
`import_authors_checkpoint` then writes a workdir: `config.json` (the
authors' recipe, configs/fgtbt_authors.py: `model.fgsa_compat="authors"`,
`model.batch_norm_unbiased_variance=True` as PyTorch trained it, their
evaluation conventions (heatmap mapping and quantised ground truth, FR from
the inter-pupil NME, unpadded test batches of 8), `data.datasets` the one
dataset) and the weights as that dataset's best EMA model
(`checkpoints/best_<DATASET>/<epoch>/model`, NME metric `inf`: not measured
here, so a training run in this workdir replaces it at its first
evaluation). `run.py eval` reads the best model when there is no train
state; it needs the converted data (`--config.data.data_dir`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections

from fgtbt_jax import checkpointing
from fgtbt_jax import landmarks
from fgtbt_jax import models
from fgtbt_jax import rundir
from fgtbt_jax.weights.authors import LoadReport
from fgtbt_jax.weights.authors import convert_state_dict
from fgtbt_jax.weights.authors import read_checkpoint

# The EMA model is saved with the test batch size the authors evaluated with:
# with `fgsa_compat="authors"` a face's output depends on its batch-mates.
AUTHORS_EVAL_BATCH_SIZE = 8
IMPORT_RECORD = "authors_checkpoint.json"


def dataset_from_filename(path: str | os.PathLike) -> str | None:
  """"WFLW" for full_model_epoch0_best_wflw.pth; None without a `_best_<dataset>` suffix."""
  match = re.search(r"_best_([A-Za-z0-9]+)$", pathlib.Path(path).stem)
  if match is None:
    return None
  try:
    return landmarks.get_protocol(match[1]).name
  except ValueError:
    return None


def run_config(recipe: ml_collections.ConfigDict, dataset: str,
               variant: str = "paper") -> ml_collections.ConfigDict:
  """The run config of an imported checkpoint (see the module docstring).

  `recipe`: the authors' recipe, `configs/fgtbt_authors.get_config()` (their
  model, training and evaluation; the caller reads the config file, the
  library imports no config); it is copied, not changed.
  """
  config = copy.deepcopy(recipe)  # Its field references (image size = input size) kept.
  config.model.update(models.model_config(
      variant, fgsa_compat="authors", batch_norm_unbiased_variance=True))
  config.data.datasets = (dataset,)
  config.data.eval_batch_size = AUTHORS_EVAL_BATCH_SIZE
  config.eval.best_on_subsets = tuple(
      entry for entry in config.eval.best_on_subsets if entry.startswith(f"{dataset}:"))
  return config


@dataclasses.dataclass
class ImportResult:
  """What `import_authors_checkpoint` wrote.

  Attributes:
    workdir: the run directory.
    dataset: whose best model the weights are.
    step: the checkpoint's step (the file's epoch entry; 0 when absent).
    report: the `LoadReport`.
  """

  workdir: pathlib.Path
  dataset: str
  step: int
  report: LoadReport


def _check_free(workdir: pathlib.Path) -> None:
  for name in (rundir.CONFIG_FILE, rundir.CHECKPOINTS_DIR):
    if (workdir / name).exists():
      raise FileExistsError(f"{workdir} already holds a run ({workdir / name}); "
                            "import into a new workdir")


def import_authors_checkpoint(path: str | os.PathLike, workdir: str | os.PathLike,
                              dataset: str | None = None, *, recipe: ml_collections.ConfigDict,
                              variant: str = "paper") -> ImportResult:
  """Converts an authors' checkpoint into a workdir for `run.py eval` / `predict`.

  Args:
    path: the released .pth file.
    workdir: a new (or empty) run directory.
    dataset: whose best model the file is ("WFLW", "300W", "COFW", "AFLW",
      any case); default from the file name's `_best_<dataset>` suffix.
    recipe: the authors' recipe (`configs/fgtbt_authors.get_config()`).
    variant: the model variant the state dict is of ("paper" for the
      released files; smaller ones for tests).

  Raises:
    FileNotFoundError: no such file.
    FileExistsError: the workdir already holds a run (config.json or checkpoints/).
    AuthorsCheckpointError: the file is not a usable authors' checkpoint.
    ValueError: no dataset given or in the file name, or an unknown one.
  """
  path, workdir = pathlib.Path(path), pathlib.Path(workdir)
  if dataset is None:
    dataset = dataset_from_filename(path)
    if dataset is None:
      raise ValueError(f"{path}: which dataset's best model is this? The file name has no "
                       "_best_<dataset> suffix; pass the dataset, one of "
                       f"{landmarks.PROTOCOL_NAMES}")
  dataset = landmarks.get_protocol(dataset).name
  _check_free(workdir)
  checkpoint = read_checkpoint(path)
  config = run_config(recipe, dataset, variant)
  variables, report = convert_state_dict(checkpoint.state_dict, config.model, str(path))
  step = checkpoint.epoch if checkpoint.epoch is not None and checkpoint.epoch >= 0 else 0
  workdir.mkdir(parents=True, exist_ok=True)
  rundir.write_run_config(config, workdir)
  checkpoints = checkpointing.Checkpointer.for_run(config, workdir, enable_async=False)
  try:
    # Not measured here: any evaluated model of a later training run is better.
    checkpoints.save_best(step, jax.tree.map(jnp.asarray, variables),
                          {dataset: float("inf")})
  finally:
    checkpoints.close()
  record = {"source": str(path.resolve()), "structure": checkpoint.structure,
            "dataset": dataset, "step": step, "epoch": checkpoint.epoch,
            "loaded": len(report.loaded), "dropped": len(report.dropped),
            "prefix_stripped": report.prefix,
            "converted_to_float32": report.converted,
            "num_batches_tracked": {str(k): v for k, v in report.batches_tracked.items()}}
  (workdir / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
  return ImportResult(workdir, dataset, step, report)


if __name__ == "__main__":  # The command moved; say where instead of doing nothing.
  raise SystemExit("this module is a library now; the command is `fgtbt import-authors` "
                   "(or `python -m fgtbt_jax.commands import-authors`)")
