"""grain input pipelines: mixed augmented training batches and padded eval batches.

Training (`make_train_iterator`), per dataset d in `config.datasets`:

    stored crops (TFDS ArrayRecord, random access)
      -> each example marked labeled or not (`data.labeled_fraction`;
         `labeled_examples`, by its index in the split)
      -> this process's slice  ds[process_index::process_count]
      -> shuffle (new permutation every epoch) -> repeat forever
      -> random_map(TrainAugment): one cv2.warpAffine per sample combining
         the random scale, rotation and flip; landmarks through the same
         matrix, flip-permuted, scattered into the unified 124-point order
      -> batch(k_local)
  zip over datasets -> concatenate -> one process-local batch in which
  samples are grouped by dataset in config order (k_local of each)
  -> to_iter_dataset (reading threads) -> mp_prefetch (worker processes).

Every step is index-based (grain MapDataset), so the iterator's state is a
position: `get_state()`/`set_state()` (or grain.checkpoint.CheckpointSave /
CheckpointRestore in an Orbax checkpoint) resume the exact sequence.

TRAIN BATCH (numpy; B = k_local * len(datasets), k_local = k / process_count):
  "image"      uint8   (B, S, S, 3) RGB, not normalised
  "landmarks"  float32 (B, 124, 2) input pixels, unified order, 0 where absent
  "mask"       bool    (B, 124) the sample's protocol has the point and it is finite;
                               all False for a face without landmarks (one left
                               unlabeled by data.labeled_fraction, or of an
                               unlabeled folder: landmarks 0 there too)
  "dataset_id" int32   (B,) position in landmarks.PROTOCOL_NAMES

EVAL BATCH for one dataset and split (`make_eval_iterator`; B = eval_batch_size
/ process_count, the last batches padded with valid=False so every process
runs the same number of steps):
  "image"            uint8   (B, S, S, 3) centre crop, no augmentation
  "inverse_affine"   float32 (B, 2, 3) input pixels -> stored-crop pixels
  "original_to_crop" float32 (B, 2, 3) original-image pixels -> stored-crop pixels
  "landmarks"        float32 (B, N, 2) ground truth in stored-crop pixels, own order
  "box_size"         float32 (B,) AFLW's normaliser, else sqrt(w * h) of the box
  "subset/<name>"    bool    (B,) for each of `eval_subsets(dataset)`
  "valid"            bool    (B,)
  "dataset_id"       int32   (B,)
NME is invariant to the crop's translation and uniform scale, so NME in
stored-crop pixels equals NME in original pixels.

Heatmaps are not built here: the train step renders them on device.
grain's worker processes need absl flags parsed (run under absl.app.run, or
`flags.FLAGS.mark_as_parsed()`); close iterators (`iterator.close()`) when done.
"""

from __future__ import annotations

import math
import os
import threading
import time
import zlib
from typing import Any, Mapping, Sequence

import cv2
import grain
import ml_collections
import numpy as np

from fgtbt_jax.data import tfds_builders
from fgtbt_jax import crop
from fgtbt_jax.data import config as data_config_lib
from fgtbt_jax.data import datasets
from fgtbt_jax import landmarks as lm

_JPEG_START = b"\xff\xd8"
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))


def eval_subsets(dataset: str) -> tuple[str, ...]:
  """Names of a dataset's evaluation subsets (batch keys "subset/<name>")."""
  return datasets.get(dataset).subsets


def _derive_seed(*parts: int) -> int:
  """A 32-bit seed for one (base seed, dataset, process, purpose) combination."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# The key `dataset_samples` adds to every stored train example: whether its
# landmarks are used (`labeled_examples`). `TrainAugment` takes an example
# without it (a stored example as read) as labeled.
LABELED_KEY = "labeled"
# The purpose part of the seed that picks the labeled examples.
_LABELED_PURPOSE = 2


def labeled_examples(num_examples: int, fraction, seed: int, dataset: str) -> np.ndarray:
  """(num_examples,) bool: which examples of a train split keep their landmarks.

  Exactly round(fraction * num_examples) of them (Python's `round`): the
  first of a permutation of the split's indices seeded by `seed`
  (`data.seed`) and the dataset's name (not its id, which for an own
  dataset depends on its place in `data.datasets`). So every process,
  worker and resumed run marks the same examples, and a larger fraction
  keeps the examples of a smaller one.

  Raises:
    ConfigError: `fraction` not in (0, 1]
      (`fgtbt_jax.data.config.check_labeled_fraction`).
  """
  fraction = data_config_lib.check_labeled_fraction(fraction)
  n = int(num_examples)
  name = lm.get_protocol(dataset).name if lm.is_benchmark(dataset) else str(dataset)
  order = np.random.default_rng(np.random.SeedSequence(
      [int(seed), zlib.crc32(name.encode("utf-8")), _LABELED_PURPOSE])).permutation(n)
  labeled = np.zeros(n, bool)
  labeled[order[:int(round(fraction * n))]] = True
  return labeled


class _MarkLabeled(grain.transforms.MapWithIndex):
  """Adds `LABELED_KEY` to each stored example, by its index in the split."""

  def __init__(self, labeled: np.ndarray):
    self.labeled = np.asarray(labeled, bool)

  def map_with_index(self, index: int, element):
    # Later epochs ask for index + epoch * n; the source wraps them the same way.
    return {**element, LABELED_KEY: np.bool_(self.labeled[index % len(self.labeled)])}


def decode_and_warp(image: bytes, matrix: np.ndarray, size: int,
                    reduced_decode: bool = True, where: str = "stored image") -> np.ndarray:
  """Decodes encoded `image` and warps it with `matrix` into an S x S RGB crop.

  When the warp shrinks by 2x or more, JPEGs are decoded at 1/2, 1/4 or 1/8
  size (libjpeg's scaled IDCT, far cheaper than decoding in full); the
  reduced image's pixel centres sit at x_full = r (x + 0.5) - 0.5, which is
  folded into the matrix, so the result matches full decoding up to the
  difference between r x r block means and bilinear point samples.
  """
  data = np.frombuffer(image, np.uint8)
  zoom = math.sqrt(abs(float(np.linalg.det(matrix[:, :2]))))
  flag, factor = cv2.IMREAD_COLOR, 1
  if reduced_decode and image[:2] == _JPEG_START:
    for r, reduced in _REDUCED_FLAGS:
      if zoom * r <= 1.0:
        flag, factor = reduced, r
        break
  decoded = cv2.imdecode(data, flag)
  if decoded is None:
    raise ValueError(f"{where}: the stored image could not be decoded")
  if factor > 1:
    from_reduced = np.array([[factor, 0.0, 0.5 * factor - 0.5],
                             [0.0, factor, 0.5 * factor - 0.5]])
    matrix = crop.compose_affine(matrix, from_reduced)
  # OpenCV's bilinear warp has a vector path for 4 channels that is about
  # twice as fast as its 3-channel one; the extra colour conversions are cheap.
  warped = cv2.warpAffine(cv2.cvtColor(decoded, cv2.COLOR_BGR2BGRA), matrix, (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0, 255))
  return cv2.cvtColor(warped, cv2.COLOR_BGRA2RGB)


def _source_name(example: Mapping[str, Any]) -> str:
  source = example.get("source", b"stored image")
  return source.decode(errors="replace") if isinstance(source, bytes) else str(source)


class TrainAugment(grain.transforms.RandomMap):
  """Random scale, rotation and flip of a stored crop in one warp (SPEC 4).

  The crop side is 200 * scale * crop_enlarge * U(scale_range) stored-crop
  pixels around the face centre; with probability `rotation_prob` it rotates
  by U(-rotation_deg, rotation_deg); with probability `flip_prob` it is
  mirrored and the landmarks permuted with the protocol's flip_permutation.
  Every draw is made for every sample, so the random stream per element is
  fixed whatever the outcomes. An example marked unlabeled (`LABELED_KEY`
  False) comes out with an all-False mask and zero landmarks.
  """

  def __init__(self, dataset: str, image_size: int, crop_enlarge: float,
               scale_range: Sequence[float], rotation_deg: float,
               rotation_prob: float, flip_prob: float, reduced_decode: bool = True):
    self.protocol = lm.get_protocol(dataset)
    self.image_size = int(image_size)
    self.crop_enlarge = float(crop_enlarge)
    self.scale_range = (float(scale_range[0]), float(scale_range[1]))
    if not 0 < self.scale_range[0] <= self.scale_range[1]:
      raise ValueError(f"scale_range must be 0 < low <= high, got {tuple(scale_range)}")
    self.rotation_deg = float(rotation_deg)
    self.rotation_prob = float(rotation_prob)
    self.flip_prob = float(flip_prob)
    self.reduced_decode = bool(reduced_decode)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, dataset: str) -> "TrainAugment":
    return cls(dataset, config.image_size, config.crop_enlarge, config.scale_range,
               config.rotation_deg, config.rotation_prob, config.flip_prob,
               config.reduced_decode)

  def draw(self, rng: np.random.Generator) -> tuple[float, float, bool]:
    """(extra_scale, rotation_deg, flip) for one sample."""
    extra_scale = rng.uniform(*self.scale_range)
    rotate = rng.random() < self.rotation_prob
    angle = rng.uniform(-self.rotation_deg, self.rotation_deg)
    flip = rng.random() < self.flip_prob
    return float(extra_scale), float(angle) if rotate else 0.0, bool(flip)

  def matrix(self, example: Mapping[str, Any], extra_scale: float, rotation: float,
             flip: bool) -> np.ndarray:
    """Stored-crop pixels -> network input pixels."""
    return crop.face_crop_affine(
        example["center"], float(example["scale"]), self.image_size,
        crop_enlarge=self.crop_enlarge, rotation_deg=rotation, flip=flip,
        extra_scale=extra_scale)

  def random_map(self, element, rng: np.random.Generator):
    extra_scale, rotation, flip = self.draw(rng)
    matrix = self.matrix(element, extra_scale, rotation, flip)
    image = decode_and_warp(element["image"], matrix, self.image_size, self.reduced_decode,
                            _source_name(element))
    points = crop.apply_affine(np.asarray(element["landmarks"], np.float64), matrix)
    if flip:
      points = points[self.protocol.flip_permutation]
    unified, mask = lm.to_unified(points, self.protocol)
    if not element.get(LABELED_KEY, True):
      mask = np.zeros_like(mask)
    # The batch carries 0, not NaN, where a point is absent: the loss masks
    # it, and NaN would poison any arithmetic done before the mask.
    unified = np.where(mask[:, None], unified, np.float32(0.0))
    return {"image": image, "landmarks": unified, "mask": mask,
            "dataset_id": np.int32(self.protocol.dataset_id)}


def _concat_batches(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _check_datasets(configured: Sequence[str]) -> tuple[str, ...]:
  names = tuple(lm.get_protocol(d).name for d in configured)
  if not names or len(set(names)) != len(names):
    raise ValueError(f"data.datasets must name distinct datasets, got {tuple(configured)}")
  return names


def local_samples_per_dataset(config: ml_collections.ConfigDict, process_count: int) -> int:
  """k_local = k / process_count, with a clear error when it does not divide."""
  k = int(config.samples_per_dataset)
  if k <= 0 or k % process_count:
    raise ValueError(f"data.samples_per_dataset={k} must be a positive multiple of "
                     f"the process count {process_count}: every process contributes "
                     "the same number of samples of every dataset to a global batch")
  return k // process_count


def open_source(config: ml_collections.ConfigDict, dataset: str, split: str):
  """Random-access source of a converted split (images left encoded)."""
  if not config.data_dir:
    raise ValueError("data.data_dir is empty: set it to the --out folder of "
                     "python -m data_pipelines.convert")
  return tfds_builders.open_split(config.data_dir, dataset, split, config.crop_config)


def dataset_samples(config: ml_collections.ConfigDict, dataset: str, *,
                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """One dataset's stored training examples: marked labeled or not
  (`labeled_examples`), process slice, shuffled, repeated.

  `data.labeled_fraction` absent (a config saved before it existed) is 1.0,
  what such runs trained with.
  """
  protocol = lm.get_protocol(dataset)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
  source = open_source(config, protocol.name, config.train_split)
  labeled = labeled_examples(len(source), config.get("labeled_fraction", 1.0), config.seed,
                             protocol.name)
  ds = grain.MapDataset.source(source).map_with_index(
      _MarkLabeled(labeled))[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"{protocol.name} {config.train_split}: {len(source)} samples "
                     f"leave none for process {process_index} of {process_count}")
  seed = _derive_seed(config.seed, protocol.dataset_id, process_index, 0)
  return ds.shuffle(seed=seed).repeat()


def augmented_samples(config: ml_collections.ConfigDict, dataset: str, *,
                      process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """One dataset's augmented training samples (unbatched, unified landmarks)."""
  protocol = lm.get_protocol(dataset)
  seed = _derive_seed(config.seed, protocol.dataset_id, process_index, 1)
  return dataset_samples(config, dataset, process_index=process_index,
                         process_count=process_count).random_map(
                             TrainAugment.from_config(config, dataset), seed=seed)


def train_dataset(config: ml_collections.ConfigDict, *, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Infinite MapDataset of process-local mixed batches (see module docstring)."""
  names = _check_datasets(config.datasets)
  k_local = local_samples_per_dataset(config, process_count)
  per_dataset = [
      augmented_samples(config, name, process_index=process_index,
                        process_count=process_count).batch(k_local, drop_remainder=True)
      for name in names]
  return grain.experimental.ZipMapDataset(per_dataset).map(_concat_batches)


# The pid of the process that starts the grain workers; they inherit it.
_PARENT_PID_ENV = "FGTBT_PIPELINE_PARENT_PID"


def _die_with_parent(interval_s: float = 1.0) -> None:
  """Ends this worker process once the process that started it is gone.

  Without it a trainer killed by SIGKILL (no chance to stop its workers)
  leaves them running, hundreds of MB each. A daemon thread watches the
  parent pid (an orphan is re-parented); the pid to expect comes from the
  environment, so a worker whose trainer died while it was still starting
  up ends too. Linux's PR_SET_PDEATHSIG would not do: it fires when the
  parent *thread* that started the worker ends.
  """
  parent = int(os.environ.get(_PARENT_PID_ENV) or os.getppid())

  def watch():
    while os.getppid() == parent:
      time.sleep(interval_s)
    os._exit(1)

  threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _worker_init(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  _die_with_parent()
  # Parallelism comes from the worker processes; OpenCV's own threads would
  # only compete with them.
  cv2.setNumThreads(1)


def _to_iterator(ds: grain.MapDataset, config: ml_collections.ConfigDict,
                 num_workers: int) -> grain.DatasetIterator:
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=int(config.read_threads),
      prefetch_buffer_size=int(config.prefetch_buffer_size)))
  if num_workers > 0:
    os.environ[_PARENT_PID_ENV] = str(os.getpid())  # Read by the workers (`_die_with_parent`).
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers,
                                     per_worker_buffer_size=int(config.worker_buffer_size)),
        worker_init_fn=_worker_init)
  return iter(iter_ds)


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Checkpointable iterator of process-local training batches."""
  ds = train_dataset(config, process_index=process_index, process_count=process_count)
  return _to_iterator(ds, config, int(config.num_workers))


class _PaddedSplit:
  """A process's share of a split, padded to whole batches.

  Position j of process p is global sample j * process_count + p; positions
  past the end repeat sample 0 and are marked invalid.
  """

  def __init__(self, source, process_index: int, process_count: int, batch_size: int):
    self._source = source
    self._process_index = process_index
    self._process_count = process_count
    per_process = -(-len(source) // process_count)
    self._length = -(-per_process // batch_size) * batch_size

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    g = int(index) * self._process_count + self._process_index
    valid = g < len(self._source)
    return self._source[g if valid else 0], valid


class EvalCrop(grain.transforms.Map):
  """The deterministic centre crop of a stored example, with its eval annotations."""

  def __init__(self, dataset: str, image_size: int, crop_enlarge: float,
               reduced_decode: bool = True):
    self.protocol = lm.get_protocol(dataset)
    self.subsets = eval_subsets(dataset)
    self.image_size = int(image_size)
    self.crop_enlarge = float(crop_enlarge)
    self.reduced_decode = bool(reduced_decode)

  def map(self, element):
    example, valid = element
    matrix = crop.face_crop_affine(example["center"], float(example["scale"]),
                                   self.image_size, crop_enlarge=self.crop_enlarge)
    out = {
        "image": decode_and_warp(example["image"], matrix, self.image_size,
                                 self.reduced_decode, _source_name(example)),
        "inverse_affine": crop.invert_affine(matrix).astype(np.float32),
        "original_to_crop": np.asarray(example["original_to_crop"], np.float32),
        "landmarks": np.asarray(example["landmarks"], np.float32),
        "box_size": np.float32(example["box_size"]),
        "valid": np.bool_(valid),
        "dataset_id": np.int32(self.protocol.dataset_id),
    }
    for name in self.subsets:
      out[f"subset/{name}"] = np.bool_(example["subsets"][name])
    return out


def eval_dataset(config: ml_collections.ConfigDict, dataset: str, split: str | None = None,
                 *, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Finite MapDataset of padded eval batches for one dataset and split."""
  protocol = lm.get_protocol(dataset)
  batch = int(config.eval_batch_size)
  if batch <= 0 or batch % process_count:
    raise ValueError(f"data.eval_batch_size={batch} must be a positive multiple of "
                     f"the process count {process_count}")
  local_batch = batch // process_count
  split = split or config.eval_split
  stored = tfds_builders.authors_crop_size(config.data_dir, protocol.name, split,
                                           config.crop_config)
  if stored and stored != int(config.image_size):
    raise ValueError(
        f"{tfds_builders.converted_dir(config.data_dir, protocol.name, config.crop_config)}: "
        f"the {protocol.name} {split} split holds the authors' test crops at {stored} px, "
        f"not data.image_size={config.image_size}; convert it again with "
        f"--authors-crop-size {config.image_size}")
  source = open_source(config, protocol.name, split)
  padded = _PaddedSplit(source, process_index, process_count, local_batch)
  transform = EvalCrop(protocol.name, config.image_size, config.crop_enlarge,
                       config.reduced_decode)
  return grain.MapDataset.source(padded).map(transform).batch(local_batch)


def make_eval_iterator(config: ml_collections.ConfigDict, dataset: str,
                       split: str | None = None, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """Iterator over one dataset's eval batches (threads only, no worker processes)."""
  ds = eval_dataset(config, dataset, split, process_index=process_index,
                    process_count=process_count)
  return _to_iterator(ds, config, num_workers=0)
