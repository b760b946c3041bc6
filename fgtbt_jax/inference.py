"""The one inference core: the device predict function and the EMA-model restore.

Every path that turns a model into landmarks (the training-time Evaluator,
`run.py eval` and its studies, `Predictor`, `run.py predict` and the
`jax.export` artifact) runs `make_predict_fn`:

    uint8 crops (B, S, S, 3) -> ImageNet normalisation -> model (the head's named outputs)
      [-> the model on the mirrored crops, the maps the decoder reads merged
         with the unified flip permutation]                  (flip_test)
      -> decode (argmax / quarter / subpixel, optional blur; hih /
         hih_subpixel for the HIH head)                      (decoder, smoothing_sigma)
      -> points (B, 124, 2) in crop input pixels, confidence (B, 124) heatmap peaks

with one `PredictSettings` saying how. A run's settings are its config's
`eval` section (`PredictSettings.from_config`), so a run is predicted the
way it was evaluated unless a caller overrides a field explicitly.

`restore_models` reads a run's EMA models for inference (the newest train
state's, or each dataset's best), built from the model config alone: the
abstract target is `jax.eval_shape` of the model's initialiser, and only the
EMA entries of a train state are read (`Checkpointer.restore_ema`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from fgtbt_jax import checkpointing
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import models
from fgtbt_jax import rundir
from fgtbt_jax import sharding
from fgtbt_jax.models import partitioning

OUTPUTS: tuple[str, ...] = ("landmarks", "heatmaps")
COORDINATES: tuple[str, ...] = ("project", "authors")
# The authors' heatmap-to-image map puts cell k at c + (k - 121) h / 240, the
# project's at c + (k - 119.5) h / 240 (h / 240 input pixels per cell).
AUTHORS_HEATMAP_SHIFT = -1.5


def to_authors_heatmap(coords):
  """Project heatmap coordinates as the authors' mapping places the same cells."""
  return coords + AUTHORS_HEATMAP_SHIFT


@dataclasses.dataclass(frozen=True)
class PredictSettings:
  """How heatmaps become landmarks.

  Attributes:
    decoder: a name of `heatmaps.ALL_DECODERS` (those of `heatmaps.HIH_DECODERS`
      need the "hih" head's decimal maps).
    flip_test: also run the mirrored crops and average the heatmaps with
      theirs, flipped back with the unified flip permutation (the paper's test).
    smoothing_sigma: Gaussian blur (heatmap pixels) before the sub-pixel fit;
      0 = off. Only for the "subpixel" decoder.
    coordinates: "project" (heatmap cell k is centred on input pixel
      (k + 0.5) * stride - 0.5) or "authors" (the FGTBT authors' mapping,
      c + (k - 121) h / 240: 1.5 cells up and left of it), which their
      released weights were trained and measured with (`COORDINATES`).
  """

  decoder: str = "subpixel"
  flip_test: bool = True
  smoothing_sigma: float = 0.0
  coordinates: str = "project"

  def __post_init__(self):
    if self.decoder not in heatmaps.ALL_DECODERS:
      raise ValueError(f"decoder {self.decoder!r}: expected one of {heatmaps.ALL_DECODERS}")
    if not self.smoothing_sigma >= 0:
      raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")
    if self.coordinates not in COORDINATES:
      raise ValueError(f"coordinates {self.coordinates!r}: expected one of {COORDINATES}")
    if self.smoothing_sigma and self.decoder != "subpixel":
      raise ValueError(f"smoothing_sigma ({self.smoothing_sigma:g}) applies to the 'subpixel' "
                       f"decoder only, not {self.decoder!r}")

  @classmethod
  def from_config(cls, eval_config: ml_collections.ConfigDict) -> "PredictSettings":
    """A run's settings: its `config.eval` (with any `--config.eval.*` overrides applied)."""
    return cls(decoder=eval_config.decoder, flip_test=bool(eval_config.flip_test),
               smoothing_sigma=float(eval_config.smoothing_sigma),
               coordinates=str(eval_config.coordinates))

  def replace(self, **changes) -> "PredictSettings":
    """These settings with `changes`; another decoder than "subpixel" drops the smoothing."""
    if "decoder" in changes and changes["decoder"] != "subpixel":
      changes.setdefault("smoothing_sigma", 0.0)
    return dataclasses.replace(self, **changes)

  def describe(self) -> str:
    smoothing = f", smoothing {self.smoothing_sigma:g}" if self.smoothing_sigma else ""
    coordinates = ", the authors' coordinates" if self.coordinates == "authors" else ""
    return (f"decoder {self.decoder}, flip test {'on' if self.flip_test else 'off'}"
            f"{smoothing}{coordinates}")


def model_apply(model: nn.Module) -> Callable[[Any, jax.Array], Any]:
  """(variables, normalised images) -> the model's eval-mode outputs.

  An FGTBT gives its head's named outputs (`FGTBT.named_outputs`); any other
  module (e.g. a caller's own `Predictor(model=...)`) is called plainly and
  its output taken as the heatmaps.
  """
  if isinstance(model, models.FGTBT):
    return lambda variables, images: model.apply(variables, images, train=False,
                                                 method=models.FGTBT.named_outputs)
  return lambda variables, images: model.apply(variables, images, train=False)


def make_predict_fn(apply_fn: Callable[[Any, jax.Array], jax.Array], settings: PredictSettings,
                    output: str = "landmarks") -> Callable:
  """The device side of prediction: (variables, uint8 crops (B, S, S, 3)) -> outputs.

  Args:
    apply_fn: (variables, normalised images (B, S, S, 3)) -> the named
      outputs of a head ({"heatmaps": (B, S / stride, S / stride, 124), ...},
      e.g. `model_apply(model)`), or the heatmaps array alone.
    settings: decoder, flip test and smoothing.
    output: "landmarks" -> (points (B, 124, 2) in crop input pixels, pixel
      centres at integers; confidence (B, 124) heatmap peaks); "heatmaps" ->
      the (flip-merged) heatmaps.

  Returns:
    A pure function; jit it (`compile_predict_fn` for a mesh).
  """
  if output not in OUTPUTS:
    raise ValueError(f"unknown inference output {output!r}; expected one of {OUTPUTS}")
  flip_permutation = landmarks.UNIFIED_FLIP_PERMUTATION

  # The outputs the decoder reads; flip-merged alike (HIH's decimal map of
  # the mirrored crop is the mirrored decimal map: the offset changes sign).
  used = ("heatmaps",) if output == "heatmaps" else heatmaps.decoder_inputs(settings.decoder)

  def named(outputs):
    outputs = outputs if isinstance(outputs, dict) else {"heatmaps": outputs}
    return {name: outputs[name] for name in used if name in outputs}

  def predict(variables, crops):
    images = models.normalize_images(crops)
    maps = named(apply_fn(variables, images))
    if settings.flip_test:
      # Two forwards rather than one on a 2B batch: the mirrored half would
      # otherwise have to move between devices of a batch-sharded input.
      mirrored = named(apply_fn(variables, images[:, :, ::-1, :]))
      maps = {name: heatmaps.merge_flipped(maps[name], mirrored[name], flip_permutation)
              for name in maps}
    if output == "heatmaps":
      return maps["heatmaps"]
    coords, confidence = heatmaps.decode_outputs(maps, settings.decoder,
                                                 smoothing_sigma=settings.smoothing_sigma)
    if settings.coordinates == "authors":
      coords = to_authors_heatmap(coords)
    stride = crops.shape[1] / maps["heatmaps"].shape[1]
    return heatmaps.heatmap_to_input(coords, stride), confidence

  return predict


def compile_predict_fn(model: nn.Module, mesh: Mesh, rules, settings: PredictSettings,
                       output: str = "landmarks") -> Callable:
  """`make_predict_fn` jitted for batches split over every device of `mesh`.

  Outputs come back sharded like the batch; a program compiles on the
  first call with each batch shape (then all processes meet at a barrier,
  see `sharding.CompiledPerShape`): an unpadded evaluation compiles its
  full batch and its shorter last batch.
  """
  jitted = jax.jit(make_predict_fn(model_apply(model), settings, output),
                   out_shardings=sharding.batch_sharding(mesh))
  return sharding.CompiledPerShape(jitted, f"predict {settings.describe()}", mesh, rules)


# -- restoring a run's EMA models ---------------------------------------------------


def abstract_variables(model_config: ml_collections.ConfigDict, image_size: int, mesh: Mesh,
                       rules) -> dict:
  """{"params", "batch_stats"} as `jax.ShapeDtypeStruct`s with shardings over `mesh`.

  From the model alone: `jax.eval_shape` of its initialiser, sharded by the
  logical axis rules (the same shardings the train state's EMA copy has).
  """
  model = models.build_model(model_config)
  with sharding.mesh_and_rules(mesh, rules):
    boxed = models.abstract_variables(model, int(image_size))
  boxed = {"params": boxed["params"], "batch_stats": boxed.get("batch_stats", {})}
  shardings = partitioning.variable_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


@dataclasses.dataclass
class RestoredModel:
  """EMA variables of a run and what they are for.

  Attributes:
    datasets: the datasets this model is evaluated on: all of the run's for
      the latest checkpoint, one for a dataset's best.
    variables: {"params", "batch_stats"} placed on the mesh restored into.
    step: the training step they come from.
    kind: "latest" or "best".
  """

  datasets: list[str]
  variables: Any
  step: int
  kind: str


def restore_models(config: ml_collections.ConfigDict, workdir: str | os.PathLike, kind: str,
                   mesh: Mesh, rules, datasets: Sequence[str] | None = None
                   ) -> list[RestoredModel]:
  """A run's EMA models for inference, each checkpoint read once.

  Args:
    config: the run's config (reads `model`, `data`, `train`).
    workdir: the run's directory.
    kind: "latest" (one model: the newest train state's EMA variables, for
      every dataset) or "best" (each dataset's best EMA model).
    mesh, rules: where the variables go (`sharding.single_device_mesh()` for
      one device).
    datasets: default the run's `data.datasets`; for "best", whose.

  Raises:
    WorkdirError: a checkpoint asked for is not there.
    IncompatibleCheckpointError: it does not fit the configured model.
  """
  rundir.check_kind(kind)
  # A user's own dataset is named as the run's config names it (its scheme
  # need not be registered to restore the model).
  names = [landmarks.get_protocol(d).name if landmarks.is_benchmark(d) else str(d)
           for d in (datasets or config.data.datasets)]
  foreign = [n for n in names if n not in config.data.datasets]
  if foreign:
    raise rundir.WorkdirError(
        f"the run in {workdir} trained on {list(config.data.datasets)}; it has no model "
        f"for {foreign}")
  checkpoints = checkpointing.Checkpointer.for_run(config, workdir, enable_async=False)
  try:
    # Fail on a missing checkpoint before building anything.
    if kind == "latest" and checkpoints.latest_step() is None:
      raise rundir.WorkdirError(
          f"no train-state checkpoint under {checkpoints.directory / 'latest'}")
    for name in names if kind == "best" else ():
      if checkpoints.best_step(name) is None:
        raise rundir.WorkdirError(
            f"no best checkpoint for {name} under {checkpoints.directory / ('best_' + name)}")
    abstract = abstract_variables(config.model, config.data.image_size, mesh, rules)
    if kind == "latest":
      variables, step = checkpoints.restore_ema(abstract)
      return [RestoredModel(names, variables, step, kind)]
    restored = []
    for name in names:
      variables, step = checkpoints.restore_best(name, abstract)
      restored.append(RestoredModel([name], variables, step, kind))
    return restored
  finally:
    checkpoints.close()
