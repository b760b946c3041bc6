"""Fit a face detector's box calibration on your own annotated faces.

    fgtbt calibrate-detector --faces=my_faces.json [--detector=dlib_hog] [--out=fit.json]

The command over `fgtbt_jax.deploy.calibrate` (the faces file's format and
what the fit is are in its docstring).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Sequence

from fgtbt_jax.deploy import calibrate
from fgtbt_jax.deploy import detector
from fgtbt_jax.errors import DataError


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="fgtbt calibrate-detector", description=__doc__.split("\n\n")[0])
  parser.add_argument("--faces", required=True, help="the faces JSON file (see the module doc)")
  parser.add_argument("--detector", default="dlib_hog", choices=list(detector.DETECTORS))
  parser.add_argument("--min_matched", type=int, default=8,
                      help="fail when the detector finds fewer of the faces")
  parser.add_argument("--out", default=None, help="also write the fit as JSON here")
  args = parser.parse_args(argv)
  try:
    calibration = calibrate.calibrate_detector(args.detector, calibrate.read_annotated_faces(args.faces),
                                     min_matched=args.min_matched)
  except (DataError, ValueError, detector.DetectorUnavailableError) as e:
    parser.exit(1, f"fgtbt calibrate-detector: {e}\n")
  summary = {"detector": args.detector, "faces_file": args.faces, **calibration.summary()}
  adjustment = calibration.adjustment
  flag = f"{adjustment.scale:.4f},{adjustment.shift_x:.4f},{adjustment.shift_y:.4f}"
  summary["box_adjustment_flag"] = f"--config.predict.box_adjustment={flag}"
  error, ratio = summary["centre_error"], summary["side_ratio"]
  print(f"{args.detector}: found {calibration.num_matched} of {calibration.num_faces} faces; "
        f"box adjustment scale {adjustment.scale:.4f}, shift_x {adjustment.shift_x:+.4f}, "
        f"shift_y {adjustment.shift_y:+.4f}\n"
        f"after it: centre error {100 * error['p50']:.1f}% of the face side at the median "
        f"({100 * error['p90']:.1f}% at the 90th percentile), side ratio {ratio['p50']:.3f} "
        f"(10-90%: {ratio['p10']:.3f}-{ratio['p90']:.3f})\n"
        f"use it: python run.py predict ... --config.predict.detector={args.detector} "
        f"--config.predict.box_adjustment={flag}")
  if args.out is not None:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
