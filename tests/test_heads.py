"""Landmark heads (issue 16): HIH decimal heatmaps and coarse-to-fine recurrent refinement."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablations
from configs import tiny
from fgtbt_jax import errors
from fgtbt_jax import heatmaps
from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax import models
from fgtbt_jax import decoding_error
from fgtbt_jax.commands import decoding_error as decoding_error_command
from fgtbt_jax import rundir
from fgtbt_jax import studies
from fgtbt_jax import validation
from fgtbt_jax.models import heads
from tests.helpers import train_sharded_and_single


def _offset_grid(steps: int = 41) -> np.ndarray:
  """(steps^2, 2) offsets covering (-0.5, 0.5] on both axes, +0.5 (a tie) included."""
  values = np.linspace(-0.5, 0.5, steps)[1:]
  x, y = np.meshgrid(values, values)
  return np.stack([x.ravel(), y.ravel()], -1).astype(np.float32)


@pytest.mark.parametrize("decimal_size", [4, 8])
@pytest.mark.parametrize("rounded", ["none", "nearest"])
def test_hih_encode_decode_round_trip_for_every_offset(decimal_size, rounded):
  offsets = _offset_grid()
  points = np.array([7.0, 9.0], np.float32) + offsets  # every offset in one peak pixel
  mask = np.ones(len(points), bool)
  integer = heatmaps.render_gaussian(points, mask, 16, 16, 1.5)
  decimal = heatmaps.render_decimal_targets(points, mask, decimal_size, 1.0, rounded=rounded)
  assert decimal.shape == (decimal_size, decimal_size, len(points))
  coords, confidence = heatmaps.decode_hih(integer, decimal)
  error = np.abs(np.asarray(coords) - points)
  bound = 0.5 / decimal_size
  assert error.max() <= bound + 1e-5
  # The bound is reached (the decimal cell's half width), and the integer
  # argmax alone would be off by up to half a pixel.
  assert error.max() > 0.9 * bound
  argmax_error = np.abs(np.asarray(heatmaps.decode(integer, "argmax")[0]) - points)
  assert argmax_error.max() > 0.45
  np.testing.assert_allclose(confidence, np.asarray(integer).max((0, 1)), rtol=1e-6)
  refined, _ = heatmaps.decode_hih(integer, decimal, refine=True)
  refined_error = np.abs(np.asarray(refined) - points).max()
  if rounded == "none":  # The fit recovers the exact offset of a Gaussian.
    assert refined_error < 2e-3
  else:  # A Gaussian on the cell centre is fitted to that centre.
    assert refined_error <= bound + 1e-5


def test_decimal_maps_of_the_mirrored_image_are_the_mirrored_maps():
  # The flip test merges HIH's decimal maps like heatmaps: mirroring the
  # image negates the offset, i.e. mirrors the decimal map along W.
  width = 16
  points = np.array([5.0, 6.0], np.float32) + _offset_grid(11)[:-1]  # no +0.5 tie
  points = points[np.abs(points[:, 0] - 5.5) > 0.01]
  mirrored = points.copy()
  mirrored[:, 0] = width - 1 - points[:, 0]
  mask = np.ones(len(points), bool)
  identity = np.arange(len(points))
  own = heatmaps.render_decimal_targets(points, mask, 8, 1.0)
  back = heatmaps.flip_heatmaps(heatmaps.render_decimal_targets(mirrored, mask, 8, 1.0), identity)
  np.testing.assert_allclose(back, own, atol=1e-4)


def test_decode_outputs_needs_the_hih_maps_and_names_them():
  maps = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match=r"needs the model outputs \['decimal'\]"):
    heatmaps.decode_outputs({"heatmaps": maps}, "hih")
  with pytest.raises(ValueError, match="unknown heatmap decoder 'dark'"):
    heatmaps.decode_outputs({"heatmaps": maps}, "dark")


def test_area_matrix_averages_the_covered_pixels():
  block = heads.area_matrix(32, 8)
  np.testing.assert_allclose(block.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(block[2, 8:12], 0.25)
  assert block[2, :8].sum() == 0 and block[2, 12:].sum() == 0
  uneven = heads.area_matrix(30, 8)  # 3.75 pixels per cell
  np.testing.assert_allclose(uneven.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(uneven[0, :4] * 3.75, [1, 1, 1, 0.75], rtol=1e-5)
  np.testing.assert_allclose(uneven[1, 3:8] * 3.75, [0.25, 1, 1, 1, 0.5], rtol=1e-5)


def test_every_head_returns_its_named_outputs_and_shares_the_trunk():
  shapes, counts = {}, {}
  for head in heads.HEADS:
    model = models.build_model(models.model_config("tiny", head=head))
    abstract = models.abstract_variables(model, 64)
    counts[head] = models.parameter_count(abstract["params"])
    out = jax.eval_shape(
        lambda v, x, m=model: m.apply(v, x, train=False, method=models.FGTBT.named_outputs),
        abstract, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert set(out) == set(heads.HEADS[head].outputs)
    shapes[head] = jax.tree.map(lambda x: x.shape, out)
    names = set(nn.meta.unbox(abstract)["params"]["decoder"])
    extra = {"hih": {"decimal_head"}, "recurrent": {"refine"}}.get(head, set())
    assert names == {"embed_0", "embed_1", "embed_2", "embed_3", "fuse", "fuse_norm", "project",
                     "conv_block", "upsample", "heatmap"} | extra
  assert shapes["hih"]["decimal"] == (2, 8, 8, 124)
  assert len(shapes["recurrent"]["step_heatmaps"]) == 3  # H_0 and K = 2 steps
  assert all(s["heatmaps"] == (2, 32, 32, 124) for s in shapes.values())
  assert counts["hih"] > counts["heatmap"] and counts["recurrent"] > counts["heatmap"]
  # One refinement step shared by all K: its parameters do not grow with K.
  four = models.build_model(models.model_config("tiny", head="recurrent", recurrent_steps=4))
  assert models.parameter_count(models.abstract_variables(four, 64)["params"]) == counts["recurrent"]


def test_count_macs_counts_each_heads_layers():
  # The heads' convolutions, counted by hand at 32 x 32 heatmaps (64 px).
  base = models.model_config("tiny")
  pixels, up, points = 32 * 32, base.upsample_channels, base.num_points
  plain = models.count_macs(base)["decoder"]
  hih = models.model_config("tiny", head="hih", hih_decimal_size=8, hih_channels=24)
  cells, c = 8 * 8, 24
  expected = pixels * (up + points) * c + cells * (2 * 9 * c * c + c * c + c * points)
  assert models.count_macs(hih)["decoder"] - plain == expected  # area pooling left out
  for steps in (1, 3):
    recurrent = models.model_config("tiny", head="recurrent", recurrent_steps=steps,
                                    recurrent_channels=8, recurrent_kernel=5)
    step = pixels * ((up + points) * 8 + 25 * 8 * 8 + 8 * 16 + 16 * points)
    assert models.count_macs(recurrent)["decoder"] - plain == steps * step


def test_each_refinement_step_reads_the_previous_steps_heatmaps():
  model = models.build_model(models.model_config("tiny", head="recurrent", recurrent_steps=2))
  variables = models.random_variables(models.abstract_variables(model, 64))
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  outputs, state = jax.jit(lambda v, x: model.apply(
      v, x, train=False, method=models.FGTBT.named_outputs, capture_intermediates=True,
      mutable=["intermediates"]))(variables, images)
  maps = outputs["step_heatmaps"]
  np.testing.assert_array_equal(outputs["heatmaps"], maps[-1])
  # H_0 is the FGTBT heatmap head's output (the same trunk and 3x3 conv).
  plain = models.build_model(models.model_config("tiny"))
  without_refine = {**variables, "params": {**variables["params"], "decoder": {
      k: v for k, v in variables["params"]["decoder"].items() if k != "refine"}}}
  np.testing.assert_allclose(jax.jit(lambda v, x: plain.apply(v, x, train=False))(
      without_refine, images), maps[0], rtol=1e-5, atol=1e-5)
  features = state["intermediates"]["decoder"]["upsample"]["__call__"][0]
  step = heads.RefinementStep(channels=32, kernel_size=7, num_points=124)
  step_params = {"params": variables["params"]["decoder"]["refine"]}
  apply_step = jax.jit(lambda h: step.apply(step_params, features, h))
  for k in (1, 2):
    # Step k is the shared step applied to step k - 1's heatmaps ...
    np.testing.assert_allclose(apply_step(maps[k - 1]), maps[k], rtol=1e-5, atol=1e-5)
    # ... and changing those heatmaps changes step k's output.
    changed = maps[k - 1].at[:, 10:14, 10:14, 5].add(1.0)
    assert np.abs(np.asarray(apply_step(changed) - maps[k])).max() > 1e-3
  assert not np.allclose(maps[1], maps[2])
  # Freshly initialised, a step is the identity: it adds a zero correction.
  fresh = step.init(jax.random.key(1), features, maps[0])
  np.testing.assert_array_equal(step.apply(fresh, features, maps[0]), maps[0])


def _loss_inputs(size: int = 16, stride: float = 4.0):
  rng = np.random.default_rng(0)
  dataset_id = np.repeat(np.arange(4, dtype=np.int32), 2)
  mask = landmarks.PROTOCOL_MASKS[dataset_id]
  points = rng.uniform(4, 56, (8, 124, 2)).astype(np.float32)
  points = np.where(mask[..., None], points, np.nan).astype(np.float32)
  target = losses.render_targets(points, mask, size, size, 1.5, stride)
  return points, mask, dataset_id, target


def test_head_loss_supervises_every_map_with_the_fmb_loss():
  config = losses.LossConfig(sigma=1.5, hih_decimal_weight=0.5)
  params, state = losses.init_balancer(config)
  points, mask, dataset_id, target = _loss_inputs()
  args = (points, mask, dataset_id, 4.0, params, state)
  noise = jax.random.normal(jax.random.key(1), target.shape) * 0.1
  # The FGTBT head: exactly the FMB-loss of its heatmaps.
  alone, aux = losses.head_loss(config, {"heatmaps": target + noise}, *args)
  expected, _ = losses.fmb_loss(config, target + noise, target, mask, dataset_id, params, state)
  assert float(alone) == float(expected) and "map_loss" not in aux
  # HIH: the decimal maps add their weighted loss, zero on their targets.
  hm_points = heatmaps.input_to_heatmap(np.nan_to_num(points), 4.0)
  decimal_target = np.where(mask[:, None, None, :], heatmaps.render_decimal_targets(
      hm_points, mask, 8, 1.0), 0.0)
  perfect, aux = losses.head_loss(
      config, {"heatmaps": target + noise, "decimal": decimal_target}, *args)
  np.testing.assert_allclose(perfect, alone, rtol=1e-6)
  np.testing.assert_allclose(aux["map_loss"]["decimal"], 0.0, atol=1e-6)
  wrong, aux = losses.head_loss(
      config, {"heatmaps": target + noise, "decimal": np.roll(decimal_target, 3, axis=2)}, *args)
  np.testing.assert_allclose(
      wrong, alone + 0.5 * jnp.sum(aux["map_loss"]["decimal"]), rtol=1e-5)
  assert float(wrong) > float(alone) + 1.0
  # Recurrent: every step against the heatmap targets, summed.
  steps = (target + 3 * noise, target + 2 * noise, target + noise)
  total, aux = losses.head_loss(config, {"heatmaps": steps[-1], "step_heatmaps": steps}, *args)
  per_step = [float(losses.head_loss(config, {"heatmaps": s}, *args)[0]) for s in steps]
  np.testing.assert_allclose(total, sum(per_step), rtol=1e-5)
  assert sorted(aux["map_loss"]) == ["heatmaps_0", "heatmaps_1", "heatmaps_2"]
  assert per_step[0] > per_step[1] > per_step[2]


def test_the_predict_path_decodes_and_flip_merges_the_hih_maps():
  size, stride = 64, 2.0
  rng = np.random.default_rng(3)
  points = rng.uniform(8, 56, (2, 124, 2)).astype(np.float32)
  perm = landmarks.UNIFIED_FLIP_PERMUTATION
  mirrored_points = points[:, perm].copy()
  mirrored_points[..., 0] = size - 1 - mirrored_points[..., 0]
  crops = rng.integers(0, 256, (2, size, size, 3), np.uint8)
  images = models.normalize_images(crops)
  mask = np.ones((2, 124), bool)

  def render(p):
    hm = heatmaps.input_to_heatmap(p, stride)
    return {"heatmaps": heatmaps.render_gaussian(hm, mask, 32, 32, 1.5),
            "decimal": heatmaps.render_decimal_targets(hm, mask, 8, 1.0)}

  def apply_fn(variables, x):  # A perfect HIH model: the targets of what it sees.
    del variables
    mirrored = jnp.all(x == images[:, :, ::-1, :])
    return jax.tree.map(lambda a, b: jnp.where(mirrored, b, a),
                        render(points), render(mirrored_points))

  for flip_test in (False, True):
    for decoder, bound in (("hih", 0.5 / 8 * stride), ("hih_subpixel", 0.01), ("argmax", 1.0)):
      settings = inference.PredictSettings(decoder=decoder, flip_test=flip_test)
      coords, _ = jax.jit(inference.make_predict_fn(apply_fn, settings))(None, crops)
      error = np.abs(np.asarray(coords) - points).max()
      assert error <= bound + 1e-4, (decoder, flip_test, error)
      if decoder == "argmax":
        assert error > 0.9  # HIH's gain is real: argmax is off by up to a pixel.


def test_ablation_configs_choose_the_heads_and_validation_names_the_keys():
  hih = ablations.get_config("base=default,head=hih")
  assert hih.model.head == "hih" and hih.eval.decoder == "hih_subpixel"
  assert ablations.get_config("head=hih").eval.decoder == "hih"  # the paper base: argmax
  recurrent = ablations.get_config("base=default,head=recurrent")
  assert recurrent.model.head == "recurrent" and recurrent.eval.decoder == "subpixel"
  with pytest.raises(ValueError, match="head='cascade'; expected one of"):
    ablations.get_config("head=cascade")
  for key, value, message in (
      ("model.head", "cascade", "head='cascade'; expected one of"),
      ("model.hih_decimal_size", 1, "hih_decimal_size=1 must be an integer >= 2"),
      ("model.hih_channels", 0, "hih_channels=0 must be an integer >= 1"),
      ("model.recurrent_steps", 0, "recurrent_steps=0 must be an integer >= 1"),
      ("model.recurrent_channels", -3, "recurrent_channels=-3 must be an integer >= 1"),
      ("model.recurrent_kernel", 4, "recurrent_kernel=4 must be odd"),
      ("loss.hih_decimal_sigma", 0.0, "loss.hih_decimal_sigma must be positive"),
      ("loss.hih_decimal_weight", -1.0, "loss.hih_decimal_weight must be >= 0"),
      ("eval.decoder", "hih", "eval.decoder 'hih' needs outputs that model.head 'heatmap'")):
    config = tiny.get_config()
    config.update_from_flattened_dict({key: value})
    with pytest.raises(errors.ConfigError, match=message):
      validation.validate_config(config, num_devices=1)
  config = ablations.get_config("base=default,head=hih")
  config.model.hih_decimal_size = 2
  with pytest.raises(errors.ConfigError, match="'hih_subpixel' fits a 3x3 stencil"):
    validation.validate_config(config, num_devices=1)
  config = ablations.get_config("base=default,head=hih")
  config.loss.target_rounding = "authors"
  with pytest.raises(errors.ConfigError, match="loss.target_rounding 'authors'"):
    validation.validate_config(config, num_devices=1)


def test_quantization_study_adds_the_hih_decoders():
  faces = decoding_error.random_meanface_landmarks(16, 64, seed=2)
  errors_by_d = {d: decoding_error.decoding_error(64, 32, 1.5, faces, methods=(
      "argmax", "hih", "hih_subpixel"), decimal_size=d) for d in (4, 8, 16)}
  for d, result in errors_by_d.items():
    # The cell quantisation: ~1/d of argmax's error (uniform in a 1/d cell).
    np.testing.assert_allclose(result["hih"], result["argmax"] / d, rtol=0.2)
    assert result["hih_subpixel"] < 1e-2 * result["hih"]
  table = decoding_error_command.table(["--setting", "64:32:1.5", "--num_faces", "3",
                             "--decimal_sizes", "4", "8"])
  assert "| hih d=4 NME % | hih_subpixel d=4 NME % | hih d=8 NME %" in table
  config = ablations.get_config("base=default,head=hih")
  assert studies.study_decoders(config) == heatmaps.ALL_DECODERS
  assert studies.study_decoders(tiny.get_config()) == heatmaps.DECODERS
  settings = inference.PredictSettings.from_config(config.eval)
  passes = studies.study_passes("quantization", config, settings)
  assert [p.key for p in passes] == ["argmax", "quarter", "subpixel", "hih"]


def test_a_run_saved_before_the_heads_loads_as_the_fgtbt_head(tmp_path):
  import json
  saved = json.loads(tiny.get_config().to_json_best_effort())
  for field in ("head", "hih_decimal_size", "hih_channels", "recurrent_steps",
                "recurrent_channels", "recurrent_kernel"):
    del saved["model"][field]
  for field in ("hih_decimal_sigma", "hih_decimal_weight"):
    del saved["loss"][field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = rundir.load_run_config(tmp_path)
  assert loaded.model.head == "heatmap" and loaded.model.hih_decimal_size == 8
  # The upgrade gives the loss fields the values the run trained with.
  assert (loaded.loss.hih_decimal_sigma, loaded.loss.hih_decimal_weight) == (1.0, 0.1)
  validation.validate_config(loaded, num_devices=1)
  assert losses.LossConfig.from_config(loaded.loss, 4).hih_decimal_weight == 0.1
  # The network it trained: the FGTBT head's parameters and nothing else.
  abstract = models.abstract_variables(models.build_model(loaded.model), 64)
  reference = models.abstract_variables(models.build_model(tiny.get_config().model), 64)
  assert jax.tree.structure(abstract) == jax.tree.structure(reference)
  assert "decimal_head" not in abstract["params"]["decoder"]




def _head_config(head: str, data: int, fsdp: int, rules: str):
  config = ablations.get_config(f"base=default,head={head}")
  config.model.depthwise_impl = "conv"  # as configs/tiny.py: faster to compile
  config.optimizer.eps = 1e-3  # see tests/test_train.py
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.mesh.logical_axis_rules = models.logical_axis_rules(rules)
  return config


@pytest.mark.slow  # Two train steps compiled per head.
@pytest.mark.parametrize("head", ["hih", "recurrent"])
def test_head_trains_sharded_like_one_device_and_resumes_exactly(head, tmp_path):

  def compare(metrics8, metrics1):
    np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
    for name, value in metrics8["map_loss"].items():
      np.testing.assert_allclose(value, metrics1["map_loss"][name], rtol=1e-5, atol=1e-6)

  initial, _, state1, metrics8 = train_sharded_and_single(
      _head_config(head, 4, 2, "fsdp"), _head_config(head, 1, 1, "data"), tmp_path, compare)
  head_params = {"hih": "decimal_head", "recurrent": "refine"}[head]
  assert head_params in initial.params["decoder"]
  assert set(metrics8["map_loss"]) == ({"heatmaps", "decimal"} if head == "hih" else
                                        {"heatmaps_0", "heatmaps_1", "heatmaps_2"})
  moved = jax.device_get(state1.params)["decoder"][head_params]
  start = initial.params["decoder"][head_params]
  # The head's own parameters trained (a few warm-up steps at lr ~1e-4; the
  # recurrent step's zero-initialised last conv moves from zero).
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), moved, start))) > 1e-5
