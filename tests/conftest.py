"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

Both are set through the environment at import time of this conftest,
before any test module imports jax, so subprocesses started by tests
(multi-host, resume, export) inherit them too.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Many tests build the same tiny model; compiling its initialiser alone takes
# tens of seconds on a 2-core CPU (one unrolled random-bits kernel per
# parameter). XLA's persistent cache makes every later compile of the same
# program a file read, across test workers and subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "fgtbt_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The README runs the suite as `pytest -n 2 --dist loadscope`: each module
# goes whole to one worker (so a module-scoped fixture, such as a training
# run, is made once), in collection order. Starting the longest modules first
# keeps the end of the run from waiting on one of them alone.
_LONGEST_FIRST = ("test_run.py", "test_remat.py", "test_trained_model.py", "test_multihost.py",
                  "test_heads.py", "test_benchmarks.py", "test_resume.py", "test_train.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
