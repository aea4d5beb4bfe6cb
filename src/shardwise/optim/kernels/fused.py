"""Fused implementation (placeholder until the native kernel lands)."""

from __future__ import annotations

import torch


def available(device: torch.device) -> bool:
    return False


def why_unavailable(device: torch.device) -> str:
    return "not built yet"


def adam_update_bucket(bucket, *, rule, scalars) -> None:
    raise RuntimeError("fused kernel unavailable")
