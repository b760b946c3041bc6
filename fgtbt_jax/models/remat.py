"""What the train step keeps for the backward pass: the network's rematerialisation policy.

A train step saves, for the backward pass, values its forward pass made.
Saved as they are (policy "none"), the paper network at 480 px keeps about
13 GiB per 4 images in float32 (JAX's own count, `benchmarks/memory.py
--residuals`), most of it the outputs of cheap elementwise operations:
LayerNorm and BatchNorm in float32, the exact GELU's erfc and exp, the
attention softmax, dropout masks, all at the stage's full resolution. The
policies below run the network's forward pass under `jax.checkpoint` with a
rule for what to keep; everything else is recomputed in the backward pass
from the kept values, which gives the same gradients (the same operations on
the same values):

  "none"           keep everything (no recomputation);
  "dots"           keep the outputs of matrix multiplies and convolutions
                   (`jax.checkpoint_policies.dots_saveable`); recompute the
                   elementwise work: norms, activations, softmax, dropout;
  "dots_no_batch"  keep only the outputs of the parameter matmuls (no batch
                   dimensions, `dots_with_no_batch_dims_saveable`); also
                   recompute the convolutions and the attention products;
  "nothing"        keep only the network's inputs and parameters: the whole
                   forward pass runs again in the backward pass;
  "auto"           "dots" on GPUs and TPUs, "none" on CPU: XLA:CPU schedules
                   the recomputation at the start of the backward pass, all
                   of it at once, so there it raises the step's peak instead
                   of lowering it (measured: benchmarks/README.md).

`model.remat` (per Transformer block, `nn.remat`) is separate and older; it
composes with these. The measured bytes and step times of each are in
benchmarks/README.md ("Memory budget").
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax

REMAT_POLICIES = ("auto", "none", "dots", "dots_no_batch", "nothing")

_POLICIES = {
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
}

F = TypeVar("F", bound=Callable)


def resolve_remat_policy(policy: str, backend: str | None = None) -> str:
  """The policy "auto" stands for on `backend` (default: JAX's default backend).

  Raises:
    ValueError: an unknown policy name.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model config: remat_policy={policy!r}; expected one of {REMAT_POLICIES}")
  if policy != "auto":
    return policy
  return "none" if (backend or jax.default_backend()) == "cpu" else "dots"


def rematerialize(fn: F, policy: str) -> F:
  """`fn` under `jax.checkpoint` with the named policy ("none": `fn` itself).

  Raises:
    ValueError: an unknown policy name.
  """
  policy = resolve_remat_policy(policy)
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=_POLICIES[policy])
