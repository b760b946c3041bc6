"""Data preparation: synthetic data only into folders of its own; clear errors."""

import functools

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fgtbt_jax.data import config as data_config_lib
from fgtbt_jax.data import convert
from fgtbt_jax.data import prepare
from fgtbt_jax.data import synthetic
from fgtbt_jax.data import tfds_builders
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax import images
from fgtbt_jax import landmarks as lm
from fgtbt_jax.errors import ConfigError, DataError

tfds.disable_progress_bar()

SIZES = {"WFLW": (4, 3), "300W": (4, 3), "COFW": (3, 2), "AFLW": (4, 3)}


def _records(dataset, n=1):
  """`n` plain faces per split: mean-face landmarks in a grey image."""
  protocol = lm.get_protocol(dataset)
  box = np.array([40.0, 30.0, 120.0, 130.0])
  points = lm.mean_face()[protocol.unified_index] * (box[2:] - box[:2]) + box[:2]
  image = images.encode_image(np.full((160, 160, 3), 90, np.uint8), "png")
  return {split: [FaceRecord(protocol.name, split, image, points, box, f"fixture:{i}")
                  for i in range(n)] for split in ("train", "test")}


def _convert(out, dataset, synthetic_mark=False):
  """Converts plain records; `synthetic_mark` marks them as generated data."""
  records = _records(dataset)
  tfds_builders.build(dataset, out, out, read_split=lambda _, split: (records[split], None),
                      splits=("train", "test"), num_threads=1, synthetic=synthetic_mark)


def _configs(data_dir, datasets=("WFLW", "300W", "COFW", "AFLW"), generate=False):
  data = data_config_lib.data_config()
  data.data_dir = str(data_dir)
  data.datasets = tuple(datasets)
  synth = ml_collections.ConfigDict({"generate": generate, "sizes": dict(SIZES),
                                     "seed": 0, "image_size": 64})
  return data, synth


def _listing(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _no_barrier(calls):
  return lambda name: calls.append(name)


def test_synthetic_data_is_never_written_beside_real_data(tmp_path):
  data_dir = tmp_path / "data"
  _convert(data_dir, "COFW")  # A user's real conversion.
  before = _listing(data_dir)
  calls = []
  data, synth = _configs(data_dir, generate=True)
  with pytest.raises(ConfigError) as error:
    prepare.prepare_data(data, synth, barrier=_no_barrier(calls))
  message = str(error.value)
  assert "synthetic_data.generate" in message and "data.data_dir" in message
  assert str(data_dir) in message and "fgtbt_cofw" in message
  assert "not marked synthetic" in message
  # Refused before anything was written, and before any process could start.
  assert _listing(data_dir) == before and calls == []


@pytest.mark.parametrize("layout", ["file", "raw_folder", "download", "config_file"])
def test_synthetic_data_refuses_other_contents(tmp_path, layout):
  data_dir = tmp_path / "data"
  if layout == "file":
    (data_dir / "notes.txt").parent.mkdir()
    (data_dir / "notes.txt").write_text("mine")
    culprit = "notes.txt"
  elif layout == "raw_folder":  # Real raw files where the synthetic ones would go.
    (data_dir / "raw" / "WFLW").mkdir(parents=True)
    (data_dir / "raw" / "WFLW" / "list_98pt_rect_attr_train.txt").write_text("1 2 3\n")
    culprit = "raw"
  elif layout == "download":
    (data_dir / "downloads").mkdir(parents=True)
    (data_dir / "downloads" / "WFLW.zip").write_bytes(b"PK")
    culprit = "downloads"
  else:
    (data_dir / "fgtbt_wflw").mkdir(parents=True)
    (data_dir / "fgtbt_wflw" / "README").write_text("mine")
    culprit = "README"
  assert any(culprit in entry for entry in prepare.foreign_entries(data_dir))
  data, synth = _configs(data_dir, generate=True)
  with pytest.raises(ConfigError, match=f"synthetic_data.generate: data.data_dir .*{culprit}"):
    prepare.prepare_data(data, synth, barrier=_no_barrier([]))


def test_synthetic_data_accepts_new_empty_and_interrupted_folders(tmp_path):
  assert prepare.foreign_entries(tmp_path / "new") == []
  assert prepare.foreign_entries(tmp_path) == []
  # An interrupted synthetic run: the marker, half-rendered raw files, TFDS's
  # empty downloads folder and an unfinished conversion.
  (tmp_path / "raw" / "WFLW").mkdir(parents=True)
  (tmp_path / "raw" / synthetic.MARKER_FILE).write_text("synthetic")
  (tmp_path / "downloads" / "extracted").mkdir(parents=True)
  (tmp_path / "fgtbt_wflw" / "jpeg95_512" / "1.0.0.incompleteABC").mkdir(parents=True)
  (tmp_path / "fgtbt_wflw" / ".config").mkdir()
  assert prepare.foreign_entries(tmp_path) == []
  # Without the marker the unfinished conversion may be anyone's.
  (tmp_path / "raw" / synthetic.MARKER_FILE).unlink()
  assert len(prepare.foreign_entries(tmp_path)) == 2


def test_generate_converts_once_then_reuses(tmp_path, monkeypatch):
  # Render in this process (the default spawns one renderer per CPU).
  monkeypatch.setattr(convert, "convert_synthetic", functools.partial(
      convert.convert_synthetic, render_workers=0, num_threads=1))
  data_dir = tmp_path / "synthetic"
  data, synth = _configs(data_dir, datasets=("WFLW", "COFW"), generate=True)
  calls = []
  prepare.prepare_data(data, synth, barrier=_no_barrier(calls))
  assert calls == ["synthetic data checked", "synthetic data ready"]
  assert (data_dir / "raw" / synthetic.MARKER_FILE).is_file()
  assert prepare.synthetic_datasets(data) == {"WFLW", "COFW"}
  assert prepare.foreign_entries(data_dir) == []
  before = _listing(data_dir)
  prepare.prepare_data(data, synth, barrier=_no_barrier([]))  # Reused as it is.
  assert _listing(data_dir) == before


def test_synthetic_datasets_labels_only_synthetic_conversions(tmp_path):
  _convert(tmp_path, "COFW")
  _convert(tmp_path, "WFLW", synthetic_mark=True)
  data, _ = _configs(tmp_path, datasets=("wflw", "COFW", "300W"))
  assert prepare.synthetic_datasets(data) == {"WFLW"}  # 300W is not converted.
  data.data_dir = ""
  assert prepare.synthetic_datasets(data) == set()


def test_missing_datasets_say_how_to_convert_or_leave_them_out(tmp_path):
  _convert(tmp_path, "WFLW")
  _convert(tmp_path, "300W")
  data, synth = _configs(tmp_path, datasets=("WFLW", "300W", "COFW"))
  with pytest.raises(ConfigError) as error:
    prepare.prepare_data(data, synth)
  message = str(error.value)
  assert f"data.data_dir '{tmp_path}' lacks COFW" in message
  assert str(tmp_path / "fgtbt_cofw") in message
  assert "python -m data_pipelines.convert --dataset cofw" in message
  assert """or leave it out with --config.data.datasets='("WFLW","300W")'""" in message
  data.datasets = ("COFW", "WFLW", "AFLW")
  with pytest.raises(ConfigError, match=r"""lacks COFW, AFLW: .*--dataset aflw.* leave them """
                                        r"""out with --config.data.datasets='\("WFLW",\)'"""):
    prepare.prepare_data(data, synth)
  data.datasets = ("COFW",)
  with pytest.raises(ConfigError, match="synthetic_data.generate=True"):
    prepare.prepare_data(data, synth)
  prepare.prepare_data(*_configs(tmp_path, datasets=("300W", "wflw")))


def test_bad_data_dir_and_dataset_names(tmp_path):
  data, synth = _configs(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="nowhere.* is not a directory"):
    prepare.prepare_data(data, synth)
  data.data_dir = ""
  with pytest.raises(ConfigError, match="data.data_dir is empty"):
    prepare.prepare_data(data, synth)
  data.data_dir = str(tmp_path)
  data.datasets = ("WFLW", "Helen")
  with pytest.raises(ConfigError, match=r"data.datasets: unknown protocol 'Helen'"):
    prepare.prepare_data(data, synth)
  _convert(tmp_path, "WFLW")
  records = _records("WFLW")
  tfds_builders.build("WFLW", tmp_path, tmp_path, config=tfds_builders.crop_config(256),
                      read_split=lambda _, split: (records[split], None), num_threads=1)
  data.datasets = ("WFLW",)
  with pytest.raises(ConfigError, match="data.crop_config: .*several crop configs"):
    prepare.prepare_data(data, synth)
  data.crop_config = "jpeg95_256"
  prepare.prepare_data(data, synth)


def test_a_split_the_run_needs_is_checked_before_any_step(tmp_path):
  records = _records("COFW")
  tfds_builders.build("COFW", tmp_path, tmp_path, splits=("train",), num_threads=1,
                      read_split=lambda _, split: (records[split], None))
  data, synth = _configs(tmp_path, datasets=("COFW",))
  with pytest.raises(ConfigError, match=r"holds the COFW splits \['train'\], not \['test'\].*"
                                        r"--dataset cofw --splits test"):
    prepare.prepare_data(data, synth)
  with pytest.raises(ConfigError, match=r"not \['test'\]"):
    prepare.prepare_data(data, synth, splits=("test",))  # What eval reads.
  prepare.prepare_data(data, synth, splits=("train",))


def test_a_damaged_converted_file_is_named_at_start_and_at_read(tmp_path):
  records = _records("COFW", n=6)
  tfds_builders.build("COFW", tmp_path, tmp_path, splits=("train", "test"), num_threads=1,
                      read_split=lambda _, split: (records[split], None))
  data, synth = _configs(tmp_path, datasets=("COFW",))
  prepare.prepare_data(data, synth)
  test_file = next(tfds_builders.converted_dir(tmp_path, "COFW").glob("*-test.array_record*"))
  intact = test_file.read_bytes()
  # A record damaged inside the file: found when it is read, the files named.
  damaged = bytearray(intact)
  damaged[200:264] = bytes(64)
  test_file.write_bytes(bytes(damaged))
  source = tfds_builders.open_split(tmp_path, "COFW", "test")
  with pytest.raises(DataError, match=rf"{test_file}: converted COFW data file is damaged or "
                                      r"cut short \(record 0: .*\); convert COFW again"):
    source[0]
  # Cut short: refused before any step, naming the file.
  test_file.write_bytes(intact[:len(intact) // 2])
  with pytest.raises(DataError, match=rf"{test_file}: converted COFW data file is damaged or "
                                      "cut short"):
    prepare.prepare_data(data, synth)
  test_file.unlink()
  with pytest.raises(DataError, match=rf"{test_file}: converted COFW data file is missing"):
    prepare.prepare_data(data, synth)
