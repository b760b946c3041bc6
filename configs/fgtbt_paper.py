"""The FGTBT paper setup (Information Sciences 2026, section 4.1).

Launch (after converting the four datasets into DATA, see
data_pipelines/convert.py):

  python run.py --config=configs/fgtbt_paper.py --workdir=runs/fgtbt_paper \
      --config.data.data_dir=DATA

480x480 input, the paper network (mit_b4 widths with depths 3/6/18/3,
conv-stem patch embeddings, FGSA with the FFT high-pass at sigma 20), the
FMB-loss (Adaptive Wing, beta 0.9), k = 2 samples of each dataset per step
(batch 8), AdamW lr 2.5e-4 x0.8 at 40k/70k/90k steps, 100k steps, EMA with a
half-life of 10,000 images (decay 0.5 ** (8 / 10000) per step), evaluation of
the EMA model with the flip test and plain argmax decoding.

Memory: with `--config.model.remat_policy=segments` the step at batch 8
needs 4.75 GiB in bfloat16 and 6.36 GiB in float32 by XLA:CPU's memory
analysis (everything kept: 25.2 and 26.5 GiB); benchmarks/README.md,
"Memory budget". The default "auto" (none on CPU, dots_no_attention on
GPU/TPU) is not yet measured on a GPU; compiled for TPU v5e:2x2 in bfloat16
(`fgtbt aot --config=configs/fgtbt_paper.py --topology=v5e:2x2
--config.model.dtype=bfloat16`) it needs 2.89 GiB per chip at batch 8 (2 per
chip) and moves 5.2 GB of HBM traffic per image (benchmarks/README.md,
"Compiled for TPU").

This file declares every field of the experiment config; the other configs
start from it and change values only.
"""

import ml_collections

from fgtbt_jax.data.config import data_config
from fgtbt_jax import models


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = models.model_config("paper")

  config.data = data_config()
  # Required: the --out folder of python -m data_pipelines.convert.
  config.data.data_dir = ""
  # One fact, two readers: the pipeline crops to the model's input size.
  config.data.image_size = config.model.get_ref("input_size")
  config.data.samples_per_dataset = 2
  config.data.eval_batch_size = 16

  # Synthetic stand-in datasets, generated and converted into data.data_dir
  # on first use when `generate` is True (the embedded default run).
  config.synthetic_data = ml_collections.ConfigDict()
  config.synthetic_data.generate = False
  config.synthetic_data.sizes = ml_collections.ConfigDict(
      {"WFLW": (500, 100), "300W": (500, 100), "COFW": (300, 100), "AFLW": (500, 100)})
  config.synthetic_data.seed = 0
  config.synthetic_data.image_size = 256

  # FMB-loss (paper section 3.2).
  config.loss = ml_collections.ConfigDict()
  config.loss.balancer = "fmb"       # fmb | uniform | dwa | uncertainty
  config.loss.beta = 0.9             # FMB: weight (1 - beta) / (1 - beta ** C(p))
  config.loss.awing_omega = 14.0
  config.loss.awing_theta = 0.5
  config.loss.awing_alpha = 2.1
  config.loss.awing_epsilon = 1.0
  config.loss.weight_threshold = 0.2  # W = scale * [maxpool3x3(y) >= threshold] + 1
  config.loss.weight_scale = 10.0
  config.loss.sigma = 3.0             # target Gaussian, heatmap pixels
  # Target centres: none (exact) | nearest (integer) | authors (trunc(x + 1)).
  config.loss.target_rounding = "none"
  # The "hih" head's decimal maps (model.head): their Gaussian's sigma in
  # decimal cells and their loss's weight next to the integer heatmaps'.
  # Per map the decimal loss is about 6x the heatmap loss at the start and
  # stays high; at weight 1 it swamped the shared trunk on the synthetic
  # benchmark (NME above the mean-shape baseline), 0.1 trains (docs/model.md, "Landmark heads").
  config.loss.hih_decimal_sigma = 1.0
  config.loss.hih_decimal_weight = 0.1
  # SHT's DHLN (model.hallucination): weights of the L1 and gradient-map L1
  # between the hallucinated and the high-resolution face, both in [0, 1]
  # images, next to the FMB-loss.
  config.loss.hallucination_l1_weight = 1.0
  config.loss.hallucination_gradient_weight = 1.0
  config.loss.dwa_temperature = 2.0
  config.loss.dwa_window = 1000       # steps per DWA loss window

  # AdamW with PyTorch's defaults and the paper's step decay.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2.5e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.01
  config.optimizer.lr_decay_steps = (40_000, 70_000, 90_000)
  config.optimizer.lr_decay_factor = 0.8
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0  # 0 = no clipping

  config.train = ml_collections.ConfigDict()
  config.train.steps = 100_000
  config.train.log_every = 100
  config.train.checkpoint_every = 2_000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 10_000
  config.train.resume = True
  # A run's workdir whose latest EMA model starts this run (a fresh start
  # only): variables of the same name and shape are copied, the rest keep
  # their initialisation, the optimizer starts fresh (train.initialize_from).
  # "" = none.
  config.train.init_from = ""
  # Resume even though the batch, datasets, input geometry, model or loss
  # differ from the saved config (train.resume_changes).
  config.train.resume_with_changes = False
  # EMA decay per step = 0.5 ** (images per step / half-life).
  config.train.ema_half_life_images = 10_000.0
  # Bias-corrected EMA (as Adam's moments): the average of the weights seen
  # so far, without the initial weights' share (which a plain average keeps,
  # 0.5 ** (images / half-life): all of a short run's evaluated model).
  config.train.ema_bias_correction = True
  # From this step on the forward runs in eval mode (BatchNorm on its frozen
  # running statistics, dropout and stochastic depth off), as the FGTBT
  # authors' model did from step 500; 0 = never.
  config.train.freeze_batch_norm_after_step = 0
  # Fail on implicit host<->device transfers inside the step.
  config.train.transfer_guard = True

  # Low-resolution training (SHT): each training face is, with `probability`,
  # area-downsampled by a factor drawn from `factors` and bilinearly upsampled
  # back to the input size on device; the high-resolution crop is DHLN's
  # hallucination target. () = off.
  config.lowres = ml_collections.ConfigDict()
  config.lowres.factors = ()
  config.lowres.probability = 1.0

  # SHT's weak supervision by pose transfer (needs model.hallucination, and so
  # lowres.factors): each face gets a second view (rotated, scaled, on device),
  # both go through the network, and FPTN (models.fptn) redraws each view's
  # hallucinated face in the other view's pose (the network's own heatmaps),
  # trained against the other high-resolution view with L1 and two
  # discriminators. The transfer reaches the network without annotations, so
  # faces without them (mask all zero) train it too. Off by default.
  config.sht = ml_collections.ConfigDict()
  config.sht.enabled = False
  config.sht.transfer_size = 120        # side of FPTN's faces and heatmaps: input / an integer
  config.sht.generator_channels = 32
  config.sht.generator_blocks = 3
  config.sht.discriminator_channels = 64
  config.sht.learning_rate = 2e-4       # Adam (b1 0.5, b2 0.999, optimizer.eps) of FPTN's G and Ds
  config.sht.adversarial_weight = 0.05  # SHT's lambda1
  config.sht.l1_weight = 1.0            # lambda2 (SHT: 0.01 next to a summed heatmap L2)
  config.sht.max_rotation = 30.0        # the second view: rotation in (-30, 30) degrees,
  config.sht.scale_range = (0.8, 1.2)   # scale in (0.8, 1.2)

  config.eval = ml_collections.ConfigDict()
  config.eval.decoder = "argmax"     # argmax (paper) | quarter | subpixel
  config.eval.smoothing_sigma = 0.0  # subpixel only: blur before the fit
  config.eval.flip_test = True
  config.eval.failure_threshold = 0.1
  # The FGTBT authors' evaluation, to reproduce their numbers with their weights
  # (off by default; docs/inference.md): "authors" maps heatmap cell k to
  # c + (k - 121) h / 240 and quantises the ground truth the same way.
  config.eval.coordinates = "project"  # project | authors
  # FR from this normaliser's NME ("" = each dataset's default; the authors
  # report FR@0.1 from "inter_pupil" for every dataset).
  config.eval.failure_normalizer = ""
  # The best checkpoint of a "DATASET:subset" entry is the one with the lowest
  # NME on that subset (the authors': "300W:challenging"); else the full split.
  config.eval.best_on_subsets = ()
  # Report studies of `run.py eval` (fgtbt_jax/studies.py): "lowres", "quantization".
  config.eval.studies = ()
  config.eval.lowres_sides = (16, 32, 64, 128)  # face box sides of the lowres study, px
  config.eval.study_max_batches = 0  # test batches per dataset and study pass; 0 = all

  # `run.py predict` (and `fgtbt export`): read from the run's
  # config.json, overridden from the command line, e.g.
  # `run.py predict --workdir=W --image=x.jpg --config.predict.max_faces=1`.
  # Decoding (decoder, flip test, smoothing) is the run's eval section's.
  config.predict = ml_collections.ConfigDict()
  config.predict.dataset = ""          # whose best checkpoint; "" = data.datasets[0]
  # auto | dlib_cnn | dlib_hog | haar_cascade. auto, chosen by the table in
  # docs/inference.md ("Which detector"): still images dlib_cnn (weights from
  # face_recognition_models), else dlib_hog; video frames dlib_hog; without
  # dlib the Haar cascade; a fallback logs the package to install.
  config.predict.detector = "auto"
  # The detector's box calibration: real (photographs) | synthetic (the
  # project's rendered faces) | "scale,shift_x,shift_y" (fgtbt calibrate-detector).
  config.predict.box_adjustment = "real"
  config.predict.max_faces = 0         # the largest detected faces per image or frame; 0 = all
  # Faces whose mean point confidence is below this are flagged low_quality
  # (docs/inference.md, "Face quality"); in videos such a face's track ends.
  # -inf flags none, +inf every face.
  config.predict.min_face_confidence = 0.6
  config.predict.batch_size = 8        # faces per device batch
  config.predict.protocol = "unified"  # points written: unified (124) | WFLW | 300W | COFW | AFLW
  # Videos: the detector runs every detect_every frames (the landmarks carry
  # the boxes between); One Euro smoothing of the landmarks across frames
  # (cut-off in Hz of a still face, lower smooths more; its rise per face
  # side per second of speed, higher lags less).
  config.predict.detect_every = 10
  config.predict.video_smoothing = True
  config.predict.one_euro_min_cutoff = 1.0
  config.predict.one_euro_beta = 10.0

  # Device mesh ("data", "fsdp"); -1 = all remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.logical_axis_rules = models.logical_axis_rules("data")

  # Multi-host start-up; empty values fall back to JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES and JAX_PROCESS_ID. auto_detect: let JAX read a
  # cluster environment (Cloud TPU, SLURM, ...).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  config.distributed.auto_detect = False
  return config
