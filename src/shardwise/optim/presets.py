"""Named hyperparameter presets: optimizer kwargs plus a learning-rate schedule.

The usual starting points per task (vision, transformers, fine-tuning, GANs, LLMs, ...). Schedules
are built by ``transformers.get_scheduler`` (linear, cosine, cosine_with_min_lr, inverse_sqrt,
warmup_stable_decay, constant_with_warmup, ...), never re-implemented here.

=================  =======  ======  ============  =====  =====  ====================  ======
preset             class    lr      betas         eps    wd     schedule              warmup
=================  =======  ======  ============  =====  =====  ====================  ======
vision             AdamW    1e-3    (0.9, 0.999)  1e-8   0.01   cosine                0
transformer        AdamW    5e-5    (0.9, 0.98)   1e-8   0.01   linear                6%
finetune           AdamW    1e-5    (0.9, 0.999)  1e-8   0.01   linear                10%
gan-generator      Adam     1e-4    (0.5, 0.999)  1e-8   0      constant              0
gan-discriminator  Adam     2e-4    (0.5, 0.999)  1e-8   0      constant              0
llm                AdamW    3e-4    (0.9, 0.95)   1e-8   0.1    cosine_with_min_lr    1%
rnn                Adam     1e-3    (0.9, 0.995)  1e-8   0      constant              0
sparse             Adam     1e-3    (0.9, 0.95)   1e-8   0      constant              0
=================  =======  ======  ============  =====  =====  ====================  ======

``llm`` decays to 10% of the peak learning rate (``min_lr_rate=0.1``), as in Chinchilla / nanoGPT.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from .param_groups import param_groups

#: Optimizer classes by preset ``optimizer`` name; :mod:`.adam` registers Adam and AdamW, so this
#: module needs nothing above it (``Adam.from_preset`` reads presets, presets never import adam).
_OPTIMIZERS: dict[str, type] = {}


def register(name: str):
    """Class decorator: make ``cls`` the optimizer that presets naming ``name`` build."""

    def add(cls: type) -> type:
        _OPTIMIZERS[name] = cls
        return cls

    return add


@dataclass(frozen=True)
class Preset:
    name: str
    optimizer: str  # "adamw" | "adam"
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    schedule: str
    warmup_ratio: float = 0.0
    eps: float = 1e-8
    schedule_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    use: str = ""

    @property
    def optimizer_class(self) -> type:
        """``shardwise.optim.AdamW`` or ``Adam``."""
        return _OPTIMIZERS[self.optimizer]

    def optimizer_kwargs(self) -> dict[str, Any]:
        return dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("vision", "adamw", 1e-3, (0.9, 0.999), 0.01, "cosine", use="CNNs / ViTs from scratch"),
        Preset("transformer", "adamw", 5e-5, (0.9, 0.98), 0.01, "linear", 0.06, use="transformer training"),
        Preset(
            "finetune", "adamw", 1e-5, (0.9, 0.999), 0.01, "linear", 0.1, use="fine-tuning pretrained models"
        ),
        Preset("gan-generator", "adam", 1e-4, (0.5, 0.999), 0.0, "constant", use="GAN generator"),
        Preset("gan-discriminator", "adam", 2e-4, (0.5, 0.999), 0.0, "constant", use="GAN discriminator"),
        Preset(
            "llm",
            "adamw",
            3e-4,
            (0.9, 0.95),
            0.1,
            "cosine_with_min_lr",
            0.01,
            schedule_kwargs=MappingProxyType({"min_lr_rate": 0.1}),
            use="LLM pre-training",
        ),
        Preset("rnn", "adam", 1e-3, (0.9, 0.995), 0.0, "constant", use="recurrent networks"),
        Preset("sparse", "adam", 1e-3, (0.9, 0.95), 0.0, "constant", use="sparse features / embeddings"),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises ValueError suggesting the closest."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown preset: {name!r}.{hint} Available: {', '.join(PRESETS)}")
    return PRESETS[name]


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
        from .offload import CPUOffloadOptimizer  # imports the optimizer classes, which import us

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
