"""The installed package: `pip install .` gives the `fgtbt` command and `from fgtbt_jax import Predictor`.

The wheel is built from this checkout without build isolation (the host's
setuptools; no download) and installed without dependencies into a venv that
sees this environment's packages (the pinned ones), so the test checks what
the package itself carries: its modules, configs, assets, entry point and
declared dependencies. Everything then runs from a folder outside the
checkout, with no PYTHONPATH, so nothing can come from the checkout.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # A wheel build and subprocesses: the full suite only.


def _has_bdist_wheel() -> bool:
  try:
    from setuptools.command import bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    return True
  except ImportError:
    try:
      import wheel  # noqa: F401
      return True
    except ImportError:
      return False


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv python, venv bin folder, an outside working folder, environment)."""
  if not _has_bdist_wheel():
    pytest.skip("the host's setuptools cannot build wheels (needs >= 70.1 or the wheel "
                "package) and this test downloads nothing")
  root = tmp_path_factory.mktemp("package")
  # A copy of the sources: the build writes build/ and *.egg-info beside them.
  source = root / "source"
  shutil.copytree(helpers.REPO, source, ignore=shutil.ignore_patterns(
      ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(root / "wheel"), str(source)], check=True, timeout=600,
                 capture_output=True)
  [wheel] = (root / "wheel").glob("fgtbt_jax-*.whl")
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(venv)], check=True, timeout=300)
  python = venv / "bin" / "python"
  subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                 check=True, timeout=600, capture_output=True)
  env = helpers.subprocess_env(devices=1)
  env.pop("PYTHONPATH")
  outside = root / "elsewhere"
  outside.mkdir()
  return python, venv / "bin", outside, env


def _run(installed, *argv, timeout=600):
  python, bin_dir, outside, env = installed
  return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=outside, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_the_package_imports_from_the_install_and_declares_the_pins(installed):
  python = installed[0]
  process = _run(installed, "python", "-c", (
      "import fgtbt_jax, importlib.metadata as m, json\n"
      "from fgtbt_jax import Predictor\n"
      "print(json.dumps({'file': fgtbt_jax.__file__, 'predictor': Predictor.__module__,\n"
      "                  'requires': m.requires('fgtbt-jax')}))"))
  assert process.returncode == 0, process.stderr[-3000:]
  found = json.loads(process.stdout)
  assert pathlib.Path(found["file"]).is_relative_to(python.parent.parent)
  assert found["predictor"] == "fgtbt_jax.deploy.predictor"
  pins = [line.split("#")[0].strip() for line in
          (helpers.REPO / "requirements.txt").read_text().splitlines()]
  assert found["requires"] == [pin for pin in pins if pin]


def test_fgtbt_lists_its_commands_and_refuses_an_unknown_one(installed):
  process = _run(installed, "fgtbt", "--help", timeout=120)
  assert process.returncode == 0
  for command in ("train", "eval", "predict", "convert", "export", "import-authors", "aot"):
    assert f"  {command} " in process.stdout
  process = _run(installed, "fgtbt", "fit", timeout=120)
  assert process.returncode == 2 and "fgtbt: unknown command 'fit'" in process.stderr


def test_fgtbt_predict_and_synthetic_run_outside_the_checkout(installed, tmp_path):
  from configs import tiny
  from fgtbt_jax.data import synthetic
  import cv2
  workdir = tmp_path / "run"
  workdir.mkdir()
  helpers.write_random_run(workdir, tiny.get_config(), scale=None)
  image, points, _ = synthetic.render_face(7, 0, 96, clean=True)
  assert cv2.imwrite(str(tmp_path / "face.png"), image[..., ::-1])
  x, y = points[:, 0], points[:, 1]
  box = f"{x.min():.1f},{y.min():.1f},{x.max():.1f},{y.max():.1f}"
  process = _run(installed, "fgtbt", "predict", f"--workdir={workdir}",
                 f"--image={tmp_path / 'face.png'}", f"--box={box}", "--checkpoint=latest",
                 f"--out={tmp_path / 'out'}", "--config.predict.protocol=WFLW")
  assert process.returncode == 0, process.stderr[-3000:]
  content = json.loads((tmp_path / "out" / "face.png.json").read_text())
  assert content["num_landmarks"] == 98 and len(content["faces"]) == 1
  # A run error is one line with the command's name.
  process = _run(installed, "fgtbt", "eval", f"--workdir={tmp_path / 'none'}", timeout=300)
  assert process.returncode == 1 and process.stderr.strip().startswith("fgtbt: ")
  # The data commands (argparse) and the default config, read from the installed configs/.
  process = _run(installed, "fgtbt", "synthetic", f"--out={tmp_path / 'raw'}", "--datasets=cofw",
                 "--train=1", "--test=0", "--workers=1")
  assert process.returncode == 0, process.stderr[-3000:]
  assert "COFW: 1 train + 0 test faces" in process.stdout
  process = _run(installed, "fgtbt", "train", "--help", timeout=300)
  assert process.returncode == 0 and "fgtbt train|eval|predict" in process.stdout
  # The default config is the installed one (configs/ beside fgtbt_jax/ in site-packages).
  assert "site-packages/configs/default.py'" in "".join(process.stdout.split())  # Unwrapped.
