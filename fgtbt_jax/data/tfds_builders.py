"""TFDS builders that store each dataset as loose face crops in ArrayRecord files.

One builder per dataset (`fgtbt_wflw`, `fgtbt_300w`, `fgtbt_cofw`,
`fgtbt_aflw`: `datasets.get(name).builder_name`), sharing `FaceCropBuilder`;
a user's own dataset gets one made for it (`fgtbt_own_<name>`, its point
scheme in the metadata: `builder_class`). Every example is one annotated face:

* "image": the loose crop, a square of `LOOSE_CROP_FACTOR` (2) times the
  HRNet crop side (200 * scale) around the face centre, resized only when its
  side exceeds `max_side` (a builder config, default 512 px), re-encoded as
  JPEG (quality 95) or PNG. Parts outside the original image are black.
* "landmarks" (N, 2) float32, "box" (4,), "center" (2,), "scale", "box_size":
  all in stored-crop pixels (pixel-centre convention, see fgtbt_jax/crop.py).
  `scale` is the HRNet scale of the face in the crop (before the 1.25
  enlargement); `box_size` is the NME box normaliser: the format's own (AFLW)
  or sqrt(w * h) of the face box, scaled into the crop.
* "original_to_crop" (2, 3) float64: the affine map from original-image
  pixels to stored-crop pixels (invert it to map predictions back), and
  "original_size" (height, width) of the original image.
* "point_flags/<name>": per-point booleans (COFW "occluded", AFLW
  "visible"; `datasets.get(name).point_flags`), empty where the source
  format does not give them.
* "subsets/<name>": one boolean per evaluation subset of the dataset
  (`datasets.get(name).subsets`).
* "image_name", "source": where the face came from (for messages).

An unlabeled folder (`fgtbt_jax.data.readers.folder`, reader option
`unlabeled`) stores its faces the same way with NaN landmarks, a train
split only, and "unlabeled": true in the metadata (`is_unlabeled`):
training masks all their points, evaluation leaves the dataset out.

With the readers' `convention="authors"`, test splits (every split but
"train") store the FGTBT authors' own test crop instead of the loose crop:
`crop.authors_crop` at `authors_crop_size` (480, the paper's input) as PNG,
the network input itself (their integer window, PIL bicubic). Its
annotations are in the authors' nominal crop frame (the exact crop map
`face_crop_affine`, which their evaluation maps predictions back with):
"center" is the crop's centre and "scale" such that the evaluation's crop
at that size is the identity, so the network sees their pixels unchanged
and the metrics follow their formulas. The metadata's "authors_crops"
records the size and splits (`authors_crop_size`); evaluating at another
`data.image_size` is refused.

Building and reading need no TensorFlow (tensorflow-datasets 4.9.10), with
these rules, which this module follows:

* Images are handed to `tfds.features.Image` already encoded (bytes);
  a numpy array would make TFDS encode it with TensorFlow.
* `DatasetInfo` is built directly, not with `dataset_info_from_configs`, which
  looks for metadata files beside the module.
* `try_download_gcs=False` when building. `tfds.list_builders()` consults
  the community registry on GCS and fails without TensorFlow; name lookups
  work with a local data_dir and `try_gcs=False`, e.g.
  `tfds.data_source("fgtbt_cofw/jpeg95_512", split="test", data_dir=DIR,
  try_gcs=False)`. `open_split` reads through `tfds.builder_from_directory`,
  which needs neither the builder classes nor any registry.
* The builders report no `code_path`: TFDS would look for a checksums file
  beside the source with `importlib_resources`, which is not installed.
* Reading with `as_data_source` decodes features with numpy (images with
  OpenCV); `open_split` skips image decoding so the pipeline can decode at
  reduced size (cv2.IMREAD_REDUCED_*).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import fcntl
import functools
import json
import os
import pathlib
import shutil
import types
from typing import Callable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from fgtbt_jax.data.records import FaceRecord
from fgtbt_jax import crop
from fgtbt_jax.data import datasets
from fgtbt_jax import errors
from fgtbt_jax import images
from fgtbt_jax import landmarks as lm
from fgtbt_jax.errors import DataError

# The stored crop is this many times the HRNet crop side (200 * scale) of the
# face: room for the 1.25 enlargement, 1.25x scale augmentation and rotation.
LOOSE_CROP_FACTOR = 2.0
# The side of the authors' test crops stored by `convention="authors"`: the
# paper's network input.
AUTHORS_CROP_SIZE = 480
DEFAULT_MAX_SIDE = 512
DEFAULT_JPEG_QUALITY = 95

SPLITS = ("train", "test")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The face datasets cannot be downloaded automatically (their licences require
registration). Download them yourself and pass the folder as the manual
directory (`python -m data_pipelines.convert --dataset NAME --src DIR`); the
layouts each reader understands are described in fgtbt_jax/data/readers/:
WFLW: list_98pt_rect_attr_{train,test}.txt and WFLW_images/ (or the HRNet
  CSVs); 300W: image folders with .pts files (or HRNet CSVs / STAR TSVs);
COFW: COFW_{train,test}_color.mat; AFLW: AFLWinfo_release.mat with the
  flickr/ image folders (or the HRNet CSVs).
"""


@dataclasses.dataclass
class CropConfig(tfds.core.BuilderConfig):
  """How the loose crops are stored: longest side cap and image encoding."""

  max_side: int = DEFAULT_MAX_SIDE
  image_format: str = "jpeg"
  jpeg_quality: int = DEFAULT_JPEG_QUALITY


def _image_format(image_format: str) -> str:
  fmt = {"jpg": "jpeg"}.get(str(image_format).lower(), str(image_format).lower())
  if fmt not in ("jpeg", "png"):
    raise ValueError(f"unknown image format {image_format!r}; expected 'jpeg' or 'png'")
  return fmt


def crop_config_name(max_side: int = DEFAULT_MAX_SIDE, image_format: str = "jpeg",
                     jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> str:
  """Directory name of a crop config, e.g. "jpeg95_512" or "png_512"."""
  fmt = _image_format(image_format)
  return f"{fmt}{jpeg_quality if fmt == 'jpeg' else ''}_{int(max_side)}"


_DEFAULT_CONFIG = CropConfig(name=crop_config_name(), version=tfds.core.Version("1.0.0"),
                             description="JPEG quality 95, longest side 512 px")


def crop_config(max_side: int = DEFAULT_MAX_SIDE, image_format: str = "jpeg",
                jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> CropConfig:
  """The builder config for these storage settings (the default one if they match)."""
  fmt = _image_format(image_format)
  if int(max_side) < 16:
    raise ValueError(f"max_side must be at least 16 px, got {max_side}")
  if not 1 <= int(jpeg_quality) <= 100:
    raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
  name = crop_config_name(max_side, fmt, jpeg_quality)
  if name == _DEFAULT_CONFIG.name:
    return _DEFAULT_CONFIG
  return CropConfig(name=name, version=_DEFAULT_CONFIG.version,
                    description=f"{fmt}, longest side {max_side} px",
                    max_side=int(max_side), image_format=fmt,
                    jpeg_quality=int(jpeg_quality))


# Reads one split from the manual directory: (src, split) -> (records, report),
# the contract of fgtbt_jax.data.readers.read_dataset.
ReadSplit = Callable[[pathlib.Path, str], tuple[Sequence[FaceRecord], object]]


@dataclasses.dataclass
class SplitStats:
  """What one split's build wrote and skipped."""

  records: int = 0
  written: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped_examples: list[str] = dataclasses.field(default_factory=list)
  read_report: object = None


class FaceCropBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder: reads a dataset's records and stores loose face crops.

  Subclasses set `PROTOCOL`. The dataset files are read from the manual
  directory (or annotation file) with fgtbt_jax.data.readers
  (`source_format` None detects the format; `image_root` overrides where
  images are), or with `read_split(src, split) -> (records, report)` when
  given. `on_error` applies to the reader and to images that fail to load ("skip"
  counts them in `split_stats`); `num_threads` threads decode, crop and encode
  images (OpenCV releases the GIL).
  """

  PROTOCOL = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Loose face crops with landmarks, boxes and transforms."}
  BUILDER_CONFIGS = [_DEFAULT_CONFIG]
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, source_format: str | None = None, image_root: str | None = None,
               read_split: ReadSplit | None = None, splits: Sequence[str] = SPLITS,
               on_error: str = "raise", num_threads: int = 4, synthetic: bool = False,
               source: str | os.PathLike | None = None, convention: str = "project",
               authors_crop_size: int = AUTHORS_CROP_SIZE, reader_options=None, **kwargs):
    self._synthetic = bool(synthetic)  # _info() may run inside the base constructor.
    # Faces without annotations (the folder reader's option; in the metadata).
    self._unlabeled = bool((reader_options or {}).get("unlabeled", False))
    self._source_format = source_format  # Also recorded in the metadata.
    self._convention = convention  # The readers' (fgtbt_jax.data.readers.common.CONVENTIONS).
    if int(authors_crop_size) < 32:
      raise ValueError(f"authors_crop_size must be at least 32 px, got {authors_crop_size}")
    self._authors_crop_size = int(authors_crop_size)
    # The folder or annotation file to read (TFDS's manual_dir must be a
    # folder: an annotation file's own folder is passed there).
    self._source = source
    super().__init__(**kwargs)
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
      raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits}")
    self._image_root = image_root
    self._reader_options = dict(reader_options or {})
    self._read_split = read_split or self._read_with_readers
    self._splits = tuple(splits)
    self._on_error = on_error
    self._num_threads = max(1, int(num_threads))
    self.split_stats: dict[str, SplitStats] = {}

  # TFDS looks for a checksums file beside the builder's source through
  # `importlib_resources`, an optional etils dependency that is not installed;
  # these builders download nothing, so they have no code path to look in.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and
  # "... downloaded and prepared" to stdout; nothing is downloaded here, so
  # say what happens instead, in the log.
  def _log_download_bytes(self) -> None:
    logging.info("converting %s to face crops in %s", self.PROTOCOL, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("%s converted to %s", self.PROTOCOL, self.data_dir)

  @property
  def protocol(self) -> lm.Protocol:
    return lm.get_protocol(self.PROTOCOL)

  def _info(self) -> tfds.core.DatasetInfo:
    n = self.protocol.num_landmarks
    cfg = self.builder_config
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3),
                                     encoding_format=cfg.image_format),
        "landmarks": tfds.features.Tensor(shape=(n, 2), dtype=np.float32),
        "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "scale": tfds.features.Scalar(dtype=np.float32),
        "box_size": tfds.features.Scalar(dtype=np.float32),
        "original_to_crop": tfds.features.Tensor(shape=(2, 3), dtype=np.float64),
        "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "point_flags": tfds.features.FeaturesDict({
            name: tfds.features.Tensor(shape=(None,), dtype=np.bool_)
            for name in datasets.get(self.PROTOCOL).point_flags}),
        "subsets": tfds.features.FeaturesDict({
            name: tfds.features.Scalar(dtype=np.bool_)
            for name in datasets.get(self.PROTOCOL).subsets}),
        "image_name": tfds.features.Text(),
        "source": tfds.features.Text(),
    })
    metadata = tfds.core.MetadataDict(
        protocol=self.PROTOCOL, loose_crop_factor=LOOSE_CROP_FACTOR,
        max_side=cfg.max_side, image_format=cfg.image_format,
        jpeg_quality=cfg.jpeg_quality, synthetic=getattr(self, "_synthetic", False),
        convention=getattr(self, "_convention", "project"),
        source=_source_key(getattr(self, "_source", None)),
        format=getattr(self, "_source_format", None) or "",
        **({UNLABELED_KEY: True} if getattr(self, "_unlabeled", False) else {}),
        **({} if lm.is_benchmark(self.PROTOCOL) else {"scheme": {
            "name": self.PROTOCOL,
            "points": [lm.POINT_NAMES[u] for u in self.protocol.unified_index.tolist()]}}),
        **({"authors_crops": {"size": self._authors_crop_size,
                              "splits": [s for s in getattr(self, "_splits", SPLITS)
                                         if s != "train"]}}
           if getattr(self, "_convention", "project") == "authors" else {}))
    return tfds.core.DatasetInfo(
        builder=self, features=features, metadata=metadata,
        description=f"{self.PROTOCOL} faces as loose crops for FGTBT "
                    f"({self.protocol.num_landmarks} landmarks).",
        # Keep the annotation files' order (evaluation lists follow it); the
        # training pipeline shuffles on its own.
        disable_shuffling=True)

  def _read_with_readers(self, src: pathlib.Path, split: str):
    from fgtbt_jax.data import readers  # pylint: disable=g-import-not-at-top
    return readers.read_dataset(self.PROTOCOL, os.fspath(src), split,
                                fmt=self._source_format, on_error=self._on_error,
                                image_root=self._image_root, convention=self._convention,
                                options=self._reader_options)

  def _split_generators(self, dl_manager):
    src = pathlib.Path(self._source if self._source is not None else dl_manager.manual_dir)
    generators = {}
    for split in self._splits:
      records, report = self._read_split(src, split)
      stats = SplitStats(records=len(records), read_report=report)
      self.split_stats[split] = stats
      if not records:
        raise DataError(f"{src} ({self.PROTOCOL} {split})", "no samples to convert",
                        "empty_split")
      generators[split] = self._generate_examples(records, split, stats)
    return generators

  def _generate_examples(self, records: Sequence[FaceRecord], split: str,
                         stats: SplitStats):
    authors_size = (self._authors_crop_size
                    if self._convention == "authors" and split != "train" else 0)
    convert = functools.partial(_try_example, cfg=self.builder_config,
                                protocol=self.protocol, on_error=self._on_error,
                                authors_crop_size=authors_size)
    for index, (example, error) in enumerate(
        _ordered_thread_map(convert, records, self._num_threads)):
      if error is not None:
        stats.skipped[error.kind] += 1
        if len(stats.skipped_examples) < 10:
          stats.skipped_examples.append(str(error))
        continue
      stats.written += 1
      yield index, example
    if stats.written == 0:
      raise DataError(f"{self.PROTOCOL} {split}", f"all {stats.records} samples "
                      f"failed to convert; first: {stats.skipped_examples[0]}",
                      "empty_split")
    self.info.metadata[f"{split}_conversion"] = {
        "records": stats.records, "written": stats.written,
        "skipped": dict(stats.skipped)}


def _ordered_thread_map(fn, items: Sequence, num_threads: int) -> Iterator:
  """fn over items on a thread pool, in order, holding a bounded window."""
  if num_threads <= 1:
    yield from map(fn, items)
    return
  window = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for item in items:
      window.append(pool.submit(fn, item))
      if len(window) >= 4 * num_threads:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


def _try_example(record: FaceRecord, cfg: CropConfig, protocol: lm.Protocol,
                 on_error: str, authors_crop_size: int = 0
                 ) -> tuple[dict | None, DataError | None]:
  try:
    return face_example(record, cfg, protocol, authors_crop_size), None
  except DataError as error:
    if on_error == "raise":
      raise
    return None, error


# When a face is degenerate: the points or the box mostly off the image, a
# point farther off than the image's own size, an HRNet crop the image covers
# less than MIN_CROP_COVERAGE of, or one more than MAX_SCALE_TO_IMAGE times
# the image's longest side. A face that fills its photo keeps about 100%
# coverage, and one half out over a corner about 25%.
MIN_INSIDE_FRACTION = 0.5
MIN_CROP_COVERAGE = 0.2
MAX_SCALE_TO_IMAGE = 4.0


def check_geometry(record: FaceRecord, center: np.ndarray, scale: float,
                   image_shape: tuple[int, int], where: str) -> None:
  """Raises DataError (kinds below) when the face's geometry would make a garbage crop.

  Kinds: "point_far_outside", "points_outside", "box_outside",
  "scale_too_large", "crop_mostly_padding". The converter counts them under
  its skip/raise policy like any bad sample. A face without any finite
  point (an unlabeled folder's) has only its box and crop checked.
  """
  h, w = image_shape
  points = np.asarray(record.landmarks, np.float64)
  if np.isfinite(points).any():
    _check_points_on_image(points, w, h, where)

  def covered(x1, y1, x2, y2) -> float:
    """The fraction of a rectangle that lies on the image."""
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    ix = max(min(x2, w - 0.5) - max(x1, -0.5), 0.0)
    iy = max(min(y2, h - 0.5) - max(y1, -0.5), 0.0)
    return ix * iy / area if area > 0 else 0.0

  box = np.asarray(record.box, np.float64)
  if covered(*box) < MIN_INSIDE_FRACTION:
    raise DataError(where, f"the face box {np.round(box, 1).tolist()} lies mostly off the "
                    f"{w}x{h} image", "box_outside")
  side = crop.SCALE_UNIT * scale
  if side > MAX_SCALE_TO_IMAGE * max(h, w):
    raise DataError(where, f"scale {scale:g} makes a {side:.0f} px crop, more than "
                    f"{MAX_SCALE_TO_IMAGE:g}x the {w}x{h} image", "scale_too_large")
  coverage = covered(center[0] - side / 2, center[1] - side / 2,
                     center[0] + side / 2, center[1] + side / 2)
  if coverage < MIN_CROP_COVERAGE:
    raise DataError(where, f"the image covers only {coverage:.0%} of the face crop "
                    f"(centre {np.round(center, 1).tolist()}, scale {scale:g})",
                    "crop_mostly_padding")


def _check_points_on_image(points: np.ndarray, w: int, h: int, where: str) -> None:
  """`check_geometry`'s checks of the points: none far off, most on the image."""
  far = ((points[:, 0] < -w) | (points[:, 0] > 2 * w) |
         (points[:, 1] < -h) | (points[:, 1] > 2 * h))
  if far.any():
    i = int(np.flatnonzero(far)[0])
    raise DataError(where, f"point {i} at {np.round(points[i], 1).tolist()} lies farther "
                    f"outside the {w}x{h} image than its own size", "point_far_outside")
  inside = ((points[:, 0] >= -0.5) & (points[:, 0] <= w - 0.5) &
            (points[:, 1] >= -0.5) & (points[:, 1] <= h - 0.5))
  if inside.mean() < MIN_INSIDE_FRACTION:
    raise DataError(where, f"only {int(inside.sum())} of {len(points)} points lie on the "
                    f"{w}x{h} image", "points_outside")


def face_example(record: FaceRecord, cfg: CropConfig, protocol: lm.Protocol,
                 authors_crop_size: int = 0) -> dict:
  """One stored example for `record`: the loose crop and its annotations.

  With `authors_crop_size` S > 0 the image is the authors' test crop at S
  px (PNG) in place of the loose crop, annotated in their nominal crop
  frame (see the module docstring).

  Raises:
    DataError: naming `record.source`, when the image does not load or the
      annotations do not fit the protocol.
  """
  where = record.source or record.image_name or "<record>"
  n = protocol.num_landmarks
  if record.landmarks.shape != (n, 2):
    raise DataError(where, f"{protocol.name} needs {n} landmarks, got shape "
                    f"{record.landmarks.shape}", "field_count")
  scale = float(record.scale)
  center = np.asarray(record.center, np.float64)
  if not (np.isfinite(scale) and scale > 0 and np.isfinite(center).all()):
    raise DataError(where, f"invalid crop centre {center.tolist()} or scale {scale}",
                    "bad_box")
  spec = datasets.get(protocol.name)
  unknown = set(record.subsets) - set(spec.subsets)
  if unknown:
    raise DataError(where, f"unknown {protocol.name} subsets {sorted(unknown)}; "
                    f"known: {spec.subsets}", "invalid")
  flags = {}
  for name, values in record.point_flags.items():
    if name not in spec.point_flags:
      raise DataError(where, f"unknown {protocol.name} point flag {name!r}; "
                      f"known: {spec.point_flags}", "invalid")
    values = np.asarray(values).reshape(-1)
    if values.shape != (n,):
      raise DataError(where, f"point flag {name!r} has {values.size} values, "
                      f"expected {n}", "field_count")
    flags[name] = values.astype(bool)

  image = images.load_image(record.image, where=where, strict=True)
  check_geometry(record, center, scale, image.shape[:2], where)
  if authors_crop_size:
    out_size = int(authors_crop_size)
    side_px = crop.CROP_ENLARGE * crop.SCALE_UNIT * scale
    to_crop = crop.face_crop_affine(center, scale, out_size)
    try:
      crop_image, _ = crop.authors_crop(image, center, scale * crop.CROP_ENLARGE, out_size)
    except ValueError as e:
      raise DataError(where, str(e), "bad_box") from e
    encoded = images.encode_image(crop_image, "png")
  else:
    side_px = LOOSE_CROP_FACTOR * crop.SCALE_UNIT * scale
    out_size = int(min(cfg.max_side, max(16, round(side_px))))
    to_crop = crop.crop_affine(center, scale, out_size, extra_scale=LOOSE_CROP_FACTOR)
    # The whole image is area-averaged, as for every conversion so far, so that
    # stored crops stay bit-identical (the region-only variant differs by a
    # grey level or two).
    crop_image = crop.warp_to_crop(image, to_crop, out_size, whole_image=True)
    encoded = images.encode_image(crop_image, cfg.image_format, cfg.jpeg_quality)

  factor = out_size / side_px  # Stored-crop pixels per original pixel.
  x1, y1, x2, y2 = np.asarray(record.box, np.float64)
  box_size = (float(record.box_size) if record.box_size is not None
              else float(np.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0))))
  corners = crop.apply_affine(np.array([[x1, y1], [x2, y2]]), to_crop)
  return {
      "image": encoded,
      "landmarks": crop.apply_affine(record.landmarks.astype(np.float64),
                                     to_crop).astype(np.float32),
      "box": corners.reshape(4).astype(np.float32),
      "center": crop.apply_affine(center[None], to_crop)[0].astype(np.float32),
      "scale": np.float32(scale * factor),
      "box_size": np.float32(box_size * factor),
      "original_to_crop": to_crop,
      "original_size": np.asarray(image.shape[:2], np.int32),
      "point_flags": {name: flags.get(name, np.zeros((0,), bool))
                      for name in spec.point_flags},
      "subsets": {name: name in record.subsets for name in spec.subsets},
      "image_name": record.image_name,
      "source": record.source,
  }


def _benchmark_builder(class_name: str, protocol: str, doc: str) -> type[FaceCropBuilder]:
  """The builder class `class_name` of a benchmark, registered with TFDS under
  its builder name (`datasets.get(protocol).builder_name`)."""
  return types.new_class(class_name, (FaceCropBuilder,), {}, lambda ns: ns.update(
      name=datasets.get(protocol).builder_name, PROTOCOL=protocol, __doc__=doc,
      __module__=__name__, __qualname__=class_name))


FgtbtWflw = _benchmark_builder("FgtbtWflw", "WFLW", "WFLW, 98 landmarks, six attribute subsets.")
Fgtbt300w = _benchmark_builder("Fgtbt300w", "300W",
                               "300W, 68 landmarks, common/challenging test subsets.")
FgtbtCofw = _benchmark_builder("FgtbtCofw", "COFW", "COFW, 29 landmarks with occlusion flags.")
FgtbtAflw = _benchmark_builder("FgtbtAflw", "AFLW",
                               "AFLW, 19 landmarks with visibility flags, frontal test subset.")


BUILDERS: Mapping[str, type[FaceCropBuilder]] = {
    b.PROTOCOL: b for b in (FgtbtWflw, Fgtbt300w, FgtbtCofw, FgtbtAflw)}


_OWN_BUILDERS: dict[tuple[str, str], type[FaceCropBuilder]] = {}


def builder_class(dataset: str) -> type[FaceCropBuilder]:
  """The builder class of a dataset named like a protocol (case-insensitive):
  a benchmark's, or one made for an own dataset whose scheme is registered
  (`fgtbt_jax.data.schemes`; not in TFDS's registry)."""
  name = lm.get_protocol(dataset).name
  if name in BUILDERS:
    return BUILDERS[name]
  key = (name, datasets.get(name).builder_name)
  if key not in _OWN_BUILDERS:
    _OWN_BUILDERS[key] = types.new_class(
        "FgtbtOwn", (FaceCropBuilder,), {"skip_registration": True},
        lambda ns: ns.update(name=key[1], PROTOCOL=name,
                             __doc__=f"{name}: a user's own folder of faces."))
  return _OWN_BUILDERS[key]


def _builder_folder(dataset: str) -> tuple[str, str]:
  """(shown name, builder folder name) of a benchmark or an own dataset
  (which needs no registered scheme here: its folder is its name's)."""
  if lm.is_benchmark(dataset):
    name = lm.get_protocol(dataset).name
    return name, datasets.get(name).builder_name
  return str(dataset), datasets.own_builder_name(dataset)


def converted_dir(data_dir: str | os.PathLike, dataset: str, config_name: str = "") -> pathlib.Path:
  """The version directory of a converted dataset under `data_dir`.

  `config_name` "" picks the only crop config converted; several converted
  configs must be told apart by name.

  Raises:
    FileNotFoundError: nothing converted there, with the command that does it.
  """
  protocol, builder_name = _builder_folder(dataset)
  root = pathlib.Path(data_dir) / builder_name
  own = "" if lm.is_benchmark(dataset) else " --format folder --scheme 300W|points.json"
  hint = (f"convert it with `python -m data_pipelines.convert --dataset "
          f"{protocol.lower()}{own} --src DIR --out {data_dir}`")
  # TFDS keeps its own bookkeeping in hidden folders (".config").
  configs = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
  if config_name:
    if config_name not in configs:
      raise FileNotFoundError(f"{root / config_name}: no converted {protocol} data "
                              f"with crop config {config_name!r} (found {configs}); {hint}")
  elif len(configs) == 1:
    config_name = configs[0]
  elif not configs:
    raise FileNotFoundError(f"{root}: no converted {protocol} data; {hint}")
  else:
    raise ValueError(f"{root}: several crop configs converted {configs}; "
                     "choose one with data.crop_config")
  versions = sorted((p for p in (root / config_name).iterdir()
                     if (p / "dataset_info.json").is_file()),
                    key=lambda p: tfds.core.Version(p.name))
  if not versions:
    raise FileNotFoundError(f"{root / config_name}: no finished conversion "
                            f"(dataset_info.json missing); {hint}")
  return versions[-1]


def conversion_metadata(data_dir: str | os.PathLike, dataset: str,
                        config_name: str = "") -> dict:
  """A converted dataset's metadata.json ({} for a conversion that has none)."""
  path = converted_dir(data_dir, dataset, config_name) / "metadata.json"
  try:
    metadata = json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable conversion metadata: {e}") from e
  if not isinstance(metadata, dict):
    raise ValueError(f"{path}: unreadable conversion metadata: not a JSON object")
  return metadata


def is_synthetic(data_dir: str | os.PathLike, dataset: str, config_name: str = "") -> bool:
  """Whether the converted `dataset` under `data_dir` is generated synthetic data."""
  return bool(conversion_metadata(data_dir, dataset, config_name).get("synthetic", False))


# The metadata key marking a conversion of faces without annotations.
UNLABELED_KEY = "unlabeled"


def is_unlabeled(data_dir: str | os.PathLike, dataset: str, config_name: str = "") -> bool:
  """Whether the converted `dataset` under `data_dir` is an unlabeled folder
  (faces without landmarks: trained on with all masks zero, never evaluated)."""
  return bool(conversion_metadata(data_dir, dataset, config_name).get(UNLABELED_KEY, False))


# What converted data is (`data_kind`): generated stand-in faces, a benchmark
# read from its published files, or a user's own folder of faces.
DATA_SYNTHETIC = "synthetic"
DATA_BENCHMARK = "benchmark"
DATA_OWN_FOLDER = "own folder"
DATA_UNLABELED_FOLDER = "unlabeled folder"


def data_kind(data_dir: str | os.PathLike, dataset: str, config_name: str = "") -> str:
  """What the converted `dataset` under `data_dir` is: `DATA_SYNTHETIC`,
  `DATA_UNLABELED_FOLDER` (faces without annotations), `DATA_OWN_FOLDER`
  (read with the folder format, under any name) or `DATA_BENCHMARK`
  (conversions made before the format was recorded are the benchmark's)."""
  metadata = conversion_metadata(data_dir, dataset, config_name)
  if metadata.get("synthetic", False):
    return DATA_SYNTHETIC
  if metadata.get(UNLABELED_KEY, False):
    return DATA_UNLABELED_FOLDER
  if metadata.get("format") == datasets.FOLDER or not lm.is_benchmark(dataset):
    return DATA_OWN_FOLDER
  return DATA_BENCHMARK


def conversion_convention(data_dir: str | os.PathLike, dataset: str,
                          config_name: str = "") -> str:
  """The readers' convention a converted dataset was made with ("project" before it was recorded)."""
  return str(conversion_metadata(data_dir, dataset, config_name).get("convention", "project"))


def authors_crop_size(data_dir: str | os.PathLike, dataset: str, split: str,
                      config_name: str = "") -> int:
  """The side of the authors' test crops a converted split stores (0: loose crops)."""
  held = conversion_metadata(data_dir, dataset, config_name).get("authors_crops") or {}
  return int(held.get("size", 0)) if split in held.get("splits", ()) else 0


def _source_key(src) -> str:
  """How a conversion records its source: the resolved path ("" when unknown)."""
  return os.fspath(pathlib.Path(src).resolve()) if src is not None else ""


def conversion_source(data_dir: str | os.PathLike, dataset: str, config_name: str = "") -> str:
  """The source folder or file a converted dataset was made from ("" before it was recorded)."""
  return str(conversion_metadata(data_dir, dataset, config_name).get("source", ""))


def converted_splits(data_dir: str | os.PathLike, dataset: str, config_name: str = "") -> list[str]:
  """The split names a converted dataset holds (from its dataset_info.json)."""
  path = converted_dir(data_dir, dataset, config_name) / "dataset_info.json"
  try:
    return [split["name"] for split in json.loads(path.read_text()).get("splits", [])]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: unreadable conversion metadata: {e}") from e


def open_split(data_dir: str | os.PathLike, dataset: str, split: str,
               config_name: str = "", decode_image: bool = False):
  """Random-access source of a converted split (a grain-compatible data source).

  With `decode_image=False` the "image" feature stays encoded bytes.
  """
  path = converted_dir(data_dir, dataset, config_name)
  builder = tfds.builder_from_directory(os.fspath(path))
  if split not in builder.info.splits:
    raise FileNotFoundError(
        f"{path}: no {split!r} split converted (it holds {list(builder.info.splits)}); "
        f"convert it with `python -m data_pipelines.convert --dataset "
        f"{lm.get_protocol(dataset).name.lower()} --src DIR --out {data_dir} --splits "
        f"{','.join(sorted(set(builder.info.splits) | {split}))}`")
  files = _check_split_files(path, lm.get_protocol(dataset).name, builder.info.splits[split])
  decoders = None if decode_image else {"image": tfds.decode.SkipDecoding()}
  return SplitSource(builder.as_data_source(split, decoders=decoders), files,
                     lm.get_protocol(dataset).name)


def _damaged(path: str, dataset: str, reason: str) -> DataError:
  return DataError(path, f"converted {dataset} data file is damaged or cut short ({reason}); "
                   f"convert {dataset} again with --overwrite", "corrupt_file")


def _check_split_files(path: pathlib.Path, dataset: str, split_info) -> list[str]:
  """The split's ArrayRecord files, each opened and its record count checked.

  Raises:
    DataError: naming the first file that is missing, unreadable or holds
      another number of records than dataset_info.json says.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  files = [os.fspath(f) for f in split_info.filepaths]
  for file, expected in zip(files, split_info.shard_lengths):
    if not os.path.isfile(file):
      raise DataError(file, f"converted {dataset} data file is missing (listed in "
                      f"{path / 'dataset_info.json'}); convert {dataset} again with "
                      "--overwrite", "corrupt_file")
    try:
      reader = array_record_module.ArrayRecordReader(file)
      count = reader.num_records()
      reader.close()
    except (RuntimeError, OSError, ValueError) as e:
      raise _damaged(file, dataset, " ".join(str(e).split())) from None
    if count != expected:
      raise _damaged(file, dataset, f"it holds {count} records, dataset_info.json "
                     f"says {expected}")
  return files


class SplitSource:
  """A converted split's random-access source (what `as_data_source` gives) whose
  read errors name the split's files (a record damaged inside a file)."""

  def __init__(self, source, files: Sequence[str], dataset: str):
    self._source = source
    self.files = list(files)
    self.dataset = dataset

  def __len__(self) -> int:
    return len(self._source)

  def _error(self, index, error: Exception) -> DataError:
    return _damaged(", ".join(self.files), self.dataset,
                    f"record {index}: {' '.join(str(error).split())}")

  def __getitem__(self, index):
    try:
      return self._source[index]
    except RuntimeError as e:
      raise self._error(index, e) from None

  def __getitems__(self, indices):
    try:
      return self._source.__getitems__(indices)
    except RuntimeError as e:
      raise self._error(list(indices)[:3], e) from None

  def __getattr__(self, name):
    if name.startswith("__") or name in ("_source", "files", "dataset"):
      raise AttributeError(name)
    return getattr(self._source, name)

  def __repr__(self) -> str:
    return f"SplitSource({self.files})"


def build(dataset: str, src: str | os.PathLike, out_dir: str | os.PathLike, *,
          source_format: str | None = None, image_root: str | None = None,
          read_split: ReadSplit | None = None, splits: Sequence[str] = SPLITS,
          config: CropConfig | None = None, on_error: str = "raise", num_threads: int = 4,
          overwrite: bool = False, synthetic: bool = False,
          convention: str = "project",
          authors_crop_size: int = AUTHORS_CROP_SIZE, reader_options=None) -> FaceCropBuilder:
  """Builds one dataset from `src` (a folder or annotation file) into ArrayRecord files.

  An existing finished conversion that holds every split asked for is kept
  unless `overwrite`; one that lacks some (an earlier `splits=("train",)`)
  is rebuilt with its splits and the new ones. Returns the builder; its
  `split_stats` say what was written and skipped (empty when the conversion
  existed already). `synthetic` marks generated stand-in data in the
  metadata (`is_synthetic`), so reports never put the paper's benchmark
  numbers beside results on it. `convention` is the readers' ("project" or
  "authors", recorded in the metadata: `conversion_convention`); an existing
  conversion made with the other one is refused unless `overwrite`. With
  "authors", test splits store the authors' crops at `authors_crop_size`.

  One conversion at a time writes a dataset's crop config (a lock file in
  `out_dir/<builder>/`); temporary folders that a killed conversion left
  there (`incomplete.*`) are removed first. A conversion that fails leaves
  no folder or file it created: the builder folder with its lock and TFDS's
  `.config/`, TFDS's empty `downloads/`, and `out_dir` itself when it made
  them (`reader_options`: the reader's, `readers.read_dataset`'s `options`).

  Raises:
    DataError: `out_dir` (or a folder in it) is a file, or another
      conversion holds the lock.
  """
  cls = builder_class(dataset)
  config = config or _DEFAULT_CONFIG
  out_dir = pathlib.Path(out_dir)
  root = out_dir / datasets.get(cls.PROTOCOL).builder_name
  for folder in (out_dir, root, root / config.name):
    if folder.exists() and not folder.is_dir():
      raise DataError(os.fspath(folder), "is a file, not a folder; choose another --out",
                      "bad_output")
  # What this conversion creates, removed again when it fails.
  made = [p for p in (out_dir, out_dir / _TFDS_DOWNLOADS, root) if not p.exists()]
  root.mkdir(parents=True, exist_ok=True)
  try:
    return _build_locked(cls, src, out_dir, root, source_format=source_format,
                         image_root=image_root, read_split=read_split, splits=splits,
                         config=config, on_error=on_error, num_threads=num_threads,
                         overwrite=overwrite, synthetic=synthetic, convention=convention,
                         authors_crop_size=authors_crop_size, reader_options=reader_options)
  except BaseException:
    _remove_created(out_dir, root, made)
    raise


# TFDS's download folder beside the builders (empty: nothing is downloaded).
_TFDS_DOWNLOADS = "downloads"


def _remove_created(out_dir: pathlib.Path, root: pathlib.Path,
                    made: Sequence[pathlib.Path]) -> None:
  """Removes what a failed conversion created (`made`: those of `out_dir`,
  its TFDS `downloads/` and the builder folder `root` that did not exist):
  the builder folder with its lock and `.config/` (nothing in it finished),
  `downloads/` when it holds no file, `out_dir` when left empty."""
  downloads = out_dir / _TFDS_DOWNLOADS
  if root in made:
    shutil.rmtree(root, ignore_errors=True)
  if downloads in made and downloads.is_dir() and not any(
      p.is_file() for p in downloads.rglob("*")):
    shutil.rmtree(downloads, ignore_errors=True)
  if out_dir in made and out_dir.is_dir() and not any(out_dir.iterdir()):
    out_dir.rmdir()


def _build_locked(cls, src, out_dir, root, *, source_format, image_root, read_split,
                  splits, config, on_error, num_threads, overwrite, synthetic, convention,
                  authors_crop_size, reader_options) -> FaceCropBuilder:
  with _ConversionLock(root / f".{config.name}.lock"):
    _remove_incomplete(root / config.name)
    splits = tuple(splits)
    if not overwrite:
      try:
        existing = converted_splits(out_dir, cls.PROTOCOL, config.name)
      except FileNotFoundError:
        existing = None
      if existing is not None:
        held = conversion_convention(out_dir, cls.PROTOCOL, config.name)
        if held != convention:
          raise DataError(os.fspath(converted_dir(out_dir, cls.PROTOCOL, config.name)),
                          f"converted with convention {held!r}, not {convention!r}; convert "
                          "into another --out, or pass --overwrite to replace it",
                          "convention")
        held_unlabeled = is_unlabeled(out_dir, cls.PROTOCOL, config.name)
        wanted_unlabeled = bool((reader_options or {}).get("unlabeled", False))
        if held_unlabeled != wanted_unlabeled:
          raise DataError(os.fspath(converted_dir(out_dir, cls.PROTOCOL, config.name)),
                          f"converted as {'un' if held_unlabeled else ''}labeled faces, not "
                          f"{'un' if wanted_unlabeled else ''}labeled; convert into another "
                          "--out or under another name, or pass --overwrite to replace it",
                          "unlabeled")
      held_source = (conversion_source(out_dir, cls.PROTOCOL, config.name)
                     if existing is not None else "")
      if held_source and held_source != _source_key(src):
        raise DataError(os.fspath(converted_dir(out_dir, cls.PROTOCOL, config.name)),
                        f"converted from {held_source}, not {_source_key(src)}; convert "
                        "into another --out, or pass --overwrite to replace it", "source")
      if existing is not None and not set(splits) <= set(existing):
        wanted = [s for s in SPLITS if s in set(existing) | set(splits)]
        logging.warning("%s: the conversion in %s holds splits %s, not %s; converting %s",
                        cls.PROTOCOL, root / config.name, existing,
                        [s for s in splits if s not in existing], wanted)
        splits, overwrite = tuple(wanted), True
    builder = cls(data_dir=os.fspath(out_dir), config=config,
                  source_format=source_format, image_root=image_root,
                  read_split=read_split, splits=splits,
                  on_error=on_error, num_threads=num_threads, synthetic=synthetic,
                  source=src, convention=convention, authors_crop_size=authors_crop_size,
                  reader_options=reader_options, file_format="array_record")
    src = pathlib.Path(src)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(src.parent if src.is_file() else src), download_mode=mode,
          try_download_gcs=False))
    except Exception as e:  # pylint: disable=broad-except
      # The half-written copy goes at once (on a full disk it holds the space);
      # a finished conversion beside it is untouched.
      _remove_incomplete(root / config.name)
      if not errors.is_disk_full(e) or isinstance(e, OSError):
        raise
      raise OSError(errno.ENOSPC, f"the disk is full; nothing of this conversion was kept "
                    f"(free space and convert again)", os.fspath(root / config.name)) from None
  return builder


class _ConversionLock:
  """An exclusive `flock` on a file: one conversion of a dataset config at a time.

  The kernel drops the lock when its holder dies, so a killed conversion
  never blocks the next one.
  """

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._file = None

  def __enter__(self) -> "_ConversionLock":
    self._file = open(self.path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.close()
      raise DataError(os.fspath(self.path.parent), "another conversion of this dataset is "
                      f"writing here (lock {self.path}); wait for it to finish",
                      "busy") from None
    return self

  def __exit__(self, *exc) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def _remove_incomplete(config_dir: pathlib.Path) -> None:
  """Deletes the `incomplete.*` folders a killed conversion left (the lock is held)."""
  if not config_dir.is_dir():
    return
  for leftover in sorted(config_dir.glob("incomplete.*")):
    if leftover.is_dir():
      logging.warning("removing %s, left by an interrupted conversion", leftover)
      shutil.rmtree(leftover, ignore_errors=True)
