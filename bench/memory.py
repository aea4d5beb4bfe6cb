"""Peak process memory of a few training steps of the GPT recipe's model, per optimizer.

What is measured: each candidate runs in a FRESH subprocess (so the high-water mark is its own):
load the GPT recipe's default model (SmolLM2-135M from the offline asset cache; without the cache,
the same architecture built from its config with random init, and the JSON says which), then run a
few steps of forward + backward + optimizer step on the recipe's batch shape (4 x 256 tokens,
synthetic token ids, the same for every candidate). Recorded: the process's peak RSS
(``ru_maxrss``), the RSS after loading the model (before training), and the optimizer state bytes.

Why: the optimizer state is the part of training memory a user chooses (fp32 AdamW keeps 8 B/param,
8-bit state ~2 B/param); the peak RSS shows what that choice is worth in a whole training process,
next to activations, gradients and the allocator. ``no_optimizer`` (forward + backward only) is the
floor every other row is compared to.

    python bench/memory.py [--steps 2] [--only torch_adamw,shardwise_8bit]
    python bench/memory.py --quick          # a tiny Llama, seconds; what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from common import (
    RESULTS_DIR,
    fmt_gib,
    fmt_mib,
    gpt_model,
    log,
    machine_facts,
    peak_rss_bytes,
    rss_bytes,
    state_bytes,
    unavailable,
    write_json,
)

CANDIDATES = {
    "no_optimizer": "forward + backward only (floor)",
    "torch_adamw": "torch AdamW fused fp32",
    "shardwise_32bit": "shardwise AdamW 32-bit",
    "shardwise_8bit": "shardwise AdamW 8-bit",
    "bnb_adamw8bit": "bitsandbytes AdamW8bit",
    "torchao_adamw8bit": "torchao AdamW8bit",
}
_MARK = "@@RESULT@@"


def _make(name: str, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "no_optimizer":
        return None
    if name == "torch_adamw":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if name.startswith("shardwise"):
        from shardwise.optim import AdamW

        return AdamW(params, lr=1e-4, state_bits=8 if name.endswith("8bit") else 32)
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    if name == "torchao_adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=1e-4)
    raise ValueError(name)


def child(name: str, args) -> dict:
    """One candidate, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    out = {"name": name, "label": CANDIDATES[name]}
    model, source = gpt_model(args.quick)
    model.train()
    out["model"] = source
    out["params"] = sum(p.numel() for p in model.parameters())
    out["rss_after_load_bytes"] = rss_bytes()
    out["peak_rss_after_load_bytes"] = peak_rss_bytes()
    try:
        opt = _make(name, model)
    except Exception as e:
        return {**out, "status": unavailable(e)}
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    step_s = []
    try:
        for _ in range(args.steps):
            ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - t0)
    except Exception as e:
        return {**out, "status": unavailable(e)}
    out.update(
        status="ok",
        peak_rss_bytes=peak_rss_bytes(),
        state_bytes=0 if opt is None else state_bytes(opt),
        step_s=step_s,
    )
    out["state_bytes_per_param"] = out["state_bytes"] / out["params"]
    return out


def headline(doc: dict) -> list[str]:
    """This result's line in the README headline (report.py prints it as it is)."""
    rows = {r["name"]: r for r in doc["rows"]}
    a, b = rows.get("torch_adamw", {}), rows.get("shardwise_8bit", {})
    if a.get("status") != "ok" or b.get("status") != "ok":
        return []
    return [
        f"- Peak training memory, {doc['config']['model']}: {fmt_gib(b['peak_rss_bytes'])} GiB with "
        f"shardwise 8-bit vs {fmt_gib(a['peak_rss_bytes'])} GiB with torch AdamW "
        f"(optimizer state {fmt_mib(b['state_bytes'])} vs {fmt_mib(a['state_bytes'])} MiB)."
    ]


def run_child(name: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
    ]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {
        "name": name,
        "label": CANDIDATES[name],
        "status": f"unavailable: subprocess failed: {tail[:200]}",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps (state is allocated on the 1st)")
    parser.add_argument("--batch-size", type=int, default=4, help="the GPT recipe's batch")
    parser.add_argument("--seq-len", type=int, default=256, help="the GPT recipe's block size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma list of candidates: " + ",".join(CANDIDATES))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per candidate subprocess")
    parser.add_argument("--quick", action="store_true", help="tiny model for a smoke test (seconds)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS_DIR / "memory.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seq_len = 2, 2, 32
    if args.child:
        print(_MARK + json.dumps(child(args.child, args)), flush=True)
        return {}

    names = args.only.split(",") if args.only else list(CANDIDATES)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = run_child(name, args)
        rows.append(row)
        if row["status"] == "ok":
            log(
                f"  {row['label']:<34} peak RSS {row['peak_rss_bytes'] / 2**30:6.2f} GiB  "
                f"state {row['state_bytes'] / 2**20:7.1f} MiB  ({time.perf_counter() - t0:.0f} s)"
            )
        else:
            log(f"  {row['label']:<34} {row['status']}")
    floor = next((r for r in rows if r["name"] == "no_optimizer" and r["status"] == "ok"), None)
    for r in rows:
        if floor and r["status"] == "ok":
            r["peak_over_floor_bytes"] = r["peak_rss_bytes"] - floor["peak_rss_bytes"]
    model = next((r.get("model") for r in rows if r.get("model")), None)
    payload = {
        "benchmark": "memory",
        "machine": {**machine_facts("cpu"), "torch_threads": args.threads},
        "config": {
            "model": model,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "threads": args.threads,
            "quick": args.quick,
        },
        "rows": rows,
    }
    payload["headline"] = headline(payload)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
