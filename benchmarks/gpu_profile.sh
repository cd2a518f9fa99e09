#!/usr/bin/env bash
# One prepared GPU session: the full CUDA profile of builtin:llama-100m, then the cost-model accuracy
# benchmark on the same GPU (small fused batches, then 8x more rows per task).
#   bash benchmarks/gpu_profile.sh OUT_DIR        (about 3-4 minutes on an H200)
# Works on a machine that has torch/transformers/peft/pandas/tqdm but no installed muxtune: the package
# is then assembled from this checkout in a temporary folder. Missing wheels (pydantic there) are
# installed from ./.whl when it was carried along.
# The profile to commit is $OUT/profile.csv, renamed as the last line printed says.
set -u
OUT=${1:-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
if ! $PY -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $PY -c "import muxtune.profiler.profile" 2>/dev/null; then
  SHADOW=$(mktemp -d)
  mkdir "$SHADOW/muxtune"
  cp muxtune/*.py "$SHADOW/muxtune/"
  for d in executor profiler planner simulator kernels; do ln -s "$PWD/$d" "$SHADOW/muxtune/$d"; done
  export PYTHONPATH="$SHADOW:$PWD${PYTHONPATH:+:$PYTHONPATH}"
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
$PY -c "from muxtune.profiler.profile import Profile, profile_filename; import sys; \
print('commit as profiles/' + profile_filename(Profile.load(sys.argv[1]).meta['fingerprint']))" "$OUT/profile.csv"
