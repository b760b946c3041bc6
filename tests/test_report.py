"""Tests of the evaluation report: tables, C(p) grouping, CED plot, studies, write_report.

The table / C(p) / CED logic runs on hand-made predictions with known
answers; `write_report` runs end to end on a tiny workdir (random tiny-model
checkpoint, eight synthetic test faces per dataset).
"""

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import pipeline
from fgtbt_jax import landmarks
from fgtbt_jax import report
import helpers
from helpers import synthetic_data_dir  # noqa: F401 (fixture)


def samples_of(dataset: str, count: int = 4, shift: float = 0.0, seed: int = 0) -> dict:
  """Mean faces (100 px box) with predictions moved `shift` px along x."""
  protocol = landmarks.get_protocol(dataset)
  rng = np.random.default_rng(seed)
  face = landmarks.mean_face()[protocol.unified_index].astype(np.float64)
  face = (face - face.min(0)) / np.ptp(face, axis=0).max() * 100.0
  gt = face[None] + rng.uniform(0, 20, (count, 1, 2))
  pred = gt + np.array([shift, 0.0])
  flags = {name: np.arange(count) % 2 == 0 for name in pipeline.eval_subsets(dataset)}
  return {"predictions": pred, "ground_truth": gt, "box_size": np.full(count, 100.0),
          "subsets": flags}


def test_perfect_predictions_give_zero_nme_and_auc_one():
  for dataset in landmarks.PROTOCOL_NAMES:
    table = report.dataset_table(dataset, samples_of(dataset))
    assert list(table)[0] == "full"
    assert table["full"][landmarks.get_protocol(dataset).default_normalizer]["count"] == 4
    for subset in table.values():
      for row in subset.values():
        assert row["nme"] == 0 and row["auc"] == 1 and row["fr"] == 0
    assert set(report.nme_by_occurrence(dataset, samples_of(dataset)).values()) == {0.0}


def test_known_shift_gives_the_hand_computed_nme_per_normaliser_and_count():
  samples = samples_of("AFLW", shift=5.0)  # Box normaliser 100 px: NME 0.05 exactly.
  table = report.dataset_table("AFLW", samples)
  assert table["full"]["box"]["nme"] == pytest.approx(0.05)
  assert table["full"]["box"]["auc"] == pytest.approx(0.5)
  assert table["frontal"]["box"]["count"] == 2
  # Every point moves by 5 px, so each C(p) group's mean error is 5 / 100.
  by_count = report.nme_by_occurrence("AFLW", samples)
  counts = set(landmarks.OCCURRENCE_COUNT[landmarks.get_protocol("AFLW").unified_index].tolist())
  assert set(by_count) == counts
  assert all(v == pytest.approx(0.05) for v in by_count.values())


def test_occurrence_groups_average_only_their_own_points():
  protocol = landmarks.get_protocol("300W")
  samples = samples_of("300W", count=2)
  counts = landmarks.OCCURRENCE_COUNT[protocol.unified_index]
  # Move only the points with C(p) = 4 by 3 px; others stay perfect.
  moved = np.where(counts == 4, 3.0, 0.0)[None, :, None] * np.array([1.0, 0.0])
  samples["predictions"] = samples["predictions"] + moved
  gt = samples["ground_truth"]
  distance = np.linalg.norm(gt[:, 36] - gt[:, 45], axis=-1)
  by_count = report.nme_by_occurrence("300W", samples)
  assert by_count[4] == pytest.approx(np.mean(3.0 / distance))
  assert all(by_count[c] == 0 for c in by_count if c != 4)
  table = report.dataset_table("300W", samples)
  share = (counts == 4).mean()
  assert table["full"]["inter_ocular"]["nme"] == pytest.approx(np.mean(3.0 * share / distance))


def test_bad_per_sample_input_names_the_dataset_and_key():
  samples = samples_of("COFW")
  del samples["box_size"]
  with pytest.raises(KeyError, match="per_sample\\['COFW'\\] has no 'box_size'"):
    report.dataset_table("COFW", samples)
  samples = samples_of("COFW")
  samples["predictions"] = samples["predictions"][:, :10]
  with pytest.raises(ValueError, match="'predictions'.*\\(B, 29, 2\\)"):
    report.dataset_table("COFW", samples)
  with pytest.raises(KeyError, match="unknown datasets \\['XYZ'\\]"):
    report.build_report({"XYZ": samples}, "unused", title="t", real_data=False)


def test_paper_results_hold_the_reported_numbers():
  paper = report.paper_results()
  assert paper["300W"]["full"]["inter_ocular"] == 3.06
  assert paper["WFLW"]["pose"]["inter_ocular"] == 7.43
  assert paper["COFW"]["full"] == {"inter_pupil": 4.79, "fr": 0.59}
  assert paper["AFLW"]["full"]["box"] == 1.67
  # Every WFLW subset the pipeline produces has a paper number.
  assert set(pipeline.eval_subsets("WFLW")) < set(paper["WFLW"])


def test_build_report_writes_tables_ced_and_paper_column_only_for_real_data(tmp_path):
  per_sample = {d: samples_of(d, shift=2.0) for d in ("WFLW", "AFLW")}
  per_sample["WFLW"]["images"] = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3),
                                                                   np.uint8)
  real = report.build_report(per_sample, tmp_path / "real", title="real run", real_data=True,
                             frequency=("fft", 20.0))
  text = real.read_text()
  assert "### WFLW" in text and "### AFLW" in text and "paper FGTBT NME %" in text
  assert "7.43 (inter_ocular)" in text and "1.67 (box)" in text
  summary = json.loads((tmp_path / "real" / "report.json").read_text())
  assert summary["tables"]["AFLW"]["full"]["box"]["nme"] == pytest.approx(0.02)
  assert summary["paper"]["WFLW"]["full"]["inter_ocular"] == 4.42
  ced = cv2.imread(str(tmp_path / "real" / "ced.png"))
  assert ced.shape == (480, 640, 3) and (ced != 255).any()
  grid = cv2.imread(str(tmp_path / "real" / "high_frequency.png"))
  assert grid.shape == (128, 64, 3)

  synthetic = report.build_report(per_sample, tmp_path / "syn", title="synthetic run",
                                  real_data=False,
                                  studies={"lowres": {16: {"WFLW": 0.3, "AFLW": 0.2}}})
  text = synthetic.read_text()
  assert "paper FGTBT" not in text and "paper's FGTBT column does not apply" in text
  assert "| 16 | 30.00 | 20.00 |" in text
  assert json.loads((tmp_path / "syn" / "report.json").read_text())["paper"] is None


def test_high_frequency_image_of_a_flat_image_is_zero_and_of_an_edge_is_not():
  flat = np.full((1, 64, 64, 3), 128, np.uint8)
  edge = flat.copy()
  edge[0, :, 32:] = 255
  out = report.high_frequency_images(np.concatenate([flat, edge]), "fft", 20.0)
  assert out.dtype == np.uint8 and out.shape == (2, 64, 64, 3)
  assert out[0].max() <= 1
  assert out[1].max() == 255
  # The structure concentrates at the edge (the FFT wraps around, so the image
  # border is an edge too), not inside the flat halves.
  assert out[1, :, 30:34].mean() > 4 * out[1, :, 14:18].mean()


def test_degrade_resolution_blurs_below_the_face_side_and_keeps_larger_faces():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 64, 64, 3), np.uint8)
  # Face side 64 / 1.25 = 51.2 px: 128 leaves it unchanged, 16 blurs it.
  np.testing.assert_array_equal(report.degrade_resolution(images, 128, 1.25), images)
  degraded = report.degrade_resolution(images, 16, 1.25)
  assert degraded.shape == images.shape
  assert np.abs(np.diff(degraded.astype(float), axis=2)).mean() < \
      0.5 * np.abs(np.diff(images.astype(float), axis=2)).mean()


def test_write_report_on_a_tiny_workdir(tmp_path, synthetic_data_dir):
  from configs import tiny
  config = tiny.get_config()
  config.data.data_dir = str(synthetic_data_dir)
  config.synthetic_data.generate = False
  helpers.write_random_run(tmp_path, config, scale=0.05)

  path = report.write_report(tmp_path, max_batches=1, real_data=False)
  text = path.read_text()
  assert path == tmp_path / "report" / "report.md"
  assert "step 4" in text and "does not apply" in text
  assert "face box side of the unchanged input is 51 px" in text
  for section in ("### WFLW", "### 300W", "### COFW", "### AFLW", "Low-resolution study",
                  "Heatmap quantization study", "C(p)"):
    assert section in text
  summary = json.loads((tmp_path / "report" / "report.json").read_text())
  assert summary["tables"]["300W"]["full"]["inter_ocular"]["count"] == 8
  assert set(summary["studies"]["lowres"]) == {"16", "32", "64", "128"}
  measured = summary["studies"]["quantization"]["measured"]
  assert set(measured) == {"argmax", "quarter", "subpixel"}
  # The config's decoder in the quantization study is the main table's.
  assert measured["subpixel"]["WFLW"] == pytest.approx(
      summary["tables"]["WFLW"]["full"]["inter_ocular"]["nme"])
  assert summary["studies"]["quantization"]["ideal"]["subpixel"] < \
      summary["studies"]["quantization"]["ideal"]["argmax"]
  # Face side 128 > the 51 px face of a 64 px crop: unchanged input, same NME.
  assert summary["studies"]["lowres"]["128"]["COFW"] == pytest.approx(
      summary["tables"]["COFW"]["full"]["inter_pupil"]["nme"])
  assert (tmp_path / "report" / "high_frequency.png").is_file()
  with pytest.raises(ValueError, match="unknown studies \\['nope'\\]"):
    report.write_report(tmp_path, studies=("nope",))


def test_low_resolution_study_feeds_degraded_inputs_to_the_model(synthetic_data_dir):
  """A stand-in model whose points move with the image's pixel-to-pixel contrast."""
  from jax.sharding import AxisType, Mesh
  from configs import tiny
  config = tiny.get_config()
  config.data.data_dir = str(synthetic_data_dir)
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"),
              axis_types=(AxisType.Auto,) * 2)

  def contrast_points(variables, images):
    contrast = jnp.abs(jnp.diff(images.astype(jnp.float32), axis=2)).mean(axis=(1, 2, 3))
    return jnp.broadcast_to(contrast[:, None, None] * variables, (len(images), 124, 2))

  kept = report.collect_predictions(config, contrast_points, 1.0, mesh, datasets=["cofw"],
                                    max_batches=1, keep_images=3)
  assert set(kept) == {"COFW"} and kept["COFW"]["images"].shape == (3, 64, 64, 3)
  assert kept["COFW"]["predictions"].shape == (8, 29, 2)
  study = report.low_resolution_study(config, contrast_points, 1.0, mesh, sides=(16, 128),
                                      max_batches=1)
  full = report.default_nmes(kept)
  assert set(study) == {16, 128} and set(study[16]) == set(config.data.datasets)
  # 128 px is above the 51 px face of a 64 px crop: the input is unchanged.
  assert study[128]["COFW"] == pytest.approx(full["COFW"])
  assert study[16]["COFW"] != pytest.approx(full["COFW"])
