"""End-to-end training throughput (samples/s) of the BERT recipe's model, per optimizer and loop.

What is measured: the BERT recipe's model (all-MiniLM-L6-v2 with an 8-way classification head, from
the offline asset cache; without the cache, the same config with random init, and the JSON says
which) trained on the recipe's batch shape (32 x 32 tokens) of synthetic token ids and labels, the
same data for every candidate:

* ``loop_*``: a plain training loop (forward, backward, clip grad norm 1.0, ``opt.step()``,
  ``zero_grad``) with shardwise AdamW 32-bit, 8-bit, or torch fused AdamW;
* ``trainer_*``: Hugging Face ``Trainer`` on the same model, data and batch size, with its default
  optimizer (``adamw_torch_fused``) and with shardwise AdamW 8-bit passed in ``optimizers=``.

Why: the optimizer step is only part of a training step; this shows what a user gains end to end
and what the ``Trainer``'s machinery costs next to a plain loop. Candidates run interleaved in one
process: each round runs ``--steps`` timed steps of every candidate (rotating order) after one
untimed step; we report the median and min-max of per-round samples/s and ratios to the plain loop
with torch fused AdamW.

    python bench/e2e.py [--rounds 3] [--steps 5]
    python bench/e2e.py --quick        # a tiny BERT, seconds; what the tests run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, fmt_x, log, machine_facts, state_bytes, unavailable, write_json

ASSET = "models/all-MiniLM-L6-v2"
NUM_LABELS = 8  # Reuters R8, the recipe's default data
MINILM = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
)
TINY = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
BASELINE = "loop_torch_fused"
CANDIDATES = {
    "loop_shardwise_32bit": "plain loop, shardwise AdamW 32-bit",
    "loop_shardwise_8bit": "plain loop, shardwise AdamW 8-bit",
    BASELINE: "plain loop, torch AdamW fused",
    "trainer_torch_fused": "HF Trainer, default optim (adamw_torch_fused)",
    "trainer_shardwise_8bit": "HF Trainer, shardwise AdamW 8-bit",
}
LR, WD = 2e-4, 0.01


def _model(quick: bool):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if quick:
        return BertForSequenceClassification(BertConfig(**TINY, num_labels=NUM_LABELS)), "tiny BERT (--quick)"
    from shardwise.data.assets import assets_dir

    path = Path(assets_dir()) / ASSET
    if (path / "model.safetensors").exists():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS)
        return model, f"assets:{ASSET}"
    return BertForSequenceClassification(BertConfig(**MINILM, num_labels=NUM_LABELS)), (
        "all-MiniLM-L6-v2 config, random init (no asset cache)"
    )


def _shardwise(model, bits: int):
    from shardwise.optim import AdamW

    return AdamW(model.parameters(), lr=LR, weight_decay=WD, state_bits=bits)


class _Data(torch.utils.data.Dataset):
    """Synthetic token ids and labels, fixed by the seed: the same examples for every candidate."""

    def __init__(self, n: int, seq_len: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (n, seq_len), generator=g)
        self.labels = torch.randint(0, NUM_LABELS, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


class _Loop:
    """A plain training loop; ``run(k)`` does one untimed step, then ``k`` timed ones."""

    def __init__(self, model, opt, data: _Data, batch_size: int):
        self.model, self.opt, self.data, self.bs, self.pos = model, opt, data, batch_size, 0

    def _step(self):
        i = self.pos % (len(self.data) - self.bs + 1)
        batch = {
            k: v[i : i + self.bs] for k, v in {"input_ids": self.data.ids, "labels": self.data.labels}.items()
        }
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        self.pos += self.bs
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, k: int) -> float:
        self._step()
        t0 = time.perf_counter()
        for _ in range(k):
            self._step()
        return time.perf_counter() - t0


class _TrainerRun:
    """HF Trainer; ``run(k)`` trains ``k + 1`` steps and times the last ``k`` (step-end to step-end)."""

    def __init__(self, model, optimizer, data: _Data, batch_size: int, workdir: str):
        from transformers import Trainer, TrainerCallback, TrainingArguments

        ends: list[float] = []
        self.ends = ends

        class _Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
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
            use_cpu=True,
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

    def run(self, k: int) -> float:
        self.ends.clear()
        self.trainer = self.make(k)
        self.trainer.train()
        return self.ends[-1] - self.ends[0]

    @property
    def opt(self):
        return self.optimizer or (self.trainer.optimizer if self.trainer else None)


def headline(doc: dict) -> list[str]:
    """This result's line in the README headline (report.py prints it as it is)."""
    rows = {r["name"]: r for r in doc["rows"]}
    parts = [
        f"{rows[n]['label']} **{fmt_x(rows[n]['ratio'])}**"
        for n in ("loop_shardwise_8bit", "loop_shardwise_32bit", "trainer_torch_fused")
        if rows.get(n, {}).get("ratio")
    ]
    if not parts:
        return []
    return [
        f"- End-to-end samples/s, {doc['config']['model']} (vs plain loop + torch fused AdamW): "
        + "; ".join(parts)
        + "."
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="the BERT recipe's batch")
    parser.add_argument("--seq-len", type=int, default=32, help="the BERT recipe's max_length")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per candidate per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma list of candidates: " + ",".join(CANDIDATES))
    parser.add_argument("--quick", action="store_true", help="tiny model for a smoke test (seconds)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "e2e.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.rounds, args.steps = 4, 16, 2, 2
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    if BASELINE not in names:
        names.append(BASELINE)

    workdir = tempfile.mkdtemp(prefix="shardwise-e2e-")
    runs, rows, source = {}, {}, None
    for name in names:
        rows[name] = {"name": name, "label": CANDIDATES[name]}
        try:
            model, source = _model(args.quick)
            data = _Data(args.batch_size * (args.steps + 2) * 2, args.seq_len, model.config.vocab_size)
            if name.startswith("loop_"):
                opt = (
                    torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
                    if name == BASELINE
                    else _shardwise(model, 8 if name.endswith("8bit") else 32)
                )
                runs[name] = _Loop(model, opt, data, args.batch_size)
            else:
                opt = _shardwise(model, 8) if name == "trainer_shardwise_8bit" else None
                runs[name] = _TrainerRun(model, opt, data, args.batch_size, workdir)
            rows[name]["status"] = "ok"
            rows[name]["params"] = sum(p.numel() for p in model.parameters())
        except Exception as e:
            rows[name]["status"] = unavailable(e)

    per_round: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(args.rounds):
        order = list(runs)
        order = order[r % len(order) :] + order[: r % len(order)]
        for name in order:
            if rows[name]["status"] != "ok":
                continue
            try:
                dt = runs[name].run(args.steps)
                per_round[name].append(args.batch_size * args.steps / dt)
            except Exception as e:
                rows[name]["status"] = unavailable(e)
        log(f"  round {r + 1}/{args.rounds}")

    for name, row in rows.items():
        if row["status"] != "ok":
            log(f"  {row['label']:<48} {row['status']}")
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
            row["ratio"] = row["samples_per_s"] / base["samples_per_s"]
            log(f"  {row['label']:<48} {row['samples_per_s']:8.1f} samples/s  x{row['ratio']:.2f}")

    payload = {
        "benchmark": "e2e",
        "machine": machine_facts("cpu"),
        "config": {
            "model": source,
            "num_labels": NUM_LABELS,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
        },
        "baseline": BASELINE,
        "rows": list(rows.values()),
    }
    payload["headline"] = headline(payload)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
