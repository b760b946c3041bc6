"""Tests of video landmarks: One Euro smoothing and face tracking between detections.

The moving-face video is a rendered synthetic face pasted into each frame
along a known path (still, a fast move, still again); the landmark "model"
returns each frame's true landmarks plus Gaussian jitter, so the smoothed
track can be measured against the truth: less frame-to-frame jitter where
the face is still, and no lasting lag where it moves.
"""

import hashlib

import numpy as np
import pytest

from fgtbt_jax.data import synthetic
from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax.deploy import video

FPS = 30.0


def moving_face_video(num_frames: int = 60):
  """Frames (T, 240, 320, 3), true landmarks (T, 124, 2): still, 60 px right in 0.5 s, still."""
  face, points, _ = synthetic.render_face(0, 3, 128, clean=True)
  t = np.arange(num_frames)
  shift_x = np.clip((t - 20) / 15, 0, 1) * 60.0
  frames, truth = [], []
  for dx in np.round(shift_x).astype(int):
    frame = np.full((240, 320, 3), 90, np.uint8)
    frame[56:184, 40 + dx:168 + dx] = face
    frames.append(frame)
    truth.append(points + [40 + dx, 56])
  return np.stack(frames), np.stack(truth).astype(np.float64)


class NoisyModel:
  """locate(image, boxes): each frame's true landmarks plus seeded jitter (sigma px)."""

  def __init__(self, frames, truth, sigma: float, seed: int = 0):
    self.truth = {hashlib.sha1(f.tobytes()).hexdigest(): p for f, p in zip(frames, truth)}
    self.rng = np.random.default_rng(seed)
    self.sigma = sigma
    self.calls = []

  def __call__(self, image, boxes):
    self.calls.append(np.array(boxes))
    points = self.truth[hashlib.sha1(image.tobytes()).hexdigest()]
    raw = points + self.rng.normal(0, self.sigma, (len(boxes),) + points.shape)
    return raw, np.ones(raw.shape[:2])


def jitter(track):
  """RMS over frames of the mean point displacement from one frame to the next (px)."""
  step = np.linalg.norm(np.diff(track, axis=0), axis=-1).mean(-1)
  return float(np.sqrt((step ** 2).mean()))


def test_smoothing_reduces_jitter_on_a_moving_face_and_follows_its_motion():
  frames, truth = moving_face_video()
  model = NoisyModel(frames, truth, sigma=1.5)
  tracker = video.FaceTracker(detector_lib.DlibHogDetector(adjustment="synthetic"), model, FPS,
                              video.TrackerSettings(detect_every=10))
  out = list(tracker.run(frames))
  assert [list(f.track_ids) for f in out] == [[0]] * len(frames)  # One face, one track.
  # The detector ran on frames 0, 10, 20, ...; the landmarks carried the box between.
  assert [f.index for f in out if f.detected] == list(range(0, 60, 10))
  assert tracker.detector_runs == 6
  assert out[1].boxes_from == ["tracked"] and out[10].boxes_from == ["detector"]
  raw = np.stack([f.raw_landmarks[0] for f in out])
  smooth = np.stack([f.landmarks[0] for f in out])
  side = (detector_lib.landmark_box(truth[0])[2:] - detector_lib.landmark_box(truth[0])[:2]).max()
  # Every box (detected or carried) is on the face, also while it moves 4 px a frame.
  for frame, points in zip(out, truth):
    reference = detector_lib.landmark_box(points)
    centre_error = np.linalg.norm((frame.boxes[0, :2] + frame.boxes[0, 2:]) / 2
                                  - (reference[:2] + reference[2:]) / 2)
    assert centre_error < 0.12 * side, (frame.index, centre_error)
  # Still face (before the move, and once it has settled after): far less jitter.
  for still in (slice(2, 20), slice(42, 60)):
    assert jitter(smooth[still]) < 0.4 * jitter(raw[still]), still
  error = lambda track: np.linalg.norm(track - truth, axis=-1).mean(-1)
  assert error(smooth).mean() < 0.7 * error(raw).mean()
  # It follows the real motion: the whole 60 px move, and no lasting lag after it.
  moved = smooth[45:].mean((0, 1)) - smooth[5:20].mean((0, 1))
  np.testing.assert_allclose(moved, [60.0, 0.0], atol=1.0)
  assert error(smooth)[20:36].max() < 0.1 * side  # During the move (120 px/s).
  assert error(smooth)[42:].max() < 1.5


def test_without_smoothing_the_landmarks_are_the_models():
  frames, truth = moving_face_video(12)
  model = NoisyModel(frames, truth, sigma=1.0)
  boxes = np.array([detector_lib.landmark_box(truth[0])])
  tracker = video.FaceTracker(lambda image: boxes, model, FPS,
                              video.TrackerSettings(detect_every=1, smoothing=None))
  for frame in tracker.run(frames):
    np.testing.assert_array_equal(frame.landmarks, frame.raw_landmarks)
    assert frame.detected and frame.boxes_from == ["detector"]
  assert tracker.detector_runs == 12


def test_one_euro_filter_passes_the_first_sample_and_holds_a_constant():
  settings = video.OneEuroSettings(min_cutoff=0.5, beta=5.0)
  points = np.array([[10.0, 20.0], [30.0, 40.0]])
  state = video.one_euro_step(None, points, 0.0, 100.0, settings)
  np.testing.assert_array_equal(state.value, points)
  for k in range(1, 10):
    state = video.one_euro_step(state, points, k / FPS, 100.0, settings)
  np.testing.assert_allclose(state.value, points)
  # A step: the output moves toward it, more with a higher beta (less lag).
  slow = video.one_euro_step(state, points + 10, 10 / FPS, 100.0, settings)
  fast = video.one_euro_step(state, points + 10, 10 / FPS, 100.0,
                             video.OneEuroSettings(min_cutoff=0.5, beta=500.0))
  assert 0 < (slow.value - points).mean() < (fast.value - points).mean() < 10
  assert video.smoothing_factor(1.0, 1 / FPS) == pytest.approx(1 / (1 + FPS / (2 * np.pi)))
  with pytest.raises(ValueError, match="min_cutoff must be > 0"):
    video.OneEuroSettings(min_cutoff=0.0)
  with pytest.raises(ValueError, match="detect_every must be at least 1"):
    video.TrackerSettings(detect_every=0)


def test_tracks_keep_their_ids_and_a_lost_face_makes_the_detector_run():
  """Two faces; the detector misses one once (it is kept), then a face's confidence drops."""
  left, right = np.array([20.0, 20.0, 80.0, 80.0]), np.array([140.0, 30.0, 200.0, 90.0])
  template = np.array([[0.1, 0.1], [0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.9, 0.9]])
  detections = {3: [left]}  # Frame 3: the detector misses the right face; else both.
  low = {(4, "right")}  # Frame 4: the right face's landmarks lose confidence.
  seen = []

  def detect(image):
    index = int(image[0, 0, 0])
    seen.append(index)
    return np.array(detections.get(index, [left, right]))

  def locate(image, boxes):
    index = int(image[0, 0, 0])
    # Points whose landmark box (padded 5% a side) is the box again.
    size = (boxes[:, 2:] - boxes[:, :2]) / 1.1 / 0.8
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    points = centre[:, None] + (template[None] - 0.5) * size[:, None]
    confidence = np.ones(points.shape[:2])
    for k, box in enumerate(boxes):
      if (index, "right" if box[0] > 100 else "left") in low:
        confidence[k] = 0.1
    return points, confidence

  frames = [np.full((120, 240, 3), i, np.uint8) for i in range(8)]
  tracker = video.FaceTracker(detect, locate, FPS, video.TrackerSettings(detect_every=3),
                              min_face_confidence=0.5)
  out = list(tracker.run(frames))
  ids = lambda f: [int(i) for i in f.track_ids]
  np.testing.assert_allclose(out[2].boxes, [left, right])  # Carried by the landmarks.
  # Frame 3: the right face is kept from its landmarks although the detector missed it.
  assert ids(out[3]) == [0, 1] and out[3].boxes_from == ["detector", "tracked"]
  # Frame 4: the low-confidence face is still reported on its frame; then its track
  # ends and the detector runs at once (not 3 frames after frame 3), finding it anew.
  assert ids(out[4]) == [0, 1] and not out[4].detected
  assert seen == [0, 3, 5]
  assert ids(out[5]) == [0, 2] and out[5].boxes_from == ["detector", "detector"]
  rare = video.FaceTracker(detect, locate, FPS, video.TrackerSettings(detect_every=10),
                           min_face_confidence=0.5)
  assert [f.index for f in rare.run(frames) if f.detected] == [0, 5]
  one = video.FaceTracker(detect, locate, FPS, max_faces=1)
  assert [ids(f) for f in one.run(frames[:3])] == [[0], [0], [0]]


def test_a_poor_prediction_cannot_balloon_the_tracked_box():
  """A model whose points spread over the whole crop: the carried box grows 10% a frame."""
  box = np.array([100.0, 80.0, 160.0, 140.0])

  def spreading(image, boxes):
    # Points over the crop (1.25x the box): their landmark box is 1.375x the box.
    centre, side = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * 1.25
    corners = np.array([[-0.5, -0.5], [0.5, 0.5]])
    points = centre[:, None] + corners[None] * side[:, None]
    return points, np.ones(points.shape[:2])

  tracker = video.FaceTracker(lambda image: box[None], spreading, FPS,
                              video.TrackerSettings(detect_every=4))
  frames = [np.zeros((240, 320, 3), np.uint8)] * 4
  sides = [float((f.boxes[0, 2:] - f.boxes[0, :2]).max()) for f in tracker.run(frames)]
  np.testing.assert_allclose(sides, [60.0, 66.0, 72.6, 79.86])
  np.testing.assert_allclose(video.limit_size_change([0, 0, 10, 20], [0, 0, 40, 40], 0.25),
                             [-3, -6, 13, 26])  # Grown to 32 about its centre.
  np.testing.assert_allclose(video.limit_size_change([0, 0, 10, 10], [0, 0, 11, 11], 0.25),
                             [0, 0, 10, 10])
