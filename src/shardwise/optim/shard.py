"""Where optimizer state lives across ranks.

A *partition* tells the optimizer which part of each parameter this rank updates and keeps state
for; the update rule never knows about ranks. Two cases exist:

* no partition (``shard=False``): every rank updates every parameter. DTensor parameters (FSDP2's
  ``fully_shard``) are still handled: the rank updates its local shard and keeps state for it only,
  wrapped as a DTensor with the parameter's placements so that
  ``torch.distributed.checkpoint.state_dict`` can gather or reshard it.
* ZeRO-1 (``shard=True`` or a ``ProcessGroup``): see :class:`ZeroPartition`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The plain tensor holding this rank's data (a DTensor's local shard, else ``t``)."""
    return t._local_tensor if is_dtensor(t) else t


class Replicated:
    """Every rank updates all of each parameter (DTensor parameters: their local shard)."""

    def local(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        return local_tensor(p), local_tensor(p.grad)

    def wrap_state(self, p: Tensor, local_state: Tensor) -> Tensor:
        """State for ``p`` built from this rank's piece (a DTensor when ``p`` is one)."""
        if not is_dtensor(p):
            return local_state
        global_shape = (p.shape[0], *local_state.shape[1:])
        return DTensor.from_local(
            local_state,
            p.device_mesh,
            p.placements,
            run_check=False,
            shape=torch.Size(global_shape),
            stride=_contiguous_stride(global_shape),
        )

    def after_step(self, params: list[Tensor]) -> None:
        pass

    def all_agree(self, flag: bool) -> bool:
        return flag

    def full_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def keep_local(self, p: Tensor, state: dict[str, Any]) -> None:
        pass


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def make_partition(*, shard_arg: Any, params: list[Tensor]) -> Replicated:
    """The partition for ``AdamW(..., shard=shard_arg)``."""
    if shard_arg is False or shard_arg is None:
        return Replicated()
    raise NotImplementedError("shard=True (ZeRO-1) is not implemented yet")
