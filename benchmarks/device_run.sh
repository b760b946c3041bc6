#!/usr/bin/env bash
# One-shot accelerator run: install, check, test, then measure; JSON and a log into OUT.
#
#   benchmarks/device_run.sh OUT [WHEELS]          # on a GPU machine, under 8 minutes
#   benchmarks/device_run.sh --smoke OUT [WHEELS]  # on CPU: the same steps, tiny sizes
#
# OUT: a folder (created) that receives log.txt, one <step>.jsonl per step
# (the benchmark scripts' JSON lines) and summary.json (every step's exit
# status and seconds). WHEELS: a folder of wheels for the packages a stock
# CUDA image lacks (grain, ml-collections, array-record, tensorflow-datasets
# and what they need, for the machine's Python); they are installed with
# `pip install --no-index --find-links WHEELS`, beside the image's own jax,
# flax, optax, orbax and torch (nothing is upgraded or downloaded).
#
# Steps (each under its own time limit; a failed step is recorded and the
# run goes on to the next):
#   install      the wheels of WHEELS (skipped without WHEELS)
#   imports      the project's modules import; jax's devices and versions
#   tests        the fast tests that need no training run
#   train_step   the paper step at 480 px, bfloat16, batch 8 / 16 / 32
#                (images/s, model MFU against the chip's dense bf16 peak,
#                peak device memory)
#   remat_*      the same at batch 32 with remat_policy none / dots_no_batch /
#                segments
#   pointwise_dot  the same at batch 32 with the 1x1 convolutions as matmuls
#                (pointwise_impl=dot; compare with train_step's batch 32)
#   memory       XLA's memory analysis of the paper step and the bytes JAX
#                keeps for its backward pass, batch 8 / 16, both dtypes
#   memory_segments  the same at batch 8 with remat_policy=segments
#   memory_probe the decoder projection's gradient alone, both dtypes
#                (whether bfloat16 halves its temporaries on this backend)
#   inference    crop -> landmarks latency at batch 1, throughput at 128
#   pipeline     the grain input pipeline at 480 px with 8 and 16 workers
#   segformer    transformers' SegformerModel side by side with the encoder
# --smoke runs the steps with the tiny config at 64 px in float32, one
# iteration each, without the tests, the remat variants and pointwise_dot
# (tests/test_benchmarks.py runs it so; no speed is asserted).
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
  SMOKE=1
  shift
fi
if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: benchmarks/device_run.sh [--smoke] OUT [WHEELS]" >&2
  exit 2
fi
OUT="$1"
WHEELS="${2:-}"
if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then
  echo "benchmarks/device_run.sh: wheel folder $WHEELS does not exist" >&2
  exit 2
fi
mkdir -p "$OUT" || { echo "benchmarks/device_run.sh: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 2
PYTHON="${PYTHON:-python}"
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.jsonl"
: >"$SUMMARY"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT/jit_cache}"
echo "device_run: $(date -u +%FT%TZ) smoke=$SMOKE out=$OUT wheels=${WHEELS:-none}" | tee -a "$LOG"

# step NAME SECONDS COMMAND...: runs COMMAND with stdout into OUT/NAME.jsonl
# and stderr into the log, under a time limit; records its status.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.jsonl" 2>>"$LOG"
  rc=$?
  local seconds=$((SECONDS - start))
  echo "== $name: exit $rc after ${seconds}s" | tee -a "$LOG"
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $seconds, \"timed_out\": $([[ $rc == 124 || $rc == 137 ]] && echo true || echo false)}" >>"$SUMMARY"
  return 0
}

if [[ -n "$WHEELS" ]]; then
  step install 120 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" \
    grain ml-collections array-record tensorflow-datasets
fi

step imports 60 "$PYTHON" - <<'EOF'
import importlib, json, pkgutil
import jax
import fgtbt_jax, data_pipelines, benchmarks
names = []
for package in (fgtbt_jax, data_pipelines):
  for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
    names.append(info.name)
versions = {}
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections",
             "torch", "transformers", "numpy"):
  try:
    versions[name] = getattr(importlib.import_module(name), "__version__", "?")
  except ImportError as e:
    versions[name] = f"missing: {e}"
print(json.dumps({"benchmark": "imports", "modules": len(names), "versions": versions,
                  "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()]}))
EOF

if [[ $SMOKE == 1 ]]; then
  # Tiny sizes, float32 (the programs the test suite compiles too), no
  # tests (the suite runs this), one policy.
  CONFIG=configs/tiny.py DTYPE=float32 BATCHES=8 STEPS=1 WARMUP=0 POLICIES=()
  INF_BATCH=1 ITER=1 PIPE_SIZE=64 WORKERS=0 PIPE_BATCHES=2 PIPE_WARMUP=1
  SEG=(--encoder=tiny --size=64 --batch=2 --iterations=1 --frameworks=jax,torch
       --dtypes=float32 --passes=forward)
  MEMORY=(--batch=8 --dtype=float32 --residuals --nocompile)
  PROBE_DTYPES=float32 POINTWISE=()
  TESTS=()
else
  CONFIG=configs/fgtbt_paper.py DTYPE=bfloat16 BATCHES=8,16,32 STEPS=10 WARMUP=2
  POLICIES=(none dots_no_batch segments)
  INF_BATCH=1,128 ITER=20 PIPE_SIZE=480 WORKERS=8,16 PIPE_BATCHES=40 PIPE_WARMUP=5
  SEG=(--encoder=paper --size=480 --batch=16 --iterations=10)
  MEMORY=(--batch=8,16 --dtype=bfloat16,float32 --residuals)
  PROBE_DTYPES=float32,bfloat16 POINTWISE=(dot)
  TESTS=(tests/test_layers.py tests/test_heatmaps.py tests/test_losses.py tests/test_remat.py
         tests/test_model_forward.py tests/test_metrics.py tests/test_crop.py)
fi

if [[ ${#TESTS[@]} -gt 0 ]]; then
  step tests 150 "$PYTHON" -m pytest -q -x -m "not slow" -p no:cacheprovider "${TESTS[@]}"
fi
step train_step 240 "$PYTHON" -m benchmarks.train_step --config="$CONFIG" --dtype="$DTYPE" \
  --batch="$BATCHES" --steps="$STEPS" --warmup="$WARMUP"
for policy in "${POLICIES[@]}"; do
  step "remat_$policy" 120 "$PYTHON" -m benchmarks.train_step --config="$CONFIG" \
    --dtype="$DTYPE" --batch=32 --steps="$STEPS" --warmup="$WARMUP" \
    --config.model.remat_policy="$policy"
done
for impl in "${POINTWISE[@]}"; do
  step "pointwise_$impl" 120 "$PYTHON" -m benchmarks.train_step --config="$CONFIG" \
    --dtype="$DTYPE" --batch=32 --steps="$STEPS" --warmup="$WARMUP" \
    --config.model.pointwise_impl="$impl"
done
step memory 150 "$PYTHON" -m benchmarks.memory --config="$CONFIG" "${MEMORY[@]}"
step memory_segments 120 "$PYTHON" -m benchmarks.memory --config="$CONFIG" "${MEMORY[@]}" \
  --batch=8 --config.model.remat_policy=segments
step memory_probe 60 "$PYTHON" -m benchmarks.memory --config="$CONFIG" --batch=8 \
  --dtype="$PROBE_DTYPES" --probe
step inference 120 "$PYTHON" -m benchmarks.inference --config="$CONFIG" --batch="$INF_BATCH" \
  --dtype="$DTYPE" --flip_test=false --iterations="$ITER" --noend_to_end
step pipeline 120 "$PYTHON" -m benchmarks.pipeline --image-size "$PIPE_SIZE" \
  --workers "$WORKERS" --batches "$PIPE_BATCHES" --warmup "$PIPE_WARMUP" \
  --data-dir "$OUT/pipeline_data"
step segformer 150 "$PYTHON" -m benchmarks.segformer "${SEG[@]}"

echo "device_run: done $(date -u +%FT%TZ); steps: $(wc -l <"$SUMMARY")" | tee -a "$LOG"
# The run's own status: 0 when every step exited 0.
! grep -q '"exit": [1-9]' "$SUMMARY"
