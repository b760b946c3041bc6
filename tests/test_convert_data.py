"""Conversion to TFDS ArrayRecord crops: geometry, stored fields, error policy, CLI."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import convert as convert_command
from fgtbt_jax.data import convert
from fgtbt_jax.data import tfds_builders
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax import crop
from fgtbt_jax import images
from fgtbt_jax import landmarks as lm
from fgtbt_jax.errors import DataError

tfds.disable_progress_bar()

MARK = (255, 0, 255)


def _face_image(points, shape=(300, 400), radius=3):
  """A smooth grey background with magenta discs at the landmarks."""
  h, w = shape
  ys, xs = np.mgrid[0:h, 0:w]
  image = np.stack([(xs * 0.2 + 40), (ys * 0.2 + 40), np.full_like(xs, 60.0)], -1)
  image = image.astype(np.uint8)
  for x, y in points:
    cv2.circle(image, (int(round(x)), int(round(y))), radius, MARK, -1)
  return image


def _record(dataset, split, index, box, image_kind="bytes", shape=(300, 400), radius=3,
            **kwargs):
  protocol = lm.get_protocol(dataset)
  x1, y1, x2, y2 = box
  face = lm.mean_face()[protocol.unified_index]
  points = face * [x2 - x1, y2 - y1] + [x1, y1]
  image = _face_image(points, shape, radius)
  if image_kind == "bytes":
    source = images.encode_image(image, "png")
  elif image_kind == "array":
    source = image
  else:  # A path given as image_kind.
    cv2.imwrite(image_kind, image[..., ::-1])
    source = image_kind
  return FaceRecord(dataset, split, source, points, box, f"fixture.txt:{index + 1}",
                    f"img_{index}.png", **kwargs)


def _read_back(out, dataset, split, config_name=""):
  return tfds_builders.open_split(out, dataset, split, config_name, decode_image=True)


def test_stored_crop_geometry_and_fields(tmp_path):
  box = (120.0, 80.0, 220.0, 200.0)  # 100 x 120: scale 0.6, loose side 240 px.
  records = {
      "train": [_record("COFW", "train", 0, box, "array",
                        point_flags={"occluded": np.arange(29) % 3 == 0})],
      "test": [_record("COFW", "test", 0, box, str(tmp_path / "face.png"))],
  }
  summary = convert.convert_records("COFW", records, tmp_path / "out")
  assert not summary.reused
  assert {s: (v.read, v.written, v.skipped) for s, v in summary.splits.items()} == {
      "train": (1, 1, 0), "test": (1, 1, 0)}
  assert summary.path.name == "1.0.0" and summary.path.parent.name == "jpeg95_512"
  ex = _read_back(tmp_path / "out", "COFW", "train")[0]
  assert ex["image"].shape == (240, 240, 3) and ex["image"].dtype == np.uint8
  record = records["train"][0]
  np.testing.assert_allclose(ex["original_to_crop"],
                             crop.crop_affine(record.center, record.scale, 240,
                                              extra_scale=2.0), atol=1e-9)
  np.testing.assert_allclose(ex["landmarks"],
                             crop.apply_affine(record.landmarks, ex["original_to_crop"]),
                             atol=1e-4)
  # Unscaled crop: the face centre sits at the crop centre, offsets kept.
  np.testing.assert_allclose(ex["center"], [119.5, 119.5], atol=1e-4)
  np.testing.assert_allclose(ex["box"], [69.5, 59.5, 169.5, 179.5], atol=1e-4)
  assert ex["scale"] == pytest.approx(0.6)
  assert ex["box_size"] == pytest.approx(np.sqrt(100 * 120), rel=1e-5)
  np.testing.assert_array_equal(ex["original_size"], [300, 400])
  np.testing.assert_array_equal(ex["point_flags"]["occluded"], np.arange(29) % 3 == 0)
  assert ex["image_name"] == b"img_0.png" and ex["source"] == b"fixture.txt:1"
  # The pixels moved with the landmarks: every landmark sits on its mark.
  for x, y in np.round(ex["landmarks"]).astype(int):
    np.testing.assert_allclose(ex["image"][y, x], MARK, atol=40)
  test = _read_back(tmp_path / "out", "COFW", "test")[0]
  assert test["point_flags"]["occluded"].shape == (0,)  # Not given: empty.


def test_large_faces_are_capped_at_max_side(tmp_path):
  box = (100.0, 100.0, 700.0, 700.0)  # Loose side 1200 px -> max_side 256.
  record = _record("AFLW", "test", 0, box, shape=(800, 800), radius=12,
                   box_size=555.0, subsets=("frontal",),
                   point_flags={"visible": np.ones(19, np.uint8)})
  summary = convert.convert_records("AFLW", {"test": [record]}, tmp_path,
                                    max_side=256, image_format="png")
  assert summary.path.parent.name == "png_256"
  ex = _read_back(tmp_path, "AFLW", "test", "png_256")[0]
  assert ex["image"].shape == (256, 256, 3)
  factor = 256 / 1200
  assert ex["scale"] == pytest.approx(3.0 * factor)
  assert ex["box_size"] == pytest.approx(555.0 * factor)  # The format's normaliser.
  assert ex["subsets"] == {"frontal": True}
  assert ex["point_flags"]["visible"].all()
  for x, y in np.round(ex["landmarks"]).astype(int):
    np.testing.assert_allclose(ex["image"][y, x], MARK, atol=40)
  meta = json.loads((summary.path / "metadata.json").read_text())
  assert meta["protocol"] == "AFLW" and meta["max_side"] == 256


def test_area_averaging_of_a_fine_pattern(tmp_path):
  """Shrinking a 1-pixel checkerboard 4.7x gives flat grey (bilinear aliases)."""
  checker = (np.indices((800, 800)).sum(0) % 2 * 255).astype(np.uint8)
  image = np.repeat(checker[..., None], 3, 2)
  points = lm.mean_face()[lm.get_protocol("COFW").unified_index] * 600 + 100
  record = FaceRecord("COFW", "test", images.encode_image(image, "png"), points,
                      [100, 100, 700, 700], "checker[0]")
  convert.convert_records("COFW", {"test": [record]}, tmp_path, max_side=128,
                          image_format="png")
  stored = _read_back(tmp_path, "COFW", "test", "png_128")[0]["image"]
  inside = stored[40:88, 40:88].astype(float)  # Well inside the original image.
  assert abs(inside.mean() - 127.5) < 3 and inside.std() < 6


def test_subsets_are_stored_per_name(tmp_path):
  box = (100.0, 60.0, 260.0, 220.0)
  records = [_record("WFLW", "test", i, box, subsets=subsets) for i, subsets in
             enumerate([("pose", "blur"), (), ("makeup",)])]
  convert.convert_records("WFLW", {"test": records}, tmp_path)
  source = _read_back(tmp_path, "WFLW", "test")
  assert len(source) == 3
  got = [source[i]["subsets"] for i in range(3)]  # Annotation order is kept.
  assert got[0] == {"pose": True, "expression": False, "illumination": False,
                    "makeup": False, "occlusion": False, "blur": True}
  assert not any(got[1].values()) and got[2]["makeup"] and sum(got[2].values()) == 1


def test_skip_policy_counts_bad_images_and_raise_names_them(tmp_path):
  box = (120.0, 80.0, 220.0, 200.0)
  good = [_record("300W", "train", i, box) for i in range(3)]
  missing = _record("300W", "train", 3, box)
  missing.image = str(tmp_path / "no_such.png")
  missing.source = "lfpw/trainset/x.pts"
  truncated = _record("300W", "train", 4, box)
  truncated.image = images.encode_image(_face_image([]), "jpeg")[:500]
  wrong_count = _record("300W", "train", 5, box)
  wrong_count.landmarks = wrong_count.landmarks[:60]
  records = {"train": good + [missing, truncated, wrong_count]}
  summary = convert.convert_records("300W", records, tmp_path / "skip", on_error="skip")
  split = summary.splits["train"]
  assert (split.read, split.written, split.skipped) == (6, 3, 3)
  assert split.skipped_images == {"missing_image": 1, "corrupt_image": 1, "field_count": 1}
  assert any("lfpw/trainset/x.pts" in line for line in split.skipped_examples)
  assert "skipped while cropping: 1 x missing_image" in summary.text()
  assert len(_read_back(tmp_path / "skip", "300W", "train")) == 3
  with pytest.raises(DataError, match="lfpw/trainset/x.pts: image file not found"):
    convert.convert_records("300W", records, tmp_path / "raise")


def test_bad_annotations_raise_with_the_source(tmp_path):
  box = (120.0, 80.0, 220.0, 200.0)
  bad_subset = _record("WFLW", "test", 0, box, subsets=("sunglasses",))
  with pytest.raises(DataError, match=r"fixture.txt:1: unknown WFLW subsets \['sunglasses'\]"):
    convert.convert_records("WFLW", {"test": [bad_subset]}, tmp_path / "a")
  bad_flag = _record("COFW", "test", 0, box, point_flags={"occluded": np.zeros(28)})
  with pytest.raises(DataError, match="fixture.txt:1: point flag 'occluded' has 28 values"):
    convert.convert_records("COFW", {"test": [bad_flag]}, tmp_path / "b")
  other = _record("COFW", "test", 0, box)
  with pytest.raises(ValueError, match="a COFW record among AFLW test records"):
    convert.convert_records("AFLW", {"test": [other]}, tmp_path / "c")
  all_bad = _record("COFW", "test", 0, box)
  all_bad.image = b"not an image"
  with pytest.raises(DataError, match="all 1 samples failed to convert"):
    convert.convert_records("COFW", {"test": [all_bad]}, tmp_path / "d", on_error="skip")


def test_existing_conversion_is_reused_unless_overwritten(tmp_path):
  box = (120.0, 80.0, 220.0, 200.0)
  first = {"test": [_record("COFW", "test", i, box) for i in range(2)]}
  convert.convert_records("COFW", first, tmp_path)
  second = {"test": [_record("COFW", "test", i, box) for i in range(3)]}
  reused = convert.convert_records("COFW", second, tmp_path)
  assert reused.reused and reused.splits["test"].written == 2
  assert reused.splits["test"].read == 2  # From the stored metadata.
  rebuilt = convert.convert_records("COFW", second, tmp_path, overwrite=True)
  assert not rebuilt.reused and len(_read_back(tmp_path, "COFW", "test")) == 3


def test_converted_dir_errors(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match="no converted WFLW data.*python -m data_pipelines.convert"):
    tfds_builders.converted_dir(tmp_path, "wflw")
  box = (120.0, 80.0, 220.0, 200.0)
  for side in (128, 256):
    convert.convert_records("COFW", {"test": [_record("COFW", "test", 0, box)]}, tmp_path,
                            max_side=side)
  with pytest.raises(ValueError,
                     match=r"several crop configs converted \['jpeg95_128', 'jpeg95_256'\]"):
    tfds_builders.converted_dir(tmp_path, "COFW")
  assert tfds_builders.converted_dir(tmp_path, "COFW", "jpeg95_128").parent.name == "jpeg95_128"
  with pytest.raises(FileNotFoundError, match="crop config 'png_9'"):
    tfds_builders.converted_dir(tmp_path, "COFW", "png_9")
  with pytest.raises(FileNotFoundError, match="no 'train' split converted.*--splits test,train"):
    tfds_builders.open_split(tmp_path, "COFW", "train", "jpeg95_128")
  with pytest.raises(ValueError, match="unknown image format 'gif'"):
    tfds_builders.crop_config(image_format="gif")


def _write_wflw_line(path, good=True):
  """One raw WFLW annotation line (207 fields) for the readers."""
  face = lm.mean_face()[lm.get_protocol("WFLW").unified_index] * 100 + 50
  fields = [f"{v:.2f}" for v in face.reshape(-1)] + ["50", "50", "150", "150"]
  fields += ["1", "0", "0", "0", "0", "1", "faces/a.jpg"]
  if not good:
    fields = fields[:-3] + fields[-1:]
  path.write_text(" ".join(fields) + "\n")


def _wflw_source(root, image=None):
  """A raw WFLW test split of one face under `root`/WFLW (image default: a smooth face)."""
  src = root / "WFLW"
  (src / "WFLW_images" / "faces").mkdir(parents=True)
  cv2.imwrite(str(src / "WFLW_images" / "faces" / "a.jpg"),
              _face_image([], (220, 220)) if image is None else image)
  _write_wflw_line(src / "list_98pt_rect_attr_test.txt")
  return src


def test_convert_dataset_reads_with_the_readers(tmp_path):
  src = _wflw_source(tmp_path)
  summary = convert.convert_dataset("wflw", src, tmp_path / "out", splits=("test",))
  assert summary.splits["test"].written == 1
  assert not tfds_builders.is_synthetic(tmp_path / "out", "WFLW")
  ex = _read_back(tmp_path / "out", "WFLW", "test")[0]
  assert ex["subsets"]["pose"] and ex["subsets"]["blur"] and not ex["subsets"]["makeup"]
  # One face where 2,500 are published: the reader's warning reaches the summary.
  assert any("2500" in w for w in summary.splits["test"].warnings)


def test_cli_exit_codes(tmp_path, capsys):
  assert convert_command.main(["--dataset", "wflw", "--src", str(tmp_path / "nope"),
                       "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "nope: WFLW source not found" in err
  assert convert_command.main(["--dataset", "helen", "--src", str(tmp_path),
                       "--out", str(tmp_path / "out")]) == 1
  assert "unknown protocol 'helen'" in capsys.readouterr().err
  src = tmp_path / "WFLW"
  (src / "WFLW_images").mkdir(parents=True)
  _write_wflw_line(src / "list_98pt_rect_attr_test.txt", good=False)
  assert convert_command.main(["--dataset", "wflw", "--src", str(src), "--out",
                       str(tmp_path / "out"), "--splits", "test"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "list_98pt_rect_attr_test.txt:1" in err


def test_cli_runs_as_a_module(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.convert", "--dataset", "cofw",
       "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
      check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("convert: error: ")


def test_convert_synthetic_end_to_end(tmp_path):
  sizes = {"WFLW": (4, 3), "300W": (4, 3), "COFW": (3, 2), "AFLW": (4, 3)}
  summaries = convert.convert_synthetic(tmp_path, sizes, seed=1, image_size=160,
                                        render_workers=0)
  assert list(summaries) == list(lm.PROTOCOL_NAMES)
  for name, summary in summaries.items():
    assert not summary.reused
    assert [summary.splits[s].written for s in ("train", "test")] == list(sizes[name])
    assert summary.splits["test"].skipped == 0
    ex = _read_back(tmp_path, name, "test")[0]
    n = lm.get_protocol(name).num_landmarks
    assert ex["landmarks"].shape == (n, 2)
    # The synthetic faces fill the middle of the loose crop.
    side = ex["image"].shape[0]
    assert (ex["landmarks"] > 0.1 * side).all() and (ex["landmarks"] < 0.9 * side).all()
  assert _read_back(tmp_path, "COFW", "train")[0]["point_flags"]["occluded"].shape == (29,)
  # Marked as generated data, so reports leave the paper's numbers out.
  assert all(tfds_builders.is_synthetic(tmp_path, name) for name in lm.PROTOCOL_NAMES)
  again = convert.convert_synthetic(tmp_path, sizes, seed=1, image_size=160, render_workers=0)
  assert all(s.reused for s in again.values())


# ------------------------------------------------------------------ hostile inputs


def test_degenerate_faces_are_counted_with_a_reason(tmp_path):
  box = (120.0, 80.0, 220.0, 200.0)
  good = _record("300W", "train", 0, box)
  off_image = _record("300W", "train", 1, box)  # Points and box right of the image.
  off_image.landmarks = off_image.landmarks + [350.0, 0.0]
  off_image.box = np.asarray(box) + [350.0, 0.0, 350.0, 0.0]
  off_image.center, off_image.scale = crop.center_scale_from_box(off_image.box)
  far_point = _record("300W", "train", 2, box)  # One point 5 image widths away.
  far_point.landmarks = far_point.landmarks.copy()
  far_point.landmarks[30] = [2000.0, 150.0]
  huge = _record("300W", "train", 3, box, center=(170.0, 140.0), scale=40.0)
  box_off = _record("300W", "train", 4, box)  # Points on the image, the box not.
  box_off.box = np.asarray([300.0, 150.0, 700.0, 550.0])
  records = {"train": [good, off_image, far_point, huge, box_off]}
  summary = convert.convert_records("300W", records, tmp_path / "skip", on_error="skip")
  split = summary.splits["train"]
  assert (split.written, split.skipped) == (1, 4)
  assert split.skipped_images == {"points_outside": 1, "point_far_outside": 1,
                                  "scale_too_large": 1, "box_outside": 1}
  text = summary.text()
  assert "fixture.txt:3: point 30 at [2000.0, 150.0] lies farther outside the 400x300 image" in text
  assert "fixture.txt:4: scale 40 makes a 8000 px crop" in text
  with pytest.raises(DataError, match=r"fixture.txt:2: only 0 of 68 points lie on the 400x300 image"):
    convert.convert_records("300W", {"train": [good, off_image]}, tmp_path / "raise")
  # An HRNet crop the image hardly covers (the centre far off the face).
  padded = _record("300W", "train", 5, box, center=(-250.0, -200.0), scale=2.0)
  padded.box = np.asarray([0.0, 0.0, 200.0, 200.0])
  with pytest.raises(DataError, match=r"the image covers only \d+% of the face crop") as e:
    convert.convert_records("300W", {"train": [padded]}, tmp_path / "padded")
  assert e.value.kind == "crop_mostly_padding"


def test_a_jpeg_corrupt_inside_is_a_bad_sample(tmp_path):
  box = (120.0, 80.0, 220.0, 200.0)
  good = _record("COFW", "test", 0, box)
  jpeg = bytearray(images.encode_image(_face_image([]), "jpeg"))
  middle = len(jpeg) // 2  # Random bytes inside the scan; the end marker stays.
  jpeg[middle:middle + 64] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()
  assert jpeg.endswith(b"\xff\xd9")
  assert cv2.imdecode(np.frombuffer(bytes(jpeg), np.uint8), cv2.IMREAD_COLOR) is not None
  bad = _record("COFW", "test", 1, box)
  bad.image = bytes(jpeg)
  summary = convert.convert_records("COFW", {"test": [good, bad]}, tmp_path / "skip",
                                    on_error="skip")
  assert summary.splits["test"].skipped_images == {"corrupt_image": 1}
  assert "fixture.txt:2: corrupt JPEG data inside the image" in summary.text()
  assert images.load_image(bytes(jpeg)).shape == (300, 400, 3)  # Not strict: decodes.


def test_a_partial_conversion_is_completed_not_reused(tmp_path):
  box = (120.0, 80.0, 220.0, 200.0)
  train = [_record("COFW", "train", i, box) for i in range(2)]
  test = [_record("COFW", "test", i, box) for i in range(3)]
  convert.convert_records("COFW", {"train": train}, tmp_path)
  assert tfds_builders.converted_splits(tmp_path, "COFW") == ["train"]
  summary = convert.convert_records("COFW", {"train": train, "test": test}, tmp_path)
  assert not summary.reused and set(summary.splits) == {"train", "test"}
  assert sorted(tfds_builders.converted_splits(tmp_path, "COFW")) == ["test", "train"]
  assert len(_read_back(tmp_path, "COFW", "test")) == 3
  again = convert.convert_records("COFW", {"test": test}, tmp_path)
  assert again.reused and set(again.splits) == {"train", "test"}


def test_leftovers_of_a_killed_conversion_are_removed_and_a_running_one_is_not_joined(tmp_path):
  import fcntl  # pylint: disable=import-outside-toplevel
  box = (120.0, 80.0, 220.0, 200.0)
  records = {"test": [_record("COFW", "test", 0, box)]}
  config_dir = tmp_path / "fgtbt_cofw" / "jpeg95_512"
  leftover = config_dir / "incomplete.ABC123_1.0.0"
  leftover.mkdir(parents=True)
  (leftover / "fgtbt_cofw-test.array_record-00000-of-00001").write_bytes(b"half")
  convert.convert_records("COFW", records, tmp_path)
  assert not leftover.exists() and (config_dir / "1.0.0" / "dataset_info.json").is_file()
  with open(tmp_path / "fgtbt_cofw" / ".jpeg95_512.lock", "a") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    with pytest.raises(DataError, match="another conversion of this dataset is writing here"):
      convert.convert_records("COFW", records, tmp_path, overwrite=True)
  assert len(_read_back(tmp_path, "COFW", "test")) == 1  # The finished one is intact.


def test_src_as_an_annotation_file_and_bad_out_folders(tmp_path, capsys, monkeypatch):
  src = tmp_path / "WFLW"
  (src / "WFLW_images" / "faces").mkdir(parents=True)
  cv2.imwrite(str(src / "WFLW_images" / "faces" / "a.jpg"), _face_image([], (220, 220)))
  annotation = src / "list_98pt_rect_attr_test.txt"
  _write_wflw_line(annotation)
  assert convert_command.main(["--dataset", "wflw", "--src", str(annotation), "--out",
                       str(tmp_path / "out"), "--splits", "test"]) == 0
  assert len(_read_back(tmp_path / "out", "WFLW", "test")) == 1
  capsys.readouterr()
  (tmp_path / "a_file").write_text("keep me")
  assert convert_command.main(["--dataset", "wflw", "--src", str(src), "--out",
                       str(tmp_path / "a_file"), "--splits", "test"]) == 1
  err = capsys.readouterr().err.strip()
  assert err == f"convert: error: {tmp_path / 'a_file'}: is a file, not a folder; choose another --out"
  assert (tmp_path / "a_file").read_text() == "keep me"
  # A read-only --out (root ignores permissions, so the refusal is simulated).
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "fgtbt_wflw"))
  monkeypatch.setattr(tfds_builders.pathlib.Path, "mkdir", refuse)
  assert convert_command.main(["--dataset", "wflw", "--src", str(src), "--out",
                       str(tmp_path / "ro"), "--splits", "test"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "Permission denied" in err and "ro/fgtbt_wflw" in err


def test_the_readers_convention_is_recorded_and_never_mixed(tmp_path, capsys):
  src = _wflw_source(tmp_path)
  out = tmp_path / "out"
  convert.convert_dataset("wflw", src, out, splits=("test",), convention="authors")
  assert tfds_builders.conversion_convention(out, "WFLW") == "authors"
  assert convert_command.main(["--dataset", "wflw", "--src", str(src), "--out", str(out),
                       "--splits", "test"]) == 1
  assert "converted with convention 'authors', not 'project'; convert into another --out" in (
      capsys.readouterr().err)
  assert convert_command.main(["--dataset", "wflw", "--src", str(src), "--out", str(out),
                       "--splits", "test", "--overwrite"]) == 0
  assert tfds_builders.conversion_convention(out, "WFLW") == "project"


def test_the_authors_convention_stores_their_test_crops(tmp_path):
  """`--convention authors` test splits hold the authors' own test crop (their
  integer window, PIL bicubic, PNG), annotated in their nominal crop frame: the
  eval pipeline feeds those pixels unchanged, with the exact crop map's geometry."""
  from fgtbt_jax.data import config as data_config_lib
  from fgtbt_jax.data import pipeline
  from fgtbt_jax.data import synthetic
  size = 96
  image, points124, _ = synthetic.render_face(5, 2, 200)
  points = points124[lm.get_protocol("WFLW").unified_index]
  box = np.concatenate([points.min(0), points.max(0)])
  records = {split: [FaceRecord("WFLW", split, image, points, box, f"faces.csv:{split}",
                                "face.png")] for split in ("train", "test")}
  out = tmp_path / "out"
  tfds_builders.build("WFLW", out, out, read_split=lambda _, split: (records[split], None),
                      splits=("train", "test"), convention="authors", authors_crop_size=size)
  assert tfds_builders.authors_crop_size(out, "WFLW", "test") == size
  assert tfds_builders.authors_crop_size(out, "WFLW", "train") == 0
  record = records["test"][0]
  theirs, _ = crop.authors_crop(image, record.center, record.scale * crop.CROP_ENLARGE, size)
  stored = _read_back(out, "WFLW", "test")[0]
  np.testing.assert_array_equal(stored["image"], theirs)
  assert _read_back(out, "WFLW", "train")[0]["image"].shape[0] != size  # a loose crop
  nominal = crop.face_crop_affine(record.center, record.scale, size)
  np.testing.assert_allclose(stored["original_to_crop"], nominal, atol=1e-9)
  # The evaluation's network crop is the stored crop itself.
  config = data_config_lib.data_config()
  config.data_dir, config.image_size, config.eval_batch_size = str(out), size, 1
  config.datasets = ("WFLW",)
  [batch] = list(pipeline.make_eval_iterator(config, "WFLW"))
  np.testing.assert_array_equal(batch["image"][0], theirs)
  np.testing.assert_allclose(batch["inverse_affine"][0], np.eye(2, 3), atol=1e-4)
  np.testing.assert_allclose(batch["landmarks"][0], crop.apply_affine(points, nominal),
                             atol=1e-3)
  # The project's exact crop of the same face differs by a few grey levels.
  exact = crop.warp_to_crop(image, nominal, size)
  assert np.abs(exact.astype(float) - theirs).mean() > 1.0
  config.image_size = 64
  with pytest.raises(ValueError, match=r"holds the authors' test crops at 96 px, not "
                                       r"data.image_size=64; convert it again with "
                                       r"--authors-crop-size 64"):
    pipeline.make_eval_iterator(config, "WFLW")


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys):
  """Converting onto a full disk (a 48 kB tmpfs; ArrayRecord's writer fails in C++
  with a RuntimeError): one line, and the half-written copy is removed at once."""
  import subprocess
  noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
  src = _wflw_source(tmp_path, noise)  # crops that take room
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)],
                    capture_output=True).returncode != 0:
    pytest.skip("a small full disk (tmpfs) needs root with mount rights")
  try:
    assert convert_command.main(["--dataset", "wflw", "--src", str(src), "--out", str(disk / "out"),
                         "--splits", "test", "--max-side", "300"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("convert: error: [Errno 28] the disk is full") and "jpeg95_300" in err
    assert not list(disk.rglob("incomplete.*"))
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def test_another_source_into_an_existing_conversion_is_refused(tmp_path, capsys):
  import shutil
  src = _wflw_source(tmp_path)
  other = tmp_path / "WFLW_copy"
  shutil.copytree(src, other)
  out = tmp_path / "out"
  args = ["--dataset", "wflw", "--out", str(out), "--splits", "test"]
  assert convert_command.main(args + ["--src", str(src)]) == 0
  assert tfds_builders.conversion_source(out, "WFLW") == str(src.resolve())
  assert convert_command.main(args + ["--src", str(src)]) == 0  # the same source: reused
  assert "reused" in capsys.readouterr().out
  assert convert_command.main(args + ["--src", str(other)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and f"converted from {src.resolve()}, not {other.resolve()}" in err
  assert convert_command.main(args + ["--src", str(other), "--overwrite"]) == 0
  assert tfds_builders.conversion_source(out, "WFLW") == str(other.resolve())
