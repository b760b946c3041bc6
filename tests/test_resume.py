"""Exact resume: a run killed with SIGKILL after a checkpoint continues bit for bit.

Three subprocesses train the tiny config on a few synthetic faces:
  A: 2N steps straight through;
  B: the same run, which SIGKILLs itself once the step-N checkpoint is
     committed (no clean shutdown);
  C: the same command on B's workdir, resuming from step N to 2N.
C must end with exactly A's train state (params, optimizer state, EMA) and
must have been fed exactly A's batches N+1..2N, B exactly A's first N.
"""

import json
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # Subprocesses: the full suite only (see docs/testing.md).

N = 2


def _run(tmp_path, data_dir, name, workdir_name, *extra):
  workdir = tmp_path / workdir_name
  record = tmp_path / f"batches_{name}.txt"
  command = [sys.executable, str(helpers.TRAIN_HELPER), "--workdir", str(workdir),
             "--data_dir", str(data_dir), "--steps", str(2 * N), "--checkpoint_every", str(N),
             "--record", str(record), *extra]
  process = subprocess.run(command, env=helpers.subprocess_env(devices=1),
                           capture_output=True, text=True, timeout=900)
  return process, workdir, record.read_text().split()


def _state(workdir: pathlib.Path, step: int):
  return helpers.restore_on_one_device(workdir / "checkpoints" / "latest" / str(step) / "state")


def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path, synthetic_data_dir):
  a, workdir_a, batches_a = _run(tmp_path, synthetic_data_dir, "A", "straight")
  assert a.returncode == 0, a.stderr[-3000:]
  b, workdir_b, batches_b = _run(tmp_path, synthetic_data_dir, "B", "killed",
                                      "--kill_after_step", str(N))
  assert b.returncode == -signal.SIGKILL, b.stderr[-3000:]
  steps_b = sorted(p.name for p in (workdir_b / "checkpoints" / "latest").iterdir())
  assert steps_b == [str(N)]  # killed before training any further
  c, workdir_c, batches_c = _run(tmp_path, synthetic_data_dir, "C", "killed")
  assert c.returncode == 0, c.stderr[-3000:]
  assert workdir_c == workdir_b and f"resumed from step {N}" in c.stderr

  assert len(batches_a) == 2 * N
  assert batches_b == batches_a[:N]
  assert batches_c == batches_a[N:]

  final_a, final_c = _state(workdir_a, 2 * N), _state(workdir_c, 2 * N)
  leaves_a = helpers.flatten(final_a)
  leaves_c = helpers.flatten(final_c)
  assert leaves_a.keys() == leaves_c.keys() and len(leaves_a) > 50
  for key, value in leaves_a.items():
    np.testing.assert_array_equal(value, leaves_c[key], err_msg=key)
  assert int(final_c["step"]) == 2 * N
  metrics_a = json.loads((workdir_a / "final_metrics.json").read_text())
  metrics_c = json.loads((workdir_c / "final_metrics.json").read_text())
  for name in ("WFLW", "300W", "COFW", "AFLW"):
    assert metrics_a[name] == metrics_c[name]
