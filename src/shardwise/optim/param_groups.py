"""Decay / no-decay parameter groups.

Weight decay shrinks weights toward zero; applied to biases and normalization gains it only fights
the scale those parameters exist to learn. As nanoGPT and timm do, parameters with ``ndim <= 1``
(biases, LayerNorm / RMSNorm / BatchNorm gains, GPT-2's ``ln_1`` / ``ln_f``) and parameters named
``*.bias`` go to the no-decay group, together with whatever ``model.no_weight_decay()`` names (timm's
convention, e.g. ``{"pos_embed", "cls_token"}``; a name also matches the parameters under it).

Shapes are the parameters' full shapes: under DeepSpeed ZeRO-3 (``zero.Init``, accelerate's
``zero3_init_flag``) every parameter is an empty 1-D placeholder whose real shape DeepSpeed
records as ``ds_shape``; judged by the placeholder, every weight would lose its decay.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups for ``model``'s trainable parameters: ``weight_decay`` and no decay.

    Tied parameters appear once. Empty groups are dropped.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        named = any(name == s or name.startswith(f"{s}.") for s in skip)
        (no_decay if len(full_shape(p)) <= 1 or name.endswith("bias") or named else decay).append(p)
    log.info(
        "param groups: %d decayed tensors (%d params), %d undecayed tensors (%d params)",
        len(decay),
        sum(math.prod(full_shape(p)) for p in decay),
        len(no_decay),
        sum(math.prod(full_shape(p)) for p in no_decay),
    )
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """``p``'s real shape: DeepSpeed ZeRO-3's ``ds_shape`` for its partitioned placeholders."""
    return tuple(getattr(p, "ds_shape", p.shape))
