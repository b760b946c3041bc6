"""The run directory: config.json's upgrade and overrides, default workdir and checkpoint."""

import json

import pytest

from configs import tiny
from fgtbt_jax import errors
from fgtbt_jax import rundir


def _saved(tmp_path, edit) -> None:
  saved = json.loads(tiny.get_config().to_json_best_effort())
  edit(saved)
  (tmp_path / "config.json").write_text(json.dumps(saved))


def test_every_upgrade_names_a_declared_field_or_section():
  declared = rundir.flat_config(tiny.get_config())
  for key in rundir.UPGRADES:
    assert key in declared or any(name.startswith(key + ".") for name in declared), key


def test_the_upgrade_fills_old_fields_drops_retired_ones_and_overrides_come_after(tmp_path):
  def edit(saved):
    del saved["train"]["ema_bias_correction"], saved["eval"]["coordinates"]
    del saved["loss"]["target_rounding"], saved["predict"]["max_faces"]
    saved["loss"]["rounded_targets"] = True
  _saved(tmp_path, edit)
  config = rundir.load_run_config(tmp_path, {"predict.max_faces": 2, "eval.flip_test": False})
  assert (config.train.ema_bias_correction, config.eval.coordinates) == (False, "project")
  assert config.loss.target_rounding == "nearest" and "rounded_targets" not in config.loss
  assert config.predict.max_faces == 2 and not config.eval.flip_test
  # A field the saved config has keeps its value: nothing is upgraded twice.
  assert config.predict.batch_size == tiny.get_config().predict.batch_size
  with pytest.raises(errors.ConfigError, match="predict.no_such_field: the run's config"):
    rundir.load_run_config(tmp_path, {"predict.no_such_field": 1})


def test_a_field_no_upgrade_fills_is_named_against_the_declared_config(tmp_path):
  _saved(tmp_path, lambda saved: saved["data"].pop("datasets"))
  rundir.load_run_config(tmp_path)  # Read as it is without a declared config.
  with pytest.raises(rundir.WorkdirError, match="lacks the config fields data.datasets, which"):
    rundir.load_run_config(tmp_path, declared=tiny.get_config())


def test_default_workdir_and_eval_checkpoint(tmp_path):
  assert rundir.default_workdir("configs/default.py", tmp_path) == tmp_path / "runs" / "default"
  assert (rundir.default_workdir("configs/ablations.py:base=default,head=hih", tmp_path)
          == tmp_path / "runs" / "ablations_base=default,head=hih")
  checkpoints = tmp_path / "checkpoints"
  (checkpoints / "best_WFLW" / "3").mkdir(parents=True)
  assert rundir.default_eval_checkpoint(tmp_path) == "best"  # An import: best models only.
  (checkpoints / "latest" / "4").mkdir(parents=True)
  assert rundir.default_eval_checkpoint(tmp_path) == "latest"
