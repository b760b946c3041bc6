"""Evaluation of the (EMA) model on every dataset's test split.

For each dataset in the config, the eval pipeline gives centre crops with the
inverse crop transform and the ground truth in stored-crop pixels. The
predictor runs the model on the crop (and, with the flip test, on its mirror,
merging the two heatmap sets with the unified flip permutation), decodes the
124 heatmaps (argmax / quarter / subpixel), maps heatmap pixels to input
pixels and then to stored-crop pixels, and keeps the dataset's own points.
NME uses each protocol's default normaliser, plus its alternatives (COFW
inter-ocular, 300W inter-pupil); failure rate and AUC at 0.1; all of it per
evaluation subset too (WFLW attributes, 300W common/challenging, AFLW
frontal).

The mean-shape baseline predicts, for every image, the 124-point mean face
(`landmarks.mean_face()`) placed in the crop by the crop convention: the
dataset's own mean-face points scaled so that their bounding box's longer
side is the face box side (crop side / crop_enlarge), centred in the crop.
It needs no training and tells how much the model learned.

Results are appended to `<workdir>/eval_metrics.jsonl`, written as
TensorBoard scalars (tensorboardX) and summarised in one console line.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tensorboardX
import tqdm
from jax.sharding import Mesh

from data_pipelines import pipeline
from fgtbt_jax import crop
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import metrics
from fgtbt_jax import models
from fgtbt_jax import sharding

DECODERS = heatmaps.DECODERS


def make_predict_fn(model: nn.Module, mesh: Mesh, rules, *, decoder: str, flip_test: bool,
                    smoothing_sigma: float = 0.0) -> Callable:
  """A jitted (variables, uint8 images) -> (B, 124, 2) input-pixel predictions.

  The batch is split over every device; predictions come back sharded the
  same way.
  """
  if decoder not in DECODERS:
    raise ValueError(f"eval.decoder: unknown decoder {decoder!r}; expected one of {DECODERS}")
  flip_permutation = landmarks.UNIFIED_FLIP_PERMUTATION

  def predict(variables, images):
    inputs = models.normalize_images(images)
    maps = model.apply(variables, inputs, train=False)
    if flip_test:
      mirrored = model.apply(variables, inputs[:, :, ::-1, :], train=False)
      maps = heatmaps.merge_flipped(maps, mirrored, flip_permutation)
    coords, _ = heatmaps.decode(maps, decoder, smoothing_sigma=smoothing_sigma)
    stride = images.shape[1] / maps.shape[1]
    return heatmaps.heatmap_to_input(coords, stride)

  jitted = jax.jit(predict, out_shardings=sharding.batch_sharding(mesh))
  return sharding.CompiledOnFirstCall(jitted, "predict", mesh, rules)


def mean_face_input_points(dataset: str, image_size: int, crop_enlarge: float) -> np.ndarray:
  """(N, 2) mean-shape baseline of a dataset in network-input pixels.

  The crop convention puts the face box centre at the crop centre
  (S - 1) / 2 with the box's longer side S / crop_enlarge; the dataset's own
  mean-face points are scaled to that side and centred there.
  """
  protocol = landmarks.get_protocol(dataset)
  points = landmarks.mean_face()[protocol.unified_index].astype(np.float64)
  low, high = points.min(0), points.max(0)
  side = image_size / crop_enlarge
  scale = side / float((high - low).max())
  centre = (image_size - 1) / 2.0
  return ((points - (low + high) / 2.0) * scale + centre).astype(np.float32)


def _summary(nmes: np.ndarray, threshold: float) -> dict[str, float]:
  return {"nme": float(np.mean(nmes)),
          "fr": metrics.failure_rate(nmes, threshold),
          "auc": metrics.auc(nmes, threshold),
          "count": int(nmes.size)}


def summarize_dataset(dataset: str, predictions: np.ndarray, ground_truth: np.ndarray,
                      box_size: np.ndarray, subsets: Mapping[str, np.ndarray],
                      baseline: np.ndarray | None = None, threshold: float = 0.1) -> dict:
  """Metrics of one dataset from own-order predictions and ground truth (valid rows).

  Returns {"nme", "fr", "auc", "count"} with the default normaliser, plus
  "normalizers": {name: {...}} for the protocol's other normalisers,
  "subsets": {name: {...}} and, with `baseline` predictions, "baseline_nme".
  Points that are not finite in the ground truth are left out.
  """
  protocol = landmarks.get_protocol(dataset)
  mask = np.isfinite(ground_truth).all(-1)
  default = metrics.nme(predictions, ground_truth, protocol, box_size=box_size, mask=mask)
  result = _summary(default, threshold)
  result["normalizers"] = {}
  for name in protocol.normalizers:
    if name != protocol.default_normalizer:
      values = metrics.nme(predictions, ground_truth, protocol, normalizer=name,
                           box_size=box_size, mask=mask)
      result["normalizers"][name] = _summary(values, threshold)
  result["subsets"] = {name: _summary(default[flags], threshold)
                       for name, flags in subsets.items() if flags.any()}
  if baseline is not None:
    base = metrics.nme(baseline, ground_truth, protocol, box_size=box_size, mask=mask)
    result["baseline_nme"] = float(np.mean(base))
  return result


def flatten(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """{"WFLW/nme": ..., "WFLW/subset/pose/nme": ..., "COFW/inter_ocular/nme": ...}."""
  flat = {}
  for dataset, r in results.items():
    for key in ("nme", "fr", "auc", "count", "baseline_nme"):
      if key in r:
        flat[f"{dataset}/{key}"] = r[key]
    for name, s in r.get("normalizers", {}).items():
      for key, value in s.items():
        flat[f"{dataset}/{name}/{key}"] = value
    for name, s in r.get("subsets", {}).items():
      for key, value in s.items():
        flat[f"{dataset}/subset/{name}/{key}"] = value
  return flat


def nme_by_dataset(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  return {dataset: r["nme"] for dataset, r in results.items()}


def final_table(results: Mapping[str, Mapping[str, Any]]) -> dict:
  """{dataset: {"nme", "baseline_nme", "fr", "auc"}} as written to final_metrics.json."""
  return {dataset: {key: r[key] for key in ("nme", "baseline_nme", "fr", "auc")}
          for dataset, r in results.items()}


def format_table(final: Mapping[str, Any]) -> str:
  """The per-protocol NME table printed at the end of a run (NME in %)."""
  lines = [f"{'protocol':<8} {'NME %':>8} {'baseline %':>11} {'FR@0.1 %':>9} {'AUC@0.1':>8}"]
  for dataset in landmarks.PROTOCOL_NAMES:
    if dataset in final:
      r = final[dataset]
      lines.append(f"{dataset:<8} {100 * r['nme']:>8.2f} {100 * r['baseline_nme']:>11.2f} "
                   f"{100 * r['fr']:>9.2f} {r['auc']:>8.4f}")
  return "\n".join(lines)


class Evaluator:
  """Runs evaluations of a run and records them (JSON lines, TensorBoard, console).

  Args:
    config: the experiment config (reads `data`, `eval`).
    model: the network.
    mesh, rules: the device mesh and logical axis rules.
    workdir: where eval_metrics.jsonl, train_metrics.jsonl and tensorboard/ go.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh,
               rules, workdir: str | pathlib.Path):
    self.config = config
    self.mesh = mesh
    self.workdir = pathlib.Path(workdir)
    self.predict = make_predict_fn(model, mesh, rules, decoder=config.eval.decoder,
                                   flip_test=config.eval.flip_test,
                                   smoothing_sigma=config.eval.smoothing_sigma)
    self._is_main = jax.process_index() == 0
    self._writer = (tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"))
                    if self._is_main else None)
    self._baseline: dict[str, float] = {}

  def log_train(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records training scalars (TensorBoard and train_metrics.jsonl)."""
    if not self._is_main:
      return
    for key, value in scalars.items():
      self._writer.add_scalar(f"train/{key}", value, step)
    with open(self.workdir / "train_metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")

  def evaluate(self, variables: Any, step: int, datasets=None,
               samples: dict | None = None) -> dict:
    """Evaluates `variables` on each dataset's eval split; records and returns results.

    With a `samples` dict, also stores there per dataset the per-image
    arrays of the whole split, gathered from every process, as
    `report.collect_predictions` returns them ("predictions",
    "ground_truth", "box_size", "subsets", and "images": this process's
    first input image), so a report needs no second pass.
    """
    data = self.config.data
    batches = sharding.batch_sharding(self.mesh)
    results = {}
    for dataset in (datasets or data.datasets):
      iterator = pipeline.make_eval_iterator(
          data, dataset, data.eval_split, process_index=jax.process_index(),
          process_count=jax.process_count())
      baseline_points = mean_face_input_points(dataset, data.image_size, data.crop_enlarge)
      collected: dict[str, list[np.ndarray]] = {}
      first_images = None
      subset_names = pipeline.eval_subsets(dataset)
      for batch in tqdm.tqdm(iterator, desc=f"eval {dataset} @ {step}", leave=False,
                             disable=not self._is_main):
        if first_images is None:
          first_images = np.asarray(batch["image"])[np.asarray(batch["valid"], bool)][:1]
        images = jax.make_array_from_process_local_data(batches, batch["image"])
        unified = sharding.local_rows(self.predict(variables, images))
        own = unified[:, landmarks.get_protocol(dataset).unified_index]
        parts = {
            "pred": crop.apply_affine(own, batch["inverse_affine"]),
            "base": crop.apply_affine(np.broadcast_to(baseline_points, own.shape),
                                      batch["inverse_affine"]),
            "gt": batch["landmarks"], "box": batch["box_size"], "valid": batch["valid"],
            **{f"subset/{n}": batch[f"subset/{n}"] for n in subset_names}}
        for key, value in parts.items():
          collected.setdefault(key, []).append(np.asarray(value))
      getattr(iterator, "close", lambda: None)()
      merged = {k: sharding.gather_from_processes(np.concatenate(v))
                for k, v in collected.items()}
      valid = merged["valid"].astype(bool)
      if not valid.any():
        raise ValueError(f"{dataset} {data.eval_split}: the eval split is empty")
      with_baseline = dataset not in self._baseline
      result = summarize_dataset(
          dataset, merged["pred"][valid], merged["gt"][valid], merged["box"][valid],
          {n: merged[f"subset/{n}"][valid].astype(bool) for n in subset_names},
          baseline=merged["base"][valid] if with_baseline else None,
          threshold=self.config.eval.failure_threshold)
      if with_baseline:
        self._baseline[dataset] = result["baseline_nme"]
      result["baseline_nme"] = self._baseline[dataset]
      results[dataset] = result
      if samples is not None:
        samples[landmarks.get_protocol(dataset).name] = {
            "predictions": merged["pred"][valid], "ground_truth": merged["gt"][valid],
            "box_size": merged["box"][valid],
            "subsets": {n: merged[f"subset/{n}"][valid].astype(bool) for n in subset_names},
            "images": first_images}
    self._record(step, results)
    return results

  def _record(self, step: int, results: Mapping[str, Any]) -> None:
    if not self._is_main:
      return
    flat = flatten(results)
    for key, value in flat.items():
      self._writer.add_scalar(f"eval/{key}", value, step)
    self._writer.flush()
    with open(self.workdir / "eval_metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": step, **flat}) + "\n")
    logging.info("eval step %d: %s", step, "  ".join(
        f"{d} NME {100 * r['nme']:.2f}% (baseline {100 * r['baseline_nme']:.2f}%) "
        f"FR {100 * r['fr']:.1f}%" for d, r in results.items()))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
