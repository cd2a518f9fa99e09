#!/usr/bin/env bash
# Second prepared GPU call of session 2026-11-28: kernels (tests compiled + benchmark with a kernel
# profile), the CUDA profile of llama-100m and the cost model's accuracy on it, the simulator's
# prediction error, and the alignment benchmark. Wheels for what the image lacks travel in .whl/.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -c "import pyarrow, sys; sys.exit(0 if int(pyarrow.__version__.split('.')[0]) >= 24 else 1)" \
  || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/opt/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
python3 -c "import torch, triton, transformers, peft, pyarrow, datasets; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, pyarrow.__version__, datasets.__version__)"
} > "$OUT/setup.log" 2>&1; tail -3 "$OUT/setup.log"
export PYTHONPATH=/tmp/site TRITON_INTERPRET=0
echo "== kernel tests"; timeout -k 5 80 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py > "$OUT/kernel_tests.log" 2>&1; tail -4 "$OUT/kernel_tests.log"
echo "== kernel bench"; timeout -k 5 80 python3 -m benchmarks.kernels --profile > "$OUT/kernels_bench.log" 2>&1; grep -v "^{" "$OUT/kernels_bench.log" | tail -45; tail -1 "$OUT/kernels_bench.log" | cut -c1-300
echo "== profile"; timeout -k 5 90 python3 -m muxtune.cli profile --model builtin:llama-100m --devices cuda --mode quick --no-progress 2>&1 | tail -3
cp ~/.cache/muxtune/profiles/cuda-*llama-100m.csv "$OUT/" 2>/dev/null
echo "== accuracy"; timeout -k 5 60 python3 -m benchmarks.cost_model_accuracy --model builtin:llama-100m --devices cuda --profile "$(ls ~/.cache/muxtune/profiles/cuda-*llama-100m.csv | head -1)" > "$OUT/accuracy.log" 2>&1; tail -12 "$OUT/accuracy.log" | cut -c1-400
echo "== alignment"; timeout -k 5 50 python3 -m benchmarks.alignment --devices cuda --model builtin:llama-100m --steps 3 --repeats 2 > "$OUT/alignment.log" 2>&1; tail -8 "$OUT/alignment.log" | cut -c1-400
echo "== simulator"; timeout -k 5 45 python3 -m benchmarks.simulator --model builtin:llama-100m --device cuda --steps 4 > "$OUT/simulator.log" 2>&1; tail -3 "$OUT/simulator.log" | cut -c1-600
