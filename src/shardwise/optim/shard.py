"""Where optimizer state lives across ranks.

A *partition* tells the optimizer which part of each parameter this rank updates and keeps state
for; the update rule never knows about ranks. Two cases exist:

* :class:`Replicated` (``shard=False``): every rank updates every parameter. DTensor parameters
  (FSDP2's ``fully_shard``) are still handled: the rank updates its local shard and keeps state for
  it only, wrapped as a DTensor with the parameter's placements so that
  ``torch.distributed.checkpoint.state_dict`` can gather or reshard it.
* :class:`ZeroPartition` (``shard=True`` or a ``ProcessGroup``): ZeRO stage 1 over plain (DDP)
  parameters.

The ZeRO-1 layout is FSDP2's: every parameter is split along dim 0 with ``torch.chunk`` semantics
(rank ``r`` owns rows ``[r * c, min((r + 1) * c, d0))`` with ``c = ceil(d0 / world)``), except
that a 1-D parameter of at least ``quant.MIN_NUMEL`` elements is split in whole 256-element
blocks. Splitting rows, never elements of a row, and long vectors at block boundaries, keeps the
8-bit blocks of :mod:`shardwise.optim.quant` whole, so a rank's codes and scales are exactly the
rows of the full ones; a parameter with fewer rows (blocks) than ranks leaves the last ranks
without a piece. The per-rank maximum is ``ceil(d0 / world)`` rows of every parameter, the same
as any balanced row split.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import quant

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None

#: Elements (per rank) that one bucketed all-gather carries at most.
BUCKET_NUMEL = 32 * 1024 * 1024


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The plain tensor holding this rank's data (a DTensor's local shard, else ``t``)."""
    return t._local_tensor if is_dtensor(t) else t


def chunk_bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rows`` that ``rank`` owns (``torch.chunk`` / DTensor ``Shard``)."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


# --------------------------------------------------------------------------------------- replicated
class Replicated:
    """Every rank updates all of each parameter (DTensor parameters: their local shard).

    Under DeepSpeed ZeRO the parameters are DeepSpeed's flat fp32 partitions, swapped in after
    construction: :meth:`notice` sees the swap, and :meth:`phase` then places each partition's
    8-bit blocks on its offset in DeepSpeed's flat buffer (ZeRO-1/2: ``rank * partition_size``,
    every rank's partition having the same size), so that blocks are the same on any number of
    ranks wherever partitions start on a multiple of 256."""

    shapes: list[tuple[int, ...]] | None = None  # None: unknown (unpickled from an older version)
    flat = False  # parameters replaced by an engine's flat partitions (DeepSpeed)
    checked = False

    def __init__(self, params: list[Tensor] | None = None) -> None:
        self.shapes = [tuple(p.shape) for p in params or []]

    def register(self, params: list[Tensor]) -> None:
        if self.shapes is not None:
            self.shapes.extend(tuple(p.shape) for p in params)
        self.checked = False

    def notice(self, params: list[Tensor]) -> None:
        """Called before each step and load: notices parameters swapped behind the optimizer's back."""
        if self.checked or self.shapes is None:
            return
        shapes = [tuple(p.shape) for p in params]
        if shapes != self.shapes and all(len(s) == 1 for s in shapes):
            self.flat = True
        self.checked = True

    def phase(self, p: Tensor) -> int:
        """Global flat offset of ``p``'s first element, modulo 256 (:func:`quant.flat_cuts`)."""
        if not self.flat or p.ndim != 1 or not _dist_ready():
            return 0
        return dist.get_rank() * p.numel() % quant.BLOCK

    def global_shape(self, p: Tensor) -> tuple[int, ...]:
        """``p``'s shape, or for a DeepSpeed partition its flat buffer's (equal partitions)."""
        if self.flat and p.ndim == 1 and _dist_ready():
            return (p.numel() * dist.get_world_size(),)
        return tuple(p.shape)

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
        """For a DTensor ``p``, turn plain full-size state (``optim.load_state_dict(full_sd)`` on an
        FSDP2 model) into this rank's shard; DTensor state (from DCP) is kept as it is."""
        if not is_dtensor(p):
            return
        for key, value in state.items():
            if key == "step" or not torch.is_tensor(value) or is_dtensor(value) or value.ndim == 0:
                continue
            if value.shape[0] != p.shape[0]:
                raise ValueError(
                    f"state {key!r} of shape {tuple(value.shape)} does not match parameter of global "
                    f"shape {tuple(p.shape)}: expected a full (unsharded) state tensor"
                )
            state[key] = self.wrap_state(p, _local_slice(value, p.device_mesh, p.placements).clone())


def _local_slice(full: Tensor, mesh: Any, placements: Any) -> Tensor:
    """This rank's piece of ``full`` under ``placements`` (no communication)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    piece = full
    for dim, (n, o) in enumerate(zip(shape, offset)):
        if n != full.shape[dim]:
            piece = piece.narrow(dim, o, n)
    return piece


def local_shape_like(p: Tensor, size: tuple[int, ...]) -> tuple[int, ...]:
    """This rank's shape of a state tensor of global ``size`` stored like DTensor parameter ``p``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, _ = compute_local_shape_and_global_offset(torch.Size(size), p.device_mesh, p.placements)
    return tuple(shape)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


# --------------------------------------------------------------------------------------- ZeRO-1
class ZeroPartition:
    """ZeRO stage 1: each rank keeps state for, and updates, rows ``chunk_bounds(d0, world, rank)``
    of every parameter (in place, on views of ``p.data`` / ``p.grad``); :meth:`after_step`
    all-gathers the updated rows in buckets of many parameters per collective."""

    def __init__(self, group: Any, params: list[Tensor], bucket_numel: int = BUCKET_NUMEL) -> None:
        for p in params:
            if is_dtensor(p):
                raise ValueError(
                    "shard=True with DTensor (FSDP2) parameters: their state is already sharded like "
                    "the parameters; drop shard=True"
                )
            if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3 (zero.Init) placeholders
                raise ValueError(
                    "shard=True with DeepSpeed ZeRO-3 parameters (zero.Init): DeepSpeed partitions the "
                    "optimizer state over the ranks already, and partitioning it again would corrupt "
                    "training. Drop shard=True (docs/sharding.md: which engine for which case)."
                )
        #: Shapes of the parameters this partition was built for (see :meth:`before_step`).
        self.shapes = [tuple(p.shape) for p in params]
        self.checked = False
        self.group = group
        # Without a process group this is a world of one (e.g. a shard=True run resumed on a single
        # process): every piece is the whole parameter and no collective is ever made.
        self.standalone = group is None and not _dist_ready()
        self.rank = 0 if self.standalone else dist.get_rank(group)
        self.world = 1 if self.standalone else dist.get_world_size(group)
        self.bucket_numel = bucket_numel

    def check_world(self) -> None:
        """Refuse to go on as a world of one once a larger process group exists: state built for
        one rank would silently stay unsharded."""
        if self.standalone and _dist_ready() and dist.get_world_size() > 1:
            raise RuntimeError(
                "AdamW(shard=True) was built before the process group existed (as a world of one), "
                f"but now {dist.get_world_size()} ranks run: build the optimizer after "
                "torch.distributed.init_process_group() / accelerate.Accelerator()"
            )

    def register(self, params: list[Tensor]) -> None:
        """Parameters added later (``add_param_group``)."""
        self.shapes.extend(tuple(p.shape) for p in params)
        self.checked = False

    def phase(self, p: Tensor) -> int:
        return 0  # 1-D pieces start on block boundaries (bounds)

    def global_shape(self, p: Tensor) -> tuple[int, ...]:
        return tuple(p.shape)

    def notice(self, params: list[Tensor]) -> None:
        """Checks made once, at the first step (or load): the world is still the one the state was built
        for, and the parameters are still the optimizer's own. DeepSpeed ZeRO (stage 1-3) swaps a
        client optimizer's parameters for its flat fp32 partitions when it wraps it (in
        ``deepspeed.initialize`` / ``accelerator.prepare``), after construction and without telling
        it: this is the first point where that is visible, and every engine shows it the same way."""
        if self.checked:
            return
        self.check_world()
        if [tuple(p.shape) for p in params] != self.shapes:
            raise RuntimeError(_UNDER_DEEPSPEED)
        self.checked = True

    # ------------------------------------------------------------------ copy, pickle
    def __deepcopy__(self, memo: dict) -> ZeroPartition:
        """A copy on the same process group (a communicator is shared, never copied)."""
        twin = object.__new__(ZeroPartition)
        twin.__dict__.update(self.__dict__)
        return twin

    def __getstate__(self) -> dict[str, Any]:
        if self.group is not None:
            raise TypeError(
                "cannot pickle an optimizer sharded over a custom ProcessGroup (shard=<group>); "
                "pickle its state_dict() instead"
            )
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled inside a process group: this process's rank and world size, not the saver's."""
        self.__dict__.update(state)
        self.standalone = not _dist_ready()
        self.rank, self.world = (0, 1) if self.standalone else (dist.get_rank(), dist.get_world_size())

    # ------------------------------------------------------------------ layout
    def bounds(self, p: Tensor, rank: int | None = None) -> tuple[int, int]:
        """Rows of ``p`` that ``rank`` (default: this rank) owns; a 0-d ``p`` is one row. A 1-D
        ``p`` large enough for 8-bit state is split in whole 256-element blocks, so that flat
        8-bit state (:mod:`.quant`) splits with it; shorter vectors by elements (balance)."""
        rank = self.rank if rank is None else rank
        if p.ndim == 1 and p.shape[0] >= quant.MIN_NUMEL:
            start, stop = chunk_bounds(-(-p.shape[0] // quant.BLOCK), self.world, rank)
            return min(start * quant.BLOCK, p.shape[0]), min(stop * quant.BLOCK, p.shape[0])
        return chunk_bounds(p.shape[0] if p.ndim else 1, self.world, rank)

    def _piece(self, t: Tensor, p: Tensor, rank: int | None = None) -> Tensor:
        if p.ndim == 0:
            return t
        start, stop = self.bounds(p, rank)
        return t[start:stop]

    def _piece_numel(self, p: Tensor, rank: int) -> int:
        start, stop = self.bounds(p, rank)
        return (stop - start) * (math.prod(p.shape[1:]) if p.ndim else 1)

    # ------------------------------------------------------------------ the seam
    def local(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        start, stop = self.bounds(p)
        if stop <= start:
            return None
        return self._piece(p.data, p), self._piece(p.grad, p)

    def wrap_state(self, p: Tensor, local_state: Tensor) -> Tensor:
        return local_state

    def all_agree(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def comm_device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def after_step(self, params: list[Tensor]) -> None:
        """All-gather every trainable parameter's rows from their owners, bucketed by device and
        dtype (padded to the largest rank's share, ``all_gather_into_tensor``)."""
        if self.world == 1:
            return
        by_kind: dict[tuple, list[Tensor]] = {}
        for p in params:
            if p.requires_grad:
                by_kind.setdefault((p.device, p.dtype), []).append(p)
        for plist in by_kind.values():
            for bucket in self._split(plist, lambda p: self._piece_numel(p, 0)):
                self._gather_params(bucket)

    def _split(self, items: list, numel) -> list[list]:
        buckets, current, size = [], [], 0
        for item in items:
            n = numel(item)
            if current and size + n > self.bucket_numel:
                buckets.append(current)
                current, size = [], 0
            current.append(item)
            size += n
        if current:
            buckets.append(current)
        return buckets

    def _gather_params(self, plist: list[Tensor]) -> None:
        counts = [sum(self._piece_numel(p, r) for p in plist) for r in range(self.world)]
        width = max(counts)
        if width == 0:
            return
        ref = plist[0]
        send = torch.empty(width, dtype=ref.dtype, device=ref.device)
        mine = [self._piece(p.data, p).reshape(-1) for p in plist if self._piece_numel(p, self.rank)]
        if mine:
            torch.cat(mine, out=send[: counts[self.rank]])
        recv = torch.empty(width * self.world, dtype=ref.dtype, device=ref.device)
        _all_gather_flat(recv, send, self.group)
        dst, src = [], []
        for r in range(self.world):
            if r == self.rank:
                continue
            offset = r * width
            for p in plist:
                n = self._piece_numel(p, r)
                if n:
                    piece = self._piece(p.data, p, r)
                    dst.append(piece)
                    src.append(recv[offset : offset + n].view(piece.shape))
                    offset += n
        if dst:
            torch._foreach_copy_(dst, src)

    # ------------------------------------------------------------------ state dicts
    def full_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Gather every rank's pieces into the state an unsharded optimizer would hold (a
        collective: every rank must call it, and every rank gets the full state)."""
        if self.world == 1:
            return state_dict
        local = state_dict["state"]
        meta: dict[Any, dict[str, Any]] = {}
        for pid, s in local.items():
            if not s:
                continue
            meta[pid] = {
                k: (tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) and k != "step" else ("obj", v)
                for k, v in s.items()
            }
        metas: list[dict] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(metas, meta, group=self.group)

        order = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        full: dict[Any, dict[str, Any]] = {}
        items: list[tuple[Any, str]] = []  # tensors to gather, in one agreed order
        for pid in order:
            owners = [m[pid] for m in metas if pid in m]
            if not owners:
                continue
            entry: dict[str, Any] = {}
            for key, desc in owners[0].items():
                if desc[0] == "obj":
                    entry[key] = desc[1]
                    continue
                pieces = [m[pid][key][0] for m in metas if pid in m and key in m[pid]]
                shape = pieces[0] if len(pieces[0]) == 0 else (sum(s[0] for s in pieces), *pieces[0][1:])
                entry[key] = torch.empty(shape, dtype=desc[1], device=desc[2])
                items.append((pid, key))
            full[pid] = entry

        def piece_numel(rank: int, item: tuple[Any, str]) -> int:
            pid, key = item
            m = metas[rank]
            return math.prod(m[pid][key][0]) if pid in m and key in m[pid] else 0

        by_kind: dict[tuple, list[tuple[Any, str]]] = {}
        for item in items:
            t = full[item[0]][item[1]]
            by_kind.setdefault((t.device, t.dtype), []).append(item)
        for kind_items in by_kind.values():
            widest = lambda it: max(piece_numel(r, it) for r in range(self.world))
            for bucket in self._split(kind_items, widest):
                self._gather_state(bucket, local, full, piece_numel)
        return {"state": full, "param_groups": state_dict["param_groups"]}

    def _gather_state(self, items, local, full, piece_numel) -> None:
        counts = [sum(piece_numel(r, it) for it in items) for r in range(self.world)]
        width = max(counts)
        ref = full[items[0][0]][items[0][1]]
        send = torch.empty(width, dtype=ref.dtype, device=ref.device)
        mine = [local[pid][key].reshape(-1) for pid, key in items if piece_numel(self.rank, (pid, key))]
        if mine:
            torch.cat(mine, out=send[: counts[self.rank]])
        recv = torch.empty(width * self.world, dtype=ref.dtype, device=ref.device)
        _all_gather_flat(recv, send, self.group)
        row = {it: 0 for it in items}  # next row of each full tensor to fill (ranks own rows in order)
        for r in range(self.world):
            offset = r * width
            for it in items:
                n = piece_numel(r, it)
                if not n:
                    continue
                target = full[it[0]][it[1]]
                if target.ndim == 0:
                    target.copy_(recv[offset])
                else:
                    flat = target.view(target.shape[0], -1)
                    rows = n // flat.shape[1] if flat.shape[1] else 0
                    flat[row[it] : row[it] + rows].copy_(recv[offset : offset + n].view(rows, -1))
                    row[it] += rows
                offset += n

    def keep_local(self, p: Tensor, state: dict[str, Any]) -> None:
        """Cut full loaded state down to this rank's rows (drop it where this rank owns none)."""
        start, stop = self.bounds(p)
        if stop <= start:
            state.clear()
            return
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()  # never alias the loaded dict's counter
        if p.ndim == 0:
            return
        for key, value in list(state.items()):
            if key == "step" or not torch.is_tensor(value):
                continue
            rows = (start, stop)
            expected = p.shape[0]
            if quant.is_scale_key(key):
                rows = quant.scale_rows(p.shape, start, stop)
                expected = quant.scales_shape(p.shape)[0]
            if value.ndim == 0 or value.shape[0] != expected:
                raise ValueError(
                    f"state {key!r} of shape {tuple(value.shape)} is not full-size for a parameter of "
                    f"shape {tuple(p.shape)}: shard=True loads the full state that state_dict() returns"
                )
            state[key] = value[rows[0] : rows[1]].clone()


_UNDER_DEEPSPEED = (
    "shard=True under DeepSpeed ZeRO: this optimizer's parameters are not the ones it was built with "
    "(DeepSpeed replaces them with its own flat partitions, because it partitions the optimizer state "
    "over the ranks already); partitioning them again would corrupt training. Drop shard=True: "
    "DeepSpeed ZeRO-1/2/3 is ZeRO-sharded already (docs/sharding.md: which engine for which case). "
    "Without DeepSpeed: build the optimizer after any change to the parameters' shapes (e.g. "
    "resize_token_embeddings)."
)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather_flat(out: Tensor, inp: Tensor, group: Any) -> None:
    """``out = cat(inp of every rank)``: one collective (``all_gather_single`` where torch has it)."""
    gather = getattr(dist, "all_gather_single", None)
    if gather is not None:
        gather(out, inp, group=group)
    else:
        dist.all_gather_into_tensor(out, inp, group=group)


def make_partition(*, shard_arg: Any, params: list[Tensor]) -> Replicated | ZeroPartition:
    """The partition for ``AdamW(..., shard=shard_arg)``."""
    if shard_arg is False or shard_arg is None:
        return Replicated(params)
    if shard_arg is True:
        return ZeroPartition(None, params)
    if dist.is_available() and isinstance(shard_arg, dist.ProcessGroup):
        return ZeroPartition(shard_arg, params)
    raise ValueError(
        f"Invalid shard: {shard_arg!r} (expected False, True or a torch.distributed.ProcessGroup)"
    )
