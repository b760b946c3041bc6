"""The inference function as a standalone StableHLO artifact (`jax.export`).

`export_inference(predictor, ...)` serialises the device side of prediction
(`inference.make_predict_fn`, the function evaluation and `Predictor` run)
for a fixed batch B and crop size S: uint8 RGB crops (B, S, S, 3) in (ImageNet
normalisation inside), the model on the crops and, with the flip test, on
their mirrors, the flip merge, and either the merged heatmaps or the decoded
landmarks (points (B, 124, 2) in crop pixels and their confidence (B, 124)),
with the predictor's settings (from a run: the run's `config.eval`) unless
others are given.
The weights are constants inside the artifact, so loading it needs neither
the model code nor a checkpoint, only JAX (and flatbuffers):

    import jax, numpy as np
    exported = jax.export.deserialize(open("fgtbt.stablehlo", "rb").read())
    points, confidence = exported.call(crops)   # crops: uint8 (B, S, S, 3)

`save_exported` writes the bytes of `Exported.serialize()` and, beside them,
`<file>.json` with what a caller needs to make crops and read the outputs
(shapes, the crop convention, each protocol's unified index). Command line:

    fgtbt export --workdir runs/paper --out fgtbt.stablehlo --batch_size 8
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp

from fgtbt_jax import crop
from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax.deploy import predictor as predictor_lib
from fgtbt_jax.inference import PredictSettings

OUTPUTS = inference.OUTPUTS
DEFAULT_PLATFORMS = ("cpu", "cuda")


def export_inference(predictor: predictor_lib.Predictor, *, batch_size: int | None = None,
                     settings: PredictSettings | None = None, output: str = "landmarks",
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  """Exports the predictor's inference function for uint8 crops (B, S, S, 3).

  Args:
    predictor: supplies the model, its variables (baked in as constants),
      the crop size S and the default settings.
    batch_size: B; default the predictor's batch size.
    settings: decoder, flip test and smoothing; default the predictor's.
    output: "landmarks" -> (points (B, 124, 2) float32 in crop pixels,
      confidence (B, 124)); "heatmaps" -> merged heatmaps (B, S/2, S/2, 124).
    platforms: lowering platforms; one artifact runs on any of them.
  """
  batch = predictor.batch_size if batch_size is None else int(batch_size)
  if batch < 1:
    raise ValueError(f"export: batch_size must be at least 1, got {batch}")
  settings = predictor.settings if settings is None else settings
  variables = predictor.variables
  infer = inference.make_predict_fn(inference.model_apply(predictor.model), settings, output)
  size = predictor.image_size
  crops = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  return jax.export.export(jax.jit(lambda x: infer(variables, x)),
                           platforms=tuple(platforms))(crops)


def artifact_metadata(exported: jax.export.Exported, *, settings: PredictSettings, output: str,
                      crop_enlarge: float, own_schemes: Sequence[str] = ()) -> dict:
  """The sidecar description of an exported artifact (see `save_exported`).

  "unified_index" maps each benchmark protocol and each of `own_schemes`
  (the run's own datasets, registered as protocols) to its unified points.
  """
  (crops,) = exported.in_avals
  return {
      "format": "jax.export serialized Exported (StableHLO); load with "
                "jax.export.deserialize(bytes).call(crops)",
      "platforms": list(exported.platforms),
      "input": {"shape": list(crops.shape), "dtype": str(crops.dtype),
                "meaning": "RGB face crops, uint8 0-255 (normalised inside)"},
      "outputs": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in exported.out_avals],
      "output": output,
      "output_meaning": (
          "points (B, 124, 2) x, y in crop pixels (pixel centres at integers) and "
          "confidence (B, 124) heatmap peaks" if output == "landmarks" else
          "flip-merged heatmaps (B, H, W, 124), heatmap pixel h = (x + 0.5) / stride - 0.5"),
      "flip_test": bool(settings.flip_test),
      "decoder": settings.decoder if output == "landmarks" else None,
      "smoothing_sigma": float(settings.smoothing_sigma) if output == "landmarks" else None,
      "crop": {"scale_unit": crop.SCALE_UNIT, "crop_enlarge": float(crop_enlarge),
               "convention": "centre = box centre, side = max(w, h) * crop_enlarge, "
                             "u = (S / side) (x - centre) + (S - 1) / 2"},
      "unified_index": {name: landmarks.get_protocol(name).unified_index.tolist()
                        for name in (*landmarks.PROTOCOL_NAMES, *own_schemes)},
  }


def save_exported(exported: jax.export.Exported, path: str | os.PathLike,
                  metadata: dict | None = None) -> pathlib.Path:
  """Writes `exported.serialize()` to `path` (and `metadata` to `<path>.json`)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(bytes(exported.serialize()))
  if metadata is not None:
    path.with_name(path.name + ".json").write_text(json.dumps(metadata, indent=1) + "\n")
  return path


def load_exported(path: str | os.PathLike) -> jax.export.Exported:
  """The `Exported` saved at `path` (callable with `.call(crops)`)."""
  path = pathlib.Path(path)
  data = bytearray(path.read_bytes())
  try:
    return jax.export.deserialize(data)
  except Exception as e:  # The deserialiser raises assorted errors on bad bytes.
    raise ValueError(f"{path}: not a serialized jax.export artifact: {e}") from e


if __name__ == "__main__":  # The command moved; say where instead of doing nothing.
  raise SystemExit("this module is a library now; the command is `fgtbt export` "
                   "(or `python -m fgtbt_jax.commands export`)")
