"""Sharded optimizer checkpoints with ``torch.distributed.checkpoint`` (DCP).

``optimizer.state_dict()`` with ``shard=True`` gathers the full state on every rank: simple, and
what ``Accelerator.save_state`` needs, but for a large model the full state may not fit on one rank.
:func:`save_sharded` / :func:`load_sharded` never build it: each rank writes and reads only its own
rows, as DTensor ``Shard(0)`` chunks, and DCP reshards on load, so a checkpoint written by N ranks
loads on M (1 included, with or without a process group), into ZeRO-1 (``shard=True``), FSDP2
(DTensor parameters) or an unsharded optimizer alike.

Layout: ``state.<param id>.<key>`` for every state tensor (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq`` and, for 8-bit state, the codes plus ``<key>_absmax`` scales of shape
``(d0, ceil(row / 256))``), param ids as in ``state_dict()``, and ``param_groups`` (hyperparameters)
as one object. Each state tensor holds the full, world-size-independent value, exactly as
``state_dict()`` would return it. Loading converts 32-bit <-> 8-bit storage locally (rows are
independent) when the optimizer's ``state_bits`` differs from the checkpoint's.

FSDP2 users may equally use ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
``set_optimizer_state_dict`` (keys by parameter name): shardwise's DTensor state supports both.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor

from .shard import Replicated, ZeroPartition, is_dtensor, local_shape_like, local_tensor


def _mesh(partition: ZeroPartition):
    from torch.distributed.device_mesh import DeviceMesh

    group = partition.group if partition.group is not None else dist.group.WORLD
    return DeviceMesh.from_group(group, device_type=partition.comm_device().type)


def _shard0(local: Tensor, global_rows: int, mesh) -> Tensor:
    from torch.distributed.tensor import DTensor, Shard

    shape = (global_rows, *local.shape[1:])
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return DTensor.from_local(
        local, mesh, (Shard(0),), run_check=False, shape=torch.Size(shape), stride=tuple(stride)
    )


def _params(optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def sharded_state_dict(optimizer) -> dict[str, Any]:
    """This rank's part of ``optimizer``'s state, as a DCP-ready dict (no communication).

    ZeRO-1 pieces become DTensor ``Shard(0)`` views of the full state; FSDP2 state already is
    DTensor; unsharded state is plain (DCP treats it as replicated and writes it once). ZeRO-1
    splits 1-D parameters in whole 256-element blocks, which DTensor's ``Shard(0)`` (torch.chunk
    offsets) cannot describe: their state is gathered (a collective, 1-D state being small) and
    written as plain full tensors.
    """
    partition = optimizer.partition
    mesh = _mesh(partition) if isinstance(partition, ZeroPartition) else None
    params = _params(optimizer)
    flat: dict[Any, dict[str, Any]] = {}
    if mesh is not None:
        ids = [pid for pid, p in enumerate(params) if p.ndim == 1]
        local = {pid: optimizer.state[params[pid]] for pid in ids if optimizer.state.get(params[pid])}
        flat = partition.full_state_dict({"state": local, "param_groups": [{"params": ids}]})["state"]
    state: dict[str, dict[str, Any]] = {}
    for pid, p in enumerate(params):
        s = flat.get(pid) if mesh is not None and p.ndim == 1 else optimizer.state.get(p)
        if not s:
            continue
        entry = {}
        for key, value in s.items():
            if mesh is not None and key != "step" and p.ndim > 1:
                value = _shard0(value, p.shape[0], mesh)
            entry[key] = value
        state[str(pid)] = entry
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    buf = io.BytesIO()
    torch.save(groups, buf)  # one opaque object: DCP would otherwise flatten the list of dicts
    buf.seek(0)
    return {"state": state, "param_groups": buf}


def save_sharded(optimizer, checkpoint_id: str | os.PathLike, **dcp_kwargs: Any) -> None:
    """Write ``optimizer``'s state to the DCP checkpoint ``checkpoint_id`` (a collective when a
    process group is initialized: every rank writes its own rows)."""
    dcp.save({"optim": sharded_state_dict(optimizer)}, checkpoint_id=checkpoint_id, **dcp_kwargs)


def load_sharded(optimizer, checkpoint_id: str | os.PathLike, **dcp_kwargs: Any) -> None:
    """Load a checkpoint written by :func:`save_sharded` (by any number of ranks) into
    ``optimizer``, reading only this rank's rows. Replaces the optimizer's state and
    hyperparameters, as ``load_state_dict`` does."""
    reader = dcp.FileSystemReader(checkpoint_id)
    metadata = reader.read_metadata().state_dict_metadata
    params = _params(optimizer)
    partition = optimizer.partition
    mesh = _mesh(partition) if isinstance(partition, ZeroPartition) else None

    entries: dict[str, dict[str, Any]] = {}
    for fqn, meta in metadata.items():
        parts = fqn.split(".")
        if parts[:2] != ["optim", "state"] or len(parts) != 4:
            continue
        pid, key = parts[2], parts[3]
        p = params[int(pid)]
        size = tuple(meta.size)
        dtype = meta.properties.dtype
        if key == "step":
            target = torch.zeros(size, dtype=dtype)
        elif mesh is not None:
            start, stop = partition.bounds(p)
            if stop <= start:
                continue  # this rank owns no rows of p
            if p.ndim <= 1:  # 0-d, or 1-D written full (sharded_state_dict): cut below
                target = torch.zeros(size, dtype=dtype, device=p.device)
            else:
                local = torch.zeros((stop - start, *size[1:]), dtype=dtype, device=p.device)
                target = _shard0(local, size[0], mesh)
        elif is_dtensor(p):
            target = Replicated().wrap_state(p, torch.zeros(local_shape_like(p, size), dtype=dtype))
        else:
            target = torch.zeros(size, dtype=dtype, device=p.device)
        entries.setdefault(pid, {})[key] = target

    groups = io.BytesIO()
    loaded = {"optim": {"state": entries, "param_groups": groups}}
    dcp.load(loaded, checkpoint_id=checkpoint_id, storage_reader=reader, **dcp_kwargs)

    groups = loaded["optim"]["param_groups"]  # DCP replaces the placeholder with what was saved
    groups.seek(0)
    saved_groups = torch.load(groups, weights_only=False)
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint {checkpoint_id} has {len(saved_groups)} param groups, the optimizer has "
            f"{len(optimizer.param_groups)}"
        )
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update(saved)
    optimizer.state.clear()
    for pid, entry in entries.items():
        p = params[int(pid)]
        # ``step`` first, as the optimizer creates it (DCP metadata lists keys alphabetically).
        keys = sorted(entry, key=lambda k: k != "step")
        state = {key: local_tensor(entry[key]) for key in keys}
        if "step" in state and len(state) == 1:
            continue  # this rank owns no rows of p
        optimizer.convert_state(p, state)  # 32-bit <-> 8-bit, row-local
        if mesh is not None and p.ndim == 1:
            partition.keep_local(p, state)
        if is_dtensor(p):
            wrap = Replicated().wrap_state
            state = {k: v if k == "step" or v.ndim == 0 else wrap(p, v) for k, v in state.items()}
        optimizer.state[p] = state
