#!/usr/bin/env bash
# Issue 26's prepared GPU call: ONE script, one GPU, <= 8 minutes, every JSON to $OUT.
#   bash benchmarks/device/all.sh          on the GPU machine (its own torch/triton; no network)
#   bash benchmarks/device/all.sh --dry    the same stages on the CPU with tiny settings (the tests run
#                                          this, so the script cannot rot between GPU sessions)
# Stages, each under its own time limit (seconds in brackets; the GPU run's total stays under 480):
#   kernels      the grouped-kernel tests compiled (no interpreter)                        [60]
#   host         benchmarks.host_overhead on CUDA (llama-100m): op counts + step / GPU times [60]
#   alignment    chunk-aligned vs padded on a realistic length mix                         [60]
#   headline     benchmarks.mux_vs_separate, ~1B LLaMA-shaped preset (builtin:llama-1b) in bf16, 8
#                tenants at 128 and 512 tokens each: vs separate HF PEFT processes (one after another
#                and concurrent), vs the one-adapter limit, and the planner's plan (analytic
#                CostModel of this GPU: no profile measured in the stage's time)           [270]
set -u
DRY=0; [ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ $DRY = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}; PY="$PY -P"
  export TRITON_INTERPRET=1
  DEVICE=cpu DTYPE=float32 MODEL=builtin:tiny-llama HOST_MODEL=builtin:tiny-llama
  KERNEL_TESTS="tests/test_kernels.py -k backend_switch"; HOST_ARGS="--tokens 256 --kernels torch"
  ALIGN_ARGS="--quick"; HEADLINE_ARGS="--tasks 2 --sweep 32 --steps 1 --min-seconds 0 --no-concurrent"
  HEADLINE_ARGS="$HEADLINE_ARGS --profile $(ls profiles/cpu-*-tiny-llama.csv | head -1)"  # the planned arm: nothing measured
else
  PY=python3
  if ls .whl/*.whl >/dev/null 2>&1; then  # pinned wheels carried along (docs/benchmarks.md)
    { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site; } > "$OUT/setup.log" 2>&1
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/setup.log" 2>&1 || echo "editable install failed"
  export TRITON_INTERPRET=0
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
  DEVICE=cuda DTYPE=bfloat16 MODEL=builtin:llama-1b HOST_MODEL=builtin:llama-100m
  KERNEL_TESTS="tests/test_kernels.py"; HOST_ARGS="--tokens 4096 --dtype bfloat16"
  ALIGN_ARGS="--model builtin:llama-100m --devices cuda"
  HEADLINE_ARGS="--tasks 8 --sweep 128,512 --steps 3 --min-seconds 5 --threads 2 --plan-hardware this"
fi
SCALE=1; [ $DRY = 1 ] && SCALE=5  # a loaded 2-core CPU runs the tiny stages slower than the GPU the real ones
stage() {  # name, seconds, command...: stdout's last line (the JSON) to $OUT/<name>.json, the rest to .log
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  echo "== $name"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -1 "$OUT/$name.log" | grep '^{' > "$OUT/$name.json" || rm -f "$OUT/$name.json"
  echo "   rc=$rc $(tail -c 300 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-300)"
}
echo "== kernels"; timeout -k 5 $(( 60 * SCALE )) $PY -m pytest -q -x -p no:cacheprovider $KERNEL_TESTS > "$OUT/kernel_tests.log" 2>&1
echo "   rc=$? $(tail -1 "$OUT/kernel_tests.log")"
stage host_overhead 60 $PY -m muxtune.benchmarks.host_overhead --model "$HOST_MODEL" --device $DEVICE $HOST_ARGS
stage alignment 60 $PY -m muxtune.benchmarks.alignment $ALIGN_ARGS
stage mux_vs_separate 270 $PY -m muxtune.benchmarks.mux_vs_separate --model "$MODEL" --device $DEVICE --dtype $DTYPE $HEADLINE_ARGS
ls "$OUT"
