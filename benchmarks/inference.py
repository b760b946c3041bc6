"""Inference latency and throughput of the crop -> landmarks function.

    python -m benchmarks.inference [--config=configs/default.py] \\
        [--batch=1,32,128] [--dtype=float32,bfloat16] [--flip_test=false,true] \\
        [--iterations=20] [--warmup=2] [--noend_to_end] [--e2e_images=8]

    python -m benchmarks.inference --config=configs/fgtbt_paper.py \\
        --dtype=bfloat16 --batch=1,128                 # the paper network at 480

Times the jitted function that `fgtbt_jax.deploy.predictor.Predictor` runs on
network crops (`Predictor.inference_fn`: normalisation, the model in eval
mode, with the flip test the mirrored crops in the same batch and the merged
heatmaps, decoding to crop pixels) on random weights and random uint8 crops
already on the device, so face detection and host-side cropping are
excluded. For each (compute dtype, flip test, batch) one JSON line:
compile_s, per-call latency (median / 90th percentile / minimum, in ms) and
images/s at the median, and XLA's FLOPs per call next to the analytic
model FLOPs (2 x multiply-adds per image, x 2 with the flip test).

--end_to_end (default on) adds, for context, whole-image
`Predictor.predict` timings on synthetic face images: with the face boxes
given (host crop + device batch + mapping back) and with the default Haar
detector (when this OpenCV has it). Not a test: numbers depend on the
machine and its load.
"""

from __future__ import annotations

import statistics
import sys
import time

from absl import flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from benchmarks import common
from fgtbt_jax.data import synthetic
from fgtbt_jax.deploy import detector as detector_lib
from fgtbt_jax import inference as inference_lib
from fgtbt_jax import models
from fgtbt_jax.deploy import predictor as predictor_lib
from fgtbt_jax.models import cost

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (its model is benchmarked); "
    "--config.x=y overrides fields.", flag_values=FLAGS, lock_config=True)
_BATCH = flags.DEFINE_list("batch", ["1", "32", "128"], "Crops per call.", flag_values=FLAGS)
_DTYPE = flags.DEFINE_list("dtype", ["float32", "bfloat16"], "Compute dtypes.",
                           flag_values=FLAGS)
_FLIP_TEST = flags.DEFINE_list("flip_test", ["false", "true"],
                               "Flip-test settings to time (false, true).", flag_values=FLAGS)
_DECODER = flags.DEFINE_enum("decoder", "subpixel", ["argmax", "quarter", "subpixel"],
                             "Heatmap decoder.", flag_values=FLAGS)
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "Timed calls per setting.", lower_bound=1,
                                   flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.", lower_bound=0,
                               flag_values=FLAGS)
_END_TO_END = flags.DEFINE_bool("end_to_end", True, "Also time Predictor.predict on whole images.",
                                flag_values=FLAGS)
_E2E_IMAGES = flags.DEFINE_integer("e2e_images", 8, "Whole images per predict call.",
                                   lower_bound=1, flag_values=FLAGS)
_E2E_IMAGE_SIZE = flags.DEFINE_integer("e2e_image_size", 640, "Side of the whole images.",
                                       lower_bound=64, flag_values=FLAGS)
_E2E_BATCH = flags.DEFINE_integer("e2e_batch", predictor_lib.DEFAULT_BATCH_SIZE,
                                  "Predictor batch size in the end-to-end timing.",
                                  lower_bound=1, flag_values=FLAGS)
_E2E_ITERATIONS = flags.DEFINE_integer("e2e_iterations", 5, "Timed predict calls.",
                                       lower_bound=1, flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.",
                             flag_values=FLAGS)

_BOOLEANS = {"true": True, "false": False, "on": True, "off": False, "1": True, "0": False}


def parse_flip_tests(values: list[str]) -> list[bool]:
  """--flip_test values as booleans; ValueError naming a bad one."""
  parsed = []
  for value in values:
    if value.lower() not in _BOOLEANS:
      raise ValueError(f"--flip_test={value!r}: expected true or false")
    parsed.append(_BOOLEANS[value.lower()])
  return parsed


def make_predictor(model_config: ml_collections.ConfigDict, dtype: str, batch_size: int,
                   seed: int) -> predictor_lib.Predictor:
  """A Predictor of the config's model with random float32 weights."""
  model = models.build_model(model_config)
  abstract = models.abstract_variables(model, model_config.input_size)
  variables = models.random_variables(abstract, seed)
  return predictor_lib.Predictor(model_config, variables, dtype=dtype, batch_size=batch_size,
                                 detector=None)


def time_crops(predictor: predictor_lib.Predictor, batch: int, flip_test: bool, decoder: str,
               iterations: int, warmup: int, seed: int) -> dict:
  """Compiles and times the crop -> landmarks function on one batch of crops."""
  size = predictor.image_size
  rng = np.random.default_rng(seed)
  crops = jax.device_put(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
  start = time.perf_counter()
  settings = inference_lib.PredictSettings(decoder=decoder, flip_test=flip_test)
  compiled = predictor.inference_fn(settings).lower(predictor.variables, crops).compile()
  compile_s = time.perf_counter() - start
  call = lambda: compiled(predictor.variables, crops)
  common.time_calls(call, warmup)
  seconds = common.time_calls(call, iterations)
  median = statistics.median(seconds)
  p90 = float(np.percentile(seconds, 90))
  config = predictor.model_config
  analytic = 2.0 * cost.count_macs(config)["total"] * batch * (2 if flip_test else 1)
  xla_flops = common.compiled_flops(compiled)
  return {
      "benchmark": "inference_crops",
      "variant": config.variant,
      "input_size": size,
      "dtype": config.dtype,
      "flip_test": flip_test,
      "decoder": decoder,
      "batch": batch,
      "compile_s": round(compile_s, 2),
      "iterations": iterations,
      "latency_ms": round(median * 1e3, 3),
      "latency_ms_p90": round(p90 * 1e3, 3),
      "latency_ms_min": round(min(seconds) * 1e3, 3),
      "images_per_s": round(batch / median, 1),
      "xla_flops_per_call": xla_flops,
      "analytic_flops_per_call": analytic,
      **common.peak_memory(jax.devices()[0]),
  }


def time_end_to_end(predictor: predictor_lib.Predictor, num_images: int, image_size: int,
                    iterations: int, seed: int) -> list[dict]:
  """Whole-image Predictor.predict: with given boxes, and with the default detector."""
  faces = [synthetic.render_face(seed, i, image_size) for i in range(num_images)]
  images = [image for image, _, _ in faces]
  boxes = [detector_lib.landmark_box(points)[None] for _, points, _ in faces]
  common_fields = {"variant": predictor.model_config.variant, "input_size": predictor.image_size,
                   "dtype": predictor.model_config.dtype, "flip_test": True,
                   "predictor_batch": predictor.batch_size, "images_per_call": num_images,
                   "image_side": image_size, "iterations": iterations}

  def timed(name: str, call) -> dict:
    start = time.perf_counter()
    results = call()  # Compiles on first use.
    first_s = time.perf_counter() - start
    seconds = []
    for _ in range(iterations):
      start = time.perf_counter()
      call()
      seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"benchmark": name, **common_fields, "first_call_s": round(first_s, 2),
            "call_s": round(median, 4), "ms_per_image": round(median / num_images * 1e3, 2),
            "images_per_s": round(num_images / median, 1),
            "faces_found": int(sum(r.num_faces for r in results))}

  records = [timed("predict_with_boxes", lambda: predictor.predict(images, boxes=boxes))]
  try:
    detector = predictor.detector
  except detector_lib.DetectorUnavailableError as e:
    records.append({"benchmark": "predict_with_detector", **common_fields,
                    "skipped": f"{type(e).__name__}: {e}"})
    return records
  record = timed("predict_with_detector", lambda: predictor.predict(images))
  record["detector"] = type(detector).__name__
  records.append(record)
  return records


def main(argv: list[str]) -> int:
  FLAGS(argv)
  config = _CONFIG.value
  flip_tests = parse_flip_tests(_FLIP_TEST.value)
  batches = common.parse_batches(_BATCH.value)
  if not batches:
    raise ValueError("--batch: give at least one batch size")
  common.emit(common.machine_record())
  for dtype in _DTYPE.value:
    predictor = make_predictor(config.model, dtype, max(batches), _SEED.value)
    for flip_test in flip_tests:
      for batch in batches:
        common.emit(time_crops(predictor, batch, flip_test, _DECODER.value, _ITERATIONS.value,
                               _WARMUP.value, _SEED.value))
  if _END_TO_END.value:
    predictor = make_predictor(config.model, _DTYPE.value[0], _E2E_BATCH.value, _SEED.value)
    for record in time_end_to_end(predictor, _E2E_IMAGES.value, _E2E_IMAGE_SIZE.value,
                                  _E2E_ITERATIONS.value, _SEED.value):
      common.emit(record)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
