"""FGTBT: the single entry point.

  python run.py
      The embedded default (configs/default.py): generates the synthetic
      datasets on first use, trains, evaluates and prints a per-protocol NME
      table next to the mean-shape baseline. Outputs go to runs/default.

  python run.py --config=configs/fgtbt_paper.py --workdir=runs/paper \
      --config.data.data_dir=DATA
      Trains (resuming from the workdir's latest checkpoint) and evaluates.
      Any config field can be overridden: --config.train.steps=1000.

  python run.py eval --workdir=runs/paper [--checkpoint=best] \
      [--studies=lowres,quantization]
      Evaluates the workdir's latest (or per-dataset best) EMA checkpoint,
      with the config saved in the workdir unless --config is given, prints
      the table and writes the report (report/report.md and report.json:
      paper-style tables per dataset and subset, CED curves, error by C(p),
      high-frequency images, the optional studies).

  python run.py predict --workdir=runs/paper --image=PATH_OR_DIR \
      [--box=x1,y1,x2,y2] [--protocol=WFLW] [--out=DIR]
      Landmarks of images, folders of images or videos with the run's best
      (or --checkpoint=latest) EMA model: a JSON and an overlay PNG per image
      in --out (default <workdir>/predictions). Faces are found with OpenCV's
      bundled Haar cascade unless --box is given. Exit status 1 when any
      input failed (unreadable, or no face found); the others are written.

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or the --config.distributed.*
fields).
"""

from __future__ import annotations

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
    "checkpoint", None, ["latest", "best"],
    "eval and predict: the latest train state's EMA model, or the best EMA model "
    "(eval: each dataset's own; predict: --dataset's). Default: latest for eval, best "
    "for predict.")
_STUDIES = flags.DEFINE_list(
    "studies", [], "eval: report studies to run as well: lowres (faces downsampled to "
    "16-128 px), quantization (decoding error, NME per decoder).")
_REPORT = flags.DEFINE_bool(
    "report", True, "eval: write <workdir>/report (Markdown, JSON, CED and other plots).")
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches", None, "eval: the report's studies use at most this many test batches per "
    "dataset and pass.")
_IMAGE = flags.DEFINE_multi_string(
    "image", None, "predict: an image, a folder of images or a video; repeatable.")
_BOX = flags.DEFINE_list(
    "box", None, "predict: the face box x1,y1,x2,y2 in pixels, used for every input "
    "(default: detect the faces).")
_PROTOCOL = flags.DEFINE_enum(
    "protocol", "unified", ["unified", "WFLW", "300W", "COFW", "AFLW"],
    "predict: which landmarks to write: a dataset protocol or all 124 unified points.")
_OUT = flags.DEFINE_string("out", None, "predict: output folder (default <workdir>/predictions).")
_DATASET = flags.DEFINE_string(
    "dataset", None, "predict with the best checkpoint: the dataset whose best model to use "
    "(default the run's first).")
_FLIP_TEST = flags.DEFINE_bool("flip_test", True, "predict: average with the mirrored face.")
_DECODER = flags.DEFINE_enum("decoder", "subpixel", ["argmax", "quarter", "subpixel"],
                             "predict: heatmap decoder.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "predict: faces per device batch.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "predict: compute dtype (default the run's).")

MODES = ("train", "eval", "predict")


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


def load_workdir_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config a training run saved as <workdir>/config.json."""
  from fgtbt_jax import predictor
  try:
    return predictor.load_run_config(workdir)
  except FileNotFoundError as e:
    raise app.UsageError(f"{e}; pass the run's --config") from None
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def _parse_box(values: list[str] | None) -> list[float] | None:
  if values is None:
    return None
  try:
    box = [float(v) for v in values]
  except ValueError:
    box = []
  if len(box) != 4:
    raise app.UsageError(f"--box={','.join(values)}: expected four numbers x1,y1,x2,y2")
  return box


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
  unknown = [s for s in _STUDIES.value if s not in ("lowres", "quantization")]
  if unknown:
    raise app.UsageError(f"--studies: unknown {unknown}; expected lowres and/or quantization")
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
  if mode == "predict":
    _predict(workdir)
    return
  config = _CONFIG.value if flags.FLAGS["config"].present else load_workdir_config(workdir)
  which = _CHECKPOINT.value or "latest"
  # The report is made from this evaluation's per-image arrays (gathered
  # from every process): no second pass.
  samples = {} if _REPORT.value else None
  try:
    final = train.evaluate_workdir(config, workdir, checkpoint=which, samples=samples)
  except (train.ConfigError, checkpointing.IncompatibleCheckpointError,
          FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  _print_outputs(workdir, final, f"{which} checkpoint(s), step(s) "
                                 f"{final['steps']}; EMA model on the test splits:")
  if _REPORT.value:
    import jax
    from fgtbt_jax import report
    if jax.process_index() != 0:
      return
    studies = _STUDIES.value
    if studies and jax.process_count() > 1:
      # The studies' extra passes run on one device of one process.
      print(f"  studies {','.join(studies)} skipped: they run in one process; run "
            f"`python run.py eval --workdir={workdir} --studies=...` on a single host")
      studies = []
    path = report.write_report_from_samples(
        workdir, samples, config=config, checkpoint=which, steps=final["steps"],
        studies=studies, max_batches=_MAX_BATCHES.value)
    print(f"  {'report/':<20} the report: {path} (+ report.json, ced.png)")


def _predict(workdir: pathlib.Path) -> None:
  """The predict mode; exits with status 1 when any input failed."""
  from fgtbt_jax import checkpointing
  from fgtbt_jax import visualization
  if not _IMAGE.value:
    raise app.UsageError("predict needs --image=PATH (an image, a folder or a video)")
  missing = [p for p in _IMAGE.value if not pathlib.Path(p).exists()]
  if missing:
    raise app.UsageError(f"--image: {', '.join(missing)} does not exist")
  if not visualization.list_inputs(_IMAGE.value):
    raise app.UsageError(f"--image: no image or video files in {', '.join(_IMAGE.value)} "
                         f"(extensions {' '.join(visualization.IMAGE_EXTENSIONS)} and "
                         f"{' '.join(visualization.VIDEO_EXTENSIONS)})")
  box = _parse_box(_BOX.value)
  out = pathlib.Path(_OUT.value) if _OUT.value else workdir / "predictions"
  try:
    status = visualization.predict_main(
        str(workdir), _IMAGE.value, str(out), which=_CHECKPOINT.value or "best",
        dataset=_DATASET.value, box=box, protocol=_PROTOCOL.value, flip_test=_FLIP_TEST.value,
        decoder=_DECODER.value, batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value)
  except (FileNotFoundError, KeyError, ValueError, checkpointing.IncompatibleCheckpointError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise app.UsageError(str(message)) from None
  if status:
    sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
