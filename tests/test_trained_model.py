"""The default model trained briefly by `python run.py`, then used through the Predictor.

One module-scoped run of the default config (the tiny variant at 64 px, FGSA
and FMB-loss on) on a small synthetic set, shortened to a few hundred steps
with a short EMA half-life; the tests then load its checkpoint the way a
user does and predict faces it never saw (another generator seed), whose
landmarks are known.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # Subprocesses: the full suite only (see docs/testing.md).

PROTOCOLS = ("WFLW", "300W", "COFW", "AFLW")
# 450 steps: at 300 the COFW margin depended on the CPU's float rounding (NME 0.69x
# the baseline on one machine, 0.84x on another); at 450 every split is at or below 0.5x.
STEPS = 450
UNSEEN_SEED = 7  # The training data is rendered with seed 0.


@pytest.fixture(scope="module")
def trained_default(tmp_path_factory):
  from fgtbt_jax.data import convert
  data_dir = tmp_path_factory.mktemp("default_data")
  convert.convert_synthetic(data_dir, {name: (120, 16) for name in PROTOCOLS},
                            render_workers=0, num_threads=2)
  workdir = tmp_path_factory.mktemp("default_run") / "workdir"
  process = subprocess.run(
      [sys.executable, str(helpers.REPO / "run.py"), f"--workdir={workdir}",
       f"--config.data.data_dir={data_dir}", "--config.synthetic_data.generate=False",
       f"--config.train.steps={STEPS}", "--config.optimizer.warmup_steps=50",
       "--config.optimizer.lr_decay_steps=(330,405)", "--config.train.ema_half_life_images=200",
       f"--config.train.checkpoint_every={STEPS}", f"--config.train.eval_every={STEPS}"],
      env=helpers.subprocess_env(devices=1, fast_compile=False), capture_output=True, text=True, timeout=900,
      cwd=helpers.REPO)
  assert process.returncode == 0, process.stderr[-4000:]
  return workdir


def _unseen_faces(count: int, size: int = 128):
  from fgtbt_jax.data import synthetic
  faces = [synthetic.render_face(UNSEEN_SEED, i, size, clean=True) for i in range(count)]
  return [image for image, _, _ in faces], np.stack([points for _, points, _ in faces])


def _mean_shape_in_boxes(boxes: np.ndarray, unified_index) -> np.ndarray:
  """The baseline: the protocol's mean-face points scaled to each box's longer side, centred."""
  from fgtbt_jax import landmarks
  points = landmarks.mean_face()[unified_index].astype(np.float64)
  low, high = points.min(0), points.max(0)
  out = []
  for x1, y1, x2, y2 in boxes:
    scale = max(x2 - x1, y2 - y1) / float((high - low).max())
    out.append((points - (low + high) / 2) * scale + [(x1 + x2) / 2, (y1 + y2) / 2])
  return np.stack(out)


def test_the_run_beats_the_mean_shape_baseline_on_every_test_split(trained_default):
  final = json.loads((trained_default / "final_metrics.json").read_text())
  assert final["steps"] == STEPS
  for name in PROTOCOLS:
    assert final[name]["nme"] < 0.8 * final[name]["baseline_nme"], (name, final[name])


@pytest.mark.parametrize("protocol", ["WFLW", "300W"])
def test_predictor_on_unseen_faces_beats_the_mean_shape_baseline(trained_default, protocol):
  from fgtbt_jax.deploy import detector
  from fgtbt_jax import landmarks
  from fgtbt_jax import metrics
  from fgtbt_jax.deploy.predictor import Predictor
  predictor = Predictor.from_checkpoint(trained_default, "best", dataset=protocol)
  images, unified = _unseen_faces(16)
  boxes = np.stack([detector.landmark_box(points) for points in unified])
  results = predictor.predict(images, boxes=[box[None] for box in boxes], protocol=protocol)
  index = landmarks.get_protocol(protocol).unified_index
  truth = unified[:, index]
  predicted = np.stack([r.landmarks[0] for r in results])
  assert predicted.shape == truth.shape
  nme = metrics.nme(predicted, truth, protocol).mean()
  baseline = metrics.nme(_mean_shape_in_boxes(boxes, index), truth, protocol).mean()
  assert nme < 0.8 * baseline, (nme, baseline)
  # Confident where it is right: the heatmap peaks are far above a flat map.
  assert np.mean([r.confidence.mean() for r in results]) > 0.1


def test_detector_path_on_unseen_faces_beats_the_mean_shape_baseline(trained_default):
  """No boxes given: OpenCV's Haar cascade finds the near-upright faces."""
  from fgtbt_jax.deploy import detector
  from fgtbt_jax import landmarks
  from fgtbt_jax import metrics
  from fgtbt_jax.deploy.predictor import Predictor
  predictor = Predictor.from_checkpoint(trained_default, "best", dataset="WFLW")
  images, unified = _unseen_faces(16)
  results = predictor.predict(images, protocol="WFLW")
  found = [i for i, r in enumerate(results) if r.num_faces == 1]
  assert len(found) >= 4, [r.num_faces for r in results]
  index = landmarks.get_protocol("WFLW").unified_index
  truth = unified[found][:, index]
  predicted = np.stack([results[i].landmarks[0] for i in found])
  boxes = np.stack([detector.landmark_box(points) for points in unified[found]])
  nme = metrics.nme(predicted, truth, "WFLW").mean()
  baseline = metrics.nme(_mean_shape_in_boxes(boxes, index), truth, "WFLW").mean()
  assert nme < 0.8 * baseline, (nme, baseline)


def test_flip_test_prediction_of_a_mirrored_image_is_the_mirrored_prediction(trained_default):
  """With the flip test the image -> landmarks path is mirror-symmetric.

  Up to the crop: OpenCV's fixed-point warp is not exactly mirror-symmetric
  (1/32 px steps), which moves most points by thousandths of a pixel and,
  rarely, a point whose heatmap has two near-equal peaks to the other peak.
  Without the flip test the network alone is far from symmetric.
  """
  from fgtbt_jax.deploy import detector
  from fgtbt_jax import landmarks
  from fgtbt_jax.deploy.predictor import Predictor
  predictor = Predictor.from_checkpoint(trained_default, "best", dataset="WFLW")
  images, unified = _unseen_faces(4)
  distances = {True: [], False: []}
  for image, points in zip(images, unified):
    box = detector.landmark_box(points)
    width = image.shape[1]
    mirrored_box = np.array([width - 1 - box[2], box[1], width - 1 - box[0], box[3]])
    mirrored_image = np.ascontiguousarray(image[:, ::-1])
    for flip_test in (True, False):
      [plain] = predictor.predict(image, boxes=box, flip_test=flip_test)
      [mirror] = predictor.predict(mirrored_image, boxes=mirrored_box, flip_test=flip_test)
      expected = landmarks.flip_points(plain.landmarks[0], width)
      distances[flip_test].append(np.linalg.norm(mirror.landmarks[0] - expected, axis=-1))
  symmetric, one_way = np.concatenate(distances[True]), np.concatenate(distances[False])
  assert np.median(symmetric) < 0.05 and np.percentile(symmetric, 95) < 0.25, (
      np.median(symmetric), np.percentile(symmetric, 95))
  assert np.median(one_way) > 0.5, np.median(one_way)
