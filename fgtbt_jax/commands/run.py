"""train, eval and predict: the commands of `python run.py` and `fgtbt train|eval|predict`.

  python run.py                      (or: fgtbt train)
      The embedded default (configs/default.py): makes the synthetic datasets
      on first use, trains, evaluates and prints a per-protocol NME table
      next to the mean-shape baseline. Outputs go to runs/default.

  python run.py --config=configs/fgtbt_paper.py --workdir=runs/paper \
      --config.data.data_dir=DATA
      Trains (resuming from the workdir's latest checkpoint) and evaluates.
      Any config field can be overridden: --config.train.steps=1000.

  python run.py eval --workdir=runs/paper [--checkpoint=best] [--out=DIR] [--noreport]
      The run's latest (or per-dataset best) EMA model on the test splits:
      the table, eval_<checkpoint>.json and report/ (tables per subset, CED
      curves, the --config.eval.studies="('lowres','quantization')").

  python run.py predict --workdir=runs/paper --image=PATH [--box=x1,y1,x2,y2 | --boxes=FILE]
      Landmarks of images, folders or videos with the run's best (or
      --checkpoint=latest) EMA model: JSON and overlays in --out (default
      <workdir>/predictions). Options are the config's predict section, e.g.
      --config.predict.max_faces=1 --config.predict.protocol=WFLW (all in
      configs/fgtbt_paper.py); decoding the eval section's, e.g.
      --config.eval.flip_test=False; the dtype --config.model.dtype=bfloat16.

`fgtbt train|eval|predict` (after `pip install .`) takes the same flags;
its default workdir is runs/<config name> under the current folder, where
run.py's is under the checkout. eval and predict read the run's config.json
(upgraded if older, `rundir.load_run_config`) with the --config.* overrides
on top; --config=FILE replaces it. Each mode is one library call
(`train.train_and_evaluate`, `evaluate.evaluate_workdir`,
`predict_files.predict_main`).

Exit status: 0 done; 1 a bad config, flag, input or checkpoint (one line on
stderr, "run.py: ..." or "fgtbt: ..."), or predict inputs that failed (the others are
written); 128 + the signal number (143 for SIGTERM) when a signal stopped
training after it saved a checkpoint. Multi-host: the same command on every
host, with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from fgtbt_jax import checkpointing
from fgtbt_jax.deploy import detector
from fgtbt_jax import errors
from fgtbt_jax import evaluate
from fgtbt_jax.deploy import predict_files
from fgtbt_jax import rundir
from fgtbt_jax import train

# configs/ beside fgtbt_jax/: in the checkout and where `pip install .` puts both packages.
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _prog() -> str:
  """How the user called this: "run.py" or "fgtbt" (the prefix of one-line errors)."""
  name = pathlib.Path(sys.argv[0]).name
  return name if name == "run.py" else "fgtbt"


try:  # Without --config the default is read, its overrides applied, right here.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", str(CONFIGS / "default.py"), "Experiment config file (a Python file "
      "with get_config()); file.py:arg passes an argument. eval and predict use the run's "
      "saved config unless it is given.", lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as e:
  sys.exit(f"{_prog()}: {errors.config_flag_error(e, sys.argv)}")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's folder (default runs/<config name>).")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", None, list(rundir.CHECKPOINT_KINDS), "eval and predict: the latest train "
    "state's EMA model or the best ones (default: eval latest, predict best).")
_REPORT = flags.DEFINE_bool("report", True, "eval: write report/ beside the metrics.")
_OUT = flags.DEFINE_string("out", None, "eval and predict: the output folder (default: the "
                           "workdir; predict: <workdir>/predictions).")
_IMAGE = flags.DEFINE_multi_string("image", None, "predict: an image, folder or video; repeatable.")
_BOX = flags.DEFINE_list("box", None, "predict: one face box x1,y1,x2,y2 for every input.")
_BOXES = flags.DEFINE_string("boxes", None, "predict: a JSON file of face boxes per input, "
                             "{\"a.jpg\": [[x1, y1, x2, y2], ...]} (others are detected).")

MODES = ("train", "eval", "predict")
# The project's own errors for bad input: one-line messages. Anything else is
# a bug and keeps its traceback.
USER_ERRORS = (app.UsageError, errors.ConfigError, errors.DataError, errors.OutputError,
               errors.UnknownProtocolError, rundir.WorkdirError, predict_files.InputError,
               checkpointing.IncompatibleCheckpointError, checkpointing.NonFiniteStateError,
               checkpointing.CorruptCheckpointError, detector.DetectorUnavailableError,
               train.NonFiniteLossError, train.DiskFullError)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a help request prints to stdout and exits 0, a bad flag is one line."""
  asked = set(argv[1:]) & {"--help", "-h", "-?", "--helpshort", "--helpfull"}
  if asked:  # This docstring and this command's flags (all of them with --helpfull).
    full = "--helpfull" in asked
    print(__doc__ + "\n" + (flags.FLAGS.get_help() if full
                             else flags.FLAGS.module_help(sys.modules[__name__])))
    sys.exit(0)
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"{_prog()}: {e}\nPass --helpfull to list the flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"{_prog()}: {errors.config_flag_error(e, sys.argv)}")
  try:
    _CONFIG.value.keys()
  except OSError as e:
    sys.exit(f"{_prog()}: cannot read the config: {' '.join(str(e).split())}")
  return remaining


def run_config(workdir: pathlib.Path):
  """The config eval and predict run with: --config's if given, else the run's with overrides."""
  if flags.FLAGS["config"].present:
    return _CONFIG.value
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  return rundir.load_run_config(workdir, overrides, declared=_CONFIG.value)


def run_mode(mode: str, workdir: pathlib.Path) -> int:
  """One mode's library call and its console output; returns the exit status."""
  if workdir.exists() and not workdir.is_dir():
    raise app.UsageError(f"workdir {workdir} is a file, not a folder; pass --workdir=DIR")
  if mode == "train":
    final = train.train_and_evaluate(
        _CONFIG.value, workdir, config_name=config_flags.get_config_filename(flags.FLAGS["config"]))
    if "stopped_at_step" in final:
      print(f"stopped by signal {final['signal']} at step {final['stopped_at_step']}; the "
            f"checkpoint in {workdir / 'checkpoints'} resumes it")
      return 128 + int(final["signal"])
    evaluate.print_outputs(workdir, final, f"trained {final['steps']} steps in "
                           f"{final['wall_time_s']:.0f} s; EMA model on the test splits:")
    return 0
  if not workdir.is_dir():
    raise app.UsageError(f"workdir {workdir} does not exist; train first or pass --workdir")
  if mode == "predict":
    return predict_files.predict_main(
        workdir, _IMAGE.value or [], _OUT.value, config=run_config(workdir),
        which=_CHECKPOINT.value or "best", box=predict_files.parse_box(_BOX.value),
        boxes_file=_BOXES.value)
  which = _CHECKPOINT.value or rundir.default_eval_checkpoint(workdir)
  # The metrics are printed before anything is written (a read-only run keeps them).
  done = evaluate.evaluate_workdir(
      run_config(workdir), workdir, which, write_report=_REPORT.value, out_dir=_OUT.value,
      on_results=lambda final: evaluate.print_outputs(workdir, final, (
          f"{which} checkpoint(s), step(s) {final['steps']}; EMA model on the test splits:")))
  print(f"  {f'eval_{which}.json':<20} these metrics: "
        f"{pathlib.Path(_OUT.value or workdir) / f'eval_{which}.json'}")
  if done.report is not None:
    print(f"  {'report/':<20} the report: {done.report} (+ report.json, ced.png)")
  print("\n" + rundir.next_commands(workdir, "eval"))
  return 0


def main(argv: list[str], root: pathlib.Path) -> None:
  """The parsed command line's mode; the default workdir is under `root`."""
  errors.quiet_library_logs()
  workdir = pathlib.Path(_WORKDIR.value or rundir.default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]), root))
  try:
    if len(argv) > 2 or argv[1:] and argv[1] not in MODES:
      raise app.UsageError(f"expected an optional mode {MODES}, got {' '.join(argv[1:])}")
    status = run_mode(argv[1] if argv[1:] else "train", workdir)
  except USER_ERRORS as e:
    sys.exit(f"{_prog()}: {e}")  # One line, not absl's usage dump of this docstring.
  if status:
    sys.exit(status)


def launch(argv: list[str] | None = None, root: str | pathlib.Path | None = None) -> None:
  """Runs the command line `argv` (default sys.argv: [program, mode?, flags...]).

  `root`: the folder whose runs/ holds the default workdirs (run.py passes
  the checkout; default the current folder).
  """
  root = pathlib.Path.cwd() if root is None else pathlib.Path(root)
  app.run(lambda args: main(args, root), argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  launch()
