"""FGTBT: the single entry point.

  python run.py
      The embedded default (configs/default.py): generates the synthetic
      datasets on first use, trains, evaluates and prints a per-protocol NME
      table next to the mean-shape baseline. Outputs go to runs/default.

  python run.py --config=configs/fgtbt_paper.py --workdir=runs/paper \
      --config.data.data_dir=DATA
      Trains (resuming from the workdir's latest checkpoint) and evaluates.
      Any config field can be overridden: --config.train.steps=1000.

  python run.py eval --workdir=runs/paper [--checkpoint=best]
      Evaluates the workdir's latest (or per-dataset best) EMA checkpoint,
      with the config saved in the workdir unless --config is given.

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or the --config.distributed.*
fields).
"""

from __future__ import annotations

import json
import logging as std_logging
import pathlib
import re
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

_REPO = pathlib.Path(__file__).resolve().parent

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_REPO / "configs" / "default.py"),
    "Experiment config file (a Python file with get_config()); "
    "file.py:arg passes an argument, e.g. configs/ablations.py:beta=0.3.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and logs "
    "(default: runs/<config file name> in the repository).")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "latest", ["latest", "best"],
    "eval mode: the latest train state's EMA model, or each dataset's best EMA model.")

MODES = ("train", "eval")


class _QuietLibraries(std_logging.Filter):
  """Keeps Orbax's and TFDS's INFO chatter out of the console (warnings stay)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        name in record.pathname for name in ("orbax", "tensorflow_datasets"))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors for bad flags and unreadable configs."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"run.py: {e}\nPass --helpfull to list the flags.")
  except (AttributeError, KeyError) as e:
    # lock_config: overriding a field the config does not declare.
    inner = e.args[0] if e.args else e
    if isinstance(inner, KeyError) and inner.args:
      inner = inner.args[0]
    message = str(inner).replace("\n", "; ")
    sys.exit(f"run.py: unknown config field in the command line: {message}")
  except (TypeError, ValueError) as e:
    sys.exit(f"run.py: bad config override: {e}")
  try:
    _CONFIG.value.keys()
  except OSError as e:
    sys.exit(f"run.py: cannot read the config: {e}")
  return remaining


def _default_workdir() -> pathlib.Path:
  """runs/<config file name>[_<config argument>]: runs/default for the default."""
  filename, _, argument = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
  name = pathlib.Path(filename).stem
  if argument:
    name += "_" + re.sub(r"[^A-Za-z0-9.=,-]", "-", argument)
  return _REPO / "runs" / name


def _tuples(value):
  """JSON lists back to the tuples the configs declare."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_workdir_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config a training run saved as <workdir>/config.json."""
  path = workdir / "config.json"
  try:
    raw = json.loads(path.read_text())
  except FileNotFoundError:
    raise app.UsageError(f"{path} does not exist: pass the run's --config") from None
  except json.JSONDecodeError as e:
    raise app.UsageError(f"{path} is not a readable config: {e}") from None
  return ml_collections.ConfigDict(_tuples(raw))


def _print_outputs(workdir: pathlib.Path, final: dict, title: str) -> None:
  from fgtbt_jax import evaluate
  print(f"\n{title}")
  print(evaluate.format_table(final))
  print(f"\noutputs in {workdir}:")
  for name, what in (("final_metrics.json", "final metrics (NME as a fraction)"),
                     ("eval_metrics.jsonl", "every evaluation, all subsets and normalisers"),
                     ("train_metrics.jsonl", "training losses"),
                     ("tensorboard", "TensorBoard events"),
                     ("checkpoints", "latest train states and best EMA models per dataset")):
    if (workdir / name).exists():
      print(f"  {name:<20} {what}")


def main(argv):
  extra = argv[1:]
  if len(extra) > 1 or (extra and extra[0] not in MODES):
    raise app.UsageError(f"expected an optional mode {MODES}, got {' '.join(extra)}")
  mode = extra[0] if extra else "train"
  std_logging.getLogger("absl").addFilter(_QuietLibraries())
  from fgtbt_jax import checkpointing
  from fgtbt_jax import train

  workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else _default_workdir()
  if mode == "train":
    config = _CONFIG.value
    try:
      final = train.train_and_evaluate(config, workdir)
    except (train.ConfigError, checkpointing.IncompatibleCheckpointError) as e:
      raise app.UsageError(str(e)) from None
    if "stopped_at_step" in final:
      print(f"stopped by a signal at step {final['stopped_at_step']}; the checkpoint in "
            f"{workdir / 'checkpoints'} resumes it")
      return
    _print_outputs(workdir, final, f"trained {final['steps']} steps in "
                                   f"{final['wall_time_s']:.0f} s; EMA model on the test splits:")
    return

  if not workdir.is_dir():
    raise app.UsageError(f"workdir {workdir} does not exist; train first or pass --workdir")
  config = _CONFIG.value if flags.FLAGS["config"].present else load_workdir_config(workdir)
  try:
    final = train.evaluate_workdir(config, workdir, checkpoint=_CHECKPOINT.value)
  except (train.ConfigError, checkpointing.IncompatibleCheckpointError,
          FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  _print_outputs(workdir, final, f"{_CHECKPOINT.value} checkpoint(s), step(s) "
                                 f"{final['steps']}; EMA model on the test splits:")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
