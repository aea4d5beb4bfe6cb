"""Does 8-bit optimizer state cost quality? Paired fine-tunes over many seeds, side by side with
bitsandbytes and torchao.

One run per setting cannot answer it: on the demo fine-tune the eval loss moves by ~0.05 from seed
to seed, more than any plausible 8-bit effect. So every comparison here is *paired*: for each seed,
every candidate optimizer starts from the same initial model (the same seeded classification head),
sees the same batches in the same order and the same dropout masks; only the optimizer differs. The
per-seed difference ``d_s = loss(candidate, s) - loss(shardwise 32-bit, s)`` cancels the seed's
own luck, and over ``n`` seeds we report the mean of ``d`` with its 95% t-interval
``mean +- t(0.975, n-1) * sd(d) / sqrt(n)``, also relative to the 32-bit loss. An interval that
includes 0 says the candidate is indistinguishable from 32-bit state at this sample size; its width
says how small a cost we could have seen.

Tasks (``--tasks``), all from the offline asset cache (``make assets``):

* ``minilm_r8``: the demo fine-tune (``configs/recipes/bert_minilm_r8.yaml``): all-MiniLM-L6-v2 + a
  fresh 8-way head on Reuters R8, 1 epoch = 172 steps of 32 texts x 32 tokens, lr 2e-4 (the demo
  uses 5e-4; either way the eval loss varies by 0.05-0.08 from seed to seed, which the pairing
  removes), 10% linear warmup then linear decay, weight decay
  0.01 on matrices, grad-norm clip 1.0. Primary measure: eval loss on all 2,189 test texts; also
  accuracy and macro-F1.
* ``smollm2``: SmolLM2-135M-Instruct fine-tuned on Shakespeare (the GPT recipe's data), 30 steps of
  4 blocks x 64 tokens (CPU-sized: ~2 minutes a run on one core), lr 2e-4, betas (0.9, 0.95), same
  schedule; no dropout, so a seed is a data order. Primary measure: held-out loss (log perplexity)
  on 32 blocks of Macbeth + The Tempest.
* ``minilm_r8_2ep``: the demo fine-tune trained further, two epochs (344 steps; the lr decays to 0
  over both). Not in the default ``--tasks``: its runs take twice as long.
* ``smollm2_200``: the SmolLM2 fine-tune at a few hundred steps, 200 (the lr decays to 0 over all of
  them): does what 30 steps show hold at a fine-tune's horizon? Not in the default ``--tasks``: ~7x
  as long (~11 minutes a run on one core, bitsandbytes' ~23, torchao's ~30).

``--lr`` and ``--eps`` run a task at another learning rate or Adam eps, stored as a task of its own
(``smollm2_lr0.0006``, ``smollm2_eps1e-06``), so that a sweep of the baseline (``--candidates
shardwise_32bit``) never touches the default's runs, and the 8-bit candidates can be paired at the
other setting too.

Candidates (``--candidates``): ``shardwise_32bit`` (the baseline of every difference),
``shardwise_8bit``, ``torch_fused`` (torch.optim.AdamW fused fp32: an equivalent 32-bit
implementation, so its row shows how large a difference "no difference" is once float rounding is
amplified by training), ``bnb_8bit`` (bitsandbytes AdamW8bit), ``torchao_8bit`` (torchao AdamW8bit),
and a control, ``shardwise_32bit_lr105`` (32-bit at 1.05x the lr: what steps ~5% larger, as
bitsandbytes' codec takes in the middle of a block, do to the task by themselves) and two
simulations, ``sim_bnb_codec_mv`` and ``sim_bnb_codec_v`` (shardwise 32-bit whose moments, both or
v alone, go through bitsandbytes' codec after every step: which stored moment makes bitsandbytes'
runs differ).
All get the same hyperparameters and parameter groups; the 8-bit ones all keep tensors under 4,096
elements in fp32 (their defaults). A missing library is recorded as ``unavailable: ...``.

Runs are written to the JSON as they finish and a rerun skips the ones already there (same task
settings), so an interrupted benchmark resumes; ``--fresh`` starts a task over. Several processes
(one per task, or per range of seeds) can share the JSON: writes merge run by run under a file
lock. Not a test (tests/bench/test_quality_paired.py is the CI-sized version): on 2 CPU cores a
SmolLM2 run takes ~2 minutes on one thread, a MiniLM run ~3, torchao's and bitsandbytes' ~2x and
~3x that. The committed results are the two default tasks x 5 seeds x 4 candidates (one
single-threaded process per task, ~1.6 hours), then SmolLM2 seeds 5-14 without torchao (two
processes, ~1 hour), then torch fused for the seeds without it; then the lr x1.05 control on
SmolLM2's 15 seeds, a 32-bit lr sweep (1e-4 and 6e-4 on seeds 0-2, 1.2e-3 on seed 0), the two
simulations on seeds 0-4, and ``minilm_r8_2ep`` with shardwise 32/8-bit and bitsandbytes on
seeds 0-4 (two processes, ~1.7 hours); then a 32-bit eps sweep of SmolLM2 (1e-7 and 1e-5 on seeds
0-4), SmolLM2 at eps 1e-6 with shardwise 32/8-bit and bitsandbytes on seeds 0-9, and torch fused and
torchao on ``minilm_r8_2ep`` (two processes, ~1.7 hours); then ``smollm2_200`` with shardwise
32/8-bit and bitsandbytes on seeds 0-4, then its 32-bit run at eps 1e-6 and torch fused on seeds
0 and 1 (two processes, ~2.2 hours); then torchao on its seeds 0-4 (~30 minutes a run) and torch
fused on seeds 2-4 (two processes, ~1.6 hours), then the 32-bit run at eps 1e-6 on seeds 2-4;
then ``minilm_r8_2ep``'s 32-bit run at eps 1e-6 on seeds 0-4 (two processes, ~25 minutes), and
``smollm2_200`` with shardwise 32/8-bit and bitsandbytes on seeds 5 and 6 (one process per seed,
~1 hour):

    python bench/quality_paired.py                                 # both tasks, 5 seeds
    python bench/quality_paired.py --tasks minilm_r8 --threads 1 &  # the same, one process per task
    python bench/quality_paired.py --tasks smollm2 --threads 1
    python bench/quality_paired.py --tasks smollm2 --threads 1 --seeds 5 6 7 8 9 \
        --candidates shardwise_8bit bnb_8bit torch_fused &         # and --seeds 10 ... 14 beside it
    python bench/quality_paired.py --tasks minilm_r8 --seeds 0 1 2 --candidates shardwise_32bit shardwise_8bit
    python bench/quality_paired.py --tasks smollm2 --threads 1 --candidates shardwise_32bit_lr105 \
        sim_bnb_codec_mv sim_bnb_codec_v                           # the control and simulations
    python bench/quality_paired.py --tasks smollm2 --threads 1 --seeds 0 1 2 --lr 6e-4 \
        --candidates shardwise_32bit                               # one point of the lr sweep
    python bench/quality_paired.py --tasks minilm_r8_2ep --threads 1 --candidates shardwise_8bit bnb_8bit
    python bench/quality_paired.py --tasks smollm2 --threads 1 --eps 1e-6 --seeds 0 1 2 3 4 5 6 7 8 9 \
        --candidates shardwise_8bit bnb_8bit                       # every optimizer at eps 1e-6
    python bench/quality_paired.py --tasks smollm2_200 --threads 1 --seeds 0 2 4 \
        --candidates shardwise_8bit bnb_8bit &                     # and --seeds 1 3 beside it
    python bench/quality_paired.py --tasks smollm2_200 --threads 1 --eps 1e-6 --seeds 0 \
        --candidates shardwise_32bit &                             # and --seeds 1, later 2 3 4
    python bench/quality_paired.py --tasks smollm2_200 --threads 1 --seeds 0 2 4 \
        --candidates torchao_8bit &                                # and --seeds 1 3 beside it
    python bench/quality_paired.py --tasks minilm_r8_2ep --threads 1 --eps 1e-6 --seeds 0 2 4 \
        --candidates shardwise_32bit &                             # and --seeds 1 3 beside it
    python bench/quality_paired.py --tasks smollm2_200 --threads 1 --seeds 5 \
        --candidates shardwise_8bit bnb_8bit &                     # and --seeds 6 beside it
    python bench/quality_paired.py --quick --out /tmp/q.json       # tiny random models, seconds

Writes ``bench/results/quality_paired.json``; ``bench/report.py`` renders it (table and plot).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from common import REPO, RESULTS_DIR, log, machine_facts, unavailable

BASELINE = "shardwise_32bit"
CANDIDATES = {  # name -> (library, label)
    "shardwise_32bit": ("shardwise", "shardwise AdamW 32-bit"),
    "shardwise_8bit": ("shardwise", "shardwise AdamW 8-bit"),
    "torch_fused": ("torch", "torch AdamW fused (fp32)"),
    "bnb_8bit": ("bitsandbytes", "bitsandbytes AdamW8bit"),
    "torchao_8bit": ("torchao", "torchao AdamW8bit"),
    # A control, not a contender: 32-bit state with a 5% larger lr, the size of the step inflation
    # that bitsandbytes' codec adds in the middle of a block (bench/codec_bias.py). Its row shows what
    # steps that much larger do to the task by themselves.
    "shardwise_32bit_lr105": ("shardwise", "shardwise AdamW 32-bit, lr x1.05 (control)"),
    # Simulations, to find where bitsandbytes' difference comes from: shardwise 32-bit whose moments
    # (both, or v alone) go through bitsandbytes' 8-bit codec after every step, as if stored in it.
    "sim_bnb_codec_mv": ("bitsandbytes", "32-bit, m and v through bitsandbytes' codec (simulation)"),
    "sim_bnb_codec_v": ("bitsandbytes", "32-bit, v through bitsandbytes' codec (simulation)"),
}
SIMULATED = {"sim_bnb_codec_mv": ("exp_avg", "exp_avg_sq"), "sim_bnb_codec_v": ("exp_avg_sq",)}
MIN_8BIT_SIZE = 4096  # the 8-bit optimizers' default: smaller tensors keep fp32 state
LR_SCALE = {"shardwise_32bit_lr105": 1.05}
EIGHT_BIT = ("shardwise_8bit", "bnb_8bit", "torchao_8bit")  # ours first
CONTENDERS = ("shardwise_32bit", "torch_fused", *EIGHT_BIT)  # the default --candidates
# Two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); 1.96 beyond.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042]  # fmt: skip


@dataclass(frozen=True)
class TaskSettings:
    """Everything that defines a task's runs: a stored run is reused only under equal settings."""

    task: str
    model: str
    steps_per_epoch: int | None  # None: all training batches once
    max_steps: int | None
    batch_size: int
    seq_len: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    eval_examples: int | None


MINILM_R8 = TaskSettings(
    "minilm_r8", "assets:models/all-MiniLM-L6-v2", None, None, 32, 32, 2e-4, (0.9, 0.999), 1e-8, 0.01,
    0.1, 1.0, None,
)  # fmt: skip
SMOLLM2 = TaskSettings(
    "smollm2", "assets:models/SmolLM2-135M-Instruct", None, 30, 4, 64, 2e-4, (0.9, 0.95), 1e-8, 0.0,
    0.1, 1.0, 32,
)  # fmt: skip


# ------------------------------------------------------------------------------------- statistics
def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def paired_summary(candidate: list[float], baseline: list[float]) -> dict:
    """Mean paired difference ``candidate - baseline`` with its 95% t-interval, absolute and relative
    to the baseline's mean; also the median difference and how many pairs fall below 0, which one
    chaotic seed cannot move the way it moves the mean, and the mean absolute difference
    ``mean |d_s|``: how far the candidate moves a seed's result from the baseline's in either
    direction, so that a shift below the baseline on one seed does not cancel one above it on
    another. Needs at least two pairs."""
    diffs = [c - b for c, b in zip(candidate, baseline, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.inf
    base = statistics.fmean(baseline)
    return {
        "n": n,
        "baseline_mean": base,
        "baseline_sd": statistics.stdev(baseline) if n > 1 else None,
        "mean_diff": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "rel_mean": mean / base,
        "rel_low": (mean - half) / base,
        "rel_high": (mean + half) / base,
        "median_diff": statistics.median(diffs),
        "mean_abs_diff": statistics.fmean(abs(d) for d in diffs),
        "below": sum(d < 0 for d in diffs),
        "diffs": diffs,
    }


def trajectory_deviation(candidate: list[float], baseline: list[float]) -> float:
    """Mean over the steps of ``|train loss(candidate) - train loss(baseline)|`` in one paired run.

    How closely a run follows the 32-bit one step by step, on the same batches: a lower-noise view
    of the codec's fidelity than the final eval loss, whose paired difference is set by how much
    the whole run drifts (one loss spike can amplify a small difference into most of it). The
    summary reports its median over the seeds."""
    return statistics.fmean(abs(c - b) for c, b in zip(candidate, baseline, strict=True))


# -------------------------------------------------------------------------------------- optimizers
def make_optimizer(name: str, model: torch.nn.Module, s: TaskSettings):
    """``name``'s AdamW over the decay / no-decay groups with the task's hyperparameters."""
    from shardwise.optim import param_groups

    groups = param_groups(model, s.weight_decay)  # decay on matrices; biases and norms without
    kw = dict(lr=s.lr * LR_SCALE.get(name, 1.0), betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
    if name.startswith("shardwise_"):
        from shardwise.optim import AdamW

        return AdamW(groups, **kw, state_bits=8 if name == "shardwise_8bit" else 32)
    if name in SIMULATED:
        from codecs_8bit import bitsandbytes

        from shardwise.optim import AdamW

        return state_through_codec(AdamW(groups, **kw), bitsandbytes(), SIMULATED[name])
    if name == "torch_fused":
        return torch.optim.AdamW(groups, **kw, fused=True)
    if name == "bnb_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)  # blockwise, min_8bit_size=4096
    if name == "torchao_8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, **kw)  # block_size=256; tensors < 4096 elements stay fp32
    raise KeyError(f"unknown candidate {name!r} (one of {', '.join(CANDIDATES)})")


def state_through_codec(opt: torch.optim.Optimizer, roundtrip, keys: tuple[str, ...]):
    """``opt`` (32-bit state) simulating an 8-bit store of the moments in ``keys``: after every step
    each one is replaced by ``roundtrip(moment)``, what the codec would give back. As in the real
    8-bit optimizers, a step computes its update from the exact new moments and the codec's error
    reaches the next step; tensors under ``MIN_8BIT_SIZE`` elements stay exact."""

    @torch.no_grad()
    def store(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and p.numel() >= MIN_8BIT_SIZE:
                    for key in keys:
                        state[key].copy_(roundtrip(state[key], key == "exp_avg"))

    opt.register_step_post_hook(store)
    return opt


# ------------------------------------------------------------------------------------------- tasks
class Task:
    """A model to copy per candidate, the seed's batches, and an evaluation."""

    def __init__(self, s: TaskSettings, quick: bool):
        self.s, self.quick = s, quick

    def batches(self, seed: int) -> list[dict]:
        raise NotImplementedError

    def initial_model(self, seed: int) -> torch.nn.Module:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        raise NotImplementedError


def _dataloader_batches(ds, batch_size: int, collate, seed: int, limit: int | None) -> list[dict]:
    """The seed's batches: one shuffled pass over ``ds``, or ``limit`` batches, reshuffled for every
    further epoch that takes (the first epoch's batches are the same either way)."""
    from torch.utils.data import DataLoader

    dl = DataLoader(
        ds, batch_size, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(seed)
    )
    out = []
    while True:
        for batch in dl:
            if limit is not None and len(out) == limit:
                return out
            out.append(dict(batch))
        if limit is None or len(out) == limit:
            return out


class MiniLMR8(Task):
    def __init__(self, s: TaskSettings, quick: bool):
        super().__init__(s, quick)
        from transformers import AutoTokenizer, DataCollatorWithPadding

        from shardwise.data.assets import resolve
        from shardwise.data.text import ClassificationDataConfig, load_classification

        self.path = resolve(s.model)
        tok = AutoTokenizer.from_pretrained(self.path)
        data = ClassificationDataConfig(
            max_length=s.seq_len,
            max_train_samples=256 if quick else None,
            max_eval_samples=128 if quick else s.eval_examples,
        )
        self.train_ds, eval_ds, self.labels = load_classification(data, tok, seed=0)
        self.collate = DataCollatorWithPadding(tok)
        self.eval_batches = _dataloader_batches(eval_ds, 128, self.collate, 0, None)

    def batches(self, seed: int) -> list[dict]:
        return _dataloader_batches(self.train_ds, self.s.batch_size, self.collate, seed, self.s.max_steps)

    def initial_model(self, seed: int) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        torch.manual_seed(seed)  # the classification head's init
        n = len(self.labels)
        if self.quick:  # a tiny random encoder with the same tokenizer and head
            cfg = AutoConfig.from_pretrained(self.path, num_labels=n)
            cfg.update(
                dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
            )
            return AutoModelForSequenceClassification.from_config(cfg)
        return AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=n)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        sys.path.insert(0, str(REPO / "recipes"))
        from finetune_bert import macro_f1

        loss_sum, preds, golds = 0.0, [], []
        with torch.no_grad():
            for batch in self.eval_batches:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
                loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
                preds.append(logits.argmax(-1))
                golds.append(batch["labels"])
        preds, golds = torch.cat(preds), torch.cat(golds)
        return {
            "eval_loss": loss_sum / golds.numel(),
            "accuracy": (preds == golds).float().mean().item(),
            "macro_f1": macro_f1(preds, golds, len(self.labels)),
        }


class SmolLM2(Task):
    def __init__(self, s: TaskSettings, quick: bool):
        super().__init__(s, quick)
        from transformers import AutoTokenizer, default_data_collator

        from shardwise.data.assets import resolve
        from shardwise.data.text import CausalLMDataConfig, load_causal_lm

        self.path = resolve(s.model)
        tok = AutoTokenizer.from_pretrained(self.path)
        data = CausalLMDataConfig(block_size=s.seq_len, max_eval_blocks=8 if quick else s.eval_examples)
        self.train_ds, eval_ds = load_causal_lm(data, tok, seed=0)
        self.collate = default_data_collator
        self.eval_batches = _dataloader_batches(eval_ds, 8, self.collate, 0, None)

    def batches(self, seed: int) -> list[dict]:
        return _dataloader_batches(self.train_ds, self.s.batch_size, self.collate, seed, self.s.max_steps)

    def initial_model(self, seed: int) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(seed)
        if self.quick:
            from common import TINY_LLAMA

            cfg = AutoConfig.from_pretrained(self.path)
            cfg.update({k: v for k, v in TINY_LLAMA.items() if k != "vocab_size"})
            return AutoModelForCausalLM.from_config(cfg)
        return AutoModelForCausalLM.from_pretrained(self.path, torch_dtype=torch.float32)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for batch in self.eval_batches:
                n = batch["labels"][:, 1:].numel()  # every token after the first is a target
                loss_sum += model(**batch).loss.item() * n
                tokens += n
        loss = loss_sum / tokens
        return {"eval_loss": loss, "perplexity": math.exp(loss)}


# The demo fine-tune trained further: two epochs, the lr decaying to 0 over both (on this CPU its
# runs take 2x as long, so fewer candidates ran it).
MINILM_R8_2EP = replace(MINILM_R8, task="minilm_r8_2ep", max_steps=2 * 172)
# SmolLM2 at a fine-tune's horizon rather than a CPU-sized one: 200 steps, the lr decaying to 0 over
# all of them (~7x a default run; bitsandbytes' CPU step alone adds ~5 s a step).
SMOLLM2_200 = replace(SMOLLM2, task="smollm2_200", max_steps=200)
TASKS = {
    "minilm_r8": (MINILM_R8, MiniLMR8),
    "smollm2": (SMOLLM2, SmolLM2),
    "minilm_r8_2ep": (MINILM_R8_2EP, MiniLMR8),
    "smollm2_200": (SMOLLM2_200, SmolLM2),
}


def task_settings(
    name: str, lr: float | None = None, eps: float | None = None, quick: bool = False
) -> tuple[TaskSettings, type]:
    """A task's settings and class; at another ``lr`` or ``eps`` it is a task of its own, named
    ``<name>_lr<lr>`` / ``<name>_eps<eps>``, so that its runs never replace (or pair with) the
    default's."""
    settings, cls = TASKS[name]
    for param, value in (("lr", lr), ("eps", eps)):
        if value is not None:
            settings = replace(settings, task=f"{settings.task}_{param}{value:g}", **{param: value})
    if quick:
        settings = replace(settings, max_steps=6, batch_size=8)
    return settings, cls


# --------------------------------------------------------------------------------------- training
def train_one(task: Task, init: torch.nn.Module, batches: list[dict], name: str, seed: int) -> dict:
    """One candidate's run from ``init`` over ``batches``; the eval metrics and the loss curve."""
    from transformers import get_scheduler

    s = task.s
    model = copy.deepcopy(init)
    model.train()
    opt = make_optimizer(name, model, s)
    sched = get_scheduler("linear", opt, round(s.warmup_ratio * len(batches)), len(batches))
    torch.manual_seed(10_000 + seed)  # the same dropout masks for every candidate of this seed
    curve, t0 = [], time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
        if not math.isfinite(curve[-1]):
            break
    train_s = time.perf_counter() - t0
    model.eval()
    return {**task.evaluate(model), "train_loss": curve, "steps": len(curve), "train_s": round(train_s, 1)}


# ------------------------------------------------------------------------------------------ driver
def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _run_key(run: dict) -> tuple:
    return run["task"], run["candidate"], run["seed"]


def _save(path: Path, doc: dict, drop_tasks: tuple[str, ...] = ()) -> dict:
    """Merge ``doc``'s runs into the file, under a lock, so that several processes can share one
    JSON (one per task, or one per range of seeds: ``--seeds 5 6 7`` and ``--seeds 8 9`` side by
    side, ``--threads 1`` each). A stored run stays unless ``doc`` holds the same (task, candidate,
    seed) or ran its task with other settings, or the task is in ``drop_tasks`` (``--fresh``). Atomic: an
    interrupted write leaves the previous file. Returns the merged document."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = _load(path)
        if stored.get("config", {}).get("quick") != doc["config"]["quick"]:
            stored = {}
        stored_tasks = stored.get("tasks", {})
        stale = {t for t, settings in doc["tasks"].items() if stored_tasks.get(t, settings) != settings}
        stale |= set(drop_tasks)
        ours = {_run_key(r) for r in doc["runs"]}
        runs = [r for r in stored.get("runs", []) if r["task"] not in stale and _run_key(r) not in ours]
        merged = {**doc, "tasks": {**stored_tasks, **doc["tasks"]}, "runs": runs + doc["runs"]}
        summarize(merged)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    return merged


def summarize(doc: dict) -> None:
    """Per task: every candidate's paired difference to the baseline over the seeds both ran."""
    doc["summary"], doc["headline"] = {}, []
    for task in doc["tasks"]:
        runs = [r for r in doc["runs"] if r["task"] == task and r.get("status") == "ok"]
        by = {(r["candidate"], r["seed"]): r for r in runs}
        base_seeds = sorted(seed for (c, seed) in by if c == BASELINE)
        distance = {  # |eval loss - 32-bit eval loss| of every run paired with a baseline run
            (c, seed): abs(r["eval_loss"] - by[BASELINE, seed]["eval_loss"])
            for (c, seed), r in by.items()
            if (BASELINE, seed) in by
        }
        out = {}
        for name in CANDIDATES:
            seeds = [seed for seed in base_seeds if (name, seed) in by]
            if name == BASELINE or len(seeds) < 2:
                continue
            out[name] = paired_summary(
                [by[name, seed]["eval_loss"] for seed in seeds],
                [by[BASELINE, seed]["eval_loss"] for seed in seeds],
            )
            out[name] |= {"seeds": seeds, "library": CANDIDATES[name][0], "label": CANDIDATES[name][1]}
            both = [seed for seed in seeds if ("shardwise_8bit", seed) in by]
            if name in EIGHT_BIT[1:] and len(both) >= 2:  # the other 8-bit ones against ours
                out[name]["vs_shardwise_8bit"] = paired_summary(
                    [by[name, seed]["eval_loss"] for seed in both],
                    [by["shardwise_8bit", seed]["eval_loss"] for seed in both],
                )
                # Whose result ends further from 32-bit's, either side, paired: above 0, theirs.
                out[name]["distance_vs_shardwise_8bit"] = paired_summary(
                    [distance[name, seed] for seed in both],
                    [distance["shardwise_8bit", seed] for seed in both],
                )
            out[name]["train_deviation"] = statistics.median(
                trajectory_deviation(by[name, seed]["train_loss"], by[BASELINE, seed]["train_loss"])
                for seed in seeds
            )
            for metric in ("accuracy", "macro_f1", "perplexity"):
                if metric in by[BASELINE, seeds[0]]:
                    out[name][metric] = {
                        "baseline": statistics.fmean(by[BASELINE, seed][metric] for seed in seeds),
                        "candidate": statistics.fmean(by[name, seed][metric] for seed in seeds),
                    }
        doc["summary"][task] = out
        if "shardwise_8bit" in out and task in TASKS:  # the headline: the tasks at their own settings
            parts = []
            for name in EIGHT_BIT:
                if name in out:
                    r = out[name]
                    parts.append(
                        f"{CANDIDATES[name][1]} {100 * r['rel_mean']:+.2f}% "
                        f"[{100 * r['rel_low']:+.2f}, {100 * r['rel_high']:+.2f}]"
                    )
            deviation = ", ".join(
                f"{CANDIDATES[name][0]} {out[name]['train_deviation']:.1e}"
                for name in EIGHT_BIT
                if name in out
            )
            doc["headline"].append(
                f"- 8-bit state vs shardwise 32-bit, {task} eval loss (paired, {out['shardwise_8bit']['n']} "
                f"seeds, mean [95% CI]): " + "; ".join(parts) + ". Train-loss deviation from the 32-bit "
                f"run per step (median over seeds): {deviation}."
            )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["minilm_r8", "smollm2"], choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--candidates", nargs="+", default=list(CONTENDERS), choices=list(CANDIDATES),
        help="the baseline (shardwise_32bit) always runs; the control and simulations when named",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny random models, a few steps (smoke test)")
    parser.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    parser.add_argument(
        "--lr", type=float, help="the tasks at this lr instead (stored as task '<task>_lr<lr>', apart)"
    )
    parser.add_argument(
        "--eps", type=float, help="the tasks at this Adam eps instead (stored as task '<task>_eps<eps>')"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quality_paired.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    candidates = [BASELINE] + [c for c in args.candidates if c != BASELINE]

    old = {} if args.fresh else _load(args.out)
    doc = {
        "benchmark": "quality_paired",
        "machine": machine_facts(),
        "config": {"quick": args.quick, "baseline": BASELINE},
        "tasks": {},  # this process's; _save keeps the other tasks stored in --out
        "runs": [],
    }
    for task_name in args.tasks:
        settings, cls = task_settings(task_name, lr=args.lr, eps=args.eps, quick=args.quick)
        name = settings.task
        doc["tasks"][name] = json.loads(json.dumps(asdict(settings)))  # as stored: tuples become lists
        if args.fresh:
            _save(args.out, doc, drop_tasks=(name,))
        same = old.get("tasks", {}).get(name) == doc["tasks"][name] and old["config"]["quick"] == args.quick
        kept = [r for r in old.get("runs", []) if r["task"] == name and same and r.get("status") == "ok"]
        doc["runs"] += kept
        done = {(r["candidate"], r["seed"]) for r in kept}
        todo = [(seed, c) for seed in args.seeds for c in candidates if (c, seed) not in done]
        if not todo:
            continue
        log(f"== {name}: {len(todo)} runs to do ({len(kept)} kept from {args.out})")
        task = cls(settings, args.quick)
        for seed in args.seeds:
            todo_seed = [c for s, c in todo if s == seed]
            if not todo_seed:
                continue
            init, batches = task.initial_model(seed), task.batches(seed)
            for c in todo_seed:
                run = {
                    "task": name,
                    "seed": seed,
                    "candidate": c,
                    "library": CANDIDATES[c][0],
                    "threads": args.threads,
                }
                try:
                    run |= {"status": "ok", **train_one(task, init, batches, c, seed)}
                    log(
                        f"{name} seed {seed} {c}: eval loss {run['eval_loss']:.4f} "
                        f"({run['steps']} steps, {run['train_s']} s)"
                    )
                except (ImportError, RuntimeError, NotImplementedError) as e:
                    run["status"] = unavailable(e)
                    log(f"{name} seed {seed} {c}: {run['status']}")
                doc["runs"].append(run)
                _save(args.out, doc)
    doc = _save(args.out, doc)
    for line in doc["headline"]:
        print(line)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
