#!/usr/bin/env bash
# Run a recipe on this machine with an accelerate config (WHERE) and a recipe config (WHAT).
#
#   launch/local.sh RECIPE RECIPE_CONFIG [ACCELERATE_CONFIG] [dotted.key=value ...]
#   launch/local.sh recipes/finetune_bert.py configs/recipes/bert_tiny.yaml configs/accelerate/cpu_ddp.yaml \
#       optimizer.shard=true optimizer.state_bits=8
#
# Without an accelerate config (or with "-") the recipe runs as one plain python process.
# With one, it runs `python -m shardwise.launch` (accelerate launch that prints a config / data error
# once, from the first failing rank, and exits 2; see docs/reliability.md).
# PYTHON overrides the interpreter (default: .venv/bin/python; its accelerate is the launcher);
# MAIN_PROCESS_PORT sets the rendezvous port (default 29500) for running two jobs side by side.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
recipe=$1 recipe_config=$2
shift 2
accel_config=-
if [[ $# -gt 0 && $1 != *=* ]]; then
  accel_config=$1
  shift
fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PYTHON=${PYTHON:-$root/.venv/bin/python}
for f in "$recipe" "$recipe_config"; do
  [[ -f $f ]] || { echo "launch/local.sh: $f not found" >&2; exit 2; }
done
if [[ $accel_config == - ]]; then
  exec "$PYTHON" "$recipe" --config "$recipe_config" "$@"
fi
[[ -f $accel_config ]] || { echo "launch/local.sh: $accel_config not found" >&2; exit 2; }
port=()
if [[ -n ${MAIN_PROCESS_PORT:-} ]]; then port=(--main_process_port "$MAIN_PROCESS_PORT"); fi
exec "$PYTHON" -m shardwise.launch --config_file "$accel_config" "${port[@]}" "$recipe" --config "$recipe_config" "$@"
