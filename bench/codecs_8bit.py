"""The 8-bit optimizer-state codecs the quality benchmarks compare, as round trips.

Each factory returns ``roundtrip(x, signed) -> decode(encode(x))``: what an 8-bit optimizer stores
for a moment tensor ``x`` (``signed``: the first moment; unsigned: the second), blocks of 256
elements each. Factories import their library lazily, so a missing one raises ImportError there
(the benchmarks record it as unavailable).

* shardwise: ``quant.encode`` / ``quant.decode`` (square-root map for m, fourth-root map for v,
  what every shardwise impl stores).
* bitsandbytes: ``quantize_blockwise`` with AdamW8bit's dynamic maps (signed for m, unsigned for v)
  and its block size.
* torchao: ``OptimState8bit``, the state tensor of torchao's AdamW8bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardwise.optim import quant

BLOCK = 256
Roundtrip = Callable[[torch.Tensor, bool], torch.Tensor]


def shardwise() -> Roundtrip:
    def roundtrip(x: torch.Tensor, signed: bool) -> torch.Tensor:
        codes, absmax = quant.encode(x, signed)
        return quant.decode(codes, absmax, signed)

    return roundtrip


def bitsandbytes() -> Roundtrip:
    import bitsandbytes.functional as bf

    maps = {True: bf.create_dynamic_map(signed=True), False: bf.create_dynamic_map(signed=False)}

    def roundtrip(x: torch.Tensor, signed: bool) -> torch.Tensor:
        codes, state = bf.quantize_blockwise(x.contiguous(), code=maps[signed], blocksize=BLOCK)
        return bf.dequantize_blockwise(codes, state).reshape(x.shape)

    return roundtrip


def torchao() -> Roundtrip:
    from torchao.optim.subclass_8bit import OptimState8bit

    def roundtrip(x: torch.Tensor, signed: bool) -> torch.Tensor:
        state = OptimState8bit.zeros(x.shape, signed, block_size=BLOCK, device=x.device)
        state.copy_(x)
        return state.dequantize()

    return roundtrip


CODECS: dict[str, Callable[[], Roundtrip]] = {
    "shardwise": shardwise,
    "bitsandbytes": bitsandbytes,
    "torchao": torchao,
}
