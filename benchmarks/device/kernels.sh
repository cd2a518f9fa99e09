#!/usr/bin/env bash
# One prepared call on a lent GPU machine (its own torch/triton; no network): kernel tests compiled
# (no interpreter) and the kernel benchmark. pydantic travels as wheels in .whl/ (see docs/benchmarks.md).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "editable install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout ${KERNEL_TEST_S:-200} python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -25
timeout ${KERNEL_BENCH_S:-200} python3 -m benchmarks.kernels 2>&1 | tee "$OUT/kernels_bench.log"
