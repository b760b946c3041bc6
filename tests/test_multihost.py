"""A real two-process run on localhost: jax.distributed + gloo CPU collectives.

Two subprocesses (2 CPU devices each, a 4-device global mesh) train the tiny
config with FSDP sharding and bfloat16 compute (float32 master weights),
each feeding its own slice of the data; they save
an Orbax checkpoint together (state shards + both grain iterator states),
evaluate with the global gather of per-image errors, and then a second pair
of processes restores that checkpoint and trains on.
"""

import json
import socket
import subprocess
import sys

import pytest

from tests import helpers
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # Subprocesses: the full suite only (see docs/testing.md).


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(workdir, data_dir, steps: int, tmp_path, tag: str):
  port = _free_port()
  processes, logs = [], []
  for process_id in range(2):
    command = [
        sys.executable, str(helpers.TRAIN_HELPER), "--workdir", str(workdir),
        "--data_dir", str(data_dir), "--steps", str(steps), "--checkpoint_every", "2",
        "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
        "--process_id", str(process_id),
        "--record", str(tmp_path / f"batches_{tag}_{process_id}.txt"),
        "--set", "mesh.data=2", "--set", "mesh.fsdp=2",
        "--set", "mesh.logical_axis_rules=" + repr(_fsdp_rules()),
        "--set", "loss.balancer='uncertainty'",
        # The multi-process machinery does not depend on the network's
        # details; the lighter variant (no FGSA, plain patch embeddings)
        # halves the compile time.
        "--set", "model.fgsa=False", "--set", "model.patch_embed='plain'",
        # bfloat16 compute with float32 master weights.
        "--set", "model.dtype='bfloat16'"]
    # Files, not pipes: a process blocked on a full pipe would stall the
    # other one at the next barrier.
    log = open(tmp_path / f"log_{tag}_{process_id}.txt", "w+")
    logs.append(log)
    processes.append(subprocess.Popen(command, env=helpers.subprocess_env(devices=2),
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
  outputs = []
  for process, log in zip(processes, logs):
    try:
      process.wait(timeout=900)
    finally:
      if process.poll() is None:
        process.kill()
    log.seek(0)
    outputs.append((process.returncode, log.read()))
    log.close()
  for process_id, (returncode, output) in enumerate(outputs):
    assert returncode == 0, f"process {process_id}:\n{output[-4000:]}"
  finals = [json.loads(line[len("FINAL "):]) for _, output in outputs
            for line in output.splitlines() if line.startswith("FINAL ")]
  return finals, [output for _, output in outputs]


def _fsdp_rules():
  from fgtbt_jax import models
  return models.logical_axis_rules("fsdp")


def test_two_processes_train_checkpoint_and_resume(tmp_path, synthetic_data_dir):
  workdir = tmp_path / "run"
  finals, _ = _run_pair(workdir, synthetic_data_dir, 2, tmp_path, "first")
  assert len(finals) == 2 and finals[0]["steps"] == 2
  # Evaluation gathers every process's images: both report the same numbers.
  for name in ("WFLW", "300W", "COFW", "AFLW"):
    assert finals[0][name] == finals[1][name]

  step_dir = workdir / "checkpoints" / "latest" / "2"
  iterator_states = sorted(p.name for p in (step_dir / "data").glob("process_*"))
  assert iterator_states == ["process_0-of-2.json", "process_1-of-2.json"]
  first = [(tmp_path / f"batches_first_{i}.txt").read_text().split() for i in range(2)]
  assert len(first[0]) == len(first[1]) == 2 and first[0] != first[1]  # own data slices

  finals, logs = _run_pair(workdir, synthetic_data_dir, 4, tmp_path, "second")
  assert all("resumed from step 2" in log for log in logs)
  assert finals[0]["steps"] == finals[1]["steps"] == 4
  second = [(tmp_path / f"batches_second_{i}.txt").read_text().split() for i in range(2)]
  assert [len(s) for s in second] == [2, 2] and second[0] != first[0]

  state = helpers.restore_on_one_device(workdir / "checkpoints" / "latest" / "4" / "state")
  assert int(state["step"]) == 4
  params = helpers.flatten(state["params"])
  assert {str(v.dtype) for v in params.values()} == {"float32"}
  # The uncertainty balancer's log-variances are trained with the model.
  assert abs(helpers.flatten(state["balancer_params"])["['log_variance']"]).max() > 0
