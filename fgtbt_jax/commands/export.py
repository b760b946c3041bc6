"""The inference function as a standalone artifact: StableHLO (JAX) or ONNX (onnxruntime).

    fgtbt export --workdir runs/paper --out fgtbt.stablehlo [--batch_size 8]
        [--which best] [--output landmarks|heatmaps] [--no_flip_test]
    fgtbt export --format onnx --workdir runs/paper --out fgtbt.onnx [...]

The command over `fgtbt_jax.deploy.export` and `fgtbt_jax.deploy.onnx_export`
(what each artifact holds and how to call it are in their docstrings and
docs/onnx.md; ONNX needs the optional packages named there).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from fgtbt_jax import checkpointing
from fgtbt_jax import errors
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import rundir
from fgtbt_jax.deploy import export
from fgtbt_jax.deploy import onnx_export
from fgtbt_jax.deploy import predictor as predictor_lib


# What the command reports in one line: a run that cannot be read, bad
# settings, an artifact that cannot be written.
USER_ERRORS = (rundir.WorkdirError, checkpointing.IncompatibleCheckpointError,
                checkpointing.NonFiniteStateError, checkpointing.CorruptCheckpointError,
                errors.ConfigError, errors.DataError, OSError, onnx_export.OnnxUnavailableError)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="fgtbt export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (config.json, checkpoints/)")
  parser.add_argument("--out", required=True, help="artifact file to write")
  parser.add_argument("--format", default="stablehlo", choices=("stablehlo", "onnx"),
                      help="stablehlo (jax.export; needs JAX to run) or onnx (onnxruntime)")
  parser.add_argument("--which", default="best", choices=rundir.CHECKPOINT_KINDS)
  parser.add_argument("--dataset", default=None, help="whose best checkpoint (default: the "
                      "run's predict.dataset, else its first)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="default: the run's predict.batch_size")
  parser.add_argument("--output", default="landmarks", choices=export.OUTPUTS)
  parser.add_argument("--decoder", default=None, choices=heatmaps.ALL_DECODERS,
                      help="default: the run's eval.decoder")
  parser.add_argument("--flip_test", dest="flip_test", action="store_true", default=None,
                      help="default: the run's eval.flip_test")
  parser.add_argument("--no_flip_test", dest="flip_test", action="store_false")
  parser.add_argument("--platforms", default=",".join(export.DEFAULT_PLATFORMS),
                      help="stablehlo: comma-separated lowering platforms")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  try:
    if out.is_dir():  # Found before the model is lowered, not after.
      raise errors.OutputError(f"--out {out} is a folder; name the artifact file to write")
    # The run's config read as eval and predict read it, these flags as its overrides.
    workdir = rundir.find_workdir(args.workdir)
    overrides = {key: value for key, value in (
        ("eval.decoder", args.decoder), ("eval.flip_test", args.flip_test),
        ("predict.dataset", args.dataset), ("predict.batch_size", args.batch_size))
                 if value is not None}
    config = rundir.load_run_config(workdir, overrides)
    predictor = predictor_lib.Predictor.from_checkpoint(workdir, args.which, config=config)
    # The run's own datasets (their schemes registered by from_checkpoint).
    own = [str(n) for n in config.data.datasets if not landmarks.is_benchmark(n)]
    if args.format == "onnx":
      onnx_export.export_onnx(predictor, out, output=args.output, own_schemes=own)
      path = out
    else:
      exported = export.export_inference(predictor, output=args.output,
                                         platforms=[p for p in args.platforms.split(",") if p])
      path = export.save_exported(exported, out, export.artifact_metadata(
          exported, settings=predictor.settings, output=args.output,
          crop_enlarge=predictor.crop_enlarge, own_schemes=own))
  except USER_ERRORS as e:
    print(f"fgtbt export: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.name}.json")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
