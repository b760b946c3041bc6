"""Tiny smoke-test config: 64x64 inputs, the "tiny" model, a few steps.

  python run.py --config=configs/tiny.py --workdir=runs/tiny

Used by the test suite (which points data.data_dir at a few synthetic faces)
and for checking an installation quickly. Trains on synthetic data generated
into data/synthetic_tiny on first use.
"""

import pathlib

import ml_collections

from configs import fgtbt_paper
from fgtbt_jax import models

_REPO = pathlib.Path(__file__).resolve().parent.parent


def get_config() -> ml_collections.ConfigDict:
  config = fgtbt_paper.get_config()
  # The grouped depthwise convolution: at this size the shifted form (the CPU
  # default) gains little per step and costs about 30% more compile time,
  # which dominates the suite's short runs.
  config.model.update(models.model_config("tiny", depthwise_impl="conv"))
  config.data.data_dir = str(_REPO / "data" / "synthetic_tiny")
  config.data.samples_per_dataset = 2
  config.data.eval_batch_size = 8
  config.data.num_workers = 0
  config.data.read_threads = 2
  config.data.prefetch_buffer_size = 2
  config.synthetic_data.generate = True
  config.synthetic_data.sizes = ml_collections.ConfigDict(
      {name: (8, 8) for name in ("WFLW", "300W", "COFW", "AFLW")})
  config.loss.sigma = 1.5
  config.loss.dwa_window = 2
  config.optimizer.learning_rate = 1e-3
  config.optimizer.lr_decay_steps = (3,)
  config.train.steps = 4
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.train.eval_every = 4
  config.train.ema_half_life_images = 64.0
  config.eval.decoder = "subpixel"
  config.sht.transfer_size = 32
  config.sht.generator_channels = 8
  config.sht.generator_blocks = 2
  config.sht.discriminator_channels = 8
  return config
