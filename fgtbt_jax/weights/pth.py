"""`.pth` files (`torch.save` zip archives) read without torch and without running pickled code.

One reader behind both weight imports: the ImageNet encoders
(`weights.imagenet.load_state_dict`) and the authors' released checkpoint
(`weights.authors.read_checkpoint`).

`Archive(path).unpickle()` unpickles the archive's `data.pkl` with a
restricted unpickler that knows only PyTorch's tensor rebuild functions and
storage types, `collections.OrderedDict`, plain containers and yacs'
`CfgNode` (read as a dict, `ConfigNode`); any other global is refused,
naming it. Tensors come out as `StoredTensor`s (not read yet), and
`Archive.tensor` reads one as a numpy array from the archive's `data/<key>`
entry (dtype, shape, stride and storage offset applied; byte order from the
archive's `byteorder` entry, little-endian when absent), so a caller reads
only the tensors it needs. `load(path)` reads every tensor of a file.
Files of torch < 1.6 (not zip archives) are refused with a message that
says so.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pathlib
import pickle
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np


class ArchiveError(ValueError):
  """A file that is not a readable torch.save archive; the message starts with `where`.

  Attributes:
    where: the file, or "file:key" for one tensor of it.
    reason: what is wrong.
  """

  def __init__(self, where: str, reason: str):
    super().__init__(f"{where}: {reason}")
    self.where = where
    self.reason = reason


class ConfigNode(dict):
  """A pickled yacs `CfgNode`: a plain dict of its entries (yacs' own attributes dropped)."""

  def __setstate__(self, state):
    del state  # yacs' bookkeeping (immutability flags, renamed keys).


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


# PyTorch storage classes -> numpy dtypes of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """A tensor of the archive, not read yet: its storage entry and view into it."""

  storage: str
  dtype: np.dtype
  numel: int
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: np.dtype
  numel: int


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> StoredTensor:
  """Stands in for torch._utils._rebuild_tensor(_v2) (the extra arguments: grad flag, hooks)."""
  del unused
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError("a tensor without a storage")
  return StoredTensor(storage.key, storage.dtype, storage.numel, int(storage_offset),
                      tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused):
  """Stands in for torch._utils._rebuild_parameter(_with_state): the parameter's tensor."""
  del unused
  return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
    ("yacs.config", "CfgNode"): ConfigNode,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch.save `data.pkl` into dicts, lists and `StoredTensor`s, nothing else."""

  def __init__(self, file, where: str):
    super().__init__(file)
    self._where = where

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise ArchiveError(
        self._where, f"refusing to unpickle {module}.{name}: a checkpoint holds only tensors, "
        "storages and containers")

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)):
      raise ArchiveError(self._where, f"unknown persistent id {pid!r} in data.pkl")
    _, storage_type, key, _, numel = pid
    return _Storage(str(key), _STORAGE_DTYPES[storage_type.name], int(numel))


class Archive:
  """The entries of a torch.save zip archive: data.pkl, byteorder, data/<key>."""

  def __init__(self, path: pathlib.Path):
    self.where = str(path)
    try:
      self._zip = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
      with open(path, "rb") as f:
        head = f.read(4)
      if head == b"PK\x03\x04":
        raise ArchiveError(
            self.where, "truncated or damaged: a zip archive without its directory") from None
      raise ArchiveError(
          self.where, "not a torch.save checkpoint (not a zip archive; files of torch < 1.6 "
          "must be re-saved with a current torch)") from None
    pickles = [n for n in self._zip.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
      self._zip.close()
      raise ArchiveError(
          self.where, "not a torch.save checkpoint: the zip archive has "
          f"{'no' if not pickles else len(pickles)} data.pkl")
    self._prefix = pickles[0][:-len("data.pkl")]
    order = self._read_optional("byteorder")
    self._byteorder = "<" if order in (None, b"little") else ">"
    self._storages: dict[str, np.ndarray] = {}

  def _read(self, name: str) -> bytes:
    try:
      return self._zip.read(self._prefix + name)
    except KeyError:
      raise ArchiveError(self.where, f"the archive has no entry {name}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
      raise ArchiveError(self.where, f"truncated or damaged entry {name}: {e}") from None

  def _read_optional(self, name: str) -> bytes | None:
    if self._prefix + name not in self._zip.namelist():
      return None
    return self._read(name).strip()

  def unpickle(self) -> Any:
    data = self._read("data.pkl")
    try:
      return _RestrictedUnpickler(io.BytesIO(data), self.where).load()
    except ArchiveError:
      raise
    except Exception as e:  # A damaged pickle can fail in any of pickle's own ways.
      raise ArchiveError(self.where, f"unreadable data.pkl: {type(e).__name__}: "
                                   f"{e}") from None

  def _storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    if key not in self._storages:
      raw = self._read(f"data/{key}")
      if len(raw) != numel * dtype.itemsize:
        raise ArchiveError(
            self.where, f"storage data/{key} holds {len(raw)} bytes, {numel} x {dtype.itemsize} "
            "expected (truncated or damaged)")
      # Read as unsigned integers of the file's byte order, then view as the dtype
      # (bfloat16 has no byte-swapped numpy form).
      unsigned = np.frombuffer(raw, np.dtype(f"{self._byteorder}u{dtype.itemsize}"))
      self._storages[key] = unsigned.astype(f"=u{dtype.itemsize}").view(dtype)
    return self._storages[key]

  def tensor(self, tensor: StoredTensor, name: str) -> np.ndarray:
    """The numpy array of a stored tensor (a copy, C-contiguous)."""
    storage = self._storage(tensor.storage, tensor.dtype, tensor.numel)
    shape, stride = tensor.shape, tensor.stride
    if len(shape) != len(stride) or min(shape + stride + (tensor.offset,), default=0) < 0:
      raise ArchiveError(f"{self.where}:{name}", f"bad tensor view: shape {shape}, "
                                   f"stride {stride}, offset {tensor.offset}")
    if math.prod(shape) == 0:
      return np.zeros(shape, tensor.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if last >= storage.size:
      raise ArchiveError(
          f"{self.where}:{name}", f"tensor of shape {shape} reaches element {last} of a "
          f"{storage.size}-element storage")
    view = np.lib.stride_tricks.as_strided(
        storage[tensor.offset:], shape, tuple(s * storage.itemsize for s in stride),
        writeable=False)
    return np.array(view)

  def close(self) -> None:
    self._zip.close()

  def __enter__(self) -> "Archive":
    return self

  def __exit__(self, *unused) -> None:
    self.close()


def _read_all(archive: Archive, content: Any, name: str = "") -> Any:
  if isinstance(content, StoredTensor):
    return archive.tensor(content, name)
  if isinstance(content, dict):
    return type(content)((key, _read_all(archive, value, f"{name}.{key}" if name else str(key)))
                         for key, value in content.items())
  if isinstance(content, (list, tuple)):
    return type(content)(_read_all(archive, value, f"{name}[{i}]") for i, value in enumerate(content))
  return content


def load(path: str | os.PathLike) -> Any:
  """The content of a .pth file with every tensor read as a numpy array.

  Raises:
    FileNotFoundError: no such file; IsADirectoryError: a folder.
    ArchiveError: not a torch.save zip archive, truncated or damaged, or a
      pickled global other than tensors, storages and containers.
  """
  path = _checked_file(path)
  with Archive(path) as archive:
    return _read_all(archive, archive.unpickle())


def _checked_file(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if path.is_dir():
    raise IsADirectoryError(f"{path}: a folder, not a checkpoint file; name the .pth file in it")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  return path
