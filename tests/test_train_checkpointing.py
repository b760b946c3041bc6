"""Checkpointer: state + data iterator together, retention, best models, mismatches."""

import json

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fgtbt_jax import checkpointing
from fgtbt_jax import rundir
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)


def _state(value: float, width: int = 3):
  return {"step": jnp.int32(value), "params": {"w": jnp.full((width,), value, jnp.float32)},
          "opt": ({"mu": jnp.zeros((width,))},)}


def _iterator():
  return iter(grain.MapDataset.range(1000).seed(3).shuffle().to_iter_dataset())


def _checkpointer(path, **kwargs):
  options = dict(datasets=["WFLW", "COFW"], max_to_keep=2, save_interval_steps=2)
  options.update(kwargs)
  return checkpointing.Checkpointer(path, **options)


def test_state_and_data_position_are_restored_together(tmp_path):
  iterator = _iterator()
  seen = [next(iterator) for _ in range(5)]
  checkpoints = _checkpointer(tmp_path)
  assert checkpoints.save(4, _state(4.0), iterator)
  following = [next(iterator) for _ in range(4)]
  checkpoints.close()

  fresh = _iterator()
  restored, step = _checkpointer(tmp_path).restore(
      checkpointing.abstract_like(_state(0.0)), fresh)
  assert step == 4 and int(restored["step"]) == 4
  np.testing.assert_array_equal(restored["params"]["w"], np.full(3, 4.0))
  assert [next(fresh) for _ in range(4)] == following
  assert seen[0] != following[0]


def test_interval_retention_and_forced_saves(tmp_path):
  checkpoints = _checkpointer(tmp_path)
  iterator = _iterator()
  started = [checkpoints.save(step, _state(float(step)), iterator) for step in (1, 2, 3, 4, 6)]
  assert started == [False, True, False, True, True]
  assert checkpoints.save(7, _state(7.0), iterator, force=True)
  assert not checkpoints.save(7, _state(7.0), iterator, force=True)  # already saved
  checkpoints.wait_until_finished()
  assert checkpoints.latest_step() == 7
  kept = sorted(int(p.name) for p in (tmp_path / "latest").iterdir() if p.name.isdigit())
  assert kept == [6, 7]
  checkpoints.close()


def test_best_models_are_kept_per_dataset(tmp_path):
  checkpoints = _checkpointer(tmp_path)
  variables = lambda v: {"params": {"w": jnp.full((3,), v)}}
  assert checkpoints.save_best(10, variables(1.0), {"WFLW": 0.08, "COFW": 0.09}) == ["WFLW", "COFW"]
  assert checkpoints.save_best(20, variables(2.0), {"WFLW": 0.06, "COFW": 0.10}) == ["WFLW"]
  assert checkpoints.save_best(30, variables(3.0), {"WFLW": 0.07, "300W": 0.01}) == []
  checkpoints.wait_until_finished()
  assert checkpoints.best_nme("WFLW") == pytest.approx(0.06)
  assert checkpoints.best_step("COFW") == 10
  restored, step = checkpoints.restore_best("WFLW", checkpointing.abstract_like(variables(0.0)))
  assert step == 20
  np.testing.assert_array_equal(restored["params"]["w"], np.full(3, 2.0))
  assert [p.name for p in (tmp_path / "best_WFLW").iterdir() if p.name.isdigit()] == ["20"]
  with pytest.raises(KeyError, match="no best-checkpoint slot for dataset '300W'"):
    checkpoints.restore_best("300W", variables(0.0))
  checkpoints.close()


def test_incompatible_targets_are_named_before_restoring(tmp_path):
  checkpoints = _checkpointer(tmp_path)
  checkpoints.save(2, _state(2.0), None, force=True)
  checkpoints.wait_until_finished()
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"1 entries differ in shape \(first: opt/0/mu, checkpoint \(3,\) vs "
                           r"config \(5,\)\)"):
    wider = _state(0.0, width=5)
    wider["params"]["w"] = jnp.zeros(3)
    checkpoints.restore(checkpointing.abstract_like(wider))
  renamed = _state(0.0)
  renamed["params"] = {"v": renamed["params"]["w"]}
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match="not in it \\(first: params/v\\).*not in the configured state "
                           "\\(first: params/w\\)"):
    checkpoints.restore(checkpointing.abstract_like(renamed))
  checkpoints.close()


def test_describe_mismatch_treats_attributes_and_keys_alike():
  import collections
  Pair = collections.namedtuple("Pair", ["mu", "nu"])
  saved = {"opt": {"mu": jax.ShapeDtypeStruct((2,), jnp.float32),
                   "nu": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  target = {"opt": Pair(jnp.zeros(2), jnp.zeros(2))}
  assert checkpointing.describe_mismatch(saved, target) is None


def test_missing_checkpoints(tmp_path):
  checkpoints = _checkpointer(tmp_path)
  assert checkpoints.latest_step() is None and checkpoints.best_nme("WFLW") is None
  with pytest.raises(FileNotFoundError, match="no train-state checkpoint"):
    checkpoints.restore(checkpointing.abstract_like(_state(0.0)))
  with pytest.raises(FileNotFoundError, match="no best checkpoint for WFLW"):
    checkpoints.restore_best("WFLW", {"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="max_to_keep must be at least 1"):
    _checkpointer(tmp_path / "other", max_to_keep=0)
  checkpoints.close()


# ---- The run directory's config across restarts (train_and_evaluate refuses early). ----


@pytest.fixture()
def checkpointed_run(tmp_path, synthetic_data_dir):
  from configs import tiny
  from tests import helpers
  config = tiny.get_config()
  config.data.data_dir = str(synthetic_data_dir)
  config.synthetic_data.generate = False
  helpers.write_random_run(tmp_path, config, scale=0.01, step=4)
  return tmp_path, config


def _changed(config, **fields):
  config = ml_collections.ConfigDict(config.to_dict())
  config.update_from_flattened_dict(fields)
  return config


def test_a_refused_resume_leaves_the_run_config_as_it_was(checkpointed_run):
  from fgtbt_jax import errors
  from fgtbt_jax import train
  workdir, config = checkpointed_run
  saved = (workdir / "config.json").read_bytes()
  with pytest.raises(errors.ConfigError, match="latest step 4.*train.resume is False"):
    train.train_and_evaluate(_changed(config, **{"train.resume": False}), workdir)
  with pytest.raises(errors.ConfigError,
                     match=r"data.samples_per_dataset 2 -> 4.*resume_with_changes=True"):
    train.train_and_evaluate(_changed(config, **{"data.samples_per_dataset": 4}), workdir)
  with pytest.raises(errors.ConfigError, match=r"data.datasets \['WFLW', '300W', 'COFW', "
                                               r"'AFLW'\] -> \['WFLW', 'COFW'\]"):
    train.train_and_evaluate(_changed(config, **{"data.datasets": ("WFLW", "COFW"),
                                                 "data.samples_per_dataset": 4}), workdir)
  with pytest.raises(errors.ConfigError, match=r"train.steps=2 is below step 4 of the "
                                               r"checkpoint in .*nothing to train"):
    train.train_and_evaluate(_changed(config, **{"train.steps": 2}), workdir)
  # A change of the function trained with the same parameter shapes is refused too.
  with pytest.raises(errors.ConfigError, match=r"model.frequency_extractor 'fft' -> 'srm'"):
    train.train_and_evaluate(_changed(config, **{"model.frequency_extractor": "srm"}), workdir)
  with pytest.raises(errors.ConfigError, match=r"loss.sigma 1.5 -> 2.0"):
    train.train_and_evaluate(_changed(config, **{"loss.sigma": 2.0}), workdir)
  assert (workdir / "config.json").read_bytes() == saved
  assert sorted(p.name for p in workdir.glob("config*")) == ["config.json"]


def test_a_bad_init_from_stops_a_new_run_before_it_writes_anything(checkpointed_run, tmp_path):
  from fgtbt_jax import errors
  from fgtbt_jax import train
  source, config = checkpointed_run
  new = tmp_path / "new_run"
  new.mkdir()
  for where, message in ((new / "nowhere", "is not a run's workdir"),
                         (new, "is not a run's workdir")):
    with pytest.raises(errors.ConfigError, match=f"train.init_from=.*{message}"):
      train.train_and_evaluate(_changed(config, **{"train.init_from": str(where)}), new)
  assert not (new / "config.json").exists()
  # A run's workdir passes the check (the copy itself: tests/test_hallucination.py).
  assert train.init_source(str(source))[1] == source


def test_a_resumed_run_drops_the_metric_rows_of_lost_steps(tmp_path):
  from fgtbt_jax.metric_writer import MetricWriter
  writer = MetricWriter(tmp_path)
  for step in (2, 4, 6):  # Rows written up to step 6, the checkpoint is of step 4.
    writer.write("train", step, {"loss": float(step)})
  writer.write("eval", 6, {"nme": 0.1})
  writer.close()
  with open(tmp_path / "train_metrics.jsonl", "a") as f:
    f.write("not json\n")
  MetricWriter(tmp_path).discard_after(4)
  rows = (tmp_path / "train_metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["step"] for r in rows[:-1]] == [2, 4] and rows[-1] == "not json"
  assert (tmp_path / "eval_metrics.jsonl").read_text() == ""


def test_a_resumed_run_keeps_its_config_and_records_a_change_beside_it(checkpointed_run):
  from fgtbt_jax import train
  workdir, config = checkpointed_run
  saved = (workdir / "config.json").read_bytes()
  train._record_config(config, workdir, start_step=4)  # The same config: nothing written.
  assert sorted(p.name for p in workdir.glob("config*")) == ["config.json"]
  train._record_config(_changed(config, **{"train.steps": 8}), workdir, start_step=4)
  assert (workdir / "config.json").read_bytes() == saved
  assert json.loads((workdir / "config.resumed_at_4.json").read_text())["train"]["steps"] == 8
  # A new run (step 0) writes config.json itself.
  train._record_config(_changed(config, **{"train.steps": 9}), workdir, start_step=0)
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 9


def test_non_finite_states_are_never_saved_and_are_refused_on_restore(tmp_path, monkeypatch):
  checkpoints = checkpointing.Checkpointer(tmp_path, datasets=["WFLW"], max_to_keep=3,
                                           save_interval_steps=1, enable_async=False)
  checkpoints.save(1, _state(1.0), None)
  bad = _state(2.0)
  bad["params"]["w"] = bad["params"]["w"].at[1].set(jnp.inf)
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=r"step 2 holds NaN.*first: params/w.*last good checkpoint is step 1"):
    checkpoints.save(2, bad, None)

  assert checkpoints.latest_step() == 1
  nan_model = {"params": {"w": jnp.array([0.0, jnp.nan])}}
  with pytest.raises(checkpointing.NonFiniteStateError, match="best for WFLW, not saved"):
    checkpoints.save_best(2, nan_model, {"WFLW": 0.1})
  assert checkpoints.best_step("WFLW") is None
  # A checkpoint that holds them anyway (written around the guard) is refused
  # on restore, naming the array.
  monkeypatch.setattr(checkpointing, "first_non_finite", lambda tree: None)
  checkpoints.save(3, bad, None)
  checkpoints.save_best(3, nan_model, {"WFLW": 0.1})
  monkeypatch.undo()
  with pytest.raises(checkpointing.NonFiniteStateError, match=r"latest/3: params/w holds NaN"):
    checkpoints.restore(checkpointing.abstract_like(_state(0.0)))
  with pytest.raises(checkpointing.NonFiniteStateError, match=r"best_WFLW/3: params/w"):
    checkpoints.restore_best("WFLW", checkpointing.abstract_like(nan_model))
  restored, step = checkpoints.restore(checkpointing.abstract_like(_state(0.0)), step=1)
  assert step == 1 and np.isfinite(restored["params"]["w"]).all()
  checkpoints.close()


def test_one_trainer_per_workdir_and_stale_locks_are_taken_over(tmp_path, checkpointed_run):
  import os
  import socket
  import subprocess
  import sys
  from fgtbt_jax import train
  workdir, config = checkpointed_run
  saved = (workdir / "config.json").read_bytes()
  # A live holder (this very process) on this host: refused, nothing written.
  (workdir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
  with pytest.raises(rundir.WorkdirError,
                     match=rf"in use by another trainer \(pid {os.getpid()} on host "
                           rf"{socket.gethostname()}"):
    train.train_and_evaluate(config, workdir)
  assert (workdir / "config.json").read_bytes() == saved and (workdir / ".lock").exists()
  # A holder on another host cannot be checked: refused too.
  (workdir / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
  with pytest.raises(rundir.WorkdirError, match="pid 1 on host elsewhere"):
    rundir.WorkdirLock(workdir).acquire()
  # The lock of a killed process of this host is stale: taken over, released after.
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  (workdir / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
  with rundir.WorkdirLock(workdir):
    holder = json.loads((workdir / ".lock").read_text())
    assert holder == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(rundir.WorkdirError, match="in use by another trainer"):
      rundir.WorkdirLock(workdir).acquire()
  assert not (workdir / ".lock").exists()
  # An empty lock file (a start that died before writing it) is stale as well.
  (workdir / ".lock").write_text("")
  with rundir.WorkdirLock(workdir):
    assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()


def test_a_lock_that_cannot_be_written_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
  import errno
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(json, "dump", full)
  with pytest.raises(rundir.WorkdirError,
                     match=r"\.lock: cannot write the workdir lock \(No space left on device\)$"):
    rundir.WorkdirLock(tmp_path).acquire()
  assert not (tmp_path / ".lock").exists()
  monkeypatch.undo()
  with pytest.raises(rundir.WorkdirError, match="cannot create the workdir lock"):
    rundir.WorkdirLock(tmp_path / "no_such_folder").acquire()


# ---- Damaged checkpoints: detected, skipped for an intact step, one line when none. ----


def _ema_state(value: float):
  return {"step": jnp.int32(value), "params": {"w": jnp.full((256,), value)},
          "ema_params": {"w": jnp.full((256,), value + 0.5)}, "ema_batch_stats": {}}


def _largest(folder):
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _zero_bytes(path):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(min(64, len(data) - middle))
  path.write_bytes(bytes(data))


DAMAGES = {
    "data file cut short": lambda d: _largest(d / "state").write_bytes(
        _largest(d / "state").read_bytes()[:40]),
    "64 zeroed bytes": lambda d: _zero_bytes(_largest(d / "state")),
    "empty metadata": lambda d: (d / "state" / "_METADATA").write_bytes(b""),
    "missing manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "corrupt data-iterator state": lambda d: (d / "data" / "process_0-of-1.json").write_text("{"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_broken_step_is_named_and_the_newest_intact_one_restored(tmp_path, damage, caplog):
  checkpoints = _checkpointer(tmp_path, max_to_keep=3)
  iterator = _iterator()
  positions = {}
  for step in (2, 4):
    next(iterator)
    checkpoints.save(step, _ema_state(float(step)), iterator)
    positions[step] = next(_iterator_at(iterator))
  checkpoints.close()
  step_4 = tmp_path / "latest" / "4"
  assert (step_4 / checkpointing.CHECKSUM_FILE).is_file()
  DAMAGES[damage](step_4)
  abstract = checkpointing.abstract_like(_ema_state(0.0))

  checkpoints = _checkpointer(tmp_path, max_to_keep=3)
  with pytest.raises(checkpointing.CorruptCheckpointError, match=r"latest/4 is broken: "):
    checkpoints.restore(abstract, _iterator(), step=4)  # A step named: no fallback.
  variables = {"params": {"w": jax.ShapeDtypeStruct((256,), jnp.float32)}, "batch_stats": {}}
  ema, ema_step = checkpoints.restore_ema(variables)  # eval / predict: fall back.
  assert ema_step == 2
  np.testing.assert_array_equal(ema["params"]["w"], np.full(256, 2.5))
  assert step_4.is_dir()  # Readers move nothing.
  fresh = _iterator()
  restored, step = checkpoints.restore(abstract, fresh, quarantine=True)
  assert step == 2 and float(restored["params"]["w"][0]) == 2.0
  assert next(_iterator_at(fresh)) == positions[2]
  assert any("latest/4 is broken" in r.getMessage() and "trying an older step" in r.getMessage()
             for r in caplog.records)
  if damage == "corrupt data-iterator state":
    assert any("data-iterator state" in r.getMessage() for r in caplog.records)
  # The broken step is kept aside, and the run's next save of step 4 is not skipped.
  assert not step_4.exists() and (tmp_path / "broken" / "latest_4").is_dir()
  assert checkpoints.latest_step() == 2
  assert checkpoints.save(4, _ema_state(4.0), fresh)
  checkpoints.close()


def _iterator_at(iterator):
  """A copy of a grain iterator at the same position (to peek at its next element)."""
  copy = _iterator()
  copy.set_state(iterator.get_state())
  return copy


def test_no_intact_step_is_one_line_and_unsealed_steps_are_checked_by_their_reads(tmp_path):
  checkpoints = _checkpointer(tmp_path, max_to_keep=3)
  for step in (2, 4):
    checkpoints.save(step, _ema_state(float(step)), _iterator())
  checkpoints.close()
  (tmp_path / "latest" / "2" / checkpointing.CHECKSUM_FILE).unlink()  # Killed before its seal.
  (tmp_path / "latest" / "2" / "state" / "_METADATA").write_bytes(b"")
  DAMAGES["64 zeroed bytes"](tmp_path / "latest" / "4")
  checkpoints = _checkpointer(tmp_path, max_to_keep=3)
  with pytest.raises(checkpointing.CorruptCheckpointError) as error:
    checkpoints.restore(checkpointing.abstract_like(_ema_state(0.0)), quarantine=True)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"no intact checkpoint under {tmp_path / 'latest'}")
  assert "latest/4 is broken" in message and "checksum mismatch" in message
  assert "latest/2 is broken" in message and "metadata is unreadable" in message
  assert (tmp_path / "latest" / "4").is_dir()  # Nothing moved when nothing was restored.
  checkpoints.close()


def test_a_broken_best_model_is_one_line(tmp_path):
  checkpoints = _checkpointer(tmp_path)
  model = {"params": {"w": jnp.arange(300.0)}}
  checkpoints.save_best(10, model, {"WFLW": 0.05})
  checkpoints.close()
  _zero_bytes(_largest(tmp_path / "best_WFLW" / "10" / "model"))
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=r"best_WFLW/10 is broken: .*model/.* changed since it was written"):
    _checkpointer(tmp_path).restore_best("WFLW", checkpointing.abstract_like(model))


def test_an_older_run_config_gets_the_model_fields_added_since_at_their_defaults(tmp_path):
  from configs import tiny
  config = tiny.get_config()
  saved = json.loads(config.to_json_best_effort())
  for field in ("decoder_fusion", "fgsa_compat", "batch_norm_unbiased_variance"):
    del saved["model"][field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = rundir.load_run_config(tmp_path)
  assert (loaded.model.decoder_fusion, loaded.model.fgsa_compat,
          loaded.model.batch_norm_unbiased_variance) == ("composed", "paper", False)
  from fgtbt_jax import models
  models.build_model(loaded.model)  # Builds the network it trained.


def test_resume_changes_name_every_function_changing_field_but_compute_forms():
  from configs import tiny
  from fgtbt_jax import train
  flat = lambda **fields: rundir.flat_config(_changed(tiny.get_config(), **fields))
  saved = flat()
  assert train.resume_changes(saved, flat(**{"train.steps": 99, "model.dtype": "bfloat16",
                                             "model.remat_policy": "segments",
                                             "model.decoder_fusion": "concat"})) == []
  assert train.resume_changes(saved, flat(**{"model.decoder_dim": 32, "model.fgsa": False})) == [
      "model.decoder_dim 64 -> 32", "model.fgsa True -> False"]
  # A field the saved config predates is not compared.
  older = {k: v for k, v in saved.items() if k != "loss.dwa_window"}
  assert train.resume_changes(older, flat(**{"loss.dwa_window": 5})) == []


def test_the_run_config_is_readable_by_the_other_users_of_a_shared_run(tmp_path):
  import os
  import stat
  from configs import tiny
  mask = os.umask(0o022)
  try:
    path = rundir.write_run_config(tiny.get_config(), tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.umask(0o077)  # A private umask is respected.
    path = rundir.write_run_config(tiny.get_config(), tmp_path, "config.private.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
  finally:
    os.umask(mask)
