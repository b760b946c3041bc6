"""Faces without landmarks for weak supervision (#33 item 3, the data side).

`data.labeled_fraction` keeps the annotations of an exact, seeded share of
each dataset's train examples; an unlabeled folder (`fgtbt convert
--unlabeled`) is a dataset of faces with no annotation at all. Both reach
the training batch with all-zero masks (no heatmap loss), evaluation leaves
unlabeled folders out, and the loss balancers take a dataset id that is
never present.

Fast tier: the choice of labeled examples, real pipeline batches, the
conversion, its errors, the data preparation and the loss. Slow tier: a
tiny training run with an unlabeled folder in the mix, evaluated after.
"""

import json
import math
import pathlib

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax.commands import convert as convert_command
from fgtbt_jax.data import config as data_config_lib
from fgtbt_jax.data import convert
from fgtbt_jax.data import pipeline
from fgtbt_jax.data import prepare
from fgtbt_jax.data import schemes
from fgtbt_jax.data import synthetic
from fgtbt_jax.data import tfds_builders
from fgtbt_jax.data.readers import folder
from fgtbt_jax.errors import ConfigError, DataError

LABELED_TRAIN = 8  # Of the labeled folder's 10 faces (split ratio 0.8).
UNLABELED = 6


def _write_faces(path: pathlib.Path, count: int, annotate: bool, seed: int = 3,
                 size: int = 96) -> pathlib.Path:
  """`count` rendered faces as face_NNN.png, each with a 300W .pts when `annotate`."""
  path.mkdir(parents=True, exist_ok=True)
  index = landmarks.get_protocol("300W").unified_index
  for i in range(count):
    image, unified, _ = synthetic.render_face(seed, i, size)
    cv2.imwrite(str(path / f"face_{i:03d}.png"), image[..., ::-1])
    if annotate:
      body = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in unified[index])
      (path / f"face_{i:03d}.pts").write_text(
          f"version: 1\nn_points: {len(index)}\n{{\n{body}\n}}\n")
  return path


def _convert(name, src, out, **kwargs):
  return convert.convert_dataset(name, src, out, num_threads=1, **kwargs)


@pytest.fixture(autouse=True)
def _forget_registered_schemes():
  yield
  landmarks.unregister_protocols()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """"mine" (300W points, 8 train / 2 test) and "extra" (6 unlabeled faces)."""
  root = tmp_path_factory.mktemp("unlabeled")
  out = root / "out"
  _convert("mine", _write_faces(root / "labeled", 10, annotate=True), out, scheme="300W",
           split_ratio=0.8)
  _convert("extra", _write_faces(root / "faces", UNLABELED, annotate=False, seed=4), out,
           unlabeled=True)
  landmarks.unregister_protocols()
  return out


def _data_config(data_dir, datasets=("mine", "extra"), **overrides):
  c = data_config_lib.data_config()
  c.data_dir = str(data_dir)
  c.datasets = tuple(datasets)
  c.image_size = 32
  c.num_workers = 0
  c.read_threads = 1
  c.prefetch_buffer_size = 2
  c.eval_batch_size = 4
  c.update(overrides)
  schemes.register_own_datasets(c)
  return c


def _take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


# ---------------------------------------------------------------------------
# Which examples keep their landmarks.


@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 101])
@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 1 / 3, 0.9, 1.0])
def test_the_labeled_count_is_exact(n, fraction):
  labeled = pipeline.labeled_examples(n, fraction, 0, "WFLW")
  assert labeled.shape == (n,) and labeled.dtype == bool
  assert int(labeled.sum()) == round(fraction * n)


def test_the_labeled_examples_are_deterministic_seeded_and_nested():
  a = pipeline.labeled_examples(200, 0.3, 5, "mine")
  np.testing.assert_array_equal(a, pipeline.labeled_examples(200, 0.3, 5, "mine"))
  assert not np.array_equal(a, pipeline.labeled_examples(200, 0.3, 6, "mine"))
  assert not np.array_equal(a, pipeline.labeled_examples(200, 0.3, 5, "theirs"))
  # A benchmark's name is case-insensitive, as everywhere.
  np.testing.assert_array_equal(pipeline.labeled_examples(50, 0.5, 1, "wflw"),
                                pipeline.labeled_examples(50, 0.5, 1, "WFLW"))
  # A larger fraction keeps the examples of a smaller one.
  larger = pipeline.labeled_examples(200, 0.6, 5, "mine")
  assert np.all(larger[a]) and larger.sum() == 120
  assert pipeline.labeled_examples(200, 1.0, 5, "mine").all()


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.01, 2, float("nan"), float("inf"),
                                   "half", None, True])
def test_a_labeled_fraction_outside_0_1_is_one_config_error(value):
  with pytest.raises(ConfigError, match=r"^data\.labeled_fraction must be a number in "
                     r"\(0, 1\] \(the share of each dataset's train examples that keep their "
                     r"landmarks\), got "):
    data_config_lib.check_labeled_fraction(value)


def test_the_pipeline_refuses_a_bad_labeled_fraction(data_dir):
  config = _data_config(data_dir, labeled_fraction=0.0)
  with pytest.raises(ConfigError, match=r"data\.labeled_fraction .* got 0\.0$"):
    pipeline.make_train_iterator(config)


def test_the_default_config_keeps_every_annotation():
  assert data_config_lib.data_config().labeled_fraction == 1.0


# ---------------------------------------------------------------------------
# Real pipeline batches.


def _labeled_names(config, dataset, process_index=0, process_count=1) -> tuple[set, set]:
  """(labeled, unlabeled) image names of one epoch of a process's train examples."""
  samples = pipeline.dataset_samples(config, dataset, process_index=process_index,
                                     process_count=process_count)
  per_epoch = -(-(LABELED_TRAIN - process_index) // process_count)
  labeled, unlabeled = set(), set()
  for i in range(per_epoch):
    (labeled if samples[i][pipeline.LABELED_KEY] else unlabeled).add(samples[i]["image_name"])
  return labeled, unlabeled


def test_the_labeled_examples_are_the_same_on_every_process(data_dir):
  config = _data_config(data_dir, labeled_fraction=0.5)
  labeled, unlabeled = _labeled_names(config, "mine")
  assert len(labeled) == len(unlabeled) == LABELED_TRAIN // 2
  # Chosen by the index in the converted split, before the process slices.
  source = pipeline.open_source(config, "mine", "train")
  chosen = pipeline.labeled_examples(len(source), 0.5, config.seed, "mine")
  assert labeled == {source[i]["image_name"] for i in np.flatnonzero(chosen)}
  shared = [_labeled_names(config, "mine", p, 2) for p in range(2)]
  assert shared[0][0] | shared[1][0] == labeled
  assert shared[0][1] | shared[1][1] == unlabeled
  # Another seed, another choice (of the 70 ways to pick 4 of 8).
  assert _labeled_names(_data_config(data_dir, labeled_fraction=0.5, seed=1), "mine")[0] != labeled


def test_batches_carry_zero_masks_for_unlabeled_faces(data_dir):
  config = _data_config(data_dir, labeled_fraction=0.5, samples_per_dataset=2)
  ids = landmarks.dataset_ids(config.datasets)
  points = set(landmarks.get_protocol("300W").unified_index.tolist())
  # One epoch of mine: 4 batches of 2 of its 8 train faces.
  batches = _take(pipeline.make_train_iterator(config), LABELED_TRAIN // 2)
  counts = {"labeled": 0, "unlabeled": 0}
  for batch in batches:
    assert batch["mask"].shape == (4, landmarks.NUM_UNIFIED)
    np.testing.assert_array_equal(batch["dataset_id"], [ids["mine"]] * 2 + [ids["extra"]] * 2)
    for row in range(2):  # mine: its 68 points, or none.
      mask = batch["mask"][row]
      if mask.any():
        assert set(np.flatnonzero(mask).tolist()) == points
        counts["labeled"] += 1
      else:
        np.testing.assert_array_equal(batch["landmarks"][row], 0.0)
        counts["unlabeled"] += 1
    # The unlabeled folder: never a point, its landmarks 0 (not NaN).
    assert not batch["mask"][2:].any()
    np.testing.assert_array_equal(batch["landmarks"][2:], 0.0)
    assert batch["image"][2:].std() > 10  # Real faces, not blank crops.
  assert counts == {"labeled": LABELED_TRAIN // 2, "unlabeled": LABELED_TRAIN // 2}
  # Every annotation when labeled_fraction is 1.
  for batch in _take(pipeline.make_train_iterator(_data_config(data_dir)), 4):
    assert batch["mask"][:2].sum(-1).tolist() == [68, 68]
    assert not batch["mask"][2:].any()


def test_the_eval_split_keeps_every_annotation(data_dir):
  full = _take(pipeline.make_eval_iterator(_data_config(data_dir), "mine"), 1)[0]
  cut = _take(pipeline.make_eval_iterator(
      _data_config(data_dir, labeled_fraction=0.1), "mine"), 1)[0]
  assert full["valid"].sum() == 2
  assert np.isfinite(cut["landmarks"]).all()
  np.testing.assert_array_equal(full["landmarks"], cut["landmarks"])


# ---------------------------------------------------------------------------
# The unlabeled folder's conversion.


def test_an_unlabeled_folder_converts_as_a_train_split_of_faces_without_points(data_dir):
  assert tfds_builders.converted_splits(data_dir, "extra") == ["train"]
  assert tfds_builders.is_unlabeled(data_dir, "extra")
  assert not tfds_builders.is_unlabeled(data_dir, "mine")
  assert tfds_builders.data_kind(data_dir, "extra") == tfds_builders.DATA_UNLABELED_FOLDER
  assert schemes.stored_scheme(data_dir, "extra") == list(landmarks.POINT_NAMES)
  _data_config(data_dir)  # Registers the schemes.
  source = tfds_builders.open_split(data_dir, "extra", "train", decode_image=True)
  assert len(source) == UNLABELED
  for i in range(UNLABELED):
    example = source[i]
    assert np.isnan(example["landmarks"]).all()
    # The whole 96 px image is the face box: centred in the loose crop, whose
    # side is twice the box's (`LOOSE_CROP_FACTOR`).
    side = example["image"].shape[0]
    np.testing.assert_allclose(example["center"], [(side - 1) / 2] * 2, atol=1e-3)
    np.testing.assert_allclose(example["box"], [side / 4 - 0.5, side / 4 - 0.5,
                                                3 * side / 4 - 0.5, 3 * side / 4 - 0.5],
                               atol=1e-3)
    np.testing.assert_allclose(example["scale"] * 200, side / 2, rtol=1e-5)
    assert example["image_name"] == f"face_{i:03d}.png".encode()


def test_the_folder_reader_reads_an_unlabeled_folder(tmp_path):
  faces = _write_faces(tmp_path / "faces", 2, annotate=False, size=64)
  (faces / "sub").mkdir()
  cv2.imwrite(str(faces / "sub" / "wide.jpg"), np.full((40, 80, 3), 128, np.uint8))
  landmarks.register_protocol(schemes.own_protocol("extra", list(convert.UNLABELED_SCHEME)))
  records, report = folder.read_folder("extra", faces, "train", unlabeled=True)
  assert [r.image_name for r in records] == ["face_000.png", "face_001.png", "sub/wide.jpg"]
  np.testing.assert_array_equal(records[2].box, [-0.5, -0.5, 79.5, 39.5])
  np.testing.assert_allclose(records[2].center, [39.5, 19.5])
  assert records[2].scale == pytest.approx(80 / 200)
  assert records[0].landmarks.shape == (landmarks.NUM_UNIFIED, 2)
  assert np.isnan(records[0].landmarks).all()
  assert report.num_read == 3 and not report.skipped


def test_the_convert_command_converts_an_unlabeled_folder(tmp_path, capsys):
  faces = _write_faces(tmp_path / "faces", 3, annotate=False, size=64)
  out = tmp_path / "out"
  status = convert_command.main(["--dataset", "more", "--unlabeled", "--src", str(faces),
                                 "--out", str(out), "--threads", "1"])
  captured = capsys.readouterr()
  assert status == 0, captured.err
  assert "train: read 3, written 3, skipped 0" in captured.out
  assert "test:" not in captured.out
  assert tfds_builders.is_unlabeled(out, "more")
  # Converting again reuses it.
  assert _convert("more", faces, out, unlabeled=True).reused


# ---------------------------------------------------------------------------
# Bad input: one error naming the file, the folder or the option.


def test_an_unlabeled_folder_without_images_names_the_folder(tmp_path):
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  (empty / "notes.txt").write_text("no faces here")
  with pytest.raises(DataError, match=rf"^{empty}: no face images \(.jpg/.jpeg/.png/.bmp/"
                     r".webp\) found in the unlabeled folder or its subfolders$"):
    _convert("more", empty, tmp_path / "out", unlabeled=True)
  # Nothing left behind.
  assert not (tmp_path / "out").exists()


def test_an_annotation_file_in_an_unlabeled_folder_is_refused(tmp_path):
  faces = _write_faces(tmp_path / "faces", 3, annotate=False, size=64)
  _write_faces(tmp_path / "faces" / "annotated", 1, annotate=True, size=64)
  with pytest.raises(DataError, match=rf"^{faces}/annotated/face_000.pts: an unlabeled folder "
                     r"holds an annotation file \(1 in all\); convert annotated faces as a "
                     r"labeled dataset \(without --unlabeled\)"):
    _convert("more", faces, tmp_path / "out", unlabeled=True)


def test_an_unreadable_image_names_its_file_or_is_skipped(tmp_path):
  faces = _write_faces(tmp_path / "faces", 3, annotate=False, size=64)
  (faces / "broken.jpg").write_bytes(b"not an image")
  with pytest.raises(DataError, match=rf"^{faces}/broken.jpg: not a readable image"):
    _convert("more", faces, tmp_path / "out", unlabeled=True)
  summary = _convert("more", faces, tmp_path / "out", unlabeled=True, on_error="skip")
  assert summary.splits["train"].written == 3
  assert summary.splits["train"].skipped_reading == {"corrupt_image": 1}


@pytest.mark.parametrize("name, kwargs, match", [
    ("300w", {}, r"^--unlabeled: 300W is a benchmark, whose faces are annotated; convert "
                 r"faces without annotations under a name of your own"),
    ("more", {"scheme": "300W"}, r"^--unlabeled: an unlabeled folder has no points; leave "
                                 r"out --scheme \(300W\)$"),
    ("more", {"split_ratio": 0.8}, r"^--unlabeled: an unlabeled folder has a train split "
                                   r"only; leave out --split-ratio / --split-list$"),
    ("more", {"splits": ("train", "test")}, r"^--unlabeled: an unlabeled folder has a train "
                                            r"split only \(nothing to evaluate\), not "
                                            r"train,test"),
    ("more", {"fmt": "300w_pts"}, r"^--unlabeled: faces without annotations are read from a "
                                  r"folder \(--format folder\), not 300w_pts$"),
])
def test_what_an_unlabeled_conversion_does_not_take(tmp_path, name, kwargs, match):
  faces = _write_faces(tmp_path / "faces", 1, annotate=False, size=64)
  with pytest.raises(ValueError, match=match):
    _convert(name, faces, tmp_path / "out", unlabeled=True, **kwargs)


def test_the_command_reports_a_bad_unlabeled_conversion_in_one_line(tmp_path, capsys):
  faces = _write_faces(tmp_path / "faces", 1, annotate=False, size=64)
  status = convert_command.main(["--dataset", "more", "--unlabeled", "--scheme", "300W",
                                 "--src", str(faces), "--out", str(tmp_path / "out")])
  assert status == 1
  assert capsys.readouterr().err == ("convert: error: --unlabeled: an unlabeled folder has no "
                                     "points; leave out --scheme (300W)\n")


def test_a_labeled_conversion_is_not_reused_as_unlabeled(data_dir, tmp_path):
  # Same scheme (all unified points) and name: the labeled state still differs.
  faces = _write_faces(tmp_path / "faces", 2, annotate=False, size=64)
  out = tmp_path / "out"
  _convert("more", faces, out, unlabeled=True)
  with pytest.raises(DataError, match=r"fgtbt_own_more/jpeg95_512/1.0.0: converted as "
                     r"unlabeled faces, not labeled; convert into another --out or under "
                     r"another name, or pass --overwrite to replace it$"):
    tfds_builders.build("more", faces, out, splits=("train",), num_threads=1)


# ---------------------------------------------------------------------------
# The run's view: preparation, evaluation, the loss.


def test_prepare_needs_no_test_split_of_an_unlabeled_folder(data_dir):
  config = _data_config(data_dir)
  synthetic_config = ml_collections.ConfigDict({"generate": False})
  prepare.prepare_data(config, synthetic_config)
  prepare.prepare_data(config, synthetic_config, splits=(config.eval_split,))
  assert prepare.evaluated_datasets(config) == ["mine"]
  assert prepare.data_kinds(config) == {"mine": "own folder", "extra": "unlabeled folder"}
  # Benchmarks and datasets not converted (yet) stay evaluated.
  assert prepare.evaluated_datasets(_data_config(data_dir, ("mine",))) == ["mine"]
  config.datasets = ("extra", "mine", "absent")
  assert prepare.evaluated_datasets(config) == ["mine", "absent"]
  config.data_dir = ""
  assert prepare.evaluated_datasets(config) == ["extra", "mine", "absent"]


def test_a_run_of_unlabeled_folders_alone_is_one_config_error(data_dir):
  config = _data_config(data_dir, ("extra",))
  with pytest.raises(ConfigError, match=r"^data.datasets: every dataset is an unlabeled folder "
                     r"of faces without landmarks \(extra\); a run needs at least one dataset "
                     r"with landmarks"):
    prepare.prepare_data(config, ml_collections.ConfigDict({"generate": False}))


def test_an_unlabeled_folder_under_another_train_split_is_one_config_error(data_dir):
  config = _data_config(data_dir, train_split="test")
  with pytest.raises(ConfigError, match=r"^data.train_split: the unlabeled folder extra holds "
                     r"the splits \['train'\] .*, not 'test'"):
    prepare.prepare_data(config, ml_collections.ConfigDict({"generate": False}),
                         splits=("test",))


@pytest.mark.parametrize("balancer", losses.BALANCERS)
def test_the_balancers_take_a_dataset_that_is_never_present(balancer):
  # Datasets 0..4; 4 (an unlabeled folder) has samples in the batch, all masks zero.
  config = losses.LossConfig(balancer=balancer, sigma=1.0, dwa_window=1, num_datasets=5)
  params, state = losses.init_balancer(config)
  rng = np.random.default_rng(0)
  pred = jnp.asarray(rng.uniform(0, 1, (4, 8, 8, landmarks.NUM_UNIFIED)), jnp.float32)
  target = jnp.asarray(rng.uniform(0, 1, (4, 8, 8, landmarks.NUM_UNIFIED)), jnp.float32)
  mask = np.zeros((4, landmarks.NUM_UNIFIED), bool)
  mask[:2, landmarks.get_protocol("300W").unified_index] = True
  dataset_id = jnp.asarray([1, 1, 4, 4], jnp.int32)

  def total(pred, params):
    return losses.fmb_loss(config, pred, target, jnp.asarray(mask), dataset_id, params,
                           state)

  (value, aux), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(pred, params)
  assert math.isfinite(float(value)) and float(value) > 0
  assert aux["present"].tolist() == [False, True, False, False, False]
  assert float(aux["dataset_loss"][4]) == 0.0
  assert np.isfinite(np.asarray(grads[0])).all()
  # The unlabeled samples get no gradient, the labeled ones do.
  assert not np.asarray(grads[0][2:]).any() and np.asarray(grads[0][:2]).any()
  for leaf in jax.tree_util.tree_leaves(grads[1]):
    assert np.isfinite(np.asarray(leaf)).all() and float(np.asarray(leaf)[4]) == 0.0
  for step in range(3):  # DWA's windows close with dataset 4 absent.
    state = losses.update_balancer_state(config, state, aux["dataset_loss"], aux["present"],
                                         jnp.asarray(step))
  for leaf in jax.tree_util.tree_leaves(state):
    assert np.isfinite(np.asarray(leaf)).all()
  value_after, _ = total(pred, params)
  assert math.isfinite(float(value_after))


# ---------------------------------------------------------------------------
# A short training run with an unlabeled folder in the mix.


@pytest.mark.slow  # Compiles the tiny model's train and eval steps (about a minute).
def test_a_tiny_run_trains_with_an_unlabeled_folder_and_evaluates_the_rest(data_dir, tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from fgtbt_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fgtbt_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.data.datasets = ("mine", "extra")
  config.data.labeled_fraction = 0.5
  config.data.samples_per_dataset = 4  # A global batch of 8: one per test device.
  config.synthetic_data.generate = False
  config.train.steps = 2
  config.train.eval_every = 2
  config.train.checkpoint_every = 2
  workdir = tmp_path / "run"
  final = train.train_and_evaluate(config, workdir)
  assert final["steps"] == 2
  assert "mine" in final and "extra" not in final
  assert math.isfinite(final["mine"]["nme"])
  assert final["data"] == {"mine": "own folder", "extra": "unlabeled folder"}
  rows = [json.loads(line) for line in (workdir / "train_metrics.jsonl").read_text().splitlines()]
  assert rows and all(math.isfinite(row["loss"]) for row in rows)
  assert all(row["loss/extra"] == 0.0 for row in rows)
  evaluated = [json.loads(line) for line in (workdir / "eval_metrics.jsonl").read_text().splitlines()]
  assert evaluated and not any(key.startswith("extra/") for row in evaluated for key in row)
  for checkpoint in ("latest", "best"):
    result = evaluate.evaluate_workdir(config, workdir, checkpoint, write_report=False,
                                       out_dir=tmp_path / checkpoint)
    assert set(result.per_image) == {"mine"}
    assert result.final["mine"]["nme"] == pytest.approx(final["mine"]["nme"], rel=1e-5)


def test_config_validation_names_a_bad_labeled_fraction():
  from configs import tiny
  from fgtbt_jax import validation
  for bad in (0.0, 1.5, float("nan")):
    config = tiny.get_config()
    config.data.labeled_fraction = bad
    with pytest.raises(ConfigError, match="data.labeled_fraction"):
      validation.validate_config(config, 1)
  config = tiny.get_config()
  config.data.labeled_fraction = 0.25
  validation.validate_config(config, 1)


def test_predict_and_export_default_to_the_first_evaluated_dataset(data_dir):
  from fgtbt_jax import rundir
  config = ml_collections.ConfigDict({"data": _data_config(data_dir, ("extra", "mine")),
                                      "predict": {"dataset": ""}})
  assert rundir.best_model_dataset(config) == "mine"  # "extra" keeps no best model
  config.predict.dataset = "extra"
  assert rundir.best_model_dataset(config) == "extra"  # as named (its restore says why not)
