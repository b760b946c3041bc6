"""onnxruntime, JAX and the PyTorch peer on this CPU: the crop -> landmarks predict function.

    python -m benchmarks.onnx_timing [--configs tiny,paper] [--batches 1,32] \\
        [--paper_batches 1,2] [--repeats 20] [--paper_repeats 3] [--no_flip_test] [--no_peer] \\
        [--out_dir /tmp/fgtbt_onnx]

For each model variant (random weights: the cost does not depend on the
values) and batch size B: the predict function (`inference.make_predict_fn`,
the one `Predictor` runs; the flip test on unless --no_flip_test) jitted by
JAX and exported to ONNX (`fgtbt_jax.deploy.onnx_export.export_onnx`), both
run on the same random uint8 crops (B, S, S, 3) in this one process, the
calls alternating (JAX, onnxruntime, JAX, ...; with the peer below, rounds
of four) so that a change in the machine's load hits all alike. One JSON line per setting: export and
compile times, per-call median and minimum in ms for each, images/s, and
the largest landmark difference between the two (crop pixels). The first
line describes the machine (CPU model, cores, load average).

The PyTorch peer (unless --no_peer; needs torch and transformers) is the
one of `benchmarks/segformer.py`: transformers' `SegformerModel`, the MiT
encoder of the variant's widths, depths, heads and reduction ratios, with
plain patch embeddings and no FGSA, random weights. There is no PyTorch
peer of the whole predict function (FGSA, the decoder head and the landmark
decoding exist only in this project), so the peer times what it can: the
same uint8 crops normalised, the encoder's four stage maps, and with the
flip test a second pass on the mirrored crops (as the predict function runs
two forwards), eval mode, float32, `torch.no_grad`, all cores. Next to it,
in the same alternating round, runs the same encoder in JAX
(`models.build_encoder`, plain patch embeddings, FGSA off) with the peer's
weights loaded (`weights.imagenet.mit_from_torch`), jitted: the like-for-like
pair. A round is JAX predict, onnxruntime, JAX encoder, PyTorch encoder;
`torch_vs_jax_encoder` > 1 means PyTorch is slower. The record also gives
the largest difference of the two encoders' stage maps on the crops.
PyTorch's OpenMP threads wait passively here (OMP_WAIT_POLICY=PASSIVE unless
the environment sets it, recorded as `omp_wait_policy`): with OpenMP's
default busy waiting, on this project's 2-core machine loaded by other jobs
(load 5-6), the tiny encoder's eager calls (batch 1, flip test, 2 threads)
took 41-2,035 ms (two runs of 10 calls, medians 0.2-0.3 s) where passive
waiting gave 11-66 ms (medians 12 ms), measured 2026-12-06.
Not a test: numbers depend on the machine and its load (docs/onnx.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Before torch loads (libgomp reads it then; benchmarks.common's imports load
# torch through tensorboardX): PyTorch's OpenMP threads wait passively.
_OMP_WAIT_POLICY = (os.environ.get("OMP_WAIT_POLICY", "default")
                    if "torch" in sys.modules else os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE"))

import jax
import numpy as np

from benchmarks import common
from fgtbt_jax import models
from fgtbt_jax.deploy import onnx_export
from fgtbt_jax.deploy import predictor as predictor_lib


def cpu_model() -> str:
  """The CPU's model name (`lscpu`), else the platform's processor string."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    out = ""
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def make_predictor(variant: str, batch: int, flip_test: bool, seed: int
                   ) -> predictor_lib.Predictor:
  config = models.model_config(variant)
  model = models.build_model(config)
  variables = models.random_variables(models.abstract_variables(model, config.input_size), seed)
  predictor = predictor_lib.Predictor(config, variables, batch_size=batch)
  predictor.settings = predictor.settings.replace(flip_test=flip_test)
  return predictor


def peer_calls(variant: str, crops: np.ndarray, flip_test: bool, seed: int) -> dict:
  """name -> () -> the four stage maps as numpy: the JAX encoder and the PyTorch peer.

  Both normalise the uint8 crops as the predict function does and, with the
  flip test, run a second pass on the mirrored crops; both get the crops as
  a numpy array on every call, as the predict function and onnxruntime do.
  """
  import torch
  from benchmarks import segformer
  torch.set_num_threads(os.cpu_count() or 1)
  encoder = models.model_config(variant).encoder
  peer, _, module, params = segformer.build_pair(encoder, seed)
  mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
  std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1) * 255.0

  def jax_encoder(params, crops):
    images = models.normalize_images(crops)
    maps = module.apply({"params": params}, images, None, train=False)
    if flip_test:
      maps = tuple(maps) + tuple(module.apply({"params": params}, images[:, :, ::-1, :], None,
                                              train=False))
    return maps

  compiled = jax.jit(jax_encoder).lower(params, jax.device_put(crops)).compile()

  def torch_encoder():
    with torch.no_grad():
      images = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() - mean) / std
      maps = peer(pixel_values=images, output_hidden_states=True).hidden_states
      if flip_test:
        maps = tuple(maps) + tuple(peer(pixel_values=images.flip(-1),
                                        output_hidden_states=True).hidden_states)
    return maps

  return {
      "jax_encoder": lambda: jax.block_until_ready(compiled(params, jax.device_put(crops))),
      "torch_encoder": torch_encoder,
  }


def time_setting(variant: str, batch: int, flip_test: bool, repeats: int, warmup: int,
                 out_dir: pathlib.Path, seed: int, threads: int | None,
                 peer: bool = True) -> dict:
  load_start = round(os.getloadavg()[0], 2)
  predictor = make_predictor(variant, batch, flip_test, seed)
  size = predictor.image_size
  crops = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  path = out_dir / f"{variant}_b{batch}_flip{int(flip_test)}.onnx"

  start = time.perf_counter()
  onnx_export.export_onnx(predictor, path)
  export_s = time.perf_counter() - start
  start = time.perf_counter()
  runtime = onnx_export.OnnxPredictor(path, threads=threads)
  session_s = time.perf_counter() - start

  start = time.perf_counter()
  on_device = jax.device_put(crops)
  compiled = predictor.inference_fn().lower(predictor.variables, on_device).compile()
  compile_s = time.perf_counter() - start

  jax_call = lambda: jax.block_until_ready(compiled(predictor.variables, jax.device_put(crops)))
  onnx_call = lambda: runtime(crops)
  calls = {"jax": jax_call, "onnxruntime": onnx_call}
  peer_s = None
  if peer:
    start = time.perf_counter()
    calls.update(peer_calls(variant, crops, flip_test, seed))
    peer_s = time.perf_counter() - start
  for _ in range(warmup):
    for call in calls.values():
      call()
  seconds = {name: [] for name in calls}
  for _ in range(repeats):  # Alternating: the load of the moment hits all alike.
    for name, call in calls.items():
      begin = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - begin)
  jax_points = np.asarray(jax_call()[0])
  onnx_points = onnx_call()[0]
  record = {
      "benchmark": "onnx_timing", "variant": variant, "input_size": size, "batch": batch,
      "flip_test": flip_test, "decoder": predictor.settings.decoder, "repeats": repeats,
      "export_s": round(export_s, 1), "onnx_mb": round(path.stat().st_size / 1e6, 1),
      "session_s": round(session_s, 2), "jax_compile_s": round(compile_s, 2),
      "max_point_difference_px": float(np.abs(onnx_points - jax_points).max()),
  }
  for name, values in seconds.items():
    median = statistics.median(values)
    record[f"{name}_ms"] = round(median * 1e3, 2)
    record[f"{name}_ms_min"] = round(min(values) * 1e3, 2)
    record[f"{name}_images_per_s"] = round(batch / median, 2)
  record["onnxruntime_speedup"] = round(record["jax_ms"] / record["onnxruntime_ms"], 2)
  if peer:
    jax_maps = calls["jax_encoder"]()
    torch_maps = calls["torch_encoder"]()
    record["peer"] = "transformers.SegformerModel (encoder only, plain patch embedding, no FGSA)"
    record["peer_setup_s"] = round(peer_s, 2)
    record["encoder_max_abs_difference"] = max(
        float(np.abs(np.asarray(j) - t.numpy().transpose(0, 2, 3, 1)).max())
        for j, t in zip(jax_maps, torch_maps))
    record["torch_vs_jax_encoder"] = round(record["torch_encoder_ms"] / record["jax_encoder_ms"], 2)
    record["torch_threads"] = __import__("torch").get_num_threads()
  record["load_average_1min_start"] = load_start
  record["load_average_1min"] = round(os.getloadavg()[0], 2)
  # The process's peak so far (all settings before this one included).
  record["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 1)
  return record


def parse_list(value: str, cast, name: str) -> list:
  try:
    items = [cast(v) for v in value.split(",") if v]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--{name}={value!r}: bad value") from None
  if not items:
    raise argparse.ArgumentTypeError(f"--{name}: give at least one value")
  return items


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_timing",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="tiny,paper",
                      type=lambda v: parse_list(v, str, "configs"),
                      help="model variants (models.model_config names)")
  parser.add_argument("--batches", default="1,32", type=lambda v: parse_list(v, int, "batches"))
  parser.add_argument("--paper_batches", default="1,2",
                      type=lambda v: parse_list(v, int, "paper_batches"),
                      help="batch sizes for the paper variant (480 px: at 8 the process "
                           "outgrew a 23 GB machine)")
  parser.add_argument("--repeats", type=int, default=20, help="timed calls of each runtime")
  parser.add_argument("--paper_repeats", type=int, default=3,
                      help="timed calls for the paper variant (seconds per call on a CPU)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each runtime")
  parser.add_argument("--no_flip_test", dest="flip_test", action="store_false",
                      help="time the predict function without the flip test")
  parser.add_argument("--no_peer", dest="peer", action="store_false",
                      help="leave out the PyTorch peer (transformers' SegformerModel encoder) "
                           "and its JAX counterpart")
  parser.add_argument("--threads", type=int, default=None,
                      help="onnxruntime intra-op threads (default: its own, all cores)")
  parser.add_argument("--out_dir", default=None,
                      help="where the .onnx files go (default: a temporary folder)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for variant in args.configs:
    models.model_config(variant)  # An unknown name fails before anything runs.
  if min(args.batches + args.paper_batches) < 1 or min(args.repeats, args.paper_repeats) < 1:
    parser.error("batches and repeats must be at least 1")

  machine = common.machine_record()
  machine.update(cpu_model=cpu_model(), onnxruntime=_version("onnxruntime"),
                 jax2onnx=_version("jax2onnx"), python=platform.python_version())
  if args.peer:
    machine.update(torch=_version("torch"), transformers=_version("transformers"),
                   omp_wait_policy=_OMP_WAIT_POLICY)
  common.emit(machine)
  with tempfile.TemporaryDirectory() as scratch:
    out_dir = pathlib.Path(args.out_dir or scratch)
    out_dir.mkdir(parents=True, exist_ok=True)
    for variant in args.configs:
      repeats = args.paper_repeats if variant == "paper" else args.repeats
      for batch in args.paper_batches if variant == "paper" else args.batches:
        common.emit(time_setting(variant, batch, args.flip_test, repeats, args.warmup, out_dir,
                                 args.seed, args.threads, args.peer))
  return 0


def _version(name: str) -> str:
  try:
    from importlib import metadata
    return metadata.version(name)
  except Exception:  # Not installed: the export above would have said so.
    return "not installed"


if __name__ == "__main__":
  sys.exit(main())
