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
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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
