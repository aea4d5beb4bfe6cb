"""How much does one pass through each 8-bit codec change Adam's update, on a real fine-tune?

quality_paired.py measures whole runs; this measures the codec alone, on real optimizer states.
One 32-bit run (shardwise AdamW, a quality_paired task and seed) is trained. Before every step, the
exact stored moments ``m, v`` of every tensor an 8-bit optimizer would quantize (>= 4,096 elements)
go once through each codec, as that optimizer would have stored them after the previous step, and
we compute the update the optimizer then takes with this step's gradient ``g``:

    m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,   u = (m' / c1) / (sqrt(v' / c2) + eps)

from the decoded moments and from the exact ones (``c1, c2``: bias corrections), and report

    relative error = ||u(decoded) - u(exact)||_2 / ||u(exact)||_2

summed over the tensors, and the same for the stored ``m`` and ``v`` alone. The codecs are
bench/codecs_8bit.py's (shardwise, bitsandbytes AdamW8bit's, torchao AdamW8bit's; blocks of 256);
a missing library is recorded as unavailable.

Since every codec sees the same states, the comparison has no seed noise; the run's loss curve
shows where loss spikes are, and whether the error grows at them (a spike widens the range of
values inside a block, which is where a codec's resolution runs out).

    python bench/codec_roundtrip.py             # SmolLM2, seed 0: ~30 min on a free core (torchao is slow)
    python bench/codec_roundtrip.py --task minilm_r8 --steps 60
    python bench/codec_roundtrip.py --quick --out /tmp/c.json   # tiny random model, seconds

Writes ``bench/results/codec_roundtrip.json``; report.py renders it.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from dataclasses import asdict

import torch
from codecs_8bit import BLOCK, CODECS, Roundtrip
from common import RESULTS_DIR, log, machine_facts, unavailable, write_json
from quality_paired import TASKS, TaskSettings, make_optimizer


def relative_errors(
    states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    codec: Roundtrip,
    step: int,
    settings: TaskSettings,
) -> dict[str, float]:
    """||f(decoded) - f(exact)|| / ||f(exact)|| over all tensors, for f = the stored m, the stored v,
    and this step's update (module docstring); ``states`` holds (m, v, g) per tensor."""
    b1, b2 = settings.betas
    c1, c2, eps = 1 - b1**step, 1 - b2**step, settings.eps

    def update(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        m, v = b1 * m + (1 - b1) * g, b2 * v.clamp_min(0) + (1 - b2) * g * g
        return (m / c1) / ((v / c2).sqrt() + eps)

    sums = {k: [0.0, 0.0] for k in ("m", "v", "update")}
    for m, v, g in states:
        m8, v8 = codec(m, True), codec(v, False)
        for key, exact, approx in (
            ("m", m, m8),
            ("v", v, v8),
            ("update", update(m, v, g), update(m8, v8, g)),
        ):
            sums[key][0] += (approx - exact).double().pow(2).sum().item()
            sums[key][1] += exact.double().pow(2).sum().item()
    return {k: math.sqrt(a / b) if b > 0 else 0.0 for k, (a, b) in sums.items()}


def run(task_name: str, seed: int, steps: int | None, quick: bool) -> tuple[dict, list[dict], dict]:
    """Train the 32-bit run; before every step (from the second), every codec's relative errors on
    the stored moments and on the update this step's gradient then gives."""
    from transformers import get_scheduler

    settings, cls = TASKS[task_name]
    if quick:
        settings = TaskSettings(**{**asdict(settings), "max_steps": 4, "batch_size": 4})
    task = cls(settings, quick)
    batches = task.batches(seed)[:steps] if steps else task.batches(seed)
    model = copy.deepcopy(task.initial_model(seed))
    model.train()
    opt = make_optimizer("shardwise_32bit", model, settings)
    sched = get_scheduler("linear", opt, round(settings.warmup_ratio * len(batches)), len(batches))
    torch.manual_seed(10_000 + seed)  # quality_paired's dropout masks for this seed
    codecs, status = {}, {}
    for name, factory in CODECS.items():
        try:
            codecs[name] = factory()
            codecs[name](torch.ones(BLOCK), True)  # fail here, not mid-run
            status[name] = "ok"
        except Exception as e:  # a missing or broken anchor is recorded, not fatal
            status[name] = unavailable(e)
            log(f"  {name}: {status[name]}")
    rows = []
    for i, batch in enumerate(batches, 1):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        states = [
            (s["exp_avg"].float(), s["exp_avg_sq"].float(), p.grad.float())
            for p, s in opt.state.items()
            if p.numel() >= 4096 and p.numel() % BLOCK == 0  # what the 8-bit optimizers quantize
        ]
        if states:  # from the second step on: the first starts from zero state, stored exactly
            row = {"step": i, "train_loss": loss.item()}
            for name, codec in codecs.items():
                row[name] = relative_errors(states, codec, i, settings)
            rows.append(row)
            log(f"step {i}: loss {row['train_loss']:.4f}  " + "  ".join(
                f"{n} update {row[n]['update']:.4f}" for n in codecs))  # fmt: skip
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return asdict(settings), rows, status


def summarize(rows: list[dict], status: dict) -> dict:
    """Per codec: median and max over the steps of each relative error, and its update error at the
    step with the largest loss increase (the sharpest spike)."""
    spike = max(
        range(1, len(rows)), key=lambda i: rows[i]["train_loss"] - rows[i - 1]["train_loss"], default=0
    )
    out = {}
    for name, ok in status.items():
        if ok != "ok":
            continue
        out[name] = {
            f"{key}_{stat}": f([r[name][key] for r in rows])
            for key in ("m", "v", "update")
            for stat, f in (("median", statistics.median), ("max", max))
        }
        out[name] |= {"spike_step": rows[spike]["step"], "update_at_spike": rows[spike][name]["update"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="smollm2", choices=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the task's own length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few steps (smoke test)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "codec_roundtrip.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings, rows, status = run(args.task, args.seed, args.steps, args.quick)
    summary = summarize(rows, status)
    for name, s in summary.items():
        print(
            f"{name:<13} update error median {s['update_median']:.4f} max {s['update_max']:.4f} "
            f"(at the spike, step {s['spike_step']}: {s['update_at_spike']:.4f}); "
            f"m {s['m_median']:.4f}, v {s['v_median']:.4f}"
        )
    doc = {
        "benchmark": "codec_roundtrip",
        "machine": machine_facts(),
        "config": {
            "task": args.task,
            "seed": args.seed,
            "quick": args.quick,
            "block": BLOCK,
            "threads": args.threads,
            "settings": settings,
        },
        "status": status,
        "rows": rows,
        "summary": summary,
    }
    write_json(args.out, doc)
    return doc


if __name__ == "__main__":
    main()
