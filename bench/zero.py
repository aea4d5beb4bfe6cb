"""ZeRO-1 benchmark: per-rank optimizer state memory and step time, 1 vs 2 ranks, in one run.

Compares, on the same parameters and (DDP-averaged, here synthetic) gradients:

* ``torch_adamw``: plain DDP ``torch.optim.AdamW(foreach=True)``: every rank keeps all the state;
* ``torch_zero``: ``torch.distributed.optim.ZeroRedundancyOptimizer(AdamW)``: whole parameters
  assigned to ranks (its imbalance shows when parameters differ in size);
* ``shardwise``: ``shardwise.optim.AdamW`` unsharded, and with ``shard=True`` (rows of every
  parameter on every rank, bucketed all-gather), 32-bit and 8-bit state.

Step time includes the parameter all-gather of the ZeRO variants. Run::

    python bench/zero.py [--params-m 8] [--steps 10]

Prints a table with ratios against ``torch_adamw`` on 1 rank and writes bench/results/zero.json.
The ranks are processes on one machine using gloo; on a shared CPU the absolute times are noisy:
compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from common import fmt_x, free_port, state_bytes, write_json

VARIANTS = ["torch_adamw", "torch_zero", "shardwise", "shardwise_zero1", "shardwise_zero1_8bit"]


def _shapes(params_m: float) -> list[tuple[int, ...]]:
    # Mixed sizes, like a transformer: big matrices, smaller ones and vectors (ZeroRedundancyOptimizer
    # balances whole parameters; shardwise splits each one).
    side = int((params_m * 1e6 / 22) ** 0.5)  # the shapes below hold ~22 * side**2 elements
    shapes = []
    for _ in range(3):
        shapes += [(side * 3, side), (side, side * 3), (side, side), (side,), (side,)]
    shapes += [(side * 2, side // 2), (7, side)]
    return shapes


def _make(variant: str, params: list[torch.nn.Parameter]):
    from shardwise.optim import AdamW

    if variant == "torch_adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if variant == "torch_zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3, foreach=True)
    bits = 8 if variant.endswith("8bit") else 32
    return AdamW(params, lr=1e-3, impl="auto", state_bits=bits, shard="zero1" in variant)


def _worker(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    shapes = _shapes(args.params_m)
    results = {}
    for variant in VARIANTS:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
        opt = _make(variant, params)
        times = []
        for i in range(args.warmup + args.steps):
            for p, gr in zip(params, grads):
                p.grad = gr
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
        times.sort()
        mine = {"state_bytes": state_bytes(opt), "step_ms": 1e3 * times[len(times) // 2]}
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        results[variant] = {
            "state_bytes_per_rank_max": max(r["state_bytes"] for r in gathered),
            "state_bytes_per_rank_min": min(r["state_bytes"] for r in gathered),
            "step_ms_median_slowest_rank": max(r["step_ms"] for r in gathered),
        }
        del opt, params, grads
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    result = out.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    return result


def headline(doc: dict) -> list[str]:
    """This result's line in the README headline (report.py prints it as it is)."""
    two = {r["variant"]: r for r in doc["rows"] if r["world"] == 2}
    parts = [
        f"{label} **{fmt_x(two[v]['mem_ratio'])}**"
        for v, label in (("shardwise_zero1", "32-bit"), ("shardwise_zero1_8bit", "8-bit"))
        if v in two
    ]
    if not parts:
        return []
    return [
        "- ZeRO-1 on 2 ranks: optimizer state per rank vs unsharded fp32 AdamW: " + ", ".join(parts) + "."
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=float, default=8.0, help="model size in millions of parameters")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zero.json"))
    args = parser.parse_args()

    n_params = sum(torch.Size(s).numel() for s in _shapes(args.params_m))
    by_world = {w: run(w, args) for w in (1, 2)}
    base = by_world[1]["torch_adamw"]
    rows = []
    print(f"{n_params / 1e6:.1f}M fp32 params, {os.cpu_count()} CPUs, gloo; ratios vs torch_adamw on 1 rank")
    header = ("world", "variant", "state MB/rank", "mem ratio", "step ms", "time ratio")
    print("{:>5} {:<22} {:>14} {:>9} {:>9} {:>10}".format(*header))
    for world, res in by_world.items():
        for variant, r in res.items():
            mem_ratio = r["state_bytes_per_rank_max"] / base["state_bytes_per_rank_max"]
            time_ratio = r["step_ms_median_slowest_rank"] / base["step_ms_median_slowest_rank"]
            rows.append(
                {"world": world, "variant": variant, **r, "mem_ratio": mem_ratio, "time_ratio": time_ratio}
            )
            print(
                f"{world:>5} {variant:<22} {r['state_bytes_per_rank_max'] / 2**20:>14.1f} {mem_ratio:>9.3f} "
                f"{r['step_ms_median_slowest_rank']:>9.1f} {time_ratio:>10.2f}"
            )
    for variant in ("torch_zero", "shardwise_zero1"):
        r = by_world[2][variant]
        print(
            f"{variant} on 2 ranks: max/min state per rank = "
            f"{r['state_bytes_per_rank_max'] / max(1, r['state_bytes_per_rank_min']):.3f} (1.0 = balanced)"
        )
    payload = {"params": n_params, "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    payload["headline"] = headline(payload)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
