"""Tests for fgtbt_jax.data.synthetic (the renderer and the written datasets) and its command."""

import json
import os

import cv2
import numpy as np
import pytest

from fgtbt_jax.data import readers, synthetic
from fgtbt_jax import landmarks
from fgtbt_jax.errors import UnknownProtocolError
from fgtbt_jax.images import load_image


def _gradient_near(image: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Largest Sobel gradient magnitude within 2 px of each point."""
  grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
  magnitude = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
  local_max = cv2.dilate(magnitude, np.ones((5, 5), np.uint8))
  ix = np.round(points).astype(int)
  return local_max[ix[:, 1], ix[:, 0]]


def test_contour_orders_are_permutations_of_each_part():
  for part in landmarks.PART_NAMES:
    ids = [u for u, p in landmarks.FACE_PARTS.items() if p == part]
    assert sorted(synthetic._ORDER[part].tolist()) == ids
  # 300W's extra eye points are inserted between WFLW's neighbours.
  eye = synthetic._ORDER["right_eye"].tolist()
  assert eye[:4] == [78, 79, 80, 81]
  # The jaw runs from one temple to the other, through the chin.
  jaw = synthetic._ORDER["jaw"]
  mean = landmarks.mean_face()
  assert mean[jaw[0], 0] < 0.2 and mean[jaw[-1], 0] > 0.8
  assert int(np.argmax(mean[jaw, 1])) in range(20, 30)


def test_calibration_faces_are_clean_renders():
  faces = list(synthetic.calibration_faces(3, 96, seed=2))
  assert len(faces) == 3
  for index, (image, points) in enumerate(faces):
    expected_image, expected_points, _ = synthetic.render_face(2, index, 96, clean=True)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(points, expected_points)
    assert image.shape == (96, 96, 3) and points.shape == (124, 2)


def test_render_is_deterministic_per_seed_and_index():
  a = synthetic.render_face(3, 17, image_size=128)
  b = synthetic.render_face(3, 17, image_size=128)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(a[2]["occluded"], b[2]["occluded"])
  assert a[2]["attributes"] == b[2]["attributes"]
  other_index = synthetic.render_face(3, 18, image_size=128)
  other_seed = synthetic.render_face(4, 17, image_size=128)
  assert np.abs(a[1] - other_index[1]).max() > 1.0
  assert np.abs(a[1] - other_seed[1]).max() > 1.0
  # A clean rendering is the same face and pose, without the degradations.
  clean = synthetic.render_face(3, 17, image_size=128, clean=True)
  np.testing.assert_array_equal(a[1], clean[1])
  assert clean[2]["blur_sigma"] == 0 and not clean[2]["occluded"].any()


@pytest.mark.parametrize("image_size", [96, 256])
def test_landmarks_are_inside_the_image(image_size):
  for index in range(25):
    image, points, info = synthetic.render_face(0, index, image_size=image_size)
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    assert points.shape == (124, 2) and points.dtype == np.float32
    assert np.isfinite(points).all()
    assert points.min() >= 0 and points.max() <= image_size - 1
    assert info["occluded"].shape == (124,)


def test_every_landmark_sits_on_drawn_structure():
  """Edges at every landmark are far stronger than in flat skin."""
  for index in range(12):
    image, points, _ = synthetic.render_face(7, index, image_size=256, clean=True)
    at_points = _gradient_near(image, points)
    # Flat skin: cheeks between jaw and nose wing, and the glabella above the nose.
    cheeks = np.stack([(points[12] + points[76]) / 2, (points[36] + points[77]) / 2])
    brow_gap = points[58] - points[53]
    glabella = (points[53] + points[58]) / 2 - 0.3 * np.linalg.norm(brow_gap) * np.asarray([0, 1])
    flat = _gradient_near(image, np.concatenate([cheeks, glabella[None]]))
    weakest = int(np.argmin(at_points))
    assert at_points.min() > 25, (index, weakest, landmarks.FACE_PARTS[weakest])
    assert at_points.min() > 4 * max(flat.max(), 1.0), (index, flat)


def test_occluded_points_lie_under_the_patches():
  found = 0
  for index in range(60):
    image, points, info = synthetic.render_face(11, index, image_size=128)
    if not info["occluded"].any() or info["blur_sigma"] > 0:
      continue
    clean, _, _ = synthetic.render_face(11, index, image_size=128, clean=True)
    ix = np.round(points).astype(int)
    change = np.abs(image.astype(int) - clean.astype(int)).sum(-1)[ix[:, 1], ix[:, 0]]
    occluded = info["occluded"]
    # A patch pixel differs from the face beneath by more than the noise.
    assert np.median(change[occluded]) > 30
    assert np.median(change[~occluded]) < 30
    assert info["attributes"]["occlusion"]
    found += 1
  assert found >= 3


def test_attributes_follow_the_rendering():
  for index in range(40):
    _, _, info = synthetic.render_face(2, index, image_size=64)
    a = info["attributes"]
    assert a["blur"] == (info["blur_sigma"] > 0)
    assert a["occlusion"] == bool(info["occluded"].any())
    assert a["makeup"] == info["makeup"]
    assert a["pose"] == (abs(info["yaw"]) > 25 or abs(info["roll"]) > 25 or abs(info["pitch"]) > 12)


def _index_from_name(name: str) -> int:
  return int("".join(c for c in os.path.basename(name) if c.isdigit()))


def test_written_datasets_read_back_through_the_readers(tmp_path):
  sizes = {"WFLW": (3, 2), "300W": (6, 3), "COFW": (8, 2), "AFLW": (3, 3)}
  seed, size = 5, 96
  paths = synthetic.write_synthetic_datasets(str(tmp_path), sizes, seed=seed,
                                             image_size=size, num_workers=2)
  manifest = json.loads(open(paths["manifest"]).read())
  assert manifest["num_images"] == sum(a + b for a, b in sizes.values())
  assert manifest["images_per_second"] > 0
  for dataset, (num_train, num_test) in sizes.items():
    protocol = landmarks.get_protocol(dataset)
    for split, n in (("train", num_train), ("test", num_test)):
      records, report = readers.read_dataset(dataset, paths[dataset], split)
      assert len(records) == n and report.num_skipped == 0, report.summary()
      for i, record in enumerate(records):
        if dataset in ("WFLW", "300W", "AFLW"):
          index = _index_from_name(record.image_name)
        else:
          index = synthetic.dataset_index(dataset, split, i)
        expected_image, points, info = synthetic.render_face(seed, index, size)
        own = points[protocol.unified_index]
        np.testing.assert_allclose(record.landmarks, own, atol=0.01)
        image = load_image(record.image)
        assert image.shape == (size, size, 3)
        own_occluded = info["occluded"][protocol.unified_index]
        if dataset == "COFW":
          np.testing.assert_array_equal(record.point_flags["occluded"], own_occluded)
          if i % 7 == 3:  # stored grey
            grey = cv2.cvtColor(expected_image, cv2.COLOR_RGB2GRAY)
            np.testing.assert_array_equal(image, np.repeat(grey[..., None], 3, -1))
          else:  # raw pixels: exact, even though rendered in another process
            np.testing.assert_array_equal(image, expected_image)
        else:  # JPEG, quality 90
          assert np.abs(image.astype(int) - expected_image).mean() < 8
        if dataset == "WFLW":
          attributes = dict(info["attributes"], occlusion=bool(own_occluded.any()))
          assert record.subsets == tuple(a for a in readers.common.WFLW_ATTRIBUTES
                                         if attributes[a])
        if dataset == "AFLW" and split == "test":
          assert ("frontal" in record.subsets) == (not own_occluded.any())
          x1, y1, x2, y2 = record.box
          assert record.box_size <= max(x2 - x1, y2 - y1) + 1e-3
      if dataset == "300W" and split == "test":
        assert sorted(r.subsets[0] for r in records) == ["challenging", "common", "common"]
  # The 300W tree follows the real folder shares: 6 train faces -> 1 AFW, 4 HELEN, 1 LFPW.
  root = paths["300W"]
  counts = {d: len([f for f in os.listdir(os.path.join(root, d)) if f.endswith(".pts")])
            for d in ("afw", "helen/trainset", "lfpw/trainset", "helen/testset",
                      "lfpw/testset", "ibug")}
  assert counts == {"afw": 1, "helen/trainset": 4, "lfpw/trainset": 1,
                    "helen/testset": 1, "lfpw/testset": 1, "ibug": 1}
  with open(os.path.join(paths["COFW"], "COFW_train_color.mat"), "rb") as f:
    assert f.read(19) == b"MATLAB 7.3 MAT-file"


def test_one_dataset_in_process_and_bad_sizes(tmp_path):
  paths = synthetic.write_synthetic_datasets(str(tmp_path), {"AFLW": (2, 0)}, image_size=64,
                                             num_workers=0)
  assert set(paths) == {"AFLW", "manifest"}
  records, _ = readers.read_dataset("AFLW", paths["AFLW"], "train")
  assert len(records) == 2
  with pytest.raises(ValueError, match="sizes"):
    synthetic.write_synthetic_datasets(str(tmp_path), {"WFLW": (2,)})
  with pytest.raises(UnknownProtocolError, match="unknown protocol"):
    synthetic.write_synthetic_datasets(str(tmp_path), {"Helen": (2, 2)})


def test_the_cli_writes_raw_datasets_the_converter_reads(tmp_path, capsys):
  from fgtbt_jax.data import readers
  from data_pipelines import synthetic as synthetic_command
  assert synthetic_command.main(["--out", str(tmp_path), "--datasets", "cofw,aflw", "--train", "2",
                             "--test", "1", "--image-size", "64", "--workers", "0"]) == 0
  out = capsys.readouterr().out
  assert f"COFW: 2 train + 1 test faces in {tmp_path / 'COFW'}" in out
  records, _ = readers.read_dataset("AFLW", str(tmp_path / "AFLW"), "train")
  assert len(records) == 2 and not (tmp_path / "WFLW").exists()
  assert synthetic_command.main(["--out", str(tmp_path), "--datasets", "helen"]) == 1
  assert "synthetic: error: unknown protocol 'helen'" in capsys.readouterr().err
  (tmp_path / "a_file").write_text("")
  assert synthetic_command.main(["--out", str(tmp_path / "a_file"), "--train", "1", "--test", "0",
                             "--workers", "0", "--image-size", "64"]) == 1
  assert capsys.readouterr().err.count("\n") == 1
