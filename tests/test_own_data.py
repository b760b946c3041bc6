"""Your own faces: a flat folder of images + annotation files, converted under a
benchmark's or a user point scheme, trained and evaluated (#32 item 3).

Fast tier: the folder reader, the schemes, the conversion (and its clean-up
when it fails), the data column, the pipeline's masks and the loss's dataset
ids. Slow tier: the documented recipe of configs/own_data.py as commands
(convert, run.py train, run.py eval) on a standard and a 20-point user scheme
trained jointly.
"""

import json
import os
import pathlib
import subprocess
import sys

import cv2
import ml_collections
import numpy as np
import pytest

from fgtbt_jax import landmarks
from fgtbt_jax.data import convert
from fgtbt_jax.data import datasets
from fgtbt_jax.data import prepare
from fgtbt_jax.data import schemes
from fgtbt_jax.data import synthetic
from fgtbt_jax.data import tfds_builders
from fgtbt_jax.data.readers import folder
from fgtbt_jax.errors import ConfigError, DataError
from tests import helpers

# 20 of 300W's 68 points, closed under the left/right flip: jaw ends and
# chin, brow ends, nose bridge, tip and wings, eye corners, mouth corners
# and mid-lips.
SUBSET_300W = (0, 8, 16, 17, 21, 22, 26, 27, 30, 31, 33, 35, 36, 39, 42, 45, 48, 51, 54, 57)


def write_faces(folder_path: pathlib.Path, count: int, points=None, fmt: str = "pts",
                seed: int = 7, size: int = 128) -> pathlib.Path:
  """`count` rendered faces as face_NNN.png + an annotation of the 300W points
  (or `points`: indices into 300W's) in `fmt` (pts 1-based, json/csv 0-based)."""
  folder_path.mkdir(parents=True, exist_ok=True)
  index = landmarks.get_protocol("300W").unified_index
  for i in range(count):
    image, unified, _ = synthetic.render_face(seed, i, size)
    own = unified[index]
    if points is not None:
      own = own[list(points)]
    stem = folder_path / f"face_{i:03d}"
    cv2.imwrite(str(stem) + ".png", image[..., ::-1])
    if fmt == "pts":
      body = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in own)
      stem.with_suffix(".pts").write_text(f"version: 1\nn_points: {len(own)}\n{{\n{body}\n}}\n")
    elif fmt == "json":
      stem.with_suffix(".json").write_text(json.dumps({"landmarks": own.tolist()}))
    else:
      stem.with_suffix(".csv").write_text(
          "x,y\n" + "".join(f"{x:.3f},{y:.3f}\n" for x, y in own))
  return folder_path


def subset_scheme(path: pathlib.Path) -> pathlib.Path:
  path.write_text(json.dumps({"points": [f"300W:{i}" for i in SUBSET_300W]}))
  return path


@pytest.fixture(autouse=True)
def _forget_registered_schemes():
  yield
  landmarks.unregister_protocols()


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
  return write_faces(tmp_path_factory.mktemp("own") / "faces", 10)


# ---------------------------------------------------------------------------
# Point names and schemes.


def test_every_unified_point_has_one_name_and_benchmark_aliases_resolve():
  assert len(set(landmarks.POINT_NAMES)) == landmarks.NUM_UNIFIED
  ids = landmarks.point_ids([f"300W:{i}" for i in range(68)])
  np.testing.assert_array_equal(ids, landmarks.get_protocol("300W").unified_index)
  by_name = landmarks.point_ids([landmarks.POINT_NAMES[u] for u in ids])
  np.testing.assert_array_equal(by_name, ids)


def test_a_user_protocol_of_a_benchmarks_points_matches_it():
  own = schemes.own_protocol("mine", "300W", dataset_id=4)
  w300 = landmarks.get_protocol("300W")
  np.testing.assert_array_equal(own.unified_index, w300.unified_index)
  np.testing.assert_array_equal(own.flip_permutation, w300.flip_permutation)
  np.testing.assert_array_equal(own.unified_mask, w300.unified_mask)
  assert own.default_normalizer == "inter_ocular"
  assert own.normalizers == dict(w300.normalizers)
  # Each benchmark's scheme keeps its normalisers: COFW inter-pupil, AFLW the box.
  for name in landmarks.PROTOCOL_NAMES:
    benchmark = landmarks.get_protocol(name)
    own = schemes.own_protocol("mine", name, dataset_id=4)
    assert own.default_normalizer == benchmark.default_normalizer, name


def test_exported_metadata_lists_the_runs_own_schemes():
  import types
  from fgtbt_jax.deploy import export
  from fgtbt_jax.inference import PredictSettings
  landmarks.register_protocol(schemes.own_protocol("mine", "COFW", dataset_id=4))
  signature = types.SimpleNamespace(
      in_avals=[types.SimpleNamespace(shape=(1, 64, 64, 3), dtype="uint8")], out_avals=[],
      platforms=("cpu",))
  metadata = export.artifact_metadata(signature, settings=PredictSettings(), output="landmarks",
                                      crop_enlarge=1.25, own_schemes=("mine",))
  assert set(metadata["unified_index"]) == {*landmarks.PROTOCOL_NAMES, "mine"}
  assert metadata["unified_index"]["mine"] == landmarks.get_protocol("COFW").unified_index.tolist()


def test_a_subset_scheme_keeps_its_points_flips_and_normaliser(tmp_path):
  own = schemes.own_protocol("mine20", subset_scheme(tmp_path / "s.json"), dataset_id=5)
  assert own.num_landmarks == 20 and own.unified_mask.sum() == 20
  w300 = landmarks.get_protocol("300W")
  # The flip of each point is the 300W flip of the same point.
  mirrored = w300.flip_permutation[list(SUBSET_300W)]
  np.testing.assert_array_equal(np.asarray(SUBSET_300W)[own.flip_permutation], mirrored)
  a, b = own.normalizers["inter_ocular"].a[0], own.normalizers["inter_ocular"].b[0]
  assert (SUBSET_300W[a], SUBSET_300W[b]) == (36, 45)
  # Without both outer eye corners the normaliser is the box.
  nose = schemes.own_protocol("nose", ["300W:27", "300W:30", "300W:33"], dataset_id=4)
  assert nose.default_normalizer == "box"


@pytest.mark.parametrize("content, match", [
    ('{"points": ["jaw_00", "nose_tipp"]}', r"s\.json: .*point 1 'nose_tipp' is not a unified"),
    ('{"points": ["300W:30", "300W:30"]}', r"s\.json: .*point 1 '300W:30' repeats point 0"),
    ('{"dots": []}', r"s\.json: no 'points' key"),
    ('{"points": ["jaw_00", "jaw_48"]}', r"s\.json: .*'jaw_00' has its mirror 'jaw_47' outside"),
])
def test_a_bad_scheme_file_names_the_file_and_the_point(tmp_path, content, match):
  path = tmp_path / "s.json"
  path.write_text(content)
  with pytest.raises(DataError, match=match):
    schemes.own_protocol("mine", path)


def test_own_names_may_not_be_a_benchmarks():
  with pytest.raises(ValueError, match="is a benchmark's"):
    landmarks.user_protocol("wflw", landmarks.get_protocol("300W").unified_index, 4)


def test_dataset_ids_follow_the_config_order():
  assert landmarks.dataset_ids(["mine", "300W", "other"]) == {"mine": 4, "300W": 1, "other": 5}
  assert landmarks.num_dataset_ids(landmarks.PROTOCOL_NAMES) == 4
  assert landmarks.num_dataset_ids(["mine", "WFLW"]) == 5


# ---------------------------------------------------------------------------
# The folder reader.


@pytest.mark.parametrize("fmt", ["pts", "json", "csv"])
def test_the_folder_reader_reads_each_annotation_format(tmp_path, fmt):
  src = write_faces(tmp_path / fmt, 4, fmt=fmt)
  records, report = folder.read_folder("300W", str(src), "train", split_ratio=0.5)
  test, _ = folder.read_folder("300W", str(src), "test", split_ratio=0.5)
  assert len(records) == 2 and len(test) == 2 and report.num_skipped == 0
  assert {r.image_name for r in records}.isdisjoint(r.image_name for r in test)
  index = landmarks.get_protocol("300W").unified_index
  for r in records + test:
    i = int(pathlib.Path(r.image_name).stem.split("_")[1])
    _, unified, _ = synthetic.render_face(7, i, 128)
    np.testing.assert_allclose(r.landmarks, unified[index], atol=2e-3)


def test_a_split_list_names_the_test_images(faces, tmp_path):
  listing = tmp_path / "test.txt"
  listing.write_text("# held out\nface_002.png\nface_005\n")
  test, report = folder.read_folder("300W", str(faces), "test", split_list=str(listing))
  assert sorted(r.image_name for r in test) == ["face_002.png", "face_005.png"]
  assert any("test.txt" in n for n in report.notes)
  listing.write_text("face_002\nface_999\n")
  with pytest.raises(DataError, match=r"test\.txt:2: 'face_999' is no annotated image"):
    folder.read_folder("300W", str(faces), "test", split_list=str(listing))


def test_the_ratio_split_is_stable(faces):
  first = folder.read_folder("300W", str(faces), "test")[0]
  again = folder.read_folder("300W", str(faces), "test")[0]
  assert [r.image_name for r in first] == [r.image_name for r in again] and len(first) == 1


def test_bad_folders_give_one_error_naming_the_file(tmp_path, faces):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match=r"empty: no images with an annotation file"):
    folder.read_folder("300W", str(empty), "train")

  orphan = write_faces(tmp_path / "orphan", 3)
  (orphan / "face_001.pts").unlink()
  with pytest.raises(DataError, match=r"orphan/face_001\.png: image without an annotation"):
    folder.read_folder("300W", str(orphan), "train")
  records, report = folder.read_folder("300W", str(orphan), "train", on_error="skip",
                                       split_ratio=0.5)
  assert report.skipped_by_kind() == {"missing_annotation": 1} and len(records) == 1

  short = write_faces(tmp_path / "short", 3)
  write_faces(tmp_path / "short_tmp", 1, points=range(36))
  os.replace(tmp_path / "short_tmp" / "face_000.pts", short / "face_001.pts")
  with pytest.raises(DataError, match=r"short/face_001\.pts:2: 36 points, the 300W scheme has 68"):
    for split in ("train", "test"):
      folder.read_folder("300W", str(short), split)

  bad_json = write_faces(tmp_path / "badjson", 2, fmt="json")
  (bad_json / "face_000.json").write_text('{"points": []}')
  with pytest.raises(DataError, match=r"badjson/face_000\.json: no 'landmarks' key"):
    for split in ("train", "test"):
      folder.read_folder("300W", str(bad_json), split)


def test_a_flat_folder_is_detected_for_a_benchmark(faces):
  from fgtbt_jax.data import readers  # pylint: disable=g-import-not-at-top
  assert readers.detect_format("300W", str(faces)) == datasets.FOLDER


# ---------------------------------------------------------------------------
# Conversion.


def _convert(name, src, out, **kwargs):
  return convert.convert_dataset(name, src, out, num_threads=1, **kwargs)


def test_own_data_converts_with_its_scheme_stored_and_is_labelled_own_folder(faces, tmp_path):
  out = tmp_path / "out"
  summary = _convert("mine", faces, out, scheme="300W", split_ratio=0.8)
  assert summary.splits["train"].written == 8 and summary.splits["test"].written == 2
  assert summary.path.parent.parent.name == "fgtbt_own_mine"
  assert schemes.stored_scheme(out, "mine") == [
      landmarks.POINT_NAMES[u] for u in landmarks.get_protocol("300W").unified_index]
  assert tfds_builders.data_kind(out, "mine") == tfds_builders.DATA_OWN_FOLDER
  # Converting again needs no scheme (it is stored) and reuses the conversion.
  landmarks.unregister_protocols()
  assert _convert("mine", faces, out).reused
  # Another scheme into the same conversion is refused.
  with pytest.raises(ValueError, match=r"converted there with another point scheme"):
    _convert("mine", faces, out, scheme=subset_scheme(tmp_path / "s.json"))


def test_a_benchmark_read_from_a_folder_is_labelled_own_folder(faces, tmp_path):
  _convert("300w", faces, tmp_path / "out", split_ratio=0.8)
  assert tfds_builders.data_kind(tmp_path / "out", "300W") == tfds_builders.DATA_OWN_FOLDER


def test_raw_synthetic_files_convert_as_synthetic(tmp_path):
  raw = tmp_path / "raw"
  synthetic.write_synthetic_datasets(str(raw), {"300W": (2, 2)}, num_workers=1)
  _convert("300w", raw / "300W", tmp_path / "out")
  assert tfds_builders.data_kind(tmp_path / "out", "300W") == tfds_builders.DATA_SYNTHETIC


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, faces):
  out = tmp_path / "new_out"
  short = write_faces(tmp_path / "short", 2, points=range(36))
  with pytest.raises(DataError, match=r"face_00\d\.pts:2: 36 points, the mine scheme has 68"):
    _convert("mine", short, out, scheme="300W")
  assert not out.exists()
  # Into an existing folder: what was there stays, nothing is added.
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(DataError):
    _convert("mine", short, out, scheme="300W")
  assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="no images with an annotation file"):
    _convert("mine", empty, out, scheme="300W")
  assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_a_scheme_is_needed_for_an_own_name_and_refused_for_a_benchmark(faces, tmp_path):
  with pytest.raises(ValueError, match=r"give its point scheme: --scheme"):
    _convert("mine", faces, tmp_path / "out")
  with pytest.raises(ValueError, match=r"a scheme is for a dataset of your own name"):
    _convert("300w", faces, tmp_path / "out", scheme="WFLW")


def test_the_convert_command_lists_points_and_converts_a_folder(faces, tmp_path, capsys):
  from fgtbt_jax.commands import convert as convert_command  # pylint: disable=g-import-not-at-top
  assert convert_command.main(["--list-points"]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0].split() == ["name", "unified", "WFLW", "300W", "COFW", "AFLW"]
  assert len(table) == 1 + landmarks.NUM_UNIFIED
  assert convert_command.main(["--dataset", "mine", "--format", "folder", "--src", str(faces),
                               "--scheme", "300W", "--out", str(tmp_path / "out"),
                               "--threads", "1"]) == 0
  assert "train: read 9, written 9" in capsys.readouterr().out
  scheme = subset_scheme(tmp_path / "s.json")
  assert convert_command.main(["--dataset", "mine20", "--format", "folder", "--src", str(faces),
                               "--scheme", str(scheme), "--out", str(tmp_path / "out")]) == 1
  assert "face_000.pts:2: 68 points, the mine20 scheme has 20" in capsys.readouterr().err
  assert convert_command.main(["--dataset", "mine", "--src", str(faces), "--out",
                               str(tmp_path / "out")]) == 0  # The stored scheme.
  assert "reused existing" in capsys.readouterr().out
  assert convert_command.main(["--dataset", "mine", "--src", str(faces), "--out",
                               str(tmp_path / "other")]) == 1
  assert "give its point scheme" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Training's view: registration, masks, data column.


@pytest.fixture(scope="module")
def converted(tmp_path_factory, faces):
  out = tmp_path_factory.mktemp("converted")
  scheme = subset_scheme(out / "s.json")
  _convert("mine", faces, out, scheme="300W")
  sub = write_faces(out / "faces20", 6, points=SUBSET_300W, seed=8)
  _convert("mine20", sub, out, scheme=scheme)
  landmarks.unregister_protocols()
  return out


def _data_config(data_dir, names):
  from configs import own_data  # pylint: disable=g-import-not-at-top
  config = own_data.get_config(",".join(names))
  config.data.data_dir = str(data_dir)
  return config


def test_own_data_config_registers_the_schemes_with_ids_after_the_benchmarks(converted):
  config = _data_config(converted, ["mine", "mine20"])
  assert config.synthetic_data.generate is False
  prepare.prepare_data(config.data, config.synthetic_data)
  assert landmarks.get_protocol("mine").dataset_id == 4
  assert landmarks.get_protocol("mine20").dataset_id == 5
  assert prepare.data_kinds(config.data) == {"mine": "own folder", "mine20": "own folder"}


def test_an_own_dataset_not_converted_is_one_config_error(converted):
  config = _data_config(converted, ["mine", "theirs"])
  with pytest.raises(ConfigError, match=r"'theirs': neither a benchmark .* convert it "
                                        r"with `fgtbt convert --dataset theirs --format folder"):
    prepare.prepare_data(config.data, config.synthetic_data)


def test_the_pipeline_masks_a_subset_scheme_to_its_points(converted):
  from fgtbt_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _data_config(converted, ["mine", "mine20"])
  config.data.image_size = 64
  schemes.register_own_datasets(config.data)
  samples = pipeline.augmented_samples(config.data, "mine20")
  expected = landmarks.get_protocol("300W").unified_index[list(SUBSET_300W)]
  for i in range(4):
    assert set(np.flatnonzero(samples[i]["mask"])) == set(expected.tolist())
    assert int(samples[i]["dataset_id"]) == 5


def test_the_loss_has_one_dataset_per_own_dataset():
  from fgtbt_jax import losses  # pylint: disable=g-import-not-at-top
  config = _data_config("unused", ["mine", "WFLW", "mine20"])
  config.loss.balancer = "uncertainty"
  loss_config = losses.LossConfig.from_config(
      config.loss, landmarks.num_dataset_ids(config.data.datasets))
  params, _ = losses.init_balancer(loss_config)
  assert params["log_variance"].shape == (6,)


def test_the_table_says_what_each_dataset_is():
  from fgtbt_jax import evaluate  # pylint: disable=g-import-not-at-top
  row = {"nme": 0.05, "baseline_nme": 0.2, "fr": 0.0, "auc": 0.5}
  final = {"300W": row, "WFLW": row, "mine": row, "steps": 3, "data": {"mine": "own folder"}}
  table = evaluate.format_table(final, 0.1, synthetic=["WFLW"], kinds=final["data"])
  rows = [line.split() for line in table.splitlines()[1:]]
  assert [r[0] for r in rows] == ["WFLW", "300W", "mine"]
  assert [" ".join(r[5:]) for r in rows] == ["synthetic", "benchmark", "own folder"]


def test_visualize_draws_every_converted_dataset(converted, tmp_path, capsys):
  from fgtbt_jax.commands import visualize  # pylint: disable=g-import-not-at-top
  out = tmp_path / "grid.png"
  assert visualize.main(["--data-dir", str(converted), "--out", str(out), "--num", "2",
                         "--image-size", "64", "--tile", "48"]) == 0
  grid = cv2.imread(str(out))
  assert grid.shape[:2] == (2 * (48 + visualize._LABEL_HEIGHT), 96)
  assert visualize.main(["--data-dir", str(converted), "--out", str(out),
                         "--datasets", "mine20", "--num", "2", "--image-size", "64",
                         "--tile", "48"]) == 0
  assert cv2.imread(str(out)).shape[:2] == (48 + visualize._LABEL_HEIGHT, 96)
  capsys.readouterr()


# ---------------------------------------------------------------------------
# Predict's view: the run keeps its own schemes (schemes.json).


def test_a_run_keeps_its_schemes_and_registers_them_without_the_data(converted, tmp_path):
  from fgtbt_jax.deploy import predictor  # pylint: disable=g-import-not-at-top
  config = _data_config(converted, ["mine", "WFLW", "mine20"])
  schemes.register_own_datasets(config.data)
  path = schemes.write_run_schemes(tmp_path, config.data)
  assert path == tmp_path / schemes.RUN_FILE
  held = json.loads(path.read_text())["schemes"]
  assert list(held) == ["mine", "mine20"]
  assert held["mine20"] == [landmarks.POINT_NAMES[u] for u in
                            landmarks.get_protocol("300W").unified_index[list(SUBSET_300W)]]
  landmarks.unregister_protocols()
  config.data.data_dir = str(tmp_path / "moved")  # The data is gone; the run still knows.
  predictor.register_run_schemes(tmp_path, config)
  mine20 = landmarks.get_protocol("mine20")
  assert mine20.dataset_id == 5 and landmarks.get_protocol("mine").dataset_id == 4
  name, index = landmarks.protocol_index("MINE20")
  assert name == "mine20"
  np.testing.assert_array_equal(
      index, landmarks.get_protocol("300W").unified_index[list(SUBSET_300W)])
  # A run of benchmarks alone writes nothing and forgets schemes registered before.
  assert schemes.write_run_schemes(tmp_path / "b", _data_config("x", ["300W"]).data) is None
  predictor.register_run_schemes(tmp_path / "b", _data_config("x", ["300W"]))
  with pytest.raises(ValueError, match="unknown protocol 'mine20'"):
    landmarks.get_protocol("mine20")


def test_an_older_run_reads_its_schemes_from_its_conversions(converted, tmp_path):
  config = _data_config(converted, ["mine20"])
  registered = schemes.register_run_schemes(tmp_path, config)  # No schemes.json here.
  assert list(registered) == ["mine20"] and len(registered["mine20"].unified_index) == 20
  (tmp_path / schemes.RUN_FILE).write_text('{"schemes": {"mine20": ["jaw_00", 3]}}')
  with pytest.raises(DataError, match=r"schemes.json\[schemes\]\[mine20\]: expected a list"):
    schemes.register_run_schemes(tmp_path, config)


def test_predict_protocol_may_name_an_own_dataset_and_an_unknown_name_is_one_error(tmp_path):
  from fgtbt_jax.deploy import predict_files  # pylint: disable=g-import-not-at-top
  config = _data_config(tmp_path / "nothing", ["mine", "300W"])
  config.predict.protocol = "mine"
  # A training config: checked before its data registers the scheme.
  predict_files.validate_predict_config(config)
  # Predict: the scheme must be found (schemes.json or the conversion).
  with pytest.raises(ConfigError, match=r"^predict.protocol 'mine': the point scheme of the "
                     r"run's own dataset mine is neither in the run's schemes.json .* expected "
                     r"one of \['unified', 'WFLW', '300W', 'COFW', 'AFLW'\]$"):
    predict_files.validate_predict_config(config, schemes_registered=True)
  config.predict.protocol = "theirs"
  for registered in (False, True):
    with pytest.raises(ConfigError) as raised:
      predict_files.validate_predict_config(config, schemes_registered=registered)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(
        "predict.protocol: unknown protocol 'theirs'; expected one of ['unified', 'WFLW'")
    assert ("'mine'" in message) == (not registered)
  landmarks.register_protocol(schemes.own_protocol("mine", "300W", 4))
  config.predict.protocol = "Mine"  # Case-insensitive, as the benchmarks' names.
  predict_files.validate_predict_config(config, schemes_registered=True)
  config.predict.dataset = "mine"  # Its best model: an own dataset of the run.
  predict_files.validate_predict_config(config, schemes_registered=True)


# ---------------------------------------------------------------------------
# The documented recipe, as commands (configs/own_data.py's docstring).


def _command(*args, timeout=900):
  return subprocess.run([sys.executable, *args], env=helpers.subprocess_env(devices=1),
                        capture_output=True, text=True, timeout=timeout, cwd=helpers.REPO)


@pytest.mark.slow
def test_the_recipe_converts_trains_and_evaluates_a_flat_folder(tmp_path):
  faces68 = write_faces(tmp_path / "faces", 10)
  faces20 = write_faces(tmp_path / "faces20", 10, points=SUBSET_300W, seed=8)
  scheme = subset_scheme(tmp_path / "points.json")
  out, workdir = tmp_path / "own", tmp_path / "runs" / "mine"
  for name, src, extra in (("mine", faces68, ["--scheme", "300W"]),
                           ("mine20", faces20, ["--scheme", str(scheme), "--split-ratio", "0.8"])):
    process = _command("-m", "data_pipelines.convert", "--dataset", name, "--format", "folder",
                       "--src", str(src), "--out", str(out), *extra)
    assert process.returncode == 0, process.stderr[-3000:]
  # A benchmark beside them: 300W's raw files as data_pipelines.synthetic writes them.
  process = _command("-m", "data_pipelines.synthetic", "--out", str(tmp_path / "raw"),
                     "--datasets", "300w", "--train", "6", "--test", "4", "--workers", "1")
  assert process.returncode == 0, process.stderr[-3000:]
  process = _command("-m", "data_pipelines.convert", "--dataset", "300w", "--src",
                     str(tmp_path / "raw" / "300W"), "--out", str(out))
  assert process.returncode == 0, process.stderr[-3000:]
  process = _command("run.py", "--config=configs/own_data.py:mine,mine20,300W",
                     f"--workdir={workdir}", f"--config.data.data_dir={out}",
                     "--config.train.steps=2", "--config.train.eval_every=2",
                     "--config.train.checkpoint_every=2")
  assert process.returncode == 0, process.stderr[-3000:]
  rows = {line.split()[0]: line.split() for line in process.stdout.splitlines()
          if line.startswith(("mine", "300W"))}
  assert set(rows) == {"mine", "mine20", "300W"}
  assert rows["mine"][-2:] == rows["mine20"][-2:] == ["own", "folder"]
  assert rows["300W"][-1] == "synthetic"
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["data"] == {"mine": "own folder", "mine20": "own folder", "300W": "synthetic"}
  process = _command("run.py", "eval", f"--workdir={workdir}")
  assert process.returncode == 0, process.stderr[-3000:]
  latest = json.loads((workdir / "eval_latest.json").read_text())
  for name in ("mine", "mine20"):
    assert latest[name] == pytest.approx(final[name], rel=1e-6)
  assert "### mine20 (own data)" in (workdir / "report" / "report.md").read_text()
  # The run predicts any benchmark's points (the model outputs all 124).
  process = _command("run.py", "predict", f"--workdir={workdir}",
                     f"--image={faces68 / 'face_000.png'}", "--config.predict.protocol=300W",
                     f"--out={tmp_path / 'predictions'}")
  assert process.returncode == 0, process.stderr[-3000:]
  predicted = json.loads((tmp_path / "predictions" / "face_000.png.json").read_text())
  assert len(predicted["faces"][0]["landmarks"]) == 68
  # And its own schemes, kept with the run (schemes.json), with the data moved
  # away: exactly the scheme's points, in its order.
  held = json.loads((workdir / "schemes.json").read_text())["schemes"]
  assert list(held) == ["mine", "mine20"] and len(held["mine20"]) == 20
  out.rename(tmp_path / "own_moved")
  process = _command("run.py", "predict", f"--workdir={workdir}",
                     f"--image={faces68 / 'face_000.png'}", "--config.predict.protocol=mine20",
                     f"--out={tmp_path / 'predictions20'}")
  assert process.returncode == 0, process.stderr[-3000:]
  predicted20 = json.loads((tmp_path / "predictions20" / "face_000.png.json").read_text())
  assert predicted20["protocol"] == "mine20" and predicted20["num_landmarks"] == 20
  np.testing.assert_allclose(
      np.asarray(predicted20["faces"][0]["landmarks"]),
      np.asarray(predicted["faces"][0]["landmarks"])[list(SUBSET_300W)], atol=1e-3)
  # An unknown name: one line naming the choices, the run's own schemes among them.
  process = _command("run.py", "predict", f"--workdir={workdir}",
                     f"--image={faces68 / 'face_000.png'}", "--config.predict.protocol=theirs",
                     f"--out={tmp_path / 'predictions20'}")
  lines = process.stderr.strip().splitlines()
  assert process.returncode != 0 and len(lines) == 1, lines
  assert ("predict.protocol: unknown protocol 'theirs'; expected one of ['unified', 'WFLW', "
          "'300W', 'COFW', 'AFLW', 'mine', 'mine20']") in lines[0]
