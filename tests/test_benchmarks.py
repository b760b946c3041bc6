"""Smoke tests of the benchmark scripts: they run and print the records they promise.

The scripts run for one or two iterations of the tiny config on the 8
simulated CPU devices. Nothing here asserts a speed: only that every record
is valid JSON with its keys, and that the numbers are consistent (FLOP
counts near the analytic count, the batch layout as the pipeline makes it).
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from benchmarks import inference
from benchmarks import train_step
from configs import tiny
from fgtbt_jax import errors
from fgtbt_jax import landmarks
from fgtbt_jax import sharding
from fgtbt_jax import state as state_lib

_TINY = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiny.py")

TRAIN_STEP_KEYS = {
    "variant", "input_size", "dtype", "remat_policy", "batch", "samples_per_dataset",
    "devices", "mesh",
    "lower_s", "compile_s", "steps", "warmup", "step_s", "step_s_mean", "step_s_min",
    "steps_per_s", "images_per_s", "loss_after", "xla_flops_per_step",
    "analytic_flops_per_step", "xla_to_analytic", "peak_tflops", "peak_source",
    "peak_memory_bytes", "memory_source", "xla_memory_estimate_bytes", "config"}
BREAKDOWN_KEYS = {f"{part}{suffix}" for part in ("forward", "forward_loss", "forward_backward")
                  for suffix in ("_s", "_compile_s", "_xla_flops")} | {"full_step_s"}
INFERENCE_KEYS = {
    "variant", "input_size", "dtype", "flip_test", "decoder", "batch", "compile_s",
    "latency_ms", "latency_ms_p90", "latency_ms_min", "images_per_s", "xla_flops_per_call",
    "analytic_flops_per_call", "peak_memory_bytes", "memory_source"}


def _records(capsys) -> dict[str, list[dict]]:
  """The JSON lines printed so far, grouped by their "benchmark" field."""
  grouped: dict[str, list[dict]] = {}
  for line in capsys.readouterr().out.splitlines():
    record = json.loads(line)  # Every line must be one JSON object.
    grouped.setdefault(record["benchmark"], []).append(record)
  return grouped


def _check_machine(record: dict) -> None:
  assert record["backend"] == "cpu"
  assert record["device_count"] == 8
  assert record["jax"] == jax.__version__


@pytest.mark.slow  # Compiles the step of several configs (over a minute with a cold cache).
def test_train_step_prints_one_record_per_config_and_a_breakdown(capsys):
  assert train_step.main(["train_step", f"--config={_TINY}", "--steps=1", "--warmup=1",
                          "--breakdown"]) == 0
  records = _records(capsys)
  _check_machine(records["machine"][0])
  [record] = records["train_step"]
  assert TRAIN_STEP_KEYS <= record.keys()
  assert record["variant"] == "tiny" and record["batch"] == 8 and record["devices"] == 8
  assert record["mesh"] == {"data": 8, "fsdp": 1}
  assert record["config"] == _TINY
  assert math.isfinite(record["loss_after"])
  assert record["step_s"] > 0 and record["images_per_s"] > 0
  # XLA counts one device's program: the model on its sample plus the loss,
  # norms and the (replicated) optimizer and EMA updates, so a bit more
  # than the analytic 6 x multiply-adds, never less, never many times more.
  assert 1.0 < record["xla_to_analytic"] < 3.0
  # CPU: no listed peak, so achieved GFLOP/s instead of MFU.
  assert record["peak_tflops"] is None and "mfu" not in record
  assert record["achieved_gflops_per_s"] > record["model_achieved_gflops_per_s"] > 0
  assert record["memory_source"].startswith("process max RSS")
  assert record["peak_memory_bytes"] > record["xla_memory_estimate_bytes"] > 0
  [breakdown] = records["train_step_breakdown"]
  assert BREAKDOWN_KEYS <= breakdown.keys()
  # The gradient costs more FLOPs than the forward pass with its loss,
  # which costs more than the forward pass alone.
  assert (breakdown["forward_backward_xla_flops"] > breakdown["forward_loss_xla_flops"]
          > breakdown["forward_xla_flops"] > 0)


def test_train_step_out_of_memory_gives_a_record_with_the_error(monkeypatch):
  message = "RESOURCE_EXHAUSTED: Out of memory allocating 27548222272 bytes."

  def out_of_memory(fn, count):
    raise jax.errors.JaxRuntimeError(message)

  monkeypatch.setattr(common, "time_calls", out_of_memory)
  config = train_step.benchmark_config(tiny.get_config(), 8, "float32")
  [record] = train_step.time_step(config, steps=1, warmup=1, seed=0)
  assert record["error"] == message
  assert record["xla_memory_estimate_bytes"] > 0 and record["compile_s"] >= 0
  assert "step_s" not in record
  assert not train_step.out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: other failure"))


def test_inference_prints_crop_and_end_to_end_records(capsys):
  assert inference.main(["inference", f"--config={_TINY}", "--batch=2", "--dtype=float32",
                         "--flip_test=false,true", "--iterations=1", "--warmup=0",
                         "--e2e_images=2", "--e2e_iterations=1", "--e2e_batch=2",
                         "--e2e_image_size=128"]) == 0
  records = _records(capsys)
  _check_machine(records["machine"][0])
  crops = records["inference_crops"]
  assert [r["flip_test"] for r in crops] == [False, True]
  for record in crops:
    assert INFERENCE_KEYS <= record.keys()
    assert record["batch"] == 2 and record["images_per_s"] > 0
    assert 0.8 < record["xla_flops_per_call"] / record["analytic_flops_per_call"] < 2.0
  # The flip test runs the model on twice the images.
  assert crops[1]["analytic_flops_per_call"] == 2 * crops[0]["analytic_flops_per_call"]
  [with_boxes] = records["predict_with_boxes"]
  assert with_boxes["faces_found"] == 2 and with_boxes["images_per_s"] > 0
  [with_detector] = records["predict_with_detector"]
  assert "skipped" in with_detector or with_detector["faces_found"] >= 0


def test_bad_benchmark_arguments_are_named():
  config = tiny.get_config()
  with pytest.raises(ValueError, match=r"--batch=6: the global batch must be k x 4"):
    train_step.benchmark_config(config, 6, "float32")
  with pytest.raises(ValueError, match=r"dtype='float16'"):
    train_step.benchmark_config(config, 8, "float16")
  with pytest.raises(errors.ConfigError, match=r"must divide by the number of devices \(8\)"):
    train_step.benchmark_config(config, 4, "float32")
  with pytest.raises(ValueError, match=r"--batch='x'"):
    common.parse_batches(["8", "x"])
  with pytest.raises(ValueError, match=r"--batch='0'"):
    common.parse_batches(["0"])
  with pytest.raises(ValueError, match=r"--flip_test='maybe'"):
    inference.parse_flip_tests(["true", "maybe"])
  assert inference.parse_flip_tests(["false", "ON"]) == [False, True]


def test_benchmark_config_sets_batch_and_dtype_on_a_copy():
  config = tiny.get_config()
  changed = train_step.benchmark_config(config, 16, "bfloat16")
  assert changed.data.samples_per_dataset == 4 and changed.model.dtype == "bfloat16"
  assert config.data.samples_per_dataset == 2 and config.model.dtype == "float32"


@pytest.mark.parametrize("kind, dtype, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", None, 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", None, 494.7),
    ("NVIDIA H100 80GB HBM3", "float32", "highest", 66.9),
    ("NVIDIA H200", "bfloat16", None, 989.4),
    ("NVIDIA H100 PCIe", "bfloat16", None, 756.0),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", None, 312.0),
    ("TPU v4", "bfloat16", None, 275.0),
    ("TPU v5 lite", "bfloat16", None, 197.0),
    ("TPU v5", "float32", None, 459.0),
    ("TPU v6 lite", "bfloat16", None, 918.0),
])
def test_peak_tflops_per_device_kind(kind, dtype, precision, peak):
  value, source = common.peak_tflops(kind, dtype, precision)
  assert value == peak
  assert source


def test_peak_tflops_unknown_device_says_so():
  value, source = common.peak_tflops("cpu", "float32")
  assert value is None and "'cpu'" in source


def test_random_train_state_matches_the_abstract_state():
  config = train_step.benchmark_config(tiny.get_config(), 8, "float32")
  setup = state_lib.build_setup(config)
  state = common.random_train_state(setup, seed=3)
  leaves, structure = jax.tree.flatten(state)
  abstract_leaves, abstract_structure = jax.tree.flatten(setup.abstract_state)
  assert structure == abstract_structure
  for leaf, abstract in zip(leaves, abstract_leaves):
    assert leaf.shape == abstract.shape and leaf.dtype == abstract.dtype
    assert leaf.sharding.is_equivalent_to(abstract.sharding, leaf.ndim)
  # Random, not zero, weights; running variances positive; EMA = weights.
  kernels = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state.params)
             if "kernel" in jax.tree_util.keystr(p)]
  assert all(k.std() > 0 for k in kernels)
  variances = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state.batch_stats)
               if "var" in jax.tree_util.keystr(p)]
  assert variances and all((v > 0).all() for v in variances)
  for weight, ema in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(weight), np.asarray(ema))


def test_synthetic_train_batch_has_the_pipeline_layout():
  config = train_step.benchmark_config(tiny.get_config(), 16, "float32")
  mesh = sharding.make_mesh(config.mesh)
  batch = common.synthetic_train_batch(config, sharding.batch_sharding(mesh), seed=1)
  size = config.data.image_size
  assert batch["image"].shape == (16, size, size, 3) and batch["image"].dtype == np.uint8
  ids = np.asarray(batch["dataset_id"])
  expected = np.repeat([landmarks.PROTOCOL_NAMES.index(d) for d in config.data.datasets], 4)
  np.testing.assert_array_equal(ids, expected)
  mask = np.asarray(batch["mask"])
  np.testing.assert_array_equal(mask, landmarks.PROTOCOL_MASKS[ids])
  points = np.asarray(batch["landmarks"])
  assert ((points[mask] > 0) & (points[mask] < size)).all()
  assert (points[~mask] == 0).all()
  assert len(batch["image"].sharding.device_set) == 8



@pytest.mark.slow  # Seven processes, each compiling a tiny program (about two minutes).
def test_device_run_smoke_mode_runs_every_step_and_writes_json(tmp_path):
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parent.parent
  out = tmp_path / "out"
  done = subprocess.run(["bash", str(repo / "benchmarks" / "device_run.sh"), "--smoke", str(out)],
                        cwd=repo, capture_output=True, text=True, timeout=900,
                        env={**__import__("os").environ, "PYTHON": sys.executable})
  log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
  assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
  summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
  steps = {s["step"]: s for s in summary}
  assert set(steps) == {"imports", "train_step", "memory", "memory_segments", "memory_probe",
                        "inference", "pipeline", "segformer"}
  assert all(s["exit"] == 0 and not s["timed_out"] for s in summary), summary

  def records(name):
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]

  imports = records("imports")[0]
  assert imports["modules"] > 30 and imports["backend"] == "cpu"
  step = [r for r in records("train_step") if r["benchmark"] == "train_step"]
  assert len(step) == 1 and step[0]["images_per_s"] > 0 and step[0]["remat_policy"] == "auto"
  memory = [r for r in records("memory") if r["benchmark"] == "memory"]
  assert memory[0]["residual_bytes"] > 0
  segments = [r for r in records("memory_segments") if r["benchmark"] == "memory"]
  assert segments[0]["remat_policy_resolved"] == "segments"
  assert 0 < segments[0]["residual_bytes"] < memory[0]["residual_bytes"]
  probe = [r for r in records("memory_probe") if r["benchmark"] == "memory_probe"]
  assert [(r["form"], r["dtype"]) for r in probe] == [("conv", "float32"), ("dot", "float32")]
  assert any(r["benchmark"] == "inference_crops" for r in records("inference"))
  segformer = records("segformer")
  assert [r for r in segformer if r["benchmark"] == "segformer_parity"][0][
      "max_abs_difference_float32"] < 1e-4
  assert {(r["framework"], r["pass"]) for r in segformer if r["benchmark"] == "segformer"} == {
      ("jax", "forward"), ("torch", "forward")}
  # Bad arguments: a one-line usage error, nothing written.
  bad = subprocess.run(["bash", str(repo / "benchmarks" / "device_run.sh"), str(out),
                        str(tmp_path / "no_wheels")], capture_output=True, text=True)
  assert bad.returncode == 2 and "no_wheels does not exist" in bad.stderr


def _importable(*names: str) -> bool:
  import importlib.util
  return all(importlib.util.find_spec(name) is not None for name in names)


@pytest.mark.slow  # An ONNX export and three compiles of the tiny model (about a minute).
@pytest.mark.skipif(not _importable("onnxruntime", "onnx", "jax2onnx", "torch", "transformers"),
                    reason="needs onnxruntime, onnx, jax2onnx, torch and transformers")
def test_onnx_timing_times_jax_onnxruntime_and_the_pytorch_peer_alternating(capsys, tmp_path):
  from benchmarks import onnx_timing
  assert onnx_timing.main(["--configs=tiny", "--batches=2", "--repeats=1", "--warmup=0",
                           f"--out_dir={tmp_path}"]) == 0
  records = _records(capsys)
  machine = records["machine"][0]
  assert machine["cpu_model"] and machine["torch"] != "not installed"
  [record] = records["onnx_timing"]
  assert record["variant"] == "tiny" and record["batch"] == 2 and record["flip_test"]
  for name in ("jax", "onnxruntime", "jax_encoder", "torch_encoder"):
    assert record[f"{name}_ms"] > 0 and record[f"{name}_images_per_s"] > 0
  assert record["max_point_difference_px"] < 1e-2
  # The peer computes the same encoder with the same weights.
  assert record["encoder_max_abs_difference"] < 1e-4
  assert record["torch_vs_jax_encoder"] > 0 and record["peer"].startswith("transformers")
  assert (tmp_path / "tiny_b2_flip1.onnx").is_file()


def test_memory_benchmark_residuals_fall_with_the_remat_policy():
  from benchmarks import memory
  records = {}
  for policy in ("none", "dots"):
    config = train_step.benchmark_config(tiny.get_config(), 8, "float32")
    config.model.remat_policy = policy
    records[policy] = memory.measure(config, breakdown=False, residuals=True,
                                     compile_step=False, top=0)
  none, dots = records["none"], records["dots"]
  assert (none["remat_policy"], dots["remat_policy"]) == ("none", "dots")
  assert 0 < dots["residual_bytes"] < 0.6 * none["residual_bytes"]
  assert set(dots["residual_gib_by_dtype"]) <= {"float32", "bool", "uint32"}


def test_memory_breakdown_reads_xla_buffers_at_the_peak(tmp_path):
  """The live-range and buffer-assignment dumps of a small jitted function, parsed."""
  from benchmarks import memory

  def f(x):
    with jax.named_scope("double"):
      y = x * 2.0
    return jnp.sin(y) @ y.T

  x = jnp.ones((256, 256), jnp.float32)
  # Past the suite's persistent compilation cache, which would skip the compile.
  memory.compile_with_dump(jax.jit(f).lower(x), str(tmp_path))
  buffers = memory.peak_buffers(str(tmp_path))
  assert buffers and all(size >= 0 for _, size, _ in buffers)
  breakdown = memory.peak_breakdown(str(tmp_path), top=3)
  assert breakdown["peak_live_bytes"] == sum(size for _, size, _ in buffers) > 256 * 256 * 4
  assert len(breakdown["largest_buffers"]) <= 3
  assert sum(breakdown["peak_by_pass_gib"].values()) > 0
  with pytest.raises(FileNotFoundError, match="no .*live-range"):
    memory.peak_buffers(str(tmp_path / "empty"))


def test_memory_unrolled_threefry_gives_the_same_bits_without_their_buffers():
  """--threefry=unrolled: the same dropout masks, and no full-size uint32 buffers on CPU."""
  from benchmarks import memory
  import flax.linen as nn

  def masked(x, key):
    return nn.Dropout(0.1, deterministic=False).apply({}, x, rngs={"dropout": key}) @ x.T

  x = jnp.ones((512, 256), jnp.float32)
  key = jax.random.key(3)
  compiled = {}
  for mode in ("backend", "unrolled", "backend"):
    with memory.threefry_lowering(mode):
      # A new function each time: jit caches lowerings by function.
      lowered = jax.jit(lambda x, k: masked(x, k)).lower(x, key)
    compiled.setdefault(mode, []).append(lowered.compile())
  rolled, unrolled = compiled["backend"][0], compiled["unrolled"][0]
  assert "while" in rolled.as_text() and "while" not in unrolled.as_text()
  # Jax's CPU rule is back after the block.
  assert "while" in compiled["backend"][1].as_text()
  np.testing.assert_array_equal(np.asarray(rolled(x, key)), np.asarray(unrolled(x, key)))
  bits = 512 * 256 * 4
  assert (rolled.memory_analysis().temp_size_in_bytes
          >= unrolled.memory_analysis().temp_size_in_bytes + 2 * bits)
  with pytest.raises(ValueError, match="unknown threefry lowering 'fused'"):
    with memory.threefry_lowering("fused"):
      pass


def test_memory_probe_measures_the_decoder_projection_alone():
  """--probe: the projection's gradient in both forms, with the float32 copies XLA makes."""
  from benchmarks import memory
  hlo = "\n".join([
      "%a = f32[8,16,16,64]{3,2,1,0} convert(%p0)",
      "%b = f32[8,16,16,64] convert(bf16[8,16,16,64] %p1)",
      "%c = f32[8,16,16,32]{3,2,1,0} convert(%p2)",
      "%d = f32[8,16,16,64]{3,2,1,0} add(%a, %b)",
      "%e = bf16[8,16,16,64]{3,2,1,0} convert(%d)",
  ])
  assert memory.float32_copies(hlo, (8, 16, 16, 64)) == 2
  assert memory.float32_copies(hlo, (8, 16, 16, 32)) == 1
  assert memory.float32_copies(hlo, (8, 16, 16)) == 0
  for dtype in ("float32", "bfloat16"):
    config = train_step.benchmark_config(tiny.get_config(), 8, dtype)
    records = memory.projection_probe(config)
    assert [r["form"] for r in records] == ["conv", "dot"]
    side = config.model.input_size // 4
    for record in records:
      json.dumps(record)
      assert record["dtype"] == dtype
      assert record["input_shape"] == [8, side, side, config.model.decoder_dim]
      assert record["input_bytes"] == 8 * side * side * config.model.decoder_dim * (
          4 if dtype == "float32" else 2)
      assert record["temp_bytes"] > 0
      if dtype == "float32":
        assert record["float32_copies_of_input"] == 0


def test_frequency_probe_compiles_both_forms_and_the_matrix_form_moves_no_batch():
  from benchmarks import frequency_probe
  from fgtbt_jax import aot
  target = aot.make_target("cpu:8")
  records = [frequency_probe.probe(target, form, batch=1, size=32, fsdp=4)
             for form in frequency_probe.FORMS]
  assert [r["form"] for r in records] == ["fft", "matrix"]
  for record in records:
    json.dumps(record)
    assert record["mesh"] == {"data": 2, "fsdp": 4} and record["hbm_bytes"] > 0
    assert record["flops"] > 0
  assert records[1]["collectives"] == {}  # the matrix form stays split by batch
  assert frequency_probe.main(["--topology=cpu:1", "--size=31"]) == 2


def test_pointwise_probe_compiles_both_forms_of_each_part():
  from benchmarks import pointwise_probe
  from fgtbt_jax import aot
  target = aot.make_target("cpu:1")
  for part in pointwise_probe.PARTS:
    records = [pointwise_probe.probe(target, part, form, batch=1, size=32)
               for form in ("conv", "dot")]
    assert [r["form"] for r in records] == ["conv", "dot"]
    for record in records:
      json.dumps(record)
      assert record["part"] == part and record["hbm_bytes"] > 0 and record["flops"] > 0
    # The same maths in both forms (the dot form may skip a zero-padding multiply).
    assert records[1]["flops"] == pytest.approx(records[0]["flops"], rel=0.1)
  assert pointwise_probe.main(["--parts=stem", "--topology=cpu:1"]) == 2



def test_lowres_study_tables_its_rows_and_refuses_unknown_ones():
  from benchmarks import lowres_study
  faces = {"16": {"input_psnr": 24.8, "input_ssim": 0.737, "psnr": 25.4, "ssim": 0.773},
           "64": {"input_psnr": None, "input_ssim": 1.0}}
  records = [{"row": "dhln", "mean_nme": {"16": 4.234, "64": 4.46}, "faces": faces},
             {"row": "fgtbt", "mean_nme": {"16": 5.43, "64": 3.68},
              "faces": {"16": {"input_psnr": 24.8, "input_ssim": 0.737},
                        "64": {"input_psnr": None, "input_ssim": 1.0}}}]
  table = lowres_study.markdown(records).splitlines()
  assert table[0].startswith("| row | NME 16 px | NME 64 px | PSNR / SSIM 16 px")
  # A DHLN row shows its hallucinated faces; others the degraded inputs ("same": unchanged).
  assert table[2] == "| dhln | 4.23 | 4.46 | 25.40 / 0.7730 | same |"
  assert table[3] == "| fgtbt | 5.43 | 3.68 | 24.80 / 0.7370 | same |"
  with pytest.raises(SystemExit):
    lowres_study.main(["--rows", "fgtbt,hourglass"])
