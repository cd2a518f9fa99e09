#!/usr/bin/env bash
# One prepared GPU session: the full CUDA profile of builtin:llama-100m, then the cost-model accuracy
# benchmark on the same GPU (small fused batches, then 8x more rows per task).
#   bash benchmarks/gpu_profile.sh OUT_DIR        (about 3-4 minutes on an H200)
# Works on a machine that has torch/transformers/peft/pandas/pydantic/tqdm but no installed muxtune:
# the package is then assembled from this checkout in a temporary folder.
set -u
OUT=${1:-gpu-out}
PY=${PY:-python}
mkdir -p "$OUT"
if ! $PY -c "import muxtune.profiler.profile" 2>/dev/null; then
  SHADOW=$(mktemp -d)
  mkdir "$SHADOW/muxtune"
  cp muxtune/*.py "$SHADOW/muxtune/"
  for d in executor profiler planner simulator kernels; do ln -s "$PWD/$d" "$SHADOW/muxtune/$d"; done
  export PYTHONPATH="$SHADOW:$PWD"
fi
export HF_HUB_OFFLINE=1
nvidia-smi -L
$PY -c "import torch, transformers, peft, pandas; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'pandas', pandas.__version__)"
time timeout 330 $PY -m muxtune.cli profile --model builtin:llama-100m --devices cuda --mode full \
  --out "$OUT/profile.csv" --no-progress
timeout 120 $PY -m benchmarks.cost_model_accuracy --model builtin:llama-100m --devices cuda \
  --profile "$OUT/profile.csv" > "$OUT/accuracy.txt" 2>&1; tail -n +1 "$OUT/accuracy.txt" | cut -c1-600
timeout 120 $PY -m benchmarks.cost_model_accuracy --model builtin:llama-100m --devices cuda \
  --profile "$OUT/profile.csv" --rows-scale 8 > "$OUT/accuracy-x8.txt" 2>&1; tail -n +1 "$OUT/accuracy-x8.txt" | cut -c1-600
