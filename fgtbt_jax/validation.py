"""Config checks before any work starts: `validate_config(config)`.

Every check names the key and the value it rejects (`errors.ConfigError`),
so a run that cannot work stops at start, not after compiling or hours in.
"""

from __future__ import annotations

import re

import jax
import ml_collections

from fgtbt_jax.data import config as data_config
from fgtbt_jax.data import datasets
from fgtbt_jax.deploy.predict_files import config_errors, validate_predict_config
from fgtbt_jax import heatmaps
from fgtbt_jax import inference
from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax import studies
from fgtbt_jax.errors import ConfigError
from fgtbt_jax.inference import PredictSettings

__all__ = ["ConfigError", "validate_config", "validate_predict_config"]


def _check_eval(eval_config: ml_collections.ConfigDict) -> None:
  if eval_config.decoder not in heatmaps.ALL_DECODERS:
    raise ConfigError(f"eval.decoder must be one of {heatmaps.ALL_DECODERS}, "
                      f"got {eval_config.decoder!r}")
  if eval_config.coordinates not in inference.COORDINATES:
    raise ConfigError(f"eval.coordinates must be one of {inference.COORDINATES}, got "
                      f"{eval_config.coordinates!r}")
  with config_errors("eval.smoothing_sigma"):
    PredictSettings.from_config(eval_config)
  if not 0 < eval_config.failure_threshold <= 1:
    raise ConfigError(f"eval.failure_threshold must be in (0, 1], got "
                      f"{eval_config.failure_threshold}")
  with config_errors("eval.studies"):
    studies.check_studies(eval_config.studies)
  sides = tuple(eval_config.lowres_sides)
  if not sides or any(int(s) != s or s < 1 for s in sides):
    raise ConfigError(f"eval.lowres_sides must be positive face sides in pixels, got {sides}")
  if eval_config.study_max_batches < 0:
    raise ConfigError(f"eval.study_max_batches must be >= 0 (0 = the whole split), got "
                      f"{eval_config.study_max_batches}")


def _check_data(data: ml_collections.ConfigDict) -> None:
  for key in ("flip_prob", "rotation_prob"):
    if not 0.0 <= data[key] <= 1.0:
      raise ConfigError(f"data.{key} must be a probability in [0, 1], got {data[key]}")
  if data.rotation_deg < 0:
    raise ConfigError(f"data.rotation_deg must be >= 0, got {data.rotation_deg}")
  scale = tuple(data.scale_range)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
    raise ConfigError(f"data.scale_range must be (low, high) with 0 < low <= high, got {scale}")
  if not data.crop_enlarge > 0:
    raise ConfigError(f"data.crop_enlarge must be positive, got {data.crop_enlarge}")
  if data.num_workers < 0:
    raise ConfigError(f"data.num_workers must be >= 0 (0 = in-process), got {data.num_workers}")
  for key in ("worker_buffer_size", "read_threads", "prefetch_buffer_size"):
    if data[key] < 1:
      raise ConfigError(f"data.{key} must be at least 1, got {data[key]}")
  for key in ("train_split", "eval_split"):
    if not str(data[key]):
      raise ConfigError(f"data.{key} must name a split, got {data[key]!r}")
  data_config.check_labeled_fraction(data.labeled_fraction)


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    process_count: int | None = None) -> None:
  """Checks the config before any work starts; raises ConfigError naming the key.

  Args:
    config: the full experiment config.
    num_devices: global device count (default: jax.device_count()).
    process_count: number of processes (default: jax.process_count()).
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  opt, train, data = config.optimizer, config.train, config.data
  with config_errors():
    models.validate_model_config(config.model)
  if not opt.learning_rate > 0:
    raise ConfigError(f"optimizer.learning_rate must be positive, got {opt.learning_rate}")
  if opt.weight_decay < 0:
    raise ConfigError(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
  if opt.grad_clip_norm < 0:
    raise ConfigError(f"optimizer.grad_clip_norm must be >= 0 (0 = off), got {opt.grad_clip_norm}")
  if not 0 < opt.lr_decay_factor <= 1:
    raise ConfigError(f"optimizer.lr_decay_factor must be in (0, 1], got {opt.lr_decay_factor}")
  if opt.warmup_steps < 0:
    raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
  if list(opt.lr_decay_steps) != sorted(opt.lr_decay_steps) or any(
      s <= 0 for s in opt.lr_decay_steps):
    raise ConfigError(f"optimizer.lr_decay_steps must be increasing positive steps, "
                      f"got {tuple(opt.lr_decay_steps)}")
  with config_errors():
    losses.LossConfig.from_config(config.loss, landmarks.num_dataset_ids(config.data.datasets))
  for key in ("steps", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints"):
    if train[key] < 1:
      raise ConfigError(f"train.{key} must be at least 1, got {train[key]}")
  if train.freeze_batch_norm_after_step < 0:
    raise ConfigError(f"train.freeze_batch_norm_after_step must be >= 0 (0 = never), got "
                      f"{train.freeze_batch_norm_after_step}")
  if not train.ema_half_life_images > 0:
    raise ConfigError(f"train.ema_half_life_images must be positive, got {train.ema_half_life_images}")
  _validate_lowres(config)
  _validate_sht(config)
  if config.model.input_size != data.image_size:
    raise ConfigError(f"data.image_size ({data.image_size}) must equal model.input_size "
                      f"({config.model.input_size})")
  # A name other than a benchmark's is a user's own converted dataset: its
  # conversion is looked up under data.data_dir by the data preparation.
  unknown = [d for d in data.datasets if d not in landmarks.PROTOCOL_NAMES and (
      landmarks.is_benchmark(d) or not re.fullmatch(landmarks.USER_NAME_PATTERN, str(d)))]
  if unknown or not data.datasets:
    raise ConfigError(f"data.datasets must be a non-empty list of {landmarks.PROTOCOL_NAMES} "
                      f"and names of your own converted datasets, got {tuple(data.datasets)}")
  repeated = sorted({d for d in data.datasets if list(data.datasets).count(d) > 1})
  if repeated:
    raise ConfigError(f"data.datasets names {', '.join(repeated)} more than once "
                      f"({tuple(data.datasets)}); each dataset is one task of the batch: raise "
                      "data.samples_per_dataset for more of its samples")
  _check_data(data)
  if data.samples_per_dataset < 1:
    raise ConfigError(f"data.samples_per_dataset must be at least 1, got {data.samples_per_dataset}")
  if data.samples_per_dataset % process_count:
    raise ConfigError(
        f"data.samples_per_dataset ({data.samples_per_dataset}) must divide by the number of "
        f"processes ({process_count}): each process feeds the same share of every dataset")
  global_batch = data.samples_per_dataset * len(data.datasets)
  if global_batch % num_devices:
    raise ConfigError(
        f"the global batch (data.samples_per_dataset {data.samples_per_dataset} x "
        f"{len(data.datasets)} datasets = {global_batch}) must divide by the number of "
        f"devices ({num_devices})")
  if data.eval_batch_size < 1 or data.eval_batch_size % num_devices:
    raise ConfigError(f"data.eval_batch_size ({data.eval_batch_size}) must be a positive "
                      f"multiple of the number of devices ({num_devices})")
  with config_errors():
    sharding.mesh_shape(config.mesh, num_devices)
  _check_eval(config.eval)
  validate_predict_config(config)
  head = models.heads.get_head(config.model.head)
  if config.eval.decoder not in head.decoders:
    raise ConfigError(f"eval.decoder {config.eval.decoder!r} needs outputs that model.head "
                      f"{config.model.head!r} does not have; its decoders are {head.decoders}")
  if config.model.head == "hih" and config.loss.target_rounding == "authors":
    raise ConfigError("loss.target_rounding 'authors' (trunc(x + 1) centres) has no decimal "
                      "offset for model.head 'hih': use 'none' or 'nearest'")
  if config.eval.decoder == "hih_subpixel" and config.model.hih_decimal_size < 3:
    raise ConfigError(f"eval.decoder 'hih_subpixel' fits a 3x3 stencil: model.hih_decimal_size "
                      f"must be >= 3, got {config.model.hih_decimal_size}")
  for entry in config.eval.best_on_subsets:
    dataset, _, subset = str(entry).partition(":")
    if dataset not in data.datasets or subset not in datasets.get(dataset).subsets:
      raise ConfigError(
          f"eval.best_on_subsets: {entry!r} is not 'DATASET:subset' with a dataset of "
          f"{tuple(data.datasets)} and one of its subsets"
          + (f" {datasets.get(dataset).subsets}" if dataset in data.datasets else ""))
  normalizer = config.eval.failure_normalizer
  lacking = [d for d in data.datasets
             if normalizer and normalizer not in landmarks.get_protocol(d).normalizers]
  if lacking:
    raise ConfigError(f"eval.failure_normalizer {normalizer!r} is not a normaliser of "
                      f"{lacking}; every dataset has 'inter_pupil'")
  if not data.eval_pad_last_batch and (num_devices > 1 or process_count > 1):
    raise ConfigError(
        f"data.eval_pad_last_batch=False needs one device and one process (here "
        f"{num_devices} devices, {process_count} processes): a last batch of any size "
        "cannot be split over several")
  if not str(data.data_dir):
    raise ConfigError("data.data_dir is required: the directory of converted datasets "
                      "(see data_pipelines/convert.py)")


def _validate_lowres(config: ml_collections.ConfigDict) -> None:
  """The low-resolution training mode: factors that divide the input, a probability."""
  lowres, size = config.lowres, int(config.data.image_size)
  for factor in lowres.factors:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2 or size % factor:
      raise ConfigError(f"lowres.factors: {factor!r} must be an integer >= 2 dividing "
                        f"data.image_size ({size}); got {tuple(lowres.factors)}")
  if not 0.0 <= lowres.probability <= 1.0:
    raise ConfigError(f"lowres.probability must be in [0, 1], got {lowres.probability}")
  if config.model.hallucination and not lowres.factors and config.model.input_downsample == 1:
    raise ConfigError("model.hallucination (DHLN) learns low- to high-resolution faces: set "
                      "lowres.factors too, e.g. --config.lowres.factors='(2, 4, 8)', or run "
                      "the network on a reduced crop (model.input_downsample, SHT-M)")


def _validate_sht(config: ml_collections.ConfigDict) -> None:
  """SHT's pose transfer: DHLN on, a transfer size that fits the input and FPTN."""
  sht, size = config.sht, int(config.data.image_size)
  if not sht.enabled:
    return
  if not config.model.hallucination:
    raise ConfigError("sht.enabled transfers DHLN's hallucinated faces: set "
                      "model.hallucination=True (and lowres.factors), e.g. with "
                      "configs/ablations.py:dhln=on")
  side = sht.transfer_size
  if isinstance(side, bool) or not isinstance(side, int) or side < 8 or side % 8 or size % side:
    raise ConfigError(f"sht.transfer_size ({side!r}) must be a multiple of 8 that divides "
                      f"data.image_size ({size})")
  for key in ("generator_channels", "generator_blocks", "discriminator_channels"):
    if not isinstance(sht[key], int) or isinstance(sht[key], bool) or sht[key] < 1:
      raise ConfigError(f"sht.{key} must be a positive integer, got {sht[key]!r}")
  for key in ("learning_rate", "adversarial_weight", "l1_weight", "max_rotation"):
    if not sht[key] >= 0:
      raise ConfigError(f"sht.{key} must be >= 0, got {sht[key]!r}")
  scale = tuple(sht.scale_range)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
    raise ConfigError(f"sht.scale_range must be (low, high) with 0 < low <= high, got {scale}")
