"""Accelerator setup shared by the recipes: CPU detection, DeepSpeed on CPU, FSDP sanity check.

WHERE a run happens is decided by ``accelerate launch`` (its config file sets environment variables);
WHAT is trained comes from the recipe config. This module reconciles the two so that every engine
also works on CPU with 2 processes (gloo):

- no CUDA -> ``Accelerator(cpu=True)`` (DistributedType.MULTI_CPU under ``--multi_gpu``);
- DeepSpeed on CPU needs the gloo backend and must NOT get ``cpu=True`` (accelerate would drop the
  plugin);
- accelerate 1.15 silently ignores the FSDP plugin on CPU and runs DDP instead: we fail loudly.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from shardwise.errors import ConfigError

from .sections import TrainConfig


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(train: TrainConfig, project_dir: str, *, with_trackers: bool = True):
    """An ``Accelerator`` for ``train`` (precision, accumulation, trackers, seedable data order)."""
    from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    on_cpu = not torch.cuda.is_available()
    deepspeed = env_flag("ACCELERATE_USE_DEEPSPEED")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # (with a single process, a process-group handler makes accelerate look for a group that is not there)
    # A finite collective timeout: when a rank dies, a survivor blocked in all-reduce / barrier fails
    # after collective_timeout_s instead of torch's default (30 min for gloo).
    timeout = timedelta(seconds=train.collective_timeout_s)
    handlers = (
        [InitProcessGroupKwargs(backend="gloo" if on_cpu else "nccl", timeout=timeout)] if distributed else []
    )
    if on_cpu and train.mixed_precision == "fp16":  # (the recipes' preflight says so earlier)
        from shardwise.errors import ConfigError

        raise ConfigError("train.mixed_precision=fp16 needs a GPU", hint="on CPU use bf16 or no")
    accelerator = Accelerator(
        cpu=on_cpu and not deepspeed,
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum_steps,
        log_with=list(train.report_to) if with_trackers and train.report_to else None,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=f"{project_dir}/logs"),
        # the same shuffled order on resume, so skipping the seen batches continues the epoch exactly
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        # the recipes step the LR scheduler once per optimizer update themselves; accelerate's default
        # steps it num_processes times per update (for schedules built in per-sample units)
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    check_fsdp_engaged(accelerator)
    return accelerator


def check_fsdp_engaged(accelerator) -> None:
    """Fail loudly when accelerate was asked for FSDP (config file / env, or a plugin) but runs
    something else: accelerate 1.x ignores its FSDP plugin on CPU and falls back to DDP, so every
    rank would hold the full model and optimizer state while the user believes it is sharded."""
    from accelerate.utils import DistributedType

    asked = env_flag("ACCELERATE_USE_FSDP") or getattr(accelerator.state, "fsdp_plugin", None) is not None
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError(
            f"the accelerate config asks for FSDP but accelerate set up {accelerator.distributed_type.value} "
            "(accelerate ignores its FSDP plugin on CPU and silently falls back to DDP). Use "
            "configs/accelerate/cpu_ddp.yaml or a DeepSpeed config on CPU, fsdp2.yaml on GPUs; or drive "
            "FSDP2 directly (torch.distributed.fsdp.fully_shard: shardwise handles its DTensor parameters)."
        )


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator, train: TrainConfig) -> None:
    """Fill the DeepSpeed JSON's "auto" clipping from the recipe, so hyperparameters live in one place.

    (Micro batch size and accumulation are filled by accelerate itself from the data loader and the
    Accelerator.) DeepSpeed owns clipping under ZeRO, so the recipe must not clip again.
    """
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = train.max_grad_norm if train.max_grad_norm is not None else 0.0
    # a shardwise optimizer is not on DeepSpeed's tested list; it is a plain torch.optim.Optimizer
    ds["zero_allow_untested_optimizer"] = True
    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", None):
        # ZeRO-Offload: without this key accelerate silently swaps the recipe's optimizer for
        # DeepSpeedCPUAdam (L2 instead of decoupled weight decay, 32-bit state, no variant); with it,
        # DeepSpeed hands shardwise AdamW the same flat partitions, allocated in host memory
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            raise ConfigError(
                "the DeepSpeed config sets zero_force_ds_cpu_optimizer: true with offload_optimizer: "
                "DeepSpeed would replace the recipe's optimizer (optimizer.* settings, 8-bit state) "
                "with DeepSpeedCPUAdam",
                hint='set "zero_force_ds_cpu_optimizer": false (see configs/deepspeed/zero2_offload.json)',
            )
        ds["zero_force_ds_cpu_optimizer"] = False


def describe(accelerator) -> str:
    """One line: engine, processes, device, precision (printed in the recipe banner)."""
    return (
        f"{accelerator.distributed_type.value} x{accelerator.num_processes} on {accelerator.device} "
        f"(mixed_precision={accelerator.mixed_precision}, "
        f"grad_accum={accelerator.gradient_accumulation_steps})"
    )
