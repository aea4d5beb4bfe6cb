"""The global RNG states (python, numpy, torch, CUDA): read, restore, and restore at the right moment."""

from __future__ import annotations

import random
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_after_first_batch(batches, state: dict[str, Any]):
    """Yield ``batches``; once the iterator exists (it draws a base seed from the global RNG), put the
    RNG state back, so that a run resumed mid-epoch draws the same dropout masks as an uninterrupted
    one, whose iterator was created (and whose number was drawn) before the checkpoint was taken."""
    for i, batch in enumerate(batches):
        if i == 0:
            set_rng_state(state)
        yield batch
