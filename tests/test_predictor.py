"""Tests of the predictor, the face detector helpers and the overlays / file prediction.

Two kinds of model:
* the tiny FGTBT with random weights (consistency: batch vs single image,
  protocol subsets, grey / RGBA inputs);
* `TargetModel`, which outputs perfect Gaussian heatmaps of known landmarks,
  so that the whole path (crop warp, batching, flip merge, decoding, mapping
  back) must recover the landmarks in original image pixels. Each test face
  is painted as two flat patches left and right of its box centre; their
  grey levels tell the model which face a crop shows and whether it is
  mirrored (so the flip test sees mirrored heatmaps for mirrored crops).
"""

import json
import sys

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgtbt_jax.data import synthetic
from fgtbt_jax import errors
from fgtbt_jax.errors import DataError
from fgtbt_jax.images import load_image
from fgtbt_jax import crop
from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import models
from fgtbt_jax.deploy import visualization
from fgtbt_jax.deploy.predictor import Predictor
from fgtbt_jax.deploy import predict_files
import helpers

SIZE = 64  # Crop side of the tiny model; heatmaps are 32 x 32.
HEATMAP = SIZE // 2


@pytest.fixture(scope="module")
def tiny_predictor():
  config = models.model_config("tiny")
  return Predictor(config, helpers.model_variables(config), batch_size=4)


def face_image(seed_index: int, size: int):
  image, points, _ = synthetic.render_face(7, seed_index, size, clean=True)
  return image, detector_lib.landmark_box(points)


# -- the tiny network with random weights ------------------------------------------


def test_batch_prediction_equals_one_image_at_a_time(tiny_predictor):
  (a, box_a), (b, box_b), (c, box_c) = face_image(0, 96), face_image(1, 128), face_image(2, 80)
  # Image b twice over with a second, shifted box: 5 faces -> 2 batches of 4.
  boxes_b = np.stack([box_b, box_b + [6, -4, 6, -4]])
  together = tiny_predictor.predict([a, b, c], boxes=[box_a, boxes_b, np.stack([box_c, box_c])])
  assert [r.num_faces for r in together] == [1, 2, 2]
  singles = [tiny_predictor.predict(a, boxes=box_a)[0],
             tiny_predictor.predict(b, boxes=boxes_b)[0],
             tiny_predictor.predict(c, boxes=[box_c, box_c])[0]]
  for joint, single in zip(together, singles):
    assert joint.landmarks.shape == (joint.num_faces, 124, 2)
    np.testing.assert_allclose(joint.landmarks, single.landmarks, atol=1e-3)
    np.testing.assert_allclose(joint.confidence, single.confidence, atol=1e-5)
  # The same box on the same image gives the same face twice.
  np.testing.assert_allclose(together[2].landmarks[0], together[2].landmarks[1], atol=1e-4)
  # Images of three sizes, 1 to 5 faces: one compilation (fixed padded batches).
  assert tiny_predictor.inference_fn()._cache_size() == 1


def test_a_batch_dependent_model_runs_its_batches_unpadded(tmp_path):
  """The authors' FGSA pools over the batch (`fgsa_compat="authors"`): a single face
  gets the model's batch-of-one answer, not its answer among black padding crops,
  through `Predictor` and the predict command's `predict_files`; a remainder
  batch runs at its own size."""
  from fgtbt_jax import inference
  config = models.model_config("tiny", fgsa_compat="authors")
  predictor = Predictor(config, helpers.model_variables(config), batch_size=4)
  assert predictor.batch_dependent and not models.batch_dependent(models.model_config("tiny"))
  faces = [face_image(i, 96) for i in range(5)]
  crops = np.concatenate([predictor.crop_faces(image, box[None])[0] for image, box in faces])
  direct = jax.jit(inference.make_predict_fn(inference.model_apply(predictor.model),
                                             predictor.settings))
  run = lambda batch: np.asarray(direct(predictor.variables, batch)[0])
  alone = run(crops[:1])
  among_padding = run(np.concatenate([crops[:1], np.zeros_like(crops[:3])]))[:1]
  assert np.abs(among_padding - alone).max() > 1e-4  # padding would change the answer
  np.testing.assert_allclose(predictor.run_crops(crops[:1])[0], alone, atol=1e-5)
  points = predictor.run_crops(crops)[0]
  np.testing.assert_allclose(points[:4], run(crops[:4]), atol=1e-5)
  np.testing.assert_allclose(points[4:], run(crops[4:]), atol=1e-5)
  assert predictor.inference_fn()._cache_size() == 2  # batches of 4 and of 1
  # One image file through the predict command's path: its batch-of-one answer.
  image, box = faces[0]
  cv2.imwrite(str(tmp_path / "face.png"), image[..., ::-1])
  report = predict_files.predict_files(predictor, tmp_path / "face.png", tmp_path / "out",
                                       box=box)
  assert not report.failed
  written = json.loads((tmp_path / "out" / "face.png.json").read_text())
  matrix = crop.invert_affine(crop.face_crop_affine(*crop.center_scale_from_box(box), SIZE))
  np.testing.assert_allclose(np.asarray(written["faces"][0]["landmarks"]),
                             crop.apply_affine(alone[0].astype(np.float64), matrix), atol=1e-3)


def test_protocol_subsets_are_the_unified_output_gathered(tiny_predictor):
  image, box = face_image(3, 112)
  unified = tiny_predictor.predict(image, boxes=box)[0]
  assert unified.protocol == "unified" and unified.landmarks.shape == (1, 124, 2)
  for name in landmarks.PROTOCOL_NAMES:
    own = tiny_predictor.predict(image, boxes=box, protocol=name.lower())[0]
    index = landmarks.get_protocol(name).unified_index
    assert own.protocol == name
    np.testing.assert_array_equal(own.landmarks, unified.landmarks[:, index])
    np.testing.assert_array_equal(own.confidence, unified.confidence[:, index])


def test_grey_and_rgba_images_match_their_rgb_equivalents(tiny_predictor):
  image, box = face_image(4, 96)
  grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
  rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
  results = tiny_predictor.predict([grey, np.repeat(grey[..., None], 3, 2), rgba, image],
                                   boxes=[box] * 4)
  np.testing.assert_array_equal(results[0].landmarks, results[1].landmarks)
  np.testing.assert_array_equal(results[2].landmarks, results[3].landmarks)
  assert results[0].image_size == (96, 96)


# -- perfect heatmaps: mapping back to the original image ----------------------------


class TargetModel(nn.Module):
  """Outputs the stored target heatmaps of the face a crop shows (mirrored if the crop is)."""

  @nn.compact
  def __call__(self, images, train=False):
    targets = self.get_variable("params", "targets")
    red = images[..., 0] * (models.IMAGENET_STD[0] * 255) + models.IMAGENET_MEAN[0] * 255
    left, right = red[:, SIZE // 2, SIZE // 4], red[:, SIZE // 2, 3 * SIZE // 4]
    face = jnp.round((jnp.minimum(left, right) - 10) / 20).astype(jnp.int32)
    maps = targets[jnp.clip(face, 0, targets.shape[0] - 1)]
    mirrored = heatmaps.flip_heatmaps(maps, landmarks.UNIFIED_FLIP_PERMUTATION)
    return jnp.where((left > right)[:, None, None, None], mirrored, maps)


class Scene:
  """Images with painted test faces, their landmarks and the target heatmaps."""

  def __init__(self):
    self.targets, self.points, self.boxes = [], [], []

  def paint(self, image: np.ndarray, box) -> int:
    """Paints face number n at `box` into `image`; returns n."""
    n = len(self.boxes)
    box = np.asarray(box, np.float64)
    centre, scale = crop.center_scale_from_box(box)
    side = scale * crop.SCALE_UNIT * crop.CROP_ENLARGE
    half = side / 8
    for offset, level in ((-side / 4, 10 + 20 * n), (side / 4, 130 + 20 * n)):
      x, y = centre[0] + offset, centre[1]
      image[int(y - half):int(y + half) + 1, int(x - half):int(x + half) + 1] = level
    points = box[:2] + landmarks.mean_face() * (box[2:] - box[:2])
    to_crop = crop.face_crop_affine(centre, scale, SIZE)
    in_heatmap = heatmaps.input_to_heatmap(crop.apply_affine(points, to_crop), 2.0)
    self.targets.append(np.asarray(heatmaps.render_gaussian(
        in_heatmap, np.ones(124, bool), HEATMAP, HEATMAP, sigma=1.0)))
    self.points.append(points)
    self.boxes.append(box)
    return n

  def predictor(self, **kwargs) -> Predictor:
    variables = {"params": {"targets": np.stack(self.targets)}}
    return Predictor(models.model_config("tiny"), variables, model=TargetModel(), **kwargs)


@pytest.mark.parametrize("flip_test", [True, False])
def test_landmarks_map_back_to_original_pixels_at_any_scale(flip_test):
  scene = Scene()
  small = np.zeros((70, 90, 3), np.uint8)
  scene.paint(small, [20.3, 10.7, 61.9, 55.2])
  medium = np.zeros((480, 640, 3), np.uint8)
  scene.paint(medium, [40.5, 60.25, 240.0, 270.0])
  scene.paint(medium, [380.0, 150.0, 560.5, 330.0])
  huge = np.zeros((3800, 5000, 3), np.uint8)  # Face crops shrink ~50x.
  scene.paint(huge, [1200.4, 700.8, 3900.1, 3350.6])
  predictor = scene.predictor(batch_size=3)
  results = predictor.predict([small, medium, huge],
                              boxes=[scene.boxes[0], scene.boxes[1:3], scene.boxes[3]],
                              flip_test=flip_test)
  found = np.concatenate([r.landmarks for r in results])
  assert found.shape == (4, 124, 2)
  error = np.abs(found - np.stack(scene.points)).max(axis=(1, 2))
  assert (error < 0.1).all(), error
  # Peaks are off pixel centres by at most half a pixel per axis (sigma 1).
  assert (np.concatenate([r.confidence for r in results]) > np.exp(-0.25) - 1e-4).all()
  assert results[2].image_size == (3800, 5000)
  np.testing.assert_allclose(results[1].boxes, np.stack(scene.boxes[1:3]), atol=1e-3)


def test_detector_sees_huge_images_downscaled_and_boxes_map_back():
  scene = Scene()
  huge = np.zeros((3000, 4000, 3), np.uint8)
  scene.paint(huge, [1000.0, 900.0, 2600.0, 2500.0])
  seen = []

  def detector(image):
    seen.append(image.shape)
    # The face box in the 1024 x 768 copy (scale 0.256 exactly).
    return np.array([[1000.0, 900.0, 2600.0, 2500.0]]) * 0.256 + 0.256 * 0.5 - 0.5

  predictor = scene.predictor(detector=detector, max_detection_side=1024)
  [result] = predictor.predict(huge)
  assert seen == [(768, 1024, 3)]
  np.testing.assert_allclose(result.boxes[0], scene.boxes[0], atol=1e-3)
  assert np.abs(result.landmarks[0] - scene.points[0]).max() < 0.1


def test_image_without_a_face_gives_an_empty_result():
  scene = Scene()
  image = np.zeros((50, 60, 3), np.uint8)
  scene.paint(image, [10, 10, 40, 40])
  predictor = scene.predictor(detector=lambda image: np.zeros((0, 4)), batch_size=2)
  [empty, found] = predictor.predict([image, image], boxes=[None, [10, 10, 40, 40]],
                                     protocol="300W")
  assert empty.num_faces == 0
  assert empty.landmarks.shape == (0, 68, 2) and empty.confidence.shape == (0, 68)
  assert found.num_faces == 1
  assert empty.to_json()["faces"] == []


def test_warp_to_crop_area_averages_big_shrinks():
  # A fine checkerboard averages to grey; bilinear point sampling would not.
  board = (np.indices((2000, 2000)).sum(0) % 2 * 255).astype(np.uint8)
  image = np.repeat(board[..., None], 3, 2)
  to_crop = crop.face_crop_affine([999.5, 999.5], 1000 / 200, SIZE)
  warped = crop.warp_to_crop(image, to_crop, SIZE)
  inner = warped[8:-8, 8:-8].astype(np.float64)
  assert abs(inner.mean() - 127.5) < 2 and inner.std() < 3


def test_warp_to_crop_area_path_keeps_the_crop_geometry():
  # On a smooth image, area-then-bilinear equals plain bilinear sampling.
  y, x = np.mgrid[0:2500, 0:3000].astype(np.float64)
  smooth = 127 + 100 * np.sin(2 * np.pi * x / 900) * np.cos(2 * np.pi * y / 700)
  image = np.repeat(np.round(smooth).astype(np.uint8)[..., None], 3, 2)
  to_crop = crop.face_crop_affine([1400.3, 1200.7], 1600 / 200, SIZE)
  direct = cv2.warpAffine(image, to_crop, (SIZE, SIZE), flags=cv2.INTER_LINEAR)
  warped = crop.warp_to_crop(image, to_crop, SIZE)
  assert np.abs(warped.astype(int) - direct.astype(int)).max() <= 3


# -- bad inputs ---------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tmp_path):
  scene = Scene()
  image = np.zeros((100, 120, 3), np.uint8)
  scene.paint(image, [20, 20, 80, 80])
  predictor = scene.predictor()
  not_an_image = tmp_path / "notes.jpg"
  not_an_image.write_text("not an image")
  with pytest.raises(DataError, match="notes.jpg"):
    predictor.predict(str(not_an_image), boxes=[0, 0, 10, 10])
  with pytest.raises(ValueError, match=r"face box 1 \[30.0, 30.0, 30.0, 50.0\] has zero"):
    predictor.predict(image, boxes=[[20, 20, 80, 80], [30, 30, 30, 50]])
  with pytest.raises(ValueError, match=r"face box 0 \[200.0, 10.0, 260.0, 70.0\] lies outside "
                                       r"the 120 x 100 image"):
    predictor.predict(image, boxes=[200, 10, 260, 70])
  with pytest.raises(ValueError, match="not finite"):
    predictor.predict(image, boxes=[np.nan, 0, 10, 10])
  with pytest.raises(ValueError, match="2 box entries for 1 images"):
    predictor.predict([image], boxes=[None, None])
  with pytest.raises(ValueError, match="unknown protocol"):
    predictor.predict(image, boxes=[20, 20, 80, 80], protocol="LFW")
  with pytest.raises(ValueError, match=r"returned shape \(3,\)"):
    scene.predictor(detector=lambda image: np.zeros(3)).predict(image)


def test_haar_detector_without_a_cascade_says_why(monkeypatch):
  """OpenCV 5 moved CascadeClassifier to opencv_contrib: without dlib too, predicting
  without boxes says so."""
  monkeypatch.setattr(detector_lib, "_cascade_classifier_class", lambda: None)
  with pytest.raises(detector_lib.DetectorUnavailableError, match="opencv_contrib"):
    detector_lib.HaarCascadeDetector()
  monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` raises ImportError.
  with pytest.raises(detector_lib.DetectorUnavailableError, match="opencv_contrib"):
    detector_lib.default_detector()
  predictor = Predictor(models.model_config("tiny"), {}, model=TargetModel())
  with pytest.raises(detector_lib.DetectorUnavailableError, match="Pass face boxes"):
    predictor.predict(np.zeros((64, 64, 3), np.uint8))


@pytest.mark.skipif(detector_lib._cascade_classifier_class() is None
                    or detector_lib.bundled_cascade_path() is None,
                    reason="this OpenCV has no Haar cascade (OpenCV 5 moved it to contrib)")
def test_haar_detector_finds_a_synthetic_face_with_an_annotation_style_box():
  # Face 3 of seed 0 is near-upright (roll 3, yaw -10 degrees): the cascade finds it.
  image, points, _ = synthetic.render_face(0, 3, 320, clean=True)
  [box] = detector_lib.HaarCascadeDetector(adjustment="synthetic")(image)
  reference = detector_lib.landmark_box(points)
  side = (reference[2:] - reference[:2]).max()
  centre_error = np.linalg.norm((box[:2] + box[2:]) / 2 - (reference[:2] + reference[2:]) / 2)
  assert centre_error < 0.1 * side
  assert 0.8 < (box[2:] - box[:2]).max() / side < 1.2
  # Without the adjustment the box sits clearly higher than the annotation box.
  raw = detector_lib.HaarCascadeDetector(adjustment=detector_lib.BoxAdjustment())(image)[0]
  assert (reference[1] + reference[3]) / 2 - (raw[1] + raw[3]) / 2 > 0.08 * side
  with pytest.raises(detector_lib.DetectorUnavailableError, match="not found"):
    detector_lib.HaarCascadeDetector("/nonexistent/cascade.xml")


# -- detector helpers -----------------------------------------------------------------


def test_calibration_recovers_a_known_box_adjustment():
  images, faces = [], {}
  for index in range(10):
    image, points, _ = synthetic.render_face(0, index, 192, clean=True)
    images.append(image)
    faces[image.tobytes()] = detector_lib.landmark_box(points)

  def tight_detector(image):
    """Boxes 0.8x the annotation box, centred 10% of their height higher."""
    box = faces[image.tobytes()]
    centre, size = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) * 0.8
    centre = centre - [0.0, 0.1 * size[1]]
    return np.array([np.concatenate([centre - size / 2, centre + size / 2])])

  calibration = detector_lib.calibrate_box_adjustment(
      tight_detector, synthetic.calibration_faces(10, 192, seed=0), min_matched=10)
  assert calibration.num_matched == 10
  adjustment = calibration.adjustment
  assert adjustment.scale == pytest.approx(1.25)
  assert adjustment.shift_x == pytest.approx(0.0, abs=1e-9)
  assert adjustment.shift_y == pytest.approx(0.1)
  np.testing.assert_allclose(adjustment.apply(tight_detector(images[3])),
                             faces[images[3].tobytes()][None], atol=1e-9)
  with pytest.raises(ValueError, match="found only 0 of 3"):
    detector_lib.calibrate_box_adjustment(lambda image: np.zeros((0, 4)),
                                          synthetic.calibration_faces(3, 64), min_matched=1)


def test_landmark_box_pads_the_longer_side():
  box = detector_lib.landmark_box([[10, 20], [110, 70], [np.nan, np.nan]])
  np.testing.assert_allclose(box, [5, 15, 115, 75])


# -- overlays and file prediction ----------------------------------------------------------


def test_a_low_quality_label_never_reads_as_the_threshold():
  assert [visualization.quality_label(c) for c in (0.5974, 0.6, 0.29, 0.999)] == [
      "0.59", "0.60", "0.29", "0.99"]


def test_draw_landmarks_colours_points_by_face_part():
  image = np.zeros((200, 200, 3), np.uint8)
  protocol = landmarks.get_protocol("WFLW")
  points = 20 + 160 * landmarks.mean_face()[protocol.unified_index]
  overlay = visualization.draw_landmarks(image, points, "WFLW", radius=1.5,
                                         boxes=[[10, 10, 190, 190]])
  assert not image.any()  # The input is not drawn on.
  for own, (x, y) in ((0, points[0]), (96, points[96]), (51, points[51]), (33, points[33])):
    part = landmarks.FACE_PARTS[int(protocol.unified_index[own])]
    np.testing.assert_array_equal(overlay[int(round(y)), int(round(x))],
                                  visualization.PART_COLORS[part])
  assert overlay[10, 50].min() > 200 and not overlay[14, 50].any()  # The box's top edge.
  with pytest.raises(ValueError, match="WFLW has 98 points"):
    visualization.draw_landmarks(image, points[:68], "WFLW")


def test_labels_and_dots_scale_with_the_face():
  # A 600 px face on a 1,920 px photo gets a readable label; a 37 px face's
  # 124 dots stay apart (finer than the old 1.5 px minimum radius).
  def label_rows(width):
    image = np.zeros((1080, 1920, 3), np.uint8)
    box = [300.0, 400.0, 300.0 + width, 400.0 + width]
    points = np.array(box[:2]) + width * landmarks.mean_face()
    overlay = visualization.draw_landmarks(image, points, boxes=[box], low_quality=[True],
                                           face_confidence=[0.4])
    red = (overlay[:400, :, 0] > 150) & (overlay[:400, :, 1] < 120)
    return np.ptp(np.flatnonzero(red.any(1))) + 1

  assert label_rows(600) > 25 > label_rows(100) > 4
  small = visualization.draw_landmarks(np.zeros((64, 64, 3), np.uint8),
                                       10 + 37 * landmarks.mean_face())
  big_dots = visualization.draw_landmarks(np.zeros((64, 64, 3), np.uint8),
                                          10 + 37 * landmarks.mean_face(), radius=1.5)
  ink = lambda overlay: int(overlay.astype(np.int64).sum())  # noqa: E731
  assert ink(small) < 0.8 * ink(big_dots)  # 0.65 measured: anti-aliased 0.6 px dots


def test_predict_files_writes_json_and_overlays_and_reports_failures(tmp_path):
  scene = Scene()
  inputs = tmp_path / "in"
  inputs.mkdir()
  frames = []
  for name in ("a.png", "b.png"):
    image = np.zeros((120, 150, 3), np.uint8)
    scene.paint(image, [30, 20, 110, 100])
    cv2.imwrite(str(inputs / name), image)
  cv2.imwrite(str(inputs / "c_empty.png"), np.full((60, 60, 3), 250, np.uint8))
  (inputs / "d_broken.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
  (inputs / "notes.txt").write_text("skipped: not an image extension")
  writer = cv2.VideoWriter(str(inputs / "e_clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5,
                           (150, 120))
  for _ in range(3):
    frame = np.zeros((120, 150, 3), np.uint8)
    scene.paint(frame, [30, 20, 110, 100])
    frames.append(frame)
    writer.write(frame)
  writer.release()
  (inputs / "f_junk.avi").write_bytes(b"junk")

  def detector(image):
    return np.zeros((0, 4)) if image.mean() > 200 else np.array([[30.0, 20.0, 110.0, 100.0]])

  predictor = scene.predictor(detector=detector, batch_size=2)
  out = tmp_path / "out"
  report = predict_files.predict_files(predictor, inputs, out, protocol="COFW")
  by_name = {f.source.split("/")[-1]: f for f in report.files}
  assert sorted(by_name) == ["a.png", "b.png", "c_empty.png", "d_broken.jpg", "e_clip.avi",
                             "f_junk.avi"]
  assert by_name["c_empty.png"].error.endswith("c_empty.png: no face found")
  assert "truncated JPEG" in by_name["d_broken.jpg"].error
  assert "f_junk.avi: not a readable video" in by_name["f_junk.avi"].error
  assert not list(out.glob("f_junk.avi*"))  # a failed video leaves no empty outputs
  assert {f.source for f in report.failed} == {by_name[n].source for n in (
      "c_empty.png", "d_broken.jpg", "f_junk.avi")}
  content = json.loads((out / "a.png.json").read_text())
  assert content["protocol"] == "COFW" and content["image_size"] == {"height": 120, "width": 150}
  assert content["flip_test"] is True and content["decoder"] == "subpixel"
  assert content["smoothing_sigma"] == 0.0
  [face] = content["faces"]
  cofw = landmarks.get_protocol("COFW").unified_index
  np.testing.assert_allclose(face["landmarks"], scene.points[0][cofw], atol=0.1)
  assert face["box"] == [30.0, 20.0, 110.0, 100.0] and len(face["confidence"]) == 29
  overlay = cv2.imread(str(out / "a.png.overlay.png"))
  assert overlay.shape == (120, 150, 3) and overlay.any()
  video = by_name["e_clip.avi"]
  assert video.error is None and video.num_frames == 3 and video.num_faces == 3
  lines = (out / "e_clip.avi.frames.jsonl").read_text().splitlines()
  assert len(lines) == 3
  for index, line in enumerate(lines):
    frame_json = json.loads(line)
    assert frame_json["frame"] == index and len(frame_json["faces"]) == 1
    assert frame_json["faces"][0]["track_id"] == 0
    assert frame_json["detector_ran"] == (index == 0)  # Then the landmarks carry the box.
  summary = json.loads((out / "e_clip.avi.json").read_text())
  assert summary["num_frames"] == 3 and summary["detector_runs"] == 1
  assert summary["smoothing"] == {"min_cutoff": 1.0, "beta": 10.0, "d_cutoff": 1.0}
  assert "smoothing" not in content  # Still images are never smoothed.
  capture = cv2.VideoCapture(str(out / "e_clip.avi.overlay.avi"))
  assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 3
  capture.release()
  assert "3 of 6 files done" in report.summary()


def test_folders_are_searched_with_their_subfolders(tmp_path):
  for relative in ("top.jpg", "sub/deeper/face.PNG", "sub/clip.mp4", "sub/notes.txt",
                   ".cache/hidden.jpg", "sub/.hidden/also.jpg", "sub/face.overlay.png"):
    (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / relative).write_bytes(b"x")
  assert predict_files.list_inputs(tmp_path) == [
      tmp_path / "sub" / "clip.mp4", tmp_path / "sub" / "deeper" / "face.PNG", tmp_path / "top.jpg"]
  # Names the same file in a subfolder and by name: done once.
  assert len(predict_files.list_inputs([tmp_path, tmp_path / "top.jpg"])) == 3


def test_inputs_of_the_same_name_in_different_folders_get_distinct_outputs(tmp_path):
  scene = Scene()
  for folder in ("a", "b"):
    (tmp_path / "in" / folder).mkdir(parents=True)
    image = np.zeros((120, 150, 3), np.uint8)
    scene.paint(image, [30, 20, 110, 100])
    cv2.imwrite(str(tmp_path / "in" / folder / "x.png"), image)
  (tmp_path / "in" / "y.png").write_bytes(cv2.imencode(".png", image)[1].tobytes())
  inputs = [tmp_path / "in" / "a", tmp_path / "in" / "b" / "x.png", tmp_path / "in" / "y.png",
            tmp_path / "in" / "a" / "x.png"]  # The last one twice: done once.
  assert predict_files.output_names(predict_files.list_inputs(inputs)) == {
      tmp_path / "in" / "a" / "x.png": "a__x.png", tmp_path / "in" / "b" / "x.png": "b__x.png",
      tmp_path / "in" / "y.png": "y.png"}
  predictor = scene.predictor(detector=lambda image: np.array([[30.0, 20.0, 110.0, 100.0]]))
  report = predict_files.predict_files(predictor, inputs, tmp_path / "out")
  assert "3 of 3 files done" in report.summary()
  for name, source in (("a__x.png", "a/x.png"), ("b__x.png", "b/x.png"), ("y.png", "y.png")):
    content = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    assert content["source"] == str(tmp_path / "in" / source)
    assert (tmp_path / "out" / f"{name}.overlay.png").is_file()


def test_an_absurd_box_fails_its_file_and_outputs_inside_inputs_are_not_inputs(tmp_path):
  scene = Scene()
  image = np.zeros((120, 150, 3), np.uint8)
  scene.paint(image, [30, 20, 110, 100])
  cv2.imwrite(str(tmp_path / "a.png"), image)
  predictor = scene.predictor()
  report = predict_files.predict_files(predictor, tmp_path, tmp_path / "out",
                                       box=[-1e9, -1e9, 1e9, 1e9])
  [failed] = report.failed
  assert "is more than 4 times the 150 x 120 image" in failed.error
  # The overlays of a run written inside the input folder are not read back.
  report = predict_files.predict_files(predictor, tmp_path, tmp_path / "out",
                                       box=[30, 20, 110, 100])
  assert [f.source for f in report.files] == [str(tmp_path / "a.png")] and not report.failed
  again = predict_files.predict_files(predictor, [tmp_path, tmp_path / "out"], tmp_path / "out",
                                      box=[30, 20, 110, 100])
  assert [f.source for f in again.files] == [str(tmp_path / "a.png")]
  # Outputs into the inputs' own folder: the inputs are predicted (named or
  # listed), twice over, and the overlays are never inputs.
  for sources in (tmp_path / "a.png", tmp_path, [tmp_path, tmp_path / "a.png"]):
    own = predict_files.predict_files(predictor, sources, tmp_path, box=[30, 20, 110, 100])
    assert [f.source for f in own.files] == [str(tmp_path / "a.png")] and not own.failed
    assert (tmp_path / "a.png.json").is_file() and (tmp_path / "a.png.overlay.png").is_file()
  # A named overlay is an input like any image.
  named = predict_files.predict_files(predictor, tmp_path / "a.png.overlay.png", tmp_path / "o2",
                                      box=[30, 20, 110, 100])
  assert len(named.files) == 1 and not named.failed
  # A folder of overlays alone holds nothing to do: an error, not "0 of 0 files done".
  with pytest.raises(predict_files.InputError, match="no image or video files"):
    predict_files.check_inputs([str(tmp_path / "o2")])


def test_an_exif_rotated_photo_gives_the_landmarks_of_its_upright_copy(tmp_path):
  """A phone JPEG stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to
  view) is predicted upright: the same landmarks, in displayed coordinates, as an
  upright copy, through `Predictor` and the predict command."""
  from PIL import Image
  scene = Scene()
  upright = np.zeros((120, 150, 3), np.uint8)
  scene.paint(upright, [30, 20, 110, 100])
  predictor = scene.predictor()
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=100)
  Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1))).save(
      tmp_path / "phone.jpg", quality=100, exif=exif.tobytes())
  box = [30, 20, 110, 100]  # where a viewer shows the face
  [phone, copy] = predictor.predict([tmp_path / "phone.jpg", tmp_path / "upright.jpg"],
                                    boxes=[box, box])
  assert phone.image_size == copy.image_size == (120, 150)
  np.testing.assert_allclose(phone.landmarks, copy.landmarks, atol=1e-3)
  np.testing.assert_allclose(phone.landmarks[0], scene.points[0], atol=0.2)
  report = predict_files.predict_files(predictor, [tmp_path / "phone.jpg"], tmp_path / "out",
                                       box=box)
  written = json.loads((tmp_path / "out" / "phone.jpg.json").read_text())
  np.testing.assert_allclose(written["faces"][0]["landmarks"], copy.landmarks[0], atol=1e-3)
  assert not report.failed


def test_predict_into_a_read_only_run_is_one_line_before_the_model_loads(tmp_path):
  """The default --out of an archived run (a read-only mount holding predictions/)."""
  run = tmp_path / "run"
  for folder in ("checkpoints", "predictions"):
    (run / folder).mkdir(parents=True)
  (run / "config.json").write_text("{}")  # a stand-in: nothing is loaded before the check
  image = tmp_path / "a.png"
  cv2.imwrite(str(image), np.zeros((40, 40, 3), np.uint8))
  with helpers.read_only_view(run, tmp_path / "archived") as archived:
    with pytest.raises(errors.OutputError, match=r"archived/predictions: the output folder "
                                                 r"cannot be written \(Read-only file system\); "
                                                 r"pass --out=DIR"):
      predict_files.predict_main(archived, [str(image)], box=[1, 1, 30, 30])


def test_boxes_file_gives_several_faces_per_image_and_detected_faces_are_all_predicted(
    tmp_path):
  scene = Scene()
  inputs = tmp_path / "in"
  inputs.mkdir()
  two = np.zeros((120, 240, 3), np.uint8)
  left, right = scene.paint(two, [20, 20, 100, 100]), scene.paint(two, [140, 30, 210, 100])
  cv2.imwrite(str(inputs / "two.png"), two)
  three = np.zeros((120, 240, 3), np.uint8)
  for box in ([10, 10, 70, 70], [90, 20, 170, 100], [180, 40, 230, 90]):
    scene.paint(three, box)
  cv2.imwrite(str(inputs / "three.png"), three)
  boxes_file = tmp_path / "boxes.json"
  boxes_file.write_text(json.dumps({str(inputs / "two.png"): [scene.boxes[left].tolist(),
                                                               scene.boxes[right].tolist()]}))
  boxes = predict_files.read_boxes_file(boxes_file)
  found = []

  def detector(image):
    found.append(image.shape)
    return np.array(scene.boxes[2:5])  # three.png's faces, largest first: 1, 0, 2.

  # Given boxes are all used; detected faces are the max_faces largest.
  predictor = scene.predictor(detector=detector, max_faces=2, min_face_confidence=0.5)
  report = predict_files.predict_files(predictor, inputs, tmp_path / "out", boxes=boxes,
                                       boxes_source=str(boxes_file), protocol="AFLW")
  assert not report.failed and found == [(120, 240, 3)]  # Only three.png was detected.
  given = json.loads((tmp_path / "out" / "two.png.json").read_text())
  assert given["boxes_from"] == "given" and given["detector"] is None
  aflw = landmarks.get_protocol("AFLW").unified_index
  assert [f["box"] for f in given["faces"]] == [scene.boxes[0].tolist(), scene.boxes[1].tolist()]
  for face, n in zip(given["faces"], (left, right)):
    np.testing.assert_allclose(face["landmarks"], scene.points[n][aflw], atol=0.1)
    assert face["face_confidence"] > 0.7 and face["low_quality"] is False
  detected = json.loads((tmp_path / "out" / "three.png.json").read_text())
  assert detected["boxes_from"] == "detector" and detected["max_faces"] == 2
  assert detected["detector"] == {"name": "detector"}  # A plain function: its name.
  assert [f["box"] for f in detected["faces"]] == [[90, 20, 170, 100], [10, 10, 70, 70]]
  np.testing.assert_allclose(detected["faces"][0]["landmarks"], scene.points[3][aflw], atol=0.1)
  # Every face found without max_faces; a quality threshold above every face flags them
  # (red boxes on the overlay).
  predictor = scene.predictor(detector=detector, min_face_confidence=1.5)
  predict_files.predict_files(predictor, inputs / "three.png", tmp_path / "all")
  content = json.loads((tmp_path / "all" / "three.png.json").read_text())
  assert len(content["faces"]) == 3 and content["min_face_confidence"] == 1.5
  assert all(f["low_quality"] for f in content["faces"])
  overlay = cv2.imread(str(tmp_path / "all" / "three.png.overlay.png"))[..., ::-1]
  red = (overlay[..., 0] > 200) & (overlay[..., 1] < 90) & (overlay[..., 2] < 90)
  assert red[18:22, 90:170].any()  # The top edge of the face at [90, 20, 170, 100].


def test_bad_boxes_files_and_boxes_outside_the_image_give_one_line_errors(tmp_path):
  scene = Scene()
  image = np.zeros((120, 150, 3), np.uint8)
  scene.paint(image, [30, 20, 110, 100])
  cv2.imwrite(str(tmp_path / "a.png"), image)
  cv2.imwrite(str(tmp_path / "b.png"), image)
  cases = {
      "empty.json": ("", "empty.json: the boxes file is empty"),
      "blank.json": ("{}", "blank.json: the boxes file names no image"),
      "broken.json": ('{"a.png": [[1, 2, 3, 4]', r"broken.json:1:\d+: not valid JSON"),
      "none.json": ('{"a.png": []}', "none.json:a.png: expected a non-empty list of boxes"),
      "flat.json": ('{"a.png": [[30, 20, 30, 100]]}', r"flat.json:a.png: face box 0 .* zero"),
      # Numbers only: true is not 1, "20" is not 20, NaN is not a box corner.
      "bools.json": ('{"a.png": [true, 20, 110, 100]}',
                     r"bools.json:a.png: expected a non-empty list of boxes .*got \[true"),
      "strings.json": ('{"a.png": [[30, "20", 110, 100]]}', "strings.json:a.png: expected"),
      "nan.json": ('{"a.png": [[NaN, 20, 110, 100]]}', r"nan.json:a.png: face box 0 .* not finite"),
  }
  for name, (text, message) in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message) as caught:
      predict_files.read_boxes_file(tmp_path / name)
    assert "\n" not in str(caught.value)
  # An output folder that cannot be made: one line, before the model loads (the
  # stand-in run below has no weights at all).
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "run" / "config.json").write_text("{}")
  (tmp_path / "taken").write_text("a file")
  with pytest.raises(errors.OutputError, match=r"taken: the output folder exists and is not a "
                                               r"folder; pass --out=DIR"):
    predict_files.predict_main(tmp_path / "run", [str(tmp_path / "a.png")], box=[1, 1, 9, 9],
                               out_dir=str(tmp_path / "taken"))
  with pytest.raises(DataError, match="zero: not a regular file"):
    load_image("/dev/zero")
  with pytest.raises(ValueError, match="min_face_confidence must be a number, got nan"):
    scene.predictor(min_face_confidence=float("nan"))
  with pytest.raises(DataError, match="absent.json: cannot read the boxes file"):
    predict_files.read_boxes_file(tmp_path / "absent.json")
  # A box list for an image that is not among the inputs: checked before the model loads.
  (tmp_path / "ghost.json").write_text(json.dumps({"ghost.png": [[1, 1, 20, 20]]}))
  with pytest.raises(DataError, match=r"ghost.json:ghost.png: no such input image or video") \
      as caught:
    predict_files.predict_main(tmp_path / "no_run", [str(tmp_path / "a.png")],
                               boxes_file=str(tmp_path / "ghost.json"))
  assert "\n" not in str(caught.value)
  with pytest.raises(predict_files.InputError, match="not both"):
    predict_files.predict_main(tmp_path / "no_run", [str(tmp_path / "a.png")], box=[1, 1, 9, 9],
                               boxes_file=str(tmp_path / "ghost.json"))
  # A box outside its image fails that file, named by the boxes file and key; the
  # other file is written.
  (tmp_path / "outside.json").write_text(json.dumps({"a.png": [[200, 10, 260, 70]],
                                                     "b.png": [[30, 20, 110, 100]]}))
  boxes = predict_files.read_boxes_file(tmp_path / "outside.json")
  report = predict_files.predict_files(scene.predictor(), [tmp_path / "a.png", tmp_path / "b.png"],
                                       tmp_path / "out", boxes=boxes,
                                       boxes_source=str(tmp_path / "outside.json"))
  [failed] = report.failed
  assert failed.error == (f"{tmp_path / 'outside.json'}:a.png: face box 0 [200.0, 10.0, 260.0, "
                          "70.0] lies outside the 150 x 120 image")
  assert (tmp_path / "out" / "b.png.json").is_file()
  assert not (tmp_path / "out" / "a.png.json").exists()


# -- loading a training run ------------------------------------------------------------


def test_from_checkpoint_loads_the_ema_variables_of_a_run(tmp_path):
  """A workdir laid out as `train.train_and_evaluate` leaves it (config.json, checkpoints/)."""
  from configs import tiny
  from fgtbt_jax import checkpointing
  config = tiny.get_config()
  state = helpers.write_random_run(tmp_path, config)
  best = jax.tree.map(lambda x: x + 1, state.ema_variables())
  checkpoints = checkpointing.Checkpointer.for_run(config, tmp_path, enable_async=False)
  checkpoints.save_best(2, best, {"300W": 0.2})
  checkpoints.close()

  def assert_same(tree, expected):
    leaves = jax.tree.leaves(jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), tree, expected))
    assert leaves and all(leaves)

  latest = Predictor.from_checkpoint(tmp_path, "latest", batch_size=2)
  assert_same(latest.variables, state.ema_variables())
  assert latest.image_size == 64 and latest.batch_size == 2
  assert latest.model_config.encoder == "tiny"
  assert_same(Predictor.from_checkpoint(tmp_path / "checkpoints", dataset="300w").variables, best)
  with pytest.raises(FileNotFoundError, match="no best checkpoint for WFLW under .*best_WFLW"):
    Predictor.from_checkpoint(tmp_path, "best", dataset="WFLW")
  with pytest.raises(FileNotFoundError, match="not a training workdir"):
    Predictor.from_checkpoint(tmp_path / "checkpoints" / "latest")


@pytest.mark.slow  # Writes a run and compiles its tiny model in float32 (~20 s on 2 cores).
def test_predict_main_with_a_boxes_file_max_faces_and_a_tracked_video(tmp_path):
  from configs import tiny
  from fgtbt_jax import rundir
  (tmp_path / "run").mkdir()
  helpers.write_random_run(tmp_path / "run", tiny.get_config(), scale=None)  # Finite outputs.
  inputs = tmp_path / "in"
  inputs.mkdir()
  samples = helpers.REPO / "docs" / "sample_faces"
  for name in ("face_frontal.jpg", "face_occluded.jpg"):
    (inputs / name).write_bytes((samples / name).read_bytes())
  face = cv2.imread(str(samples / "face_frontal.jpg"))
  writer = cv2.VideoWriter(str(inputs / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                           (320, 256))
  for shift in range(0, 24, 2):  # 12 frames, the face moving right 2 px a frame.
    frame = np.zeros((256, 320, 3), np.uint8)
    frame[:, shift:shift + 256] = face
    writer.write(frame)
  writer.release()
  boxes_file = tmp_path / "boxes.json"
  boxes_file.write_text(json.dumps({"face_frontal.jpg": [[78, 64, 212, 198], [70, 60, 220, 210]]}))
  out = tmp_path / "out"
  # The options as `run.py predict --config.predict.*` sets them. Random
  # weights: heatmap peaks may be negative; no face is dropped as lost.
  config = rundir.load_run_config(tmp_path / "run", {
      "predict.max_faces": 1, "predict.min_face_confidence": -np.inf,
      "predict.detector": "dlib_hog", "predict.detect_every": 4})
  status = predict_files.predict_main(tmp_path / "run", [str(inputs)], str(out), config=config,
                                      which="latest", boxes_file=str(boxes_file))
  assert status == 0
  given = json.loads((out / "face_frontal.jpg.json").read_text())
  assert given["boxes_from"] == "given" and len(given["faces"]) == 2  # Given: all of them.
  detected = json.loads((out / "face_occluded.jpg.json").read_text())
  assert detected["detector"]["name"] == "dlib_hog" and len(detected["faces"]) == 1
  summary = json.loads((out / "clip.avi.json").read_text())
  assert summary["num_frames"] == 12 and summary["detector_runs"] == 3
  lines = [json.loads(line) for line in (out / "clip.avi.frames.jsonl").read_text().splitlines()]
  assert [line["detector_ran"] for line in lines] == [i % 4 == 0 for i in range(12)]
  assert {face["track_id"] for line in lines for face in line["faces"]} == {0}
  capture = cv2.VideoCapture(str(out / "clip.avi.overlay.avi"))
  assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 12
  capture.release()



@pytest.mark.slow  # Writes a run, compiles its tiny model, runs the CNN detector.
def test_auto_detects_stills_and_video_frames_each_with_their_detector(tmp_path):
  # predict.detector="auto": the CNN for still images (when its weights
  # package is installed), HOG for video frames (it runs every few frames).
  from configs import tiny
  from fgtbt_jax import rundir
  (tmp_path / "run").mkdir()
  helpers.write_random_run(tmp_path / "run", tiny.get_config(), scale=None)
  inputs = tmp_path / "in"
  inputs.mkdir()
  face = cv2.imread(str(helpers.REPO / "docs" / "sample_faces" / "face_frontal.jpg"))
  cv2.imwrite(str(inputs / "still.png"), face)
  writer = cv2.VideoWriter(str(inputs / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                           face.shape[1::-1])
  for _ in range(3):
    writer.write(face)
  writer.release()
  config = rundir.load_run_config(tmp_path / "run", {
      "predict.detector": "auto", "predict.min_face_confidence": -np.inf})
  assert predict_files.predict_main(tmp_path / "run", [str(inputs)], str(tmp_path / "out"),
                                    config=config, which="latest") == 0
  still = json.loads((tmp_path / "out" / "still.png.json").read_text())["detector"]["name"]
  clip = json.loads((tmp_path / "out" / "clip.avi.json").read_text())["detector"]["name"]
  cnn = detector_lib.make_detector("auto", input_kind="image")
  assert (still, clip) == (detector_lib.describe_detector(cnn)["name"], "dlib_hog")
