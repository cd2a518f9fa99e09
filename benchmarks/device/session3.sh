#!/usr/bin/env bash
# Third prepared GPU call of session 2026-11-28 (after fixing the prefix cache keyword for older
# transformers 5.x and DoRA's init device): kernel executor tests compiled, the CUDA profile of
# llama-100m, the cost model's accuracy on it, and the simulator's prediction error.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
} > "$OUT/setup.log" 2>&1; tail -2 "$OUT/setup.log"
export PYTHONPATH=/tmp/site TRITON_INTERPRET=0
echo "== kernel executor tests"; timeout -k 5 45 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k executor > "$OUT/kernel_tests.log" 2>&1; tail -3 "$OUT/kernel_tests.log"
echo "== profile"; timeout -k 5 90 python3 -m muxtune.cli profile --model builtin:llama-100m --devices cuda --mode quick --no-progress > "$OUT/profile.log" 2>&1; tail -3 "$OUT/profile.log"
cp ~/.cache/muxtune/profiles/cuda-*llama-100m.csv "$OUT/" 2>/dev/null
echo "== accuracy"; timeout -k 5 50 python3 -m benchmarks.cost_model_accuracy --model builtin:llama-100m --devices cuda --profile "$(ls ~/.cache/muxtune/profiles/cuda-*llama-100m.csv | head -1)" > "$OUT/accuracy.log" 2>&1; tail -10 "$OUT/accuracy.log" | cut -c1-400
echo "== simulator"; timeout -k 5 40 python3 -m benchmarks.simulator --model builtin:llama-100m --device cuda --steps 4 > "$OUT/simulator.log" 2>&1; tail -2 "$OUT/simulator.log" | cut -c1-700
