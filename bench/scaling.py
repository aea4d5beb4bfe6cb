"""How the optimizer step grows with model size, against the memory-bandwidth bound.

What is measured: for parameter counts from 1M to ``--max`` (default 256M, log-spaced by 4x), the
step time of torch fused fp32 AdamW and shardwise fused AdamW with 32- and 8-bit state (interleaved
repetitions in one process per size), the optimizer state bytes, and the process's resident memory.

Why: an Adam step reads and writes every parameter, gradient and moment once, so beyond the caches
it should be bound by memory bandwidth. The bound drawn next to the measurements is
``bytes moved per step / measured copy bandwidth``, with bytes moved per parameter:

* fp32 AdamW: read param, grad, exp_avg, exp_avg_sq (16 B), write param and both moments (12 B): 28 B;
* 8-bit state: read param, grad (8 B) and two 1-byte codes, write param and codes (6 B), plus one
  fp32 scale per 256-element block per moment read and written: 16 + 16/256 B.

The copy bandwidth is the best of a few ``dst.copy_(src)`` of a 1 GiB tensor (counts read + write).

    python bench/scaling.py [--max 256] [--threads 2]          # sizes in millions of parameters
    python bench/scaling.py --quick                             # tiny sizes for the tests
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import (
    RESULTS_DIR,
    copy_bandwidth,
    interleaved,
    log,
    machine_facts,
    peak_rss_bytes,
    rss_bytes,
    state_bytes,
    summarize,
    unavailable,
    write_json,
)

BYTES_MOVED = {32: 28.0, 8: 16.0 + 16.0 / 256}  # per parameter per step, see the docstring
CANDIDATES = {
    "torch_fused": ("torch AdamW fused fp32", 32),
    "shardwise_fused_32bit": ("shardwise fused 32-bit", 32),
    "shardwise_fused_8bit": ("shardwise fused 8-bit", 8),
}


def _make(name: str, params):
    from shardwise.optim import AdamW

    if name == "torch_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    return AdamW(params, lr=1e-3, impl="fused", state_bits=CANDIDATES[name][1])


def _params(n: int, device: str) -> list[torch.nn.Parameter]:
    """``n`` fp32 elements as up to 16 equal matrices of 1024 columns (like a transformer's)."""
    tensors = max(1, min(16, n // 2**20))
    rows = max(1, n // (tensors * 1024))
    ps = [torch.nn.Parameter(torch.rand(rows, 1024, device=device) - 0.5) for _ in range(tensors)]
    for p in ps:
        p.grad = (torch.rand_like(p) - 0.5) * 1e-2
    return ps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=float, default=1, help="smallest size, millions of params")
    parser.add_argument("--max", type=float, default=256, help="largest size, millions of params")
    parser.add_argument("--factor", type=float, default=4, help="ratio between successive sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "scaling.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.min, args.max, args.reps, args.warmup = 0.25, 1, 2, 1
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    bw_bytes = 256 << 20 if args.quick else 1 << 30
    bandwidth = copy_bandwidth(bw_bytes, device=args.device)
    threads = torch.get_num_threads()
    log(f"scaling: copy bandwidth {bandwidth / 1e9:.1f} GB/s on {args.device}, {threads} threads")

    sizes, m = [], args.min
    while m <= args.max * 1.0001:
        sizes.append(int(m * 2**20))
        m *= args.factor
    rows = []
    for n in sizes:
        params = _params(n, args.device)
        n = sum(p.numel() for p in params)
        opts, errors = {}, {}
        for name in CANDIDATES:
            try:
                opts[name] = _make(name, params)
            except Exception as e:
                errors[name] = unavailable(e)
        times = interleaved({k: o.step for k, o in opts.items()}, args.reps, args.warmup, args.device)
        rss = rss_bytes()
        gpu_peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
        for name, (label, bits) in CANDIDATES.items():
            row = {"name": name, "label": label, "state_bits": bits, "params": n}
            err = errors.get(name) or times.get(f"{name}!")
            if err:
                rows.append({**row, "status": err})
                continue
            row.update(summarize(times[name]))
            row.update(
                status="ok",
                state_bytes=state_bytes(opts[name]),
                bytes_moved=BYTES_MOVED[bits] * n,
                bound_ms=1e3 * BYTES_MOVED[bits] * n / bandwidth,
                process_rss_bytes=rss,
            )
            if gpu_peak is not None:
                row["cuda_max_allocated_bytes"] = gpu_peak  # all candidates of this size together
            row["fraction_of_bound"] = row["bound_ms"] / row["median_ms"]
            rows.append(row)
            log(
                f"  {n / 1e6:7.1f}M {label:<24} {row['median_ms']:9.2f} ms  bound {row['bound_ms']:8.2f} ms  "
                f"state {row['state_bytes'] / 2**20:8.1f} MiB"
            )
        del opts, params
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    payload = {
        "benchmark": "scaling",
        "machine": machine_facts(args.device),
        "config": {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "sizes": sizes,
            "reps": args.reps,
            "warmup": args.warmup,
            "quick": args.quick,
        },
        "copy_bandwidth_bytes_per_s": bandwidth,
        "bytes_moved_per_param": {str(k): v for k, v in BYTES_MOVED.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "rows": rows,
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
