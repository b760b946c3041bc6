"""run.py end to end on the tiny config: train, eval a workdir, clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fgtbt_jax import landmarks
from tests import helpers
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # Subprocesses: the full suite only (see docs/testing.md).

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
  assert f"the report: {workdir / 'report' / 'report.md'}" in process.stdout
  text = (workdir / "report" / "report.md").read_text()
  assert "latest checkpoint (step 2)" in text
  summary = json.loads((workdir / "report" / "report.json").read_text())
  assert summary["synthetic"] == list(sorted(PROTOCOLS)) and summary["studies"] == {}
  assert "real" not in process.stdout.split() and "synthetic" in process.stdout
  for name in PROTOCOLS:
    # The report's own pass gives the table's numbers.
    default = landmarks.get_protocol(name).default_normalizer
    assert summary["tables"][name]["full"][default]["nme"] == pytest.approx(
        final[name]["nme"], rel=1e-4)
  assert (workdir / "report" / "ced.png").is_file()

  process = _run("eval", f"--workdir={workdir}", "--checkpoint=best",
                 "--config.eval.studies=lowres", "--config.eval.study_max_batches=1")
  assert process.returncode == 0, process.stderr[-4000:]
  best = json.loads((workdir / "eval_best.json").read_text())
  assert best["steps"] == {name: 2 for name in PROTOCOLS}
  for name in PROTOCOLS:
    assert best[name]["nme"] == pytest.approx(final[name]["nme"], rel=1e-6)
  text = (workdir / "report" / "report.md").read_text()
  assert ("best checkpoint per dataset, chosen on its test split (WFLW step 2, 300W step 2, "
          "COFW step 2, AFLW step 2)" in text)
  summary = json.loads((workdir / "report" / "report.json").read_text())
  assert set(summary["studies"]["lowres"]) == {"16", "32", "64", "128"}
  assert set(summary["studies"]["lowres"]["16"]) == set(PROTOCOLS)


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
    (("--config=configs/__init__.py",),
     "the config file configs/__init__.py has no get_config() function"),
    ((f"--config={TINY}", "--config.train.stepz=3"), "unknown config field"),
    ((f"--config={TINY}", "--config.train.steps=three"), "--config.train.steps=three"),
    ((f"--config={TINY}", "--config.optimizer.learning_rate=-1.0"),
     "optimizer.learning_rate must be positive"),
    (("evaluate",), "expected an optional mode"),
    (("eval", "--workdir=/tmp", f"--config={TINY}", "--config.eval.studies=speed"),
     "eval.studies: unknown studies ['speed']"),
    (("eval", "--workdir=/tmp", "--studies=lowres"), "Unknown command line flag 'studies'"),
    (("predict", f"--workdir={TINY}", "--image=x.png"), "is a file, not a folder"),
])
def test_clear_errors(args, message):
  process = _run(*args, timeout=120)
  assert process.returncode == 1
  assert message in process.stdout + process.stderr
  assert "Traceback" not in process.stderr
  # One line (a bad flag adds a hint to --helpfull), without absl's usage dump
  # of run.py's docstring.
  lines = process.stderr.strip().splitlines()
  assert lines[0].startswith("run.py: ") and len(lines) <= 2, lines
  assert "The embedded default" not in process.stderr


def test_help_is_a_success():
  for flag, extra in (("--help", "--config.predict.max_faces"), ("--helpfull", "absl.logging:")):
    process = _run(flag, timeout=120)
    assert process.returncode == 0, process.stderr[-2000:]
    assert "python run.py eval --workdir" in process.stdout and extra in process.stdout


def test_eval_of_a_directory_without_checkpoints(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  process = _run("eval", f"--workdir={tmp_path}", timeout=120)
  assert process.returncode != 0 and "is not a readable config" in process.stderr
  process = _run("eval", f"--workdir={tmp_path}", f"--config={TINY}", timeout=120)
  assert process.returncode != 0 and "not a training workdir" in process.stderr
  assert "Traceback" not in process.stderr


def test_eval_applies_command_line_overrides_to_the_saved_config(trained_workdir, tmp_path):
  # Without --config, --config.* overrides apply on top of the run's saved
  # config: here a data folder that does not exist, named in the error.
  workdir, _ = trained_workdir
  missing = tmp_path / "no_such_data"
  process = _run("eval", f"--workdir={workdir}", f"--config.data.data_dir={missing}",
                 timeout=120)
  assert process.returncode != 0 and str(missing) in process.stderr
  assert "Traceback" not in process.stderr
  process = _run("eval", f"--workdir={workdir}", "--config.data.no_such_field=1", timeout=120)
  assert process.returncode != 0 and "unknown config field" in process.stderr
  # A config saved before fields existed is upgraded (rundir.UPGRADES) and
  # evaluates as the run did; one lacking a field no upgrade fills is named.
  old = tmp_path / "old_run"
  old.mkdir()
  (old / "checkpoints").symlink_to(workdir / "checkpoints")
  saved = json.loads((workdir / "config.json").read_text())
  for section, field in (("eval", "studies"), ("eval", "coordinates"),
                         ("data", "eval_pad_last_batch"), ("loss", "target_rounding")):
    del saved[section][field]
  del saved["predict"]
  saved["loss"]["rounded_targets"] = False
  (old / "config.json").write_text(json.dumps(saved))
  process = _run("eval", f"--workdir={old}", "--noreport")
  assert process.returncode == 0, process.stderr[-3000:]
  final = json.loads((workdir / "final_metrics.json").read_text())
  upgraded = json.loads((old / "eval_latest.json").read_text())
  for name in PROTOCOLS:
    assert upgraded[name] == pytest.approx(final[name], rel=1e-6)
  del saved["train"]["steps"]
  (old / "config.json").write_text(json.dumps(saved))
  process = _run("eval", f"--workdir={old}", timeout=120)
  assert process.returncode == 1 and "lacks the config fields train.steps" in process.stderr
  assert "Traceback" not in process.stderr


def test_a_signal_saves_and_exits_with_128_plus_its_number(tmp_path, synthetic_data_dir):
  import signal
  import time
  workdir = tmp_path / "run"
  log = tmp_path / "train.log"
  with open(log, "w") as out:
    process = subprocess.Popen(
        [sys.executable, RUN, f"--config={TINY}", f"--workdir={workdir}",
         "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
         f"--config.data.data_dir={synthetic_data_dir}", "--config.synthetic_data.generate=False"],
        env=helpers.subprocess_env(devices=1), cwd=helpers.REPO, stdout=out,
        stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 600
    while "step 4/100000" not in log.read_text():  # The loop (and its handler) runs.
      assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
  finally:
    if process.poll() is None:
      process.kill()
  output = log.read_text()
  assert "stopped by signal 15 at step" in output and "resumes it" in output
  assert any(p.name.isdigit() for p in (workdir / "checkpoints" / "latest").iterdir())


def _write_face(path, seed_index: int, size: int = 96, grey: bool = False):
  """A clean synthetic face image; returns its annotation-style box."""
  import cv2
  from fgtbt_jax.data import synthetic
  from fgtbt_jax.deploy import detector
  image, points, _ = synthetic.render_face(7, seed_index, size, clean=True)
  pixels = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if grey else image[..., ::-1]
  assert cv2.imwrite(str(path), pixels)
  return detector.landmark_box(points)


def test_predict_writes_json_and_overlays_and_reports_bad_files(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  inputs = tmp_path / "in"
  inputs.mkdir()
  box = _write_face(inputs / "face.png", 0)
  _write_face(inputs / "grey.png", 1, grey=True)
  (inputs / "notes.jpg").write_text("not an image")
  out = tmp_path / "out"
  process = _run("predict", f"--workdir={workdir}", f"--image={inputs}", f"--out={out}",
                 "--box=" + ",".join(f"{v:.2f}" for v in box), "--config.predict.protocol=WFLW",
                 "--checkpoint=latest")
  # One unreadable file: exit status 1, the other images are written.
  assert process.returncode == 1, process.stderr[-4000:]
  assert "2 of 3 files done" in process.stdout
  assert f"FAILED {inputs / 'notes.jpg'}: not a decodable image" in process.stdout
  assert "Traceback" not in process.stderr
  for name in ("face.png", "grey.png"):
    content = json.loads((out / f"{name}.json").read_text())
    assert content["protocol"] == "WFLW" and content["num_landmarks"] == 98
    assert content["image_size"] == {"height": 96, "width": 96}
    [face] = content["faces"]
    assert face["box"] == pytest.approx(box, abs=0.01)
    assert len(face["landmarks"]) == len(face["confidence"]) == 98
    assert (out / f"{name}.overlay.png").stat().st_size > 0
  assert not list(out.glob("notes*"))


def test_predict_applies_command_line_overrides_to_the_saved_config(trained_workdir, tmp_path):
  # --config.eval.* decodes otherwise than the run was evaluated; the
  # --config.predict.* options apply; eval reads the same overrides the same way.
  workdir, _ = trained_workdir
  image = tmp_path / "face.png"
  box = _write_face(image, 3)
  common = ("predict", f"--workdir={workdir}", f"--image={image}", "--checkpoint=latest",
            "--box=" + ",".join(f"{v:.2f}" for v in box))
  written = {}
  for name, overrides in (("run", ()), ("no_flip", ("--config.eval.flip_test=False",
                                                   "--config.predict.protocol=COFW"))):
    process = _run(*common, f"--out={tmp_path / name}", *overrides, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    written[name] = json.loads((tmp_path / name / "face.png.json").read_text())
  assert written["run"]["flip_test"] and not written["no_flip"]["flip_test"]
  assert (written["run"]["protocol"], written["no_flip"]["protocol"]) == ("unified", "COFW")
  index = landmarks.get_protocol("COFW").unified_index
  with_flip = np.asarray(written["run"]["faces"][0]["landmarks"])[index]
  without = np.asarray(written["no_flip"]["faces"][0]["landmarks"])
  assert np.abs(with_flip - without).max() > 1e-3  # Another prediction, not a label.


def test_predict_options_are_checked_in_one_line_before_the_model_loads(tmp_path):
  from configs import tiny
  from fgtbt_jax import rundir
  rundir.write_run_config(tiny.get_config(), tmp_path)
  (tmp_path / "checkpoints").mkdir()  # No weights: each error comes before they load.
  image = helpers.REPO / "docs" / "sample_faces" / "face_frontal.jpg"
  for override, message in (
      ("--config.predict.min_face_confidence=nan",
       "predict.min_face_confidence must be a number, not nan"),
      ("--config.predict.box_adjustment=1,2", "predict.box_adjustment: box adjustment '1,2'"),
      ("--config.eval.decoder=argmax", None),  # Valid: reaches the (missing) weights.
  ):
    process = _run("predict", f"--workdir={tmp_path}", f"--image={image}", "--box=1,1,90,90",
                   override, timeout=120)
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 1 and len(lines) == 1 and lines[0].startswith("run.py: ")
    assert (message or "no best checkpoint for WFLW") in lines[0], lines


@pytest.mark.parametrize("args,message", [
    (("--box=1,2,3",), "--box=1,2,3: expected four numbers x1,y1,x2,y2"),
    (("--box=10,10,5,5",), "face box 0 [10.0, 10.0, 5.0, 5.0] has zero or negative size"),
    (("--box=1000,1000,1100,1100",), "lies outside the 96 x 96 image"),
    ((), None),
])
def test_predict_clear_errors(trained_workdir, tmp_path, args, message):
  workdir, _ = trained_workdir
  image = tmp_path / "face.png"
  _write_face(image, 2)
  if message is None:  # no --image at all
    process = _run("predict", f"--workdir={workdir}", timeout=120)
    message = "predict needs --image"
  else:
    process = _run("predict", f"--workdir={workdir}", f"--image={image}",
                   f"--out={tmp_path / 'out'}", *args, timeout=300)
  assert process.returncode != 0
  assert message in process.stdout + process.stderr
  assert "Traceback" not in process.stderr


def test_predict_of_missing_inputs_and_workdirs(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  process = _run("predict", f"--workdir={workdir}", f"--image={tmp_path / 'none.png'}",
                 timeout=120)
  assert process.returncode != 0 and "none.png does not exist" in process.stderr
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("no images here")
  process = _run("predict", f"--workdir={workdir}", f"--image={tmp_path / 'empty'}",
                 timeout=120)
  assert process.returncode != 0 and "--image: no image or video files in" in process.stderr
  (tmp_path / "face.png").write_bytes(b"")
  process = _run("predict", f"--workdir={tmp_path}", f"--image={tmp_path / 'face.png'}",
                 timeout=120)
  assert process.returncode != 0 and "not a training workdir" in process.stderr
  assert "Traceback" not in process.stderr


def test_eval_mode_in_two_processes(trained_workdir, tmp_path):
  """Multi-host eval: both processes evaluate together, the study's passes too;
  process 0 writes the report."""
  import socket
  workdir, _ = trained_workdir
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  processes = []
  for process_id in range(2):
    env = helpers.subprocess_env(devices=1)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    # Files, not pipes: a process blocked on a full pipe would stall the other.
    log = tmp_path / f"eval_{process_id}.log"
    with open(log, "w") as out:
      processes.append((subprocess.Popen(
          [sys.executable, RUN, "eval", f"--workdir={workdir}", "--config.eval.studies=lowres",
           "--config.eval.study_max_batches=1"], env=env, cwd=helpers.REPO,
          stdout=out, stderr=subprocess.STDOUT, text=True), log))
  outputs = []
  for process, log in processes:
    try:
      process.wait(timeout=600)
    finally:
      if process.poll() is None:
        process.kill()
    outputs.append(log.read_text())
  processes = [process for process, _ in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-4000:]
  latest = json.loads((workdir / "eval_latest.json").read_text())
  final = json.loads((workdir / "final_metrics.json").read_text())
  # Process 0 writes the report from the images of both processes.
  assert "the report:" in outputs[0] and "the report:" not in outputs[1]
  summary = json.loads((workdir / "report" / "report.json").read_text())
  for name in PROTOCOLS:
    assert latest[name] == pytest.approx(final[name], rel=1e-5)
    default = landmarks.get_protocol(name).default_normalizer
    table = summary["tables"][name]["full"][default]
    assert table["nme"] == pytest.approx(final[name]["nme"], rel=1e-5)
    assert table["count"] == 8  # all test faces, from both processes
  # The study ran in both processes over the same sharded pass: at 128 px the
  # 51 px face of a 64 px crop is unchanged, so it repeats the main NME.
  lowres = summary["studies"]["lowres"]
  assert set(lowres) == {"16", "32", "64", "128"}
  for name in PROTOCOLS:
    assert lowres["128"][name] == pytest.approx(final[name]["nme"], rel=1e-5)


@pytest.fixture()
def small_disk(tmp_path):
  """A 20 MB tmpfs (room for one tiny train-state checkpoint, not two)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                        capture_output=True, text=True, check=False)
  if made.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}): needs root")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_training_in_one_line_and_keeps_the_last_checkpoint(
    small_disk, synthetic_data_dir):
  workdir = small_disk / "workdir"
  args = (f"--config={TINY}", f"--workdir={workdir}", "--config.train.steps=8",
          "--config.train.eval_every=100", f"--config.data.data_dir={synthetic_data_dir}",
          "--config.synthetic_data.generate=False")
  process = _run(*args)
  assert process.returncode == 1
  # asyncio may still log a one-line error at interpreter exit, after ours.
  last = [line for line in process.stderr.splitlines() if line.startswith("run.py:")][-1]
  assert last.startswith(f"run.py: {workdir}: the disk is full (")
  assert ("The last good checkpoint is step 2 in" in last
          and "free space and run the same command again to resume" in last)
  assert "Traceback" not in process.stderr and "Event loop is closed" not in process.stderr
  assert [p.name for p in (workdir / "checkpoints" / "latest").iterdir()
          if p.name.isdigit()] == ["2"]
  subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
  process = _run(*args)
  assert process.returncode == 0, process.stderr[-3000:]
  assert "resumed from step 2" in process.stderr
  rows = (workdir / "train_metrics.jsonl").read_text().splitlines()
  assert [json.loads(row)["step"] for row in rows] == [2, 4, 6, 8]  # No duplicate of step 4.
