"""The run directory: its lock, its config.json, and which checkpoint to use.

A training run's workdir holds:

  config.json     the experiment config the run was started with
  schemes.json    its own datasets' point schemes, when it has any (`fgtbt_jax.data.schemes`)
  checkpoints/    latest train states and best EMA models (`checkpointing`)
  .lock           the trainer's pid and host while one trains it (`WorkdirLock`)

`load_run_config` is the one way eval, predict, export and a resumed
training run read config.json: an older file is first upgraded (`UPGRADES`
fills every field added since it was written, with the value that gives the
run the behaviour it had), then the command line's `--config.*` overrides
apply on top. After it, every field of the config can be read as an
attribute; no reader needs a default of its own.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Mapping

from absl import logging
import ml_collections

from fgtbt_jax import models
from fgtbt_jax.data import prepare
from fgtbt_jax.errors import ConfigError

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"
# What eval and predict can be asked for: the newest train state's EMA
# model, or the EMA model with the lowest NME on a dataset.
CHECKPOINT_KINDS: tuple[str, ...] = ("latest", "best")


class WorkdirError(FileNotFoundError):
  """A run directory lacks what was asked of it (config.json, a checkpoint) or
  holds an unreadable config; the message names the path."""


def check_kind(kind: str) -> str:
  """`kind` if it is one of CHECKPOINT_KINDS, else ValueError naming them."""
  if kind not in CHECKPOINT_KINDS:
    raise ValueError(f"checkpoint kind {kind!r}: expected one of {CHECKPOINT_KINDS}")
  return kind


# -- the lock --------------------------------------------------------------------

def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    return True
  return True


class WorkdirLock:
  """One trainer per workdir: `<workdir>/.lock` holds the owner's pid and host.

      with WorkdirLock(workdir):
        ...train...

  A second start gets a WorkdirError naming the holder. A lock left by a
  killed process of this host (its pid is gone) is stale: it is taken over
  with a warning. One of another host cannot be checked and is refused
  (remove the file once that trainer is surely gone). A lock file that
  stays empty or unreadable (a start that died, or a full disk, between
  creating and writing it) is stale too. A lock that cannot be written is a
  one-line WorkdirError, and leaves no file behind.
  """

  # How long an empty lock file may be another start's, between its creation and write.
  EMPTY_GRACE_S = 1.0

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self._held = False

  def acquire(self) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if not holder:
          time.sleep(self.EMPTY_GRACE_S)
          holder = self._holder()
        if not holder:
          logging.warning("%s: taking over an empty or unreadable lock file (a start that "
                          "could not write it)", self.path)
          self.path.unlink(missing_ok=True)
          continue
        if (holder.get("host") == owner["host"] and isinstance(holder.get("pid"), int)
            and not _alive(holder["pid"])):
          logging.warning("%s: taking over a stale lock of pid %s (no such process)",
                          self.path, holder["pid"])
          self.path.unlink(missing_ok=True)
          continue
        raise WorkdirError(
            f"{self.path.parent} is in use by another trainer (pid {holder.get('pid')} on host "
            f"{holder.get('host')}, lock {self.path}); wait for it, or remove the lock file if "
            "that process is gone") from None
      except OSError as e:
        raise WorkdirError(f"{self.path}: cannot create the workdir lock "
                           f"({e.strerror or e})") from None
      try:
        with os.fdopen(fd, "w") as f:
          json.dump(owner, f)
      except OSError as e:
        self.path.unlink(missing_ok=True)
        raise WorkdirError(f"{self.path}: cannot write the workdir lock "
                           f"({e.strerror or e})") from None
      self._held = True
      return
    raise WorkdirError(f"{self.path}: could not take the workdir lock")

  def _holder(self) -> dict:
    try:
      holder = json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}
    return holder if isinstance(holder, dict) else {}

  def release(self) -> None:
    if self._held:
      self.path.unlink(missing_ok=True)
      self._held = False

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# -- finding a run and choosing its checkpoint -----------------------------------

def find_workdir(path: str | os.PathLike) -> pathlib.Path:
  """The run directory holding config.json and checkpoints/, given it or its checkpoints/."""
  path = pathlib.Path(path).resolve()
  for candidate in (path, path.parent):
    if (candidate / CONFIG_FILE).is_file() and (candidate / CHECKPOINTS_DIR).is_dir():
      return candidate
  raise WorkdirError(
      f"{path}: not a training workdir (expected {CONFIG_FILE} and {CHECKPOINTS_DIR}/ in it "
      "or in its parent)")


def default_workdir(config_file: str, root: str | os.PathLike) -> pathlib.Path:
  """<root>/runs/<config file name>[_<its argument>]: runs/default for configs/default.py."""
  filename, _, argument = str(config_file).partition(":")
  name = pathlib.Path(filename).stem
  if argument:
    name += "_" + re.sub(r"[^A-Za-z0-9.=,-]", "-", argument)
  return pathlib.Path(root) / "runs" / name


def _has_steps(folder: pathlib.Path) -> bool:
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def default_eval_checkpoint(workdir: str | os.PathLike) -> str:
  """"latest", or "best" for a workdir that holds best models only (an import)."""
  checkpoints = pathlib.Path(workdir) / CHECKPOINTS_DIR
  has_best = any(_has_steps(p) for p in checkpoints.glob("best_*"))
  return "best" if has_best and not _has_steps(checkpoints / "latest") else "latest"


def best_model_dataset(config: ml_collections.ConfigDict) -> str:
  """Whose best EMA model predict and export use: `predict.dataset`, else the run's
  first evaluated dataset (an unlabeled folder keeps no best model)."""
  if config.predict.dataset:
    return str(config.predict.dataset)
  evaluated = prepare.evaluated_datasets(config.data)
  return str(evaluated[0] if evaluated else config.data.datasets[0])


def shown_path(path: str | os.PathLike) -> str:
  """`path` as a console shows it: relative to the working directory when it lies
  below it, else as given."""
  path = pathlib.Path(path)
  try:
    return str(path.resolve().relative_to(pathlib.Path.cwd().resolve()))
  except (OSError, ValueError):
    return str(path)


def command_prefix() -> str:
  """How to call the project's commands, as this process was called: `fgtbt` for
  the installed command, `python -m fgtbt_jax.commands` for the package, else
  `python <run.py as typed>` ("python run.py")."""
  program = pathlib.Path(sys.argv[0] if sys.argv and sys.argv[0] else "")
  if program.name == "fgtbt":
    return "fgtbt"
  if program.name == "__main__.py" and program.parent.name == "commands":
    return "python -m fgtbt_jax.commands"
  return f"python {shlex.quote(sys.argv[0])}" if program.name == "run.py" else "python run.py"


# What a user runs after each mode: (command after the prefix, what it gives).
_NEXT = {
    "train": (("eval --workdir={w}", "the report: tables per subset, CED curves"),
              ("predict --workdir={w} --image=PATH", "landmarks of your images, folders, videos")),
    "eval": (("predict --workdir={w} --image=PATH", "landmarks of your images, folders, videos"),),
    "predict": (("predict --workdir={w} --image=PATH --config.predict.protocol={p}",
                 "more inputs; {what} instead of all 124"),),
}


def next_commands(workdir: str | os.PathLike, after: str,
                  first: tuple[tuple[str, str], ...] = (), own_scheme: str | None = None) -> str:
  """The "next:" lines a command ends with, for the run in `workdir` after mode
  `after` ("train", "eval" or "predict"): the commands to run next, each with
  what it gives; `first` (line, what) rows go on top. After predict, the
  protocol suggested is `own_scheme` (a run's own dataset) or WFLW."""
  scheme = own_scheme or "WFLW"
  what = (f"the points of {scheme}" if own_scheme
          else "WFLW's 98 points (or 300W, COFW, AFLW)")
  rows = list(first) + [
      (f"{command_prefix()} " + command.format(w=shlex.quote(shown_path(workdir)),
                                              p=shlex.quote(scheme)),
       line_what.format(what=what))
      for command, line_what in _NEXT[after]]
  width = max(len(command) for command, _ in rows)
  return "\n".join(["next:"] + [f"  {command:<{width}}  # {what}" for command, what in rows])


# -- config.json -----------------------------------------------------------------

def _model_fields(config: ml_collections.ConfigDict) -> Mapping[str, Any]:
  # Each model field's default is the behaviour before it (the composed head
  # computes what the concatenated one does; paper FGSA; biased BatchNorm
  # variance; the FGTBT heatmap head), per variant.
  try:
    return models.model_config(config.model.variant)
  except (ValueError, AttributeError):
    return {}  # validate_model_config names a bad variant later.


# Fields added to the config after runs were saved without them, each with the
# value that gives such a run the behaviour it had; a section name fills every
# field of the section it lacks. A value may be a function of the saved config.
UPGRADES: dict[str, Any | Callable[[ml_collections.ConfigDict], Any]] = {
    "model": _model_fields,
    "data.eval_pad_last_batch": True,
    "data.labeled_fraction": 1.0,
    # It replaced the boolean loss.rounded_targets (`RETIRED`).
    "loss.target_rounding": lambda config: (
        "nearest" if config.loss.get("rounded_targets", False) else "none"),
    "loss.hih_decimal_sigma": 1.0,
    "loss.hih_decimal_weight": 0.1,
    "loss.hallucination_l1_weight": 1.0,
    "loss.hallucination_gradient_weight": 1.0,
    "lowres": {"factors": (), "probability": 1.0},
    "sht": {"enabled": False, "transfer_size": 120, "generator_channels": 32,
            "generator_blocks": 3, "discriminator_channels": 64, "learning_rate": 2e-4,
            "adversarial_weight": 0.05, "l1_weight": 1.0, "max_rotation": 30.0,
            "scale_range": (0.8, 1.2)},
    "train.resume_with_changes": False,
    "train.init_from": "",
    # Before it, the evaluated EMA was the plain average (initial weights included).
    "train.ema_bias_correction": False,
    "train.freeze_batch_norm_after_step": 0,
    "eval.coordinates": "project",
    "eval.failure_normalizer": "",
    "eval.best_on_subsets": (),
    "eval.studies": (),
    "eval.lowres_sides": (16, 32, 64, 128),
    "eval.study_max_batches": 0,
    # The predict command's options were flags, with these defaults.
    "predict": {"dataset": "", "detector": "auto", "box_adjustment": "real", "max_faces": 0,
                "min_face_confidence": 0.6, "batch_size": 8, "protocol": "unified",
                "detect_every": 10, "video_smoothing": True, "one_euro_min_cutoff": 1.0,
                "one_euro_beta": 10.0},
}
# Fields no longer read, dropped once their replacement is filled.
RETIRED = ("loss.rounded_targets",)


def _node(config: ml_collections.ConfigDict, dotted: str):
  """(the section holding `dotted`'s field, the field name); KeyError if a section is missing."""
  parent, _, field = dotted.rpartition(".")
  node = config
  for part in filter(None, parent.split(".")):
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict):
    raise KeyError(dotted)
  return node, field


def upgrade_config(config: ml_collections.ConfigDict,
                   where: str | os.PathLike = CONFIG_FILE) -> list[str]:
  """Fills the fields `config` (a saved run's) predates from `UPGRADES`, in place.

  Returns the dotted names filled (logged, naming `where`). A section the
  saved config lacks entirely is added.
  """
  added = []
  for key, value in UPGRADES.items():
    try:
      node, field = _node(config, key)
    except KeyError:
      continue  # An unreadable layout: `missing_fields` names what lacks.
    if "." not in key:
      fields = value(config) if callable(value) else value
      if field not in node:
        node[field] = ml_collections.ConfigDict()
      for name, default in fields.items():
        if name not in node[field]:
          node[field][name] = default
          added.append(f"{key}.{name}")
    elif field not in node:
      node[field] = value(config) if callable(value) else value
      added.append(key)
  for key in RETIRED:
    try:
      node, field = _node(config, key)
    except KeyError:
      continue
    if field in node:
      del node[field]
  if added:
    logging.info("%s: config fields added since this run, with the behaviour it had: %s",
                 where, added)
  return added


def _tuples(value):
  """JSON lists back to the tuples the configs declare."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None,
                    where: str | os.PathLike) -> ml_collections.ConfigDict:
  """`config` with {"data.data_dir": value, ...} set; ConfigError for a field it lacks."""
  for key, value in (overrides or {}).items():
    try:
      node, field = _node(config, key)
      if field not in node:
        raise KeyError(field)
    except (KeyError, TypeError, AttributeError):
      raise ConfigError(f"{key}: the run's config ({where}) has no such field") from None
    try:
      node[field] = _tuples(list(value)) if isinstance(value, list) else value
    except TypeError as e:
      raise ConfigError(f"{key}: {e}") from None
  return config


def missing_fields(config: ml_collections.ConfigDict,
                   declared: ml_collections.ConfigDict) -> list[str]:
  """The dotted names of `declared`'s fields that `config` lacks, sorted."""
  return sorted(flat_config(declared).keys() - flat_config(config).keys())


def load_run_config(workdir: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *,
                    declared: ml_collections.ConfigDict | None = None
                    ) -> ml_collections.ConfigDict:
  """The config a run saved as `<workdir>/config.json`, upgraded, with `overrides`.

  The one reader of a run's config (eval, predict, export, a resumed run).

  Args:
    workdir: the run's directory.
    overrides: {"data.data_dir": value, ...} applied on top of the saved,
      upgraded config (e.g. the command line's --config.* flags).
    declared: a config that declares every field (e.g. configs/default.py's);
      a saved config that still lacks some of them after the upgrade is refused.

  Raises:
    WorkdirError: there is no config.json, it is not a readable JSON config,
      or it lacks fields of `declared` that no upgrade fills.
    ConfigError: an override names a field the config does not have, or
      cannot take its value.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  try:
    raw = json.loads(path.read_text())
  except FileNotFoundError:
    raise WorkdirError(f"{path} does not exist: not a training workdir") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{path} is not a readable config: {e}") from e
  if not isinstance(raw, dict):
    raise WorkdirError(f"{path} is not a readable config: expected a JSON object")
  config = ml_collections.ConfigDict(_tuples(raw))
  upgrade_config(config, path)
  missing = [] if declared is None else missing_fields(config, declared)
  if missing:
    raise WorkdirError(
        f"{path} lacks the config fields {', '.join(missing)}, which no upgrade of older "
        "configs fills; pass --config=configs/<its config file>.py (and the --config.* "
        "overrides it was trained with)")
  return apply_overrides(config, overrides, path)


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"data.data_dir": value, ...}: every field of a config by its dotted name, as JSON values."""
  def flatten(tree: Mapping, prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
      if isinstance(value, Mapping):
        flat.update(flatten(value, f"{prefix}{key}."))
      else:
        flat[f"{prefix}{key}"] = value
    return flat
  return flatten(json.loads(config.to_json_best_effort()), "")


def _umask() -> int:
  """The process's file mode creation mask (read by setting it and back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_run_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                     name: str = CONFIG_FILE) -> pathlib.Path:
  """Writes `<workdir>/config.json` (or `name`) atomically (a temporary file, then a rename).

  A full disk or a kill mid-write leaves the previous file whole. The file
  gets the permissions of any new file (0666 less the umask; the temporary
  file's own are 0600), so other users of a shared run can read it.
  """
  path = pathlib.Path(workdir) / name
  text = config.to_json_best_effort(indent=2) + "\n"
  fd, temporary = tempfile.mkstemp(prefix=".config.", suffix=".json", dir=path.parent)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      os.fchmod(f.fileno(), 0o666 & ~_umask())
    os.replace(temporary, path)
  except BaseException:
    pathlib.Path(temporary).unlink(missing_ok=True)
    raise
  return path
