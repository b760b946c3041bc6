"""The config files: paper values, ablations, validation and flag handling."""

import pathlib

from absl import flags
from ml_collections import config_flags
import ml_collections
import pytest

from configs import ablations
from configs import default
from configs import fgtbt_authors
from configs import fgtbt_paper
from configs import tiny
from fgtbt_jax.data import prepare
from fgtbt_jax import validation
from fgtbt_jax import errors
from fgtbt_jax import state as state_lib
from fgtbt_jax import train

REPO = pathlib.Path(__file__).resolve().parent.parent


def _valid(config):
  validation.validate_config(config, num_devices=8, process_count=1)


def test_paper_config_matches_the_paper():
  c = fgtbt_paper.get_config()
  assert c.model.variant == "paper" and c.model.input_size == 480 == c.data.image_size
  assert c.model.patch_embed == "conv_stem" and c.model.fgsa
  assert c.model.frequency_extractor == "fft" and c.model.frequency_sigma == 20.0
  assert (c.loss.balancer, c.loss.beta, c.loss.sigma) == ("fmb", 0.9, 3.0)
  assert (c.loss.awing_omega, c.loss.awing_theta, c.loss.awing_alpha,
          c.loss.awing_epsilon) == (14.0, 0.5, 2.1, 1.0)
  assert c.data.samples_per_dataset == 2 and len(c.data.datasets) == 4
  o = c.optimizer
  assert (o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay) == (2.5e-4, 0.9, 0.999, 1e-8, 0.01)
  assert tuple(o.lr_decay_steps) == (40_000, 70_000, 90_000) and o.lr_decay_factor == 0.8
  assert c.train.steps == 100_000
  assert state_lib.ema_decay_per_step(c) == pytest.approx(0.5 ** (8 / 10000), rel=1e-12)
  assert c.eval.flip_test and c.eval.decoder == "argmax"
  c.data.data_dir = "/converted"
  _valid(c)


def test_authors_config_is_the_recipe_their_code_ran():
  c = fgtbt_authors.get_config()
  paper = fgtbt_paper.get_config()
  assert c.model.fgsa_compat == "authors" and c.model.batch_norm_unbiased_variance
  assert tuple(c.data.datasets) == ("COFW", "WFLW", "300W", "AFLW")
  assert c.data.samples_per_dataset == 1 and tuple(c.data.scale_range) == (0.75, 1.25)
  assert state_lib.ema_decay_per_step(c) == pytest.approx(0.5 ** (4 / 10000), rel=1e-12)
  assert c.loss.target_rounding == "authors" and c.train.freeze_batch_norm_after_step == 500
  # Their plain EMA from the initial weights; every other config corrects it.
  assert not c.train.ema_bias_correction and tiny.get_config().train.ema_bias_correction
  assert (c.eval.coordinates, c.eval.failure_normalizer) == ("authors", "inter_pupil")
  assert tuple(c.eval.best_on_subsets) == ("300W:challenging",)
  assert c.data.eval_batch_size == 8 and not c.data.eval_pad_last_batch
  # Everything else is the paper's.
  assert c.optimizer.to_dict() == paper.optimizer.to_dict() and c.train.steps == paper.train.steps
  c.data.data_dir = "/converted"
  validation.validate_config(c, num_devices=1, process_count=1)
  with pytest.raises(errors.ConfigError, match="eval_pad_last_batch=False needs one device"):
    validation.validate_config(c, num_devices=2, process_count=1)
  c.eval.best_on_subsets = ("300W:ibug",)
  with pytest.raises(errors.ConfigError, match=r"eval.best_on_subsets: '300W:ibug' is not "
                                               r"'DATASET:subset'.*\('common', 'challenging'\)"):
    validation.validate_config(c, num_devices=1, process_count=1)


def test_paper_config_requires_a_data_dir():
  with pytest.raises(errors.ConfigError, match="data.data_dir is required"):
    _valid(fgtbt_paper.get_config())


def test_default_and_tiny_configs_are_valid_and_small():
  for module in (default, tiny):
    c = module.get_config()
    _valid(c)
    assert c.synthetic_data.generate and c.data.image_size == c.model.input_size <= 128
    assert pathlib.Path(c.data.data_dir).is_relative_to(REPO / "data")


@pytest.mark.parametrize("study", ablations.STUDIES)
def test_every_ablation_study_builds_a_valid_config(study):
  c = ablations.get_config(study)
  c.data.data_dir = "/converted"
  _valid(c)


def test_ablations_set_what_they_name():
  assert ablations.get_config("beta=0.3").loss.beta == 0.3
  assert ablations.get_config("balancer=dwa").loss.balancer == "dwa"
  assert ablations.get_config("frequency=srm").model.frequency_extractor == "srm"
  both = ablations.get_config("fgsa=off,fmb=off")
  assert not both.model.fgsa and both.loss.balancer == "uniform"
  assert ablations.get_config("base=default,fgsa=off").model.variant == "tiny"
  for bad, message in (("beta=x", "not a number"), ("color=red", "unknown setting 'color'"),
                       ("balancer=gradnorm", "expected one of"), ("fgsa", "not key=value")):
    with pytest.raises(ValueError, match=message):
      ablations.get_config(bad)


@pytest.mark.parametrize("study", ["head=hih", "head=recurrent", "base=default,head=hih",
                                   "base=default,head=recurrent"])
def test_head_ablations_parse_validate_and_build(study):
  from fgtbt_jax import models
  c = ablations.get_config(study)
  c.data.data_dir = "/converted"
  _valid(c)
  head = study.rpartition("=")[2]
  assert c.model.head == head
  assert c.model.variant == ("tiny" if study.startswith("base=default") else "paper")
  assert c.eval.decoder in models.heads.get_head(head).decoders
  model = models.build_model(c.model)
  if c.model.variant == "tiny":  # Abstract variables of the paper model take a while.
    params = models.abstract_variables(model, c.model.input_size)["params"]["decoder"]
    assert {"hih": "decimal_head", "recurrent": "refine"}[head] in params


@pytest.mark.parametrize("key,value,message", [
    ("optimizer.learning_rate", -1e-3, "optimizer.learning_rate must be positive"),
    ("loss.beta", 1.0, r"loss.beta must be in \[0, 1\)"),
    ("loss.balancer", "gradnorm", "unknown balancer 'gradnorm'"),
    ("train.steps", 0, "train.steps must be at least 1"),
    ("optimizer.lr_decay_steps", (300, 100), "lr_decay_steps must be increasing"),
    ("eval.decoder", "softargmax", "eval.decoder must be one of"),
    ("mesh.fsdp", 3, "does not cover the 8 devices"),
    # Other names are own datasets (looked up under data.data_dir when the run starts).
    ("data.datasets", ("WFLW", "my faces"), "data.datasets must be a non-empty list"),
    ("data.datasets", ("WFLW", "COFW", "WFLW", "AFLW"), "data.datasets names WFLW more than once"),
    ("data.flip_prob", 2.0, r"data.flip_prob must be a probability in \[0, 1\], got 2.0"),
    ("data.rotation_prob", -1.0, "data.rotation_prob must be a probability"),
    ("data.num_workers", -3, "data.num_workers must be >= 0"),
    ("data.scale_range", (1.25, 1.0), "data.scale_range must be"),
    ("data.read_threads", 0, "data.read_threads must be at least 1"),
    ("optimizer.warmup_steps", -10, "optimizer.warmup_steps must be >= 0"),
    ("model.variant", "foo", "variant='foo'; expected one of"),
    ("model.variant", "b4", "variant='b4' is the b4 encoder, but encoder='tiny'"),
    ("predict.detector", "mtcnn", "predict.detector must be one of"),
    ("predict.box_adjustment", "1,2", "predict.box_adjustment: box adjustment '1,2'"),
    ("predict.max_faces", -1, "predict.max_faces must be >= 0"),
    ("predict.batch_size", 0, "predict.batch_size must be at least 1"),
    ("predict.min_face_confidence", float("nan"), "predict.min_face_confidence must be a number"),
    ("predict.protocol", "HELEN", "predict.protocol: "),
    ("predict.one_euro_beta", -1.0, "predict.one_euro_"),
])
def test_validation_names_the_bad_key(key, value, message):
  c = tiny.get_config()
  c.update_from_flattened_dict({key: value})
  with pytest.raises(errors.ConfigError, match=message):
    _valid(c)


def test_batch_must_divide_by_devices_and_processes():
  c = tiny.get_config()  # k = 2, 4 datasets: global batch 8
  validation.validate_config(c, num_devices=4, process_count=2)
  with pytest.raises(errors.ConfigError, match=r"global batch .* = 8\) must divide by the number "
                                              r"of devices \(3\)"):
    validation.validate_config(c, num_devices=3, process_count=1)
  with pytest.raises(errors.ConfigError, match="must divide by the number of processes"):
    validation.validate_config(c, num_devices=8, process_count=4)
  # The config files tie data.image_size to model.input_size by reference;
  # a config read back from JSON has two plain values that can disagree.
  c = ml_collections.ConfigDict(c.to_dict())
  c.model.input_size = 96
  with pytest.raises(errors.ConfigError, match="must equal model.input_size"):
    _valid(c)


def test_missing_data_paths_are_reported(tmp_path):
  c = tiny.get_config()
  c.synthetic_data.generate = False
  c.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(errors.ConfigError, match="nowhere.* is not a directory"):
    prepare.prepare_data(c.data, c.synthetic_data)
  c.data.data_dir = str(tmp_path)
  with pytest.raises(errors.ConfigError, match="no converted WFLW data"):
    prepare.prepare_data(c.data, c.synthetic_data)


def _parse(argv):
  values = flags.FlagValues()
  # Overrides are registered from the argv seen at definition time.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                  lock_config=True, sys_argv=["prog"] + argv)
  values(["prog"] + argv)
  return values.config


def test_command_line_overrides_and_unknown_keys():
  tiny_path = str(REPO / "configs" / "tiny.py")
  config = _parse([f"--config={tiny_path}", "--config.train.steps=7",
                   "--config.loss.beta=0.5"])
  assert config.train.steps == 7 and config.loss.beta == 0.5
  with pytest.raises((flags.Error, AttributeError), match="stepz"):
    _parse([f"--config={tiny_path}", "--config.train.stepz=7"])
  with pytest.raises(OSError, match="no_such_config.py"):
    _parse([f"--config={REPO / 'configs' / 'no_such_config.py'}"]).keys()
  ablation = _parse([f"--config={REPO / 'configs' / 'ablations.py'}:beta=0.3"])
  assert ablation.loss.beta == 0.3
