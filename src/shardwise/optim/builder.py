"""Optimizer + LR schedule from a named preset: what a training script calls instead of wiring both.

Separate from :mod:`.presets` (the registry the optimizer classes register into) because it builds
optimizers and the CPU-offload wrapper, which import the classes: presets stays importable by them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from .offload import CPUOffloadOptimizer
from .param_groups import param_groups
from .presets import get_preset


def optimizer_and_scheduler(
    preset: str,
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    num_training_steps: int,
    *,
    schedule: str | None = None,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    scheduler_kwargs: Mapping[str, Any] | None = None,
    offload: str = "none",
    **optimizer_overrides: Any,
):
    """Optimizer + LR scheduler from a preset, for ``num_training_steps`` optimizer steps.

    A model gets decay / no-decay groups (:func:`param_groups`); ``optimizer_overrides`` (``lr``,
    ``state_bits=8``, ``shard=True``, ...) go to the optimizer. ``warmup_steps`` wins over
    ``warmup_ratio``, which defaults to the preset's. ``offload="cpu"`` wraps the optimizer in
    :class:`shardwise.optim.CPUOffloadOptimizer` (masters and state in host memory; docs/offload.md).
    """
    from transformers import get_scheduler

    p = get_preset(preset)
    if num_training_steps <= 0:
        raise ValueError(f"Invalid num_training_steps: {num_training_steps} (must be > 0)")
    if offload not in ("none", "cpu"):
        raise ValueError(f"Invalid offload: {offload!r} (expected 'none' or 'cpu')")
    kwargs = {**p.optimizer_kwargs(), **optimizer_overrides}
    params = (
        param_groups(model_or_params, kwargs["weight_decay"])
        if isinstance(model_or_params, nn.Module)
        else model_or_params
    )
    if offload == "cpu":
        optimizer = CPUOffloadOptimizer(params, p.optimizer_class, **kwargs)
    else:
        optimizer = p.optimizer_class(params, **kwargs)
    if warmup_steps is None:
        ratio = p.warmup_ratio if warmup_ratio is None else warmup_ratio
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"Invalid warmup_ratio: {ratio} (expected 0 <= warmup_ratio < 1)")
        warmup_steps = int(ratio * num_training_steps)
    if not 0 <= warmup_steps < num_training_steps:
        raise ValueError(
            f"Invalid warmup_steps: {warmup_steps} (must be >= 0 and below num_training_steps="
            f"{num_training_steps}); lower the warmup or train longer"
        )
    name = schedule or p.schedule
    extra = dict(p.schedule_kwargs) if schedule is None else {}
    extra.update(scheduler_kwargs or {})
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=extra or None,
    )
    return optimizer, scheduler
