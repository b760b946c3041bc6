"""Report studies: extra evaluation passes named in `config.eval.studies`.

A study is a set of passes over the same evaluation machinery as the main
evaluation (`evaluate.predict_split`: sharded, multi-process), each pass a
transform of the input crops or an override of the predict settings, and a
function that turns the passes' per-dataset NMEs into the report's table:

* "lowres": faces downsampled to a face-box side of 16 / 32 / 64 / 128 px
  (`eval.lowres_sides`) and upsampled back to the input size; beside the
  NMEs, the PSNR and SSIM of those inputs against the original crops and,
  for a DHLN model (`model.hallucination`), of its hallucinated faces
  (`HALLUCINATION_TABLE`);
* "quantization": the NME that each decoder the model's head supports
  (`models.heads.HEADS`: argmax / quarter / subpixel, and hih / hih_subpixel
  for the HIH head) gives on the test data, beside the decoding error of ideal
  (target) heatmaps of random mean faces (`decoding_error.decoding_error`):
  what decoding alone costs; the HIH decoders' ideal error also at the
  decimal sizes of `QUANTIZATION_DECIMAL_SIZES`.

The main pass's own NMEs are reused where a pass would repeat it (the
configured decoder in the quantization study).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import cv2
import ml_collections
import numpy as np

from fgtbt_jax import heatmaps
from fgtbt_jax import models
from fgtbt_jax import decoding_error
from fgtbt_jax.inference import PredictSettings

STUDIES: tuple[str, ...] = ("lowres", "quantization")
# The lowres study's second table: {face side: PSNR / SSIM of the degraded
# input and, for a DHLN model, of its hallucinated face} (`evaluate.hallucination_quality`).
HALLUCINATION_TABLE = "lowres_faces"
# Faces of random mean-face landmarks for the ideal-heatmap decoding error.
QUANTIZATION_FACES = 64
# Decimal map sizes d of the HIH decoders' ideal decoding error (HIH Table 8).
QUANTIZATION_DECIMAL_SIZES = (4, 8, 16)


def study_decoders(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The decoders the quantization study measures: those of the model's head."""
  decoders = models.heads.get_head(config.model.head).decoders
  if config.model.hih_decimal_size < 3:  # No 3x3 stencil for the sub-pixel fit.
    decoders = tuple(d for d in decoders if d != "hih_subpixel")
  return decoders


def check_studies(names: Sequence[str]) -> tuple[str, ...]:
  """The names as a tuple; ValueError naming any that is not in STUDIES."""
  names = tuple(names)
  unknown = [n for n in names if n not in STUDIES]
  if unknown:
    raise ValueError(f"unknown studies {unknown}; expected names from {STUDIES}")
  return names


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


@dataclasses.dataclass(frozen=True)
class StudyPass:
  """One extra evaluation pass.

  Attributes:
    study: the study it belongs to.
    key: names the pass in the study's table (a face side, a decoder).
    settings: the predict settings of the pass.
    transform: applied to every batch of uint8 input crops, or None.
  """

  study: str
  key: Any
  settings: PredictSettings
  transform: Callable[[np.ndarray], np.ndarray] | None = None


def study_passes(name: str, config: ml_collections.ConfigDict,
                 settings: PredictSettings) -> list[StudyPass]:
  """The passes study `name` needs beyond the main pass (made with `settings`)."""
  check_studies([name])
  if name == "lowres":
    enlarge = float(config.data.crop_enlarge)
    return [StudyPass(name, int(side), settings,
                      lambda images, side=int(side): degrade_resolution(images, side, enlarge))
            for side in config.eval.lowres_sides]
  return [StudyPass(name, decoder, settings.replace(decoder=decoder))
          for decoder in study_decoders(config) if decoder != settings.decoder]


def study_table(name: str, config: ml_collections.ConfigDict, settings: PredictSettings,
                measured: Mapping[Any, Mapping[str, float]],
                main_nmes: Mapping[str, float]) -> dict:
  """The report's table of a study from {pass key: {dataset: NME}} and the main pass.

  "lowres" -> {face side: {dataset: NME}}. "quantization" -> {"input_size",
  "heatmap_size", "sigma", "decimal_size", "ideal": {decoder: WFLW
  inter-ocular NME of decoding perfect targets (the HIH decoders' with the
  model's decimal size d)}, "ideal_by_decimal_size": {d: {HIH decoder: NME}},
  "measured": {decoder the head supports: {dataset: NME}}}; the heatmap is
  the input over the model's stride, 2 `model.input_downsample`.
  """
  check_studies([name])
  if name == "lowres":
    return {int(side): dict(measured[int(side)]) for side in config.eval.lowres_sides}
  input_size = int(config.data.image_size)
  heatmap_size = input_size // (2 * int(config.model.input_downsample))
  sigma = float(config.loss.sigma)
  faces = decoding_error.random_meanface_landmarks(QUANTIZATION_FACES, input_size, seed=0)
  decimal_size = int(config.model.hih_decimal_size)
  decimal_sigma = float(config.loss.hih_decimal_sigma)
  ideal = decoding_error.decoding_error(input_size, heatmap_size, sigma, faces)
  by_size = {}
  for d in sorted({decimal_size, *QUANTIZATION_DECIMAL_SIZES}):
    hih = tuple(m for m in heatmaps.HIH_DECODERS if d >= 3 or m == "hih")
    by_size[d] = decoding_error.decoding_error(input_size, heatmap_size, sigma, faces, methods=hih,
                                             decimal_size=d, decimal_sigma=decimal_sigma)
  ideal.update(by_size[decimal_size])
  by_decoder = {settings.decoder: dict(main_nmes), **{k: dict(v) for k, v in measured.items()}}
  return {"input_size": input_size, "heatmap_size": heatmap_size, "sigma": sigma,
          "decimal_size": decimal_size, "ideal": ideal, "ideal_by_decimal_size": by_size,
          "measured": {d: by_decoder[d] for d in study_decoders(config)}}
