"""grain pipelines: batch contracts, exact mixing, epochs, resumption, process
slices, padded evaluation, and the sample grid."""

import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

import grain
from fgtbt_jax.data import config as data_config_lib
from fgtbt_jax.data import convert
from fgtbt_jax.data import pipeline
from fgtbt_jax.commands import visualize
from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax import crop
from fgtbt_jax import images
from fgtbt_jax import landmarks as lm

tfds.disable_progress_bar()
flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags.

TRAIN_SIZES = {"WFLW": 7, "300W": 5, "COFW": 6, "AFLW": 9}
TEST_SIZES = {"WFLW": 5, "300W": 3, "COFW": 4, "AFLW": 6}
BOX = (35.0, 35.0, 85.0, 85.0)  # Scale 0.25: the stored crop is 100 px.


def _record(dataset, split, index):
  """A flat image whose red level encodes the sample index (20 + 20 i)."""
  protocol = lm.get_protocol(dataset)
  colour = (20 + 20 * index, 40 + 50 * protocol.dataset_id, 100)
  image = np.empty((120, 120, 3), np.uint8)
  image[:] = colour
  face = lm.mean_face()[protocol.unified_index] * 50 + 35
  subsets = tuple(name for j, name in enumerate(pipeline.eval_subsets(dataset))
                  if (index + j) % 2 == 0)
  return FaceRecord(dataset, split, images.encode_image(image, "jpeg", 98), face, BOX,
                    f"{dataset}-{split}[{index}]", f"{dataset}_{split}_{index}.jpg",
                    subsets=subsets if split == "test" else ())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("converted")
  for name in lm.PROTOCOL_NAMES:
    convert.convert_records(name, {
        "train": [_record(name, "train", i) for i in range(TRAIN_SIZES[name])],
        "test": [_record(name, "test", i) for i in range(TEST_SIZES[name])]}, root)
  return root


def _config(data_dir, **overrides):
  c = data_config_lib.data_config()
  c.data_dir = str(data_dir)
  c.image_size = 32
  c.num_workers = 0
  c.read_threads = 2
  c.prefetch_buffer_size = 2
  c.eval_batch_size = 4
  c.update(overrides)
  return c


def _identity(images_):
  """Sample index from the red level at each crop's centre."""
  red = images_[:, 15:17, 15:17, 0].astype(float).mean((1, 2))
  return np.round((red - 20) / 20).astype(int)


def _take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


def test_train_batch_contract(data_dir):
  batch = _take(pipeline.make_train_iterator(_config(data_dir)), 1)[0]
  assert set(batch) == {"image", "landmarks", "mask", "dataset_id"}
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["landmarks"].shape == (8, 124, 2) and batch["landmarks"].dtype == np.float32
  assert batch["mask"].shape == (8, 124) and batch["mask"].dtype == bool
  assert batch["dataset_id"].dtype == np.int32
  np.testing.assert_array_equal(batch["dataset_id"], [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(batch["mask"], lm.PROTOCOL_MASKS[batch["dataset_id"]])
  assert (batch["landmarks"][~batch["mask"]] == 0).all()
  # Landmarks are in input pixels: the face fills the middle of the crop.
  own = batch["landmarks"][batch["mask"]]
  assert 0 < own.min() and own.max() < 32
  # The red channel identifies the sample, the green one the dataset.
  green = batch["image"][:, 16, 16, 1].astype(int)
  np.testing.assert_allclose(green, 40 + 50 * batch["dataset_id"], atol=3)


def test_every_batch_holds_k_of_each_dataset_and_epochs_cover_all(data_dir):
  config = _config(data_dir, samples_per_dataset=3, datasets=("AFLW", "WFLW", "COFW"))
  batches = _take(pipeline.make_train_iterator(config), 8)
  order = [lm.get_protocol(d).dataset_id for d in config.datasets]
  for b in batches:
    np.testing.assert_array_equal(b["dataset_id"], np.repeat(order, 3))
  ids = np.stack([_identity(b["image"]) for b in batches])  # (8, 9)
  for position, name in enumerate(config.datasets):
    seen = ids[:, 3 * position:3 * position + 3].reshape(-1)  # 24 samples in order.
    n = TRAIN_SIZES[name]
    epochs = [seen[e * n:(e + 1) * n] for e in range(len(seen) // n)]
    for epoch in epochs:
      np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    # A new permutation each epoch (fixed by the seed).
    assert any((a != b).any() for a, b in zip(epochs, epochs[1:]))


def test_seed_changes_order_and_augmentation(data_dir):
  a = _take(pipeline.make_train_iterator(_config(data_dir, seed=1)), 2)
  b = _take(pipeline.make_train_iterator(_config(data_dir, seed=1)), 2)
  c = _take(pipeline.make_train_iterator(_config(data_dir, seed=2)), 2)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any((x["landmarks"] != y["landmarks"]).any() for x, y in zip(a, c))


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for x, y in zip(first, second):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_resume_from_state_continues_the_exact_sequence(data_dir):
  config = _config(data_dir)
  iterator = pipeline.make_train_iterator(config)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = _take(iterator, 4)
  resumed = pipeline.make_train_iterator(config)
  resumed.set_state(state)
  _assert_same_batches(expected, _take(resumed, 4))
  # Every intermediate state of a short stretch restores correctly too.
  grain.experimental.assert_equal_output_after_checkpoint(
      pipeline.train_dataset(config)[:5].to_iter_dataset())


def test_orbax_checkpoint_of_the_iterator(data_dir, tmp_path):
  import orbax.checkpoint as ocp
  config = _config(data_dir)
  iterator = pipeline.make_train_iterator(config)
  next(iterator)
  next(iterator)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = _take(iterator, 3)
    resumed = pipeline.make_train_iterator(config)
    manager.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(expected, _take(resumed, 3))


def test_worker_processes_give_the_same_sequence_and_resume(data_dir):
  in_process = _take(pipeline.make_train_iterator(_config(data_dir)), 5)
  config = _config(data_dir, num_workers=2, worker_buffer_size=1)
  iterator = pipeline.make_train_iterator(config)
  first = [next(iterator) for _ in range(2)]
  state = iterator.get_state()
  rest = _take(iterator, 3)
  _assert_same_batches(in_process, first + rest)
  resumed = pipeline.make_train_iterator(config)
  resumed.set_state(state)
  _assert_same_batches(rest, _take(resumed, 3))


def test_process_slices_are_disjoint(data_dir):
  config = _config(data_dir)
  for name, n in TRAIN_SIZES.items():
    names = []
    for process in range(2):
      samples = pipeline.dataset_samples(config, name, process_index=process, process_count=2)
      per_epoch = -(-(n - process) // 2)
      names.append({samples[i]["image_name"] for i in range(per_epoch)})
    assert not names[0] & names[1]
    assert len(names[0] | names[1]) == n
  # Whole batches: k_local = 2 / 2 = 1 sample of each dataset per process.
  batches = [_take(pipeline.make_train_iterator(config, process_index=p, process_count=2), 4)
             for p in range(2)]
  for process_batches in batches:
    for b in process_batches:
      np.testing.assert_array_equal(b["dataset_id"], [0, 1, 2, 3])
  # Within the first epoch of WFLW (4 and 3 samples), the processes differ.
  ids = [np.concatenate([_identity(b["image"])[:1] for b in pb[:3]]) for pb in batches]
  assert not set(ids[0]) & set(ids[1])


def test_bad_process_and_dataset_settings(data_dir):
  with pytest.raises(ValueError, match="samples_per_dataset=3 must be a positive "
                     "multiple of the process count 2"):
    pipeline.make_train_iterator(_config(data_dir, samples_per_dataset=3), process_index=0,
                                 process_count=2)
  with pytest.raises(ValueError, match="distinct datasets"):
    pipeline.train_dataset(_config(data_dir, datasets=("WFLW", "wflw")))
  with pytest.raises(ValueError, match="data.data_dir is empty"):
    pipeline.train_dataset(_config(""))
  with pytest.raises(ValueError, match="process_index 2 outside 0..1"):
    pipeline.dataset_samples(_config(data_dir), "COFW", process_index=2, process_count=2)
  with pytest.raises(ValueError, match="eval_batch_size=3"):
    pipeline.eval_dataset(_config(data_dir, eval_batch_size=3), "COFW", process_count=2)


def test_eval_batches_are_padded_and_annotated(data_dir):
  config = _config(data_dir)
  batches = list(pipeline.make_eval_iterator(config, "AFLW"))  # 6 samples, batch 4.
  assert len(batches) == 2
  b = batches[0]
  assert set(b) == {"image", "inverse_affine", "original_to_crop", "landmarks", "box_size",
                    "subset/frontal", "valid", "dataset_id"}
  assert b["image"].shape == (4, 32, 32, 3) and b["landmarks"].shape == (4, 19, 2)
  assert b["inverse_affine"].dtype == np.float32 and b["inverse_affine"].shape == (4, 2, 3)
  valid = np.concatenate([x["valid"] for x in batches])
  np.testing.assert_array_equal(valid, [True] * 6 + [False] * 2)
  ids = np.concatenate([_identity(x["image"]) for x in batches])[:6]
  np.testing.assert_array_equal(ids, np.arange(6))  # Annotation order.
  frontal = np.concatenate([x["subset/frontal"] for x in batches])[:6]
  np.testing.assert_array_equal(frontal, np.arange(6) % 2 == 0)
  np.testing.assert_array_equal(np.concatenate([x["dataset_id"] for x in batches]), 3)
  # The stored crop is 100 px around the face: centre 49.5, scale 0.25.
  stored = pipeline.open_source(config, "AFLW", "test")[0]
  np.testing.assert_allclose(b["landmarks"][0], stored["landmarks"])
  to_input = crop.face_crop_affine([49.5, 49.5], 0.25, 32)
  np.testing.assert_allclose(b["inverse_affine"][0], crop.invert_affine(to_input), atol=1e-5)
  np.testing.assert_allclose(b["box_size"][0], 50.0, rtol=1e-5)
  # Predictions map back to the original image through both transforms.
  in_input = crop.apply_affine(stored["landmarks"], to_input)
  original = crop.apply_affine(crop.apply_affine(in_input, b["inverse_affine"][0]),
                               crop.invert_affine(b["original_to_crop"][0]))
  face = lm.mean_face()[lm.get_protocol("AFLW").unified_index] * 50 + 35
  np.testing.assert_allclose(original, face, atol=1e-3)


def test_eval_process_shares_cover_the_split_once(data_dir):
  config = _config(data_dir, eval_batch_size=4)
  shares = [list(pipeline.make_eval_iterator(config, "WFLW", "test", process_index=p,
                                             process_count=2)) for p in range(2)]
  assert len(shares[0]) == len(shares[1]) == 2  # 3 and 2 samples, batches of 2.
  seen = []
  for batches in shares:
    for b in batches:
      assert b["image"].shape[0] == 2
      seen.extend(_identity(b["image"])[b["valid"]])
      assert set(b) >= {f"subset/{s}" for s in pipeline.eval_subsets("WFLW")}
  assert sorted(seen) == list(range(5))


def test_eval_subset_names():
  assert pipeline.eval_subsets("wflw") == ("pose", "expression", "illumination", "makeup",
                                           "occlusion", "blur")
  assert pipeline.eval_subsets("300W") == ("common", "challenging")
  assert pipeline.eval_subsets("COFW") == ()
  assert pipeline.eval_subsets("AFLW") == ("frontal",)


def test_visualize_grid(data_dir, tmp_path):
  config = _config(data_dir)
  grid = visualize.sample_grid(config, num=3, tile=48)
  assert grid.shape == (4 * (24 + 48), 3 * 48, 3)
  # Landmark dots were drawn: the pure red/blue dot colours appear.
  assert (np.abs(grid.astype(int) - (230, 40, 40)).sum(-1) < 30).any()
  out = tmp_path / "grid.png"
  assert visualize.main(["--data-dir", str(data_dir), "--out", str(out), "--num", "2",
                         "--image-size", "32", "--tile", "32"]) == 0
  assert out.stat().st_size > 0
  assert visualize.main(["--data-dir", str(tmp_path / "none"), "--out", str(out)]) == 1


_WORKERS_THEN_WAIT = """
import sys, time
from absl import flags
flags.FLAGS(sys.argv[:1])  # grain reads its flags
from fgtbt_jax.data import config
from fgtbt_jax.data import pipeline
c = config.data_config()
c.data_dir, c.image_size, c.num_workers, c.worker_buffer_size = sys.argv[1], 32, 2, 1
c.read_threads, c.prefetch_buffer_size = 1, 1
iterator = pipeline.make_train_iterator(c)
next(iterator)
print("ready", flush=True)
time.sleep(600)
"""


def _children(pid: int) -> set[int]:
  found = set()
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      found.add(int(stat.parent.name))
  return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_processes_die_with_a_killed_trainer(data_dir):
  import os
  import signal
  import subprocess
  import time
  from tests import helpers
  trainer = subprocess.Popen([sys.executable, "-c", _WORKERS_THEN_WAIT, str(data_dir)],
                             env=helpers.subprocess_env(devices=1), cwd=helpers.REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert trainer.stdout.readline().strip() == "ready", trainer.stderr.read()[-3000:]
    workers = _children(trainer.pid)
    assert len(workers) >= 2  # The grain workers (and a resource tracker).
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait(timeout=30)
    deadline = time.time() + 120  # A worker still importing ends once it starts.
    while time.time() < deadline and any(pathlib.Path(f"/proc/{w}").exists() for w in workers):
      time.sleep(0.2)
    alive = [w for w in workers if pathlib.Path(f"/proc/{w}").exists()
             and "(" in pathlib.Path(f"/proc/{w}/stat").read_text()
             and pathlib.Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"still running after the trainer was killed: {alive}"
  finally:
    if trainer.poll() is None:
      trainer.kill()
