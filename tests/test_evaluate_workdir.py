"""The eval-only mode and the one inference core, through their library calls.

A tiny workdir with random weights (`helpers.write_random_run`) over eight
synthetic test faces per dataset:
* `evaluate.evaluate_workdir` restores each checkpoint once (EMA variables
  only), runs the studies over the same sharded pass and writes the report;
* the evaluation and `Predictor` give the same landmarks for the same faces,
  checkpoint and settings, smoothing included;
* the run directory's config and checkpoint errors name what is missing.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from fgtbt_jax.data import pipeline
from fgtbt_jax import checkpointing
from fgtbt_jax import crop
from fgtbt_jax import errors
from fgtbt_jax import evaluate
from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import metrics
from fgtbt_jax import models
from fgtbt_jax.deploy import predictor as predictor_lib
from fgtbt_jax import rundir
from fgtbt_jax import sharding
from fgtbt_jax import validation
from tests import helpers
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)

PROTOCOLS = ("WFLW", "300W", "COFW", "AFLW")


def _config(data_dir, **eval_fields):
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.synthetic_data.generate = False
  config.eval.update(eval_fields)
  return config


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, synthetic_data_dir):
  """A workdir with a random-weight latest checkpoint (step 4) and a best model per dataset."""
  workdir = tmp_path_factory.mktemp("random_run")
  config = _config(synthetic_data_dir)
  state = helpers.write_random_run(workdir, config, scale=None)
  checkpoints = checkpointing.Checkpointer.for_run(config, workdir, enable_async=False)
  checkpoints.save_best(3, state.ema_variables(), {name: 0.5 for name in PROTOCOLS})
  checkpoints.close()
  return workdir, config


class _CountingRestores:
  """Counts the Checkpointer's restores; `restore` (the whole train state) must not run."""

  def __init__(self, monkeypatch):
    self.calls = {"restore": 0, "restore_ema": 0, "restore_best": 0}
    for name in self.calls:
      original = getattr(checkpointing.Checkpointer, name)

      def counted(checkpointer, *args, _name=name, _original=original, **kwargs):
        self.calls[_name] += 1
        return _original(checkpointer, *args, **kwargs)

      monkeypatch.setattr(checkpointing.Checkpointer, name, counted)


def test_eval_restores_each_checkpoint_once_and_runs_the_studies_on_the_same_pass(
    random_run, tmp_path, monkeypatch):
  workdir, config = random_run
  config = _config(config.data.data_dir, studies=("lowres", "quantization"),
                   study_max_batches=1)
  restores = _CountingRestores(monkeypatch)
  compiled, passes = [], []
  compile_predict_fn, predict_split = inference.compile_predict_fn, evaluate.predict_split
  monkeypatch.setattr(inference, "compile_predict_fn", lambda model, mesh, rules, settings: (
      compiled.append(settings) or compile_predict_fn(model, mesh, rules, settings)))
  monkeypatch.setattr(evaluate, "predict_split", lambda *args, **kwargs: (
      passes.append((args[3], kwargs.get("transform") is not None))
      or predict_split(*args, **kwargs)))
  done = evaluate.evaluate_workdir(config, workdir, "latest", out_dir=tmp_path)
  # One compiled predict function per settings (the main pass's, argmax, quarter),
  # and every pass through the one generator: 4 datasets x (main + 4 sides + 2 decoders).
  assert [s.decoder for s in compiled] == ["subpixel", "argmax", "quarter"]
  assert len(passes) == 28 and sum(transformed for _, transformed in passes) == 16
  assert restores.calls == {"restore": 0, "restore_ema": 1, "restore_best": 0}
  final = done.final
  assert final["steps"] == 4 and final["synthetic"] == sorted(PROTOCOLS)
  assert final["failure_threshold"] == 0.1
  assert json.loads((tmp_path / "eval_latest.json").read_text()) == final
  assert done.report == tmp_path / "report" / "report.md"
  text = done.report.read_text()
  assert "latest checkpoint (step 4)" in text and "decoder subpixel, flip test on" in text
  assert "face box side of the unchanged input is 51 px" in text
  for section in ("### WFLW (synthetic", "### AFLW (synthetic", "Low-resolution study",
                  "Heatmap quantization study", "C(p)"):
    assert section in text
  summary = json.loads((tmp_path / "report" / "report.json").read_text())
  for name in PROTOCOLS:
    default = landmarks.get_protocol(name).default_normalizer
    main = summary["tables"][name]["full"][default]
    assert main["count"] == 8 and main["nme"] == pytest.approx(final[name]["nme"])
    # The 128 px pass leaves the 51 px face of a 64 px crop as it is.
    assert summary["studies"]["lowres"]["128"][name] == pytest.approx(main["nme"])
    # The configured decoder's entry is the main pass; the others are passes of their own.
    measured = summary["studies"]["quantization"]["measured"]
    assert measured["subpixel"][name] == pytest.approx(main["nme"])
    assert all(np.isfinite(measured[d][name]) for d in ("argmax", "quarter"))
  assert (tmp_path / "report" / "high_frequency.png").is_file()
  # The faces' quality beside the NMEs: the degraded inputs' (no DHLN here).
  assert "Face quality at low resolution" in text
  faces = summary["studies"]["lowres_faces"]
  assert faces["128"] == {"input_psnr": None, "input_ssim": 1.0}  # unchanged inputs
  assert 10.0 < faces["16"]["input_psnr"] < faces["32"]["input_psnr"]
  assert faces["16"]["input_ssim"] < faces["32"]["input_ssim"] < 1.0

  restores.calls.update(restore=0, restore_ema=0, restore_best=0)
  best = evaluate.evaluate_workdir(_config(config.data.data_dir), workdir, "best",
                                   write_report=False)
  assert restores.calls == {"restore": 0, "restore_ema": 0, "restore_best": 4}
  assert best.report is None and best.final["steps"] == {name: 3 for name in PROTOCOLS}
  for name in PROTOCOLS:  # The best models are the same EMA weights.
    assert best.final[name]["nme"] == pytest.approx(final[name]["nme"])


def test_a_read_only_run_is_evaluated_with_its_metrics(random_run, tmp_path):
  """An archived run (a read-only mount of the workdir) is only read: its metrics
  reach `on_results` first, writing into it is one OutputError naming the file and
  --out, and with `out_dir` elsewhere the evaluation completes."""
  workdir, config = random_run
  with helpers.read_only_view(workdir, tmp_path / "archived") as archived:
    seen = []
    with pytest.raises(errors.OutputError, match=r"archived/eval_latest.json: cannot write the "
                                                 r"evaluation \(Read-only file system\); .* "
                                                 r"--out=DIR"):
      evaluate.evaluate_workdir(config, archived, "latest", write_report=False,
                                on_results=seen.append)
    assert seen and all(np.isfinite(seen[0][name]["nme"]) for name in PROTOCOLS)
    done = evaluate.evaluate_workdir(config, archived, "latest", out_dir=tmp_path / "out")
    assert json.loads((tmp_path / "out" / "eval_latest.json").read_text()) == done.final
    assert done.report == tmp_path / "out" / "report" / "report.md" and done.report.is_file()
    assert done.final["WFLW"]["nme"] == pytest.approx(seen[0]["WFLW"]["nme"])


def test_a_study_transform_reaches_the_model_through_the_sharded_pass(synthetic_data_dir):
  """A stand-in predict function whose points move with the inputs' pixel contrast."""
  import jax
  import jax.numpy as jnp
  from fgtbt_jax import studies
  config = _config(synthetic_data_dir)
  mesh = sharding.make_mesh(config.mesh)  # 8 devices

  @jax.jit
  def contrast_points(variables, images):
    contrast = jnp.abs(jnp.diff(images.astype(jnp.float32), axis=2)).mean(axis=(1, 2, 3))
    points = jnp.broadcast_to(contrast[:, None, None] * variables, (len(images), 124, 2))
    return points, jnp.ones(points.shape[:2])

  def nme(transform=None):
    return evaluate.collect_split(evaluate.predict_split(
        contrast_points, 1.0, config.data, "COFW", mesh, transform=transform), "COFW",
        keep_images=3)

  plain = nme()
  assert plain.predictions.shape == (8, 29, 2) and plain.images.shape == (3, 64, 64, 3)
  passes = {p.key: p for p in studies.study_passes("lowres", config, evaluate.Evaluator(
      config, models.build_model(config.model), mesh, ()).settings)}
  assert set(passes) == {16, 32, 64, 128}
  assert nme(passes[128].transform).nme() == pytest.approx(plain.nme())
  degraded = nme(passes[16].transform)
  assert degraded.nme() != pytest.approx(plain.nme())
  # The kept images are the ones the model saw.
  np.testing.assert_array_equal(degraded.images,
                                studies.degrade_resolution(plain.images, 16, 1.25))


@pytest.mark.parametrize("smoothing_sigma", [0.0, 1.0])
def test_eval_and_predictor_give_the_same_landmarks(random_run, smoothing_sigma):
  workdir, config = random_run
  # `run.py eval`'s library call, on 8 devices, with smoothing from the config.
  config = _config(config.data.data_dir, smoothing_sigma=smoothing_sigma)
  config.data.datasets, config.data.samples_per_dataset = ("COFW",), 8  # 8 devices
  done = evaluate.evaluate_workdir(config, workdir, "latest", write_report=False)

  # The predictor on one device takes its settings from the run's config (the
  # saved one has no smoothing: it comes as an override, like
  # --config.eval.smoothing_sigma).
  def predictor_with(sigma):
    return predictor_lib.Predictor.from_checkpoint(workdir, "latest", config=rundir.load_run_config(
        workdir, {"eval.smoothing_sigma": sigma}))

  predictor = predictor_with(smoothing_sigma)
  assert predictor.settings == inference.PredictSettings("subpixel", True, smoothing_sigma)
  assert predictor.settings == inference.PredictSettings.from_config(config.eval)
  assert predictor.step == 4
  batch = next(iter(pipeline.make_eval_iterator(config.data, "COFW")))
  valid = np.asarray(batch["valid"], bool)
  points, _ = predictor.run_crops(np.asarray(batch["image"])[valid])
  index = landmarks.get_protocol("COFW").unified_index
  in_stored_crop = crop.apply_affine(points[:, index], np.asarray(batch["inverse_affine"])[valid])
  np.testing.assert_allclose(in_stored_crop, done.per_image["COFW"].predictions, atol=1e-3)
  if smoothing_sigma:
    unsmoothed, _ = predictor_with(0.0).run_crops(np.asarray(batch["image"])[valid])
    assert np.abs(unsmoothed - points).max() > 1e-2  # The smoothing is really applied.


def test_predictor_defaults_come_from_the_run_config(random_run, tmp_path):
  workdir, config = random_run
  paper_style = tmp_path / "argmax_run"
  paper_style.mkdir()
  (paper_style / "checkpoints").symlink_to(workdir / "checkpoints")
  saved = _config(config.data.data_dir, decoder="argmax", flip_test=False)
  rundir.write_run_config(saved, paper_style)
  predictor = predictor_lib.Predictor.from_checkpoint(paper_style, "best", dataset="AFLW")
  assert predictor.settings == inference.PredictSettings("argmax", False, 0.0)
  override = predictor_lib.Predictor.from_checkpoint(
      paper_style, "best", config=rundir.load_run_config(paper_style, {"eval.decoder": "quarter"}))
  assert override.settings == inference.PredictSettings("quarter", False, 0.0)


def test_settings_validate_decoder_and_smoothing():
  with pytest.raises(ValueError, match="decoder 'soft'"):
    inference.PredictSettings(decoder="soft")
  with pytest.raises(ValueError, match="'subpixel' decoder only"):
    inference.PredictSettings(decoder="argmax", smoothing_sigma=1.0)
  # A decoder override of a smoothing run drops the smoothing (a sub-pixel option).
  smoothing = inference.PredictSettings("subpixel", True, 1.0)
  assert smoothing.replace(decoder="argmax") == inference.PredictSettings("argmax", True, 0.0)


def test_config_checks_of_the_eval_section(random_run):
  _, config = random_run
  for fields, message in (({"studies": ("speed",)}, "eval.studies: unknown studies"),
                          ({"lowres_sides": (0, 16)}, "eval.lowres_sides"),
                          ({"study_max_batches": -1}, "eval.study_max_batches"),
                          ({"failure_threshold": 0.0}, "eval.failure_threshold"),
                          ({"decoder": "argmax", "smoothing_sigma": 1.0}, "eval.smoothing_sigma")):
    with pytest.raises(errors.ConfigError, match=message):
      validation.validate_config(_config(config.data.data_dir, **fields))


def test_run_config_overrides_and_workdir_errors(random_run, tmp_path):
  workdir, _ = random_run
  config = rundir.load_run_config(workdir, {"data.data_dir": "/data/real",
                                                   "eval.studies": ("lowres",)})
  assert config.data.data_dir == "/data/real" and config.eval.studies == ("lowres",)
  with pytest.raises(errors.ConfigError, match="data.no_such_field: the run's config"):
    rundir.load_run_config(workdir, {"data.no_such_field": 1})
  with pytest.raises(errors.ConfigError, match="train.steps"):
    rundir.load_run_config(workdir, {"train.steps": "many"})
  assert rundir.find_workdir(workdir / "checkpoints") == workdir
  with pytest.raises(rundir.WorkdirError, match="not a training workdir"):
    rundir.find_workdir(tmp_path)
  # The config is written whole or not at all (a temporary file, then a rename).
  rundir.write_run_config(tiny.get_config(), tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


# The model fields added since the first config.json (2026-11-21).
_NEWER_MODEL_FIELDS = ("fgsa_compat", "batch_norm_unbiased_variance", "decoder_fusion", "head",
                       "hih_decimal_size", "hih_channels", "recurrent_steps",
                       "recurrent_channels", "recurrent_kernel", "remat_policy",
                       "depthwise_impl", "pointwise_impl")


def _first_release_json(config) -> dict:
  """`config` as a run saved by the first release wrote it: no field added since,
  and the boolean loss.rounded_targets that loss.target_rounding replaced."""
  saved = json.loads(config.to_json_best_effort())
  for key in rundir.UPGRADES:
    section, _, field = key.partition(".")
    if field:
      del saved[section][field]
    elif section != "model":  # The model section itself is from the first release.
      del saved[section]
  saved["model"] = {k: v for k, v in saved["model"].items() if k not in _NEWER_MODEL_FIELDS}
  saved["model"]["variant"], saved["loss"]["rounded_targets"] = "tiny", True
  return saved


def test_an_old_config_json_is_upgraded_the_same_way_by_train_eval_and_predict(
    random_run, tmp_path):
  from fgtbt_jax import train
  workdir, config = random_run
  old = tmp_path / "old_run"
  old.mkdir()
  (old / "checkpoints").symlink_to(workdir / "checkpoints")
  (old / "config.json").write_text(json.dumps(_first_release_json(config)))
  # Every field declared today (and no other), each with the behaviour the run had.
  upgraded = rundir.load_run_config(old)
  assert rundir.flat_config(upgraded).keys() == rundir.flat_config(tiny.get_config()).keys()
  assert "rounded_targets" not in upgraded.loss and upgraded.loss.target_rounding == "nearest"
  assert not upgraded.train.ema_bias_correction  # The plain average of its day.
  assert (upgraded.model.head, upgraded.model.fgsa_compat) == ("heatmap", "paper")
  assert upgraded.predict.to_dict() == tiny.get_config().predict.to_dict()
  # Training: a resume compares the config with the upgraded one (nearest, not none).
  wanted = _config(config.data.data_dir)
  with pytest.raises(errors.ConfigError, match="loss.target_rounding 'nearest' -> 'none'"):
    train._check_resume(wanted, old, latest=4)  # pylint: disable=protected-access
  wanted.loss.target_rounding = "nearest"
  train._check_resume(wanted, old, latest=4)  # pylint: disable=protected-access
  # Eval: the upgraded config, with overrides, evaluates as today's does.
  overrides = {"data.datasets": ("COFW",), "data.samples_per_dataset": 8}  # 8 devices
  finals = [evaluate.evaluate_workdir(rundir.load_run_config(run, overrides), run, "latest",
                                      write_report=False, out_dir=tmp_path / run.name).final
            for run in (old, workdir)]
  # (Equal within rounding: the old run's depthwise form is the default, tiny.py's "conv".)
  assert finals[0]["COFW"] == pytest.approx(finals[1]["COFW"], rel=1e-6)
  # Predict: the run's decoding and today's predict defaults.
  predictor = predictor_lib.Predictor.from_checkpoint(old, "latest")
  assert predictor.settings == inference.PredictSettings.from_config(config.eval)
  assert predictor.batch_size == 8 and predictor.max_faces is None
  assert predictor.min_face_confidence == 0.6


def test_restore_errors_name_the_missing_checkpoint(random_run, tmp_path):
  workdir, config = random_run
  mesh = sharding.single_device_mesh()
  rules = sharding.logical_rules(config.mesh.logical_axis_rules)
  with pytest.raises(ValueError, match="checkpoint kind 'newest'"):
    inference.restore_models(config, workdir, "newest", mesh, rules)
  narrow = _config(config.data.data_dir)
  narrow.data.datasets = ("WFLW", "COFW")
  with pytest.raises(rundir.WorkdirError, match=r"trained on \['WFLW', 'COFW'\]"):
    inference.restore_models(narrow, workdir, "best", mesh, rules, datasets=["AFLW"])
  rundir.write_run_config(config, tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(rundir.WorkdirError, match="no train-state checkpoint under"):
    inference.restore_models(config, tmp_path, "latest", mesh, rules)
  with pytest.raises(rundir.WorkdirError, match="no best checkpoint for WFLW under"):
    predictor_lib.Predictor.from_checkpoint(tmp_path, "best")
  wider = _config(config.data.data_dir)
  wider.model.decoder_dim = 2 * wider.model.decoder_dim
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="does not match"):
    inference.restore_models(wider, workdir, "latest", mesh, rules)


def test_eval_and_predict_refuse_a_checkpoint_with_non_finite_weights(
    tmp_path, synthetic_data_dir, monkeypatch):
  config = _config(synthetic_data_dir)
  monkeypatch.setattr(checkpointing, "first_non_finite", lambda tree: None)  # Around the guard.
  helpers.write_random_run(tmp_path, config, scale=float("nan"))
  monkeypatch.undo()
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=r"checkpoint .*latest/4: ema_batch_stats/.* holds NaN"):
    evaluate.evaluate_workdir(config, tmp_path, "latest", write_report=False)
  with pytest.raises(checkpointing.NonFiniteStateError, match="holds NaN or infinite values"):
    predictor_lib.Predictor.from_checkpoint(tmp_path, "latest")
  assert not (tmp_path / "eval_latest.json").exists()


# ---- The authors' evaluation conventions (eval.coordinates, failure_normalizer, batching). ----


def test_the_authors_ground_truth_is_their_quantised_target_mapped_back():
  """Their formulas on their map T: cell q = trunc(T(x) + 1), back at T^-1(q - 1).

  480 px crops, 240 x 240 heatmaps, face centre c, crop side h: T(x) =
  240 (x - c) / h + 120 (their `get_transform`), with x, c in the image.
  """
  rng = np.random.default_rng(0)
  center, side = np.array([301.25, 177.5]), 613.0  # in image pixels
  image_points = center + rng.uniform(-0.5, 0.5, size=(6, 9, 2)) * side
  t = 240.0 * (image_points - center) / side + 120.0
  assert (np.modf(t)[0] < 0.5).any() and (np.modf(t)[0] > 0.5).any()  # both sides of a cell
  expected_image = center + (np.trunc(t + 1.0) - 1.0 - 120.0) * side / 240.0
  # The project's input pixels (pixel centres at integers) of the same points.
  to_input = crop.crop_affine(center, side / 200.0, 480)
  inputs = crop.apply_affine(image_points, to_input)
  quantised = evaluate.authors_ground_truth(inputs, 2.0)
  np.testing.assert_allclose(crop.apply_affine(quantised.astype(np.float64),
                                               crop.invert_affine(to_input)),
                             expected_image, atol=1e-3)


# The authors' NME normalisers (their compute_nme_io; COFW's reported one is
# inter-pupil, their compute_nme_ip) and the inter-pupil ones behind their FR.
_AUTHORS_NME_PAIRS = {"WFLW": (60, 72), "300W": (36, 45), "COFW": (16, 17), "AFLW": None}
_AUTHORS_PUPILS = {"WFLW": (96, 97), "COFW": (16, 17), "AFLW": (7, 10)}


def _authors_nme(pred, gt, dataset, box_size, pupils=False):
  """Their per-image NME: mean point distance over the normaliser, in one frame."""
  if pupils and dataset == "300W":
    d = np.linalg.norm(gt[:, 36:42].mean(1) - gt[:, 42:48].mean(1), axis=-1)
  elif pupils:
    a, b = _AUTHORS_PUPILS[dataset]
    d = np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)
  elif _AUTHORS_NME_PAIRS[dataset] is None:
    d = box_size
  else:
    a, b = _AUTHORS_NME_PAIRS[dataset]
    d = np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)
  return np.linalg.norm(pred - gt, axis=-1).mean(-1) / d


@pytest.fixture(scope="module")
def uneven_splits(tmp_path_factory):
  """Synthetic test splits of 13, 12, 7 and 1 faces: none fills batches of 8."""
  from fgtbt_jax.data import convert
  out = tmp_path_factory.mktemp("uneven")
  convert.convert_synthetic(out, {"WFLW": (1, 13), "300W": (1, 12), "COFW": (1, 7),
                                  "AFLW": (1, 1)}, render_workers=0, num_threads=2)
  return out


def test_unpadded_eval_of_a_compat_run_is_the_authors_evaluation_at_any_split_size(
    uneven_splits, tmp_path):
  """`run.py eval` of a run with the authors' model and evaluation settings (as an
  imported checkpoint's) over splits of 13, 12, 7 and 1 faces in batches of 8: it
  completes (each batch shape compiled), and its per-image NME and FR are their
  formulas on the same predictions: cells a of their integer argmax at T^-1(a - 1),
  the ground truth's cell trunc(T(x) + 1) at T^-1(cell - 1), T their crop map."""
  from fgtbt_jax.data import tfds_builders
  config = _config(uneven_splits, coordinates="authors", decoder="argmax", flip_test=True,
                   failure_normalizer="inter_pupil")
  config.model.fgsa_compat = "authors"
  config.data.eval_batch_size, config.data.eval_pad_last_batch = 8, False
  helpers.write_random_run(tmp_path, config, scale=None)
  # `run.py eval` as a user runs it (one device: the model depends on its batch-mates).
  process = subprocess.run([sys.executable, str(helpers.REPO / "run.py"), "eval",
                            f"--workdir={tmp_path}", "--noreport"],
                           env=helpers.subprocess_env(devices=1),
                           capture_output=True, text=True, timeout=900, cwd=helpers.REPO)
  assert process.returncode == 0, process.stderr[-3000:]
  written = json.loads((tmp_path / "eval_latest.json").read_text())
  # The same pass in this process, for its per-image arrays: the run's
  # restored EMA model through the evaluator's compiled predict function.
  mesh = sharding.single_device_mesh()
  rules = sharding.logical_rules(config.mesh.logical_axis_rules)
  [restored] = inference.restore_models(config, tmp_path, "latest", mesh, rules)
  evaluator = evaluate.Evaluator(config, models.build_model(config.model), mesh, rules)
  final, per_image = evaluator.evaluate(restored.variables, restored.step)
  assert evaluator.predict_fn().num_compiled == 5  # batches of 8, 5, 4, 7 and 1
  heatmap_side = config.data.image_size / 2
  for dataset, count in (("WFLW", 13), ("300W", 12), ("COFW", 7), ("AFLW", 1)):
    split = per_image[dataset]
    assert len(split.predictions) == count
    stored = tfds_builders.open_split(uneven_splits, dataset, "test", decode_image=False)
    examples = [stored[i] for i in range(count)]
    center = np.array([e["center"] for e in examples], np.float64)[:, None]
    side = np.array([200.0 * e["scale"] * config.data.crop_enlarge for e in examples])[:, None, None]
    to_map = lambda x: heatmap_side * (x - center) / side + heatmap_side / 2  # their T
    from_map = lambda t: center + (t - heatmap_side / 2) * side / heatmap_side
    cells = to_map(split.predictions.astype(np.float64)) + 1.0
    np.testing.assert_allclose(cells, np.round(cells), atol=2e-3)  # integer argmax cells
    truth = np.array([e["landmarks"] for e in examples], np.float64)
    truth_quantised = from_map(np.trunc(to_map(truth) + 1.0) - 1.0)
    np.testing.assert_allclose(split.ground_truth, truth_quantised, atol=2e-3)
    box_size = np.array([e["box_size"] for e in examples], np.float64)
    theirs = _authors_nme(from_map(np.round(cells) - 1.0), truth_quantised, dataset, box_size)
    ours = metrics.nme(split.predictions, split.ground_truth, dataset, box_size=split.box_size)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert final[dataset]["nme"] == pytest.approx(theirs.mean(), rel=1e-4)
    assert written[dataset]["nme"] == pytest.approx(theirs.mean(), rel=1e-4)
    failures = _authors_nme(from_map(np.round(cells) - 1.0), truth_quantised, dataset, box_size,
                            pupils=True) > 0.1
    assert final[dataset]["fr"] == written[dataset]["fr"] == pytest.approx(failures.mean())


def test_a_compiled_function_compiles_once_per_input_shape():
  import jax
  calls = []
  compiled = sharding.CompiledPerShape(jax.jit(lambda x: calls.append(x.shape) or 2 * x), "twice",
                                       sharding.single_device_mesh(), ())
  for size in (4, 4, 3, 4, 3, 1):
    np.testing.assert_array_equal(compiled(np.arange(size, dtype=np.float32)),
                                  2 * np.arange(size))
  assert calls == [(4,), (3,), (1,)] and compiled.num_compiled == 3


def test_the_authors_heatmap_to_image_map_in_the_predict_function():
  import jax.numpy as jnp
  cells = np.array([[1, 2], [6, 0], [3, 7]])  # (x, y) peaks of three points, 8 x 8 maps

  def apply_fn(variables, images):
    maps = np.zeros((len(images), 8, 8, 124), np.float32)
    for i, (x, y) in enumerate(cells):
      maps[:, y, x, i] = 1.0
    return jnp.asarray(maps)

  crops = np.zeros((2, 16, 16, 3), np.uint8)  # stride 2, h = 16 input px over 8 cells
  outputs = {}
  for coordinates in ("project", "authors"):
    settings = inference.PredictSettings(decoder="argmax", flip_test=False,
                                         coordinates=coordinates)
    outputs[coordinates] = np.asarray(inference.make_predict_fn(apply_fn, settings)(None, crops)[0])
  centre = (16 - 1) / 2
  np.testing.assert_allclose(outputs["project"][0, :3], centre + (cells - 3.5) * 16 / 8)
  np.testing.assert_allclose(outputs["authors"][0, :3], centre + (cells - 5.0) * 16 / 8)
  with pytest.raises(ValueError, match="coordinates 'paper'"):
    inference.PredictSettings(coordinates="paper")


def test_unpadded_batches_the_authors_ground_truth_and_the_bias(synthetic_data_dir):
  import jax.numpy as jnp
  config = _config(synthetic_data_dir, coordinates="authors")
  config.data.eval_batch_size, config.data.eval_pad_last_batch = 3, False
  mesh = sharding.single_device_mesh()
  sizes = []

  def fixed_points(variables, images):
    sizes.append(len(images))
    return jnp.full((len(images), 124, 2), 30.0), jnp.ones((len(images), 124))

  batches = list(evaluate.predict_split(fixed_points, None, config.data, "COFW", mesh,
                                        stride=2.0, coordinates="authors"))
  assert sizes == [3, 3, 2]  # 8 faces, no padding rows
  split = evaluate.collect_split(iter(batches), "COFW")
  expected_truth, expected_error = [], []
  for batch in pipeline.make_eval_iterator(config.data, "COFW"):
    keep = batch["valid"]
    inverse = np.asarray(batch["inverse_affine"], np.float64)[keep]
    truth_input = crop.apply_affine(np.asarray(batch["landmarks"], np.float64)[keep],
                                    crop.invert_affine(inverse))
    expected_truth.append(crop.apply_affine(evaluate.authors_ground_truth(truth_input, 2.0),
                                            inverse))
    expected_error.append((30.0 - truth_input) / 2.0)
  np.testing.assert_allclose(split.ground_truth, np.concatenate(expected_truth), atol=1e-3)
  np.testing.assert_allclose(split.signed_error, np.concatenate(expected_error), atol=1e-3)
  result = evaluate.summarize_dataset(split, 0.1, failure_normalizer="inter_ocular")
  assert result["bias"]["x"] == pytest.approx(float(np.nanmean(split.signed_error[..., 0])))
  per_image = {n: v for n, v in evaluate.summarize_dataset(split, 0.1)["normalizers"].items()}
  assert result["fr"] == per_image["inter_ocular"]["fr"]
  assert result["fr_normalizer"] == "inter_ocular"


@pytest.mark.parametrize("fields, message", [
    ({"eval.coordinates": "paper"}, r"eval.coordinates must be one of \('project', 'authors'\)"),
    ({"eval.failure_normalizer": "box"}, r"'box' is not a normaliser of \['WFLW', '300W', 'COFW'\]"),
    ({"data.eval_pad_last_batch": False},
     "data.eval_pad_last_batch=False needs one device and one process"),
])
def test_the_authors_evaluation_switches_are_validated(fields, message):
  config = _config("/data")
  config.update_from_flattened_dict(fields)
  with pytest.raises(errors.ConfigError, match=message):
    validation.validate_config(config, num_devices=8, process_count=1)


def test_best_models_can_be_chosen_on_a_subset():
  results = {"300W": {"nme": 0.04, "subsets": {"challenging": {"nme": 0.07}}},
             "WFLW": {"nme": 0.05, "subsets": {}}}
  assert evaluate.nme_by_dataset(results) == {"300W": 0.04, "WFLW": 0.05}
  assert evaluate.nme_by_dataset(results, ("300W:challenging",)) == {"300W": 0.07, "WFLW": 0.05}
