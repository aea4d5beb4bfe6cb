"""Blockwise 8-bit storage for optimizer moments.

Layout
------
A parameter of shape ``(d0, d1, ...)`` is viewed as ``d0`` rows of ``R = d1 * d2 * ...`` elements.
Each row is cut into blocks of ``BLOCK = 256`` consecutive elements (the last block of a row may be
shorter); each block stores one fp32 scale, its absolute maximum. Codes have the parameter's shape,
scales have shape ``(d0, ceil(R / 256))``. Because no block crosses a row, any split of dim 0 (FSDP2's
``Shard(0)``, ZeRO-1's row ranges) cuts codes and scales at the same place: the 8-bit state of a
parameter is the same however it is sharded.

Code maps (in the spirit of Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization",
which motivates non-linear maps with more resolution near zero)
-----------------------------------------------------------------
* first moment (signed, int8 in [-127, 127]), square-root companding::

      c = sign(x) * round(127 * sqrt(|x| / a))        x' = a * c * |c| / 127^2

* second moment and its AMSGrad maximum (non-negative, uint8 in [0, 255]), fourth-root companding::

      c = round(255 * (x / a) ** (1/4))                 x' = a * (c^2)^2 / 255^4

where ``a`` is the block's absmax. The square root gives the first moment ~127^2 = 16,129 distinct
magnitude levels down to ``a / 16129``; the fourth root spans the second moment's much wider range,
down to ``a / 4.2e9``, i.e. ``sqrt(v)`` (what the update divides by) down to ``sqrt(a) / 65025``.
Both maps are closed-form, so the fused kernels decode with a few multiplies and encode with one
square root per element (the second moment's first root is the update's ``sqrt(v)``) instead of a
table search. Rounding is to nearest (ties to even), so the
maximum round-trip error of a block is half a code step: at most ``a * 127/127^2 = a/127`` for the
first moment (at the top of the range) and ``a * (1 - (254.5/255)^4) ~ a/128`` for the second.

Flat (1-D) state
----------------
A 1-D tensor of ``n`` elements is one row whose blocks are aligned to its *global flat offset*
``o``: block ``k`` holds the elements whose offset is in ``[256 k, 256 (k + 1))``. Its codes have
shape ``(n,)`` and its scales ``(blocks touched,)``; the *phase* ``o % 256`` is 0 for a whole
parameter and for ZeRO-1 pieces (:mod:`shardwise.optim.shard` splits 1-D parameters at multiples
of 256), so a piece's codes and scales are slices of the whole parameter's. A DeepSpeed flat
partition starts at ``rank * partition_size`` of DeepSpeed's flat buffer: its first block is the
partial block that the previous rank's partition ends with (:func:`flat_cuts`). The kernels see
each aligned run of blocks as a ``(1, length)`` row (:func:`kernel_views`).

Parameters with fewer than ``MIN_NUMEL = 4096`` elements (biases, norms, small heads) keep
full-precision state: they are a negligible share of memory and the most sensitive to
quantization. The choice uses the global (unsharded) size, never a local shard.

This module is the torch-ops codec: the spec, used by the reference and foreach implementations and
by state-dict conversion. The fused kernels implement the same maps natively.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK = 256
MIN_NUMEL = 4096
SIGNED_MAX = 127.0
UNSIGNED_MAX = 255.0
TINY_ABSMAX = 2.0**-64
PRESCALE = 2.0**64


def uses_8bit(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a parameter of this global shape gets 8-bit state (``state_bits=8``)."""
    return len(shape) >= 1 and math.prod(shape) >= MIN_NUMEL


def row_length(shape: torch.Size | tuple[int, ...]) -> int:
    """Elements per row: everything after dim 0."""
    return math.prod(shape[1:])


def scales_shape(shape: torch.Size | tuple[int, ...], phase: int = 0) -> tuple[int, ...]:
    """Shape of the per-block absmax tensor for a parameter (or dim-0 shard) of ``shape``; a 1-D
    one starting at global offset ``phase`` (mod 256) has one scale per block it touches."""
    if len(shape) == 1:
        return (flat_cuts(shape[0], phase)[-1][3] if shape[0] else 0,)
    return (shape[0], -(-row_length(shape) // BLOCK))


def flat_cuts(n: int, phase: int = 0) -> list[tuple[int, int, int, int]]:
    """Aligned runs of a flat tensor of ``n`` elements starting at global offset ``phase`` (mod
    256): ``(start, stop, first scale, stop scale)`` for the partial head block (if any), then for
    the whole blocks after it (the last may be ragged)."""
    head = min(-phase % BLOCK, n)
    cuts = [(0, head, 0, 1)] if head else []
    if n > head:
        first = len(cuts)
        cuts.append((head, n, first, first + -(-(n - head) // BLOCK)))
    return cuts


def scale_rows(shape: torch.Size | tuple[int, ...], start: int, stop: int) -> tuple[int, int]:
    """Rows of the scales that rows ``[start, stop)`` of a parameter of ``shape`` use (for a 1-D
    parameter, ``start`` must be a multiple of 256, as ZeRO-1 cuts it)."""
    if len(shape) == 1:
        return start // BLOCK, -(-stop // BLOCK)
    return start, stop


def kernel_views(
    param: Tensor, grad: Tensor, values: list[Tensor], scales: list[Tensor] | None, phase: int = 0
) -> list[tuple[Tensor, Tensor, list[Tensor], list[Tensor] | None]]:
    """The tensors as the kernels take them: unchanged, except 8-bit flat state, which becomes one
    ``(1, length)`` row per aligned run (:func:`flat_cuts`), views of the same memory."""
    if scales is None or param.ndim != 1:
        return [(param, grad, values, scales)]
    row = lambda t, a, b: t[a:b].view(1, -1)
    return [
        (row(param, a, b), row(grad, a, b), [row(v, a, b) for v in values], [row(c, sa, sb) for c in scales])
        for a, b, sa, sb in flat_cuts(param.shape[0], phase)
    ]


def _blocks(rows: Tensor) -> Tensor:
    """View ``(rows, R)`` as ``(rows, blocks, BLOCK)``, zero-padding each row to whole blocks."""
    pad = -rows.shape[1] % BLOCK
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.view(rows.shape[0], -1, BLOCK)


class _Layout:
    """Where the elementwise maths of a ``(rows, R)`` tensor runs, and how per-block values meet it.

    Eager: zero-padded ``(rows, blocks, 256)`` blocks, per-block values broadcast as
    ``(rows, blocks, 1)``: no per-element copy of the scales. Under ``torch.compile``
    (kernels/compiled.py): the unpadded ``(rows, R)`` elements, per-block values gathered per
    element, because Inductor's CPU backend in torch 2.13 miscompiles a padded view sliced back to
    ``R``. The arithmetic per element is the same either way.
    """

    def __init__(self, rows: Tensor):
        self.shape = rows.shape
        self.padded = not torch.compiler.is_compiling()
        self.data = _blocks(rows) if self.padded else rows
        if not self.padded:
            self._cols = torch.arange(rows.shape[1], device=rows.device) // BLOCK

    def spread(self, per_block: Tensor) -> Tensor:
        """A ``(rows, blocks)`` tensor, broadcastable against :attr:`data`."""
        return per_block.unsqueeze(-1) if self.padded else per_block[:, self._cols]

    def absmax(self, magnitude: Tensor) -> Tensor:
        """Per-block max of ``magnitude`` (in this layout); zero padding cannot raise it, NaN stays."""
        return (magnitude if self.padded else _blocks(magnitude)).amax(dim=-1)

    def unpad(self, y: Tensor) -> Tensor:
        """Back to ``(rows, R)``."""
        return y.reshape(self.shape[0], -1)[:, : self.shape[1]] if self.padded else y


def encode(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` (any float dtype, ndim >= 2) to ``(codes, absmax)``.

    Non-finite values poison their block on purpose: its absmax is stored as NaN and its codes as
    0, so the block decodes to NaN instead of silently to wrong numbers.
    """
    layout = _Layout((x if x.dtype == torch.float64 else x.float()).reshape(x.shape[0], -1))
    magnitude = layout.data.abs()
    absmax = layout.absmax(magnitude)
    finite = torch.isfinite(absmax)
    ok = finite & (absmax > 0)
    # The maps with their constants folded into one factor per block, exactly as the fused kernel
    # computes them (so both round alike): round(sqrt(|x| * (127^2 / a))) and, for the second
    # moment, round(sqrt(sqrt(x) * (255^2 / sqrt(a)))) (the kernel reuses sqrt(x) from the update).
    if signed:
        # 127^2 / a overflows for a < ~5e-35: encode such blocks from x * 2^64 and a * 2^64
        # (a power of two, so exact).
        pre = torch.where(absmax < TINY_ABSMAX, PRESCALE, 1.0).to(absmax.dtype)
        factor = torch.where(ok, SIGNED_MAX**2 / (absmax * pre), torch.zeros_like(absmax))
        scaled = magnitude.mul(layout.spread(pre)).mul(layout.spread(factor))
        codes = torch.round(scaled.sqrt()).copysign(layout.data)
        dtype = torch.int8
    else:
        factor = torch.where(ok, UNSIGNED_MAX**2 / absmax.sqrt(), torch.zeros_like(absmax))
        codes = torch.round(magnitude.sqrt().mul(layout.spread(factor)).sqrt())
        dtype = torch.uint8
    codes = torch.where(layout.spread(finite), codes, torch.zeros_like(codes))
    absmax = torch.where(finite, absmax, torch.full_like(absmax, float("nan")))
    return layout.unpad(codes).to(dtype).reshape(x.shape), absmax.float()


def decode(codes: Tensor, absmax: Tensor, signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`encode` (up to rounding), in ``dtype``."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    # Normalize the code first, then scale: a / 255^4 would underflow for tiny blocks (a < ~5e-29
    # in fp32) and c^4 * a would overflow for huge ones. The fused kernel uses the same order.
    layout = _Layout(codes.reshape(codes.shape[0], -1).to(compute))
    a = layout.spread(absmax.to(compute))
    if signed:
        q = layout.data * (1.0 / SIGNED_MAX)
        x = q * q.abs() * a
    else:
        q = layout.data * (1.0 / UNSIGNED_MAX)
        q2 = q * q
        x = q2 * q2 * a
    return layout.unpad(x).reshape(codes.shape).to(dtype)


def encode_flat(x: Tensor, signed: bool, phase: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`encode` for flat state (1-D ``x`` starting at global offset ``phase``)."""
    pieces = [encode(x[a:b].view(1, -1), signed) for a, b, _, _ in flat_cuts(x.shape[0], phase)]
    if not pieces:
        return torch.zeros_like(x, dtype=torch.int8 if signed else torch.uint8), x.new_zeros(0).float()
    return torch.cat([c.view(-1) for c, _ in pieces]), torch.cat([a.view(-1) for _, a in pieces])


def decode_flat(codes: Tensor, absmax: Tensor, signed: bool, dtype: torch.dtype, phase: int = 0) -> Tensor:
    """Inverse of :func:`encode_flat`."""
    out = [
        decode(codes[a:b].view(1, -1), absmax[sa:sb].view(1, -1), signed, dtype).view(-1)
        for a, b, sa, sb in flat_cuts(codes.shape[0], phase)
    ]
    return torch.cat(out) if out else torch.zeros(codes.shape, dtype=dtype, device=codes.device)


def encode_into(x: Tensor, codes: Tensor, absmax: Tensor, signed: bool) -> None:
    """Quantize ``x`` into existing ``codes`` / ``absmax`` tensors (in place)."""
    new_codes, new_absmax = encode(x, signed)
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


# ------------------------------------------------------------------------------ state format
#: Optimizer-state moments, in the order kernels take them, and whether each is signed.
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SIGNED = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}


def _scale_key(moment: str) -> str:
    return f"{moment}_absmax"


def is_scale_key(key: str) -> bool:
    """Whether a per-parameter state key holds 8-bit scales."""
    return key.endswith("_absmax")


class StateFormat:
    """How one parameter's moments are stored: the only place that knows the codec's state keys.

    32-bit: each moment under its torch.optim key, in the parameter's dtype. 8-bit: the moment's
    key holds int8 (signed) / uint8 codes of the parameter's shape and ``<key>_absmax`` its fp32
    per-block scales (:func:`scales_shape`). :meth:`choose` decides which a parameter gets,
    :meth:`of` reads it back from existing state.
    """

    __slots__ = ("eight_bit",)

    def __init__(self, eight_bit: bool) -> None:
        self.eight_bit = eight_bit

    def __repr__(self) -> str:
        return f"StateFormat({'8' if self.eight_bit else '32'}-bit)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StateFormat) and other.eight_bit == self.eight_bit

    def __hash__(self) -> int:
        return hash(self.eight_bit)

    @staticmethod
    def choose(
        state_bits: int, param: Tensor, *, flat_ok: bool = True, shape: tuple[int, ...] | None = None
    ) -> StateFormat:
        """The format for ``param`` (the global parameter, never a shard) under ``state_bits``.

        Complex parameters keep 32-bit state: torch.optim stores their moments as complex tensors,
        which keeps their state dicts interchangeable, and they are rare and small (FFT filters,
        complex-valued layers), so 8-bit storage would save little. ``flat_ok=False`` keeps 1-D
        parameters 32-bit (FSDP2 cuts them at arbitrary elements, not at block boundaries).
        ``shape`` is the global shape where ``param`` is not the whole of it (DeepSpeed's flat
        buffer for one of its partitions), so that the choice never depends on the world size.
        """
        shape = param.shape if shape is None else shape
        if param.ndim == 1 and not flat_ok:
            return FULL
        if state_bits == 8 and uses_8bit(shape) and not param.is_complex():
            return EIGHT_BIT
        return FULL

    @staticmethod
    def of(state: dict) -> StateFormat:
        """The format existing per-parameter ``state`` is in."""
        return EIGHT_BIT if _scale_key("exp_avg") in state else FULL

    def zeros(self, moment: str, like: Tensor, phase: int = 0) -> dict[str, Tensor]:
        """Fresh (zero) storage for ``moment`` of a parameter (or shard) ``like`` (flat: starting
        at global offset ``phase``): key -> tensor."""
        if not self.eight_bit:
            return {moment: torch.zeros_like(like)}
        codes = torch.zeros_like(like, dtype=torch.int8 if _SIGNED[moment] else torch.uint8)
        scales = torch.zeros(scales_shape(like.shape, phase), dtype=torch.float32, device=like.device)
        return {moment: codes, _scale_key(moment): scales}

    def stored(self, state: dict, moments: tuple[str, ...]) -> tuple[list[Tensor], list[Tensor] | None]:
        """``moments``' tensors as kernels take them: (values or codes, scales or None)."""
        values = [state[k] for k in moments]
        return values, ([state[_scale_key(k)] for k in moments] if self.eight_bit else None)

    def copy_moment(self, state: dict, src: str, dst: str) -> None:
        """``state[dst] = copy of state[src]`` with its scales (AMSGrad switched on late)."""
        state[dst] = state[src].clone()
        if self.eight_bit:
            state[_scale_key(dst)] = state[_scale_key(src)].clone()

    def convert(self, state: dict, dtype: torch.dtype, phase: int = 0) -> None:
        """Re-encode loaded per-parameter ``state`` into this format in place (32 <-> 8-bit);
        decoded moments get ``dtype`` (the parameter's); flat state starts at offset ``phase``."""
        for key in MOMENTS:
            if key not in state:
                continue
            scale_key = _scale_key(key)
            is_8bit = scale_key in state
            if self.eight_bit and not is_8bit:
                full = state[key].to(dtype) if state[key].dtype == torch.float64 else state[key]
                if full.ndim == 1:
                    state[key], state[scale_key] = encode_flat(full, _SIGNED[key], phase)
                else:
                    state[key], state[scale_key] = encode(full, _SIGNED[key])
            elif is_8bit and not self.eight_bit:
                codes, scales = state[key], state.pop(scale_key)
                if codes.ndim == 1:
                    state[key] = decode_flat(codes, scales, _SIGNED[key], dtype, phase)
                else:
                    state[key] = decode(codes, scales, _SIGNED[key], dtype)


FULL = StateFormat(False)
EIGHT_BIT = StateFormat(True)


def split_codec_entries(state: dict) -> tuple[dict, dict]:
    """Split per-parameter state into (codes and scales, everything else).

    torch.optim's ``load_state_dict`` casts floating state to the parameter's dtype: 8-bit scales
    must stay fp32 and codes int8/uint8, so they travel beside torch's loader.
    """
    codec, rest = {}, {}
    for k, v in state.items():
        is_codec = k.endswith("_absmax") or _scale_key(k) in state
        (codec if is_codec else rest)[k] = v
    return codec, rest


def restore_codec_entry(key: str, value: Tensor, device: torch.device) -> Tensor:
    """A codec entry from :func:`split_codec_entries` on ``device``, scales back in fp32."""
    return value.to(device=device, dtype=torch.float32 if key.endswith("_absmax") else value.dtype)
