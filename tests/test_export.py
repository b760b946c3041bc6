"""Tests of the StableHLO export: a fresh process runs the artifact without the model code."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fgtbt_jax.data import synthetic
from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax.commands import export as export_command
from fgtbt_jax.deploy import export
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import inference
from tests import helpers

BATCH = 2


@pytest.fixture(scope="module")
def predictor():
  return helpers.tiny_predictor(BATCH)


@pytest.fixture(scope="module")
def crops_and_heatmaps(predictor):
  """A face crop and its mirror, and their flip-merged heatmaps in this process."""
  image, points, _ = synthetic.render_face(3, 5, 128, clean=True)
  crops, _ = predictor.crop_faces(image, detector_lib.landmark_box(points)[None])
  crops = np.concatenate([crops, crops[:, :, ::-1]])
  infer = jax.jit(inference.make_predict_fn(inference.model_apply(predictor.model),
                                            predictor.settings, output="heatmaps"))
  return crops, np.asarray(infer(predictor.variables, crops))


def test_flip_merged_heatmaps_of_a_mirrored_crop_are_mirrored(crops_and_heatmaps):
  _, maps = crops_and_heatmaps
  assert maps.shape == (BATCH, 32, 32, 124)
  mirrored_back = np.asarray(heatmaps.flip_heatmaps(maps[1], landmarks.UNIFIED_FLIP_PERMUTATION))
  np.testing.assert_allclose(mirrored_back, maps[0], atol=1e-5)
  assert np.abs(maps[0] - maps[0][:, ::-1]).max() > 1e-2  # Not trivially symmetric.


_LOADER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    crops = np.load(sys.argv[1])
    for name in sys.argv[2:]:
      exported = jax.export.deserialize(bytearray(open(name, "rb").read()))
      outputs = exported.call(crops)
      outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
      np.savez(name + ".out.npz", *[np.asarray(o) for o in outputs])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("fgtbt_jax", "flax", "data_pipelines"))
    assert not loaded, loaded
""")


def test_exported_artifacts_run_in_a_fresh_process_without_the_model_code(
    predictor, crops_and_heatmaps, tmp_path):
  crops, expected_maps = crops_and_heatmaps
  paths = {}
  for output in export.OUTPUTS:
    exported = export.export_inference(predictor, output=output, platforms=("cpu",))
    metadata = export.artifact_metadata(exported, settings=predictor.settings, output=output,
                                        crop_enlarge=predictor.crop_enlarge)
    paths[output] = export.save_exported(exported, tmp_path / f"{output}.stablehlo", metadata)
  np.save(tmp_path / "crops.npy", crops)
  run = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path / "crops.npy"),
                        *map(str, paths.values())], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]

  [maps] = np.load(str(paths["heatmaps"]) + ".out.npz").values()
  np.testing.assert_allclose(maps, expected_maps, atol=1e-5)
  points, confidence = np.load(str(paths["landmarks"]) + ".out.npz").values()
  coords, peaks = heatmaps.decode(expected_maps, "subpixel")
  assert points.shape == (BATCH, 124, 2) and confidence.shape == (BATCH, 124)
  np.testing.assert_allclose(points, heatmaps.heatmap_to_input(np.asarray(coords), 2.0), atol=1e-5)
  np.testing.assert_allclose(confidence, peaks, atol=1e-5)

  metadata = json.loads((tmp_path / "landmarks.stablehlo.json").read_text())
  assert metadata["input"] == {"shape": [BATCH, 64, 64, 3], "dtype": "uint8",
                               "meaning": metadata["input"]["meaning"]}
  assert metadata["outputs"] == [{"shape": [BATCH, 124, 2], "dtype": "float32"},
                                 {"shape": [BATCH, 124], "dtype": "float32"}]
  assert metadata["unified_index"]["COFW"] == landmarks.get_protocol("COFW").unified_index.tolist()
  assert metadata["flip_test"] is True and metadata["decoder"] == "subpixel"
  assert metadata["smoothing_sigma"] == 0.0


def test_load_exported_rejects_other_files(tmp_path):
  junk = tmp_path / "junk.stablehlo"
  junk.write_bytes(b"definitely not flatbuffers")
  with pytest.raises(ValueError, match="junk.stablehlo: not a serialized jax.export artifact"):
    export.load_exported(junk)
  with pytest.raises(ValueError, match="unknown inference output 'logits'"):
    inference.make_predict_fn(lambda v, x: x, inference.PredictSettings(), output="logits")


def test_the_export_command_reports_bad_inputs_in_one_line(tmp_path, capsys):
  """A missing run, and an --out that is a folder (found before any lowering)."""
  assert export_command.main(["--workdir", str(tmp_path / "no_run"), "--out", str(tmp_path / "a")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no_run: not a training workdir" in err
  assert export_command.main(["--workdir", str(tmp_path / "no_run"), "--out", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"--out {tmp_path} is a folder" in err
