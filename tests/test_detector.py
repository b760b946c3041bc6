"""Tests of the face detectors: dlib's CNN and HOG, the Haar fallback, "auto", box calibration.

The detectors run on the project's own sample faces (docs/sample_faces) and
on synthetic faces with known landmarks, whose annotation-style box
(`detector.landmark_box`) the adjusted boxes are measured against.
"""

import json
import sys

import cv2
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from fgtbt_jax.data import synthetic
from fgtbt_jax.commands import calibrate_detector
from fgtbt_jax.deploy import calibrate
from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax.errors import DataError
from fgtbt_jax.images import load_image
from fgtbt_jax import models
from fgtbt_jax.inference import PredictSettings
from fgtbt_jax.deploy.predictor import Predictor
import helpers

SAMPLES = helpers.REPO / "docs" / "sample_faces"
HAS_HAAR = (detector_lib._cascade_classifier_class() is not None
            and detector_lib.bundled_cascade_path() is not None)
try:
  detector_lib.mmod_weights_path()
  NO_CNN_WEIGHTS = None
except detector_lib.DetectorUnavailableError as e:
  NO_CNN_WEIGHTS = f"dlib's CNN detector cannot run here: {e}"
needs_cnn_weights = pytest.mark.skipif(NO_CNN_WEIGHTS is not None, reason=str(NO_CNN_WEIGHTS))


class FlatHeatmaps(nn.Module):
  """A stand-in landmark model: flat heatmaps (the detector path is what is tested)."""

  @nn.compact
  def __call__(self, images, train=False):
    return jnp.zeros(images.shape[:1] + (images.shape[1] // 2, images.shape[2] // 2, 124))


def box_errors(box, points):
  """(centre distance, longer-side ratio) of `box` against the landmarks' annotation box."""
  reference = detector_lib.landmark_box(points)
  side = (reference[2:] - reference[:2]).max()
  centre = np.linalg.norm((box[:2] + box[2:]) / 2 - (reference[:2] + reference[2:]) / 2)
  return centre / side, (box[2:] - box[:2]).max() / side


def test_dlib_finds_the_sample_faces_and_each_face_of_a_group():
  detector = detector_lib.default_detector(input_kind="video")  # "auto" on video frames.
  assert isinstance(detector, detector_lib.DlibHogDetector)
  described = detector_lib.describe_detector(detector)
  assert described["name"] == "dlib_hog" and described["fallback_reason"] is None
  assert described["box_adjustment"] == {"scale": 1.031, "shift_x": 0.0, "shift_y": 0.107}
  images = [load_image(SAMPLES / name) for name in ("face_frontal.jpg", "face_occluded.jpg")]
  for image in images:
    [box] = detector(image)  # One face each (the second partly occluded and turned).
    detector_lib.check_boxes(box, image.shape)
    assert 0.35 * 256 < (box[2:] - box[:2]).max() < 0.75 * 256
  # Both side by side, the second shrunk to 0.6x: two faces, the larger first.
  group = np.zeros((256, 420, 3), np.uint8)
  group[:, :256] = images[0]
  group[40:40 + 154, 262:262 + 154] = cv2.resize(images[1], (154, 154),
                                                 interpolation=cv2.INTER_AREA)
  boxes = detector(group)
  assert len(boxes) == 2 and boxes[0, 2] < 256 < boxes[1, 0]
  np.testing.assert_allclose(detector_lib.largest_faces(boxes[::-1], 1), boxes[:1])


def test_dlib_boxes_match_annotation_boxes_after_the_synthetic_adjustment():
  # Faces rolled 18 and -20 degrees (yaw 12 and -10), which the Haar cascade misses.
  detector = detector_lib.DlibHogDetector(adjustment="synthetic")
  for index in (2, 11):
    image, points, info = synthetic.render_face(0, index, 256, clean=True)
    [box] = detector(image)
    centre, ratio = box_errors(box, points)
    assert centre < 0.12 and 0.8 < ratio < 1.25, (index, info["yaw"], info["roll"])
    if HAS_HAAR:
      assert len(detector_lib.HaarCascadeDetector()(image)) == 0
  with pytest.raises(ValueError, match="upsample must be >= 0"):
    detector_lib.DlibHogDetector(upsample=-1)
  with pytest.raises(ValueError, match="box adjustment 'studio'"):
    detector_lib.DlibHogDetector(adjustment="studio")


@pytest.mark.skipif(not HAS_HAAR, reason="this OpenCV has no Haar cascade")
def test_without_dlib_the_default_detector_falls_back_to_haar_and_says_so(monkeypatch):
  monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` raises ImportError.
  with pytest.raises(detector_lib.DetectorUnavailableError, match="dlib-bin==20.0.1.post1"):
    detector_lib.DlibHogDetector()
  detector = detector_lib.default_detector()
  assert isinstance(detector, detector_lib.HaarCascadeDetector)
  described = detector.describe()
  assert described["name"] == "haar_cascade"
  assert "dlib is not installed" in described["fallback_reason"]
  assert described["box_adjustment"]["scale"] == pytest.approx(0.888)
  [box] = detector(load_image(SAMPLES / "face_frontal.jpg"))
  assert 0.35 * 256 < (box[2:] - box[:2]).max() < 0.75 * 256
  # The predictor's default detector falls back the same way and its JSON says so.
  predictor = Predictor(models.model_config("tiny"), {}, model=FlatHeatmaps(),
                        settings=PredictSettings(decoder="argmax", flip_test=False))
  [result] = predictor.predict(str(SAMPLES / "face_frontal.jpg"))
  content = json.loads(json.dumps(result.to_json()))
  assert content["boxes_from"] == "detector" and len(content["faces"]) == 1
  assert content["detector"]["name"] == "haar_cascade"
  assert "dlib is not installed" in content["detector"]["fallback_reason"]
  assert detector_lib.make_detector("haar_cascade", "synthetic").adjustment.scale == 1.013
  # Neither detector: one message with both reasons.
  monkeypatch.setattr(detector_lib, "_cascade_classifier_class", lambda: None)
  with pytest.raises(detector_lib.DetectorUnavailableError,
                     match="no face detector can run: dlib is not installed.*opencv_contrib"):
    detector_lib.default_detector()


@needs_cnn_weights
def test_the_cnn_detector_finds_the_sample_faces_in_boxes_close_to_hogs():
  """dlib's MMOD CNN, weights from face_recognition_models: "auto" for still images."""
  detector = detector_lib.default_detector()
  assert isinstance(detector, detector_lib.DlibCnnDetector)
  described = json.loads(json.dumps(detector_lib.describe_detector(detector)))
  assert described["name"] == "dlib_cnn" and described["fallback_reason"] is None
  assert described["max_side"] == detector_lib.DLIB_CNN_MAX_SIDE and described["upsample"] == 0
  assert described["min_side"] == detector_lib.DLIB_CNN_MIN_SIDE
  assert described["weights"] == "mmod_human_face_detector.dat"
  hog = detector_lib.DlibHogDetector()
  for name in ("face_frontal.jpg", "face_occluded.jpg"):
    image = load_image(SAMPLES / name)
    [box] = detector(image)
    detector_lib.check_boxes(box, image.shape)
    [reference] = hog(image)  # Both adjusted to annotation-style boxes for real faces.
    side = (reference[2:] - reference[:2]).max()
    centre = np.linalg.norm((box[:2] + box[2:]) / 2 - (reference[:2] + reference[2:]) / 2)
    assert centre < 0.15 * side and 0.8 < (box[2:] - box[:2]).max() / side < 1.25, (name, box,
                                                                                      reference)
  # A large image is searched at max_side and its boxes mapped back to its pixels.
  big = cv2.resize(load_image(SAMPLES / "face_frontal.jpg"), (1536, 1536),
                   interpolation=cv2.INTER_CUBIC)
  small = detector_lib.DlibCnnDetector(max_side=256, min_side=256)
  [scaled] = small(big)
  [direct] = small(load_image(SAMPLES / "face_frontal.jpg"))
  np.testing.assert_allclose(scaled, (direct + 0.5) * 6 - 0.5, atol=0.5 * 6)
  # A small image is scaled up to min_side: a face of about 40 px is found.
  image, points, _ = synthetic.render_face(7, 0, 64, clean=True)
  [box] = detector_lib.DlibCnnDetector(adjustment="synthetic")(image)
  centre, ratio = box_errors(box, points)
  assert centre < 0.15 and 0.75 < ratio < 1.3, (centre, ratio)
  with pytest.raises(ValueError, match="upsample must be >= 0"):
    detector_lib.DlibCnnDetector(upsample=-1)
  with pytest.raises(ValueError, match="min_side <= max_side"):
    detector_lib.DlibCnnDetector(max_side=320)


def test_without_face_recognition_models_the_cnn_says_what_to_install(monkeypatch, caplog):
  """No weights package: the CNN detector fails naming the pip command, and "auto" on
  images uses HOG with one warning and the reason in its JSON."""
  real_find_spec = detector_lib.importlib.util.find_spec
  monkeypatch.setattr(detector_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "face_recognition_models"
                      else real_find_spec(name, *a))
  with pytest.raises(detector_lib.DetectorUnavailableError,
                     match=r"face_recognition_models is not installed; "
                           r"pip install face_recognition_models==0\.3\.0"):
    detector_lib.DlibCnnDetector()
  with pytest.raises(detector_lib.DetectorUnavailableError, match="pip install face_recog"):
    detector_lib.make_detector("dlib_cnn")
  with caplog.at_level("WARNING"):
    detector = detector_lib.make_detector("auto")
  assert isinstance(detector, detector_lib.DlibHogDetector)
  assert "pip install face_recognition_models" in detector.describe()["fallback_reason"]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "using dlib_hog instead" in warnings[0], warnings
  # Video frames use HOG anyway: nothing is missing, nothing to warn about.
  caplog.clear()
  with caplog.at_level("WARNING"):
    video_detector = detector_lib.make_detector("auto", input_kind="video")
  assert video_detector.fallback_reason is None and not caplog.records


def test_auto_resolves_per_input_kind(monkeypatch):
  expected = {"image": (detector_lib.DlibCnnDetector if NO_CNN_WEIGHTS is None
                        else detector_lib.DlibHogDetector),
              "video": detector_lib.DlibHogDetector}
  for kind, cls in expected.items():
    detector = detector_lib.make_detector("auto", "synthetic", input_kind=kind)
    assert type(detector) is cls, kind  # pylint: disable=unidiomatic-typecheck
    assert detector.adjustment == detector_lib.BOX_ADJUSTMENTS[detector.name]["synthetic"]
  assert detector_lib.DETECTOR_CHOICES == ("auto", "dlib_cnn", "dlib_hog", "haar_cascade")
  with pytest.raises(ValueError, match="unknown input kind 'stills'"):
    detector_lib.make_detector("auto", input_kind="stills")
  with pytest.raises(ValueError, match="unknown face detector 'mtcnn'"):
    detector_lib.make_detector("mtcnn")
  if HAS_HAAR:  # Without dlib both kinds come down to the Haar cascade, saying why.
    monkeypatch.setitem(sys.modules, "dlib", None)
    for kind in detector_lib.INPUT_KINDS:
      detector = detector_lib.make_detector("auto", input_kind=kind)
      assert isinstance(detector, detector_lib.HaarCascadeDetector)
      assert "dlib is not installed" in detector.fallback_reason


def test_parse_box_adjustment():
  assert detector_lib.parse_box_adjustment("real") == "real"
  assert detector_lib.parse_box_adjustment(" 1.2,0.01,-0.1") == detector_lib.BoxAdjustment(
      1.2, 0.01, -0.1)
  for bad in ("1.2,0.1", "0,0,0", "a,b,c", "nan,0,0"):
    with pytest.raises(ValueError, match="expected one of real, synthetic or three numbers"):
      detector_lib.parse_box_adjustment(bad)
  with pytest.raises(ValueError, match="unknown face detector 'mtcnn'"):
    detector_lib.make_detector("mtcnn")


def write_faces(folder, faces):
  """Writes (image, points) pairs as PNGs and the faces JSON; returns its path."""
  content = {}
  for i, (image, points) in enumerate(faces):
    cv2.imwrite(str(folder / f"face{i}.png"), image[..., ::-1])
    content[f"face{i}.png"] = [points.tolist()]
  path = folder / "faces.json"
  path.write_text(json.dumps(content))
  return path


def test_calibrate_fits_a_detector_on_annotated_faces_from_the_command_line(tmp_path, capsys):
  faces = list(synthetic.calibration_faces(12, 192, seed=1))
  faces_file = write_faces(tmp_path, faces)
  out = tmp_path / "fit" / "dlib.json"
  assert calibrate_detector.main(["--faces", str(faces_file), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  fit = json.loads(out.read_text())
  assert fit["detector"] == "dlib_hog" and fit["num_faces"] == 12 and fit["num_matched"] >= 9
  adjustment = detector_lib.BoxAdjustment(**fit["box_adjustment"])
  # Close to the adjustment measured on 240 such faces (the synthetic entry).
  measured = detector_lib.BOX_ADJUSTMENTS["dlib_hog"]["synthetic"]
  assert abs(adjustment.scale - measured.scale) < 0.08
  assert abs(adjustment.shift_y - measured.shift_y) < 0.05
  assert fit["centre_error"]["p50"] < 0.08
  assert fit["box_adjustment_flag"] in printed and "found" in printed
  # The printed flag is what --box_adjustment parses; the detector with it
  # puts boxes on the annotation boxes.
  parsed = detector_lib.parse_box_adjustment(fit["box_adjustment_flag"].split("=", 1)[1])
  detector = detector_lib.DlibHogDetector(adjustment=parsed)
  image, points = faces[0]
  centre, ratio = box_errors(detector(image)[0], points)
  assert centre < 0.12 and 0.85 < ratio < 1.2


def test_calibration_inputs_are_checked_with_one_line_messages(tmp_path, capsys):
  image, points = next(synthetic.calibration_faces(1, 96))
  cv2.imwrite(str(tmp_path / "a.png"), image)
  cases = {
      "empty.json": ("", "empty.json: the faces file is empty"),
      "list.json": ("[1, 2]", "list.json: expected a non-empty JSON object"),
      "missing.json": (json.dumps({"nowhere.png": [points.tolist()]}),
                       "missing.json:nowhere.png: image .*nowhere.png does not exist"),
      "short.json": (json.dumps({"a.png": [[[1, 2]]]}),
                     r"short.json:a.png\[0\]: expected a face as a list of at least two"),
      "bad.json": ('{"a.png": [[[1, 2], "x"]]}', r"bad.json:a.png\[0\]: expected a face"),
  }
  for name, (text, message) in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message) as caught:
      list(calibrate.read_annotated_faces(tmp_path / name))
    assert "\n" not in str(caught.value)
  with pytest.raises(DataError, match="absent.json: cannot read the faces file"):
    calibrate.read_annotated_faces(tmp_path / "absent.json")
  # One face may be given directly as its points; null points are missing ones.
  (tmp_path / "one.json").write_text(json.dumps({"a.png": points.tolist()[:-1] + [None]}))
  [(loaded, read)] = list(calibrate.read_annotated_faces(tmp_path / "one.json"))
  assert loaded.shape == (96, 96, 3) and np.isnan(read[-1]).all()
  # The command line: too few faces found is one line, exit status 1.
  with pytest.raises(SystemExit) as exited:
    calibrate_detector.main(["--faces", str(tmp_path / "one.json"), "--detector", "dlib_hog"])
  assert exited.value.code == 1
  assert "found only" in capsys.readouterr().err
