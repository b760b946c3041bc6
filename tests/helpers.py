"""Shared pieces of the tests: subprocess runs (train, resume, multi-host, run.py), a mixed batch."""

import contextlib
import os
import pathlib

import jax
import numpy as np
import pytest

from fgtbt_jax import landmarks
from fgtbt_jax import rundir

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAIN_HELPER = REPO / "tests" / "train_helper.py"
SYNTHETIC_SIZES = {name: (8, 8) for name in ("WFLW", "300W", "COFW", "AFLW")}


def subprocess_env(devices: int, fast_compile: bool = True) -> dict:
  """The test environment for a child process with `devices` CPU devices.

  Keeps the persistent compilation cache of the test session. With
  `fast_compile` XLA's backend optimisation is turned down, for programs
  that run a few steps only, where compiling them dominates (a run of
  hundreds of steps is faster without it).
  """
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  if fast_compile:
    flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
  return env


def flatten(tree) -> dict[str, np.ndarray]:
  """{path: numpy array} of every leaf of a (restored) pytree."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def synthetic_data_dir(tmp_path_factory) -> pathlib.Path:
  """Eight train and eight test synthetic faces of each dataset, converted."""
  from fgtbt_jax.data import convert
  out = tmp_path_factory.mktemp("synthetic")
  convert.convert_synthetic(out, SYNTHETIC_SIZES, render_workers=0, num_threads=2)
  return out


def restore_on_one_device(state_dir: pathlib.Path):
  """A saved train-state item restored onto this process's first device.

  Works whatever mesh (and however many processes) saved it.
  """
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(state_dir).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata.tree)
  return checkpointer.restore(state_dir, target)


def write_random_run(workdir: pathlib.Path, config, scale: float | None = 1.0, step: int = 4):
  """A workdir laid out as `train.train_and_evaluate` leaves it, with random weights.

  Writes <workdir>/config.json and a train state saved as the latest
  checkpoint at `step`; returns that state. Its values are normal(0, scale),
  or with `scale` None the model's own initialisation (outputs that depend
  on the input, as a trained model's do).
  """
  from fgtbt_jax import checkpointing
  from fgtbt_jax import sharding
  from fgtbt_jax import state as state_lib
  rundir.write_run_config(config, workdir)
  setup = state_lib.build_setup(config, mesh=sharding.single_device_mesh())
  if scale is None:
    state = state_lib.create_train_state(setup, seed=0).replace(step=np.int32(step))
  else:
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda s: jax.device_put((scale * rng.normal(size=s.shape)).astype(s.dtype), s.sharding),
        setup.abstract_state)
  checkpoints = checkpointing.Checkpointer.for_run(config, workdir, enable_async=False)
  checkpoints.save(step, state, None, force=True)
  checkpoints.close()
  return state


def model_variables(config, seed: int = 0):
  """`models.random_variables` of a model config's network (no slow `model.init`)."""
  from fgtbt_jax import models
  model = models.build_model(config)
  return models.random_variables(models.abstract_variables(model, config.input_size), seed)


def mixed_batch(seed: int, size: int = 64, k: int = 2) -> dict:
  """A mixed batch: k samples of each dataset, mean-face landmarks jittered."""
  rng = np.random.default_rng(seed)
  dataset_id = np.repeat(np.arange(4, dtype=np.int32), k)
  face = landmarks.mean_face() * size * 0.6 + size * 0.2
  points = face[None] + rng.normal(0, 2.0, (len(dataset_id), 124, 2))
  mask = landmarks.PROTOCOL_MASKS[dataset_id]
  return {"image": rng.integers(0, 256, (len(dataset_id), size, size, 3), np.uint8),
          "landmarks": np.where(mask[..., None], points, 0).astype(np.float32),
          "mask": mask, "dataset_id": dataset_id}


@contextlib.contextmanager
def read_only_view(folder: pathlib.Path, view: pathlib.Path):
  """`folder` seen read-only at `view` (a bind mount), as an archived or shared run is.

  Skips the test where mounting is not allowed (it needs root with mount
  rights; root ignores file permissions, so chmod cannot stand in).
  """
  import subprocess
  view.mkdir(parents=True, exist_ok=True)
  if subprocess.run(["mount", "--bind", str(folder), str(view)],
                    capture_output=True).returncode != 0:
    pytest.skip("a read-only bind mount needs root with mount rights")
  try:
    subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
    yield view
  finally:
    subprocess.run(["umount", str(view)], check=True)


def train_sharded_and_single(config8, config1, tmp_path: pathlib.Path,
                             compare_metrics, seeds=(1, 2, 3)):
  """The same batches trained on a 4 x 2 mesh (`config8`) and on one device (`config1`).

  After each step `compare_metrics(metrics8, metrics1)` checks the metrics
  (its own assertions); at the end every parameter must agree, and a resume
  from the step-1 checkpoint over the same batches must end bit for bit where
  the uninterrupted sharded run did. Returns (initial state, sharded state,
  one-device state, last sharded metrics).
  """
  from fgtbt_jax import checkpointing
  from fgtbt_jax import sharding
  from fgtbt_jax import state as state_lib
  from fgtbt_jax import train
  setup8 = state_lib.build_setup(config8)
  setup1 = state_lib.build_setup(config1, mesh=sharding.make_mesh(config1.mesh, jax.devices()[:1]))
  state8 = state_lib.create_train_state(setup8, seed=0)
  initial = jax.device_get(state8)
  state1 = jax.device_put(initial, setup1.state_shardings)
  step8 = train.make_train_step(setup8, ema_decay=0.9)
  step1 = train.make_train_step(setup1, ema_decay=0.9)

  def global_batch(seed, setup):
    return sharding.global_batch(mixed_batch(seed), sharding.batch_sharding(setup.mesh),
                                 train.TRAIN_BATCH_KEYS)

  checkpoints = checkpointing.Checkpointer.for_run(config8, tmp_path, enable_async=False)
  for seed in seeds:
    state8, metrics8 = step8(state8, global_batch(seed, setup8))
    state1, metrics1 = step1(state1, global_batch(seed, setup1))
    compare_metrics(metrics8, metrics1)
    if seed == seeds[0]:
      checkpoints.save(1, state8, None, force=True)
  flat1 = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state1.params)))
  for path, value in jax.tree_util.tree_leaves_with_path(jax.device_get(state8.params)):
    np.testing.assert_allclose(value, flat1[path], rtol=1e-4, atol=6e-5,
                               err_msg=jax.tree_util.keystr(path))
  resumed, step = checkpoints.restore(setup8.abstract_state)
  checkpoints.close()
  assert step == 1
  for seed in seeds[1:]:
    resumed, _ = step8(resumed, global_batch(seed, setup8))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state8)),
                          jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  return initial, state8, state1, metrics8


def tiny_predictor(batch_size: int, seed: int = 1):
  """A `Predictor` of the tiny network with random weights (`model_variables`)."""
  from fgtbt_jax import models
  from fgtbt_jax.deploy.predictor import Predictor
  config = models.model_config("tiny")
  return Predictor(config, model_variables(config, seed=seed), batch_size=batch_size)
