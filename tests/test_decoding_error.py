import numpy as np
import pytest

from fgtbt_jax import landmarks as L
from fgtbt_jax import metrics as M
from fgtbt_jax import decoding_error as Q
from fgtbt_jax.commands import decoding_error as command

# Mean distance from the centre of a unit square to a uniform point in it:
# argmax's error in heatmap pixels when the sub-pixel phase is uniform.
ARGMAX_MEAN_ERROR = (np.sqrt(2) + np.arcsinh(1)) / 6  # 0.3826


def test_random_meanface_landmarks_placement():
  faces = Q.random_meanface_landmarks(200, 96, seed=0)
  assert faces.shape == (200, 98, 2) and faces.dtype == np.float32
  assert faces.min() >= 0 and faces.max() <= 95
  # Scale from the rotation-invariant inter-ocular distance (points 60, 72).
  mean = L.mean_face()[L.PROTOCOLS["WFLW"].unified_index]
  mean_eye_line = mean[72] - mean[60]
  width = M.normalizing_distance(faces, "WFLW") * np.ptp(mean[:, 0]) / np.linalg.norm(mean_eye_line)
  assert 0.55 * 96 - 1e-3 <= width.min() and width.max() <= 0.8 * 96 + 1e-3
  assert width.max() - width.min() > 0.2 * 96
  eye_line = faces[:, 72] - faces[:, 60]
  angle = np.degrees(np.arctan2(eye_line[:, 1], eye_line[:, 0])
                     - np.arctan2(mean_eye_line[1], mean_eye_line[0]))
  assert np.abs(angle).max() <= 10 + 1e-3 and np.abs(angle).max() > 8
  # Positions spread over the input, phases are uniform-ish.
  assert np.ptp(faces[:, :, 0].mean(1)) > 10
  phase = faces - np.round(faces)
  assert np.abs(phase.mean()) < 0.02 and phase.std() > 0.25


def test_random_meanface_landmarks_seed_and_protocols():
  a = Q.random_meanface_landmarks(5, 64, seed=1)
  np.testing.assert_array_equal(a, Q.random_meanface_landmarks(5, 64, seed=1))
  assert not np.allclose(a, Q.random_meanface_landmarks(5, 64, seed=2))
  # Same faces in every protocol: shared unified points coincide.
  cofw = Q.random_meanface_landmarks(5, 64, seed=1, protocol="COFW")
  wflw_index = L.PROTOCOLS["WFLW"].unified_index.tolist()
  for own, unified in enumerate(L.PROTOCOLS["COFW"].unified_index):
    if unified in wflw_index:
      np.testing.assert_array_equal(cofw[:, own], a[:, wflw_index.index(unified)])
  with pytest.raises(ValueError, match="num_faces"):
    Q.random_meanface_landmarks(0, 64, seed=0)


@pytest.mark.parametrize("input_size,heatmap_size", [(64, 32), (64, 16)])
def test_decoding_error_known_answers(input_size, heatmap_size):
  faces = Q.random_meanface_landmarks(24, input_size, seed=3)
  stride = input_size / heatmap_size
  result = Q.decoding_error(input_size, heatmap_size, 1.5, faces, "WFLW")
  assert set(result) == {"argmax", "quarter", "subpixel"}
  # Argmax costs its mean quantisation error, in input pixels, over d.
  expected = ARGMAX_MEAN_ERROR * stride * np.mean(1 / M.normalizing_distance(faces, "WFLW"))
  np.testing.assert_allclose(result["argmax"], expected, rtol=0.1)
  # Quarter leaves a uniform error in [-0.25, 0.25] per axis: half of argmax's.
  np.testing.assert_allclose(result["quarter"], expected / 2, rtol=0.15)
  assert result["subpixel"] < 1e-3 * result["argmax"]


def test_rounded_targets_cost_the_rounding_for_every_decoder():
  faces = Q.random_meanface_landmarks(12, 64, seed=4)
  exact = Q.decoding_error(64, 32, 2.0, faces, methods=("argmax",))
  rounded = Q.decoding_error(64, 32, 2.0, faces, rounded_targets=True)
  # Integer-centred targets are decoded to their own centre by every method.
  for method in ("quarter", "subpixel"):
    np.testing.assert_allclose(rounded[method], rounded["argmax"], rtol=1e-5)
  np.testing.assert_allclose(rounded["argmax"], exact["argmax"], rtol=1e-5)


def test_decoding_error_other_normalizer_and_bad_input():
  faces = Q.random_meanface_landmarks(4, 64, seed=5, protocol="300W")
  io = Q.decoding_error(64, 16, 1.5, faces, "300W", methods=("argmax",))
  ip = Q.decoding_error(64, 16, 1.5, faces, "300W", "inter_pupil", methods=("argmax",))
  # Inter-pupil (eye centres) is shorter than inter-ocular (outer corners).
  assert ip["argmax"] > io["argmax"]
  outside = faces.copy()
  outside[2, 7] = [64.2, 3.0]
  with pytest.raises(ValueError, match="landmark 7 of face 2"):
    Q.decoding_error(64, 16, 1.5, outside, "300W")
  with pytest.raises(ValueError, match=r"unknown decoders \['dark'\]"):
    Q.decoding_error(64, 16, 1.5, faces, "300W", methods=("argmax", "dark"))
  with pytest.raises(ValueError, match=r"expected shape \(M, 98, 2\) for WFLW"):
    Q.decoding_error(64, 16, 1.5, faces, "WFLW")


def test_main_prints_markdown_table(capsys):
  table = command.table(["--setting", "64:16:1.5", "--setting", "48:24:2", "--num_faces", "3"])
  assert capsys.readouterr().out.strip() == table.strip()
  lines = table.splitlines()
  assert lines[0].startswith("WFLW inter_ocular NME (%)")
  assert lines[2] == ("| input | heatmap | sigma | targets | "
                      "argmax NME % | quarter NME % | subpixel NME % |")
  rows = [line.split("|")[1:-1] for line in lines[4:]]
  assert [(r[0].strip(), r[1].strip(), r[2].strip(), r[3].strip()) for r in rows] == [
      ("64", "16x16", "1.5", "exact"), ("64", "16x16", "1.5", "rounded"),
      ("48", "24x24", "2", "exact"), ("48", "24x24", "2", "rounded")]
  argmax, quarter, subpixel = (float(v) for v in rows[0][4:])
  assert subpixel < quarter < argmax
  with pytest.raises(SystemExit):
    command.table(["--setting", "64x16"])
