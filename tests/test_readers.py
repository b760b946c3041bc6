"""Tests for fgtbt_jax.data.readers on fixture files written here in each format."""

import csv
import os

import h5py
import numpy as np
import pytest

from fgtbt_jax.data import readers
from fgtbt_jax import landmarks
from fgtbt_jax.errors import DataError, UnknownProtocolError
from fgtbt_jax.images import encode_image, load_image

WFLW_FLAGS = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")


# ------------------------------------------------------------------ fixtures


def _points(dataset, index, origin=(30.0, 20.0), size=90.0):
  """A face-like (N, 2) point set of `dataset`, different for every index."""
  face = landmarks.from_unified(landmarks.mean_face(), dataset)
  shift = np.asarray(origin) + 3.0 * index
  return (face * size + shift + 0.25 * np.sin(np.arange(face.size)).reshape(face.shape)
          ).astype(np.float32)


def _write_image(path, h=160, w=180, value=90):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.full((h, w, 3), value, np.uint8)
  with open(path, "wb") as f:
    f.write(encode_image(image, "png" if path.endswith(".png") else "jpeg"))


def _fmt(values):
  return " ".join(f"{v:.4f}" for v in np.asarray(values).reshape(-1))


def _wflw_line(index, flags, name):
  pts = _points("WFLW", index)
  box = np.concatenate([pts.min(0) - 2, pts.max(0) + 2])
  return f"{_fmt(pts)} {_fmt(box)} {' '.join(map(str, flags))} {name}", pts, box


def _make_wflw_raw(root, n=4):
  """WFLW_annotations/list_98pt_rect_attr_train_test/*.txt + WFLW_images/."""
  ann = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
  ann.mkdir(parents=True)
  truth = {}
  for split in ("train", "test"):
    lines = []
    truth[split] = []
    for i in range(n):
      flags = [(i >> b) & 1 for b in range(6)] if split == "test" else [0] * 6
      name = f"{i % 2}--Event/{split}_{i}.jpg"
      _write_image(str(root / "WFLW_images" / name))
      line, pts, box = _wflw_line(i, flags, name)
      lines.append(line)
      truth[split].append((pts, box, flags, name))
    (ann / f"list_98pt_rect_attr_{split}.txt").write_text("\n".join(lines) + "\n")
  return ann, truth


def _write_pts(path, points_1based):
  body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points_1based)
  path.write_text(f"version: 1\nn_points:  {len(points_1based)}\n{{\n{body}\n}}\n")


_300W_FOLDERS = {"afw": 2, "helen/trainset": 2, "lfpw/trainset": 1,
                 "helen/testset": 2, "lfpw/testset": 1, "ibug": 2}


def _make_300w_tree(root):
  """The 300W folders with images beside .pts files (1-based coordinates)."""
  truth = {}
  k = 0
  for folder, count in _300W_FOLDERS.items():
    d = root / "300W" / folder
    d.mkdir(parents=True)
    for i in range(count):
      pts = _points("300W", k)
      ext = ".png" if k % 2 else ".jpg"
      _write_image(str(d / f"img_{k}{ext}"))
      _write_pts(d / f"img_{k}.pts", pts + 1.0)
      truth[str(d / f"img_{k}{ext}")] = (pts, folder)
      k += 1
  return root / "300W", truth


def _hrnet_rows(dataset, names, with_box_size=False):
  rows = []
  for i, name in enumerate(names):
    pts = _points(dataset, i)
    lo, hi = pts.min(0), pts.max(0)
    center = (lo + hi) / 2
    scale = float(max(hi - lo)) / 200.0
    extra = [float(np.sqrt(np.prod(hi - lo)))] if with_box_size else []
    rows.append([name, scale, *extra, center[0], center[1], *pts.reshape(-1).tolist()])
  return rows


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def _hrnet_header(n, with_box_size=False):
  coords = [f"{a}{i}" for i in range(n) for a in "xy"]
  return ["image_name", "scale", *(["box_size"] if with_box_size else []),
          "center_w", "center_h", *coords]


def _star_line(dataset, i, name, attributes=None):
  pts = _points(dataset, i)
  five = pts[:5]
  center = (pts.min(0) + pts.max(0)) / 2
  scale = float(max(pts.max(0) - pts.min(0))) / 200.0
  fields = [name, ",".join(f"{v:.3f}" for v in five.reshape(-1)),
            ",".join(f"{v:.4f}" for v in pts.reshape(-1)),
            f"{scale:.5f}", f"{center[0]:.3f}", f"{center[1]:.3f}"]
  if attributes is not None:
    fields.append(",".join(map(str, attributes)))
  return "\t".join(fields)


def _mat73(path, numeric, cells):
  """Writes a MATLAB v7.3 file: arrays transposed, cells as object references."""
  with h5py.File(path, "w") as f:
    refs = f.create_group("#refs#")
    for key, array in numeric.items():
      array = np.asarray(array)
      ds = f.create_dataset(key, data=array.T)
      ds.attrs["MATLAB_class"] = np.bytes_("uint8" if array.dtype == np.uint8 else "double")
    for key, items in cells.items():
      handles = np.empty((1, len(items)), h5py.ref_dtype)
      for i, item in enumerate(items):
        if isinstance(item, str):
          d = refs.create_dataset(f"{key}{i}", data=np.asarray([[ord(c)] for c in item], np.uint16))
          d.attrs["MATLAB_class"] = np.bytes_("char")
        else:
          d = refs.create_dataset(f"{key}{i}", data=np.asarray(item).T)
          d.attrs["MATLAB_class"] = np.bytes_("uint8")
        handles[0, i] = d.ref
      ds = f.create_dataset(key, data=handles)
      ds.attrs["MATLAB_class"] = np.bytes_("cell")


def _cofw_arrays(n):
  images, phis, boxes = [], [], []
  for i in range(n):
    h, w = 150 + 10 * i, 170
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.arange(w, dtype=np.uint8)[None, :]  # varies along x only
    image[..., 1] = i
    if i == 1:
      image = image[..., 0]  # a grey image
    pts = _points("COFW", i, origin=(20, 15), size=100)
    occluded = (np.arange(29) % (i + 2) == 0).astype(float)
    phis.append(np.concatenate([pts[:, 0], pts[:, 1], occluded]))
    lo, hi = pts.min(0), pts.max(0)
    boxes.append([lo[0] - 5, lo[1] - 5, hi[0] - lo[0] + 10, hi[1] - lo[1] + 10])
    images.append(image)
  return images, np.asarray(phis), np.asarray(boxes)


def _aflw_arrays(n, rng):
  data, boxes, mask, names = [], [], [], []
  for i in range(n):
    pts = _points("AFLW", i)
    lo, hi = pts.min(0) - 4, pts.max(0) + 4
    data.append(np.concatenate([pts[:, 0], pts[:, 1]]))
    boxes.append([lo[0], hi[0], lo[1], hi[1]])
    mask.append(np.ones(19) if i % 3 == 0 else (np.arange(19) != i % 19).astype(float))
    names.append(f"{i % 3}/image{i:05d}.jpg")
  ra = rng.permutation(n) + 1
  return np.asarray(data), np.asarray(boxes), np.asarray(mask), names, ra


# ------------------------------------------------------------------ WFLW


def test_wflw_raw_values_flags_and_images(tmp_path):
  ann, truth = _make_wflw_raw(tmp_path)
  records, report = readers.read_dataset("WFLW", str(tmp_path), "test")
  assert report.fmt == "wflw_txt" and report.num_read == 4 and report.num_skipped == 0
  assert any("published test split has 2500" in w for w in report.warnings)
  for record, (pts, box, flags, name) in zip(records, truth["test"]):
    assert record.dataset == "WFLW" and record.split == "test"
    np.testing.assert_allclose(record.landmarks, pts, atol=1e-3)
    np.testing.assert_allclose(record.box, box, atol=1e-3)
    assert record.subsets == tuple(a for a, f in zip(WFLW_FLAGS, flags) if f)
    assert record.image == str(tmp_path / "WFLW_images" / name)
    assert record.image_name == name
    np.testing.assert_allclose(record.center, (box[:2] + box[2:]) / 2, atol=1e-3)
    assert record.scale == pytest.approx(max(box[2:] - box[:2]) / 200, rel=1e-5)
  # Record 3 has flags 1,1,0,0,0,0: pose and expression.
  assert records[3].subsets == ("pose", "expression")
  # Reading the annotation file directly gives the same.
  again, _ = readers.read_wflw_txt(str(ann / "list_98pt_rect_attr_test.txt"), "test")
  np.testing.assert_array_equal(again[2].landmarks, records[2].landmarks)


def test_wflw_hrnet_csv_with_subset_files(tmp_path):
  names = [f"ev/img{i}.jpg" for i in range(5)]
  for name in names:
    _write_image(str(tmp_path / "images" / name))
  rows = _hrnet_rows("WFLW", names)
  header = _hrnet_header(98)
  _write_csv(tmp_path / "face_landmarks_wflw_test.csv", header, rows)
  _write_csv(tmp_path / "face_landmarks_wflw_test_largepose.csv", header, rows[1:3])
  _write_csv(tmp_path / "face_landmarks_wflw_test_blur.csv", header, rows[2:3])
  records, report = readers.read_dataset("WFLW", str(tmp_path), "test")
  assert report.fmt == "hrnet_csv" and len(records) == 5
  assert [r.subsets for r in records] == [(), ("pose",), ("pose", "blur"), (), ()]
  np.testing.assert_allclose(records[4].landmarks, _points("WFLW", 4), atol=1e-4)
  assert records[0].scale == pytest.approx(rows[0][1])
  np.testing.assert_allclose(records[0].center, rows[0][2:4], atol=1e-4)
  assert any("face_landmarks_wflw_test_expression.csv not found" in w for w in report.warnings)


def test_star_tsv_wflw_attributes(tmp_path):
  d = tmp_path / "WFLW"
  d.mkdir()
  lines = []
  for i in range(3):
    _write_image(str(d / f"im{i}.jpg"))
    lines.append(_star_line("WFLW", i, f"im{i}.jpg", attributes=[i % 2, 0, 0, 0, 1, i // 2]))
  (d / "test.tsv").write_text("\n".join(lines) + "\n")
  records, report = readers.read_dataset("WFLW", str(tmp_path), "test", fmt="star_tsv")
  assert len(records) == 3 and not report.notes
  assert [r.subsets for r in records] == [("occlusion",), ("pose", "occlusion"),
                                          ("occlusion", "blur")]
  np.testing.assert_allclose(records[1].landmarks, _points("WFLW", 1), atol=1e-3)


# ------------------------------------------------------------------ 300W


def test_300w_pts_tree_splits_subsets_and_one_based(tmp_path):
  root, truth = _make_300w_tree(tmp_path)
  train, report = readers.read_dataset("300W", str(tmp_path), "train")
  assert report.fmt == "300w_pts" and len(train) == 5
  test, report = readers.read_dataset("300W", str(tmp_path), "test")
  assert len(test) == 5
  by_image = {r.image: r for r in train + test}
  assert set(by_image) == set(truth)
  for image, (pts, folder) in truth.items():
    record = by_image[image]
    # The .pts file holds pts + 1: the reader must give back 0-based pts.
    np.testing.assert_allclose(record.landmarks, pts, atol=1e-3)
    np.testing.assert_allclose(record.box, np.concatenate([pts.min(0), pts.max(0)]), atol=1e-3)
    expected = {"ibug": ("challenging",), "helen/testset": ("common",),
                "lfpw/testset": ("common",)}.get(folder, ())
    assert record.subsets == expected
    assert record.split == ("test" if folder in ("ibug", "helen/testset", "lfpw/testset") else "train")
  assert sum(r.subsets == ("common",) for r in test) == 3
  assert any("common' has 3 samples" in w for w in report.warnings)


def test_300w_hrnet_csv_subsets(tmp_path):
  names = [f"ibug/im{i}.jpg" if i > 2 else f"helen/testset/im{i}.jpg" for i in range(5)]
  for name in names:
    _write_image(str(tmp_path / "images" / name))
  rows = _hrnet_rows("300W", names)
  header = _hrnet_header(68)
  _write_csv(tmp_path / "face_landmarks_300w_valid.csv", header, rows)
  _write_csv(tmp_path / "face_landmarks_300w_valid_common.csv", header, rows[:3])
  _write_csv(tmp_path / "face_landmarks_300w_valid_challenge.csv", header, rows[3:])
  records, report = readers.read_dataset("300W", str(tmp_path), "test")
  assert report.fmt == "hrnet_csv"
  assert [r.subsets for r in records] == [("common",)] * 3 + [("challenging",)] * 2
  np.testing.assert_allclose(records[3].landmarks, _points("300W", 3), atol=1e-4)


@pytest.mark.parametrize("header", [True, False])
def test_star_tsv_with_and_without_header(tmp_path, header):
  d = tmp_path / "300W"
  d.mkdir()
  lines = [_star_line("300W", i, f"img/{i}.jpg") for i in range(4)]
  for i in range(4):
    _write_image(str(d / "img" / f"{i}.jpg"))
  if header:
    lines.insert(0, "image_path\tlandmarks_5pts\tlandmarks_target\tscale\tcenter_w\tcenter_h")
  (d / "train.tsv").write_text("\n".join(lines) + "\n")
  records, report = readers.read_dataset("300W", str(tmp_path), "train", fmt="star_tsv")
  assert len(records) == 4  # no sample lost either way
  assert [r.image_name for r in records] == [f"img/{i}.jpg" for i in range(4)]
  assert any("is a header row" in note for note in report.notes) == header
  # Without one, the note says the authors' loader would drop the first face.
  assert any("the FGTBT authors' loader takes the first row as a header, so it reads 3 of "
             "these 4 faces" in note for note in report.notes) == (not header)
  np.testing.assert_allclose(records[0].landmarks, _points("300W", 0), atol=1e-3)
  # STAR gives centre and scale; the box is the square of side scale * 200,
  # with the STAR scale (1.0x crop) turned into the HRNet one (1.25x crop).
  r = records[2]
  np.testing.assert_allclose(r.box[2:] - r.box[:2], [r.scale * 200] * 2, rtol=1e-5)
  star_scale = float(lines[3 if header else 2].split("\t")[3])
  assert r.scale == pytest.approx(star_scale / 1.25, rel=1e-6)


def test_star_tsv_first_row_with_a_bad_value_is_not_a_header(tmp_path):
  lines = [_star_line("300W", i, f"{i}.jpg") for i in range(2)]
  fields = lines[0].split("\t")
  fields[3] = "abc"  # only the scale is broken: a bad sample, not a header
  lines[0] = "\t".join(fields)
  for i in range(2):
    _write_image(str(tmp_path / f"{i}.jpg"))
  (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"train.tsv:1: scale/center: value 0 is not a number"):
    readers.read_star_tsv("300W", str(tmp_path), "train")
  records, report = readers.read_star_tsv("300W", str(tmp_path), "train", on_error="skip")
  assert len(records) == 1 and report.skipped_by_kind() == {"bad_value": 1}


def test_star_tsv_short_first_row_is_a_broken_sample_not_a_header(tmp_path):
  lines = ["img/0.jpg\t1,2"] + [_star_line("300W", 1, "img/1.jpg")]
  _write_image(str(tmp_path / "img" / "1.jpg"))
  (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"train.tsv:1: expected 6 or 7 tab-separated columns"):
    readers.read_star_tsv("300W", str(tmp_path), "train")
  records, report = readers.read_star_tsv("300W", str(tmp_path), "train", on_error="skip")
  assert len(records) == 1 and report.skipped_by_kind() == {"field_count": 1}
  assert not any("is a header row" in note for note in report.notes)


def test_hrnet_csv_without_header_and_bad_first_row(tmp_path):
  names = ["0.jpg", "1.jpg"]
  for name in names:
    _write_image(str(tmp_path / "images" / name))
  rows = _hrnet_rows("300W", names)
  path = tmp_path / "face_landmarks_300w_train.csv"
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)  # no header row: both rows are samples
  records, _ = readers.read_hrnet_csv("300W", str(tmp_path), "train")
  assert [r.image_name for r in records] == names
  rows[0][1] = "n/a"  # a first row with one bad value is still a sample
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)
  with pytest.raises(DataError, match=r"face_landmarks_300w_train.csv:1: numeric columns: value 0 is not a number"):
    readers.read_hrnet_csv("300W", str(tmp_path), "train")


# ------------------------------------------------------------------ COFW


def test_cofw_v73_mat_orientation_grey_and_flags(tmp_path):
  images, phis, boxes = _cofw_arrays(3)
  _mat73(tmp_path / "COFW_test_color.mat", {"phisT": phis, "bboxesT": boxes},
         {"IsT": images})
  records, report = readers.read_dataset("COFW", str(tmp_path), "test")
  assert report.fmt == "cofw_mat" and len(records) == 3
  for i, record in enumerate(records):
    image = load_image(record.image)
    assert image.shape == (150 + 10 * i, 170, 3)
    # Column x holds value x in channel 0: the HDF5 transpose was undone.
    np.testing.assert_array_equal(image[5, :, 0], np.arange(170))
    np.testing.assert_allclose(record.landmarks[:, 0], phis[i, :29], atol=1e-4)
    np.testing.assert_allclose(record.landmarks[:, 1], phis[i, 29:58], atol=1e-4)
    np.testing.assert_array_equal(record.point_flags["occluded"], phis[i, 58:])
    x, y, w, h = boxes[i]
    np.testing.assert_allclose(record.box, [x, y, x + w, y + h], atol=1e-4)
    lo, hi = record.landmarks.min(0), record.landmarks.max(0)
    np.testing.assert_allclose(record.center, (lo + hi) / 2, atol=1e-4)
  grey = load_image(records[1].image)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_cofw_image_stored_the_other_way_round_is_transposed(tmp_path):
  images, phis, boxes = _cofw_arrays(2)
  wide = np.zeros((150, 260, 3), np.uint8)
  wide[..., 0] = np.arange(260)[None, :] % 256
  phis[0, :29] += 100  # x up to ~225: fits 260 wide, not the 150 of the swapped copy
  boxes[0, 0] += 100
  images[0] = np.swapaxes(wide, 0, 1)
  _mat73(tmp_path / "COFW_train_color.mat", {"phisTr": phis, "bboxesTr": boxes},
         {"IsTr": images})
  records, report = readers.read_cofw_mat(str(tmp_path), "train")
  np.testing.assert_array_equal(load_image(records[0].image), wide)
  assert load_image(records[1].image).shape == (160, 170, 3)  # as stored
  assert any("1 images were stored transposed" in n for n in report.notes)
  phis[1, 29:58] += 200  # fits neither orientation
  boxes[1, 1] += 200
  _mat73(tmp_path / "COFW_train_color.mat", {"phisTr": phis, "bboxesTr": boxes},
         {"IsTr": images})
  with pytest.raises(DataError, match=r"phisTr\[1\]: landmarks .* do not fit the 160 x 170 image"):
    readers.read_cofw_mat(str(tmp_path), "train")


def test_cofw_missing_keys(tmp_path):
  images, phis, boxes = _cofw_arrays(1)
  _mat73(tmp_path / "COFW_train_color.mat", {"phisTr": phis}, {"IsTr": images})
  with pytest.raises(DataError, match=r"COFW_train_color.mat: missing key\(s\) \['bboxesTr'\]") as e:
    readers.read_cofw_mat(str(tmp_path), "train", on_error="skip")
  assert e.value.kind == "missing_key"


# ------------------------------------------------------------------ AFLW


@pytest.mark.parametrize("version", ["v5", "v73"])
def test_aflw_mat_split_visibility_frontal(tmp_path, version):
  rng = np.random.default_rng(0)
  n = 9
  data, boxes, mask, names, ra = _aflw_arrays(n, rng)
  for name in names:
    _write_image(str(tmp_path / "flickr" / name))
  path = tmp_path / "AFLWinfo_release.mat"
  if version == "v5":
    scipy_io = pytest.importorskip("scipy.io")
    name_cells = np.empty((n, 1), object)
    for i, name in enumerate(names):
      name_cells[i, 0] = name
    scipy_io.savemat(path, {"bbox": boxes, "data": data, "mask_new": mask,
                            "nameList": name_cells, "ra": ra[None, :].astype(float)})
  else:
    _mat73(path, {"bbox": boxes, "data": data, "mask_new": mask,
                  "ra": ra[None, :].astype(float)}, {"nameList": names})
  train, _ = readers.read_aflw_mat(str(tmp_path), "train", num_train=6)
  test, report = readers.read_dataset("AFLW", str(tmp_path), "test")
  assert report.fmt == "aflw_mat"
  # Default num_train is 20,000: a 9-face file has no test faces.
  assert len(test) == 0 and any("published test split has 4386" in w for w in report.warnings)
  test, _ = readers.read_aflw_mat(str(tmp_path), "test", num_train=6)
  assert len(train) == 6 and len(test) == 3
  assert [r.image_name for r in train + test] == [names[k - 1] for k in ra]
  for record in train + test:
    i = names.index(record.image_name)
    np.testing.assert_allclose(record.landmarks[:, 0], data[i, :19], atol=1e-4)
    np.testing.assert_allclose(record.landmarks[:, 1], data[i, 19:], atol=1e-4)
    x1, x2, y1, y2 = boxes[i]
    np.testing.assert_allclose(record.box, [x1, y1, x2, y2], atol=1e-4)
    assert record.box_size == pytest.approx(np.sqrt((x2 - x1) * (y2 - y1)), rel=1e-5)
    np.testing.assert_array_equal(record.point_flags["visible"], mask[i])
    assert record.subsets == (("frontal",) if i % 3 == 0 else ())
    assert record.image == str(tmp_path / "flickr" / names[i])


def test_aflw_hrnet_csv_with_frontal_subset(tmp_path):
  names = [f"flickr/0/image{i:05d}.jpg" for i in range(4)]
  for name in names:
    _write_image(str(tmp_path / "images" / name))
  rows = _hrnet_rows("AFLW", names, with_box_size=True)
  header = _hrnet_header(19, with_box_size=True)
  assert len(header) == 43
  _write_csv(tmp_path / "face_landmarks_aflw_test.csv", header, rows)
  _write_csv(tmp_path / "face_landmarks_aflw_test_frontal.csv", header, rows[::2])
  records, report = readers.read_dataset("AFLW", str(tmp_path), "test")
  assert report.fmt == "hrnet_csv"
  assert [r.subsets for r in records] == [("frontal",), (), ("frontal",), ()]
  assert records[1].box_size == pytest.approx(rows[1][2])
  np.testing.assert_allclose(records[1].landmarks, _points("AFLW", 1), atol=1e-4)
  # A damaged subset file names its line (it said "list index out of range").
  _write_csv(tmp_path / "face_landmarks_aflw_test_frontal.csv", header,
             [rows[0], rows[2][:3]])
  with pytest.raises(DataError, match=r"face_landmarks_aflw_test_frontal.csv:3: a subset row "
                                      r"needs the image name and the face centre \(columns 1 "
                                      r"and 4-5\), got 3 fields"):
    readers.read_dataset("AFLW", str(tmp_path), "test")
  _write_csv(tmp_path / "face_landmarks_aflw_test_frontal.csv", header,
             [rows[0], list(rows[2][:3]) + ["left", "up"] + list(rows[2][5:])])
  with pytest.raises(DataError, match=r"frontal.csv:3: the face centre 'left', 'up' is not two "
                                      r"numbers"):
    readers.read_dataset("AFLW", str(tmp_path), "test")


# ------------------------------------------------------------------ bad inputs


def _bad_wflw(tmp_path, mutate):
  """A WFLW train file of 3 good lines where `mutate` breaks line 2."""
  ann, truth = _make_wflw_raw(tmp_path, n=3)
  path = ann / "list_98pt_rect_attr_train.txt"
  lines = path.read_text().splitlines()
  lines[1] = mutate(lines[1].split())
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _set(index, value):
  def mutate(fields):
    fields[index] = value
    return " ".join(fields)
  return mutate


@pytest.mark.parametrize("mutate, kind, message", [
    (lambda f: " ".join(f[:10] + f[12:]), "field_count", "expected 207 space-separated fields"),
    (_set(7, "nan"), "bad_coordinates", r"non-finite coordinate at point\(s\) \[3\]"),
    (_set(8, "-500"), "bad_coordinates", "point 4 at .* outside the face box"),
    (_set(198, "0.0"), "zero_box", "face box of zero size"),
    (_set(206, "0--Event/missing.jpg"), "missing_image", "image file not found"),
    (_set(201, "2"), "bad_value", "attribute flags must be 0 or 1"),
    (_set(0, "abc"), "bad_value", "coordinates: value 0 is not a number"),
])
def test_bad_wflw_line_raise_and_skip(tmp_path, mutate, kind, message):
  path = _bad_wflw(tmp_path, mutate)
  with pytest.raises(DataError, match=f"list_98pt_rect_attr_train.txt:2: {message}") as e:
    readers.read_wflw_txt(path, "train")
  assert e.value.kind == kind and e.value.where.endswith(":2")
  records, report = readers.read_wflw_txt(path, "train", on_error="skip")
  assert len(records) == 2 and report.num_read == 2
  assert report.skipped_by_kind() == {kind: 1}
  assert report.skipped[0].where == f"{path}:2"
  assert any("skipped 1 samples" in w for w in report.warnings)
  assert f"{path}:2" in report.summary()


def test_points_slightly_outside_the_image_are_kept(tmp_path):
  """Real annotations have jaw points a few pixels past the border."""
  def to_left_border(fields):
    values = np.asarray(fields[:200], float)
    x = values[:196:2]
    shift = -3.5 - x.min()  # the leftmost point ends 3.5 px left of the image
    values[:196:2] += shift
    values[[196, 198]] = [0.0, values[198] + shift]
    return " ".join([*(f"{v:.4f}" for v in values), *fields[200:]])
  path = _bad_wflw(tmp_path, to_left_border)
  records, report = readers.read_wflw_txt(path, "train")
  assert len(records) == 3 and report.num_skipped == 0
  assert records[1].landmarks[:, 0].min() == pytest.approx(-3.5)


def test_far_negative_point_inside_the_margin_of_a_negative_box_is_rejected(tmp_path):
  def mutate(fields):
    fields[196] = "-100"  # box x_min: the box reaches far left of the image
    fields[0] = "-60"
    return " ".join(fields)
  path = _bad_wflw(tmp_path, mutate)
  with pytest.raises(DataError, match="point 0 has a negative coordinate"):
    readers.read_wflw_txt(path, "train")


def test_skip_counts_several_reasons(tmp_path):
  ann, _ = _make_wflw_raw(tmp_path, n=4)
  path = ann / "list_98pt_rect_attr_train.txt"
  lines = path.read_text().splitlines()
  lines[0] = lines[0].replace(lines[0].split()[5], "inf", 1)
  lines[2] = " ".join(lines[2].split()[:-2])
  lines[3] = lines[3].rsplit(" ", 1)[0] + " nowhere.jpg"
  path.write_text("\n".join(lines) + "\n\n")
  records, report = readers.read_dataset("WFLW", str(tmp_path), "train", on_error="skip")
  assert len(records) == 1 and report.num_skipped == 3
  assert report.skipped_by_kind() == {"bad_coordinates": 1, "field_count": 1, "missing_image": 1}
  assert [s.where.rsplit(":", 1)[1] for s in report.skipped] == ["1", "3", "4"]
  with pytest.raises(ValueError, match="on_error"):
    readers.read_dataset("WFLW", str(tmp_path), "train", on_error="ignore")


def test_empty_annotation_files_raise_in_any_policy(tmp_path):
  (tmp_path / "list_98pt_rect_attr_train.txt").write_text("")
  (tmp_path / "WFLW_images").mkdir()
  with pytest.raises(DataError, match="list_98pt_rect_attr_train.txt: WFLW annotation file is empty") as e:
    readers.read_dataset("WFLW", str(tmp_path), "train", on_error="skip")
  assert e.value.kind == "empty_file"
  (tmp_path / "train.tsv").write_text("\n \n")
  with pytest.raises(DataError, match="train.tsv: TSV annotation file has no lines"):
    readers.read_star_tsv("WFLW", str(tmp_path / "train.tsv"), "train", on_error="skip")
  _write_csv(tmp_path / "face_landmarks_aflw_train.csv", _hrnet_header(19, True), [])
  with pytest.raises(DataError, match="face_landmarks_aflw_train.csv: CSV annotation file has no data rows"):
    readers.read_hrnet_csv("AFLW", str(tmp_path), "train")


def test_bad_pts_files(tmp_path):
  root, _ = _make_300w_tree(tmp_path)
  pts_file = root / "afw" / "img_0.pts"
  lines = pts_file.read_text().splitlines()
  pts_file.write_text("\n".join(lines[:10] + ["12.0 13.0 14.0"] + lines[11:]) + "\n")
  with pytest.raises(DataError, match=r"img_0.pts:11: expected 2 coordinates"):
    readers.read_300w_pts(str(tmp_path), "train")
  pts_file.write_text("\n".join(lines[:10] + lines[11:]) + "\n")  # 67 point lines
  with pytest.raises(DataError, match=r"img_0.pts:\d+: n_points says 68 but 67 point lines") as e:
    readers.read_300w_pts(str(tmp_path), "train")
  assert e.value.kind == "point_count"
  os.remove(root / "afw" / "img_1.png")
  records, report = readers.read_300w_pts(str(tmp_path), "train", on_error="skip")
  assert len(records) == 3
  assert report.skipped_by_kind() == {"point_count": 1, "missing_image": 1}
  assert any("img_1.pts" in s.where and "no image beside it" in s.reason for s in report.skipped)


def test_hrnet_csv_wrong_columns_and_zero_scale(tmp_path):
  names = [f"{i}.jpg" for i in range(3)]
  for name in names:
    _write_image(str(tmp_path / "images" / name))
  rows = _hrnet_rows("300W", names)
  rows[0] = rows[0][:-1]
  rows[2][1] = 0.0
  _write_csv(tmp_path / "face_landmarks_300w_train.csv", _hrnet_header(68), rows)
  with pytest.raises(DataError, match=r"face_landmarks_300w_train.csv:2: expected 140 columns"):
    readers.read_dataset("300W", str(tmp_path), "train")
  records, report = readers.read_dataset("300W", str(tmp_path), "train", on_error="skip")
  assert len(records) == 1
  assert report.skipped_by_kind() == {"field_count": 1, "zero_box": 1}
  assert report.skipped[1].where.endswith("face_landmarks_300w_train.csv:4")


def test_star_tsv_wrong_point_count(tmp_path):
  _write_image(str(tmp_path / "0.jpg"))
  line = _star_line("COFW", 0, "0.jpg")  # 29 points where 300W needs 68
  (tmp_path / "test.tsv").write_text(line + "\n")
  with pytest.raises(DataError, match=r"test.tsv:1: expected 136 landmark values \(68 points\) for 300W, found 58"):
    readers.read_star_tsv("300W", str(tmp_path), "test")


def test_aflw_bad_permutation_and_missing_file(tmp_path):
  data, boxes, mask, names, ra = _aflw_arrays(3, np.random.default_rng(1))
  ra[0] = ra[1]
  _mat73(tmp_path / "AFLWinfo_release.mat", {"bbox": boxes, "data": data, "mask_new": mask,
                                             "ra": ra[None].astype(float)}, {"nameList": names})
  with pytest.raises(DataError, match=r"AFLWinfo_release.mat:ra: must be a 1-based permutation of 1..3"):
    readers.read_aflw_mat(str(tmp_path), "train")
  with pytest.raises(DataError, match=r"nowhere: no such file or directory \(looking for AFLW .mat file\)"):
    readers.read_aflw_mat(str(tmp_path / "nowhere"), "train")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(DataError, match="empty_dir: no AFLW .mat file found: looked for AFLWinfo_release.mat"):
    readers.read_aflw_mat(str(tmp_path / "empty_dir"), "train")


def test_detect_format_and_unknown_inputs(tmp_path):
  with pytest.raises(DataError, match="no 300W test annotations found in any known format"):
    readers.detect_format("300W", str(tmp_path), "test")
  with pytest.raises(DataError, match="no such file or directory"):
    readers.read_dataset("COFW", str(tmp_path / "missing"), "train")
  with pytest.raises(ValueError, match="cannot be read as 'wflw_txt'"):
    readers.read_dataset("COFW", str(tmp_path), "train", fmt="wflw_txt")
  with pytest.raises(UnknownProtocolError, match="unknown protocol 'helen'"):
    readers.read_dataset("helen", str(tmp_path), "train")
  _make_wflw_raw(tmp_path / "w", n=1)
  assert readers.detect_format("wflw", str(tmp_path / "w"), "train") == "wflw_txt"


# ------------------------------------------------------------------ hostile inputs


def _non_utf8(path, line_index):
  """Puts a Latin-1 byte (0xe9) at the start of line `line_index` of a text file."""
  lines = path.read_bytes().split(b"\n")
  lines[line_index] = b"\xe9" + lines[line_index]
  path.write_bytes(b"\n".join(lines))


def test_non_utf8_lines_name_the_line_and_skip_only_it(tmp_path):
  ann, _ = _make_wflw_raw(tmp_path, n=3)
  path = ann / "list_98pt_rect_attr_train.txt"
  _non_utf8(path, 1)
  with pytest.raises(DataError, match=r"list_98pt_rect_attr_train.txt:2: not UTF-8 text "
                     r"\(byte 0xe9 at column 1\)") as e:
    readers.read_wflw_txt(str(path), "train")
  assert e.value.kind == "encoding"
  records, report = readers.read_wflw_txt(str(path), "train", on_error="skip")
  assert len(records) == 2 and report.skipped_by_kind() == {"encoding": 1}
  # TSV and CSV rows, and .pts files (one sample each), the same way.
  tsv = tmp_path / "train.tsv"
  tsv.write_text("\n".join(_star_line("WFLW", i, "a.jpg") for i in range(3)) + "\n")
  _write_image(str(tmp_path / "a.jpg"))
  _non_utf8(tsv, 2)
  records, report = readers.read_star_tsv("WFLW", str(tsv), "train", on_error="skip")
  assert len(records) == 2 and report.skipped[0].where == f"{tsv}:3"
  root, _ = _make_300w_tree(tmp_path / "w")
  _non_utf8(root / "afw" / "img_0.pts", 4)
  with pytest.raises(DataError, match=r"img_0.pts:5: not UTF-8 text"):
    readers.read_300w_pts(str(tmp_path / "w"), "train")
  records, report = readers.read_300w_pts(str(tmp_path / "w"), "train", on_error="skip")
  assert report.skipped_by_kind() == {"encoding": 1}


def test_image_paths_may_not_leave_the_image_folder(tmp_path):
  ann, _ = _make_wflw_raw(tmp_path, n=2)
  _write_image(str(tmp_path / "outside.jpg"))
  path = ann / "list_98pt_rect_attr_train.txt"
  lines = path.read_text().splitlines()
  lines[1] = lines[1].rsplit(" ", 1)[0] + " 0--Event/../../outside.jpg"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"train.txt:2: image path '0--Event/../../outside.jpg' "
                     "leads out of the image folder") as e:
    readers.read_wflw_txt(str(path), "train")
  assert e.value.kind == "bad_path"


def test_symlink_loops_in_the_source_tree_are_walked_past(tmp_path):
  _make_wflw_raw(tmp_path, n=2)
  os.symlink("b", tmp_path / "a")
  os.symlink("a", tmp_path / "b")  # a -> b -> a: ELOOP on every stat.
  os.symlink(tmp_path, tmp_path / "WFLW_images" / "up")  # A loop through a parent.
  records, _ = readers.read_dataset("WFLW", str(tmp_path), "train")
  assert len(records) == 2


@pytest.mark.parametrize("content, message", [
    (b"MATLAB 5.0 MAT-file, but this is just text\n",
     "not a readable MATLAB .mat file"),
    (None, r"not a readable MATLAB v7.3 file \(truncated or damaged\?\)"),
])
def test_text_and_truncated_mat_files_name_the_file(tmp_path, content, message):
  path = tmp_path / "COFW_train_color.mat"
  if content is None:  # A v7.3 file cut short.
    images, phis, boxes = _cofw_arrays(2)
    _mat73(path, {"phisTr": phis, "bboxesTr": boxes}, {"IsTr": images})
    content = path.read_bytes()[:4000]
  path.write_bytes(content)
  for on_error in ("raise", "skip"):
    with pytest.raises(DataError, match=f"COFW_train_color.mat: {message}") as e:
      readers.read_cofw_mat(str(tmp_path), "train", on_error=on_error)
    assert e.value.kind == "corrupt_file"


# ------------------------------------------------------------------ the authors' conventions


def test_authors_convention_for_star_tsv_scales_paths_and_the_ibug_subset(tmp_path):
  d = tmp_path / "300W"
  lines = []
  for i in range(3):
    _write_image(str(d / "ibug" / f"{i}.jpg"))
    lines.append(_star_line("300W", i, f"ibug\\{i}.jpg"))  # Windows separators.
  (d / "test.tsv").write_text("\n".join(lines) + "\n")
  (d / "test_ibug.tsv").write_text(lines[1] + "\n")  # The authors' challenging-subset name.
  (d / "test_common.tsv").write_text(lines[0] + "\n")
  project, _ = readers.read_dataset("300W", str(d / "test.tsv"), "test")
  authors, _ = readers.read_dataset("300W", str(d / "test.tsv"), "test", convention="authors")
  star_scale = float(lines[2].split("\t")[3])
  assert project[2].scale == pytest.approx(star_scale / 1.25, rel=1e-6)
  assert authors[2].scale == pytest.approx(star_scale, rel=1e-6)  # Used as an HRNet scale.
  assert [r.image_name for r in project] == [f"ibug/{i}.jpg" for i in range(3)]
  assert [r.subsets for r in project] == [("common",), ("challenging",), ()]
  with pytest.raises(ValueError, match="convention must be one of"):
    readers.read_dataset("300W", str(d / "test.tsv"), "test", convention="paper")


def test_authors_convention_for_cofw_crops_from_floor_and_ceil(tmp_path):
  images, phis, boxes = _cofw_arrays(2)
  _mat73(tmp_path / "COFW_test_color.mat", {"phisT": phis, "bboxesT": boxes}, {"IsT": images})
  project, _ = readers.read_dataset("COFW", str(tmp_path), "test")
  authors, _ = readers.read_dataset("COFW", str(tmp_path), "test", convention="authors")
  for p, a in zip(project, authors):
    lo, hi = np.floor(a.landmarks.min(0)), np.ceil(a.landmarks.max(0))
    np.testing.assert_allclose(a.center, (lo + hi) / 2, atol=1e-5)
    assert a.scale == pytest.approx(float(max(hi - lo)) / 200.0, rel=1e-6)
    assert a.scale > p.scale
    np.testing.assert_array_equal(a.landmarks, p.landmarks)
