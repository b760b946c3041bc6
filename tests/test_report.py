"""Tests of the evaluation report: tables, C(p) grouping, CED plot, Markdown and JSON.

The report is pure functions of per-image arrays (`metrics.SplitPredictions`);
these tests give it hand-made predictions with known answers. The studies'
passes and `run.py eval` end to end are in test_evaluate_workdir.py.
"""

import json

import cv2
import numpy as np
import pytest

from fgtbt_jax.data import pipeline
from fgtbt_jax.data import datasets
from fgtbt_jax import landmarks
from fgtbt_jax import metrics
from fgtbt_jax import report
from fgtbt_jax import studies


def samples_of(dataset: str, count: int = 4, shift: float = 0.0, seed: int = 0,
               images=None) -> metrics.SplitPredictions:
  """Mean faces (100 px box) with predictions moved `shift` px along x."""
  protocol = landmarks.get_protocol(dataset)
  rng = np.random.default_rng(seed)
  face = landmarks.mean_face()[protocol.unified_index].astype(np.float64)
  face = (face - face.min(0)) / np.ptp(face, axis=0).max() * 100.0
  gt = face[None] + rng.uniform(0, 20, (count, 1, 2))
  pred = gt + np.array([shift, 0.0])
  flags = {name: np.arange(count) % 2 == 0 for name in pipeline.eval_subsets(dataset)}
  return metrics.SplitPredictions(
      dataset=protocol.name, predictions=pred, confidence=np.ones(gt.shape[:2]),
      ground_truth=gt, box_size=np.full(count, 100.0), baseline=gt, subsets=flags,
      images=np.zeros((0, 64, 64, 3), np.uint8) if images is None else images)


def _table(split, threshold=0.1):
  return report.dataset_table(split, threshold)


def test_perfect_predictions_give_zero_nme_and_auc_one():
  for dataset in landmarks.PROTOCOL_NAMES:
    table = _table(samples_of(dataset))
    assert list(table)[0] == "full"
    assert table["full"][landmarks.get_protocol(dataset).default_normalizer]["count"] == 4
    for subset in table.values():
      for row in subset.values():
        assert row["nme"] == 0 and row["auc"] == 1 and row["fr"] == 0
    assert set(report.nme_by_occurrence(samples_of(dataset)).values()) == {0.0}


def test_known_shift_gives_the_hand_computed_nme_per_normaliser_and_count():
  samples = samples_of("AFLW", shift=5.0)  # Box normaliser 100 px: NME 0.05 exactly.
  table = _table(samples)
  assert table["full"]["box"]["nme"] == pytest.approx(0.05)
  assert table["full"]["box"]["auc"] == pytest.approx(0.5)
  assert table["frontal"]["box"]["count"] == 2
  # Every point moves by 5 px, so each C(p) group's mean error is 5 / 100.
  by_count = report.nme_by_occurrence(samples)
  counts = set(landmarks.OCCURRENCE_COUNT[landmarks.get_protocol("AFLW").unified_index].tolist())
  assert set(by_count) == counts
  assert all(v == pytest.approx(0.05) for v in by_count.values())


def test_occurrence_groups_average_only_their_own_points():
  protocol = landmarks.get_protocol("300W")
  samples = samples_of("300W", count=2)
  counts = landmarks.OCCURRENCE_COUNT[protocol.unified_index]
  # Move only the points with C(p) = 4 by 3 px; others stay perfect.
  moved = np.where(counts == 4, 3.0, 0.0)[None, :, None] * np.array([1.0, 0.0])
  samples.predictions = samples.predictions + moved
  gt = samples.ground_truth
  distance = np.linalg.norm(gt[:, 36] - gt[:, 45], axis=-1)
  by_count = report.nme_by_occurrence(samples)
  assert by_count[4] == pytest.approx(np.mean(3.0 / distance))
  assert all(by_count[c] == 0 for c in by_count if c != 4)
  table = _table(samples)
  share = (counts == 4).mean()
  assert table["full"]["inter_ocular"]["nme"] == pytest.approx(np.mean(3.0 * share / distance))


def test_bad_per_image_input_names_the_dataset_and_field(tmp_path):
  samples = samples_of("COFW")
  samples.box_size = samples.box_size[:2]
  with pytest.raises(ValueError, match="per_image\\['COFW'\\].*box sizes do not match"):
    _table(samples)
  samples = samples_of("COFW")
  samples.predictions = samples.predictions[:, :10]
  with pytest.raises(ValueError, match="per_image\\['COFW'\\].predictions.*\\(B, 29, 2\\)"):
    _table(samples)
  with pytest.raises(ValueError, match="unknown datasets \\['XYZ'\\]"):
    report.write_report({"XYZ": samples_of("COFW")}, tmp_path, title="t", threshold=0.1)
  with pytest.raises(ValueError, match="threshold must be positive"):
    report.write_report({"COFW": samples_of("COFW")}, tmp_path, title="t", threshold=0.0)


def test_paper_results_hold_the_reported_numbers():
  paper = datasets.paper_results()
  assert paper["300W"]["full"]["inter_ocular"] == 3.06
  assert paper["WFLW"]["pose"]["inter_ocular"] == 7.43
  assert paper["COFW"]["full"] == {"inter_pupil": 4.79, "fr": 0.59}
  assert paper["AFLW"]["full"]["box"] == 1.67
  # Every WFLW subset the pipeline produces has a paper number.
  assert set(pipeline.eval_subsets("WFLW")) < set(paper["WFLW"])


def test_report_writes_tables_ced_and_the_paper_column_only_for_real_data(tmp_path):
  images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), np.uint8)
  per_image = {"WFLW": samples_of("WFLW", shift=2.0, images=images),
               "AFLW": samples_of("AFLW", shift=2.0)}
  real = report.write_report(per_image, tmp_path / "real", title="real run", threshold=0.1,
                             frequency=("fft", 20.0))
  text = real.read_text()
  assert "### WFLW" in text and "### AFLW" in text and "paper FGTBT NME %" in text
  assert "7.43 (inter_ocular)" in text and "1.67 (box)" in text
  assert "FR@0.1 %" in text and "AUC@0.1" in text
  summary = json.loads((tmp_path / "real" / "report.json").read_text())
  assert summary["tables"]["AFLW"]["full"]["box"]["nme"] == pytest.approx(0.02)
  assert summary["paper"]["WFLW"]["full"]["inter_ocular"] == 4.42
  assert summary["synthetic"] == [] and summary["threshold"] == 0.1
  ced = cv2.imread(str(tmp_path / "real" / "ced.png"))
  assert ced.shape == (480, 640, 3) and (ced != 255).any()
  grid = cv2.imread(str(tmp_path / "real" / "high_frequency.png"))
  assert grid.shape == (128, 64, 3)

  # Synthetic rows say so and get no paper column; a real row beside them keeps its own.
  mixed = report.write_report(per_image, tmp_path / "mixed", title="mixed run", threshold=0.1,
                              synthetic={"WFLW"},
                              studies={"lowres": {16: {"WFLW": 0.3, "AFLW": 0.2}}})
  text = mixed.read_text()
  assert "### WFLW (synthetic stand-in data)" in text and "### AFLW\n" in text
  assert "7.43 (inter_ocular)" not in text and "1.67 (box)" in text
  assert "| 16 | 30.00 | 20.00 |" in text
  summary = json.loads((tmp_path / "mixed" / "report.json").read_text())
  assert summary["synthetic"] == ["WFLW"] and set(summary["paper"]) == {"AFLW"}


def test_the_failure_threshold_sets_fr_auc_and_their_headers(tmp_path):
  # AFLW with a 100 px box: a 6 px shift is NME 0.06, a failure at 0.05, not at 0.1.
  per_image = {"AFLW": samples_of("AFLW", shift=6.0)}
  strict = report.write_report(per_image, tmp_path / "a", title="t", threshold=0.05)
  summary = json.loads((tmp_path / "a" / "report.json").read_text())
  assert summary["tables"]["AFLW"]["full"]["box"]["fr"] == 1.0
  assert "FR@0.05 %" in strict.read_text() and "AUC@0.05" in strict.read_text()
  report.write_report(per_image, tmp_path / "b", title="t", threshold=0.1)
  summary = json.loads((tmp_path / "b" / "report.json").read_text())
  assert summary["tables"]["AFLW"]["full"]["box"]["fr"] == 0.0


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
  np.testing.assert_array_equal(studies.degrade_resolution(images, 128, 1.25), images)
  degraded = studies.degrade_resolution(images, 16, 1.25)
  assert degraded.shape == images.shape
  assert np.abs(np.diff(degraded.astype(float), axis=2)).mean() < \
      0.5 * np.abs(np.diff(images.astype(float), axis=2)).mean()


def test_the_bias_section_and_an_fr_from_another_normaliser(tmp_path):
  split = samples_of("COFW", shift=3.0)
  error = np.zeros(split.ground_truth.shape)
  error[..., 0], error[..., 1] = 0.25, -0.5
  error[0, 0] = np.nan  # Not annotated: left out.
  split.signed_error = error
  report.write_report({"COFW": split}, tmp_path, title="t", threshold=0.05,
                      failure_normalizer="inter_ocular")
  text = (tmp_path / "report.md").read_text()
  assert "## Per-axis bias" in text and "| COFW | +0.250 | -0.500 |" in text
  assert "FR@0.05 % (inter_ocular)" in text
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["bias_heatmap_px"]["COFW"] == {"x": 0.25, "y": -0.5}
