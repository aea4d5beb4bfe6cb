"""The optimizer section of a recipe config made real: shardwise AdamW + LR schedule, and its banner."""

from __future__ import annotations

from shardwise.errors import ConfigError
from shardwise.optim import optimizer_and_scheduler

from .accel import env_flag
from .sections import OptimizerConfig


def build_optimizer(model, opt: OptimizerConfig, total_steps: int):
    """shardwise optimizer (decay / no-decay groups) + LR schedule from the preset and the overrides.

    The optimizer skips (and counts) any step whose gradients are not finite (``skip_nonfinite``):
    the divergence guard of :func:`shardwise.train.update.optimizer_steps` builds on it. Invalid
    hyperparameters surface as a ConfigError naming the ``optimizer.*`` key. ``optimizer.offload=cpu``
    wraps it in :class:`shardwise.optim.CPUOffloadOptimizer` (masters and state in host memory), which
    exposes the same ``skip_nonfinite`` / ``skipped_steps``.
    """
    if opt.shard and env_flag("ACCELERATE_USE_DEEPSPEED"):  # the optimizer refuses too, at its first step
        raise ConfigError(
            "optimizer.shard=true under DeepSpeed: DeepSpeed ZeRO already partitions the optimizer state "
            "(sharding it again would silently ruin training)",
            hint="drop optimizer.shard (DeepSpeed's zero_stage does it), or launch with "
            "configs/accelerate/cpu_ddp.yaml / multi_gpu.yaml for shardwise's own ZeRO-1",
        )
    if opt.offload != "none" and env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            f"optimizer.offload={opt.offload} under DeepSpeed: DeepSpeed owns the optimizer's placement",
            hint='drop optimizer.offload and set zero_optimization.offload_optimizer {"device": "cpu"} in '
            "the DeepSpeed JSON (ZeRO-Offload), or launch with configs/accelerate/cpu_ddp.yaml / "
            "single_gpu.yaml for shardwise's offload",
        )
    if opt.warmup_steps is not None and opt.warmup_steps >= total_steps:
        raise ConfigError(
            f"optimizer.warmup_steps={opt.warmup_steps} is not below the run's {total_steps} optimizer steps",
            hint="lower optimizer.warmup_steps (or use optimizer.warmup_ratio), or train longer "
            "(train.max_steps / train.epochs)",
        )
    try:
        return optimizer_and_scheduler(
            opt.preset,
            model,
            total_steps,
            schedule=opt.schedule,
            warmup_steps=opt.warmup_steps,
            warmup_ratio=opt.warmup_ratio,
            skip_nonfinite=True,
            **opt.overrides(),
        )
    except (ValueError, KeyError) as e:  # the optimizer's and the preset registry's own validation
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"optimizer: {msg}", hint="see docs/optimizer.md for the options") from None


def describe_optimizer(optimizer, opt: OptimizerConfig) -> str:
    """Parameter counts per group (nanoGPT's configure_optimizers print) and the key options."""
    parts = []
    for i, g in enumerate(optimizer.param_groups):
        n = sum(p.numel() for p in g["params"])
        parts.append(f"group {i}: {len(g['params'])} tensors, {n:,} params, weight_decay={g['weight_decay']}")
    d = optimizer.defaults
    opts = [f"{k}={d[k]}" for k in ("lr", "betas", "eps", "variant", "amsgrad") if k in d]
    # storage / placement options are attributes, not per-group hyperparameters; an offloaded
    # optimizer's are its inner (host) optimizer's
    inner = getattr(optimizer, "inner", optimizer)
    opts += [f"{k}={getattr(inner, k)}" for k in ("impl", "state_bits") if hasattr(inner, k)]
    opts.append(f"shard={opt.shard}")
    name = type(optimizer).__name__
    if inner is not optimizer:
        opts.append(f"offload={opt.offload}: fp32 masters + state in host memory")
        name = f"{name}[{type(inner).__name__}]"
    opts = ", ".join(opts)
    return f"{name}({opts})\n  " + "\n  ".join(parts)
