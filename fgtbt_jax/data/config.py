"""Defaults of the input pipelines: `data_config()` declares every field.

The training config nests this under `config.data`; override fields from the
command line, e.g. `--config.data.num_workers=4 --config.data.data_dir=DIR`.
"""

from __future__ import annotations

import ml_collections

from fgtbt_jax import crop
from fgtbt_jax import landmarks
from fgtbt_jax.errors import ConfigError


def data_config() -> ml_collections.ConfigDict:
  """The data pipeline config with the paper's augmentation (FGTBT §4.1)."""
  c = ml_collections.ConfigDict()
  # Root of the converted datasets (python -m data_pipelines.convert --out).
  c.data_dir = ""
  # Crop config folder to read ("jpeg95_512"); "" = the only one converted.
  c.crop_config = ""
  # Datasets mixed into every batch, in batch order.
  c.datasets = tuple(landmarks.PROTOCOL_NAMES)
  c.train_split = "train"
  c.eval_split = "test"
  # Network input side S (the paper uses 480).
  c.image_size = 480
  # k: samples of each dataset in every global batch (paper: 2, batch 8).
  c.samples_per_dataset = 2
  # Crop: the face box (HRNet scale) enlarged by crop_enlarge.
  c.crop_enlarge = crop.CROP_ENLARGE
  # Augmentation (SPEC 4): crop side x U(scale_range); rotation U(+-rotation_deg)
  # on rotation_prob of samples; horizontal flip on flip_prob.
  c.scale_range = (1.0, 1.25)
  c.rotation_deg = 30.0
  c.rotation_prob = 0.6
  c.flip_prob = 0.5
  # Decode JPEGs at 1/2, 1/4 or 1/8 size when the crop shrinks that much.
  c.reduced_decode = True
  # Shuffle and augmentation seed (per dataset and process seeds derive from it).
  c.seed = 0
  # The share, in (0, 1], of each dataset's train examples that keep their
  # landmarks: round(labeled_fraction * n) of them, chosen per example from
  # `seed` and the dataset's name; the others reach the batch with an
  # all-zero mask (faces without landmarks: no heatmap loss). Eval splits
  # keep every annotation. 1.0: every annotation is used.
  c.labeled_fraction = 1.0
  # Worker processes producing batches (grain mp_prefetch); 0 = in-process.
  c.num_workers = 2
  # Batches each worker process keeps ready.
  c.worker_buffer_size = 2
  # Threads per process reading and augmenting (OpenCV releases the GIL).
  c.read_threads = 4
  # Batches the reading threads prefetch.
  c.prefetch_buffer_size = 8
  # Global evaluation batch size (split over processes, padded with valid=False).
  c.eval_batch_size = 16
  # False: the last eval batch holds only its real faces (the authors' batches,
  # for a model whose outputs depend on its batch-mates; one device only).
  c.eval_pad_last_batch = True
  return c


def check_labeled_fraction(value) -> float:
  """`data.labeled_fraction` as a float in (0, 1] (the pipeline's check; light
  enough for config validation to call).

  Raises:
    ConfigError: naming the key, for a value that is not a number in (0, 1]
      (a bool, a string, None, NaN, 0 or less, more than 1).
  """
  try:
    fraction = float(value)
  except (TypeError, ValueError):
    fraction = None
  if isinstance(value, bool) or fraction is None or not 0.0 < fraction <= 1.0:
    raise ConfigError(f"data.labeled_fraction must be a number in (0, 1] (the share of each "
                      f"dataset's train examples that keep their landmarks), got {value!r}")
  return fraction
