"""The evaluation report: pure functions from per-image arrays to tables, plots and files.

    report.write_report(per_image, "runs/paper/report", title=..., threshold=0.1)

`per_image` is {dataset: `metrics.SplitPredictions`} of one evaluation pass
(`evaluate.collect_split`; `python run.py eval` makes them and calls this).
Nothing here runs a model, reads a checkpoint or opens a dataset.
`write_report` writes `report.md` and `report.json`:

* per dataset and subset: NME with every normaliser the protocol defines,
  FR and AUC at the failure threshold (`eval.failure_threshold`), laid out
  like the paper's Tables 1-4, with the paper's FGTBT numbers beside ours for
  datasets that are the real benchmark (on synthetic stand-ins the paper
  column does not apply);
* CED curves (cumulative error distribution up to the threshold) as a PNG
  drawn with OpenCV;
* the per-landmark error grouped by the occurrence count C(p) of the
  unified points (the paper's Fig. 5 view: points shared by more datasets
  get more supervision);
* the FGSA high-frequency image of a few eval inputs, beside the inputs;
* the tables of the studies that were run (`fgtbt_jax.studies`): low input
  resolution and heatmap quantization.

NME values are fractions in report.json and % in report.md.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterable, Mapping

import cv2
import numpy as np

from fgtbt_jax.data import datasets
from fgtbt_jax import landmarks
from fgtbt_jax import metrics
from fgtbt_jax import models
from fgtbt_jax.metrics import SplitPredictions
from fgtbt_jax.models import fgsa

# Inputs shown in the high-frequency image grid.
HIGH_FREQUENCY_IMAGES = 4
# BGR colours of the CED curves, one per dataset in PROTOCOL_NAMES order.
_CURVE_COLOURS = ((200, 60, 20), (30, 140, 30), (20, 20, 200), (160, 40, 160))


def _check_split(dataset: str, split: SplitPredictions) -> None:
  protocol = landmarks.get_protocol(dataset)
  expected = (protocol.num_landmarks, 2)
  for what in ("predictions", "ground_truth"):
    points = np.asarray(getattr(split, what))
    if points.ndim != 3 or points.shape[1:] != expected:
      raise ValueError(f"per_image[{dataset!r}].{what}: expected shape (B, {expected[0]}, 2), "
                       f"got {points.shape}")
  count = len(split.ground_truth)
  if len(split.predictions) != count or np.shape(split.box_size) != (count,) or not count:
    raise ValueError(f"per_image[{dataset!r}]: {len(split.predictions)} predictions, {count} "
                     f"ground truths and {np.shape(split.box_size)} box sizes do not match "
                     "(or are empty)")


def dataset_table(split: SplitPredictions, threshold: float) -> dict:
  """{subset: {normaliser: {"nme", "fr", "auc", "count"}}} with subset "full" first."""
  _check_split(split.dataset, split)
  return metrics.dataset_table(split.dataset, split.predictions, split.ground_truth,
                               split.box_size, split.subsets, threshold)


def nme_by_occurrence(split: SplitPredictions) -> dict[int, float]:
  """{C: mean normalised point error of the dataset's points with C(p) = C}.

  Each point's error ||pred - gt|| is divided by the image's default
  normalising distance and averaged over images and over the points whose
  unified id has occurrence count C (how many of the four protocols
  annotate it). Counts the dataset has no point of are left out.
  """
  _check_split(split.dataset, split)
  protocol = landmarks.get_protocol(split.dataset)
  pred = np.asarray(split.predictions, np.float64)
  gt = np.asarray(split.ground_truth, np.float64)
  box = np.asarray(split.box_size, np.float64)
  distance = metrics.normalizing_distance(gt, protocol, box_size=box)
  errors = np.linalg.norm(pred - gt, axis=-1) / distance[:, None]  # (B, N)
  finite = np.isfinite(errors)
  counts = landmarks.OCCURRENCE_COUNT[protocol.unified_index]
  result = {}
  for count in np.unique(counts):
    chosen = finite & (counts == count)[None, :]
    if chosen.any():
      result[int(count)] = float(errors[chosen].mean())
  return result


def draw_ced_png(curves: Mapping[str, np.ndarray], path: str | pathlib.Path,
                 threshold: float, size: tuple[int, int] = (640, 480)) -> None:
  """Draws CED curves {label: per-image NMEs} on [0, threshold] x [0, 1] as a PNG."""
  width, height = size
  left, right, top, bottom = 60, 20, 20, 50
  canvas = np.full((height, width, 3), 255, np.uint8)
  plot_w, plot_h = width - left - right, height - top - bottom

  def to_pixels(errors, fraction):
    x = left + errors / threshold * plot_w
    y = top + (1.0 - fraction) * plot_h
    return np.stack([x, y], -1).round().astype(np.int32)

  for tick in np.linspace(0.0, 1.0, 6):
    (x0, y), (x1, _) = to_pixels(np.array([0.0, threshold]), np.array([tick, tick]))
    cv2.line(canvas, (x0, y), (x1, y), (225, 225, 225), 1)
    cv2.putText(canvas, f"{tick:.1f}", (8, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    (x, y0), (_, y1) = to_pixels(np.array([tick * threshold] * 2), np.array([0.0, 1.0]))
    cv2.line(canvas, (x, y0), (x, y1), (225, 225, 225), 1)
    cv2.putText(canvas, f"{tick * threshold:.2f}", (x - 14, y0 + 18),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
  cv2.rectangle(canvas, (left, top), (left + plot_w, top + plot_h), (0, 0, 0), 1)
  cv2.putText(canvas, "NME", (left + plot_w // 2 - 15, height - 8),
              cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
  for index, (label, nmes) in enumerate(curves.items()):
    errors, fraction = metrics.ced_curve(nmes, threshold, num=plot_w)
    colour = _CURVE_COLOURS[index % len(_CURVE_COLOURS)]
    cv2.polylines(canvas, [to_pixels(errors, fraction)], False, colour, 2, cv2.LINE_AA)
    cv2.putText(canvas, f"{label} (AUC {metrics.auc(nmes, threshold):.3f})",
                (left + plot_w - 200, top + plot_h - 20 - 18 * index),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
  if not cv2.imwrite(str(path), canvas):
    raise OSError(f"{path}: OpenCV could not write the CED plot")


def high_frequency_images(images: np.ndarray, extractor: str, sigma: float) -> np.ndarray:
  """(B, H, W, 3) uint8: FGSA's structure image of uint8 RGB inputs, per image scaled to 0-255.

  The extractor sees the ImageNet-normalised input exactly as the model does.
  """
  structure = np.asarray(fgsa.high_frequency_image(
      models.normalize_images(images), extractor, sigma), np.float64)
  peak = structure.reshape(len(structure), -1).max(axis=1)
  peak = np.where(peak > 0, peak, 1.0)[:, None, None, None]
  return np.clip(structure / peak * 255.0, 0, 255).astype(np.uint8)


def write_high_frequency_grid(images: np.ndarray, extractor: str, sigma: float,
                              path: str | pathlib.Path) -> None:
  """A PNG with the inputs on the top row and their high-frequency images below."""
  images = np.asarray(images, np.uint8)
  structure = high_frequency_images(images, extractor, sigma)
  grid = np.concatenate([np.concatenate(list(images), 1), np.concatenate(list(structure), 1)], 0)
  if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
    raise OSError(f"{path}: OpenCV could not write the high-frequency grid")


def _percent(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.2f}"


def _threshold_names(threshold: float) -> tuple[str, str]:
  return f"FR@{threshold:g}", f"AUC@{threshold:g}"


def dataset_markdown(dataset: str, table: Mapping[str, Any], threshold: float,
                     real_data: bool, failure_normalizer: str = "") -> list[str]:
  """The Markdown table of one dataset (paper Tables 1-4 layout).

  FR counts failures of the `failure_normalizer`'s NME ("" = the default one).
  """
  protocol = landmarks.get_protocol(dataset)
  failure = failure_normalizer or protocol.default_normalizer
  names = [protocol.default_normalizer] + sorted(
      n for n in protocol.normalizers if n != protocol.default_normalizer)
  paper = datasets.get(dataset).paper_results
  fr_name, auc_name = _threshold_names(threshold)
  fr_label = f"{fr_name} %" + (f" ({failure})" if failure != protocol.default_normalizer else "")
  header = (["subset", "images"] + [f"NME {n} %" for n in names]
            + [fr_label, auc_name] + (["paper FGTBT NME %"] if real_data else []))
  lines = [f"### {dataset}" + ("" if real_data else " (synthetic stand-in data)"), "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for subset, by_normalizer in table.items():
    default = by_normalizer[protocol.default_normalizer]
    cells = [subset, str(default["count"])] + [_percent(by_normalizer[n]["nme"]) for n in names]
    cells += [_percent(by_normalizer[failure]["fr"]), f"{default['auc']:.4f}"]
    if real_data:
      reported = paper.get(subset, {})
      cells.append(" / ".join(f"{v:.2f}" + (" FR" if k == "fr" else f" ({k})")
                              for k, v in reported.items()) or "-")
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def bias_by_axis(split: SplitPredictions) -> dict[str, float] | None:
  """{"x", "y"}: the mean signed error (prediction - ground truth) in heatmap pixels."""
  if split.signed_error is None or not np.isfinite(split.signed_error).any():
    return None
  mean = np.nanmean(np.asarray(split.signed_error, np.float64).reshape(-1, 2), axis=0)
  return {"x": float(mean[0]), "y": float(mean[1])}


def bias_markdown(bias: Mapping[str, Mapping[str, float] | None]) -> list[str]:
  lines = ["## Per-axis bias", "",
           "Mean signed error (prediction minus the exact ground truth) over all annotated "
           "points, in heatmap pixels (+x right, +y down). A coordinate-convention offset "
           "between training and evaluation shows here, e.g. about +0.5 in y for the "
           "authors' released weights evaluated with the project's coordinates.", "",
           "| dataset | x | y |", "|---|---|---|"]
  for d, b in bias.items():
    lines.append(f"| {d} | " + (f"{b['x']:+.3f} | {b['y']:+.3f}" if b else "- | -") + " |")
  return lines + [""]


def occurrence_markdown(occurrence: Mapping[str, Mapping[int, float]]) -> list[str]:
  lines = ["## Error by occurrence count C(p) (paper Fig. 5)", "",
           "Mean point error / default normalising distance (%) over the points whose "
           "unified id is annotated by C of the four protocols.", "",
           "| dataset | " + " | ".join(f"C={c}" for c in range(1, 5)) + " |",
           "|---|---|---|---|---|"]
  for d, by_count in occurrence.items():
    lines.append(f"| {d} | " + " | ".join(_percent(by_count.get(c)) for c in range(1, 5)) + " |")
  return lines + [""]


def lowres_markdown(lowres: Mapping[int, Mapping[str, float]], names: list[str],
                    face_side_px: float | None) -> list[str]:
  face_side = (f" The face box side of the unchanged input is {face_side_px:.0f} px; larger "
               "sides leave the input as it is." if face_side_px else "")
  lines = ["## Low-resolution study", "",
           "Faces downsampled to the given face box side and upsampled back to the input "
           f"size; NME % (default normaliser).{face_side}", "",
           "| face side px | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
  for side, by_dataset in lowres.items():
    lines.append(f"| {side} | " + " | ".join(_percent(by_dataset.get(d)) for d in names) + " |")
  return lines + [""]


def lowres_faces_markdown(faces: Mapping[int, Mapping[str, float]]) -> list[str]:
  """The lowres study's face quality: PSNR dB / SSIM of the inputs and hallucinated faces."""
  model = any("psnr" in row for row in faces.values())
  lines = ["### Face quality at low resolution", "",
           "PSNR (dB) and SSIM against the original crops, all test images: the degraded "
           "input" + (" and the model's hallucinated face (DHLN)." if model else "."), "",
           "| face side px | input PSNR | input SSIM |" + (" DHLN PSNR | DHLN SSIM |" if model else ""),
           "|---|---|---|" + ("---|---|" if model else "")]
  def cell(value, digits):
    return "same" if value is None else f"{value:.{digits}f}"

  for side, row in faces.items():
    cells = [cell(row["input_psnr"], 2), cell(row["input_ssim"], 4)]
    if model:
      cells += [cell(row["psnr"], 2), cell(row["ssim"], 4)]
    lines.append(f"| {side} | " + " | ".join(cells) + " |")
  return lines + [""]


def quantization_markdown(q: Mapping[str, Any], names: list[str]) -> list[str]:
  lines = ["## Heatmap quantization study", "",
           f"Input {q['input_size']}, heatmap {q['heatmap_size']}x{q['heatmap_size']}, "
           f"sigma {q['sigma']:g}. Ideal: WFLW inter-ocular NME % of decoding perfect "
           "target heatmaps of random mean faces; measured: NME % on the test data.", "",
           "| decoder | ideal | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
  decimal = q.get("decimal_size")
  for decoder, ideal in q["ideal"].items():
    measured = q["measured"].get(decoder, {})
    label = f"{decoder} (d={decimal})" if decoder.startswith("hih") and decimal else decoder
    lines.append(f"| {label} | {100 * ideal:.4f} | "
                 + " | ".join(_percent(measured.get(d)) for d in names) + " |")
  by_size = q.get("ideal_by_decimal_size", {})
  if by_size:
    lines += ["", "Ideal NME % of the HIH decoders by decimal map size d:", "",
              "| d | " + " | ".join(by_size[next(iter(by_size))]) + " |",
              "|" + "---|" * (len(by_size[next(iter(by_size))]) + 1)]
    for size, row in by_size.items():
      lines.append(f"| {size} | " + " | ".join(f"{100 * v:.4f}" for v in row.values()) + " |")
  return lines + [""]


def write_report(per_image: Mapping[str, SplitPredictions], out_dir: str | pathlib.Path, *,
                 title: str, threshold: float, synthetic: Iterable[str] = (),
                 studies: Mapping[str, Any] | None = None,
                 frequency: tuple[str, float] | None = None,
                 face_side_px: float | None = None,
                 failure_normalizer: str = "") -> pathlib.Path:
  """Writes report.md, report.json, ced.png (and high_frequency.png) to `out_dir`.

  Args:
    per_image: {dataset: SplitPredictions}; a dataset's `images` (uint8
      inputs), when present, feed the high-frequency grid.
    out_dir: created if missing.
    title: the report's heading (e.g. the workdir and checkpoint step).
    threshold: the failure threshold of FR, AUC and the CED's range.
    synthetic: the datasets evaluated on synthetic stand-ins: their tables
      say so and leave the paper's column out.
    studies: {"lowres": ..., "quantization": ...} tables of
      `studies.study_table`, either optional.
    frequency: (extractor, sigma) of the model's FGSA; None (or no images)
      leaves the high-frequency grid out.
    face_side_px: the face box side in the network input (input size /
      crop_enlarge), stated with the low-resolution study.
    failure_normalizer: whose NME FR counts failures of ("" = each
      dataset's default; `eval.failure_normalizer`).

  Returns:
    The path of report.md.
  """
  unknown = []
  for d in per_image:
    try:
      landmarks.get_protocol(d)
    except ValueError:
      unknown.append(d)
  if unknown:
    raise ValueError(f"per_image: unknown datasets {unknown}; expected {landmarks.PROTOCOL_NAMES} "
                     "or registered own datasets")
  # The benchmarks in protocol order, then a user's own datasets (no paper
  # numbers: their tables leave that column out, as synthetic ones do).
  names = [d for d in landmarks.PROTOCOL_NAMES if d in per_image] + [
      d for d in per_image if d not in landmarks.PROTOCOL_NAMES]
  if not names:
    raise ValueError("per_image holds no dataset")
  if not threshold > 0:
    raise ValueError(f"threshold must be positive, got {threshold}")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  synthetic = set(synthetic)
  studies = dict(studies or {})
  tables = {d: dataset_table(per_image[d], threshold) for d in names}
  occurrence = {d: nme_by_occurrence(per_image[d]) for d in names}
  draw_ced_png({d: metrics.nme(per_image[d].predictions, per_image[d].ground_truth, d,
                               box_size=per_image[d].box_size,
                               mask=np.isfinite(np.asarray(per_image[d].ground_truth)).all(-1))
                for d in names}, out / "ced.png", threshold)
  fr_name, auc_name = _threshold_names(threshold)
  lines = [f"# {title}", "",
           f"NME in % of each protocol's normalising distance; {fr_name} and {auc_name} with "
           "the default normaliser (300W/WFLW inter-ocular, COFW inter-pupil, AFLW box size).", ""]
  if synthetic & set(names):
    lines += [f"Evaluated on synthetic stand-in data: {', '.join(d for d in names if d in synthetic)}"
              "; the paper's FGTBT column does not apply to these and is left out.", ""]
  lines += ["## Results per dataset and subset (paper Tables 1-4)", ""]
  for d in names:
    if d in landmarks.PROTOCOL_NAMES:
      lines += dataset_markdown(d, tables[d], threshold, real_data=d not in synthetic,
                                failure_normalizer=failure_normalizer)
    else:
      table = dataset_markdown(d, tables[d], threshold, real_data=False,
                               failure_normalizer=failure_normalizer)
      lines += [f"### {d} (own data)"] + table[1:]
  lines += ["## Cumulative error distribution", "", "![CED curves](ced.png)", ""]
  bias = {d: bias_by_axis(per_image[d]) for d in names}
  if any(bias.values()):
    lines += bias_markdown(bias)
  lines += occurrence_markdown(occurrence)
  images = [np.asarray(per_image[d].images[:1]) for d in names if len(per_image[d].images)]
  if frequency is not None and images:
    extractor, sigma = frequency
    write_high_frequency_grid(np.concatenate(images)[:HIGH_FREQUENCY_IMAGES], extractor, sigma,
                              out / "high_frequency.png")
    lines += ["## FGSA high-frequency images", "",
              f"Top: eval inputs; bottom: the {extractor} extractor's output (sigma {sigma:g}), "
              "each scaled to its maximum.", "", "![high-frequency images](high_frequency.png)", ""]
  if "lowres" in studies:
    lines += lowres_markdown(studies["lowres"], names, face_side_px)
  if "lowres_faces" in studies:
    lines += lowres_faces_markdown(studies["lowres_faces"])
  if "quantization" in studies:
    lines += quantization_markdown(studies["quantization"], names)
  path = out / "report.md"
  path.write_text("\n".join(lines))
  summary = {"title": title, "threshold": threshold,
             "synthetic": sorted(synthetic & set(names)), "tables": tables,
             "nme_by_occurrence": occurrence, "bias_heatmap_px": bias,
             "paper": {d: datasets.paper_results()[d] for d in names
                       if d not in synthetic and d in landmarks.PROTOCOL_NAMES},
             "studies": {k: {str(i): v for i, v in s.items()} if k in ("lowres", "lowres_faces") else s
                         for k, s in studies.items()}}
  (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
  return path
