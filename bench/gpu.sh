#!/usr/bin/env bash
# shardwise on ONE CUDA GPU in one command, under 8 minutes: correctness first, then speed, as JSON.
#
# On a GPU machine lent by the device tool (image: CUDA torch, transformers, accelerate, triton; no
# bitsandbytes, no network; the repo arrives as a copy of the working tree, without .venv):
#
#   1. here, once (optional: brings the bitsandbytes AdamW8bit anchor, a 41 MiB wheel; without it
#      that row is recorded as unavailable with the reason):
#        .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_24_x86_64 -d build/wheels bitsandbytes==0.50.2
#   2. the device tool (the tree travels without .git: name the commit, `git rev-parse --short HEAD`):
#        run(command="SHARDWISE_GIT_SHA=<sha> bash bench/gpu.sh", carry=["build/wheels"], timeout_s=540)
#      then copy the JSON files it returns (files_at) into bench/results/, commit them, and run
#      `python bench/report.py` here (BENCHMARKS.md and gpu_run.log come back too, for reading).
#
#   bash bench/gpu.sh --device cpu   # dry run: every stage at tiny sizes on the CPU (a few minutes);
#                                    # writes to $TMPDIR/shardwise-gpu-dry, never to bench/results
#
# Stages, each with its own time limit (a stage that fails or runs out is recorded, the next runs):
#   check    bench/gpu_check.py: compiled fused path vs reference, every variant, 32- and 8-bit
#   step     bench/optim_step.py at 16.8M params (16 x 1024x1024): torch fused (baseline) and foreach,
#            shardwise foreach / fused (compiled), 32- and 8-bit, bitsandbytes AdamW8bit if present
#   step_1b  the same at 1.07B params (16 x 8192x8192)
#   e2e      bench/e2e.py: SmolLM2-135M-shaped model (config only, random init: its 270 MB of weights
#            cannot travel), bf16 autocast, batch 4 x 256, plain loop, the same optimizers
#   scaling  bench/scaling.py 1M..1024M params vs the bandwidth bound, only in the time left
#   report   bench/report.py: BENCHMARKS.md and plots from every JSON in the results folder
# Every stage writes bench/results/<name>.json; gpu_run.json says how each stage ended and how
# long it took. If $OUT is set (the device tool), the JSON files, BENCHMARKS.md and the log go there.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
RESULTS=bench/results
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    *) echo "usage: bash bench/gpu.sh [--device cuda|cpu] [--results DIR]"; exit 2 ;;
  esac
done
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if [ "$DEVICE" = cpu ]; then
  DRY=1
  [ "$RESULTS" = bench/results ] && RESULTS="${TMPDIR:-/tmp}/shardwise-gpu-dry"
else
  DRY=0
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device (--device cpu for the dry run)')" || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi
SUFFIX=_cuda  # the dry run writes the same files (their JSON says device cpu), to its own folder
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_run.log"
: >"$LOG"
"$PY" -c "import torch; print('torch', torch.__version__, '| device', '$DEVICE', '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"

# A missing anchor travels as a wheel when it is small enough (build/wheels, carried by the device tool).
if ls build/wheels/*.whl >/dev/null 2>&1 && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/shardwise-site \
    build/wheels/*.whl 2>&1 | tail -2 | tee -a "$LOG" && export PYTHONPATH="$PYTHONPATH:/tmp/shardwise-site"
fi

BUDGET=${BUDGET:-420}  # seconds for the measuring stages; with setup and report, under 8 minutes
SCALE=1
if [ "$DRY" = 1 ]; then  # a CPU with cold compile caches (CI, a loaded laptop) needs longer
  SCALE=4
  BUDGET=$((BUDGET * SCALE))
fi
START=$SECONDS
STAGES=()
run_stage() {  # run_stage NAME LIMIT_S command...
  local name=$1 limit=$2 left rc t0
  shift 2
  limit=$((limit * SCALE))
  left=$((BUDGET - (SECONDS - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    STAGES+=("$name skipped 0 $limit")
    echo "=== $name: skipped (budget spent)" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  STAGES+=("$name $rc $((SECONDS - t0)) $limit")
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

SHARDWISE=shardwise_foreach_adam_32bit,shardwise_foreach_adam_8bit,shardwise_fused_adam_32bit,shardwise_fused_adam_8bit
STEP_ONLY="torch_fused,torch_foreach,$SHARDWISE,bnb_adamw8bit"
E2E_ONLY=loop_torch_fused,loop_shardwise_foreach_32bit,loop_shardwise_foreach_8bit,loop_shardwise_fused_32bit,loop_shardwise_fused_8bit
if [ "$DRY" = 1 ]; then
  CHECK=(--quick)
  STEP=(--quick)
  STEP_1B=(--tensors 2 --rows 512 --cols 512 --reps 2 --warmup 1)
  E2E=(--quick)
  SCALING=(--quick)
else
  CHECK=()
  STEP=(--reps 10 --warmup 3 --inner 10)
  STEP_1B=(--tensors 16 --rows 8192 --cols 8192 --reps 5 --warmup 2 --inner 3)
  E2E=(--random-init --precision bf16 --rounds 5 --steps 5)
  SCALING=(--max 1024 --reps 5 --warmup 2)
fi

run_stage check 170 "$PY" bench/gpu_check.py --device "$DEVICE" "${CHECK[@]}" --out "$RESULTS/gpu_check.json"
run_stage step 70 "$PY" bench/optim_step.py --device "$DEVICE" --reference none --only "$STEP_ONLY" \
  "${STEP[@]}" --out "$RESULTS/optim_step$SUFFIX.json"
run_stage step_1b 80 "$PY" bench/optim_step.py --device "$DEVICE" --reference none --only "$STEP_ONLY" \
  "${STEP_1B[@]}" --out "$RESULTS/optim_step${SUFFIX}_1b.json"
run_stage e2e 100 "$PY" bench/e2e.py --device "$DEVICE" --cases smollm2 --only "$E2E_ONLY" "${E2E[@]}" \
  --out "$RESULTS/e2e$SUFFIX.json"
# only with what is left of the budget (the stages above usually finish well inside their limits)
run_stage scaling 60 "$PY" bench/scaling.py --device "$DEVICE" "${SCALING[@]}" --out "$RESULTS/scaling$SUFFIX.json"
BUDGET=$((BUDGET + 30 * SCALE))  # the report always runs
run_stage report 30 "$PY" bench/report.py --results "$RESULTS" --out "$RESULTS/BENCHMARKS.md"

# gpu_run.json: how each stage ended (exit 124 = its time limit), so a missing JSON is explained.
"$PY" - "$RESULTS/gpu_run.json" "$DEVICE" "$((SECONDS - START))" "${STAGES[@]}" <<'EOF'
import json, sys
path, device, total, *stages = sys.argv[1:]
rows = []
for s in stages:
    name, rc, secs, limit = s.split()
    status = ("ok" if rc == "0" else "skipped: time budget spent" if rc == "skipped"
              else f"timed out after {limit} s" if rc in ("124", "137") else f"failed: exit {rc}")
    rows.append({"stage": name, "status": status, "seconds": int(secs), "limit_s": int(limit)})
doc = {"benchmark": "gpu_run", "device": device, "total_seconds": int(total), "stages": rows, "headline": []}
open(path, "w").write(json.dumps(doc, indent=2) + "\n")
print(f"wrote {path}")
for r in rows:
    print(f"  {r['stage']:<8} {r['status']:<28} {r['seconds']:>4} s")
EOF
if [ -n "${OUT:-}" ]; then  # the device tool brings back at most 8 files
  cp "$RESULTS"/gpu_check.json "$RESULTS"/*"$SUFFIX"*.json "$RESULTS"/gpu_run.json "$RESULTS"/BENCHMARKS.md \
    "$LOG" "$OUT"/ 2>/dev/null || true
fi
failed=$(grep -c '"status": "\(failed\|timed\)' "$RESULTS/gpu_run.json" || true)
passed=$(grep -c '"passed": true' "$RESULTS/gpu_check.json" 2>/dev/null || true)
echo "gpu.sh: $((SECONDS - START)) s; correctness $([ "$passed" = 1 ] && echo passed || echo 'FAILED or missing'); $failed stage(s) failed"
[ "$failed" = 0 ] && [ "$passed" = 1 ]
