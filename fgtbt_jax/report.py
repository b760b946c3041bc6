"""The evaluation report of a trained run: tables, CED curves, C(p) view, studies.

    report.write_report("runs/paper")   # -> runs/paper/report/report.md

One evaluation pass per dataset (`collect_predictions`) gives, per test
image, the dataset's own-order predictions and ground truth in stored-crop
pixels, the face box size and the subset flags. From these `build_report`
writes `report.md` and `report.json`:

* per dataset and subset: NME with every normaliser the protocol defines,
  FR@0.1 and AUC@0.1, laid out like the paper's Tables 1-4, with the paper's
  FGTBT numbers beside ours when the data is the real benchmark (on the
  synthetic stand-ins the paper column does not apply);
* CED curves (cumulative error distribution up to NME 0.1) as a PNG drawn
  with OpenCV;
* the per-landmark error grouped by the occurrence count C(p) of the
  unified points (the paper's Fig. 5 view: points shared by more datasets
  get more supervision);
* the FGSA high-frequency image of a few eval inputs, beside the inputs;
* optional studies: low input resolution (faces downsampled to a 16-128 px
  box side and upsampled back) and heatmap quantization (decoding error of
  ideal heatmaps, and the measured NME with each decoder).

NME values are fractions in report.json and % in report.md.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

import cv2
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fgtbt_jax import crop
from fgtbt_jax import evaluate
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import metrics
from fgtbt_jax import models
from fgtbt_jax import quantization
from fgtbt_jax import sharding
from fgtbt_jax.models import fgsa
from fgtbt_jax.models import partitioning

THRESHOLD = 0.1
LOW_RESOLUTION_SIDES: tuple[int, ...] = (16, 32, 64, 128)
STUDIES: tuple[str, ...] = ("lowres", "quantization")
# Faces of random mean-face landmarks for the ideal-heatmap decoding error.
QUANTIZATION_FACES = 64
# Inputs shown in the high-frequency image grid.
HIGH_FREQUENCY_IMAGES = 4
# BGR colours of the CED curves, one per dataset in PROTOCOL_NAMES order.
_CURVE_COLOURS = ((200, 60, 20), (30, 140, 30), (20, 20, 200), (160, 40, 160))

# Per-sample evaluation data of one dataset, as `collect_predictions` returns it:
#   "predictions", "ground_truth": (B, N, 2) float, own order, stored-crop pixels
#   "box_size": (B,) float;  "subsets": {name: (B,) bool}
Samples = Mapping[str, Any]


def paper_results() -> dict[str, dict[str, dict[str, float]]]:
  """The FGTBT paper's test results (NME and FR in %), per dataset and subset.

  {dataset: {subset: {normaliser or "fr": value}}}, subset "full" being the
  whole test set. 300W and WFLW are inter-ocular, COFW inter-pupil (with its
  FR@0.1), AFLW the face box size.
  """
  wflw = {"full": 4.42, "pose": 7.43, "expression": 4.54, "illumination": 4.47,
          "makeup": 4.37, "occlusion": 5.48, "blur": 5.02}
  return {
      "300W": {name: {"inter_ocular": value}
               for name, value in (("common", 2.71), ("challenging", 4.51), ("full", 3.06))},
      "WFLW": {name: {"inter_ocular": value} for name, value in wflw.items()},
      "COFW": {"full": {"inter_pupil": 4.79, "fr": 0.59}},
      "AFLW": {"full": {"box": 1.67}},
  }


def _check_samples(dataset: str, samples: Samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  protocol = landmarks.get_protocol(dataset)
  for key in ("predictions", "ground_truth", "box_size", "subsets"):
    if key not in samples:
      raise KeyError(f"per_sample[{dataset!r}] has no {key!r}; expected predictions, "
                     "ground_truth, box_size and subsets")
  pred = np.asarray(samples["predictions"], np.float64)
  gt = np.asarray(samples["ground_truth"], np.float64)
  box = np.asarray(samples["box_size"], np.float64)
  expected = (protocol.num_landmarks, 2)
  for what, points in (("predictions", pred), ("ground_truth", gt)):
    if points.ndim != 3 or points.shape[1:] != expected:
      raise ValueError(f"per_sample[{dataset!r}][{what!r}]: expected shape (B, {expected[0]}, 2),"
                       f" got {points.shape}")
  if pred.shape != gt.shape or box.shape != gt.shape[:1] or len(gt) == 0:
    raise ValueError(f"per_sample[{dataset!r}]: {len(pred)} predictions, {len(gt)} ground "
                     f"truths and {box.shape} box sizes do not match (or are empty)")
  for name, flags in samples["subsets"].items():
    if np.shape(flags) != box.shape:
      raise ValueError(f"per_sample[{dataset!r}]['subsets'][{name!r}]: expected shape "
                       f"{box.shape}, got {np.shape(flags)}")
  return pred, gt, box


def dataset_table(dataset: str, samples: Samples, threshold: float = THRESHOLD) -> dict:
  """{subset: {normaliser: {"nme", "fr", "auc", "count"}}} with subset "full" first."""
  pred, gt, box = _check_samples(dataset, samples)
  protocol = landmarks.get_protocol(dataset)
  mask = np.isfinite(gt).all(-1)
  per_image = {name: metrics.nme(pred, gt, protocol, normalizer=name, box_size=box, mask=mask)
               for name in protocol.normalizers}
  rows = {"full": np.ones(len(gt), bool)}
  rows.update({name: np.asarray(flags, bool) for name, flags in samples["subsets"].items()})
  return {subset: {name: metrics.summarize(values[flags], threshold)
                   for name, values in per_image.items()}
          for subset, flags in rows.items() if flags.any()}


def nme_by_occurrence(dataset: str, samples: Samples) -> dict[int, float]:
  """{C: mean normalised point error of the dataset's points with C(p) = C}.

  Each point's error ||pred - gt|| is divided by the image's default
  normalising distance and averaged over images and over the points whose
  unified id has occurrence count C (how many of the four protocols
  annotate it). Counts the dataset has no point of are left out.
  """
  pred, gt, box = _check_samples(dataset, samples)
  protocol = landmarks.get_protocol(dataset)
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
                 threshold: float = THRESHOLD, size: tuple[int, int] = (640, 480)) -> None:
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


def degrade_resolution(images: np.ndarray, face_side: int, crop_enlarge: float) -> np.ndarray:
  """Inputs whose face box is downsampled to `face_side` px and upsampled back.

  The face box side in a crop of side S is S / crop_enlarge; the whole crop
  is area-resized by face_side / that side and bilinearly resized back to S.
  A face already at or below `face_side` is returned unchanged.
  """
  images = np.asarray(images, np.uint8)
  size = images.shape[1]
  factor = face_side / (size / crop_enlarge)
  if factor >= 1.0:
    return images
  small = max(1, int(round(size * factor)))
  out = np.empty_like(images)
  for i, image in enumerate(images):
    reduced = cv2.resize(image, (small, small), interpolation=cv2.INTER_AREA)
    out[i] = cv2.resize(reduced, (size, size), interpolation=cv2.INTER_LINEAR)
  return out


def collect_predictions(config: ml_collections.ConfigDict, predict_fn: Callable, variables: Any,
                        mesh: Mesh, *, datasets: Sequence[str] | None = None,
                        transform: Callable[[np.ndarray], np.ndarray] | None = None,
                        max_batches: int | None = None, keep_images: int = 0) -> dict:
  """One evaluation pass: {dataset: Samples} (valid rows only, this process's share).

  Args:
    config: the experiment config (reads `data`).
    predict_fn: `evaluate.make_predict_fn(...)`.
    variables: the model variables.
    mesh: the mesh `predict_fn` was built for.
    datasets: default `config.data.datasets`.
    transform: applied to each batch's uint8 images before the model (the
      low-resolution study).
    max_batches: evaluate at most this many batches per dataset.
    keep_images: also return the first this-many input images of each
      dataset under "images" (for the high-frequency grid).
  """
  from data_pipelines import pipeline
  data = config.data
  batch_sharding = NamedSharding(mesh, PartitionSpec(partitioning.MESH_AXES))
  result = {}
  for dataset in (datasets or data.datasets):
    protocol = landmarks.get_protocol(dataset)
    subset_names = pipeline.eval_subsets(dataset)
    iterator = pipeline.make_eval_iterator(data, dataset, data.eval_split)
    parts: dict[str, list[np.ndarray]] = {}
    try:
      for index, batch in enumerate(iterator):
        if max_batches is not None and index >= max_batches:
          break
        images = batch["image"] if transform is None else transform(batch["image"])
        unified = sharding.local_rows(predict_fn(
            variables, jax.make_array_from_process_local_data(batch_sharding, images)))
        own = unified[:, protocol.unified_index]
        valid = np.asarray(batch["valid"], bool)
        rows = {"predictions": crop.apply_affine(own, batch["inverse_affine"]),
                "ground_truth": batch["landmarks"], "box_size": batch["box_size"],
                **{f"subset/{n}": batch[f"subset/{n}"] for n in subset_names}}
        if sum(len(p) for p in parts.get("images", ())) < keep_images:
          rows["images"] = images
        for key, value in rows.items():
          parts.setdefault(key, []).append(np.asarray(value)[valid])
    finally:
      getattr(iterator, "close", lambda: None)()
    if not parts or not sum(len(p) for p in parts["box_size"]):
      raise ValueError(f"{dataset} {data.eval_split}: the eval split is empty")
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    samples = {"predictions": merged["predictions"], "ground_truth": merged["ground_truth"],
               "box_size": merged["box_size"],
               "subsets": {n: merged[f"subset/{n}"].astype(bool) for n in subset_names}}
    if keep_images:
      samples["images"] = merged["images"][:keep_images]
    result[protocol.name] = samples
  return result


def default_nmes(per_sample: Mapping[str, Samples]) -> dict[str, float]:
  """{dataset: mean NME with the protocol's default normaliser}."""
  return {dataset: float(np.mean(metrics.nme(
      s["predictions"], s["ground_truth"], dataset, box_size=s["box_size"],
      mask=np.isfinite(np.asarray(s["ground_truth"])).all(-1))))
      for dataset, s in per_sample.items()}


def low_resolution_study(config: ml_collections.ConfigDict, predict_fn: Callable, variables: Any,
                         mesh: Mesh, sides: Sequence[int] = LOW_RESOLUTION_SIDES,
                         max_batches: int | None = None,
                         datasets: Sequence[str] | None = None) -> dict[int, dict[str, float]]:
  """{face side px: {dataset: NME}} with inputs degraded by `degrade_resolution`."""
  return {int(side): default_nmes(collect_predictions(
      config, predict_fn, variables, mesh, max_batches=max_batches, datasets=datasets,
      transform=lambda images, side=side: degrade_resolution(
          images, side, config.data.crop_enlarge)))
      for side in sides}


def quantization_study(config: ml_collections.ConfigDict, model, mesh: Mesh, rules,
                       variables: Any, max_batches: int | None = None,
                       measured: Mapping[str, Mapping[str, float]] | None = None,
                       datasets: Sequence[str] | None = None) -> dict:
  """Ideal-heatmap decoding error and measured NME per decoder.

  `measured` holds {decoder: {dataset: NME}} already known (e.g. of the
  config's decoder from the main pass); the other decoders are evaluated.
  Returns {"input_size", "heatmap_size", "sigma", "ideal": {decoder: WFLW
  inter-ocular NME of decoding perfect targets}, "measured": {decoder:
  {dataset: NME}}}. The heatmap is half the input (the model's stride 2).
  """
  input_size = int(config.data.image_size)
  heatmap_size = input_size // 2
  sigma = float(config.loss.sigma)
  faces = quantization.random_meanface_landmarks(QUANTIZATION_FACES, input_size, seed=0)
  ideal = quantization.decoding_error(input_size, heatmap_size, sigma, faces)
  measured = dict(measured or {})
  for decoder in heatmaps.DECODERS:
    if decoder in measured:
      continue
    predict_fn = evaluate.make_predict_fn(
        model, mesh, rules, decoder=decoder, flip_test=config.eval.flip_test,
        smoothing_sigma=config.eval.smoothing_sigma)
    measured[decoder] = default_nmes(collect_predictions(
        config, predict_fn, variables, mesh, max_batches=max_batches, datasets=datasets))
  return {"input_size": input_size, "heatmap_size": heatmap_size, "sigma": sigma,
          "ideal": ideal, "measured": {d: measured[d] for d in heatmaps.DECODERS}}


def _percent(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.2f}"


def _dataset_markdown(dataset: str, table: Mapping[str, Any], real_data: bool) -> list[str]:
  protocol = landmarks.get_protocol(dataset)
  names = [protocol.default_normalizer] + sorted(
      n for n in protocol.normalizers if n != protocol.default_normalizer)
  paper = paper_results().get(dataset, {})
  header = (["subset", "images"] + [f"NME {n} %" for n in names]
            + ["FR@0.1 %", "AUC@0.1"] + (["paper FGTBT NME %"] if real_data else []))
  lines = [f"### {dataset}", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for subset, by_normalizer in table.items():
    default = by_normalizer[protocol.default_normalizer]
    cells = [subset, str(default["count"])] + [_percent(by_normalizer[n]["nme"]) for n in names]
    cells += [_percent(default["fr"]), f"{default['auc']:.4f}"]
    if real_data:
      reported = paper.get(subset, {})
      cells.append(" / ".join(f"{v:.2f}" + (" FR" if k == "fr" else f" ({k})")
                              for k, v in reported.items()) or "-")
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def build_report(per_sample: Mapping[str, Samples], out_dir: str | pathlib.Path, *, title: str,
                 real_data: bool, studies: Mapping[str, Any] | None = None,
                 frequency: tuple[str, float] | None = None, face_side_px: float | None = None,
                 threshold: float = THRESHOLD) -> pathlib.Path:
  """Writes report.md, report.json, ced.png (and high_frequency.png) to `out_dir`.

  Args:
    per_sample: {dataset: Samples} as `collect_predictions` returns them;
      a dataset's "images" (uint8 inputs), when present, feed the
      high-frequency grid.
    out_dir: created if missing.
    title: the report's heading (e.g. the workdir and checkpoint step).
    real_data: the test sets are the real benchmarks, so the paper's FGTBT
      numbers are shown beside ours; on synthetic data they do not apply.
    studies: {"lowres": low_resolution_study(...), "quantization":
      quantization_study(...)}, either optional.
    frequency: (extractor, sigma) of the model's FGSA; None (or no images)
      leaves the high-frequency grid out.
    face_side_px: the face box side in the network input (input size /
      crop_enlarge), stated with the low-resolution study.

  Returns:
    The path of report.md.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  unknown = [d for d in per_sample if d not in landmarks.PROTOCOLS]
  if unknown:
    raise KeyError(f"per_sample: unknown datasets {unknown}; expected {landmarks.PROTOCOL_NAMES}")
  datasets = [d for d in landmarks.PROTOCOL_NAMES if d in per_sample]
  if not datasets:
    raise ValueError("per_sample holds no dataset")
  studies = dict(studies or {})
  tables = {d: dataset_table(d, per_sample[d], threshold) for d in datasets}
  occurrence = {d: nme_by_occurrence(d, per_sample[d]) for d in datasets}
  curves = {}
  for d in datasets:
    s = per_sample[d]
    curves[d] = metrics.nme(s["predictions"], s["ground_truth"], d, box_size=s["box_size"],
                            mask=np.isfinite(np.asarray(s["ground_truth"])).all(-1))
  draw_ced_png(curves, out / "ced.png", threshold)

  lines = [f"# {title}", "",
           "NME in % of each protocol's normalising distance; FR and AUC at NME 0.1 with the "
           "default normaliser (300W/WFLW inter-ocular, COFW inter-pupil, AFLW box size).", ""]
  if not real_data:
    lines += ["Evaluated on synthetic stand-in data: the paper's FGTBT column does not apply "
              "and is left out.", ""]
  lines += ["## Results per dataset and subset (paper Tables 1-4)", ""]
  for d in datasets:
    lines += _dataset_markdown(d, tables[d], real_data)
  lines += ["## Cumulative error distribution", "", "![CED curves](ced.png)", "",
            "## Error by occurrence count C(p) (paper Fig. 5)", "",
            "Mean point error / default normalising distance (%) over the points whose "
            "unified id is annotated by C of the four protocols.", "",
            "| dataset | " + " | ".join(f"C={c}" for c in range(1, 5)) + " |",
            "|---|---|---|---|---|"]
  for d in datasets:
    lines.append(f"| {d} | " + " | ".join(_percent(occurrence[d].get(c))
                                          for c in range(1, 5)) + " |")
  lines.append("")
  images = [np.asarray(per_sample[d]["images"][:1]) for d in datasets
            if len(per_sample[d].get("images", ()))]
  if frequency is not None and images:
    extractor, sigma = frequency
    shown = np.concatenate(images)[:HIGH_FREQUENCY_IMAGES]
    write_high_frequency_grid(shown, extractor, sigma, out / "high_frequency.png")
    lines += ["## FGSA high-frequency images", "",
              f"Top: eval inputs; bottom: the {extractor} extractor's output (sigma {sigma:g}), "
              "each scaled to its maximum.", "", "![high-frequency images](high_frequency.png)", ""]
  if "lowres" in studies:
    lowres = studies["lowres"]
    face_side = (f" The face box side of the unchanged input is {face_side_px:.0f} px; larger "
                 "sides leave the input as it is." if face_side_px else "")
    lines += ["## Low-resolution study", "",
              "Faces downsampled to the given face box side and upsampled back to the input "
              f"size; NME % (default normaliser).{face_side}", "",
              "| face side px | " + " | ".join(datasets) + " |",
              "|" + "---|" * (len(datasets) + 1)]
    for side, by_dataset in lowres.items():
      lines.append(f"| {side} | " + " | ".join(_percent(by_dataset.get(d)) for d in datasets)
                   + " |")
    lines.append("")
  if "quantization" in studies:
    q = studies["quantization"]
    lines += ["## Heatmap quantization study", "",
              f"Input {q['input_size']}, heatmap {q['heatmap_size']}x{q['heatmap_size']}, "
              f"sigma {q['sigma']:g}. Ideal: WFLW inter-ocular NME % of decoding perfect "
              "target heatmaps of random mean faces; measured: NME % on the test data.", "",
              "| decoder | ideal | " + " | ".join(datasets) + " |",
              "|" + "---|" * (len(datasets) + 2)]
    for decoder, ideal in q["ideal"].items():
      measured = q["measured"].get(decoder, {})
      lines.append(f"| {decoder} | {100 * ideal:.4f} | "
                   + " | ".join(_percent(measured.get(d)) for d in datasets) + " |")
    lines.append("")
  path = out / "report.md"
  path.write_text("\n".join(lines))
  summary = {"title": title, "real_data": real_data, "threshold": threshold,
             "tables": tables, "nme_by_occurrence": occurrence,
             "paper": paper_results() if real_data else None,
             "studies": {k: {str(i): v for i, v in s.items()} if k == "lowres" else s
                         for k, s in studies.items()}}
  (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
  return path


def _real_data_default(config: ml_collections.ConfigDict) -> bool:
  """Real benchmarks unless the config generates synthetic data or a conversion is marked so."""
  from data_pipelines import tfds_builders
  return not bool(config.synthetic_data.generate) and not any(
      tfds_builders.is_synthetic(config.data.data_dir, name, config.data.crop_config)
      for name in config.data.datasets)


def _restore_groups(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                    checkpoint: str) -> list[tuple[list[str], Any, int]]:
  """(datasets, EMA variables, step) groups: one model for all, or each dataset's best."""
  from fgtbt_jax import predictor
  if checkpoint == "latest":
    variables, step = predictor.restore_ema_variables(config, workdir, "latest")
    return [(list(config.data.datasets), variables, step)]
  best = predictor.restore_best_ema_variables(config, workdir, config.data.datasets)
  return [([name], variables, step)
          for name, (variables, step) in zip(config.data.datasets, best)]


def _single_device(config: ml_collections.ConfigDict):
  """(model, mesh, rules, predict_fn) on this process's first device."""
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * 2)
  rules = sharding.logical_rules(config.mesh.logical_axis_rules)
  model = models.build_model(config.model)
  predict_fn = evaluate.make_predict_fn(
      model, mesh, rules, decoder=config.eval.decoder, flip_test=config.eval.flip_test,
      smoothing_sigma=config.eval.smoothing_sigma)
  return model, mesh, rules, predict_fn


def _run_studies(config: ml_collections.ConfigDict, groups, studies: Sequence[str], device,
                 per_sample: Mapping[str, Samples], max_batches: int | None) -> dict:
  """The named studies, each dataset with its group's model."""
  model, mesh, rules, predict_fn = device
  lowres: dict[int, dict[str, float]] = {}
  quantized: dict[str, Any] = {}
  for datasets, variables, _ in groups:
    if "lowres" in studies:
      for side, nmes in low_resolution_study(config, predict_fn, variables, mesh,
                                             max_batches=max_batches, datasets=datasets).items():
        lowres.setdefault(side, {}).update(nmes)
    if "quantization" in studies:
      known = default_nmes({d: per_sample[d] for d in datasets})
      study = quantization_study(config, model, mesh, rules, variables, max_batches=max_batches,
                                 measured={config.eval.decoder: known}, datasets=datasets)
      measured = quantized.get("measured", {})
      quantized.update(study, measured={
          d: {**measured.get(d, {}), **nmes} for d, nmes in study["measured"].items()})
  results = {}
  if "lowres" in studies:
    results["lowres"] = lowres
  if "quantization" in studies:
    results["quantization"] = quantized
  return results


def _check_request(checkpoint: str, studies: Sequence[str]) -> None:
  unknown = [s for s in studies if s not in STUDIES]
  if unknown:
    raise ValueError(f"unknown studies {unknown}; expected names from {STUDIES}")
  if checkpoint not in ("latest", "best"):
    raise ValueError(f"checkpoint must be 'latest' or 'best', got {checkpoint!r}")


def _finish(per_sample, out_dir, workdir: pathlib.Path, config, checkpoint: str, steps,
            real_data: bool, results: dict) -> pathlib.Path:
  if checkpoint == "latest":
    which = f"latest checkpoint (step {steps})"
  else:
    which = "best checkpoint per dataset (" + ", ".join(
        f"{name} step {step}" for name, step in steps.items()) + ")"
  title = (f"FGTBT evaluation report: {workdir.name}, {which}, "
           f"decoder {config.eval.decoder}, flip test {'on' if config.eval.flip_test else 'off'}")
  frequency = ((config.model.frequency_extractor, float(config.model.frequency_sigma))
               if config.model.fgsa else None)
  return build_report(per_sample, out_dir or workdir / "report", title=title,
                      real_data=real_data, studies=results, frequency=frequency,
                      face_side_px=config.data.image_size / config.data.crop_enlarge)


def write_report(workdir: str | pathlib.Path, out_dir: str | pathlib.Path | None = None, *,
                 checkpoint: str = "latest", studies: Sequence[str] = STUDIES,
                 max_batches: int | None = None, real_data: bool | None = None,
                 config: ml_collections.ConfigDict | None = None) -> pathlib.Path:
  """Evaluates a run's EMA checkpoint(s) and writes its report; returns report.md's path.

  Args:
    workdir: the training run's directory (config.json, checkpoints/).
    out_dir: default <workdir>/report.
    checkpoint: "latest" (the newest train state's EMA model, on every
      dataset) or "best" (each dataset's best EMA model, on that dataset).
    studies: names from `STUDIES` to run as well.
    max_batches: evaluate at most this many batches per dataset and pass.
    real_data: whether the test sets are the real benchmarks (the paper
      column is shown); default: the config does not generate synthetic
      data (`synthetic_data.generate` off) and no converted dataset is
      marked synthetic (`tfds_builders.is_synthetic`; conversions made
      before that mark existed count as real).
    config: the run's config; default <workdir>/config.json.

  Single process: the whole test split runs on this host's first device.
  `write_report_from_samples` makes the same report from an evaluation
  already run (`python run.py eval` does that, multi-host too).
  """
  from fgtbt_jax import predictor
  from fgtbt_jax import train
  _check_request(checkpoint, studies)
  workdir = predictor.find_workdir(workdir)
  config = predictor.load_run_config(workdir) if config is None else config
  train.prepare_data(config)
  real_data = _real_data_default(config) if real_data is None else real_data
  groups = _restore_groups(config, workdir, checkpoint)
  device = _single_device(config)
  per_sample: dict[str, Samples] = {}
  for datasets, variables, _ in groups:
    per_sample.update(collect_predictions(config, device[3], variables, device[1],
                                          datasets=datasets, max_batches=max_batches,
                                          keep_images=1))
  results = _run_studies(config, groups, studies, device, per_sample, max_batches)
  steps = (groups[0][2] if checkpoint == "latest"
           else {datasets[0]: step for datasets, _, step in groups})
  return _finish(per_sample, out_dir, workdir, config, checkpoint, steps, real_data, results)


def write_report_from_samples(workdir: str | pathlib.Path, per_sample: Mapping[str, Samples], *,
                              config: ml_collections.ConfigDict, checkpoint: str, steps,
                              studies: Sequence[str] = (), max_batches: int | None = None,
                              real_data: bool | None = None,
                              out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """The report of an evaluation already run; returns report.md's path.

  Args:
    workdir: the training run's directory.
    per_sample: {dataset: Samples} of the whole test splits, e.g. filled by
      `train.evaluate_workdir(..., samples=per_sample)`.
    config: the run's config.
    checkpoint, steps: what was evaluated: "latest" and its step, or
      "best" and {dataset: step}.
    studies: names from `STUDIES`; they need more passes, which run here on
      this process's first device (single process only).
    max_batches, real_data, out_dir: as in `write_report`.
  """
  _check_request(checkpoint, studies)
  workdir = pathlib.Path(workdir).resolve()
  real_data = _real_data_default(config) if real_data is None else real_data
  results = {}
  if studies:
    if jax.process_count() > 1:
      raise ValueError("the report's studies run in a single process; "
                       f"{jax.process_count()} processes are running")
    groups = _restore_groups(config, workdir, checkpoint)
    results = _run_studies(config, groups, studies, _single_device(config), per_sample,
                           max_batches)
  return _finish(per_sample, out_dir, workdir, config, checkpoint, steps, real_data, results)
