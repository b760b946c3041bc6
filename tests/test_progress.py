"""What a run shows on the console: progress bars with rate and ETA, one summary line, the
next command (#32 item 4).

tqdm writes to the stderr pytest captures (not a terminal), so each bar shows its first
and last state; their text is read back here.
"""

import json
import re

import cv2
import numpy as np
import pytest

from configs import tiny
from fgtbt_jax import errors
from fgtbt_jax import evaluate
from fgtbt_jax import rundir
from fgtbt_jax import train
from fgtbt_jax.data import synthetic
from fgtbt_jax.deploy import predict_files
from fgtbt_jax.deploy import predictor as predictor_lib
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)
from tests.test_predictor import Scene

# A finished bar: "<label>: 100%|<bar>| n/n [mm:ss elapsed, ETA mm:ss, <rate>...]".
ETA = r"\[\d\d:\d\d elapsed, ETA \d\d:\d\d, +[\d.]+(?:{unit}/s|s/{unit})"


def _bars(text: str, label: str) -> list[str]:
  """The states of the bar `label` in captured stderr (tqdm redraws with carriage returns)."""
  return [line.strip() for line in text.replace("\r", "\n").splitlines()
          if line.strip().startswith(f"{label}:")]


def test_a_bar_shows_done_total_rate_and_eta(capsys):
  for _ in errors.progress_bar(range(3), total=3, desc="work", unit="item"):
    pass
  last = _bars(capsys.readouterr().err, "work")[-1]
  assert re.fullmatch(r"work: 100%\|.*\| 3/3 " + ETA.format(unit="item") + r"\]", last), last
  with errors.progress_bar(total=3, desc="hidden", unit="item", enabled=False) as bar:
    bar.update(3)
  assert "hidden" not in capsys.readouterr().err


def test_synthetic_rendering_shows_its_progress(tmp_path, capsys):
  synthetic.write_synthetic_datasets(str(tmp_path), {"AFLW": (2, 1)}, num_workers=0)
  last = _bars(capsys.readouterr().err, "render synthetic faces")[-1]
  assert re.match(r"render synthetic faces: 100%\|.*\| 3/3 " + ETA.format(unit="face"), last)


def test_the_run_summary_is_one_line_and_names_the_full_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp = -1, 2
  line = train.run_summary(config, tmp_path / "runs" / "tiny", "configs/tiny.py")
  assert "\n" not in line
  assert line == (
      "run configs/tiny.py: model tiny at 64 px, float32; data WFLW, 300W, COFW, AFLW "
      "(synthetic); 4 steps x 8 images; 8 cpu devices (mesh data 4 x fsdp 2); workdir "
      "runs/tiny (full config: runs/tiny/config.json)")


def test_next_commands_follow_the_way_the_command_was_called(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr("sys.argv", ["run.py"])
  text = rundir.next_commands(tmp_path / "runs" / "default", "train")
  lines = text.splitlines()
  assert lines[0] == "next:"
  assert lines[1].startswith("  python run.py eval --workdir=runs/default  ")
  assert lines[2].startswith("  python run.py predict --workdir=runs/default --image=PATH  ")
  monkeypatch.setattr("sys.argv", ["/usr/bin/fgtbt", "eval"])
  assert rundir.next_commands("/elsewhere/my run", "eval").splitlines()[1].startswith(
      "  fgtbt predict --workdir='/elsewhere/my run' --image=PATH")
  monkeypatch.setattr("sys.argv", ["/site/fgtbt_jax/commands/__main__.py", "train"])
  assert rundir.next_commands("/elsewhere/run", "train").splitlines()[1].startswith(
      "  python -m fgtbt_jax.commands eval --workdir=/elsewhere/run  ")
  # After predict: a benchmark's points, or the run's own scheme when it has one.
  assert rundir.next_commands("r", "predict").splitlines()[1].endswith(
      "--config.predict.protocol=WFLW  # more inputs; WFLW's 98 points (or 300W, COFW, "
      "AFLW) instead of all 124")
  assert rundir.next_commands("r", "predict", own_scheme="my faces").splitlines()[1].endswith(
      "--config.predict.protocol='my faces'  # more inputs; the points of my faces "
      "instead of all 124")


def test_predict_shows_progress_per_file_and_frame_and_ends_with_the_next_command(
    tmp_path, capsys, monkeypatch):
  scene = Scene()
  inputs = tmp_path / "in"
  inputs.mkdir()
  box = [30.0, 20.0, 110.0, 100.0]
  for name in ("a.png", "b.png"):
    image = np.zeros((120, 150, 3), np.uint8)
    scene.paint(image, box)
    cv2.imwrite(str(inputs / name), image)
  writer = cv2.VideoWriter(str(inputs / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                           (150, 120))
  for _ in range(3):
    writer.write(image)
  writer.release()
  workdir = tmp_path / "run"
  (workdir / rundir.CHECKPOINTS_DIR).mkdir(parents=True)
  config = tiny.get_config()
  rundir.write_run_config(config, workdir)
  # The stand-in model outputs the painted faces' heatmaps: no checkpoint to restore.
  monkeypatch.setattr(predictor_lib.Predictor, "from_checkpoint",
                      classmethod(lambda cls, *a, **k: scene.predictor(batch_size=1)))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr("sys.argv", ["run.py"])
  status = predict_files.predict_main(workdir, [str(inputs)], str(tmp_path / "out"),
                                      config=config, which="latest", box=box)
  assert status == 0
  captured = capsys.readouterr()
  bars = _bars(captured.err, "predict")
  assert bars[0].startswith("predict:   0%") and " 0/3 " in bars[0]
  assert re.match(r"predict: 100%\|.*\| 3/3 " + ETA.format(unit="file"), bars[-1]), bars
  # A video's frames have a bar of their own (cleared when done: its first state is kept).
  assert any(" 0/3 [" in bar and "ETA" in bar and "frame/s" in bar
             for bar in _bars(captured.err, "clip.avi")), captured.err
  out = captured.out.splitlines()
  assert out[0] == "3 of 3 files done"
  assert out[-3:-1] == ["next:", out[-2]] and out[-2].startswith("  see out/a.png.overlay.png  ")
  assert out[-1].startswith("  python run.py predict --workdir=run --image=PATH "
                            "--config.predict.protocol=WFLW  # ")


@pytest.mark.slow  # A real tiny run: renders nothing, compiles the train and eval steps (~1 min).
def test_a_tiny_training_run_shows_its_summary_progress_and_next_commands(
    tmp_path, capsys, caplog, monkeypatch, synthetic_data_dir):
  import logging
  caplog.set_level(logging.INFO)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr("sys.argv", ["run.py"])
  config = tiny.get_config()
  config.data.data_dir = str(synthetic_data_dir)
  config.synthetic_data.generate = False
  config.train.steps = 2
  workdir = tmp_path / "runs" / "tiny"
  final = train.train_and_evaluate(config, workdir, config_name="configs/tiny.py")
  evaluate.print_outputs(workdir, final, f"trained {final['steps']} steps")
  captured = capsys.readouterr()
  logged = [record.getMessage() for record in caplog.records]
  # One line sums the run up; the config is in the workdir, not in the log.
  [summary] = [line for line in logged if line.startswith("run configs/tiny.py: ")]
  assert "full config: runs/tiny/config.json" in summary
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 2
  assert not any('"samples_per_dataset"' in line for line in logged)
  assert any(line.startswith("model tiny: ") and line.endswith(" parameters") for line in logged)
  # The steps' bar with rate and ETA, the evaluation's too.
  bars = _bars(captured.err, "train")
  assert re.match(r"train: 100%\|.*\| 2/2 " + ETA.format(unit="step") +
                  r", [\d.]+ images/s, loss [\d.]+\]", bars[-1]), bars
  # The evaluation's bar is cleared when done: its first state is kept.
  assert any(re.search(r"\| 0/1 \[.* ETA ", bar) for bar in _bars(captured.err, "eval @ 2 WFLW"))
  # The outputs, then the commands to run next.
  out = captured.out.splitlines()
  assert "  config.json          the run's config in full" in out
  assert out[-3] == "next:"
  assert out[-2].startswith("  python run.py eval --workdir=runs/tiny  ")
  assert out[-1].startswith("  python run.py predict --workdir=runs/tiny --image=PATH  ")
