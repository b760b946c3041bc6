"""The device mesh, batch placement and multi-process helpers of train and eval.

The mesh has the axes ("data", "fsdp") (the model's logical axis rules map
parameter and activation names onto them, see fgtbt_jax/models/partitioning.py);
a batch is split over both axes on its first dimension. Each process holds
only its own slice of every batch; `global_batch` assembles the global array
from those slices and `local_rows` takes a process's rows back out.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fgtbt_jax.models import partitioning

MESH_AXES = partitioning.MESH_AXES


def initialize_distributed(distributed_config: ml_collections.ConfigDict) -> bool:
  """Starts jax.distributed when the config or the environment asks for it.

  The coordinator comes from `distributed.coordinator_address` or the
  JAX_COORDINATOR_ADDRESS variable; the process count and id from the config
  (> 0 / >= 0) or JAX_NUM_PROCESSES / JAX_PROCESS_ID; with
  `distributed.auto_detect` JAX reads a supported cluster environment (TPU
  pods, SLURM, ...). Must run before anything touches a JAX backend.
  Returns whether the distributed system is (now) initialized.
  """
  if jax.distributed.is_initialized():
    return True
  address = distributed_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not address and not distributed_config.auto_detect:
    return False
  num_processes = distributed_config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
  process_id = distributed_config.process_id
  if process_id < 0:
    process_id = int(os.environ.get("JAX_PROCESS_ID", -1))
  jax.distributed.initialize(
      coordinator_address=address or None,
      num_processes=num_processes or None,
      process_id=process_id if process_id >= 0 else None)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from the config; one of them may be -1 for "the rest"."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
  if fsdp == -1:
    fsdp = num_devices // max(data, 1)
  elif data == -1:
    data = num_devices // max(fsdp, 1)
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(f"mesh (data={mesh_config.data}, fsdp={mesh_config.fsdp}) does not "
                     f"cover the {num_devices} devices")
  return data, fsdp


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "fsdp") mesh over `devices` (default: all), Auto axis types.

  Auto axes let linen's logical sharding constraints work (Explicit axes,
  the default of `jax.make_mesh`, do not).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def single_device_mesh(device: Any | None = None) -> Mesh:
  """A ("data", "fsdp") mesh of one device (default: this process's first).

  For inference and tools that run on one device whatever a run's mesh
  config says.
  """
  device = jax.local_devices()[0] if device is None else device
  return Mesh(np.asarray([device]).reshape(1, 1), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(rules: Sequence[Sequence[Any]]) -> tuple:
  """Logical-name -> mesh-axis rules as tuples (configs read back from JSON hold lists)."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in rules)


@contextlib.contextmanager
def mesh_and_rules(mesh: Mesh, rules: Sequence[Sequence[Any]]):
  """The context to trace model code in: the mesh and the logical axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis split over every device of the mesh; other axes whole."""
  return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding,
                 keys: Sequence[str]) -> dict:
  """Global jax arrays of `keys` from this process's slice of the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
          for k in keys}


class GlobalBatches:
  """Wraps a process-local batch iterator; yields the batches as global arrays.

  `keys` become global jax arrays placed with `sharding` (this process's
  rows on its devices); every other entry stays this process's numpy slice.
  The wrapped iterator stays the one to checkpoint (its position is the
  data state); `close` closes it (grain worker processes).
  """

  def __init__(self, iterator: Any, sharding: NamedSharding, keys: Sequence[str]):
    self.local = iterator
    self._sharding = sharding
    self._keys = tuple(keys)

  def __iter__(self) -> "GlobalBatches":
    return self

  def __next__(self) -> dict:
    local = next(self.local)
    return {**local, **global_batch(local, self._sharding, self._keys)}

  def close(self) -> None:
    close = getattr(self.local, "close", None)
    if close is not None:
      close()


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in local input order.

  `jax.make_array_from_process_local_data` places a process's rows on its
  devices in order of their global index, so the addressable shards sorted
  by start index give back the local order. Shards repeated over a mesh axis
  that does not split the batch are taken once.
  """
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = {}
  for shard in array.addressable_shards:
    start = shard.index[0].start or 0
    shards.setdefault(start, np.asarray(shard.data))
  return np.concatenate([shards[k] for k in sorted(shards)])


def gather_from_processes(values: np.ndarray) -> np.ndarray:
  """Concatenation over processes (in process order) of equally shaped arrays."""
  if jax.process_count() == 1:
    return values
  return np.concatenate(list(multihost_utils.process_allgather(values)))


def barrier(name: str) -> None:
  """All processes wait here for each other (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is True on any process (the same answer everywhere)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class CompiledPerShape:
  """A jitted function compiled once per input shape, then run after a barrier.

  With several processes, every one must enter a program's collectives
  within the CPU collectives' (gloo) 30-second connect window; compile
  times differ between processes (a busy host, a compilation-cache hit on
  one side only), so all processes first compile and then meet at a barrier
  of the coordination service before the first run of a new program. Calls
  whose inputs keep the shapes, dtypes and shardings of an earlier call
  reuse its program; new ones (an evaluation's shorter last batch, a
  predictor's remainder batch) compile their own, at the same call on
  every process.

  Args:
    jitted: the `jax.jit` function.
    name: names the barrier.
    mesh, rules: traced under this mesh and these logical axis rules.
  """

  def __init__(self, jitted, name: str, mesh: Mesh, rules: Sequence[Sequence[Any]]):
    self._jitted = jitted
    self._name = name
    self._mesh = mesh
    self._rules = rules
    self._compiled: dict[Any, Any] = {}

  @property
  def num_compiled(self) -> int:
    """How many programs (input signatures) have been compiled so far."""
    return len(self._compiled)

  def __call__(self, *args):
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((np.shape(x), np.result_type(x), getattr(x, "sharding", None))
                          for x in leaves))
    compiled = self._compiled.get(key)
    if compiled is None:
      with mesh_and_rules(self._mesh, self._rules):
        compiled = self._jitted.lower(*args).compile()
      self._compiled[key] = compiled
      barrier(f"compiled {self._name} #{len(self._compiled)}")
    return compiled(*args)
