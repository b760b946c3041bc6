"""Shared helpers of the model tests."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


def numpy_variables(abstract, seed=0):
  """Random variables shaped like `abstract`, drawn with numpy.

  Kernels ~ N(0, 1 / fan_in), norm scales and running variances near 1, small
  biases and running means. Compiling the model's own initialisers costs
  seconds per parameter tensor on a busy 2-core CPU; forward-pass tests do
  not need them.
  """
  rng = np.random.RandomState(seed)
  flat = flatten_dict(nn.meta.unbox(abstract))
  out = {}
  for path, leaf in sorted(flat.items()):
    name = path[-1]
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.randn(*leaf.shape) / np.sqrt(fan_in)
    elif name in ("scale", "var"):
      value = 1.0 + 0.1 * rng.rand(*leaf.shape)
    else:  # biases, offsets, running means
      value = 0.05 * rng.randn(*leaf.shape)
    out[path] = jnp.asarray(value, jnp.float32)
  return unflatten_dict(out)
