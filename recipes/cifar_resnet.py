"""ResNet-18 on CIFAR-10 (or Fashion-MNIST): one optimizer, or a comparison of several.

    python recipes/cifar_resnet.py --config configs/recipes/cifar_resnet18_fmnist_cpu.yaml
    python recipes/cifar_resnet.py --config configs/recipes/cifar_resnet18_gpu.yaml data.root=/data/cifar
    python recipes/cifar_resnet.py --config configs/recipes/cifar_resnet18_gpu.yaml compare=[] \
        optimizer.name=adamw_8bit
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml recipes/cifar_resnet.py --config ...

Keeps alive the experiment behind this project (ResNet-18, CIFAR-10, batch 128, 100 epochs, constant
learning rate, crop + flip augmentation): SGD lr 0.1 -> 72.3%, SGD + momentum 0.9 -> 88.4%,
Adam 1e-3 -> 86.7%, AdamW 1e-3 wd 0.01 -> 89.1%; after 10 epochs SGD 45%, SGD + momentum 62%, Adam 71%.

Optimizers by name (``OPTIMIZERS``): sgd, sgd_momentum (torch.optim.SGD); adam, adamw, amsgrad, radam,
adabelief (shardwise.optim; the last three are AdamW variants with decoupled weight decay 0.01), and
``<name>_8bit`` for each Adam-family entry (blockwise 8-bit moments). With ``compare`` set, every
entry is trained from the same initialization and data order, and the run writes ``comparison.md``
(the seed's table: optimizer, lr, wall time, final accuracy, accuracy after 10% of the steps, peak
memory), ``comparison.png`` (test accuracy and losses, one line per optimizer) and ``comparison.json``;
each optimizer also gets ``<output_dir>/<name>/`` with ``metrics.json``, ``curves.png`` and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from shardwise.configfile import parse_args, save_config
from shardwise.data.images import ImageTensorDataset, load_image_data, make_loader
from shardwise.models import resnet18
from shardwise.train.accel import describe, make_accelerator
from shardwise.train.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from shardwise.train.loop import progress
from shardwise.train.metrics import Metrics, flat_config, plot_curves
from shardwise.train.plan import plan_steps
from shardwise.train.sections import TrainConfig

# ---------------------------------------------------------------------------------------------------------
# optimizers: the seed's hyperparameters, one frozen record per name (timm-style registry)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSpec:
    """Which class and its default hyperparameters.

    sgd:   torch.optim.SGD, p <- p - lr * v with v <- momentum * v + g (PyTorch's form, no dampening).
    adam:  shardwise Adam (coupled L2: g <- g + wd * p before the moments; Kingma & Ba 2015).
    adamw: shardwise AdamW (decoupled: p <- p - lr * wd * p; Loshchilov & Hutter 2019), with
           `variant` radam (Liu et al. 2020) / adabelief (Zhuang et al. 2020) and `amsgrad`
           (Reddi et al. 2018); `state_bits=8` stores the moments as blockwise 8-bit codes.
    """

    kind: Literal["sgd", "adam", "adamw"]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    variant: Literal["adam", "radam", "adabelief"] = "adam"
    amsgrad: bool = False
    state_bits: Literal[32, 8] = 32


_BASE = {
    "sgd": OptimizerSpec("sgd", lr=0.1),
    "sgd_momentum": OptimizerSpec("sgd", lr=0.1, momentum=0.9),
    "adam": OptimizerSpec("adam", lr=1e-3),
    "adamw": OptimizerSpec("adamw", lr=1e-3, weight_decay=0.01),
    "amsgrad": OptimizerSpec("adamw", lr=1e-3, weight_decay=0.01, amsgrad=True),
    "radam": OptimizerSpec("adamw", lr=1e-3, weight_decay=0.01, variant="radam"),
    "adabelief": OptimizerSpec("adamw", lr=1e-3, weight_decay=0.01, variant="adabelief"),
}
OPTIMIZERS: dict[str, OptimizerSpec] = {
    **_BASE,
    **{f"{n}_8bit": replace(s, state_bits=8) for n, s in _BASE.items() if s.kind != "sgd"},
}


def make_optimizer(spec: OptimizerSpec, params, impl: str = "auto") -> torch.optim.Optimizer:
    """torch.optim.SGD for the SGD rows, shardwise Adam / AdamW for the rest."""
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    from shardwise.optim import Adam, AdamW

    cls = AdamW if spec.kind == "adamw" else Adam
    return cls(
        params,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        amsgrad=spec.amsgrad,
        variant=spec.variant,
        impl=impl,
        state_bits=spec.state_bits,
    )


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "fashion_mnist"] = "cifar10"
    # a cifar-10-batches-py folder / a folder of Fashion-MNIST IDX files; None = env var, Debian path, hub
    root: str | None = None
    allow_hub: bool = True  # CIFAR-10 only: datasets.load_dataset("uoft-cs/cifar10") when no folder
    train_subset: int | None = None  # random subset sizes (None = whole split), drawn with subset_seed
    test_subset: int | None = None
    subset_seed: int = 0
    augment: bool = True  # random crop (pad 4) + horizontal flip on the training split


@dataclass
class ModelConfig:
    width: float = 1.0  # channel multiplier: 1.0 = ResNet-18 (11.2M params), 0.125 = 0.18M
    channels_last: bool = False  # NHWC activations: ~1.3x faster convolutions on CPU (oneDNN) and AMP GPUs


@dataclass
class OptimizerChoice:
    """A name from OPTIMIZERS plus optional overrides (None = the registry's value)."""

    name: str = "adamw"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    state_bits: Literal[32, 8] | None = None
    impl: Literal["auto", "reference", "foreach", "fused"] = "auto"  # shardwise kernels only
    # the seed decays every parameter; true puts biases and BN parameters in a no-decay group
    no_decay_norm_and_bias: bool = False

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            import difflib

            close = difflib.get_close_matches(self.name, list(OPTIMIZERS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown optimizer {self.name!r}{hint} (choose from {', '.join(OPTIMIZERS)})")
        spec = OPTIMIZERS[self.name]
        if spec.kind == "sgd" and self.state_bits == 8:
            raise ValueError(f"{self.name}: state_bits=8 is for the Adam family only")
        if spec.kind != "sgd" and self.momentum is not None:
            raise ValueError(f"{self.name}: momentum is an SGD option (Adam's is betas[0])")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def resolve(self) -> OptimizerSpec:
        set_ = {k: getattr(self, k) for k in ("lr", "momentum", "weight_decay", "state_bits")}
        return replace(OPTIMIZERS[self.name], **{k: v for k, v in set_.items() if v is not None})

    @property
    def label(self) -> str:
        """The row name: the registry name, plus what was overridden."""
        extra = [f"{k}={getattr(self, k)}" for k in ("lr", "momentum", "weight_decay", "state_bits")]
        extra = [e for e in extra if not e.endswith("=None")]
        return self.name + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class ScheduleConfig:
    # any transformers.get_scheduler name; the seed's table used a constant learning rate
    name: str = "constant"
    warmup_steps: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerChoice = field(default_factory=OptimizerChoice)
    # non-empty: train each entry (a name, or a mapping like `optimizer`) instead of `optimizer`
    compare: list[str | OptimizerChoice] = field(default_factory=list)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # the seed's setup: batch 128, no gradient clipping, full precision
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=128, max_grad_norm=None, output_dir="outputs/cifar_resnet"
        )
    )

    def __post_init__(self) -> None:
        self.runs()  # a misspelled name in `compare` fails when the config loads

    def runs(self) -> list[OptimizerChoice]:
        if not self.compare:
            return [self.optimizer]
        runs = [OptimizerChoice(name=c) if isinstance(c, str) else c for c in self.compare]
        dirs = [run_dir_name(r) for r in runs]
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"compare lists the same optimizer twice: {dirs}")
        return runs


def run_dir_name(choice: OptimizerChoice) -> str:
    return choice.label.replace(" ", "").replace("(", "_").replace(")", "").replace(",", "_").replace("=", "")


# ---------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    spec: dict
    steps: int
    epochs: int
    updates_per_epoch: int
    train_seconds: float
    final_accuracy: float
    early_accuracy: float  # after 10% of the optimizer steps (epoch 10 of 100)
    early_epoch: float
    peak_memory_bytes: int
    peak_memory_kind: str  # "cuda" (max_memory_allocated) or "rss" (process, sampled)
    optimizer_state_bytes: int
    history: list[dict] = field(repr=False, default_factory=list)


class RunMetrics(Metrics):
    """Metrics whose tracker tags carry the optimizer's name ("adamw/eval/accuracy"); history does not."""

    def __init__(self, accelerator, prefix: str):
        super().__init__(accelerator)
        self.prefix = prefix

    def log(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items()}
        self.history.append({"step": step, **values})
        if self.accelerator.trackers:
            self.accelerator.log({f"{self.prefix}/{k}": v for k, v in values.items()}, step=step)


RUN_STATE = "run_state.json"  # in each checkpoint: the metric history and training time up to it


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for k, v in s.items()
        if torch.is_tensor(v) and k != "step"
    )


# ---------------------------------------------------------------------------------------------------------
# one optimizer: model, optimizer, loop, eval
# ---------------------------------------------------------------------------------------------------------


def train_one(
    cfg: Config, choice: OptimizerChoice, data, accelerator, out: Path, resume: str | None = None
) -> RunResult:
    """Train one optimizer from the seeded initialization; `resume`: "latest" or a checkpoint dir."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from shardwise.optim import param_groups

    say = accelerator.print
    spec = choice.resolve()
    set_seed(cfg.train.seed)  # every optimizer starts from the same weights and sees the same batches

    # ------------------------------------------------------------------------------------- data
    train_ds = ImageTensorDataset(
        data.train_images, data.train_labels, data.mean, data.std, train=cfg.data.augment
    )
    test_ds = ImageTensorDataset(data.test_images, data.test_labels, data.mean, data.std, train=False)
    train_dl = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    test_dl = make_loader(test_ds, cfg.train.eval_batch_size or 2 * cfg.train.batch_size, shuffle=False)

    # ------------------------------------------------------------------------------------ model
    model = resnet18(num_classes=len(data.classes), width=cfg.model.width)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    n_params = sum(p.numel() for p in model.parameters())

    # -------------------------------------------------------------------------------- optimizer
    params = param_groups(model, spec.weight_decay) if choice.no_decay_norm_and_bias else model.parameters()
    optimizer = make_optimizer(spec, params, impl=choice.impl)
    plan = plan_steps(-(-len(train_dl) // accelerator.num_processes), cfg.train)
    scheduler = get_scheduler(
        cfg.schedule.name, optimizer, cfg.schedule.warmup_steps, num_training_steps=plan.total_steps
    )
    # "after 10% of epochs" of the seed's table, measured in optimizer steps so short runs have it too
    early_step = max(1, round(0.1 * plan.total_steps))
    say(
        f"\n== {choice.label}: {type(optimizer).__name__} {asdict(spec)}\n"
        f"   resnet18(width={cfg.model.width}) {n_params:,} params; {plan.total_steps} steps "
        f"({plan.updates_per_epoch}/epoch, {plan.epochs} epochs), early eval at step {early_step}"
    )
    model, optimizer, train_dl, test_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, test_dl, scheduler
    )

    step, seconds_before, history = 0, 0.0, []
    if resume is not None:
        path = find_checkpoint(out, resume)
        step = load_checkpoint(accelerator, path)
        # the curves and the clock so far travel with the checkpoint (RUN_STATE)
        if (path / RUN_STATE).is_file():
            saved = json.loads((path / RUN_STATE).read_text())
            seconds_before, history = saved["train_seconds"], saved["history"]
        say(f"   resumed from {path} at step {step}")

    # ------------------------------------------------------------------------------------- eval
    def evaluate() -> dict[str, float]:
        model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in test_dl:
                x = x.contiguous(memory_format=memory_format)
                logits, y = accelerator.gather_for_metrics((model(x), y))
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
                correct += (logits.argmax(-1) == y).sum().item()
                n += y.numel()
        model.train()
        return {"eval/loss": loss_sum / n, "eval/accuracy": correct / n}

    # ------------------------------------------------------------------------------------- loop
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    peak_rss = rss_bytes()
    metrics = RunMetrics(accelerator, prefix=run_dir_name(choice))
    metrics.history = history
    model.train()
    bar = progress(plan.total_steps, step, choice.name, accelerator.is_main_process and cfg.train.progress)
    start_epoch, skip = plan.position(step, cfg.train.grad_accum_steps)
    running, seen, last_eval_step = 0.0, 0, -1
    t_train = time.perf_counter()
    for epoch in range(start_epoch, plan.epochs):
        if step >= plan.total_steps:
            break
        train_dl.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(train_dl, skip) if epoch == start_epoch and skip else train_dl
        )
        for x, y in batches:
            x = x.contiguous(memory_format=memory_format)
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running, seen = running + loss.detach().float().item(), seen + 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            if not math.isfinite(running):
                raise FloatingPointError(f"{choice.label}: loss is {running} at step {step}")
            if step % cfg.train.log_every == 0 or step == plan.total_steps:
                train_loss = accelerator.reduce(
                    torch.tensor(running / seen, device=accelerator.device), "mean"
                )
                metrics.log(
                    step,
                    {
                        "train/loss": train_loss.item(),
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": epoch,
                    },
                )
                bar.set_postfix(loss=f"{train_loss.item():.4f}")
                running, seen = 0.0, 0
                peak_rss = max(peak_rss, rss_bytes())
            end_of_epoch = step % plan.updates_per_epoch == 0 or step == plan.total_steps
            every = cfg.train.eval_every
            if step == early_step or (every and step % every == 0) or (not every and end_of_epoch):
                ev, last_eval_step = evaluate(), step
                metrics.log(step, ev)
                say(f"\n   step {step} (epoch {step / plan.updates_per_epoch:.2f}): "
                    f"test accuracy {ev['eval/accuracy']:.4f}, test loss {ev['eval/loss']:.4f}")  # fmt: skip
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                # the history and clock travel inside the checkpoint, written before it becomes visible
                seconds = seconds_before + time.perf_counter() - t_train
                state = {"train_seconds": seconds, "history": metrics.history}
                save_checkpoint(accelerator, out, step, cfg.train.keep_last, extra_files={RUN_STATE: state})
            if step >= plan.total_steps:
                break
    bar.close()
    train_seconds = seconds_before + time.perf_counter() - t_train

    # ------------------------------------------------------------------------------------- save
    if last_eval_step != step:
        metrics.log(step, evaluate())
    evals = [r for r in metrics.history if "eval/accuracy" in r]
    early = [r for r in evals if r["step"] == early_step] or [{"step": math.nan, "eval/accuracy": math.nan}]
    peak_rss = max(peak_rss, rss_bytes())
    result = RunResult(
        name=choice.label,
        spec=asdict(spec),
        steps=step,
        epochs=plan.epochs,
        updates_per_epoch=plan.updates_per_epoch,
        train_seconds=round(train_seconds, 2),
        final_accuracy=evals[-1]["eval/accuracy"],
        early_accuracy=early[0]["eval/accuracy"],
        early_epoch=round(early[0]["step"] / plan.updates_per_epoch, 3),
        peak_memory_bytes=torch.cuda.max_memory_allocated(accelerator.device) if cuda else peak_rss,
        peak_memory_kind="cuda" if cuda else "rss",
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        history=metrics.history,
    )
    final = {k: v for k, v in asdict(result).items() if k != "history"}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        metrics.write(out, final)
        plot_curves(metrics.history, out / "curves.png", title=f"cifar_resnet: {choice.label}")
    accelerator.free_memory()  # drop this run's prepared model / optimizer before the next one
    return result


# ---------------------------------------------------------------------------------------------------------
# the table and the plot
# ---------------------------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def comparison_table(results: list[RunResult], title: str) -> str:
    """The seed's table: optimizer | lr | wall time | final acc | acc after 10% of epochs | peak memory."""
    kind = {"cuda": "peak CUDA memory", "rss": "peak RSS"}[results[0].peak_memory_kind]
    lines = [
        f"# {title}",
        "",
        f"| optimizer | lr | wall time | final accuracy | accuracy after 10% of epochs | {kind} "
        "| optimizer state |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.spec['lr']:g} | {r.train_seconds:.1f} s | {100 * r.final_accuracy:.1f}% "
            f"| {100 * r.early_accuracy:.1f}% (epoch {r.early_epoch:g}) | {_mib(r.peak_memory_bytes)} "
            f"| {_mib(r.optimizer_state_bytes)} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(results: list[RunResult], path: Path, title: str) -> Path:
    """Test accuracy, test loss and training loss against epochs, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("eval/accuracy", "test accuracy"), ("eval/loss", "test loss"), ("train/loss", "training loss")]
    for r in results:
        for ax, (key, _) in zip(axes, panels, strict=True):
            pts = [(h["step"] / r.updates_per_epoch, h[key]) for h in r.history if key in h]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, label=r.name, marker="o" if len(xs) < 30 else None, markersize=3)
    for ax, (key, name) in zip(axes, panels, strict=True):
        if key.endswith("loss"):
            ax.set_yscale("log")  # early spikes (BN statistics after a few steps) would flatten the rest
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def main(cfg: Config) -> list[RunResult]:
    runs = cfg.runs()  # validates the compare list before anything is loaded
    out = Path(cfg.train.output_dir)
    if len(runs) > 1 and cfg.train.resume_from_checkpoint not in (None, "latest"):
        raise ValueError(
            "with compare, train.resume_from_checkpoint can only be 'latest' (one per optimizer)"
        )
    accelerator = make_accelerator(cfg.train, str(out))
    say = accelerator.print
    say(f"== cifar_resnet: {describe(accelerator)}")

    # ------------------------------------------------------------------------------------- data
    with accelerator.main_process_first():
        data = load_image_data(cfg.data.dataset, cfg.data.root, allow_hub=cfg.data.allow_hub)
    data = data.subset(cfg.data.train_subset, cfg.data.test_subset, seed=cfg.data.subset_seed)
    say(
        f"data: {data.name} from {data.source}: {len(data.train_labels)} train / {len(data.test_labels)} "
        f"test images, mean {[round(m, 4) for m in data.mean]}, std {[round(s, 4) for s in data.std]}"
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.init_trackers("cifar_resnet", config=flat_config(cfg))  # no-op when report_to is []

    # ------------------------------------------------------------------------------- optimizers
    results = []
    for choice in runs:
        run_out, resume = out, cfg.train.resume_from_checkpoint
        if len(runs) > 1:
            # each optimizer in its own folder; with resume "latest", a finished one is read back, a
            # started one continues from its newest checkpoint and one not started yet starts fresh
            run_out = out / run_dir_name(choice)
            done = run_out / "metrics.json"
            if resume == "latest" and done.is_file():
                say(f"\n== {choice.label}: finished earlier, reading {done}")
                saved = json.loads(done.read_text())
                results.append(RunResult(**saved["final"], history=saved["history"]))
                continue
            resume = resume if list_checkpoints(run_out) else None
        results.append(train_one(cfg, choice, data, accelerator, run_out, resume))

    # ------------------------------------------------------------------------------------- save
    title = (
        f"resnet18(width={cfg.model.width}) on {data.name} ({len(data.train_labels)} train / "
        f"{len(data.test_labels)} test), batch {cfg.train.batch_size} x {accelerator.num_processes}, "
        f"{results[0].epochs} epochs, {cfg.schedule.name} lr"
    )
    table = comparison_table(results, title)
    if accelerator.is_main_process:
        (out / "comparison.md").write_text(table)
        (out / "comparison.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
        plot = plot_comparison(results, out / "comparison.png", title)
        say("\n" + table)
        say(f"table:  {out / 'comparison.md'}\nplot:   {plot}\nconfig: {out / 'config.yaml'}")
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(parse_args(Config, sys.argv[1:], description=__doc__.split("\n")[0]))
