"""Adam and AdamW: the public optimizer classes.

The classes own what ``torch.optim`` optimizers own (param groups, lazy per-parameter state, the
state dict) and nothing else: the maths is :mod:`shardwise.optim.rule`, applied by one of the
implementations in :mod:`shardwise.optim.kernels`; 8-bit storage is :mod:`shardwise.optim.quant`;
ZeRO-1 partitioning and DTensor shards are :mod:`shardwise.optim.shard`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import presets, quant
from . import shard as sharding
from .kernels import IMPLS, Bucket, resolve, run
from .rule import VARIANTS, Rule, step_scalars


class _BucketKey(NamedTuple):
    """What one kernel call shares: device, dtype, step, state format, contiguity."""

    device: torch.device
    dtype: torch.dtype
    step: int
    format: quant.StateFormat
    contiguous: bool


class _AdamFamily(torch.optim.Optimizer):
    """Shared machinery of :class:`Adam` and :class:`AdamW` (they differ only in weight decay)."""

    decoupled_weight_decay: bool

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        *,
        amsgrad: bool,
        variant: str,
        impl: str,
        state_bits: int,
        maximize: bool,
        shard: bool | Any,
        skip_nonfinite: bool,
    ) -> None:
        _validate(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, variant=variant, amsgrad=amsgrad)
        if impl not in ("auto", *IMPLS):
            raise ValueError(
                f"Invalid impl: {impl!r} (expected one of 'auto', {', '.join(map(repr, IMPLS))})"
            )
        if state_bits not in (32, 8):
            raise ValueError(f"Invalid state_bits: {state_bits!r} (expected 32 or 8)")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            variant=variant,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate(**{k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "variant", "amsgrad")})
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(
                        "shardwise Adam does not support complex parameters (use torch.view_as_real)"
                    )
        self.impl = impl
        self.state_bits = state_bits
        self.skip_nonfinite = skip_nonfinite
        self._checked_8bit = False
        #: Steps skipped because a gradient held inf/nan (only counted with ``skip_nonfinite=True``).
        self.skipped_steps = 0
        self._partition = sharding.make_partition(shard_arg=shard, params=self._all_params())

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def from_preset(cls, name: str, params: Iterable[Tensor] | Iterable[dict[str, Any]], **overrides: Any):
        """Build this optimizer with preset ``name``'s hyperparameters, ``overrides`` on top."""
        return cls(params, **{**presets.get_preset(name).optimizer_kwargs(), **overrides})

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A torch.optim.Adam(W) state dict has none of these keys: give them their defaults.
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("variant", "adam")

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_nonfinite and not self._grads_finite():
            self.skipped_steps += 1
            return loss
        for group in self.param_groups:
            rule = Rule(
                variant=group["variant"],
                amsgrad=group["amsgrad"],
                decoupled=self.decoupled_weight_decay,
                maximize=group["maximize"],
            )
            beta1, beta2 = group["betas"]
            for key, bucket in self._buckets(group).items():
                scalars = step_scalars(
                    rule,
                    key.step,
                    lr=float(group["lr"]),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
                run(resolve(self.impl, key.device, key.contiguous), bucket, rule=rule, scalars=scalars)
        self._partition.after_step(self._all_params())
        if self.state_bits == 8 and not self._checked_8bit:
            self._checked_8bit = True
            self._warn_if_no_8bit_state()
        return loss

    def _warn_if_no_8bit_state(self) -> None:
        """state_bits=8 must never silently mean 32-bit: say so when no parameter qualifies."""
        if self.state and not any(quant.StateFormat.of(s).eight_bit for s in self.state.values()):
            _warn_once(
                "shardwise: state_bits=8 has no effect: every parameter is 1-D or has fewer than "
                f"{quant.MIN_NUMEL} elements, so all optimizer state stays 32-bit (DeepSpeed ZeRO hands "
                "the optimizer flat 1-D partitions; for sharded 8-bit state use shard=True or FSDP2)"
            )

    def _buckets(self, group: dict[str, Any]) -> dict[_BucketKey, Bucket]:
        """Group this step's work by (device, dtype, step, 8-bit?, contiguous?), creating state lazily."""
        buckets: dict[_BucketKey, Bucket] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "shardwise Adam does not support sparse gradients; use torch.optim.SparseAdam "
                    "for sparse embeddings (nn.Embedding(sparse=True))"
                )
            local = self._partition.local(p)
            if local is None:  # this rank owns no part of p (ZeRO-1 with tiny p)
                continue
            param, grad = local
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, param, state, group)
            elif group["amsgrad"] and "max_exp_avg_sq" not in state:
                # amsgrad switched on for a group after state exists: start the max from v.
                quant.StateFormat.of(state).copy_moment(state, "exp_avg_sq", "max_exp_avg_sq")
            state["step"] += 1
            fmt = quant.StateFormat.of(state)
            # The fused kernel walks memory in logical order: strided (e.g. channels-last) params
            # go to their own bucket, which the multi-tensor path serves.
            key = _BucketKey(param.device, param.dtype, int(state["step"]), fmt, param.is_contiguous())
            if key not in buckets:
                buckets[key] = Bucket.empty(amsgrad=group["amsgrad"], quantized=fmt.eight_bit)
            values, scales = fmt.stored(state, _moments(group))
            buckets[key].add(
                param,
                grad,
                [sharding.local_tensor(t) for t in values],
                None if scales is None else [sharding.local_tensor(t) for t in scales],
            )
        return buckets

    def _init_state(self, p: Tensor, local: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        # Like torch.optim: the step counter is a CPU scalar tensor (so state dicts interchange).
        state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        fmt = quant.StateFormat.choose(self.state_bits, p.shape)  # global shape, never the shard
        for moment in _moments(group):
            for key, t in fmt.zeros(moment, local).items():
                state[key] = self._partition.wrap_state(p, t)

    def _grads_finite(self) -> bool:
        """True when every gradient is finite, agreed across ranks when state is partitioned."""
        locals_ = [self._partition.local(p) for p in self._all_params() if p.grad is not None]
        grads = [local[1] for local in locals_ if local is not None]
        finite = torch.ones((), dtype=torch.bool)
        if grads:
            norms = torch._foreach_norm(grads, ord=float("inf"))
            finite = torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all()
        return self._partition.all_agree(bool(finite))

    # ----------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Like ``torch.optim``'s, in a format independent of world size and of ``state_bits``'s
        storage: 32-bit state uses torch's keys exactly; 8-bit moments are int8/uint8 codes with
        ``<key>_absmax`` fp32 scales (layout in :mod:`shardwise.optim.quant`). With ``shard=True``
        this is a collective: every rank returns the full state."""
        return self._partition.full_state_dict(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a shardwise or torch.optim Adam/AdamW state dict, converting between 32-bit and
        8-bit storage as this optimizer's ``state_bits`` asks; with ``shard=True`` keeps this rank's
        part only."""
        split = {pid: quant.split_codec_entries(s) for pid, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": {pid: rest for pid, (_, rest) in split.items()}})
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for pid, p in zip(ids, self._all_params()):
            state = self.state.get(p)
            if not state:
                continue
            for k, v in split.get(pid, ({}, {}))[0].items():
                state[k] = quant.restore_codec_entry(k, v, p.device)
            self.convert_state(p, state)
            self._partition.keep_local(p, state)

    def convert_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """Re-encode ``p``'s loaded ``state`` to this optimizer's storage (32-bit <-> 8-bit)."""
        quant.StateFormat.choose(self.state_bits, p.shape).convert(state, p.dtype)

    @property
    def partition(self) -> sharding.Replicated | sharding.ZeroPartition:
        """Where this optimizer's state lives across ranks (:mod:`shardwise.optim.shard`)."""
        return self._partition

    # ----------------------------------------------------------------- introspection
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this process (moments and scales; not ``step``)."""
        total = 0
        for state in self.state.values():
            for k, v in state.items():
                if k != "step" and torch.is_tensor(v):
                    t = sharding.local_tensor(v)
                    total += t.numel() * t.element_size()
        return total


@presets.register("adamw")
class AdamW(_AdamFamily):
    r"""Adam-family optimizer with decoupled weight decay (Loshchilov & Hutter, 2019).

    ``p <- p * (1 - lr * weight_decay)`` before the adaptive step; see :mod:`shardwise.optim.rule`
    for the full update. ``variant="adam"`` matches ``torch.optim.AdamW`` (``amsgrad`` too),
    ``"radam"`` matches ``torch.optim.RAdam(decoupled_weight_decay=True)``, ``"adabelief"`` matches
    ``adabelief_pytorch.AdaBelief(weight_decouple=True, rectify=False, fixed_decay=False)``.

    Args:
        params: parameters or param-group dicts (see :func:`shardwise.optim.param_groups`).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        amsgrad: keep the running maximum of the second moment (Reddi et al., 2018).
        variant: ``"adam"`` | ``"radam"`` | ``"adabelief"``.
        impl: ``"reference"`` | ``"foreach"`` | ``"fused"`` | ``"auto"`` (fastest available).
        state_bits: 32, or 8 for blockwise 8-bit moments (:mod:`shardwise.optim.quant`).
        maximize: maximize the objective instead of minimizing it.
        shard: ZeRO-1: partition optimizer state over the default process group (``True``) or a
            given ``ProcessGroup``. DTensor (FSDP2) parameters need no flag.
        skip_nonfinite: skip (and count in ``skipped_steps``) any step whose gradients hold inf or
            nan, leaving parameters and state untouched. All ranks agree to skip.
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        variant: str = "adam",
        impl: str = "auto",
        state_bits: int = 32,
        maximize: bool = False,
        shard: bool | Any = False,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad=amsgrad,
            variant=variant,
            impl=impl,
            state_bits=state_bits,
            maximize=maximize,
            shard=shard,
            skip_nonfinite=skip_nonfinite,
        )


@presets.register("adam")
class Adam(_AdamFamily):
    r"""Adam-family optimizer with coupled (L2) weight decay: ``g <- g + weight_decay * p``.

    ``variant="adam"`` matches ``torch.optim.Adam``, ``"radam"`` matches ``torch.optim.RAdam``,
    ``"adabelief"`` matches ``adabelief_pytorch.AdaBelief(weight_decouple=False, rectify=False)``.
    Arguments as :class:`AdamW`; ``weight_decay`` defaults to 0.
    """

    decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        variant: str = "adam",
        impl: str = "auto",
        state_bits: int = 32,
        maximize: bool = False,
        shard: bool | Any = False,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad=amsgrad,
            variant=variant,
            impl=impl,
            state_bits=state_bits,
            maximize=maximize,
            shard=shard,
            skip_nonfinite=skip_nonfinite,
        )


def _validate(*, lr, betas, eps, weight_decay, variant, amsgrad) -> None:
    """torch.optim-style checks: each names the argument and the offending value."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = float(lr)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (expected two values)")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r} (expected one of {', '.join(map(repr, VARIANTS))})")
    if amsgrad and variant == "radam":
        raise ValueError("Invalid combination: amsgrad=True with variant='radam' (RAdam has no AMSGrad form)")


def _moments(group: dict[str, Any]) -> tuple[str, ...]:
    return quant.MOMENTS if group["amsgrad"] else quant.MOMENTS[:2]


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
