"""Evaluation: one pass over a test split, its consumers, and the eval-only mode.

One generator, `predict_split`, runs the model over one dataset's eval split:
the eval pipeline gives this process's share of centre crops (with the
inverse crop transform and the ground truth in stored-crop pixels), the
batches become global arrays split over every device of the mesh, the one
device predict function (`inference.make_predict_fn`) gives points in input
pixels, and the dataset's own points are mapped back to stored-crop pixels.
`collect_split` gathers a pass from every process into per-image arrays
(`metrics.SplitPredictions`). Everything else consumes these:

* `Evaluator.evaluate`: the metric tables (NME with every normaliser the
  protocol defines, FR and AUC at `eval.failure_threshold`, per subset), the
  mean-shape baseline, and the per-image arrays for the report;
* the studies of `config.eval.studies` (`fgtbt_jax.studies`): the same pass
  with a transform of the inputs or other predict settings, so they run
  sharded and multi-process like the main pass;
* `evaluate_workdir`: `python run.py eval`, a run's checkpoints each
  restored once (EMA variables only), evaluated, its studies, the table and
  the report (`fgtbt_jax.report`, pure functions of the per-image arrays).

The mean-shape baseline predicts, for every image, the 124-point mean face
(`landmarks.mean_face()`) placed in the crop by the crop convention: the
dataset's own mean-face points scaled so that their bounding box's longer
side is the face box side (crop side / crop_enlarge), centred in the crop.
It needs no training and tells how much the model learned.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fgtbt_jax.data import pipeline
from fgtbt_jax.data import prepare
from fgtbt_jax import crop
from fgtbt_jax import errors
from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import metrics
from fgtbt_jax import models
from fgtbt_jax import report
from fgtbt_jax import rundir
from fgtbt_jax import sharding
from fgtbt_jax import studies as studies_lib
from fgtbt_jax import validation
from fgtbt_jax.inference import PredictSettings

# Per-image entries of a pass, as `predict_split` yields them per batch.
_PER_IMAGE = ("predictions", "confidence", "ground_truth", "box_size", "baseline",
              "signed_error", "valid")


def authors_ground_truth(ground_truth_input: np.ndarray, stride: float) -> np.ndarray:
  """Ground truth (input pixels) quantised as the FGTBT authors' evaluation does it.

  Their loader maps a point with their crop map T to heatmap coordinates
  (cell edges at integers: T(x) = (u + 0.5) / stride for input pixel u,
  pixel centres at integers) and keeps the integer cell trunc(T(x) + 1);
  their `get_transformer_coords` maps cell q back to the image as
  T^-1(q - 1). The project's heatmap coordinate of the same point is
  k = T(x) - 0.5, so the cell is trunc(k + 1.5), placed where the authors'
  heatmap-to-image map puts it (`inference.to_authors_heatmap`).
  """
  k = (np.asarray(ground_truth_input, np.float64) + 0.5) / stride - 0.5
  cell = inference.to_authors_heatmap(np.trunc(k + 1.5))
  return ((cell + 0.5) * stride - 0.5).astype(np.float32)


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


def predict_split(predict_fn: Callable, variables: Any, data_config: ml_collections.ConfigDict,
                  dataset: str, mesh: Mesh, *,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  max_batches: int | None = None, desc: str | None = None,
                  stride: float = 2.0, coordinates: str = "project") -> Iterator[dict]:
  """One pass over `dataset`'s eval split; yields this process's batches of results.

  Args:
    predict_fn: (variables, global uint8 crops) -> (points in input pixels,
      confidence), batch-sharded over `mesh` (`inference.compile_predict_fn`).
    variables: the model variables, placed on `mesh`.
    data_config: the `data` config.
    dataset: whose split (`data_config.eval_split`).
    mesh: the mesh the batches are split over.
    transform: applied to every batch of uint8 crops before the model.
    max_batches: stop after this many batches (every process stops at the same one).
    desc: a progress bar's label (process 0 only); None = no bar.
    stride: input pixels per heatmap cell (`FGTBT.heatmap_stride`).
    coordinates: the predict function's (`PredictSettings.coordinates`);
      "authors" quantises the ground truth as the authors' evaluation did.

  With `data.eval_pad_last_batch` False the last batch holds only its real
  faces (one process and one device; `validation` checks it).

  Yields:
    Per batch, this process's rows (padding rows included, `valid` False):
    "predictions", "confidence", "ground_truth", "box_size", "baseline",
    "signed_error" (prediction minus the exact ground truth in heatmap
    pixels, NaN where not annotated), "valid", "subset/<name>" and "image"
    (the crops the model saw).
  """
  protocol = landmarks.get_protocol(dataset)
  subset_names = pipeline.eval_subsets(dataset)
  baseline = mean_face_input_points(dataset, data_config.image_size, data_config.crop_enlarge)
  iterator = pipeline.make_eval_iterator(
      data_config, dataset, data_config.eval_split, process_index=jax.process_index(),
      process_count=jax.process_count())
  # "local_image" keeps this process's (transformed) crops on the host; "image"
  # becomes the global array the model sees.
  if not data_config.eval_pad_last_batch:
    iterator_rows = (_real_rows(batch) for batch in iterator)
  else:
    iterator_rows = iterator
  local = ({**batch, "local_image": image, "image": image} for batch in iterator_rows
           for image in [np.asarray(batch["image"]) if transform is None
                         else transform(np.asarray(batch["image"]))])
  batches = sharding.GlobalBatches(local, sharding.batch_sharding(mesh), ("image",))
  shown = desc is not None and jax.process_index() == 0
  total = None
  if shown:  # The bar's total, for its ETA: the split's batches (a cheap second opening).
    total = len(pipeline.eval_dataset(data_config, dataset, data_config.eval_split,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()))
    total = total if max_batches is None else min(total, max_batches)
  try:
    for index, batch in enumerate(errors.progress_bar(batches, total=total, desc=desc or "",
                                                      unit="batch", leave=False,
                                                      enabled=shown)):
      if max_batches is not None and index >= max_batches:
        break
      points, confidence = predict_fn(variables, batch["image"])
      points, confidence = sharding.local_rows(points), sharding.local_rows(confidence)
      index_own = protocol.unified_index
      inverse = batch["inverse_affine"]
      own = np.asarray(points[:, index_own], np.float64)
      ground_truth = np.asarray(batch["landmarks"])
      truth_input = crop.apply_affine(ground_truth.astype(np.float64),
                                      crop.invert_affine(inverse))
      if coordinates == "authors":
        ground_truth = crop.apply_affine(authors_ground_truth(truth_input, stride),
                                         inverse).astype(np.float32)
      yield {"predictions": crop.apply_affine(own, inverse).astype(np.float32),
             "confidence": confidence[:, index_own],
             "ground_truth": ground_truth,
             "signed_error": ((own - truth_input) / stride).astype(np.float32),
             "box_size": np.asarray(batch["box_size"]),
             "baseline": crop.apply_affine(np.broadcast_to(baseline, own.shape), inverse),
             "valid": np.asarray(batch["valid"], bool),
             "image": batch["local_image"],
             **{f"subset/{n}": np.asarray(batch[f"subset/{n}"], bool) for n in subset_names}}
  finally:
    getattr(iterator, "close", lambda: None)()


def hallucination_quality(model: nn.Module, variables: Any, data_config: ml_collections.ConfigDict,
                          datasets: Sequence[str], mesh: Mesh, rules,
                          transform: Callable[[np.ndarray], np.ndarray],
                          max_batches: int | None = None) -> dict[str, float]:
  """PSNR (dB) and SSIM of faces against their high-resolution crops, over `datasets`' splits.

  Each eval crop goes through `transform` (a degradation, e.g. the
  `lowres` study's); "input_psnr" / "input_ssim" compare the degraded crop
  itself with the original, and with a DHLN model (`model.hallucination`)
  "psnr" / "ssim" compare its hallucinated face (`models.hallucination`).
  Images in [0, 1]; means over every real image of every process; a mean
  that is not finite (the input left as it was: infinite PSNR) is None.
  """
  with_model = isinstance(model, models.FGTBT) and model.decoder.head.hallucination
  if with_model:
    apply = sharding.CompiledPerShape(jax.jit(
        lambda v, crops: model.apply(v, models.normalize_images(crops), train=False,
                                     method=models.FGTBT.named_outputs)["hallucination"],
        out_shardings=sharding.batch_sharding(mesh)), "hallucination", mesh, rules)
  rows: dict[str, list[np.ndarray]] = {}
  for dataset in datasets:
    iterator = pipeline.make_eval_iterator(
        data_config, dataset, data_config.eval_split, process_index=jax.process_index(),
        process_count=jax.process_count())
    local = ({**batch, "target": target, "image": transform(target)} for batch in iterator
             for target in [np.asarray(batch["image"])])
    batches = sharding.GlobalBatches(local, sharding.batch_sharding(mesh), ("image",))
    try:
      for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
          break
        valid = np.asarray(batch["valid"], bool)
        target = batch["target"][valid] / 255.0
        degraded = sharding.local_rows(batch["image"])[valid] / 255.0
        rows.setdefault("input_psnr", []).append(metrics.psnr(degraded, target))
        rows.setdefault("input_ssim", []).append(metrics.ssim(degraded, target))
        if with_model:
          faces = sharding.local_rows(apply(variables, batch["image"]))[valid]
          faces = np.clip(np.asarray(models.denormalize_images(faces)) / 255.0, 0.0, 1.0)
          rows.setdefault("psnr", []).append(metrics.psnr(faces, target))
          rows.setdefault("ssim", []).append(metrics.ssim(faces, target))
    finally:
      batches.close()
  means = {name: float(np.mean(sharding.gather_from_processes(np.concatenate(values))))
           for name, values in rows.items()}
  # An unchanged input has no finite PSNR: None (JSON null), shown as "same".
  return {name: value if np.isfinite(value) else None for name, value in means.items()}


def _real_rows(batch: Mapping[str, Any]) -> dict:
  """A padded eval batch cut to its real rows (they come first)."""
  count = int(np.asarray(batch["valid"], bool).sum())
  return {key: value[:count] for key, value in batch.items()}


def collect_split(batches: Iterable[dict], dataset: str,
                  keep_images: int = 0) -> metrics.SplitPredictions:
  """The per-image arrays of a pass (`predict_split`), gathered from every process.

  Padding rows are dropped. `keep_images` of this process's input crops
  are kept (not gathered). Raises ValueError on an empty split.
  """
  name = landmarks.get_protocol(dataset).name
  subset_names = pipeline.eval_subsets(name)
  parts: dict[str, list[np.ndarray]] = {}
  images: list[np.ndarray] = []
  for batch in batches:
    if sum(len(i) for i in images) < keep_images:
      images.append(batch["image"][batch["valid"]])
    for key in _PER_IMAGE + tuple(f"subset/{n}" for n in subset_names):
      parts.setdefault(key, []).append(np.asarray(batch[key]))
  if not parts:
    raise ValueError(f"{name}: the eval split gave no batches")
  merged = {k: sharding.gather_from_processes(np.concatenate(v)) for k, v in parts.items()}
  valid = merged["valid"].astype(bool)
  if not valid.any():
    raise ValueError(f"{name}: the eval split is empty")
  kept = (np.concatenate(images)[:keep_images] if images
          else np.zeros((0, 0, 0, 3), np.uint8))
  return metrics.SplitPredictions(
      dataset=name, predictions=merged["predictions"][valid],
      confidence=merged["confidence"][valid], ground_truth=merged["ground_truth"][valid],
      box_size=merged["box_size"][valid], baseline=merged["baseline"][valid],
      subsets={n: merged[f"subset/{n}"][valid].astype(bool) for n in subset_names},
      images=kept, signed_error=merged["signed_error"][valid])


# -- metric tables ---------------------------------------------------------------


def summarize_dataset(split: metrics.SplitPredictions, threshold: float,
                      with_baseline: bool = True, failure_normalizer: str = "") -> dict:
  """Metrics of one dataset: {"nme", "fr", "auc", "count"} with the default normaliser,
  "normalizers": {other normaliser: {...}}, "subsets": {name: {...}}, "bias":
  {"x", "y"} (mean signed error in heatmap pixels) and, with `with_baseline`,
  "baseline_nme" (the mean-shape baseline's NME).

  `failure_normalizer` ("" = the default) is the normaliser whose NME the
  full set's FR counts failures of (the authors': "inter_pupil").
  """
  protocol = landmarks.get_protocol(split.dataset)
  table = metrics.dataset_table(protocol, split.predictions, split.ground_truth, split.box_size,
                                split.subsets, threshold)
  default = protocol.default_normalizer
  result = dict(table["full"][default])
  if failure_normalizer and failure_normalizer != default:
    result["fr"] = table["full"][failure_normalizer]["fr"]
    result["fr_normalizer"] = failure_normalizer
  if split.signed_error is not None and np.isfinite(split.signed_error).any():
    mean = np.nanmean(split.signed_error.reshape(-1, 2), axis=0)
    result["bias"] = {"x": float(mean[0]), "y": float(mean[1])}
  result["normalizers"] = {name: value for name, value in table["full"].items()
                           if name != default}
  result["subsets"] = {subset: by_normalizer[default]
                       for subset, by_normalizer in table.items() if subset != "full"}
  if with_baseline:
    mask = np.isfinite(split.ground_truth).all(-1)
    result["baseline_nme"] = float(np.mean(metrics.nme(
        split.baseline, split.ground_truth, protocol, box_size=split.box_size, mask=mask)))
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
    for axis, value in r.get("bias", {}).items():
      flat[f"{dataset}/bias_{axis}"] = value
  return flat


def nme_by_dataset(results: Mapping[str, Mapping[str, Any]],
                   best_on_subsets: Sequence[str] = ()) -> dict[str, float]:
  """{dataset: NME} that picks the best checkpoints: the full split's, or for a
  "DATASET:subset" entry of `best_on_subsets` that subset's (the authors chose
  their 300W model on the challenging IBUG subset)."""
  nmes = {dataset: r["nme"] for dataset, r in results.items()}
  for entry in best_on_subsets:
    dataset, _, subset = entry.partition(":")
    if dataset in results:
      nmes[dataset] = results[dataset]["subsets"][subset]["nme"]
  return nmes


def final_table(results: Mapping[str, Mapping[str, Any]]) -> dict:
  """{dataset: {"nme", "baseline_nme", "fr", "auc"}} as written to final_metrics.json."""
  return {dataset: {key: r[key] for key in ("nme", "baseline_nme", "fr", "auc")}
          for dataset, r in results.items()}


def format_table(final: Mapping[str, Any], threshold: float,
                 synthetic: Iterable[str] = (), kinds: Mapping[str, str] | None = None) -> str:
  """The per-protocol NME table printed at the end of a run (NME in %).

  The "data" column says what each row's data is: `kinds[dataset]`
  ("synthetic", "benchmark", "own folder": `prepare.data_kinds`), else
  "synthetic" for the datasets in `synthetic` and "benchmark" for the rest.
  Rows: the benchmarks in protocol order, then a user's own datasets.
  """
  synthetic, kinds = set(synthetic), dict(kinds or {})
  lines = [f"{'protocol':<8} {'NME %':>8} {'baseline %':>11} {f'FR@{threshold:g} %':>9} "
           f"{f'AUC@{threshold:g}':>8}  data"]
  own = [d for d, r in final.items() if d not in landmarks.PROTOCOL_NAMES
         and isinstance(r, Mapping) and "nme" in r]
  for dataset in [*landmarks.PROTOCOL_NAMES, *own]:
    if dataset in final:
      r = final[dataset]
      kind = kinds.get(dataset, "synthetic" if dataset in synthetic else "benchmark")
      lines.append(f"{dataset:<8} {100 * r['nme']:>8.2f} {100 * r['baseline_nme']:>11.2f} "
                   f"{100 * r['fr']:>9.2f} {r['auc']:>8.4f}  {kind}")
  return "\n".join(lines)


def print_outputs(workdir: pathlib.Path, final: Mapping[str, Any], title: str,
                  next_after: str | None = "auto") -> None:
  """Prints `title`, the final table (`format_table`), the workdir's outputs and
  the commands to run next (`rundir.next_commands` after mode `next_after`:
  "train", "eval", or None for none; "auto" is "train" for a training run's
  final metrics, which hold its "wall_time_s", else None: the eval command
  prints its own outputs after the table, then the next commands)."""
  print(f"\n{title}")
  print(format_table(final, final["failure_threshold"], final["synthetic"],
                     final.get("data")))
  print(f"\noutputs in {workdir}:")
  for name, what in (("config.json", "the run's config in full"),
                     ("final_metrics.json", "final metrics (NME as a fraction)"),
                     ("eval_metrics.jsonl", "every evaluation, all subsets and normalisers"),
                     ("train_metrics.jsonl", "training losses"),
                     ("tensorboard", "TensorBoard events"),
                     ("checkpoints", "latest train states and best EMA models per dataset")):
    if (workdir / name).exists():
      print(f"  {name:<20} {what}")
  if next_after == "auto":
    next_after = "train" if "wall_time_s" in final else None
  if next_after is not None:
    print(f"\n{rundir.next_commands(workdir, next_after)}", flush=True)


def log_results(step: int, results: Mapping[str, Any]) -> None:
  logging.info("eval step %d: %s", step, "  ".join(
      f"{d} NME {100 * r['nme']:.2f}% (baseline {100 * r['baseline_nme']:.2f}%) "
      f"FR {100 * r['fr']:.1f}%" for d, r in results.items()))


# -- the evaluator -------------------------------------------------------------------


class Evaluator:
  """Evaluates models of a run on the test splits; sharded over a mesh, multi-process.

  Args:
    config: the experiment config (reads `data`, `eval`, `loss`).
    model: the network.
    mesh, rules: the device mesh and logical axis rules.
    settings: the main pass's predict settings; default the config's `eval`.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh, rules,
               settings: PredictSettings | None = None):
    self.config = config
    self.model = model
    self.mesh = mesh
    self.rules = rules
    self.settings = PredictSettings.from_config(config.eval) if settings is None else settings
    self.threshold = float(config.eval.failure_threshold)
    self.failure_normalizer = str(config.eval.failure_normalizer)
    self._predict_fns: dict[PredictSettings, Callable] = {}
    self._baseline: dict[str, float] = {}

  def predict_fn(self, settings: PredictSettings | None = None) -> Callable:
    """The compiled predict function of `settings` (default the main pass's), made once."""
    settings = self.settings if settings is None else settings
    if settings not in self._predict_fns:
      self._predict_fns[settings] = inference.compile_predict_fn(
          self.model, self.mesh, self.rules, settings)
    return self._predict_fns[settings]

  def run(self, variables: Any, datasets: Sequence[str], *,
          settings: PredictSettings | None = None,
          transform: Callable[[np.ndarray], np.ndarray] | None = None,
          max_batches: int | None = None, keep_images: int = 0,
          label: str = "eval") -> dict[str, metrics.SplitPredictions]:
    """One pass over each dataset's split: {dataset: metrics.SplitPredictions}."""
    predict_fn = self.predict_fn(settings)
    coordinates = (self.settings if settings is None else settings).coordinates
    return {landmarks.get_protocol(d).name: collect_split(
        predict_split(predict_fn, variables, self.config.data, d, self.mesh,
                      transform=transform, max_batches=max_batches, desc=f"{label} {d}",
                      stride=self.model.heatmap_stride, coordinates=coordinates),
        d, keep_images=keep_images)
        for d in datasets}

  def evaluate(self, variables: Any, step: int, datasets: Sequence[str] | None = None,
               keep_images: int = 0) -> tuple[dict, dict[str, metrics.SplitPredictions]]:
    """(results {dataset: summary}, per-image arrays {dataset: metrics.SplitPredictions}).

    Summaries as `summarize_dataset`; the baseline NME is computed once per
    dataset and reused. `datasets` None: the configured ones but unlabeled
    folders (`prepare.evaluated_datasets`: they have nothing to evaluate).
    """
    per_image = self.run(variables, datasets or prepare.evaluated_datasets(self.config.data),
                         keep_images=keep_images, label=f"eval @ {step}")
    results = {}
    for name, split in per_image.items():
      result = summarize_dataset(split, self.threshold, with_baseline=name not in self._baseline,
                                 failure_normalizer=self.failure_normalizer)
      self._baseline.setdefault(name, result.get("baseline_nme"))
      result["baseline_nme"] = self._baseline[name]
      results[name] = result
    return results, per_image

  def run_studies(self, names: Sequence[str], variables: Any, datasets: Sequence[str],
                  measured: dict[str, dict[Any, dict[str, float]]],
                  max_batches: int | None = None) -> None:
    """Runs the passes of studies `names` for `datasets`; adds their NMEs to `measured`.

    `measured[study][pass key][dataset]` = NME; `studies.study_table` turns
    it into the report's table once every model's datasets are in.
    """
    for name in names:
      for study_pass in studies_lib.study_passes(name, self.config, self.settings):
        passes = self.run(variables, datasets, settings=study_pass.settings,
                          transform=study_pass.transform, max_batches=max_batches,
                          label=f"{name} {study_pass.key}")
        measured.setdefault(name, {}).setdefault(study_pass.key, {}).update(
            {d: split.nme() for d, split in passes.items()})
        if name == "lowres":  # The faces' quality: the input's, and DHLN's hallucinated.
          measured.setdefault(studies_lib.HALLUCINATION_TABLE, {})[study_pass.key] = (
              hallucination_quality(self.model, variables, self.config.data, datasets,
                                    self.mesh, self.rules, study_pass.transform, max_batches))


# -- the eval-only mode ------------------------------------------------------------------


@dataclasses.dataclass
class WorkdirEvaluation:
  """What `evaluate_workdir` did.

  Attributes:
    final: {dataset: {"nme", "baseline_nme", "fr", "auc"}}, "steps" (the
      step evaluated, or {dataset: step} for "best"), "synthetic" (datasets
      evaluated on synthetic stand-ins) and "failure_threshold"; as written
      to <out_dir>/eval_<checkpoint>.json.
    report: report.md's path (process 0, when a report was asked for).
    per_image: {dataset: SplitPredictions} of the main pass (every
      process's images, on every process).
  """

  final: dict
  report: pathlib.Path | None
  per_image: dict[str, metrics.SplitPredictions]


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                     checkpoint: str = "latest", *, write_report: bool = True,
                     out_dir: str | pathlib.Path | None = None,
                     on_results: Callable[[dict], None] | None = None) -> WorkdirEvaluation:
  """`python run.py eval`: evaluates a run's EMA model(s) and writes the report.

  Args:
    config: the run's config (its saved config.json with any overrides).
    workdir: the run's directory; only read (an archived, shared or
      read-only run evaluates as well).
    checkpoint: "latest" (the newest train state's EMA model, on every
      dataset) or "best" (each dataset's best EMA model, on that dataset).
    write_report: write <out_dir>/report: tables per subset and
      normaliser, CED curves, error by C(p), high-frequency images and the
      studies of `config.eval.studies`.
    out_dir: where `eval_<checkpoint>.json` and report/ go (default the
      workdir).
    on_results: called with the final table (as `WorkdirEvaluation.final`)
      before anything is written, e.g. to print it.

  Each checkpoint is read once (EMA variables only), every pass (the main
  one and the studies') runs sharded over all devices of all processes,
  and process 0 writes the files.

  Raises:
    OutputError: an output could not be written (a read-only workdir, a
      full disk), naming it; `on_results` has seen the metrics by then.
  """
  rundir.check_kind(checkpoint)
  sharding.initialize_distributed(config.distributed)
  validation.validate_config(config)
  workdir = rundir.find_workdir(workdir)
  prepare.prepare_data(config.data, config.synthetic_data, splits=(config.data.eval_split,))
  synthetic = prepare.synthetic_datasets(config.data)
  kinds = prepare.data_kinds(config.data)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh.logical_axis_rules)
  # Unlabeled folders have no test split and no best checkpoint.
  restored = inference.restore_models(config, workdir, checkpoint, mesh, rules,
                                      datasets=prepare.evaluated_datasets(config.data))
  evaluator = Evaluator(config, models.build_model(config.model), mesh, rules)
  study_names = studies_lib.check_studies(config.eval.studies)
  max_batches = int(config.eval.study_max_batches) or None
  results, per_image, measured = {}, {}, {}
  for model in restored:
    model_results, model_images = evaluator.evaluate(
        model.variables, model.step, model.datasets, keep_images=1 if write_report else 0)
    log_results(model.step, model_results)
    results.update(model_results)
    per_image.update(model_images)
    if write_report:
      evaluator.run_studies(study_names, model.variables, model.datasets, measured, max_batches)
  final = final_table(results)
  final["steps"] = (restored[0].step if checkpoint == "latest"
                    else {m.datasets[0]: m.step for m in restored})
  final["synthetic"] = sorted(synthetic)
  final["data"] = kinds
  final["failure_threshold"] = evaluator.threshold
  path = None
  if on_results is not None:
    on_results(final)
  out_dir = workdir if out_dir is None else pathlib.Path(out_dir)
  if jax.process_index() == 0:
    try:
      out_dir.mkdir(parents=True, exist_ok=True)
      (out_dir / f"eval_{checkpoint}.json").write_text(json.dumps(final, indent=2) + "\n")
      if write_report:
        main_nmes = {d: r["nme"] for d, r in results.items()}
        tables = {name: studies_lib.study_table(name, config, evaluator.settings,
                                                measured[name], main_nmes)
                  for name in study_names}
        if studies_lib.HALLUCINATION_TABLE in measured:
          tables[studies_lib.HALLUCINATION_TABLE] = measured[studies_lib.HALLUCINATION_TABLE]
        path = report.write_report(
            per_image, out_dir / "report",
            title=_report_title(workdir, checkpoint, final["steps"], evaluator.settings),
            synthetic=synthetic, threshold=evaluator.threshold, studies=tables,
            frequency=((config.model.frequency_extractor, float(config.model.frequency_sigma))
                       if config.model.fgsa else None),
            face_side_px=config.data.image_size / config.data.crop_enlarge,
            failure_normalizer=evaluator.failure_normalizer)
    except OSError as e:
      raise errors.OutputError(
          f"{e.filename or out_dir}: cannot write the evaluation ({e.strerror or e}); "
          "the metrics were computed: pass --out=DIR to write them elsewhere") from None
  sharding.barrier("evaluate_workdir done")
  return WorkdirEvaluation(final=final, report=path, per_image=per_image)


def _report_title(workdir: pathlib.Path, checkpoint: str, steps, settings: PredictSettings) -> str:
  if checkpoint == "latest":
    which = f"latest checkpoint (step {steps})"
  else:
    which = ("best checkpoint per dataset, chosen on its test split (" + ", ".join(
        f"{name} step {step}" for name, step in steps.items()) + ")")
  return f"FGTBT evaluation report: {workdir.name}, {which}, {settings.describe()}"
