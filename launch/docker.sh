#!/usr/bin/env bash
# Build the image and run a command in it on all GPUs, with the repo's outputs/ and asset cache mounted.
#
#   launch/docker.sh                       # build, then the default command: the demo (make demo)
#   launch/docker.sh launch/local.sh recipes/finetune_gpt.py configs/recipes/gpt2_wikitext103.yaml \
#       configs/accelerate/multi_gpu.yaml
#
# IMAGE (default shardwise:latest) names the image; NO_BUILD=1 skips the build; HF_HOME is mounted
# so hub downloads are cached across runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-shardwise:latest}
if [[ ${NO_BUILD:-0} != 1 ]]; then
  docker build -t "$IMAGE" "$root"
fi
mkdir -p "$root/outputs" "$root/.cache/assets" "${HF_HOME:-$HOME/.cache/huggingface}"
gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then gpus=(--gpus all); fi
exec docker run --rm -it "${gpus[@]}" --ipc=host \
  -v "$root/outputs:/workspace/shardwise/outputs" \
  -v "$root/.cache/assets:/workspace/shardwise/.cache/assets" \
  -v "${HF_HOME:-$HOME/.cache/huggingface}:/root/.cache/huggingface" \
  "$IMAGE" "$@"
