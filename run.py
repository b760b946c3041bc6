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
      [--studies=lowres,quantization] [--config.data.data_dir=DATA]
      Evaluates the workdir's latest (or per-dataset best) EMA checkpoint
      with the config saved in the workdir (--config.* overrides apply on
      top of it; --config=FILE replaces it), prints the table and writes the
      report (report/report.md and report.json: paper-style tables per
      dataset and subset, CED curves, error by C(p), high-frequency images,
      the studies of eval.studies / --studies).

  python run.py predict --workdir=runs/paper --image=PATH_OR_DIR \
      [--box=x1,y1,x2,y2 | --boxes=boxes.json] [--max_faces=N] [--protocol=WFLW] [--out=DIR]
      Landmarks of images, folders of images or videos with the run's best
      (or --checkpoint=latest) EMA model: a JSON and an overlay PNG per image
      in --out (default <workdir>/predictions), per video a JSON, per-frame
      JSON Lines and an overlay video; decoded as the run was evaluated (its
      eval.decoder, eval.flip_test, eval.smoothing_sigma) unless --decoder /
      --flip_test / --smoothing_sigma say otherwise. Every face found is
      predicted (dlib's HOG detector, else OpenCV's Haar cascade; --detector,
      --box_adjustment), the --max_faces largest, unless --box or --boxes
      give the boxes; faces whose mean confidence is below
      --min_face_confidence are flagged low quality. Videos: the detector
      runs every --detect_every frames, the landmarks are One Euro smoothed
      (--[no]video_smoothing, --one_euro_min_cutoff, --one_euro_beta). Exit
      status 1 when any input failed (unreadable, or no face found); the
      others are written.

Each mode is one library call (`train.train_and_evaluate`,
`evaluate.evaluate_workdir`, `predict_files.predict_main`); this file parses
flags, turns the project's own errors into one-line messages and prints.

Exit status: 0 done; 1 a bad config, flag, input or checkpoint (one line on
stderr, "run.py: ..."), or predict inputs that failed; 128 + the signal
number (143 for SIGTERM, 130 for SIGINT) when a signal stopped training
after it saved a checkpoint, so a scheduler does not read the stop as
success.

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or the --config.distributed.*
fields).
"""

from __future__ import annotations

import logging as std_logging
import math
import pathlib
import re
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from fgtbt_jax import checkpointing
from fgtbt_jax import detector
from fgtbt_jax import errors
from fgtbt_jax import evaluate
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import predict_files
from fgtbt_jax import predictor as predictor_lib
from fgtbt_jax import studies
from fgtbt_jax import train
from fgtbt_jax import video

_REPO = pathlib.Path(__file__).resolve().parent


def _override_error(error: Exception) -> str:
  """The one-line message of a --config.* override the config cannot take."""
  if isinstance(error, AttributeError) and "has no attribute 'get_config'" in str(error):
    argv = sys.argv[1:]
    named = [a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
             if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv))]
    return (f"run.py: the config file {named[-1] if named else 'configs/default.py'} has no "
            "get_config() function returning its ConfigDict")
  if isinstance(error, (AttributeError, KeyError)):
    # lock_config: overriding a field the config does not declare.
    inner = error.args[0] if error.args else error
    if isinstance(inner, KeyError) and inner.args:
      inner = inner.args[0]
    message = str(inner).replace("\n", "; ")
    return f"run.py: unknown config field in the command line: {message}"
  return f"run.py: bad config override: {error}"


def _define_config_flag():
  # Without --config the default config is read, and the --config.*
  # overrides applied, right here at definition time.
  try:
    return config_flags.DEFINE_config_file(
        "config", str(_REPO / "configs" / "default.py"),
        "Experiment config file (a Python file with get_config()); "
        "file.py:arg passes an argument, e.g. configs/ablations.py:beta=0.3. "
        "eval and predict use the workdir's saved config unless it is given.",
        lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(_override_error(e))


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and logs "
    "(default: runs/<config file name> in the repository).")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", None, list(checkpointing.CHECKPOINT_KINDS),
    "eval and predict: the latest train state's EMA model, or the best EMA model "
    "(eval: each dataset's own; predict: --dataset's). Default: latest for eval (best "
    "when the workdir holds no train state, e.g. imported weights), best "
    "for predict.")
_STUDIES = flags.DEFINE_list(
    "studies", None, "eval: report studies to run (sets eval.studies): "
    f"{', '.join(studies.STUDIES)}. Default: the config's eval.studies.")
_REPORT = flags.DEFINE_bool(
    "report", True, "eval: write <workdir>/report (Markdown, JSON, CED and other plots).")
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches", None, "eval: the studies use at most this many test batches per dataset "
    "and pass (sets eval.study_max_batches).")
_IMAGE = flags.DEFINE_multi_string(
    "image", None, "predict: an image, a folder of images or a video; repeatable.")
_BOX = flags.DEFINE_list(
    "box", None, "predict: the face box x1,y1,x2,y2 in pixels, used for every input "
    "(default: detect the faces).")
_BOXES = flags.DEFINE_string(
    "boxes", None, "predict: a JSON file of face boxes per input, {\"a.jpg\": [[x1, y1, x2, "
    "y2], ...], ...}, keyed by path or file name (inputs it does not name are detected).")
_MAX_FACES = flags.DEFINE_integer(
    "max_faces", None, "predict: at most this many detected faces per image or frame, the "
    "largest (default: every face found).", lower_bound=1)
_MIN_FACE_CONFIDENCE = flags.DEFINE_float(
    "min_face_confidence", predictor_lib.DEFAULT_MIN_FACE_CONFIDENCE,
    "predict: faces whose mean point confidence is below this are flagged low_quality "
    "(JSON and overlay); in videos such a face's track ends.")
flags.register_validator(_MIN_FACE_CONFIDENCE, lambda value: not math.isnan(value),
                         message="--min_face_confidence must be a number, not nan")
_DETECTOR = flags.DEFINE_enum(
    "detector", "auto", list(detector.DETECTOR_CHOICES),
    "predict: face detector; auto is dlib's HOG detector, or OpenCV's Haar cascade when "
    "dlib is not installed.")
_BOX_ADJUSTMENT = flags.DEFINE_string(
    "box_adjustment", "real", "predict: the detector's box calibration: real (photographs), "
    "synthetic (the project's rendered faces) or scale,shift_x,shift_y (python -m "
    "fgtbt_jax.calibrate fits it on your annotated faces).")
_DETECT_EVERY = flags.DEFINE_integer(
    "detect_every", video.TrackerSettings.detect_every,
    "predict, videos: run the face detector every this many frames (the landmarks carry "
    "the boxes in between).", lower_bound=1)
_VIDEO_SMOOTHING = flags.DEFINE_bool(
    "video_smoothing", True, "predict, videos: One Euro smoothing of the landmarks across "
    "frames (still images are never smoothed).")
_ONE_EURO_MIN_CUTOFF = flags.DEFINE_float(
    "one_euro_min_cutoff", video.OneEuroSettings.min_cutoff,
    "predict, videos: One Euro cut-off (Hz) of a still face; lower smooths more.")
_ONE_EURO_BETA = flags.DEFINE_float(
    "one_euro_beta", video.OneEuroSettings.beta,
    "predict, videos: One Euro cut-off rise per face side per second of speed; higher "
    "lags less.")
_PROTOCOL = flags.DEFINE_enum(
    "protocol", landmarks.UNIFIED, [landmarks.UNIFIED, *landmarks.PROTOCOL_NAMES],
    "predict: which landmarks to write: a dataset protocol or all 124 unified points.")
_OUT = flags.DEFINE_string(
    "out", None, "predict: output folder (default <workdir>/predictions); eval: the folder "
    "of eval_<checkpoint>.json and report/ (default the workdir; for a read-only run).")
_DATASET = flags.DEFINE_string(
    "dataset", None, "predict with the best checkpoint: the dataset whose best model to use "
    "(default the run's first).")
_FLIP_TEST = flags.DEFINE_bool(
    "flip_test", None, "predict: average with the mirrored face (default: the run's "
    "eval.flip_test).")
_DECODER = flags.DEFINE_enum("decoder", None, list(heatmaps.ALL_DECODERS),
                             "predict: heatmap decoder (default: the run's eval.decoder).")
_SMOOTHING = flags.DEFINE_float(
    "smoothing_sigma", None, "predict: heatmap blur before the sub-pixel fit (default: the "
    "run's eval.smoothing_sigma).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "predict: faces per device batch.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "predict: compute dtype (default the run's).")

MODES = ("train", "eval", "predict")
# The project's own errors for bad input: shown as one-line usage errors.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (app.UsageError, errors.ConfigError, errors.DataError,
               errors.UnknownProtocolError, checkpointing.WorkdirError,
               checkpointing.IncompatibleCheckpointError, predict_files.InputError,
               detector.DetectorUnavailableError, train.NonFiniteLossError,
               checkpointing.NonFiniteStateError, checkpointing.CorruptCheckpointError,
               train.DiskFullError, errors.OutputError)


class _QuietLibraries(std_logging.Filter):
  """Keeps Orbax's and TFDS's INFO chatter out of the console (warnings stay).

  They log through absl's one logger, so a per-logger level cannot tell them
  apart from ours; the record's source file does. Their errors (and
  asyncio's) keep one line each, without the tracebacks: a failed
  asynchronous save (a full disk) logs hundreds of lines from its threads,
  and run.py ends with the line that says what happened.
  """

  LIBRARIES = ("orbax", "tensorflow_datasets", "asyncio")

  def filter(self, record: std_logging.LogRecord) -> bool:
    library = record.name == "asyncio" or any(name in record.pathname
                                              for name in self.LIBRARIES)
    if not library:
      return True
    if record.levelno >= std_logging.ERROR:
      record.exc_info, record.exc_text, record.stack_info = None, None, None
      record.msg, record.args = record.getMessage().split("\n", 1)[0][:300], ()
    return record.levelno >= std_logging.WARNING


def _unraisable(hook):
  """A sys.unraisablehook that drops "Event loop is closed" from tensorstore callbacks.

  After an asynchronous Orbax save fails, its event loop is closed while
  tensorstore still completes the other writes, each reporting into the
  closed loop (about a thousand tracebacks for the paper model).
  """
  def filtered(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    hook(unraisable)
  return filtered


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors for bad flags and unreadable configs.

  --help / -h (this docstring and the main flags) and --helpfull (every
  flag) print to stdout and exit 0, as a help request should (absl exits 1).
  """
  asked = set(argv[1:]) & {"--help", "-h", "-?", "--helpshort", "--helpfull"}
  if asked:
    app.usage(shorthelp="--helpfull" not in asked, writeto_stdout=True, exitcode=0)
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"run.py: {e}\nPass --helpfull to list the flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(_override_error(e))
  try:
    _CONFIG.value.keys()
  except OSError as e:
    sys.exit(f"run.py: cannot read the config: {' '.join(str(e).split())}")
  return remaining


def _default_workdir() -> pathlib.Path:
  """runs/<config file name>[_<config argument>]: runs/default for the default."""
  filename, _, argument = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
  name = pathlib.Path(filename).stem
  if argument:
    name += "_" + re.sub(r"[^A-Za-z0-9.=,-]", "-", argument)
  return _REPO / "runs" / name


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


def _tracking() -> video.TrackerSettings:
  """The video flags as `video.TrackerSettings`."""
  try:
    smoothing = (video.OneEuroSettings(min_cutoff=_ONE_EURO_MIN_CUTOFF.value,
                                       beta=_ONE_EURO_BETA.value)
                 if _VIDEO_SMOOTHING.value else None)
  except ValueError as e:
    raise app.UsageError(f"--one_euro_*: {e}") from None
  return video.TrackerSettings(detect_every=_DETECT_EVERY.value, smoothing=smoothing)


def _parse_box_adjustment(text: str):
  try:
    return detector.parse_box_adjustment(text)
  except ValueError as e:
    raise app.UsageError(f"--box_adjustment: {e}") from None


def eval_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config `eval` runs with: --config if given, else the run's saved config.

  The command line's --config.* overrides, --studies and --max_batches
  apply on top of either.
  """
  extra = {}
  if _STUDIES.value is not None:
    try:
      extra["studies"] = studies.check_studies(_STUDIES.value)
    except ValueError as e:
      raise app.UsageError(f"--studies: {e}") from None
  if flags.FLAGS["config"].present:
    config = _CONFIG.value
  else:
    config = checkpointing.load_run_config(
        workdir, config_flags.get_override_values(flags.FLAGS["config"]))
    missing = sorted(checkpointing.flat_config(_CONFIG.value).keys()
                     - checkpointing.flat_config(config).keys())
    if missing:
      raise app.UsageError(
          f"{workdir / checkpointing.CONFIG_FILE} predates the config fields "
          f"{', '.join(missing)}; evaluate it with --config=configs/<its config file>.py "
          "(and the --config.* overrides it was trained with)")
  if _MAX_BATCHES.value is not None:
    extra["study_max_batches"] = _MAX_BATCHES.value
  with config.unlocked():
    config.eval.update(extra)
  return config


def _print_outputs(workdir: pathlib.Path, final: dict, title: str) -> None:
  print(f"\n{title}")
  print(evaluate.format_table(final, final["failure_threshold"], final["synthetic"]))
  print(f"\noutputs in {workdir}:")
  for name, what in (("final_metrics.json", "final metrics (NME as a fraction)"),
                     ("eval_metrics.jsonl", "every evaluation, all subsets and normalisers"),
                     ("train_metrics.jsonl", "training losses"),
                     ("tensorboard", "TensorBoard events"),
                     ("checkpoints", "latest train states and best EMA models per dataset")):
    if (workdir / name).exists():
      print(f"  {name:<20} {what}")


def _default_eval_checkpoint(workdir: pathlib.Path) -> str:
  """"latest", or "best" for a workdir that holds best models only (an import)."""
  checkpoints = workdir / checkpointing.CHECKPOINTS_DIR
  latest = checkpoints / "latest"
  has_latest = latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir())
  has_best = any(p.name.startswith("best_") and any(q.name.isdigit() for q in p.iterdir())
                 for p in checkpoints.glob("best_*") if p.is_dir())
  return "best" if has_best and not has_latest else "latest"


def run_mode(mode: str, workdir: pathlib.Path) -> int:
  """One mode's library call and its console output; returns the exit status."""
  if workdir.exists() and not workdir.is_dir():
    raise app.UsageError(f"workdir {workdir} is a file, not a folder; pass --workdir=DIR")
  if mode == "train":
    final = train.train_and_evaluate(_CONFIG.value, workdir)
    if "stopped_at_step" in final:
      print(f"stopped by signal {final['signal']} at step {final['stopped_at_step']}; the "
            f"checkpoint in {workdir / 'checkpoints'} resumes it")
      return 128 + int(final["signal"])
    _print_outputs(workdir, final, f"trained {final['steps']} steps in "
                                   f"{final['wall_time_s']:.0f} s; EMA model on the test splits:")
    return 0
  if not workdir.is_dir():
    raise app.UsageError(f"workdir {workdir} does not exist; train first or pass --workdir")
  if mode == "predict":
    return predict_files.predict_main(
        workdir, _IMAGE.value or [], _OUT.value, which=_CHECKPOINT.value or "best",
        dataset=_DATASET.value, box=_parse_box(_BOX.value), protocol=_PROTOCOL.value,
        flip_test=_FLIP_TEST.value, decoder=_DECODER.value, smoothing_sigma=_SMOOTHING.value,
        batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value, boxes_file=_BOXES.value,
        max_faces=_MAX_FACES.value, min_face_confidence=_MIN_FACE_CONFIDENCE.value,
        detector=_DETECTOR.value, box_adjustment=_parse_box_adjustment(_BOX_ADJUSTMENT.value),
        tracking=_tracking())
  which = _CHECKPOINT.value or _default_eval_checkpoint(workdir)
  # The metrics are printed before anything is written (a read-only run keeps them).
  done = evaluate.evaluate_workdir(
      eval_config(workdir), workdir, which, write_report=_REPORT.value, out_dir=_OUT.value,
      on_results=lambda final: _print_outputs(
          workdir, final, f"{which} checkpoint(s), step(s) {final['steps']}; EMA model on the "
                          "test splits:"))
  print(f"  {f'eval_{which}.json':<20} these metrics: "
        f"{pathlib.Path(_OUT.value or workdir) / f'eval_{which}.json'}")
  if done.report is not None:
    print(f"  {'report/':<20} the report: {done.report} (+ report.json, ced.png)")
  return 0


def main(argv):
  extra = argv[1:]
  quiet = _QuietLibraries()
  std_logging.getLogger("absl").addFilter(quiet)
  std_logging.getLogger("asyncio").addFilter(quiet)
  sys.unraisablehook = _unraisable(sys.unraisablehook)
  workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else _default_workdir()
  try:
    if len(extra) > 1 or (extra and extra[0] not in MODES):
      raise app.UsageError(f"expected an optional mode {MODES}, got {' '.join(extra)}")
    status = run_mode(extra[0] if extra else "train", workdir)
  except USER_ERRORS as e:
    # One line, not absl's usage dump of this module's docstring.
    sys.exit(f"run.py: {e}")
  if status:
    sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
