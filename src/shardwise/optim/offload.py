"""CPU offload: parameters and gradients stay on the accelerator, the optimizer lives in host memory.

:class:`CPUOffloadOptimizer` wraps any optimizer class (default :class:`shardwise.optim.AdamW`) for
single-device or DDP training whose optimizer state should not use accelerator memory. Per
parameter it keeps, in host memory (pinned when the parameter is on a CUDA device):

* an fp32 **master copy** (the parameter's own dtype when that is fp32 / fp64 / complex),
* one **transfer buffer** in the parameter's dtype: the gradient lands there (device -> host), and for
  16-bit parameters the rounded update leaves from it (host -> device),

and the inner optimizer keeps its state (32-bit or blockwise 8-bit moments) for the masters, so on
CPU ``impl="auto"`` runs shardwise's fused native kernel. :meth:`CPUOffloadOptimizer.step` works
per bucket of parameters: copy the gradients to the host (``non_blocking`` on a side CUDA stream),
step the inner optimizer on that bucket's masters, copy the masters back (cast to the parameter's
dtype, ``non_blocking`` on a second stream), so that on a GPU the copies of one bucket overlap the
host update of another. Same-named ideas: torchao's ``CPUOffloadOptimizer``, DeepSpeed's
ZeRO-Offload (``offload_optimizer``); docs/offload.md compares them and gives the memory math.

Correct by construction, not by convention:

* The wrapper's ``param_groups`` hold the device parameters and are the groups LR schedulers edit;
  their hyperparameters are pushed to the inner optimizer before every step and ``state_dict()``.
* A parameter written behind the optimizer's back (``model.load_state_dict``, DDP's initial
  broadcast, ``model.to(device)``) is noticed through its version counter and storage and its
  master is re-read from the device, unless the device value equals the master rounded to the
  parameter's dtype (a reload of the same weights keeps the master's extra precision).
* ``overlap_backward=True`` copies each gradient to the host as soon as autograd has accumulated
  it (``register_post_accumulate_grad_hook``) and records which tensor, at which version, it
  copied; ``step()`` re-copies every gradient that is no longer that tensor at that version
  (gradient accumulation, ``clip_grad_norm_`` and ``zero_grad`` write in place and bump it).
  ``GradScaler.unscale_`` does not bump it, so under a scaler (which hands this optimizer its
  scale: ``_step_supports_amp_scaling``) no hook copy is trusted. Under an initialized process
  group of more than one rank the hooks copy nothing and every gradient is copied at ``step()``,
  after DDP's all-reduce: whether DDP's writes show in the version depends on the order of its
  hooks and ours and on collectives writing raw memory (docs/offload.md).
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import shard as sharding
from .adam import AdamW, _AdamFamily, _all_finite

#: Top-level state-dict key holding the fp32 masters of 16-bit parameters (param index -> tensor).
#: torch's and shardwise's ``load_state_dict`` ignore it; without it a load re-reads the masters
#: from the (rounded) device parameters.
MASTER_KEY = "offload_master_params"
#: Elements per bucket (the unit of the copy / update pipeline): 4M, 16 MB of fp32. On a GPU the
#: copies of one bucket overlap the host update of another; everywhere it bounds the fp32 scratch
#: that holds the upcast gradients of 16-bit parameters to one bucket.
BUCKET_NUMEL = 1 << 22
#: Pinned host memory comes from torch's caching host allocator, which rounds every allocation up
#: to a power of two; pinned tensors are therefore carved out of slabs of this many bytes (or the
#: next power of two above a larger tensor), each slab an exact power of two.
SLAB_BYTES = 32 << 20
_ALIGN = 64  # bytes: every carved tensor starts on a cache line

_DEEPSPEED_HINT = (
    "DeepSpeed offloads the optimizer itself: set zero_optimization.offload_optimizer "
    '{"device": "cpu", "pin_memory": true} in the DeepSpeed JSON (ZeRO-Offload) and pass the plain '
    "optimizer (docs/offload.md)"
)
_FSDP2_HINT = (
    "FSDP2 has its own host offload: fully_shard(module, offload_policy=CPUOffloadPolicy()) keeps the "
    "sharded parameters, gradients and optimizer state in host memory, and shardwise.optim.AdamW "
    "then steps on the CPU shards with its fused kernel (docs/offload.md)"
)


# ----------------------------------------------------------------------------------- host memory
class HostArena:
    """Host tensors for masters and transfer buffers.

    Unpinned: one ordinary allocation per tensor. Pinned: tensors are carved (64-byte aligned,
    first fit, in request order) out of slabs whose sizes are exact powers of two, because torch's
    pinned allocator rounds each request up to one: a 3.4 MB tensor pinned on its own holds 4 MiB.
    ``slabs`` forces the slab layout without pinning (how the tests check it on a CPU machine).
    """

    def __init__(self, pin: bool, slabs: bool | None = None, slab_bytes: int = SLAB_BYTES) -> None:
        self.pin = pin
        self.use_slabs = pin if slabs is None else slabs
        self.slab_bytes = slab_bytes
        self._slabs: list[list[Any]] = []  # [uint8 tensor, bytes used]
        self._loose = 0  # bytes of one-per-tensor allocations

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if not self.use_slabs:
            self._loose += math.prod(shape) * _itemsize(dtype)
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        nbytes = math.prod(shape) * _itemsize(dtype)
        need = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        for slab in self._slabs:
            if slab[1] + need <= slab[0].numel():
                break
        else:
            size = max(self.slab_bytes, 1 << (need - 1).bit_length())
            slab = [torch.empty(size, dtype=torch.uint8, pin_memory=self.pin), 0]
            self._slabs.append(slab)
        start = slab[1]
        slab[1] += need
        return slab[0][start : start + nbytes].view(dtype).view(shape)

    def allocated_bytes(self) -> int:
        """Host bytes this arena holds (slabs whole, used or not)."""
        return self._loose + sum(s[0].numel() for s in self._slabs)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The master copy's dtype for a parameter of ``dtype``: fp32 for 16-bit floats, else the same."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------------------------- bookkeeping
@dataclass(eq=False)
class _Slot:
    """One parameter: the device tensor, its host master and transfer buffer, what we last saw."""

    param: Tensor
    master: Tensor
    buf: Tensor | None = None  # host, param dtype: gradient in; 16-bit update out (CUDA)
    seen: tuple | None = None  # (version, data_ptr, device, dtype) after our last write / read
    copied: tuple | None = None  # (weakref to the gradient, its version) that buf holds
    hook: Any = None
    pinned: bool = False


def _fingerprint(p: Tensor) -> tuple:
    return (p._version, p.data_ptr(), p.device, p.dtype)


@dataclass
class _Bucket:
    slots: list[_Slot]
    device: torch.device
    ready: Any = None  # CUDA event: this bucket's gradients are on the host
    scratch: list[Tensor] = field(default_factory=list)


class _StateView(Mapping):
    """``optimizer.state[device_param]``: the inner optimizer's state of its master."""

    def __init__(self, owner: CPUOffloadOptimizer) -> None:
        self._owner = weakref.proxy(owner)

    def __getitem__(self, p: Tensor) -> Any:
        slot = self._owner._slot_of.get(id(p))
        if slot is None or slot.param is not p:
            raise KeyError("not a parameter of this optimizer")
        inner = self._owner.inner.state
        return inner.get(slot.master, {})  # (no entry created) torch reads {} before the first step

    def __contains__(self, p: object) -> bool:
        slot = self._owner._slot_of.get(id(p))
        return slot is not None and slot.param is p and slot.master in self._owner.inner.state

    def __iter__(self) -> Iterator[Tensor]:
        inner = self._owner.inner.state
        return (s.param for s in self._owner._slots if s.master in inner)

    def __len__(self) -> int:
        return len(self._owner.inner.state)


# ----------------------------------------------------------------------------------- the wrapper
class CPUOffloadOptimizer(torch.optim.Optimizer):
    """Step ``optimizer_class`` on fp32 host copies of device parameters; state stays in host memory.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts (e.g.
            :func:`shardwise.optim.param_groups`), on any device. The wrapper's ``param_groups`` hold
            these tensors; schedulers and ``zero_grad`` act on them.
        optimizer_class: the optimizer stepped on the host masters (default
            :class:`shardwise.optim.AdamW`; any ``torch.optim.Optimizer`` class works).
        offload_gradients: torchao's option to free device gradients once copied; not supported
            (``True`` raises): clipping, DDP's all-reduce and gradient accumulation need them.
        overlap_backward: copy each gradient to the host as soon as autograd produces it, so the
            copies overlap the rest of the backward pass (CUDA); see the module docstring for why
            that stays exact, and when it is off.
        bucket_numel: elements per pipeline bucket (default :data:`BUCKET_NUMEL`); a parameter
            is never split, so a larger one is a bucket of its own.
        pin_memory: pin the masters and transfer buffers; default: for parameters on a CUDA device.
        skip_nonfinite: skip (and count in ``skipped_steps``) any step whose gradients hold inf or
            nan, checked on the device before anything is copied; parameters, masters and state
            stay untouched and the inner optimizer's step counters do not advance.
        **optimizer_kwargs: for ``optimizer_class`` (``lr``, ``betas``, ``state_bits=8``, ...).
            ``shard=True`` is refused: offloading keeps this rank's whole state on its host.

    ``state_dict()`` is the inner optimizer's (torch's keys, or shardwise's 8-bit codes and
    ``<key>_absmax``), indexed in the original parameter order, so it loads into a non-offloaded
    optimizer and back; for 16-bit parameters it also carries their fp32 masters under
    :data:`MASTER_KEY`, which makes a resume bit-for-bit.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        optimizer_class: type[torch.optim.Optimizer] = AdamW,
        *,
        offload_gradients: bool = False,
        overlap_backward: bool = False,
        bucket_numel: int | None = None,
        pin_memory: bool | None = None,
        skip_nonfinite: bool = False,
        **optimizer_kwargs: Any,
    ) -> None:
        if offload_gradients:
            raise ValueError(
                "CPUOffloadOptimizer(offload_gradients=True) is not supported: freeing the device "
                "gradients as they are copied breaks gradient clipping, DDP's all-reduce and gradient "
                "accumulation, which all need them on the device. Use overlap_backward=True to start the "
                "copies during backward instead (gradients stay on the device)"
            )
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(
                f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}"
            )
        if bucket_numel is not None and bucket_numel < 1:
            raise ValueError(f"Invalid bucket_numel: {bucket_numel} (must be >= 1)")
        if optimizer_kwargs.get("shard"):
            raise ValueError(
                "CPUOffloadOptimizer with shard=True: offloading keeps this rank's whole optimizer state "
                "in its host memory, ZeRO-1 splits it across ranks; they are not combined. Use "
                "AdamW(shard=True) without offload, FSDP2 with CPUOffloadPolicy, or DeepSpeed "
                "ZeRO-Offload (offload_optimizer) for both"
            )
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
            raise ValueError(f"CPUOffloadOptimizer under DeepSpeed: {_DEEPSPEED_HINT}")
        self._overlap = overlap_backward
        self._bucket_numel = bucket_numel
        self._pin = pin_memory
        self.skip_nonfinite = skip_nonfinite
        #: Steps skipped because a gradient held inf/nan (only counted with ``skip_nonfinite=True``).
        self.skipped_steps = 0
        self._arenas = {pin: HostArena(pin) for pin in (False, True)}
        self._slots: list[_Slot] = []
        self._slot_of: dict[int, _Slot] = {}
        self._streams: dict[torch.device, tuple[Any, Any]] = {}
        self._h2d_done: list[Any] = []
        self._scratch: Tensor | None = None
        self._warned_overlap = False

        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        device_groups, host_groups = [], []
        for group in groups:
            device_group, host_group = self._split_group(group)
            device_groups.append(device_group)
            host_groups.append(host_group)
        #: The optimizer stepping the host masters (its ``state`` holds the moments).
        self.inner = optimizer_class(host_groups, **optimizer_kwargs)
        # The device-side groups carry the inner groups' hyperparameters (defaults filled in,
        # normalized as the inner optimizer normalized them).
        for device_group, host_group in zip(device_groups, self.inner.param_groups):
            device_group.update({k: v for k, v in host_group.items() if k not in ("params", "param_names")})
        self._step_supports_amp_scaling = True  # see step(): GradScaler's scale and found-inf flag
        self._building = True
        super().__init__(device_groups, dict(self.inner.defaults))
        self._building = False
        self.state = _StateView(self)  # type: ignore[assignment]

    # ----------------------------------------------------------------- construction
    def _split_group(self, group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A user's group as (device group, host group of masters), slots created."""
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        named = bool(params) and isinstance(params[0], tuple)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        masters = [self._new_slot(p).master for p in tensors]
        rest = {k: v for k, v in group.items() if k != "params"}
        host = list(zip((p[0] for p in params), masters)) if named else masters
        return {**rest, "params": params}, {**rest, "params": host}

    def _new_slot(self, p: Tensor) -> _Slot:
        if not isinstance(p, Tensor):
            raise TypeError(
                "optimizer can only optimize Tensors, but one of the params is " + torch.typename(p)
            )
        _refuse_foreign(p)
        pin = self._wants_pin(p)
        master = self._arenas[pin].empty(p.shape, master_dtype(p.dtype))
        master.copy_(p.detach())
        master.requires_grad_(p.requires_grad)
        slot = _Slot(param=p, master=master, pinned=pin, seen=_fingerprint(p))
        self._slots.append(slot)
        self._slot_of[id(p)] = slot
        if self._overlap and p.requires_grad:
            slot.hook = self._register_hook(p)
        return slot

    def _wants_pin(self, p: Tensor) -> bool:
        return bool(self._pin if self._pin is not None else p.device.type == "cuda")

    def _register_hook(self, p: Tensor):
        me = weakref.ref(self)

        def copy_now(param: Tensor) -> None:
            owner = me()
            if owner is not None:
                owner._copy_from_hook(param)

        return p.register_post_accumulate_grad_hook(copy_now)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_building", True):  # inside __init__: slots and inner groups exist
            super().add_param_group(param_group)
            return
        device_group, host_group = self._split_group(param_group)
        self.inner.add_param_group(host_group)
        device_group.update(
            {k: v for k, v in self.inner.param_groups[-1].items() if k not in ("params", "param_names")}
        )
        super().add_param_group(device_group)

    # ----------------------------------------------------------------- copy, pickle, print
    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "CPUOffloadOptimizer cannot be pickled or deep-copied (it holds pinned buffers, CUDA streams "
            "and gradient hooks); save its state_dict() instead"
        )

    def __repr__(self) -> str:
        inner = "\n  ".join(repr(self.inner).splitlines())
        return (
            f"{type(self).__name__}(overlap_backward={self._overlap}, skip_nonfinite={self.skip_nonfinite}, "
            f"skipped_steps={self.skipped_steps},\n  inner={inner})"
        )

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step (returns ``closure()``'s loss when given): gradients to the host,
        the inner optimizer on the masters, the masters back to the device, bucket by bucket."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_params()
        self._push_hyperparameters()
        live = [s for s in self._slots if s.param.grad is not None]
        if not live:
            return loss
        # torch.amp.GradScaler hands over its scale and found-inf flag (_step_supports_amp_scaling):
        # its unscale_ writes the gradients without bumping their version counters, so with a
        # scaler no early (hook) copy is trusted, and still-scaled gradients are unscaled here,
        # in place, as GradScaler itself would have done.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return loss
        if grad_scale is not None:
            inv = float(grad_scale.double().reciprocal().float())
            for grads in _by_device([s.param.grad for s in live]):
                torch._foreach_mul_(grads, inv)
        for s in live:
            if s.param.grad.is_sparse:
                raise RuntimeError(
                    "CPUOffloadOptimizer does not support sparse gradients; use torch.optim.SparseAdam for "
                    "sparse embeddings (nn.Embedding(sparse=True))"
                )
        if self.skip_nonfinite and not _all_finite([s.param.grad for s in live]):
            self.skipped_steps += 1
            return loss
        self._wait_h2d()
        for s in self._slots:  # parameters written behind our back since the last step
            if s.seen != _fingerprint(s.param):
                self._reread_master(s)
        buckets = self._buckets(live)
        for b in buckets:  # all device -> host copies are queued before the first update
            self._gradients_to_host(b, trust=found_inf is None)
        defer_8bit_check = (
            getattr(self.inner, "_checked_8bit", True) is False and getattr(self.inner, "state_bits", 32) == 8
        )
        if defer_8bit_check:  # one step is several inner steps: check 8-bit use after all of them
            self.inner._checked_8bit = True
        for b in buckets:
            if b.ready is not None:
                b.ready.synchronize()
            self._attach_grads(b)
            try:
                self.inner.step()
            finally:
                for s in b.slots:
                    s.master.grad = None
            self._params_to_device(b)
        if defer_8bit_check and isinstance(self.inner, _AdamFamily):
            self.inner._warn_if_no_8bit_state()
        self._finish_h2d()
        return loss

    def _buckets(self, live: list[_Slot]) -> list[_Bucket]:
        """Consecutive parameters of one device, up to ``bucket_numel`` elements each."""
        buckets: list[_Bucket] = []
        size = 0
        for s in live:
            dev = s.param.device
            limit = self._bucket_numel or BUCKET_NUMEL
            n = s.param.numel()
            if not buckets or buckets[-1].device != dev or (limit is not None and size + n > limit and size):
                buckets.append(_Bucket([], dev))
                size = 0
            buckets[-1].slots.append(s)
            size += n
        return buckets

    def _stream_pair(self, device: torch.device):
        """(device -> host, host -> device) side streams of a CUDA device, created once."""
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _buf(self, s: _Slot) -> Tensor:
        if s.buf is None or s.buf.dtype != s.param.dtype:
            s.buf = self._arenas[s.pinned].empty(s.param.shape, s.param.dtype)
            s.copied = None
        return s.buf

    def _holds_current_grad(self, s: _Slot) -> bool:
        g = s.param.grad
        return s.copied is not None and s.copied[0]() is g and s.copied[1] == g._version

    def _gradients_to_host(self, b: _Bucket, trust: bool) -> None:
        # Without the backward hooks every gradient is copied here; with them, those still exactly
        # as the hook copied them are not (DDP, GradScaler: never trusted, see step()).
        trust = trust and self._overlap and _distributed_world() == 1
        todo = [s for s in b.slots if not (trust and self._holds_current_grad(s))]
        if b.device.type != "cuda":
            for s in todo:
                self._buf(s).copy_(s.param.grad)
                s.copied = (weakref.ref(s.param.grad), s.param.grad._version)
            return
        d2h, _ = self._stream_pair(b.device)
        d2h.wait_stream(torch.cuda.current_stream(b.device))  # the gradients are complete
        with torch.cuda.stream(d2h):
            for s in todo:
                g = s.param.grad
                self._buf(s).copy_(g, non_blocking=s.pinned)
                g.record_stream(d2h)  # g may be freed before the copy ran (zero_grad)
                s.copied = (weakref.ref(g), g._version)
            b.ready = torch.cuda.Event()
            b.ready.record(d2h)  # after the hook copies of this stream too

    def _copy_from_hook(self, p: Tensor) -> None:
        """``overlap_backward``: copy ``p.grad`` to the host now (on a side stream on CUDA)."""
        if _distributed_world() > 1:
            if not self._warned_overlap:
                self._warned_overlap = True
                warnings.warn(
                    "CPUOffloadOptimizer(overlap_backward=True) inside a process group of more than one "
                    "rank: gradients are copied at step(), after DDP's all-reduce (docs/offload.md)",
                    stacklevel=2,
                )
            return
        s = self._slot_of.get(id(p))
        if s is None or s.param is not p or p.grad is None or p.grad.is_sparse:
            return
        g = p.grad
        with torch.no_grad():
            if p.device.type == "cuda":
                d2h, _ = self._stream_pair(p.device)
                d2h.wait_stream(torch.cuda.current_stream(p.device))
                with torch.cuda.stream(d2h):
                    self._buf(s).copy_(g, non_blocking=s.pinned)
                g.record_stream(d2h)
            else:
                self._buf(s).copy_(g)
        s.copied = (weakref.ref(g), g._version)

    def _attach_grads(self, b: _Bucket) -> None:
        """Host gradients as the masters' ``.grad``: the transfer buffer itself when the dtypes
        agree, else an fp32 view into one reused scratch buffer (16-bit gradients cast on the host)."""
        wide = [s for s in b.slots if s.buf.dtype != s.master.dtype]
        need = sum(s.master.numel() for s in wide)
        if need and (self._scratch is None or self._scratch.numel() < need):
            self._scratch = torch.empty(need, dtype=torch.float32)
        offset = 0
        for s in b.slots:
            if s.buf.dtype == s.master.dtype:
                s.master.grad = s.buf
                continue
            n = s.master.numel()
            g = self._scratch[offset : offset + n].view(s.master.shape)
            g.copy_(s.buf)
            s.master.grad = g
            offset += n

    def _params_to_device(self, b: _Bucket) -> None:
        if b.device.type != "cuda":
            for s in b.slots:
                s.param.copy_(s.master)
                s.seen = _fingerprint(s.param)
            return
        _, h2d = self._stream_pair(b.device)
        h2d.wait_stream(torch.cuda.current_stream(b.device))
        with torch.cuda.stream(h2d):
            for s in b.slots:
                src = s.master
                if s.master.dtype != s.param.dtype:  # round on the host into the pinned buffer:
                    s.buf.copy_(s.master)  # half the bytes over the bus, and a pinned source
                    s.copied = None
                    src = s.buf
                s.param.copy_(src, non_blocking=s.pinned)
                s.seen = _fingerprint(s.param)

    def _finish_h2d(self) -> None:
        """The next kernels on each device's current stream see the updated parameters; the next
        host write of a master or buffer waits for these copies (:meth:`_wait_h2d`)."""
        for device, (_, h2d) in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(h2d)
            done = torch.cuda.Event()
            done.record(h2d)
            self._h2d_done.append(done)

    def _wait_h2d(self) -> None:
        for event in self._h2d_done:
            event.synchronize()
        self._h2d_done.clear()

    # ----------------------------------------------------------------- parameters changed outside
    def _check_params(self) -> None:
        """The wrapper's groups still hold its parameters (or same-shaped replacements, adopted)."""
        current = [p for g in self.param_groups for p in g["params"]]
        if len(current) != len(self._slots):
            _refuse_swapped(current)
        for p, s in zip(current, self._slots):
            if p is s.param:
                continue
            if sharding.is_dtensor(p) or hasattr(p, "ds_id") or p.shape != s.param.shape:
                _refuse_swapped(current)
            # e.g. accelerate re-binding parameters: adopt the new tensor (master re-read if it differs)
            if s.hook is not None:
                s.hook.remove()
                s.hook = self._register_hook(p) if p.requires_grad else None
            del self._slot_of[id(s.param)]
            s.param, s.seen, s.copied = p, None, None
            self._slot_of[id(p)] = s

    def _reread_master(self, s: _Slot) -> None:
        """The device parameter changed since we last wrote it: it is the truth, unless it equals
        the master rounded to its dtype (a reload of the same weights, or a move between devices)."""
        p = s.param.detach()
        if master_dtype(p.dtype) != s.master.dtype:
            raise RuntimeError(
                f"a parameter's dtype changed from {s.master.dtype} to {p.dtype} after CPUOffloadOptimizer "
                "was built (its master copy and state have the old precision); build the optimizer after "
                "model.to(dtype)"
            )
        if p.device.type == "cuda" and not s.pinned and self._pin is not False:
            self._repin(s)
        host = p.to("cpu")
        if s.master.dtype == p.dtype or not torch.equal(s.master.to(p.dtype), host):
            s.master.copy_(host)
        s.seen = _fingerprint(s.param)
        s.copied = None

    def _repin(self, s: _Slot) -> None:
        """A parameter moved to a CUDA device after construction (``accelerator.prepare`` after
        building the optimizer): move its master into pinned memory, keeping the inner state."""
        master = self._arenas[True].empty(s.master.shape, s.master.dtype)
        master.copy_(s.master)
        master.requires_grad_(s.master.requires_grad)
        inner = self.inner
        for group in inner.param_groups:
            group["params"] = [master if q is s.master else q for q in group["params"]]
        if s.master in inner.state:
            inner.state[master] = inner.state.pop(s.master)
        s.master, s.buf, s.pinned = master, None, True

    # ----------------------------------------------------------------- hyperparameters, state dict
    def _push_hyperparameters(self) -> None:
        """Schedulers edit the wrapper's groups: the inner optimizer steps with their values."""
        for mine, theirs in zip(self.param_groups, self.inner.param_groups):
            for k, v in mine.items():
                if k not in ("params", "param_names"):
                    theirs[k] = v

    def _pull_hyperparameters(self) -> None:
        for mine, theirs in zip(self.param_groups, self.inner.param_groups):
            for k, v in theirs.items():
                if k not in ("params", "param_names"):
                    mine[k] = v

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (parameters indexed in this optimizer's order), plus the
        fp32 masters of 16-bit parameters under :data:`MASTER_KEY`."""
        self._push_hyperparameters()
        state = self.inner.state_dict()
        masters = {i: s.master for i, s in enumerate(self._slots) if s.master.dtype != s.param.dtype}
        if masters:
            state[MASTER_KEY] = masters
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an offloaded or ordinary state dict of the inner optimizer's class (shardwise:
        either state width). Masters in it are kept while the device parameters equal them rounded
        to their dtype (whether the model's weights are loaded before or after this)."""
        self._wait_h2d()
        self._check_params()
        masters = state_dict.get(MASTER_KEY, {})
        self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != MASTER_KEY})
        self._pull_hyperparameters()
        for i, t in masters.items():
            s = self._slots[int(i)]
            if tuple(t.shape) != tuple(s.master.shape):
                raise ValueError(
                    f"{MASTER_KEY}[{i}] has shape {tuple(t.shape)}, the parameter {tuple(s.master.shape)}"
                )
            s.master.copy_(t)
            s.seen = None  # compared with the device parameter at the next step
        for s in self._slots:
            s.copied = None

    # ----------------------------------------------------------------- introspection
    def state_bytes(self) -> int:
        """Bytes of the inner optimizer's state (moments and scales; not ``step``), all on the host."""
        if hasattr(self.inner, "state_bytes"):
            return int(self.inner.state_bytes())
        return sum(
            v.numel() * v.element_size()
            for st in self.inner.state.values()
            for k, v in st.items()
            if k != "step" and torch.is_tensor(v)
        )

    def host_bytes(self) -> dict[str, int]:
        """Host memory of the offload, measured from its tensors: ``master``, ``state``,
        ``buffers`` (transfer buffers), ``scratch`` (fp32 gradients of 16-bit parameters, one
        bucket), ``total`` (their sum) and ``allocated`` (including pinned slabs' unused tails)."""
        out = {
            "master": sum(s.master.numel() * s.master.element_size() for s in self._slots),
            "state": self.state_bytes(),
            "buffers": sum(s.buf.numel() * s.buf.element_size() for s in self._slots if s.buf is not None),
            "scratch": 0 if self._scratch is None else self._scratch.numel() * 4,
        }
        out["total"] = sum(out.values())
        out["allocated"] = (
            sum(a.allocated_bytes() for a in self._arenas.values()) + out["state"] + out["scratch"]
        )
        return out

    @property
    def masters(self) -> list[Tensor]:
        """The host master copies, in parameter order."""
        return [s.master for s in self._slots]


def _by_device(tensors: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


# ----------------------------------------------------------------------------------- refusals
def _distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _refuse_foreign(p: Tensor) -> None:
    if sharding.is_dtensor(p):
        raise ValueError(f"CPUOffloadOptimizer with FSDP2 (DTensor) parameters: {_FSDP2_HINT}")
    if hasattr(p, "ds_id"):
        raise ValueError(f"CPUOffloadOptimizer with DeepSpeed ZeRO-3 parameters: {_DEEPSPEED_HINT}")


def _refuse_swapped(current: list[Tensor]) -> None:
    if any(sharding.is_dtensor(p) for p in current):
        raise RuntimeError(
            "CPUOffloadOptimizer: its parameters were replaced by FSDP2 DTensors after it was built. "
            + _FSDP2_HINT
        )
    if all(p.ndim == 1 for p in current):
        raise RuntimeError(
            "CPUOffloadOptimizer: its parameters were replaced by flat partitions (DeepSpeed ZeRO wraps "
            "the optimizer this way). " + _DEEPSPEED_HINT
        )
    raise RuntimeError(
        "CPUOffloadOptimizer: param_groups no longer hold the parameters it was built with (other "
        "shapes or count); add parameters with add_param_group, or build the optimizer after the "
        "model's final parameters exist"
    )
