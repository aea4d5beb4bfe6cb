"""The shard-aware Adam family: one update rule, three implementations, 32- or 8-bit state.

>>> from shardwise.optim import AdamW
>>> opt = AdamW(model.parameters(), lr=3e-4, variant="adabelief", state_bits=8)  # doctest: +SKIP
"""

from .adam import Adam, AdamW
from .builder import optimizer_and_scheduler
from .offload import CPUOffloadOptimizer
from .param_groups import param_groups
from .presets import PRESETS, Preset, get_preset
from .rule import VARIANTS, Rule

__all__ = [
    "PRESETS",
    "VARIANTS",
    "Adam",
    "AdamW",
    "CPUOffloadOptimizer",
    "Preset",
    "Rule",
    "get_preset",
    "optimizer_and_scheduler",
    "param_groups",
]
