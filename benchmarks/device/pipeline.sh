#!/usr/bin/env bash
# One prepared call on a lent GPU machine (NCCL): the distributed executor's equivalence check and the
# pipeline benchmark. 1 GPU: one process (pp=1, no bubbles to fill); 2+ GPUs: 2 processes.
# Same environment setup as benchmarks/device/kernels.sh (wheels in .whl/, no network).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "editable install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout ${DIST_CHECK_S:-180} python3 benchmarks/device/pipeline_check.py 2>&1 | tee "$OUT/pipeline_check.log" | tail -15
timeout ${DIST_BENCH_S:-300} python3 -m benchmarks.pipeline --devices cuda --steps 4 2>&1 | tee "$OUT/pipeline_bench.log" | tail -5
