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
  "dots_no_attention"  "dots" less the attention products (batched
                   matmuls): convolutions and parameter matmuls are kept, the
                   attention logits and softmax recomputed;
  "dots_no_batch"  keep only the outputs of the parameter matmuls (no batch
                   dimensions, `dots_with_no_batch_dims_saveable`); also
                   recompute the convolutions and the attention products;
  "nothing"        keep only the network's inputs and parameters: the whole
                   forward pass runs again in the backward pass;
  "segments"       built into the model (`build_model`), not a jax.checkpoint
                   rule: every Transformer block, patch embedding, stage-end
                   LayerNorm, FGSA Refine (the structure branch's patch
                   embedding, at full resolution in stage 1) and FGSA
                   injection, and the decoder keep only their inputs and run
                   again when the backward pass reaches them
                   (`recompute_in_backward`), one segment's values live at a
                   time, on every backend;
  "auto"           "dots_no_attention" on GPUs and TPUs, "none" on CPU: for
                   the devices of the mesh the step is traced under (a CPU
                   host compiling for a TPU topology gets
                   "dots_no_attention"), `target_platform`.

Under `jax.checkpoint` ("dots", "dots_no_batch", "nothing") XLA:CPU
schedules the recomputation at the start of the backward pass, all of it at
once, so there they raise the compiled step's peak instead of lowering it;
"segments" ties each recomputation to its segment's cotangent and lowers it
(paper step at 480, batch 8, bfloat16: 25.2 -> 4.75 GiB on XLA:CPU). "auto"
is "none" on CPU, the fastest step there. On TPU (the paper step compiled
for v5e by libtpu, 2 images per chip, benchmarks/README.md "HBM against on-chip
traffic") "dots_no_attention" needs the least memory and HBM traffic of the
jax.checkpoint rules: 2.89 GiB and 5.2 GB per image against 3.28 GiB and
5.7 GB for "dots", 5.2-5.3 GiB and 10-11 GB for "nothing" and
"dots_no_batch". After the exact rewrites of issue 29, at 8 images per
chip, "segments" (v5e: 2.75 GiB, 257 images/s per chip on the HBM
roofline) and "none" (v5e: 8.49 GiB, 250; v5p: 431 against 354) are
faster than "dots_no_attention" (v5e: 6.50 GiB, 213), but at 2 per v5e
chip both collapse (85 and 83 images/s against 192: the compiler expands
the stage-1 stem's stride-4 convolution into windows). "auto" keeps
"dots_no_attention", the only policy within 18 % of the best everywhere it
was compiled (2, 8, 16 and 24 images per v5e chip, 2 and 8 per v5p chip);
"none" is the choice from 8 images per chip (v5e: 250, 181 and 161
images/s against 213, 161 and 138 at 8, 16 and 24; it fits 32) and
"segments" keeps the least (benchmarks/README.md, "remat_policy=auto after
the rewrites"). An "auto" that picks "none" from 8 per chip is not built. GPU
figures are not measured yet (benchmarks/device_run.sh); "auto" takes the
TPU's choice there.

"dots", "dots_no_attention" and "dots_no_batch" also keep the decoder's
fused map (`DECODER_FUSION`, kept by name): a sum of four resized matmul
outputs, which they would otherwise keep term by term.

`model.remat` (each Transformer block only, `recompute_in_backward`)
composes with the jax.checkpoint policies. The measured bytes and step
times are in benchmarks/README.md ("Memory budget").
"""

from __future__ import annotations

from typing import Callable, TypeVar

from flax.core import lift
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from fgtbt_jax.models.partitioning import target_platform

REMAT_POLICIES = ("auto", "none", "dots", "dots_no_attention", "dots_no_batch", "nothing",
                  "segments")


def _dots_no_attention(prim, *args, **params) -> bool:
  """Saves convolutions and matmuls without batch dimensions: not the attention products.

  The attention logits and their softmax are (B, heads, N, N / R^2) float32,
  7x the size of the stage's tokens in stage 1 of the paper network; from the
  saved query and key/value projections the backward pass recomputes them
  with two small matmuls.
  """
  if prim.name == "conv_general_dilated":
    return True
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


# Values the matmul-keeping policies also keep, by `jax.ad_checkpoint.checkpoint_name`:
# the decoder's fused 768-channel map, a sum of four resized matmul outputs.
# Kept itself, it spares keeping its four terms and recomputing the sum (paper
# step on v5e, 8 images per chip: the decoder's HBM traffic 7.8 -> 6.9 GB per
# chip and step; benchmarks/README.md).
DECODER_FUSION = "decoder_fusion"
_NAMED = jax.checkpoint_policies.save_only_these_names(DECODER_FUSION)

_POLICIES = {
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable, _NAMED),
    "dots_no_attention": jax.checkpoint_policies.save_from_both_policies(
        _dots_no_attention, _NAMED),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _NAMED),
    "nothing": jax.checkpoint_policies.nothing_saveable,
}

F = TypeVar("F", bound=Callable)


def resolve_remat_policy(policy: str, platform: str | None = None) -> str:
  """The policy "auto" stands for on `platform` (default: the target devices'
  platform, `partitioning.target_platform()`: the mesh in context, else JAX's
  default backend).

  Raises:
    ValueError: an unknown policy name.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model config: remat_policy={policy!r}; expected one of {REMAT_POLICIES}")
  if policy != "auto":
    return policy
  return "none" if (platform or target_platform()) == "cpu" else "dots_no_attention"


def rematerialize(fn: F, policy: str) -> F:
  """`fn` under `jax.checkpoint` with the named policy ("none": `fn` itself).

  Raises:
    ValueError: an unknown policy name.
  """
  policy = resolve_remat_policy(policy)
  if policy in ("none", "segments"):  # "segments" is built into the model (`build_model`).
    return fn
  return jax.checkpoint(fn, policy=_POLICIES[policy])


def recompute_in_backward(fun: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
  """`fun` that keeps only its inputs and runs again when the backward pass reaches it.

  The same gradients as `jax.checkpoint(fun, policy=nothing_saveable)`, with
  one difference: the recomputation is made data-dependent on `fun`'s
  cotangent (every input gets `0 * cotangent[0]` added, which leaves its
  value unchanged), so no compiler can schedule it before the backward pass
  arrives at `fun`. Under `jax.checkpoint` XLA:CPU moves every segment's
  recomputation to the start of the backward pass, all of it live at once;
  an `optimization_barrier` does not stop it (XLA turns barriers into
  control dependencies, which its CPU pipeline drops). A non-finite
  cotangent element 0 makes the segment's gradients NaN (they would not be
  finite anyway).

  `fun` is traced once; the forward pass and the recomputation run that one
  trace (a second trace could differ, e.g. in Flax's rng counters). Outputs
  that are not arrays (e.g. a grid size) pass through as Python values.
  """
  static_argnums = tuple(sorted(static_argnums))

  def wrapped(*args):
    static = {i: args[i] for i in static_argnums}
    dynamic = [a for i, a in enumerate(args) if i not in static]
    structure = {}

    def arrays_out(dynamic_args):
      it = iter(dynamic_args)
      out = fun(*[static[i] if i in static else next(it) for i in range(len(args))])
      leaves, structure["tree"] = jax.tree.flatten(out)
      structure["python"] = [None if isinstance(x, jax.Array) else x for x in leaves]
      return [x for x in leaves if isinstance(x, jax.Array)]

    replay = jax.extend.core.jaxpr_as_fun(jax.make_jaxpr(arrays_out)(dynamic))
    evaluate = lambda dynamic_args: replay(*jax.tree.leaves(dynamic_args))

    @jax.custom_vjp
    def run(dynamic_args):
      return evaluate(dynamic_args)

    def forward(dynamic_args):
      return evaluate(dynamic_args), dynamic_args

    def backward(dynamic_args, cotangent):
      dynamic_args = _after(dynamic_args, _zero_of(cotangent))
      _, pullback = jax.vjp(evaluate, dynamic_args)
      return pullback(cotangent)

    run.defvjp(forward, backward)
    arrays = iter(run(dynamic))
    leaves = [next(arrays) if x is None else x for x in structure["python"]]
    return jax.tree.unflatten(structure["tree"], leaves)

  return wrapped


def _zero_of(tree) -> jax.Array:
  """A float32 0 computed from one element of `tree`'s first floating leaf."""
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size:
      return leaf.ravel()[0].astype(jnp.float32) * 0.0
  raise ValueError("recompute_in_backward: the cotangent has no floating-point value")


def _after(tree, zero: jax.Array):
  """`tree` with every leaf made data-dependent on `zero` (values unchanged when it is 0)."""
  flag = zero != zero  # False; XLA cannot fold it

  def tie(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
      return a + zero.astype(a.dtype)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      data = jax.random.key_data(a)
      return jax.random.wrap_key_data(data + flag.astype(data.dtype), impl=jax.random.key_impl(a))
    if a.dtype == jnp.bool_:
      return a | flag
    return a + flag.astype(a.dtype)

  return jax.tree.map(tie, tree)


def _lifted_recompute(fn, variables=True, rngs=True, static_argnums=()):
  """`recompute_in_backward` as a Flax core transform (the pattern of `lift.checkpoint`)."""

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    def scoped(variable_groups, rng_groups, *args):
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *args)
      return y, repack_fn(scope)
    shifted = tuple(i + 2 for i in static_argnums)
    return recompute_in_backward(scoped, shifted)(variable_groups, rng_groups, *args)

  return lift.pack(inner, (variables,), (variables,), (rngs,), name="remat")


def recompute_module(target, static_argnums: tuple[int, ...] = (), enabled: bool = True):
  """`target` run under `recompute_in_backward`, or `target` itself when not `enabled`.

  `target` is a linen Module class (its `__call__` is the segment) or a
  method `fn(module, *args)` (for a module whose submodules are shared
  across calls, e.g. FGSA's injection, once per block with the stage's
  channel attention and norm: the segment's inputs are the module's
  variables and the arguments). `static_argnums` count `self` as 0, as
  `nn.remat`'s do. The parameter tree is the target's own (the same names
  and checkpoints).
  """
  if not enabled:
    return target
  return nn.transforms.lift_transform(
      _lifted_recompute, target, static_argnums=tuple(i - 1 for i in static_argnums))
