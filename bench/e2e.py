"""End-to-end training throughput (samples/s) of the recipes' models, per optimizer and loop.

Cases (``--cases``), each with the recipe's model and batch shape, synthetic data identical for
every candidate of the case:

* ``minilm``: the BERT recipe's model (all-MiniLM-L6-v2 + an 8-way classification head from the
  offline asset cache; without it, its config with random init), batch 32 x 32 tokens;
* ``smollm2``: the GPT recipe's model (SmolLM2-135M from the asset cache; without it or with
  ``--random-init``, its architecture with random init), causal-LM loss, batch 4 x 256 tokens;
* ``ddp``: ``minilm`` trained by 2 processes with DDP on gloo (the cpu_ddp setup of
  ``configs/accelerate/cpu_ddp.yaml``), batch 32 x 32 per rank; samples/s counts both ranks.

Candidates: ``loop_*``, a plain training loop (forward, backward, clip grad norm 1.0,
``opt.step()``, ``zero_grad``) with shardwise AdamW (``impl="auto"`` or a named impl, 32- or
8-bit state) or torch fused AdamW, the baseline; ``trainer_*`` (``minilm`` only), Hugging Face
``Trainer`` with its default optimizer (``adamw_torch_fused``) or shardwise AdamW 8-bit.

Why: the optimizer step is only part of a training step; this shows what a user gains end to end
and what the ``Trainer``'s machinery costs next to a plain loop. Within a case, candidates run
interleaved in one process (per rank): each round runs ``--steps`` timed steps of every candidate
(rotating order) after one untimed step; we report the median and min-max of per-round samples/s
and ratios to the plain loop with torch fused AdamW of the same case and run.

    python bench/e2e.py [--cases minilm,smollm2,ddp] [--rounds 5] [--steps 3]   # ~8 min on 2 cores
    python bench/e2e.py --quick        # tiny models, seconds; what the tests run
    python bench/e2e.py --device cuda --precision bf16 --cases smollm2 --random-init   # bench/gpu.sh
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from common import (
    RESULTS_DIR,
    fmt_x,
    gpt_model,
    log,
    machine_facts,
    rank_env,
    spawn_ranks,
    state_bytes,
    sync,
    unavailable,
    write_json,
)

BERT_ASSET = "models/all-MiniLM-L6-v2"
NUM_LABELS = 8  # Reuters R8, the BERT recipe's default data
MINILM = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
)
TINY_BERT = dict(
    vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)
BASELINE = "loop_torch_fused"
CANDIDATES = {
    "loop_shardwise_32bit": "plain loop, shardwise AdamW 32-bit",
    "loop_shardwise_8bit": "plain loop, shardwise AdamW 8-bit",
    "loop_shardwise_foreach_32bit": "plain loop, shardwise AdamW foreach 32-bit",
    "loop_shardwise_foreach_8bit": "plain loop, shardwise AdamW foreach 8-bit",
    "loop_shardwise_fused_32bit": "plain loop, shardwise AdamW fused 32-bit",
    "loop_shardwise_fused_8bit": "plain loop, shardwise AdamW fused 8-bit",
    BASELINE: "plain loop, torch AdamW fused",
    "trainer_torch_fused": "HF Trainer, default optim (adamw_torch_fused)",
    "trainer_shardwise_8bit": "HF Trainer, shardwise AdamW 8-bit",
}
# What each case runs unless --only says otherwise (the Trainer rows are the BERT recipe's question).
DEFAULTS = {
    "minilm": [
        "loop_shardwise_32bit",
        "loop_shardwise_8bit",
        BASELINE,
        "trainer_torch_fused",
        "trainer_shardwise_8bit",
    ],
    "smollm2": ["loop_shardwise_32bit", "loop_shardwise_8bit", BASELINE],
    "ddp": ["loop_shardwise_32bit", "loop_shardwise_8bit", BASELINE],
}
# (batch size per rank, sequence length, ranks): the recipes' shapes; --quick shrinks them.
SHAPES = {"minilm": (32, 32, 1), "smollm2": (4, 256, 1), "ddp": (32, 32, 2)}
# rounds per case: a MiniLM round takes ~20 s on 2 cores, a SmolLM2 round ~80 s; the per-round ratio
# of a short step is noisier (+-20% on a shared 2-core machine), so the cheap cases get more rounds
ROUNDS = {"minilm": 11, "smollm2": 5, "ddp": 9}
QUICK_SHAPES = {"minilm": (4, 16, 1), "smollm2": (2, 32, 1), "ddp": (4, 16, 2)}
LR, WD = 2e-4, 0.01


# ------------------------------------------------------------------------------------ models, data
def _bert(quick: bool, random_init: bool):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if quick:
        model = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=NUM_LABELS))
        return model, "tiny BERT (--quick)"
    from shardwise.data.assets import assets_dir

    path = Path(assets_dir()) / BERT_ASSET
    if not random_init and (path / "model.safetensors").exists():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS)
        return model, f"assets:{BERT_ASSET}"
    why = "requested" if random_init else "no asset cache"
    return BertForSequenceClassification(BertConfig(**MINILM, num_labels=NUM_LABELS)), (
        f"all-MiniLM-L6-v2 config, random init ({why})"
    )


def _model(case: str, args):
    if case == "smollm2":
        return gpt_model(args.quick, args.random_init)
    return _bert(args.quick, args.random_init)


class _Data(torch.utils.data.Dataset):
    """Synthetic token ids and labels, fixed by the seed: the same examples for every candidate.

    ``lm``: labels are the ids (the model shifts them); else one class label per example.
    """

    def __init__(self, n: int, seq_len: int, vocab: int, lm: bool, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (n, seq_len), generator=g)
        self.labels = self.ids if lm else torch.randint(0, NUM_LABELS, (n,), generator=g)

    def to(self, device: str) -> _Data:
        self.ids, self.labels = self.ids.to(device), self.labels.to(device)
        return self

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


# ----------------------------------------------------------------------------------- optimizers
def _optimizer(name: str, params):
    """The loop candidates' optimizer: torch fused AdamW, or shardwise AdamW named by impl and bits."""
    if name == BASELINE:
        return torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
    from shardwise.optim import AdamW

    parts = name.split("_")  # loop_shardwise[_impl]_{bits}bit
    impl = parts[2] if len(parts) == 4 else "auto"
    return AdamW(params, lr=LR, weight_decay=WD, impl=impl, state_bits=int(parts[-1][:-3]))


# ---------------------------------------------------------------------------------------- runners
class _Loop:
    """A plain training loop; ``run(k)`` does one untimed step, then ``k`` timed ones."""

    def __init__(self, model, opt, data: _Data, batch_size: int, device: str, precision: str):
        self.model, self.opt, self.data, self.bs, self.pos = model, opt, data, batch_size, 0
        self.device = device
        bf16 = precision == "bf16"
        self.autocast = lambda: (
            torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
        )

    def _step(self):
        i = self.pos % (len(self.data) - self.bs + 1)
        ids = self.data.ids[i : i + self.bs]
        self.pos += self.bs
        with self.autocast():
            loss = self.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), labels=self.data.labels[i : i + self.bs]
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, k: int, barrier=lambda: None) -> float:
        self._step()
        sync(self.device)
        barrier()
        t0 = time.perf_counter()
        for _ in range(k):
            self._step()
        sync(self.device)
        barrier()
        return time.perf_counter() - t0


class _TrainerRun:
    """HF Trainer; ``run(k)`` trains ``k + 1`` steps and times the last ``k`` (step-end to step-end)."""

    def __init__(self, model, optimizer, data: _Data, batch_size: int, workdir: str, device: str):
        from transformers import Trainer, TrainerCallback, TrainingArguments

        ends: list[float] = []
        self.ends = ends

        class _Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                sync(device)
                ends.append(time.perf_counter())

        self.args = dict(
            output_dir=workdir,
            per_device_train_batch_size=batch_size,
            learning_rate=LR,
            weight_decay=WD,
            max_grad_norm=1.0,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=device == "cpu",
            seed=0,
        )
        self.make = lambda k: Trainer(
            model=model,
            args=TrainingArguments(max_steps=k + 1, **self.args),
            train_dataset=data,
            optimizers=(optimizer, None),
            callbacks=[_Clock()],
        )
        self.trainer = None
        self.optimizer = optimizer

    def run(self, k: int, barrier=lambda: None) -> float:
        self.ends.clear()
        self.trainer = self.make(k)
        self.trainer.train()
        return self.ends[-1] - self.ends[0]

    @property
    def opt(self):
        return self.optimizer or (self.trainer.optimizer if self.trainer else None)


def _build(case: str, names: list[str], args, wrap=None) -> tuple[dict, dict, str | None]:
    """One runner per candidate (each with its own model copy); rows say ok or why not."""
    bs, seq_len, _ = (QUICK_SHAPES if args.quick else SHAPES)[case]
    workdir = tempfile.mkdtemp(prefix="shardwise-e2e-")
    runs, rows, source = {}, {}, None
    for name in names:
        rows[name] = {"case": case, "name": name, "label": CANDIDATES[name]}
        try:
            model, source = _model(case, args)
            model.to(args.device).train()
            data = _Data(bs * (args.steps + 2) * 2, seq_len, model.config.vocab_size, case == "smollm2")
            rows[name]["params"] = sum(p.numel() for p in model.parameters())
            if name.startswith("loop_"):
                model = wrap(model) if wrap else model
                opt = _optimizer(name, model.parameters())
                runs[name] = _Loop(model, opt, data.to(args.device), bs, args.device, args.precision)
            else:
                if wrap or args.precision != "fp32":
                    raise RuntimeError("the Trainer rows run on one process in fp32 only")
                opt = _optimizer("loop_shardwise_8bit", model.parameters()) if "shardwise" in name else None
                runs[name] = _TrainerRun(model, opt, data, bs, workdir, args.device)
            rows[name]["status"] = "ok"
        except Exception as e:
            rows[name]["status"] = unavailable(e)
    return runs, rows, source


def _rounds(
    runs: dict, rows: dict, args, samples_per_step: int, barrier=lambda: None, say=log, *, rounds: int
) -> dict:
    """Interleaved rounds (rotating order); per-candidate samples/s of every round."""
    per_round: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(rounds):
        order = list(runs)
        order = order[r % len(order) :] + order[: r % len(order)]
        for name in order:
            if rows[name]["status"] != "ok":
                continue
            try:
                dt = runs[name].run(args.steps, barrier)
                per_round[name].append(samples_per_step * args.steps / dt)
            except Exception as e:
                rows[name]["status"] = unavailable(e)
        say(f"  round {r + 1}/{rounds}")
    return per_round


def _summarize(runs: dict, rows: dict, per_round: dict) -> None:
    for name, row in rows.items():
        if row["status"] != "ok":
            continue
        sps = per_round[name]
        row.update(
            samples_per_s=statistics.median(sps),
            samples_per_s_min=min(sps),
            samples_per_s_max=max(sps),
            rounds=len(sps),
            state_bytes=state_bytes(runs[name].opt),
        )
    base = rows.get(BASELINE, {})
    for row in rows.values():
        if row["status"] == "ok" and base.get("status") == "ok":
            # the ratio is the median of round-by-round pairs (same round, same machine conditions):
            # a slow spell of the shared machine moves both sides of a pair, not the ratio
            paired = [a / b for a, b in zip(per_round[row["name"]], per_round[BASELINE])]
            row["ratio"] = statistics.median(paired)
            row["ratio_min"], row["ratio_max"] = min(paired), max(paired)
            row["ratio_of_medians"] = row["samples_per_s"] / base["samples_per_s"]
        if row["status"] == "ok":
            row["samples_per_s_rounds"] = [round(x, 4) for x in per_round[row["name"]]]


# ---------------------------------------------------------------------------- the 2-process case
def _ddp_worker(rank: int, world: int, port: int, args, names: list[str], out) -> None:
    import torch.distributed as dist

    rank_env(rank, world, port)
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=1800))
    try:
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m)
        runs, rows, source = _build("ddp", names, args, wrap)
        # every rank must run the same candidates, or the collectives would hang
        statuses = [None] * world
        dist.all_gather_object(statuses, {n: r["status"] for n, r in rows.items()})
        for n, r in rows.items():
            bad = [s[n] for s in statuses if s[n] != "ok"]
            r["status"] = bad[0] if bad else "ok"
        bs, _, _ = (QUICK_SHAPES if args.quick else SHAPES)["ddp"]
        say = log if rank == 0 else (lambda msg: None)
        rounds = args.rounds or ROUNDS["ddp"]
        per_round = _rounds(runs, rows, args, bs * world, dist.barrier, say, rounds=rounds)
        _summarize(runs, rows, per_round)
        if rank == 0:
            out.put((rows, source))
    except Exception as e:
        if rank == 0:
            out.put(
                (
                    {
                        n: {"case": "ddp", "name": n, "label": CANDIDATES[n], "status": unavailable(e)}
                        for n in names
                    },
                    None,
                )
            )
    finally:
        dist.destroy_process_group()


def _run_ddp(names: list[str], args) -> tuple[dict, str | None]:
    world = SHAPES["ddp"][2]
    try:
        return spawn_ranks(_ddp_worker, world, args, names, timeout=args.timeout)
    except Exception as e:
        rows = {
            n: {"case": "ddp", "name": n, "label": CANDIDATES[n], "status": unavailable(e)} for n in names
        }
        return rows, None


# ------------------------------------------------------------------------------------- headline
def _spread(row: dict) -> str:
    return f" ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})" if "ratio_min" in row else ""


def headline(doc: dict) -> list[str]:
    """This result's lines in the README headline (report.py prints them as they are)."""
    rows = doc["rows"]
    cases = doc.get("cases") or {None: doc["config"]}
    lines = []
    for case, cfg in cases.items():
        by_name = {r["name"]: r for r in rows if r.get("case") == case}
        named = [n for n in by_name if n.startswith("loop_shardwise_") and n.count("_") == 3]
        parts = [
            f"{by_name[n]['label']} **{fmt_x(by_name[n]['ratio'])}**{_spread(by_name[n])}"
            for n in ("loop_shardwise_8bit", "loop_shardwise_32bit", *named, "trainer_torch_fused")
            if by_name.get(n, {}).get("ratio")
        ]
        a, b = by_name.get("trainer_shardwise_8bit", {}), by_name.get("trainer_torch_fused", {})
        if a.get("samples_per_s_rounds") and b.get("samples_per_s_rounds"):  # paired by round
            pairs = [x / y for x, y in zip(a["samples_per_s_rounds"], b["samples_per_s_rounds"])]
            vs = {"ratio": statistics.median(pairs), "ratio_min": min(pairs), "ratio_max": max(pairs)}
            parts.append(f"Trainer with shardwise 8-bit vs its default **{fmt_x(vs['ratio'])}**{_spread(vs)}")
        elif a.get("ratio") and b.get("ratio"):
            parts.append(f"Trainer with shardwise 8-bit vs its default **{fmt_x(a['ratio'] / b['ratio'])}**")
        if not parts:
            continue
        where = f"{cfg['model']}" + (
            f", {cfg['world']} processes (DDP, gloo)" if cfg.get("world", 1) > 1 else ""
        )
        lines.append(
            f"- End-to-end samples/s, {where} (vs plain loop + torch fused AdamW): " + "; ".join(parts) + "."
        )
    return lines


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="minilm,smollm2,ddp", help="comma list of: " + ",".join(SHAPES))
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per case (default: " + str(ROUNDS) + ")"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per candidate per round")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split over DDP ranks)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the ddp case is CPU-only)")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights"
    )
    parser.add_argument("--random-init", action="store_true", help="model configs only, no weights")
    parser.add_argument("--only", default=None, help="comma list of candidates: " + ",".join(CANDIDATES))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for the ddp case")
    parser.add_argument("--quick", action="store_true", help="tiny models for a smoke test (seconds)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "e2e.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 2
    rounds = {case: args.rounds or ROUNDS[case] for case in SHAPES}
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    all_rows, cases = [], {}
    for case in args.cases.split(","):
        if case not in SHAPES:
            parser.error(f"unknown case {case!r} (one of {', '.join(SHAPES)})")
        names = args.only.split(",") if args.only else list(DEFAULTS[case])
        if case != "minilm":
            names = [n for n in names if not n.startswith("trainer_")]
        if BASELINE not in names:
            names.append(BASELINE)
        bs, seq_len, world = (QUICK_SHAPES if args.quick else SHAPES)[case]
        log(f"e2e {case}: batch {bs} x {seq_len} tokens x {world} rank(s), {len(names)} candidates")
        if case == "ddp":
            if args.device != "cpu":
                rows = {
                    n: {
                        "case": case,
                        "name": n,
                        "label": CANDIDATES[n],
                        "status": "unavailable: the ddp case runs on CPU (gloo)",
                    }
                    for n in names
                }
                source = None
            else:
                rows, source = _run_ddp(names, args)
        else:
            runs, rows, source = _build(case, names, args)
            _summarize(runs, rows, _rounds(runs, rows, args, bs, rounds=rounds[case]))
            del runs
        for row in rows.values():
            if row["status"] != "ok":
                log(f"  {row['label']:<48} {row['status']}")
            elif "ratio" in row:
                log(
                    f"  {row['label']:<48} {row['samples_per_s']:8.1f} samples/s  x{row['ratio']:.2f} "
                    f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
                )
        cases[case] = {
            "model": source,
            "kind": "causal LM" if case == "smollm2" else f"sequence classification, {NUM_LABELS} labels",
            "batch_size": bs,
            "seq_len": seq_len,
            "world": world,
            "rounds": rounds[case],
        }
        all_rows += list(rows.values())

    payload = {
        "benchmark": "e2e",
        "machine": machine_facts(args.device),
        "config": {
            "device": args.device,
            "precision": "bf16 autocast, fp32 weights" if args.precision == "bf16" else "fp32",
            "random_init": args.random_init,
            "rounds": args.rounds,  # None: per case, see cases[*]["rounds"]
            "steps_per_round": args.steps,
            "ratio": "median of per-round paired ratios",
            "threads": torch.get_num_threads() if args.device == "cpu" else None,
            "quick": args.quick,
        },
        "cases": cases,
        "baseline": BASELINE,
        "rows": all_rows,
    }
    payload["headline"] = headline(payload)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
