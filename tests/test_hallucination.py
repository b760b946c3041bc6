"""Low-resolution faces (issue 33): the low-resolution training mode and SHT's DHLN."""

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablations
from configs import default
from fgtbt_jax import errors
from fgtbt_jax import evaluate
from fgtbt_jax import losses
from fgtbt_jax import metrics
from fgtbt_jax import models
from fgtbt_jax import rundir
from fgtbt_jax import validation
from fgtbt_jax.models import hallucination
from tests import helpers
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)


def _numpy_gradient_map(image: np.ndarray) -> np.ndarray:
  """SHT eq. (3) pixel by pixel, zero outside the image."""
  b, h, w, c = image.shape
  value = lambda n, y, x, ch: image[n, y, x, ch] if 0 <= y < h and 0 <= x < w else 0.0
  out = np.zeros_like(image)
  for n in range(b):
    for y in range(h):
      for x in range(w):
        for ch in range(c):
          ix = value(n, y, x + 1, ch) - value(n, y, x - 1, ch)
          iy = value(n, y + 1, x, ch) - value(n, y - 1, x, ch)
          out[n, y, x, ch] = np.sqrt(ix * ix + iy * iy)
  return out


def test_gradient_map_is_the_central_difference_magnitude_per_channel():
  image = np.random.default_rng(0).random((2, 5, 7, 3)).astype(np.float32)
  image[0, :, :, 1] = 0.25  # flat inside: only the zero-padded border has a gradient
  got = np.asarray(losses.gradient_map(image))
  np.testing.assert_allclose(got, _numpy_gradient_map(image), rtol=1e-6, atol=1e-6)
  assert np.all(got[0, 1:-1, 1:-1, 1] == 0.0)
  # Finite gradient where the map is zero (the square root's kink).
  grad = jax.grad(lambda x: losses.gradient_map(x).sum())(jnp.asarray(image))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_hallucination_loss_is_the_weighted_l1_and_gradient_l1():
  rng = np.random.default_rng(1)
  pred, target = rng.random((3, 6, 6, 3)), rng.random((3, 6, 6, 3))
  weight = np.array([1.0, 0.0, 1.0])
  total, aux = losses.hallucination_loss(pred, target, 0.5, 2.0, weight)
  l1 = np.abs(pred - target).mean(axis=(1, 2, 3))
  grad = np.abs(_numpy_gradient_map(pred) - _numpy_gradient_map(target)).mean(axis=(1, 2, 3))
  want_l1, want_grad = (l1[0] + l1[2]) / 2, (grad[0] + grad[2]) / 2
  np.testing.assert_allclose(aux["hallucination_l1"], want_l1, rtol=1e-5)
  np.testing.assert_allclose(aux["hallucination_gradient"], want_grad, rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * want_l1 + 2.0 * want_grad, rtol=1e-5)


def test_degrade_is_area_down_and_bilinear_up_like_opencv():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
  for factor in (2, 4, 8):
    got = np.asarray(hallucination.degrade(images, factor))
    for image, out in zip(images, got):
      small = cv2.resize(image, (32 // factor,) * 2, interpolation=cv2.INTER_AREA)
      want = cv2.resize(small, (32, 32), interpolation=cv2.INTER_LINEAR)
      # OpenCV rounds its uint8 small image first: at most one level apart.
      assert np.abs(out - want.astype(np.float32)).max() <= 1.0
    assert np.all(got == np.round(got))
  with pytest.raises(ValueError, match="does not divide"):
    hallucination.degrade(images, 3)


def test_random_degrade_applies_a_listed_factor_with_its_probability():
  images = np.random.default_rng(3).integers(0, 256, (64, 16, 16, 3), np.uint8)
  key = jax.random.key(0)
  np.testing.assert_array_equal(hallucination.random_degrade(images, key, (2,), 0.0), images)
  np.testing.assert_array_equal(hallucination.random_degrade(images, key, (), 1.0), images)
  np.testing.assert_array_equal(hallucination.random_degrade(images, key, (4,), 1.0),
                                hallucination.degrade(images, 4))
  out = np.asarray(hallucination.random_degrade(images, key, (2, 4), 0.5))
  candidates = [np.asarray(images, np.float32), np.asarray(hallucination.degrade(images, 2)),
                np.asarray(hallucination.degrade(images, 4))]
  kinds = [next(i for i, c in enumerate(candidates) if np.array_equal(o, c[n]))
           for n, o in enumerate(out)]
  assert set(kinds) == {0, 1, 2}  # every form among 64 faces
  assert 16 <= kinds.count(0) <= 48


def test_pixel_shuffle_places_each_channel_group_on_the_subpixel_grid():
  x = np.arange(2 * 3 * 4 * 12, dtype=np.float32).reshape(2, 3, 4, 12)
  got = np.asarray(hallucination.pixel_shuffle(x, 2))
  assert got.shape == (2, 6, 8, 3)
  for dy in range(2):
    for dx in range(2):
      np.testing.assert_array_equal(got[:, dy::2, dx::2, :], x[..., (dy * 2 + dx) * 3:(dy * 2 + dx + 1) * 3])


def _conv(x, params, padding):
  return jax.lax.conv_general_dilated(
      x, params["kernel"], (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  ) + params.get("bias", 0.0)


@pytest.mark.parametrize("upscale", [1, 2])
def test_the_two_fusions_follow_sht_equations_1_and_2(upscale):
  module = hallucination.DualHallucination(channels=6, blocks=2, upscale=upscale)
  rng = np.random.default_rng(4)
  pose = jnp.asarray(rng.normal(size=(2, 8, 8, 5)), jnp.float32)
  images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = module.init(jax.random.key(0), pose, images)
  # The zero-initialised layers get random weights so that every term shows.
  params = models.random_variables(variables["params"], seed=5)
  (new_pose, hallucinated), state = module.apply(
      {"params": params}, pose, images, capture_intermediates=True)
  seen = state["intermediates"]
  q = seen[f"sr_block_{1}"]["__call__"][0]          # Q after the SR blocks
  attention = seen["pose_attention"]["__call__"][0]  # RB(P)
  fused_q = q + q * jax.nn.sigmoid(attention)         # eq. (1)
  np.testing.assert_allclose(hallucination.pose_attention(q, attention), fused_q, rtol=1e-6)
  fusion = _conv(jnp.concatenate([pose, fused_q], -1), params["pose_fusion"], "VALID")
  np.testing.assert_allclose(new_pose, pose + fusion, rtol=1e-5, atol=1e-5)  # eq. (2)
  residual = _conv(fused_q, params["image_out"], ((1, 1), (1, 1)))
  # SHT-M: the face `upscale` times the input's size, the upsampled input plus the residual.
  assert hallucinated.shape == (2, 16 * upscale, 16 * upscale, 3)
  upsampled = images if upscale == 1 else jnp.asarray(
      [cv2.resize(np.asarray(x), (16 * upscale,) * 2, interpolation=cv2.INTER_LINEAR)
       for x in images])
  np.testing.assert_allclose(
      hallucinated, upsampled + hallucination.pixel_shuffle(residual, 2 * upscale),
      rtol=1e-5, atol=1e-5)


def test_an_untrained_dhln_is_the_fgtbt_network_and_returns_its_input():
  config = models.model_config("tiny", hallucination=True, hallucination_channels=8,
                               hallucination_blocks=1)
  model, base = models.build_model(config), models.build_model(models.model_config("tiny"))
  images = jnp.asarray(np.random.default_rng(6).normal(size=(2, 64, 64, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  outputs = model.apply(variables, images, method=models.FGTBT.named_outputs)
  assert set(outputs) == {"heatmaps", "hallucination"}
  assert outputs["hallucination"].shape == (2, 64, 64, 3)
  np.testing.assert_array_equal(outputs["hallucination"], images)
  params = dict(variables["params"])
  params["decoder"] = {k: v for k, v in params["decoder"].items() if k != "hallucination"}
  np.testing.assert_array_equal(
      base.apply({**variables, "params": params}, images), outputs["heatmaps"])


def test_a_small_input_network_is_fgtbt_on_the_reduced_crop():
  """SHT-M's small input: input_downsample f runs the network on the area-averaged crop;
  heatmaps f times coarser and decoded to crop pixels; DHLN's face at the crop's size."""
  from fgtbt_jax import inference
  config = models.model_config("tiny", input_size=64, input_downsample=2, hallucination=True,
                               hallucination_channels=8, hallucination_blocks=1)
  model, base = models.build_model(config), models.build_model(models.model_config("tiny"))
  crops = np.random.default_rng(9).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
  images = models.normalize_images(crops)
  variables = model.init(jax.random.key(0), images, train=False)
  outputs = model.apply(variables, images, method=models.FGTBT.named_outputs)
  assert outputs["heatmaps"].shape == (2, 16, 16, 124) and model.heatmap_stride == 4.0
  reduced = np.asarray(images).reshape(2, 32, 2, 32, 2, 3).mean((2, 4))  # 2 x 2 cell means
  params = dict(variables["params"])
  params["decoder"] = {k: v for k, v in params["decoder"].items() if k != "hallucination"}
  np.testing.assert_allclose(base.apply({**variables, "params": params}, jnp.asarray(reduced)),
                             outputs["heatmaps"], rtol=1e-5, atol=1e-5)
  # Untrained, DHLN returns the reduced crop upsampled back (bilinear, half-pixel centres).
  back = np.stack([cv2.resize(x, (64, 64), interpolation=cv2.INTER_LINEAR) for x in reduced])
  np.testing.assert_allclose(outputs["hallucination"], back, rtol=1e-5, atol=1e-5)
  # Predict maps the coarser heatmaps' peaks to crop pixels with the stride 4.
  predict = inference.make_predict_fn(inference.model_apply(model), inference.PredictSettings(
      decoder="argmax", flip_test=False))
  points, _ = predict(variables, crops)
  flat = np.asarray(outputs["heatmaps"]).reshape(2, 256, 124).argmax(1)
  want = np.stack([flat % 16, flat // 16], -1) * 4.0 + 1.5  # (k + 0.5) 4 - 0.5
  np.testing.assert_allclose(points, want)
  with pytest.raises(ValueError, match="not a multiple of 64"):
    model.apply(variables, images[:, :32, :32], method=models.FGTBT.named_outputs)
  for bad, message in ((0, "must be an integer >= 1"), (3, "must be a multiple of 32 x "
                                                          "input_downsample \\(96\\)")):
    with pytest.raises(ValueError, match=message):
      models.model_config("tiny", input_size=64, input_downsample=bad)


def test_a_trained_fgtbt_starts_a_dhln_run_with_its_own_outputs(tmp_path):
  """train.init_from: the shared variables copied, DHLN's stream kept as initialised
  (zero outputs), so the new network's heatmaps are the trained FGTBT's."""
  from fgtbt_jax import sharding
  from fgtbt_jax import state as state_lib
  from fgtbt_jax import train
  from configs import tiny
  saved_config = tiny.get_config()
  for run in ("fgtbt", "narrow"):
    (tmp_path / run).mkdir()
  saved = helpers.write_random_run(tmp_path / "fgtbt", saved_config, scale=None)
  config = tiny.get_config()
  config.model.hallucination, config.lowres.factors = True, (2,)
  config.model.hallucination_channels, config.model.hallucination_blocks = 8, 1
  config.train.init_from = str(tmp_path / "fgtbt")
  setup = state_lib.build_setup(config, mesh=sharding.single_device_mesh())
  fresh = state_lib.create_train_state(setup, seed=1)
  state, summary = train.initialize_from(fresh, setup, config.train.init_from)
  assert "kept as initialised (['decoder']['hallucination']" in summary
  assert "0 not in this model" in summary
  ours = jax.device_get(state.ema_params)
  theirs = jax.device_get(saved.ema_params)
  np.testing.assert_array_equal(ours["decoder"]["heatmap"]["kernel"],
                                theirs["decoder"]["heatmap"]["kernel"])
  assert not np.array_equal(ours["decoder"]["heatmap"]["kernel"],
                            jax.device_get(fresh.params)["decoder"]["heatmap"]["kernel"])
  np.testing.assert_array_equal(ours["decoder"]["hallucination"]["stem"]["kernel"],
                                jax.device_get(fresh.params)["decoder"]["hallucination"]["stem"]["kernel"])
  images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 64, 3)), jnp.float32)
  base = models.build_model(saved_config.model)
  np.testing.assert_allclose(
      setup.model.apply(state.ema_variables(), images),
      base.apply(jax.device_get(saved.ema_variables()), images), rtol=1e-5, atol=1e-6)
  # A run of another network, or no run, is refused naming the field.
  other = tiny.get_config()
  other.model.head_channels = 16
  helpers.write_random_run(tmp_path / "narrow", other, scale=None)
  with pytest.raises(errors.ConfigError, match=r"train.init_from=.*narrow.*\['decoder'\].* is "):
    train.initialize_from(fresh, setup, str(tmp_path / "narrow"))
  with pytest.raises(errors.ConfigError, match=r"train.init_from=.*nowhere.* is not a run's workdir"):
    train.initialize_from(fresh, setup, str(tmp_path / "nowhere"))


def test_configs_select_the_variants_and_name_bad_keys():
  lowres, dhln = ablations.get_config("base=default,lowres=on"), ablations.get_config(
      "base=default,dhln=on")
  assert lowres.lowres.factors == (2, 4, 8) and not lowres.model.hallucination
  assert dhln.lowres.factors == (2, 4, 8) and dhln.model.hallucination
  for config in (lowres, dhln):
    validation.validate_config(config, num_devices=1)
  small = ablations.get_config("base=default,dhln=on,input_downsample=2")
  assert small.model.input_downsample == 2 and small.model.hallucination
  small.lowres.factors = ()  # SHT-M: the reduced crop alone is the low-resolution input
  validation.validate_config(small, num_devices=1)
  with pytest.raises(ValueError, match="input_downsample='x' is not a positive integer"):
    ablations.get_config("base=default,input_downsample=x")
  bad = default.get_config()
  bad.model.hallucination = True
  with pytest.raises(errors.ConfigError, match="lowres.factors"):
    validation.validate_config(bad, num_devices=1)
  bad.lowres.factors = (2, 3)
  with pytest.raises(errors.ConfigError, match=r"lowres.factors: 3 must be an integer >= 2 dividing"):
    validation.validate_config(bad, num_devices=1)
  bad.lowres.factors, bad.lowres.probability = (2,), 1.5
  with pytest.raises(errors.ConfigError, match=r"lowres.probability must be in \[0, 1\]"):
    validation.validate_config(bad, num_devices=1)
  bad.lowres.probability, bad.loss.hallucination_gradient_weight = 1.0, -1.0
  with pytest.raises(errors.ConfigError, match="loss.hallucination_gradient_weight must be >= 0"):
    validation.validate_config(bad, num_devices=1)


def test_a_run_saved_before_the_low_resolution_mode_loads_as_fgtbt(tmp_path):
  saved = json.loads(default.get_config().to_json_best_effort())
  del saved["lowres"]
  for field in ("hallucination", "hallucination_channels", "hallucination_blocks"):
    del saved["model"][field]
  for field in ("hallucination_l1_weight", "hallucination_gradient_weight"):
    del saved["loss"][field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = rundir.load_run_config(tmp_path)
  assert tuple(loaded.lowres.factors) == () and not loaded.model.hallucination
  validation.validate_config(loaded, num_devices=1)


def test_psnr_and_ssim_of_known_images():
  rng = np.random.default_rng(7)
  image = rng.random((2, 32, 32, 3))
  assert metrics.psnr(image, image)[0] == np.inf
  noisy = image + 0.1
  np.testing.assert_allclose(metrics.psnr(noisy, image), 20.0, rtol=1e-6)  # MSE 0.01
  np.testing.assert_allclose(metrics.ssim(image, image), 1.0, rtol=1e-6)
  blurred = np.stack([cv2.GaussianBlur(x, (7, 7), 2.0) for x in image])
  assert np.all(metrics.ssim(blurred, image) < 0.9)
  assert np.all(metrics.ssim(0.5 * image + 0.25, image) < metrics.ssim(image, image))
  # One 11 x 11 window: Wang et al.'s formula with Gaussian-weighted statistics.
  x, y = rng.random((1, 11, 11, 1)), rng.random((1, 11, 11, 1))
  taps = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
  w = np.outer(taps, taps) / taps.sum() ** 2
  a, b = x[0, ..., 0], y[0, ..., 0]
  mx, my = (w * a).sum(), (w * b).sum()
  vx, vy, cxy = (w * a * a).sum() - mx ** 2, (w * b * b).sum() - my ** 2, (w * a * b).sum() - mx * my
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  want = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
  np.testing.assert_allclose(metrics.ssim(x, y), [want], rtol=1e-10)


@pytest.mark.slow  # An eval with its lowres study: ~4 min on 2 loaded cores.
def test_eval_reports_the_hallucinated_faces_quality(synthetic_data_dir, tmp_path):
  from configs import tiny
  config = tiny.get_config()
  config.data.data_dir, config.synthetic_data.generate = str(synthetic_data_dir), False
  config.model.hallucination, config.lowres.factors = True, (2, 4)
  config.model.hallucination_channels, config.model.hallucination_blocks = 8, 1
  config.eval.studies, config.eval.study_max_batches = ("lowres",), 1
  (tmp_path / "run").mkdir()
  helpers.write_random_run(tmp_path / "run", config, scale=None)
  done = evaluate.evaluate_workdir(config, tmp_path / "run", "latest")
  faces = json.loads((done.report.parent / "report.json").read_text())["studies"]["lowres_faces"]
  assert "DHLN PSNR" in done.report.read_text()
  # An untrained DHLN returns its input: its faces are the degraded inputs.
  for side in ("16", "32"):
    assert faces[side]["psnr"] == pytest.approx(faces[side]["input_psnr"], abs=0.05)
    assert faces[side]["ssim"] == pytest.approx(faces[side]["input_ssim"], abs=2e-3)
  assert faces["16"]["input_psnr"] < faces["32"]["input_psnr"]
  assert faces["128"]["input_psnr"] is None  # the 51 px face is left as it was
  assert faces["128"]["psnr"] is None or faces["128"]["psnr"] > 60.0  # float rounding only


def _dhln_config(data: int, fsdp: int, rules: str, study: str = "base=default,dhln=on"):
  config = ablations.get_config(study)
  config.model.hallucination_channels, config.model.hallucination_blocks = 8, 1
  config.model.depthwise_impl = "conv"  # as configs/tiny.py: faster to compile
  config.optimizer.eps = 1e-3  # see tests/test_train.py
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.mesh.logical_axis_rules = models.logical_axis_rules(rules)
  return config


@pytest.mark.slow  # Two train steps compiled.
def test_dhln_trains_sharded_like_one_device_and_resumes_exactly(tmp_path):

  def compare(metrics8, metrics1):
    for name in ("loss", "hallucination_l1", "hallucination_gradient"):
      np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-5, err_msg=name)

  _, _, state1, metrics8 = helpers.train_sharded_and_single(
      _dhln_config(4, 2, "fsdp"), _dhln_config(1, 1, "data"), tmp_path, compare)
  # The low-resolution inputs differ from the crops: the L1 to them is not zero.
  assert float(metrics8["hallucination_l1"]) > 0.01
  moved = jax.device_get(state1.params)["decoder"]["hallucination"]["image_out"]["kernel"]
  assert np.abs(moved).max() > 0.0  # the zero-initialised output moved (warm-up steps)


@pytest.mark.slow  # Two train steps compiled.
def test_small_input_dhln_trains_sharded_like_one_device_and_resumes_exactly(tmp_path):
  """SHT-M: the network on the crop halved, its face hallucinated at the crop's size."""
  study = "base=default,dhln=on,input_downsample=2"

  def small(data, fsdp, rules):
    config = _dhln_config(data, fsdp, rules, study)
    config.lowres.factors = ()  # the reduced crop is the only low-resolution input
    return config

  def compare(metrics8, metrics1):
    for name in ("loss", "hallucination_l1", "hallucination_gradient"):
      np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-5, err_msg=name)

  _, _, state1, metrics8 = helpers.train_sharded_and_single(
      small(4, 2, "fsdp"), small(1, 1, "data"), tmp_path, compare)
  assert float(metrics8["hallucination_l1"]) > 0.01  # the halved crop upsampled is not the crop
  out = jax.device_get(state1.params)["decoder"]["hallucination"]["image_out"]["kernel"]
  assert out.shape[-1] == 3 * 4 * 4 and np.abs(out).max() > 0.0  # pixel shuffle by 4


def test_paired_view_moves_the_image_and_its_points_alike():
  size, rng = 32, np.random.default_rng(8)
  images, points = np.zeros((4, size, size, 2), np.float32), np.zeros((4, 1, 2), np.float32)
  for b in range(4):
    x, y = rng.integers(10, 22, 2)
    images[b, y - 1:y + 2, x - 1:x + 2, :] = 1.0  # a 3 x 3 spot at the point
    points[b, 0] = (x, y)
  view, moved = hallucination.paired_view(images, points, jax.random.key(1))
  view, moved = np.asarray(view), np.asarray(moved)
  ys, xs = np.mgrid[:size, :size]
  for b in range(4):
    weight = view[b, ..., 0] / view[b, ..., 0].sum()
    centroid = np.array([(weight * xs).sum(), (weight * ys).sum()])
    np.testing.assert_allclose(centroid, moved[b, 0], atol=0.3)
    np.testing.assert_array_equal(view[b, ..., 0], view[b, ..., 1])  # channels alike
  # Rotation and scale within the ranges: distances to the centre scale by 0.8-1.2.
  centre = (size - 1) / 2
  ratio = np.linalg.norm(moved[:, 0] - centre, axis=-1) / np.linalg.norm(points[:, 0] - centre, axis=-1)
  assert np.all((ratio > 0.79) & (ratio < 1.21))
  same, unmoved = hallucination.paired_view(images, points, jax.random.key(1), max_rotation=0.0,
                                            scale_range=(1.0, 1.0))
  np.testing.assert_allclose(same, images, atol=1e-6)
  np.testing.assert_allclose(unmoved, points, atol=1e-5)


def test_unlabeled_faces_train_only_the_image_terms():
  """SHT eq. (10): a face without landmarks (mask all False) adds nothing to the
  FMB-loss, its dataset is absent, and it still counts in the hallucination terms."""
  from fgtbt_jax import landmarks
  rng = np.random.default_rng(9)
  dataset_id = np.repeat(np.arange(4, dtype=np.int32), 2)
  mask = landmarks.PROTOCOL_MASKS[dataset_id].copy()
  points = rng.uniform(4, 56, (8, 124, 2)).astype(np.float32)
  maps = rng.normal(0.0, 0.1, (8, 16, 16, 124)).astype(np.float32)
  config = losses.LossConfig(sigma=1.5)
  params, state = losses.init_balancer(config)
  labeled = [0, 1, 4, 5, 6, 7]
  mask[2:4] = False  # the two 300W faces have no landmarks
  total, aux = losses.head_loss(config, {"heatmaps": maps}, points, mask, dataset_id, 4.0,
                                params, state)
  only, only_aux = losses.head_loss(config, {"heatmaps": maps[labeled]}, points[labeled],
                                    mask[labeled], dataset_id[labeled], 4.0, params, state)
  assert np.asarray(aux["present"], bool).tolist() == [True, False, True, True]
  np.testing.assert_allclose(total, only, rtol=1e-6)
  sr, hr = rng.random((8, 8, 8, 3)), rng.random((8, 8, 8, 3))
  _, image = losses.hallucination_loss(sr, hr, 1.0, 1.0)
  np.testing.assert_allclose(image["hallucination_l1"], np.abs(sr - hr).mean(), rtol=1e-5)
