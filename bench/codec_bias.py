"""Does the 8-bit codec bias the moments it stores? An EMA carried through encode/decode vs fp32.

The 8-bit state is re-encoded at every step, so a rounding error that is small once can add up over
the ``1 / (1 - beta)`` steps a moment remembers. This measures it without a model: gradients
``g ~ N(0, s^2)`` whose scales ``s`` spread log-uniformly over ``--decades`` decades inside every
256-element block (as the gradients of one weight row do), Adam's moments updated in fp32 and,
side by side, through each 8-bit codec (bench/codecs_8bit.py: shardwise's, what every shardwise
impl stores; bitsandbytes AdamW8bit's and torchao AdamW8bit's dynamic maps). Per decile of ``s`` we
report the stored 8-bit moment relative to fp32's (mean ``v8 / v32``, mean ``|m8| / |m32|``), the
magnitude of the update the stored moments imply, ``|m / sqrt(v)|``, relative to fp32's, and the
share of elements whose stored v is 0 (fp32's is not), after a few steps, after a demo-length run
(172) and at steady state (1,000).

    python bench/codec_bias.py [--decades 1 3] [--steps 10 172 1000] [--codecs shardwise ...]

Writes ``bench/results/codec_bias.json``; report.py renders it. About a minute on a CPU.
"""

from __future__ import annotations

import argparse

import torch
from codecs_8bit import BLOCK, CODECS
from common import RESULTS_DIR, machine_facts, unavailable, write_json

DECILES = {"smallest 10%": (0.0, 0.1), "middle 10%": (0.45, 0.55), "largest 10%": (0.9, 1.0)}


def simulate(
    decades: float,
    checkpoints: list[int],
    codec: str = "shardwise",
    betas=(0.9, 0.999),
    rows=64,
    cols=1024,
    seed=0,
) -> list[dict]:
    roundtrip = CODECS[codec]()
    g_ = torch.Generator().manual_seed(seed)
    half = decades * 2.302585 / 2  # ln(10) * decades / 2
    scale = torch.exp(torch.empty(rows, cols).uniform_(-half, half, generator=g_))
    rank = scale.flatten().argsort().argsort().reshape(rows, cols).float() / scale.numel()
    b1, b2 = betas
    m32, v32 = torch.zeros(rows, cols), torch.zeros(rows, cols)
    m8, v8 = torch.zeros(rows, cols), torch.zeros(rows, cols)  # as decoded from the stored codes
    out = []
    for t in range(1, max(checkpoints) + 1):
        g = torch.randn(rows, cols, generator=g_) * scale
        m32.mul_(b1).add_(g, alpha=1 - b1)
        v32.mul_(b2).addcmul_(g, g, value=1 - b2)
        m8 = roundtrip(m8.mul(b1).add_(g, alpha=1 - b1), True)
        v8 = roundtrip(v8.mul(b2).addcmul_(g, g, value=1 - b2), False)
        if t in checkpoints:
            u32, u8 = m32 / (v32.sqrt() + 1e-8), m8 / (v8.sqrt() + 1e-8)
            for name, (lo, hi) in DECILES.items():
                sel = (rank >= lo) & (rank < hi)
                out.append(
                    {
                        "codec": codec,
                        "decades": decades,
                        "step": t,
                        "decile": name,
                        "v8_over_v32": (v8[sel] / v32[sel]).mean().item(),
                        "m8_over_m32": (m8[sel].abs().mean() / m32[sel].abs().mean()).item(),
                        "update_ratio": (u8[sel].abs().mean() / u32[sel].abs().mean()).item(),
                        "m_zero": ((m8[sel] == 0) & (m32[sel] != 0)).float().mean().item(),
                        "v_zero": ((v8[sel] == 0) & (v32[sel] != 0)).float().mean().item(),
                    }
                )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decades", nargs="+", type=float, default=[1.0, 3.0])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 172, 1000])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--out", default=str(RESULTS_DIR / "codec_bias.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, status = [], {}
    for codec in args.codecs:
        try:
            rows += [r for d in args.decades for r in simulate(d, args.steps, codec)]
            status[codec] = "ok"
        except Exception as e:  # a missing or broken library is recorded, not fatal
            status[codec] = unavailable(e)
    print("| codec | spread | step | decile of \\|g\\| | v8 / v32 | \\|m8\\| / \\|m32\\| | update 8 / 32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['codec']} | {r['decades']:g} decades | {r['step']} | {r['decile']} | "
            f"{r['v8_over_v32']:.4f} | {r['m8_over_m32']:.4f} | {r['update_ratio']:.4f} |"
        )
    doc = {
        "benchmark": "codec_bias",
        "machine": machine_facts(),
        "config": {"betas": [0.9, 0.999], "block": BLOCK, "decades": args.decades, "steps": args.steps},
        "status": status,
        "rows": rows,
    }
    write_json(args.out, doc)
    return doc


if __name__ == "__main__":
    main()
