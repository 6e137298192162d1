#!/usr/bin/env bash
# The GPU run on a lent machine with the image's own torch/triton/transformers
# (dyncompile from the source tree, no install). Needs .gpu/bundle.pt from
# benchmarks/gpu_bundle.py. Usage: bash benchmarks/gpu_device.sh OUTDIR [gpu_run.py args]
set -uo pipefail
out=${1:?output folder}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/dyncompile-inductor}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/gpu_run.py --out "$out" "$@" 2>&1 | tee "$out/log.txt" | grep -v -i "warn"
