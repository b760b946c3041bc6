"""The predict function as an ONNX model, run with onnxruntime (no JAX needed to run it).

`export_onnx(predictor, path)` writes the device side of prediction (the
`inference.make_predict_fn` that `Predictor`, evaluation and the StableHLO
export run) for a fixed batch B and crop size S as one ONNX graph:

    uint8 RGB crops (B, S, S, 3) -> ImageNet normalisation -> the model
      [-> the model on the mirrored crops, flip merge]       (flip_test)
      -> the decoder -> points (B, 124, 2) in crop pixels, confidence (B, 124)

with the weights as initializers, and `<path>.json` beside it (the same
description the StableHLO export writes: shapes, the crop convention, each
protocol's unified index). Run it anywhere onnxruntime runs:

    import onnxruntime, numpy as np
    session = onnxruntime.InferenceSession("fgtbt.onnx", providers=["CPUExecutionProvider"])
    points, confidence = session.run(None, {"crops": crops})   # crops: uint8 (B, S, S, 3)

(onnxruntime and numpy only), or, where this project is installed,
`OnnxPredictor("fgtbt.onnx").run_crops(crops)`, which checks the crops first
and runs any number of them in batches of B.

How: the predict function is traced to a jaxpr (`jax.make_jaxpr`) and the
jaxpr, not the Flax modules, is converted by jax2onnx, so every operation
goes through jax2onnx's `jax.lax` primitive lowerings.
One operation has no ONNX form there: the 2-D FFT of FGSA's high-frequency
image (`fgsa.fft_high_frequency`, `jnp.fft.fft2` / `ifft2`: jax2onnx lowers
1-D FFTs only, and ONNX has no complex tensors for the masked spectrum in
between). The export path computes the same filter exactly with real
matrix products instead (`dft_high_frequency`): the Gaussian high-pass mask
is 1 - g_h(i) g_w(j), so

    Re(IFFT2(FFT2(x) * M)) = x - L_h x L_w^T,   L = Re(F^-1 diag(g) F)

with L_h (H x H) and L_w (W x W) the real circulant low-pass matrices of
the two axes, computed in float64 here. The model's own code and numerics
are untouched; only the exported graph uses the matrix form (equal to the
FFT form to float32 rounding, `tests/test_onnx_export.py`).

Needs the optional packages jax2onnx, onnx and onnxruntime (pins:
requirements-dev.txt, and requirements-onnx.txt for jax2onnx, installed with
--no-deps: docs/onnx.md); `OnnxPredictor` needs onnxruntime, not jax2onnx.
Without them the functions here raise `OnnxUnavailableError` (an ImportError
naming the packages).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import models
from fgtbt_jax.deploy import export as export_lib
from fgtbt_jax.deploy import predictor as predictor_lib
from fgtbt_jax.inference import PredictSettings
from fgtbt_jax.models import fgsa

# ONNX opset of the exported graph (tested with onnxruntime 1.32.0).
OPSET = 21
INPUT_NAME = "crops"
OUTPUT_NAMES = {"landmarks": ("points", "confidence"), "heatmaps": ("heatmaps",)}
# The key of the export's description (JSON) in the model's metadata_props.
METADATA_KEY = "fgtbt_jax"
# What `OnnxPredictor` needs; the export needs jax2onnx and onnx too.
_MISSING = ("ONNX export needs the optional packages jax2onnx, onnx and onnxruntime "
            "(pip install -r requirements-dev.txt; pip install --no-deps -r "
            "requirements-onnx.txt)")


class OnnxUnavailableError(ImportError):
  """The optional ONNX packages are not installed (the message names them)."""


def _import(name: str):
  try:
    return __import__(name)
  except ImportError as e:
    raise OnnxUnavailableError(f"{_MISSING}: {e}") from None


# -- the FFT high-pass as matrix products -----------------------------------------


def lowpass_matrix(size: int, sigma: float) -> np.ndarray:
  """(size, size) float64 L = Re(F^-1 diag(g) F), g(k) = exp(-d(k)^2 / (2 sigma^2)).

  d(k) is k's distance from frequency 0 along the `ifftshift`-ed axis (the
  mask of `fgsa.gaussian_highpass_mask` is centred at size // 2 before the
  shift). L is circulant and, g being even, real: L x is the Gaussian
  low-pass of the columns of x.
  """
  offsets = np.fft.ifftshift(np.arange(size, dtype=np.float64) - size // 2)
  gains = np.exp(-offsets**2 / (2 * sigma**2))
  operator = np.fft.ifft(gains[:, None] * np.fft.fft(np.eye(size), axis=0), axis=0)
  if np.abs(operator.imag).max() > 1e-9:  # Only if the mask were not even.
    raise ValueError(f"lowpass_matrix: the {size}-point mask is not even; no real form")
  return operator.real


def dft_high_frequency(images: jax.Array, sigma: float) -> jax.Array:
  """`fgsa.fft_high_frequency` with real matrix products in place of the 2-D FFT.

  |x - L_h x L_w^T| per channel, the low-pass matrices of `lowpass_matrix`
  for the same scaled sigmas; equal to the FFT form to float32 rounding.
  Raises ValueError if `fgsa.gaussian_highpass_mask` is not 1 - g_h g_w
  (its formula changed): then this form would not be the model's filter.
  """
  _, h, w, _ = images.shape
  scale = sigma / fgsa.SIGMA_REFERENCE_SIZE
  sigma_h, sigma_w = scale * h, scale * w
  low_h, low_w = lowpass_matrix(h, sigma_h), lowpass_matrix(w, sigma_w)
  # The separable form holds exactly when the model's mask is 1 - g_h g_w.
  gains = [np.exp(-(np.arange(n, dtype=np.float64) - n // 2)**2 / (2 * s**2))
           for n, s in ((h, sigma_h), (w, sigma_w))]
  if not np.allclose(fgsa.gaussian_highpass_mask(h, w, sigma_h, sigma_w),
                     1.0 - np.outer(*gains), rtol=0, atol=1e-12):
    raise ValueError("dft_high_frequency: fgsa.gaussian_highpass_mask is no longer "
                     "1 - g_h g_w; the matrix form does not match it")
  x = images.astype(jnp.float32)
  highest = jax.lax.Precision.HIGHEST
  low = jnp.einsum("hi,biwc->bhwc", jnp.asarray(low_h, jnp.float32), x, precision=highest)
  low = jnp.einsum("wj,bhjc->bhwc", jnp.asarray(low_w, jnp.float32), low, precision=highest)
  return jnp.abs(x - low)


def exportable_apply(model) -> Callable[[Any, jax.Array], Any]:
  """`inference.model_apply(model)` with FGSA's FFT in its matrix form.

  For an FGTBT with FGSA and the "fft" extractor: the body of
  `FGTBT.named_outputs` (structure image, encoder, decoder, float32 outputs)
  with `dft_high_frequency` as the structure image. Any other model is
  `inference.model_apply(model)` unchanged.
  """
  if not (isinstance(model, models.FGTBT) and model.encoder.fgsa
          and model.frequency_extractor == "fft"):
    return inference.model_apply(model)

  def outputs(module, images):
    structure = dft_high_frequency(images, module.frequency_sigma)
    features = module.encoder(images, structure, False)
    named = module.decoder(features, False)
    return jax.tree.map(lambda x: x.astype(jnp.float32), named)

  return lambda variables, images: model.apply(variables, images, method=outputs)


# -- export ------------------------------------------------------------------------


@contextlib.contextmanager
def _converter_settings():
  """jax2onnx as the export runs it: quiet, and its output check in linear time.

  jax2onnx logs a warning per optional plugin whose package is missing
  (equinox, dm_pix) and one per untyped intermediate value (onnx_ir): both
  are silenced while converting. After every equation it checks that each
  output value is connected to the graph by scanning all nodes built so far
  (`output_binding._value_is_graph_connected`), quadratic in the graph size:
  55 of the 72 s of the tiny model's export when profiled, and the paper
  network has 4 times its equations (8 with the flip test).
  `_connected_fast` answers the common case (a value whose
  producing node is in the graph: the check's own first match) in constant
  time and asks the original scan otherwise, so the answers are the same.
  """
  try:  # jax2onnx 0.17 (0.13 has no such check).
    from jax2onnx.converter import output_binding
  except ImportError:
    output_binding = None
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in loggers]
  scan = getattr(output_binding, "_value_is_graph_connected", None)

  def _connected_fast(ctx, value):
    producer = value.producer() if hasattr(value, "producer") else None
    if producer is not None and producer.graph is ctx.builder.nodes:
      return True
    return scan(ctx, value)

  for logger in loggers:
    logger.setLevel(logging.ERROR)
  if scan is not None:
    output_binding._value_is_graph_connected = _connected_fast
  try:
    yield
  finally:
    if scan is not None:
      output_binding._value_is_graph_connected = scan
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def onnx_model(predictor: predictor_lib.Predictor, *, batch_size: int | None = None,
               settings: PredictSettings | None = None, output: str = "landmarks"):
  """The `onnx.ModelProto` of the predictor's predict function (see the module docstring)."""
  if output not in OUTPUT_NAMES:
    raise ValueError(f"export_onnx: unknown output {output!r}; expected one of "
                     f"{tuple(OUTPUT_NAMES)}")
  batch = predictor.batch_size if batch_size is None else int(batch_size)
  if batch < 1:
    raise ValueError(f"export_onnx: batch_size must be at least 1, got {batch}")
  settings = predictor.settings if settings is None else settings
  jax2onnx = _import("jax2onnx")
  infer = inference.make_predict_fn(exportable_apply(predictor.model), settings, output)
  variables = predictor.variables
  size = predictor.image_size
  spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  # Convert the traced jaxpr: jax2onnx then sees `jax.lax` primitives only,
  # never the Flax modules (whose own patched lowerings it would try first).
  closed = jax.make_jaxpr(lambda crops: infer(variables, crops))(spec)
  run_jaxpr = jax.extend.core.jaxpr_as_fun(closed)
  with _converter_settings():
    model = jax2onnx.to_onnx(lambda crops: tuple(run_jaxpr(crops)), [spec],
                             model_name="fgtbt_predict", opset=OPSET,
                             input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES[output]))
  _drop_unused_initializers(model.graph)
  return model


def _drop_unused_initializers(graph) -> None:
  """Removes initializers no node reads (jax2onnx leaves a folded constant or two;
  onnxruntime would warn about each when loading)."""
  used = {name for node in graph.node for name in node.input}
  used.update(output.name for output in graph.output)
  if any(attribute.g.node or attribute.graphs for node in graph.node
         for attribute in node.attribute):
    return  # A subgraph may read outer initializers: keep them all.
  kept = [tensor for tensor in graph.initializer if tensor.name in used]
  if len(kept) < len(graph.initializer):
    del graph.initializer[:]
    graph.initializer.extend(kept)


def export_onnx(predictor: predictor_lib.Predictor, path: str | os.PathLike, *,
                batch_size: int | None = None, flip_test: bool | None = None,
                settings: PredictSettings | None = None, output: str = "landmarks",
                own_schemes: Sequence[str] = ()) -> dict:
  """Writes the predictor's predict function to `path` (ONNX) and `<path>.json`.

  Args:
    predictor: supplies the model, its variables (written as initializers),
      the crop size S and the default settings (from a run: its `config.eval`).
    path: the .onnx file to write (one file: the weights are inside).
    batch_size: B, fixed in the graph; default the predictor's batch size.
    flip_test: override the settings' flip test (None: keep it).
    settings: decoder, flip test and smoothing; default the predictor's.
    output: "landmarks" (points, confidence) or "heatmaps" (merged maps).
    own_schemes: the run's own datasets, whose unified points the metadata
      lists beside the benchmarks' (`export.artifact_metadata`).

  Returns:
    The metadata written to `<path>.json`.
  """
  onnx = _import("onnx")
  settings = predictor.settings if settings is None else settings
  if flip_test is not None:
    settings = settings.replace(flip_test=bool(flip_test))
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(f"export_onnx: {path} is a folder; name the .onnx file to write")
  model = onnx_model(predictor, batch_size=batch_size, settings=settings, output=output)
  metadata = onnx_metadata(model, settings=settings, output=output,
                           crop_enlarge=predictor.crop_enlarge,
                           batch_dependent=predictor.batch_dependent, own_schemes=own_schemes)
  # Inside the model too, for `OnnxPredictor` (onnxruntime's custom metadata map).
  entry = model.metadata_props.add()
  entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
  path.parent.mkdir(parents=True, exist_ok=True)
  onnx.save_model(model, os.fspath(path))
  path.with_name(path.name + ".json").write_text(json.dumps(metadata, indent=1) + "\n")
  return metadata


def onnx_metadata(model, *, settings: PredictSettings, output: str, crop_enlarge: float,
                  batch_dependent: bool = False, own_schemes: Sequence[str] = ()) -> dict:
  """The description of an exported ONNX model: `export.artifact_metadata`'s fields
  (the crop convention, settings, each protocol's unified index) for this graph."""
  onnx = _import("onnx")

  def described(value):
    tensor = value.type.tensor_type
    return {"name": value.name, "shape": [d.dim_value for d in tensor.shape.dim],
            "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))}

  [crops] = [described(v) for v in model.graph.input]
  metadata = export_lib.artifact_metadata(
      _Signature(crops["shape"]), settings=settings, output=output, crop_enlarge=crop_enlarge,
      own_schemes=own_schemes)
  del metadata["platforms"]
  metadata.update(
      format=f"ONNX (opset {OPSET}); onnxruntime: InferenceSession(path).run(None, "
             f"{{'{INPUT_NAME}': crops}})",
      input={**crops, "meaning": metadata["input"]["meaning"]},
      outputs=[described(v) for v in model.graph.output],
      batch_dependent=bool(batch_dependent),
      fft_high_pass="real matrix products x - L_h x L_w^T (fgtbt_jax.deploy.onnx_export."
                    "dft_high_frequency), the model's jnp.fft filter to float32 rounding")
  return metadata


class _Signature:
  """The input and output avals `export.artifact_metadata` reads of an `Exported`."""

  def __init__(self, shape):
    self.in_avals = (jax.ShapeDtypeStruct(tuple(shape), jnp.uint8),)
    self.out_avals = ()
    self.platforms = ()


# -- running an exported model -----------------------------------------------------


class OnnxPredictor:
  """An exported model in onnxruntime: uint8 crops in, landmarks in crop pixels out.

  Args:
    path: the .onnx file `export_onnx` wrote.
    providers: onnxruntime execution providers (default the CPU's).
    threads: intra-op threads (None: onnxruntime's default, all cores).
  """

  def __init__(self, path: str | os.PathLike, *, providers=("CPUExecutionProvider",),
               threads: int | None = None):
    ort = _import("onnxruntime")
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"OnnxPredictor: no ONNX model at {self.path}")
    options = ort.SessionOptions()
    if threads is not None:
      options.intra_op_num_threads = int(threads)
    self.session = ort.InferenceSession(os.fspath(self.path), options,
                                        providers=list(providers))
    [crops] = self.session.get_inputs()
    self.input_name = crops.name
    self.batch_size, size, _, _ = crops.shape
    self.image_size = int(size)
    self.output_names = [o.name for o in self.session.get_outputs()]
    # `export_onnx`'s description ({} for a model from elsewhere).
    described = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    self.metadata: dict = json.loads(described) if described else {}

  def __call__(self, crops: np.ndarray) -> list[np.ndarray]:
    """The graph's outputs for exactly one batch (B, S, S, 3) uint8."""
    crops = self._check(crops, exact_batch=True)
    return self.session.run(None, {self.input_name: crops})

  def _check(self, crops, exact_batch: bool) -> np.ndarray:
    crops = np.asarray(crops)
    size = self.image_size
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
      raise ValueError(f"{self.path.name}: expected uint8 crops of shape "
                       f"({self.batch_size if exact_batch else 'M'}, {size}, {size}, 3), "
                       f"got {crops.shape}")
    if exact_batch and crops.shape[0] != self.batch_size:
      raise ValueError(f"{self.path.name}: exported for batches of {self.batch_size} crops, "
                       f"got {crops.shape[0]}")
    if crops.dtype != np.uint8:
      raise ValueError(f"{self.path.name}: expected uint8 crops, got {crops.dtype}")
    return crops

  def run_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, 124, 2) points in crop pixels and (M, 124) confidence of (M, S, S, 3) crops.

    Runs batches of the exported size, the last padded with zeros (as
    `Predictor.run_crops` does). A model whose outputs depend on the
    batch-mates (the authors' FGSA: `batch_dependent` in the metadata)
    cannot be padded: it takes whole batches only. A model exported with
    output="heatmaps" gives no landmarks. Both raise ValueError.
    """
    if self.output_names != list(OUTPUT_NAMES["landmarks"]):
      raise ValueError(f"{self.path.name}: outputs {self.output_names}, not landmarks")
    crops = self._check(crops, exact_batch=False)
    count, batch = len(crops), self.batch_size
    if count == 0:
      return (np.zeros((0, landmarks.NUM_UNIFIED, 2), np.float32),
              np.zeros((0, landmarks.NUM_UNIFIED), np.float32))
    if count % batch and self.metadata.get("batch_dependent"):
      raise ValueError(f"{self.path.name}: this model's outputs depend on the other crops of "
                       f"its batch, so its last batch cannot be padded: give a multiple of "
                       f"{batch} crops (got {count}), or export it with batch_size={count}")
    padded = -(-count // batch) * batch
    crops = np.concatenate([crops, np.zeros((padded - count, *crops.shape[1:]), np.uint8)])
    outputs = [self.session.run(None, {self.input_name: crops[i:i + batch]})
               for i in range(0, padded, batch)]
    points = np.concatenate([p for p, _ in outputs])[:count]
    confidence = np.concatenate([c for _, c in outputs])[:count]
    return points, confidence
