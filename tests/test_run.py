"""run.py end to end on the tiny config: train, eval a workdir, clear errors."""

import json
import subprocess
import sys

import pytest

from tests import helpers
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)

RUN = str(helpers.REPO / "run.py")
TINY = str(helpers.REPO / "configs" / "tiny.py")
PROTOCOLS = ("WFLW", "300W", "COFW", "AFLW")


def _run(*args, timeout=900):
  return subprocess.run([sys.executable, RUN, *args], env=helpers.subprocess_env(devices=1),
                        capture_output=True, text=True, timeout=timeout, cwd=helpers.REPO)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, synthetic_data_dir):
  workdir = tmp_path_factory.mktemp("run") / "workdir"
  process = _run(f"--config={TINY}", f"--workdir={workdir}", "--config.train.steps=2",
                 f"--config.data.data_dir={synthetic_data_dir}",
                 "--config.synthetic_data.generate=False")
  assert process.returncode == 0, process.stderr[-4000:]
  return workdir, process.stdout


def test_train_prints_the_table_and_writes_final_metrics(trained_workdir):
  workdir, stdout = trained_workdir
  assert "trained 2 steps" in stdout and f"outputs in {workdir}" in stdout
  for name in PROTOCOLS:
    assert any(line.startswith(name) for line in stdout.splitlines())
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["steps"] == 2 and final["wall_time_s"] > 0
  for name in PROTOCOLS:
    assert set(final[name]) == {"nme", "baseline_nme", "fr", "auc"}
    assert 0 < final[name]["baseline_nme"] < 1
  eval_lines = (workdir / "eval_metrics.jsonl").read_text().splitlines()
  assert json.loads(eval_lines[-1])["step"] == 2
  assert (workdir / "tensorboard").is_dir() and (workdir / "config.json").is_file()


def test_eval_mode_reevaluates_the_latest_and_best_checkpoints(trained_workdir):
  workdir, _ = trained_workdir
  process = _run("eval", f"--workdir={workdir}")
  assert process.returncode == 0, process.stderr[-4000:]
  assert "latest checkpoint(s), step(s) 2" in process.stdout
  latest = json.loads((workdir / "eval_latest.json").read_text())
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert latest["steps"] == 2
  for name in PROTOCOLS:
    assert latest[name] == pytest.approx(final[name], rel=1e-6)

  process = _run("eval", f"--workdir={workdir}", "--checkpoint=best")
  assert process.returncode == 0, process.stderr[-4000:]
  best = json.loads((workdir / "eval_best.json").read_text())
  assert best["steps"] == {name: 2 for name in PROTOCOLS}
  for name in PROTOCOLS:
    assert best[name]["nme"] == pytest.approx(final[name]["nme"], rel=1e-6)


def test_eval_mode_rejects_an_incompatible_checkpoint(trained_workdir, synthetic_data_dir):
  workdir, _ = trained_workdir
  process = _run("eval", f"--workdir={workdir}", f"--config={TINY}",
                 "--config.model.decoder_dim=32", f"--config.data.data_dir={synthetic_data_dir}",
                 "--config.synthetic_data.generate=False")
  assert process.returncode != 0
  assert "does not match the configured model" in process.stderr
  assert "Traceback" not in process.stderr


@pytest.mark.parametrize("args,message", [
    (("eval", "--workdir=/nonexistent/run"), "workdir /nonexistent/run does not exist"),
    (("--config=configs/no_such_config.py",), "cannot read the config"),
    ((f"--config={TINY}", "--config.train.stepz=3"), "unknown config field"),
    ((f"--config={TINY}", "--config.train.steps=three"), "--config.train.steps=three"),
    ((f"--config={TINY}", "--config.optimizer.learning_rate=-1.0"),
     "optimizer.learning_rate must be positive"),
    (("evaluate",), "expected an optional mode"),
])
def test_clear_errors(args, message):
  process = _run(*args, timeout=120)
  assert process.returncode != 0
  assert message in process.stdout + process.stderr
  assert "Traceback" not in process.stderr


def test_eval_of_a_directory_without_checkpoints(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  process = _run("eval", f"--workdir={tmp_path}", timeout=120)
  assert process.returncode != 0 and "is not a readable config" in process.stderr
  process = _run("eval", f"--workdir={tmp_path}", f"--config={TINY}", timeout=120)
  assert process.returncode != 0 and "holds no checkpoints" in process.stderr
