"""Tests of the ONNX export: onnxruntime's landmarks against JAX's predict function.

The tiny model with random weights, exported with and without the flip test,
run in onnxruntime on synthetic face crops and random crops, compared with
`Predictor.run_crops` (the jitted `inference.make_predict_fn`, FFT and all).
Measured on this project's CPU (2026-12-06): at most 2.1e-4 crop pixels apart
(points) and 7.8e-7 (confidence); the tests allow `POINT_TOLERANCE` and
`CONFIDENCE_TOLERANCE`.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import models
from fgtbt_jax.data import synthetic
from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax.deploy import onnx_export
from fgtbt_jax.deploy.predictor import Predictor
from fgtbt_jax.models import fgsa
from tests import helpers

BATCH = 2
SIZE = 64
# Crop pixels (the tiny model's crop is 64 x 64); float32 rounding differences
# between XLA and onnxruntime move the sub-pixel peaks by ~1e-5 px.
POINT_TOLERANCE = 1e-3
CONFIDENCE_TOLERANCE = 1e-4


def _missing_packages() -> list[str]:
  missing = []
  for name in ("onnxruntime", "onnx", "jax2onnx"):
    try:
      __import__(name)
    except ImportError:
      missing.append(name)
  return missing


needs_onnx = pytest.mark.skipif(
    bool(_missing_packages()),
    reason=f"the optional ONNX packages {_missing_packages()} are not installed "
           "(pip install -r requirements-dev.txt; pip install --no-deps -r requirements-onnx.txt)")


@pytest.fixture(scope="module")
def predictor():
  return helpers.tiny_predictor(BATCH)


@pytest.fixture(scope="module")
def crops(predictor):
  """Five crops: three synthetic faces (one mirrored) and two of random pixels."""
  faces = []
  for index in (5, 6, 7):
    image, points, _ = synthetic.render_face(3, index, 128, clean=True)
    face, _ = predictor.crop_faces(image, detector_lib.landmark_box(points)[None])
    faces.append(face)
  faces[-1] = faces[-1][:, :, ::-1]
  noise = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  return np.concatenate(faces + [noise])


@pytest.fixture(scope="module")
def exported(predictor, tmp_path_factory):
  """{flip_test: (path, metadata)} of the tiny model exported both ways."""
  folder = tmp_path_factory.mktemp("onnx")
  return {flip: (folder / f"tiny_flip{int(flip)}.onnx",
                 onnx_export.export_onnx(predictor, folder / f"tiny_flip{int(flip)}.onnx",
                                         flip_test=flip))
          for flip in (False, True)}


def test_the_matrix_high_pass_equals_the_fft_form():
  rng = np.random.default_rng(3)
  for shape, sigma in (((2, 64, 64, 3), 20.0), ((1, 96, 32, 3), 20.0), ((1, 33, 48, 2), 7.0)):
    images = jnp.asarray(rng.normal(size=shape), jnp.float32)
    expected = np.asarray(fgsa.fft_high_frequency(images, sigma))
    got = np.asarray(onnx_export.dft_high_frequency(images, sigma))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
  # Symmetric and a low-pass: rows sum to the gain at frequency 0 (1).
  low = onnx_export.lowpass_matrix(64, 20.0 * 64 / 480)
  np.testing.assert_allclose(low, low.T, atol=1e-15)
  np.testing.assert_allclose(low.sum(1), 1.0, atol=1e-12)


def test_the_exportable_model_gives_the_models_heatmaps(predictor, crops):
  images = models.normalize_images(crops[:BATCH])
  expected = inference.model_apply(predictor.model)(predictor.variables, images)
  got = onnx_export.exportable_apply(predictor.model)(predictor.variables, images)
  assert set(got) == set(expected)
  np.testing.assert_allclose(got["heatmaps"], expected["heatmaps"], atol=1e-5)


@needs_onnx
@pytest.mark.parametrize("flip_test", [False, True])
def test_onnxruntime_landmarks_equal_jaxs(predictor, crops, exported, flip_test):
  path, metadata = exported[flip_test]
  runtime = onnx_export.OnnxPredictor(path)
  assert (runtime.batch_size, runtime.image_size) == (BATCH, SIZE)
  points, confidence = runtime.run_crops(crops)  # 5 crops: three batches, the last padded.
  expected_points, expected_confidence = predictor.run_crops(crops, flip_test=flip_test)
  assert points.shape == (len(crops), landmarks.NUM_UNIFIED, 2)
  assert confidence.shape == (len(crops), landmarks.NUM_UNIFIED)
  point_error = np.abs(points - expected_points).max()
  confidence_error = np.abs(confidence - expected_confidence).max()
  print(f"flip_test={flip_test}: max |ONNX - JAX| {point_error:.2e} crop px, "
        f"confidence {confidence_error:.2e}")
  assert point_error < POINT_TOLERANCE
  assert confidence_error < CONFIDENCE_TOLERANCE
  # The flip test changes the answer: the two exports are two functions.
  other, _ = predictor.run_crops(crops, flip_test=not flip_test)
  assert np.abs(points - other).max() > 10 * POINT_TOLERANCE
  # One exact batch through the session directly.
  direct_points, _ = runtime(crops[:BATCH])
  np.testing.assert_array_equal(direct_points, points[:BATCH])

  assert metadata["flip_test"] is flip_test and metadata["decoder"] == "subpixel"
  assert metadata["input"]["shape"] == [BATCH, SIZE, SIZE, 3]
  assert metadata["input"]["dtype"] == "uint8"
  assert [o["shape"] for o in metadata["outputs"]] == [[BATCH, 124, 2], [BATCH, 124]]
  assert metadata["unified_index"]["COFW"] == landmarks.get_protocol("COFW").unified_index.tolist()
  assert metadata["batch_dependent"] is False
  assert json.loads(path.with_name(path.name + ".json").read_text()) == metadata
  assert runtime.metadata == metadata  # Also inside the model.


@needs_onnx
def test_bad_inputs_fail_with_clear_errors(predictor, exported, tmp_path):
  path, _ = exported[False]
  runtime = onnx_export.OnnxPredictor(path)
  with pytest.raises(ValueError, match=r"expected uint8 crops of shape \(M, 64, 64, 3\), "
                                       r"got \(3, 32, 32, 3\)"):
    runtime.run_crops(np.zeros((3, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="expected uint8 crops, got float32"):
    runtime.run_crops(np.zeros((3, SIZE, SIZE, 3), np.float32))
  with pytest.raises(ValueError, match="exported for batches of 2 crops, got 3"):
    runtime(np.zeros((3, SIZE, SIZE, 3), np.uint8))
  points, confidence = runtime.run_crops(np.zeros((0, SIZE, SIZE, 3), np.uint8))
  assert points.shape == (0, 124, 2) and confidence.shape == (0, 124)
  # The authors' FGSA pools over the batch: a padded batch would change its answers.
  runtime.metadata["batch_dependent"] = True
  with pytest.raises(ValueError, match="give a multiple of 2 crops"):
    runtime.run_crops(np.zeros((3, SIZE, SIZE, 3), np.uint8))
  assert runtime.run_crops(np.zeros((4, SIZE, SIZE, 3), np.uint8))[0].shape == (4, 124, 2)
  with pytest.raises(FileNotFoundError, match="no ONNX model at"):
    onnx_export.OnnxPredictor(tmp_path / "missing.onnx")
  with pytest.raises(ValueError, match="is a folder"):
    onnx_export.export_onnx(predictor, tmp_path)
  with pytest.raises(ValueError, match="batch_size must be at least 1"):
    onnx_export.export_onnx(predictor, tmp_path / "a.onnx", batch_size=0)
  with pytest.raises(ValueError, match="unknown output 'logits'"):
    onnx_export.export_onnx(predictor, tmp_path / "a.onnx", output="logits")


@needs_onnx
def test_the_export_command_writes_onnx_from_a_run(tmp_path, crops):
  # `fgtbt export --format onnx` on a run's workdir: the run's model and eval
  # settings, one line of output, and a file onnxruntime runs.
  from configs import tiny
  from fgtbt_jax.commands import export as export_command
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = tiny.get_config()
  helpers.write_random_run(workdir, config, scale=None)
  out = tmp_path / "model.onnx"
  assert export_command.main(["--format", "onnx", "--workdir", str(workdir), "--out", str(out),
                              "--which", "latest", "--batch_size", str(BATCH),
                              "--no_flip_test"]) == 0
  metadata = json.loads((tmp_path / "model.onnx.json").read_text())
  assert metadata["input"]["shape"][0] == BATCH and metadata["flip_test"] is False
  points, _ = onnx_export.OnnxPredictor(out).run_crops(crops)
  run = Predictor.from_checkpoint(workdir, "latest")
  expected, _ = run.run_crops(crops, flip_test=False)
  assert np.abs(points - expected).max() < POINT_TOLERANCE
