"""Reading MATLAB .mat files of either kind into MATLAB orientation.

MATLAB v7.3 files are HDF5 (read with h5py). HDF5 stores arrays in row-major
order, so every MATLAB array comes back transposed (an N x 87 matrix reads as
87 x N, an H x W x 3 image as 3 x W x H), and a cell array is an array of
object references into the file. Older files (v5, e.g. the AFLW
`AFLWinfo_release.mat` in the wild) are read with scipy.io.loadmat, which
already returns MATLAB orientation. `load_mat` hides the difference: numeric
arrays in MATLAB's shape, cell arrays as numpy object arrays of the same shape
holding arrays or strings, char arrays as `str`.
"""

from __future__ import annotations

from typing import Any, Sequence

import h5py
import numpy as np

from fgtbt_jax.data.readers.common import require_file
from fgtbt_jax.errors import DataError


def load_mat(path: str, keys: Sequence[str]) -> dict[str, Any]:
  """Reads `keys` from the .mat file at `path`, in MATLAB orientation.

  Raises:
    DataError: the file is missing, empty, not a .mat file, lacks a key, or
      is v5 and scipy is not installed.
  """
  require_file(path, "MATLAB .mat file")
  if h5py.is_hdf5(path):
    return _load_v73(path, keys)
  return _load_v5(path, keys)


def _load_v73(path: str, keys: Sequence[str]) -> dict[str, Any]:
  try:
    with h5py.File(path, "r") as f:
      available = sorted(k for k in f.keys() if not k.startswith("#"))
      missing = [k for k in keys if k not in f]
      if missing:
        raise DataError(path, f"missing key(s) {missing}; the file has {available}",
                        "missing_key")
      return {k: _h5_value(f, f[k], f"{path}:{k}") for k in keys}
  # h5py reports a cut-short or damaged file as OSError (or KeyError / ValueError
  # for a broken object inside it) with its own wording; name the file.
  except (OSError, KeyError, ValueError, RuntimeError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(path, f"not a readable MATLAB v7.3 file (truncated or damaged?): "
                    f"{' '.join(str(e).split())}", "corrupt_file") from None


def _h5_value(f: h5py.File, node, where: str):
  if isinstance(node, h5py.Group):
    raise DataError(where, "is a MATLAB struct; expected an array or cell array",
                    "bad_value")
  matlab_class = node.attrs.get("MATLAB_class", b"")
  if isinstance(matlab_class, bytes):
    matlab_class = matlab_class.decode()
  if node.attrs.get("MATLAB_empty", 0):
    return np.zeros((0,), np.float64)
  data = node[()]
  if node.dtype == h5py.ref_dtype:
    cells = np.empty(data.shape, object)
    for index in np.ndindex(data.shape):
      cells[index] = _h5_value(f, f[data[index]], f"{where}[{index}]")
    return cells.T
  if matlab_class == "char":
    return "".join(map(chr, np.asarray(data).T.reshape(-1)))
  return np.asarray(data).T


def _load_v5(path: str, keys: Sequence[str]) -> dict[str, Any]:
  try:
    import scipy.io  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(path, "is not a MATLAB v7.3 (HDF5) file; reading older "
                    ".mat files needs scipy (pip install scipy)",
                    "corrupt_file") from None
  try:
    contents = scipy.io.loadmat(path, variable_names=list(keys))
  # scipy's parser fails on a text or cut-short file with whatever its code
  # hits (MatReadError, IndexError, struct.error, ...): any of them means the
  # file is unreadable.
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(path, f"not a readable MATLAB .mat file: {e}", "corrupt_file") from None
  missing = [k for k in keys if k not in contents]
  if missing:
    available = sorted(w[0] for w in scipy.io.whosmat(path))
    raise DataError(path, f"missing key(s) {missing}; the file has {available}",
                    "missing_key")
  return {k: _v5_value(contents[k]) for k in keys}


def _v5_value(value):
  if isinstance(value, str):
    return value
  value = np.asarray(value)
  if value.dtype.kind == "U":
    return "".join(value.reshape(-1).tolist())
  if value.dtype == object:
    cells = np.empty(value.shape, object)
    for index in np.ndindex(value.shape):
      cells[index] = _v5_value(value[index])
    return cells
  return value
