#!/usr/bin/env bash
# The optimizer benchmarks on ONE CUDA GPU, in one short run (a few minutes), stored as JSON.
#
#   bash bench/gpu.sh                 # writes bench/results/{optim_step,scaling}_cuda.json, then the report
#
# What it runs: bench/optim_step.py --device cuda (torch for-loop/foreach/fused, bitsandbytes 8/32-bit,
# torchao 8/4-bit, every shardwise impl x variant x state_bits; DeepSpeedCPUAdam is CPU-only and is
# recorded as unavailable) with 10 steps per timed sample, since a GPU step is sub-millisecond; and
# bench/scaling.py --device cuda from 1M to 1024M parameters (~26 GB of GPU memory at the top).
# Needs a Python with a CUDA build of torch (PY=..., default .venv/bin/python, else python3); the
# package is imported from src/ so no install is needed. If $OUT is set (the device tool), the JSON
# files are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

status=0
"$PY" bench/optim_step.py --device cuda --reps 10 --warmup 3 --inner 10 \
  --out bench/results/optim_step_cuda.json || status=1
"$PY" bench/scaling.py --device cuda --max 1024 --reps 10 --warmup 3 \
  --out bench/results/scaling_cuda.json || status=1
if [ -n "${OUT:-}" ]; then
  cp bench/results/*_cuda.json "$OUT"/ 2>/dev/null || true
fi
"$PY" bench/report.py || status=1
exit $status
