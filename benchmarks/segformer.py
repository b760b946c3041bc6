"""Side by side with a public PyTorch peer: transformers' SegformerModel vs this project's MiT.

    python -m benchmarks.segformer [--encoder=paper] [--size=128] [--batch=8] \\
        [--iterations=5] [--frameworks=jax,torch,torch_compile] \\
        [--dtypes=float32,bfloat16] [--passes=forward,forward_backward]

Both sides compute the same function with the same weights: a
`transformers.SegformerModel` (the MiT encoder, `--encoder`'s widths, depths,
heads and reduction ratios, LayerNorm epsilon 1e-5, plain overlapping patch
embeddings) with random weights, and this project's encoder
(`models.build_encoder`, FGSA off, patch_embed "plain") with those weights
loaded through `fgtbt_jax.weights.imagenet.mit_from_torch`. The first record
checks it: the largest difference of the four stage maps in float32.

Each (framework, dtype, pass) is compiled or warmed up first; then the timed
calls of all of them are interleaved, round after round, so that a change of
the machine's load hits them alike. Reported per configuration: the median,
minimum and mean of `--iterations` calls, images/s, and the ratio to the JAX
figure of the same dtype and pass (`vs_jax` > 1: slower than JAX).

* "forward": the four stage maps of a batch of images, eval mode.
* "forward_backward": the gradient of the maps' sum with respect to every
  weight, eval mode (no dropout or stochastic depth, so the same function on
  both sides).
* PyTorch "bfloat16" is `torch.autocast` (matmuls and convolutions in bf16,
  weights float32), JAX "bfloat16" the model's compute dtype (the same: bf16
  compute, float32 weights); "torch_compile" is `torch.compile` of the same
  module (default mode), its compile time reported.

Threads: PyTorch gets `torch.set_num_threads(os.cpu_count())` on CPU, as
XLA:CPU uses every core. Not a test; `tests/test_benchmarks.py` runs it once
at a tiny size.
"""

from __future__ import annotations

import dataclasses

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fgtbt_jax import models
from fgtbt_jax.weights import imagenet

FRAMEWORKS = ("jax", "torch", "torch_compile")
DTYPES = ("float32", "bfloat16")
PASSES = ("forward", "forward_backward")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--encoder", default="paper", choices=tuple(models.ENCODERS))
  parser.add_argument("--size", type=int, default=128, help="input side, a multiple of 32")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--iterations", type=int, default=5)
  parser.add_argument("--frameworks", default="jax,torch,torch_compile")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--passes", default="forward,forward_backward")
  parser.add_argument("--seed", type=int, default=0)
  return parser


def _choices(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
  names = [v for v in value.split(",") if v]
  bad = [v for v in names if v not in allowed]
  if bad or not names:
    raise ValueError(f"--{flag}={value!r}: expected a comma list of {allowed}")
  return names


def segformer_config(encoder: str):
  """transformers' SegformerConfig of one of `models.ENCODERS`."""
  import transformers
  spec = models.ENCODERS[encoder]
  return transformers.SegformerConfig(
      num_encoder_blocks=4, depths=list(spec.depths), hidden_sizes=list(spec.dims),
      num_attention_heads=list(spec.num_heads), sr_ratios=list(spec.sr_ratios),
      patch_sizes=list(spec.patch_sizes), strides=list(spec.strides),
      drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_pair(encoder: str, seed: int):
  """(torch SegformerModel in eval mode, JAX encoder module, its params) with the same weights."""
  import torch
  import transformers
  torch.manual_seed(seed)
  peer = transformers.SegformerModel(segformer_config(encoder)).eval()
  config = models.model_config(encoder, patch_embed="plain", fgsa=False,
                               norm_epsilon=1e-5, embed_norm_epsilon=1e-5)
  template = models.random_variables(
      models.abstract_variables(models.build_model(config), 64), seed)["params"]
  state = {k: v.detach().numpy().copy() for k, v in peer.state_dict().items()}
  params, report = imagenet.mit_from_torch(state, config, params=template)
  missing = [path for path in report.missing if path.startswith("encoder/")]
  if missing or report.skipped:
    raise RuntimeError("benchmarks.segformer: the peer's weights did not all load:\n"
                       + report.summary())
  encoder_params = nn.meta.unbox(params)["encoder"]
  return peer, config, models.build_encoder(config), jax.device_put(encoder_params)


def jax_functions(module, config, params, dtype: str) -> dict[str, Callable]:
  """pass -> jitted (params, images) -> outputs."""
  if dtype != "float32":
    module = module.clone(compute=dataclasses.replace(module.compute, dtype=jnp.bfloat16))

  def forward(params, images):
    return module.apply({"params": params}, images, None, train=False)

  def total(params, images):
    return sum(jnp.sum(x.astype(jnp.float32)) for x in forward(params, images))

  return {"forward": jax.jit(forward), "forward_backward": jax.jit(jax.grad(total))}


def torch_functions(peer, compiled: bool, dtype: str) -> tuple[dict[str, Callable], float]:
  """pass -> (images tensor) -> outputs, and the seconds torch.compile took to set up."""
  import torch
  model = peer
  compile_s = 0.0
  if compiled:
    start = time.perf_counter()
    model = torch.compile(peer)
    compile_s = time.perf_counter() - start
  autocast = dtype == "bfloat16"

  def run(images):
    with torch.autocast("cpu" if images.device.type == "cpu" else "cuda",
                        dtype=torch.bfloat16, enabled=autocast):
      return model(pixel_values=images, output_hidden_states=True).hidden_states

  def forward(images):
    with torch.no_grad():
      out = run(images)
    _sync(images)
    return out

  def forward_backward(images):
    peer.zero_grad(set_to_none=True)
    out = run(images)
    sum(x.float().sum() for x in out).backward()
    _sync(images)
    return out

  return {"forward": forward, "forward_backward": forward_backward}, compile_s


def _sync(images) -> None:
  import torch
  if images.device.type == "cuda":
    torch.cuda.synchronize()


def parity(peer, module, params, size: int, seed: int) -> float:
  """Largest |difference| of the four float32 stage maps (NHWC) on one random batch."""
  import torch
  images = np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = peer(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)).to(_device()),
                  output_hidden_states=True).hidden_states
  ours = module.apply({"params": params}, jnp.asarray(images), None, train=False)
  return max(float(np.abs(np.asarray(o) - t.cpu().numpy().transpose(0, 2, 3, 1)).max())
             for o, t in zip(ours, theirs))


def _device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  frameworks = _choices(args.frameworks, FRAMEWORKS, "frameworks")
  dtypes = _choices(args.dtypes, DTYPES, "dtypes")
  passes = _choices(args.passes, PASSES, "passes")
  if args.size < 32 or args.size % 32:
    raise ValueError(f"--size={args.size}: must be a positive multiple of 32")
  import torch
  device = _device()
  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  common.emit({**common.machine_record(), "torch": torch.__version__,
               "torch_device": device, "torch_threads": torch.get_num_threads()})

  peer, config, module, params = build_pair(args.encoder, args.seed)
  peer = peer.to(device)
  common.emit({"benchmark": "segformer_parity", "encoder": args.encoder, "size": args.size,
               "max_abs_difference_float32": parity(peer, module, params, args.size, args.seed)})

  rng = np.random.default_rng(args.seed)
  images = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
  jax_images = jax.device_put(images)
  torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)

  calls, records = {}, {}
  for framework in frameworks:
    for dtype in dtypes:
      if framework == "jax":
        fns, setup_s = jax_functions(module, config, params, dtype), 0.0
        bound = {p: (lambda f=f: f(params, jax_images)) for p, f in fns.items()}
      else:
        fns, setup_s = torch_functions(peer, framework == "torch_compile", dtype)
        bound = {p: (lambda f=f: f(torch_images)) for p, f in fns.items()}
      for name in passes:
        key = (framework, dtype, name)
        start = time.perf_counter()
        jax.block_until_ready(bound[name]())  # compile / warm up
        first_s = time.perf_counter() - start + setup_s
        calls[key] = lambda fn=bound[name]: jax.block_until_ready(fn())
        records[key] = {"benchmark": "segformer", "framework": framework, "dtype": dtype,
                        "pass": name, "encoder": args.encoder, "size": args.size,
                        "batch": args.batch, "first_call_s": round(first_s, 3), "seconds": []}
  for _ in range(args.iterations):
    for key, call in calls.items():
      start = time.perf_counter()
      call()
      records[key]["seconds"].append(time.perf_counter() - start)
  for record in records.values():
    seconds = record.pop("seconds")
    median = statistics.median(seconds)
    record.update({"median_s": round(median, 5), "min_s": round(min(seconds), 5),
                   "mean_s": round(statistics.fmean(seconds), 5),
                   "images_per_s": round(args.batch / median, 2)})
  for (_, dtype, name), record in records.items():
    reference = records.get(("jax", dtype, name))
    if reference is not None:
      record["vs_jax"] = round(record["median_s"] / reference["median_s"], 3)
  for record in records.values():
    common.emit(record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
