import numpy as np
import pytest

from fgtbt_jax import landmarks as L
from fgtbt_jax import metrics as M

# A 3-point protocol with every normaliser kind, for hand-computed answers.
TOY = L.Protocol(
    name="TOY", dataset_id=-1, num_landmarks=3,
    unified_index=np.arange(3, dtype=np.int32), flip_pairs=((0, 1),),
    flip_permutation=np.array([1, 0, 2], np.int32),
    normalizers={"inter_ocular": L.Normalizer("points", (0,), (1,)),
                 "centroids": L.Normalizer("centroids", (0, 2), (1,)),
                 "box": L.Normalizer("box")},
    default_normalizer="inter_ocular")


def _face(protocol: str, batch: int = 2) -> np.ndarray:
  p = L.get_protocol(protocol)
  return np.repeat(100 * L.mean_face()[p.unified_index][None], batch, 0).astype(np.float64)


def test_toy_nme_by_hand():
  gt = np.array([[[0, 0], [4, 0], [2, 3]]], np.float64)
  pred = gt + np.array([[0, 0], [3, 4], [1, 0]])
  # Errors 0, 5, 1 -> mean 2; inter-ocular d = 4.
  np.testing.assert_allclose(M.nme(pred, gt, TOY), [0.5])
  # Centroid of points 0 and 2 is (1, 1.5); to point 1 (4, 0): sqrt(9 + 2.25).
  np.testing.assert_allclose(M.nme(pred, gt, TOY, "centroids"), [2 / np.sqrt(11.25)])
  np.testing.assert_allclose(M.nme(pred, gt, TOY, "box", box_size=[8.0]), [0.25])
  # Masking the worst point: mean of 0 and 1 over d = 4.
  np.testing.assert_allclose(M.nme(pred, gt, TOY, mask=[[True, False, True]]), [0.125])


def test_wflw_inter_ocular_by_hand():
  gt = _face("WFLW")
  gt[:, 60] = [10, 20]
  gt[:, 72] = [70, 20]  # d = 60
  pred = gt + [3, 4]  # Every point off by 5.
  pred[1, 5] += [6, 8]  # Image 1: one point off by (9, 12) -> 15.
  np.testing.assert_allclose(M.normalizing_distance(gt, "WFLW"), [60, 60])
  np.testing.assert_allclose(M.nme(pred, gt, "WFLW"), [5 / 60, (97 * 5 + 15) / 98 / 60])
  # The other normaliser by name: inter-pupil uses points 96 and 97.
  d_ip = np.linalg.norm(gt[0, 96] - gt[0, 97])
  np.testing.assert_allclose(M.nme(pred, gt, "WFLW", "inter_pupil")[0], 5 / d_ip)


def test_300w_inter_ocular_and_centroid_inter_pupil_by_hand():
  gt = _face("300W", batch=1)
  gt[0, 36:42] = [[0, 0], [2, 0], [4, 0], [0, 2], [2, 2], [4, 2]]  # Centre (2, 1).
  gt[0, 42:48] = [[30, 40], [32, 40], [34, 40], [30, 42], [32, 42], [34, 42]]  # Centre (32, 41).
  np.testing.assert_allclose(M.normalizing_distance(gt, "300W", "inter_pupil"), [50.0])
  # Default is inter-ocular: outer corners 36 (0, 0) and 45 (30, 42).
  np.testing.assert_allclose(M.normalizing_distance(gt, "300W"), [np.hypot(30, 42)])
  pred = gt.copy()
  pred[0, 0] += [0, 68]  # One point off by 68: mean error 1.
  np.testing.assert_allclose(M.nme(pred, gt, "300W", "inter_pupil"), [1 / 50])


def test_cofw_and_aflw_defaults():
  gt = _face("COFW", batch=1)
  gt[0, 16], gt[0, 17] = [10, 10], [10, 50]
  pred = gt + [0, 0.4]
  np.testing.assert_allclose(M.nme(pred, gt, "COFW"), [0.4 / 40])
  gt = _face("AFLW")
  pred = gt + [6, 8]
  np.testing.assert_allclose(M.nme(pred, gt, "AFLW", box_size=[100.0, 50.0]), [0.1, 0.2])
  protocol = L.get_protocol("AFLW")
  assert protocol.default_normalizer == "box"
  d = np.linalg.norm(gt[:, 7] - gt[:, 10], axis=-1)
  np.testing.assert_allclose(M.nme(pred, gt, protocol, "inter_pupil"), 10 / d)


def test_masked_nan_is_allowed_unmasked_nan_raises():
  gt = _face("WFLW")
  pred = gt.copy()
  pred[1, 3] = np.nan
  gt[0, 7] = np.nan
  mask = np.ones((2, 98), bool)
  mask[1, 3] = mask[0, 7] = False
  np.testing.assert_allclose(M.nme(pred, gt, "WFLW", mask=mask), [0.0, 0.0])
  with pytest.raises(ValueError, match="prediction is not finite at image 1, point 3"):
    M.nme(pred, gt, "WFLW")
  with pytest.raises(ValueError, match="ground truth is not finite at image 0, point 7"):
    M.nme(_face("WFLW"), gt, "WFLW")
  mask[:, 60] = False
  gt[1, 60] = np.nan  # A masked normalising point must still be finite.
  with pytest.raises(ValueError, match="normalising distance of image 1"):
    M.nme(gt, gt, "WFLW", mask=mask)
  with pytest.raises(ValueError, match="image 0 has no unmasked landmark"):
    M.nme(gt, gt, "WFLW", mask=np.zeros((2, 98), bool))


def test_zero_distance_and_bad_arguments_raise():
  gt = _face("WFLW", batch=3)
  gt[2, 72] = gt[2, 60]
  with pytest.raises(ValueError, match="normalising distance of image 2 is 0"):
    M.nme(gt, gt, "WFLW")
  valid = r"expected one of \['inter_ocular', 'inter_pupil'\]"
  with pytest.raises(ValueError, match=r"unknown normalizer 'box' for WFLW; " + valid):
    M.normalizing_distance(gt, "WFLW", "box")
  aflw = _face("AFLW")
  with pytest.raises(ValueError, match="needs box_size"):
    M.nme(aflw, aflw, "AFLW")
  with pytest.raises(ValueError, match=r"box_size: expected shape \(2,\)"):
    M.nme(aflw, aflw, "AFLW", box_size=[1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match=r"expected shape \(B, 98, 2\) for WFLW"):
    M.nme(gt[:, :68], gt[:, :68], "WFLW")
  with pytest.raises(ValueError, match="differs from ground truth"):
    M.nme(gt[:2], gt, "WFLW")
  with pytest.raises(ValueError, match=r"mask: expected shape \(3, 98\)"):
    M.nme(gt, gt, "WFLW", mask=np.ones((3, 97), bool))
  with pytest.raises(ValueError, match="unknown protocol"):
    M.nme(gt, gt, "LFPW")


def test_auc_and_failure_rate_edge_cases():
  assert M.auc(np.zeros(5)) == 1.0 and M.failure_rate(np.zeros(5)) == 0.0
  above = [0.11, 0.5, 3.0]
  assert M.auc(above) == 0.0 and M.failure_rate(above) == 1.0
  # Exactly at the threshold: not a failure, but it adds no area either.
  at = [0.1, 0.1]
  assert M.failure_rate(at) == 0.0 and M.auc(at) == 0.0
  # CED: 0 on [0, .02), 1/2 on [.02, .06), 1 on [.06, .1] -> area .5*.04 + .04 = .06.
  np.testing.assert_allclose(M.auc([0.02, 0.06]), 0.6)
  np.testing.assert_allclose(M.auc([0.02, 0.06], threshold=0.08), (0.5 * 0.04 + 0.02) / 0.08)
  assert M.failure_rate([0.02, 0.06, 0.2, 0.09], threshold=0.08) == 0.5


def test_auc_matches_fine_numerical_integration_of_ced():
  nmes = np.random.default_rng(0).gamma(2.0, 0.02, 400)
  errors, fraction = M.ced_curve(nmes, num=200001)
  np.testing.assert_allclose(np.trapezoid(fraction, errors) / 0.1, M.auc(nmes), atol=1e-5)


def test_ced_curve_is_monotone_and_consistent():
  nmes = np.array([0.0, 0.03, 0.03, 0.07, 0.2])
  errors, fraction = M.ced_curve(nmes, num=11)
  np.testing.assert_allclose(errors, np.linspace(0, 0.1, 11))
  assert (np.diff(fraction) >= 0).all()
  assert fraction[0] == 0.2  # The one exact zero.
  np.testing.assert_allclose(fraction[3], 0.6)  # <= 0.03
  assert fraction[-1] == 1 - M.failure_rate(nmes)
  with pytest.raises(ValueError, match="num >= 2"):
    M.ced_curve(nmes, num=1)


def test_summarize_and_bad_error_lists():
  summary = M.summarize([0.02, 0.06, 0.13])
  assert summary["count"] == 3
  np.testing.assert_allclose(summary["nme"], 0.07)
  np.testing.assert_allclose(summary["fr"], 1 / 3)
  np.testing.assert_allclose(summary["auc"], (0.8 + 0.4 + 0.0) / 3)
  for bad, message in (([], "empty"), ([0.1, np.nan], "value 1 is nan"),
                       ([-0.01], "value 0 is -0.01")):
    with pytest.raises(ValueError, match=message):
      M.summarize(bad)
  with pytest.raises(ValueError, match="threshold must be positive"):
    M.auc([0.1], threshold=0.0)
