#!/usr/bin/env bash
# `make bench`: every CPU benchmark at full size, then BENCHMARKS.md and the plots from the JSON.
#
#   bash bench/run_all.sh                     # all (about 20 minutes on 2 cores; run it on a quiet machine)
#   bash bench/run_all.sh optim_step report   # a subset, by script name
#   bash bench/run_all.sh quality_paired report   # 8-bit vs 32-bit training quality: ~2 h, not in the default set
#   bash bench/run_all.sh codec_roundtrip report  # each 8-bit codec on a real run's moments: ~30 min, ditto
#   QUICK=1 bash bench/run_all.sh             # smoke test of the whole pipeline (tiny sizes, a few minutes);
#                                             # writes to $TMPDIR/shardwise-bench-quick, not bench/results
#
# Each script writes bench/results/<name>.json; report.py turns all of them into BENCHMARKS.md and
# bench/results/*.png. A script that fails does not stop the others; the exit status says so.
# Timings are only meaningful when nothing else loads the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false

declare -A ARGS=(
  [optim_step]="--reps 15 --warmup 2"  # 16 x 1024x1024 fp32, 2 threads, every candidate interleaved
  [scaling]="--max 256"                # 1M..256M params, ~7 GB RAM at the top
  [memory]=""                          # SmolLM2-135M, 4 x 256 tokens, a fresh process per optimizer
  [e2e]=""                             # MiniLM 32x32 (loop, HF Trainer), SmolLM2-135M 4x256, MiniLM on 2 DDP ranks
  [zero]=""                            # bench/zero.py: ZeRO-1 on 1 vs 2 gloo ranks
  [offload]=""                         # CPUOffloadOptimizer vs DeepSpeedCPUAdam: host B/param, step; ~10 GB RAM
  [quality_paired]=""                  # paired fine-tunes, 5 seeds, 2 tasks: ~2 h; only when named
  [codec_bias]=""                      # moments through the 8-bit codec vs fp32 over 1,000 steps: seconds
  [codec_roundtrip]=""                 # each 8-bit codec on a real SmolLM2 run's moments: ~30 min; only when named
  [report]="--readme README.md"       # BENCHMARKS.md, plots, and the README headline block
)
ORDER=(optim_step scaling memory e2e zero offload codec_bias report)
[ $# -gt 0 ] && ORDER=("$@")

results=bench/results
if [ "${QUICK:-0}" = 1 ]; then
  results="${TMPDIR:-/tmp}/shardwise-bench-quick"
  mkdir -p "$results"
  for name in optim_step scaling memory e2e offload quality_paired; do ARGS[$name]="--quick --out $results/$name.json"; done
  ARGS[codec_bias]="--steps 10 --out $results/codec_bias.json"
  ARGS[codec_roundtrip]="--quick --out $results/codec_roundtrip.json"
  ARGS[zero]="--params-m 0.5 --steps 2 --warmup 1 --out $results/zero.json"
  ARGS[report]="--results $results --out $results/BENCHMARKS.md"
fi

failed=()
for name in "${ORDER[@]}"; do
  [ -n "${ARGS[$name]+x}" ] || { echo "unknown benchmark: $name (one of: ${!ARGS[*]})"; exit 2; }
  echo "=== bench/$name.py ${ARGS[$name]}"
  start=$SECONDS
  # shellcheck disable=SC2086
  "$PY" "bench/$name.py" ${ARGS[$name]} || failed+=("$name")
  echo "=== $name: $((SECONDS - start)) s"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "done: results in $results, report in $([ "$results" = bench/results ] && echo BENCHMARKS.md || echo "$results/BENCHMARKS.md")"
