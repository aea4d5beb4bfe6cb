# shardwise on a CUDA PyTorch base: recipes, configs, launchers and the package with its extras.
#
#   docker build -t shardwise .                  (or launch/docker.sh, which also mounts outputs/)
#   docker run --rm --gpus all shardwise         # default: the demo (assets + MiniLM on Reuters R8)
#   docker run --rm --gpus all shardwise launch/local.sh recipes/finetune_gpt.py \
#       configs/recipes/gpt2_wikitext103.yaml configs/accelerate/multi_gpu.yaml
#
# The devel image carries nvcc, which DeepSpeed needs to JIT-build its ops.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SHARDWISE_ASSETS=/workspace/shardwise/.cache/assets

WORKDIR /workspace/shardwise

# Dependencies first (cached layer): the base image's torch satisfies torch>=2.6 and is kept.
COPY pyproject.toml README.md ./
COPY src/ src/
# (the local package: versions are constrained in pyproject.toml, not on this line)
# hadolint ignore=DL3013
RUN python -m pip install ".[deepspeed,logging,gguf]"

COPY recipes/ recipes/
COPY configs/ configs/
COPY launch/ launch/

# make demo, without make's venv: fetch the offline assets (cached in a volume), then the main job.
CMD ["bash", "-c", "python -m shardwise.data.assets --cache \"$SHARDWISE_ASSETS\" && python recipes/finetune_bert.py --config configs/recipes/bert_minilm_r8.yaml"]
