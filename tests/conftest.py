"""Test setup: 8 simulated CPU devices for the sharding tests.

The flag must be set before JAX starts its backend, so it is set here, at
import time of the first conftest, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
