"""Train a ResNet-18 on CIFAR-10 (or Fashion-MNIST) with one optimizer, on Accelerate.

    python recipes/cifar_resnet.py data.dataset=fashion_mnist model.width=0.125 optimizer.name=adamw
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml recipes/cifar_resnet.py data.root=...

Optimizers by name (``OPTIMIZERS``): sgd, sgd_momentum (torch.optim.SGD); adam, adamw, amsgrad, radam,
adabelief (shardwise.optim; the last three are AdamW variants with decoupled weight decay 0.01), and
``<name>_8bit`` for each Adam-family entry (blockwise 8-bit moments). The experiment behind this
project (batch 128, 100 epochs, constant lr, crop + flip) measured SGD 72.3%, SGD + momentum 88.4%,
Adam 86.7%, AdamW 89.1% (after 10 epochs: 45%, 62%, 71%); ``recipes/cifar_compare.py`` runs this
recipe once per optimizer and tabulates the runs. Evaluates after 10% of the steps and every epoch;
writes metrics.json (peak memory, optimizer-state bytes), curves.png, config.yaml and checkpoints.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from shardwise.configfile import parse_args
from shardwise.data.images import ImageDataConfig, ImageTensorDataset, load_images, make_loader
from shardwise.errors import did_you_mean, exit_on_error
from shardwise.models import ResNetConfig, resnet18
from shardwise.train.loop import plan_run, record_config, resume, run_training, start_run
from shardwise.train.metrics import Metrics, PeakMemory, optimizer_state_bytes, plot_curves
from shardwise.train.preflight import preflight
from shardwise.train.sections import TrainConfig


@dataclass(frozen=True)
class OptimizerSpec:
    """Which class and its hyperparameters (one frozen record per name, timm-style).

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
    kw = {k: getattr(spec, k) for k in ("lr", "weight_decay", "amsgrad", "variant", "state_bits")}
    return cls(params, impl=impl, **kw)


# ---------------------------------------------------------------------------------------------- config


@dataclass
class OptimizerChoice:
    """A name from OPTIMIZERS plus optional overrides (None = the registry's value)."""

    name: str = "adamw"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    state_bits: Literal[32, 8] | None = None
    impl: Literal["auto", "reference", "foreach", "fused"] = "auto"  # shardwise kernels only
    # the original experiment decays every parameter; true puts biases and BN parameters in a no-decay group
    no_decay_norm_and_bias: bool = False

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.name!r}{did_you_mean(self.name, OPTIMIZERS)} "
                f"(choose from {', '.join(OPTIMIZERS)})"
            )
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
        """The run's name: the registry name, plus what was overridden."""
        extra = [f"{k}={getattr(self, k)}" for k in ("lr", "momentum", "weight_decay", "state_bits")]
        extra = [e for e in extra if not e.endswith("=None")]
        return self.name + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class ScheduleConfig:
    # any transformers.get_scheduler name; the original experiment used a constant learning rate
    name: str = "constant"
    warmup_steps: int = 0


@dataclass
class Config:
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: ResNetConfig = field(default_factory=ResNetConfig)
    optimizer: OptimizerChoice = field(default_factory=OptimizerChoice)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # the original setup: batch 128, no gradient clipping, full precision
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=128, max_grad_norm=None, output_dir="outputs/cifar_resnet"
        )
    )


@dataclass
class RunResult:
    """What one run reports (metrics.json's "final", plus the history)."""

    name: str
    spec: dict
    setup: str  # model, data, batch and schedule, for a comparison's title
    steps: int
    epochs: int
    updates_per_epoch: int
    train_seconds: float
    final_accuracy: float
    early_accuracy: float  # after 10% of the optimizer steps (epoch 10 of 100)
    early_epoch: float
    peak_memory_bytes: int
    peak_memory_kind: str  # "cuda" (max_memory_allocated) or "rss" (process, sampled every micro-batch)
    optimizer_state_bytes: int
    history: list[dict] = field(repr=False, default_factory=list)


def main(cfg: Config) -> RunResult:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from shardwise.optim import param_groups

    preflight(cfg)  # precision, trackers, resume: fail before any work
    accelerator, out = start_run(cfg.train, f"cifar_resnet {cfg.optimizer.label}")
    say, choice = accelerator.print, cfg.optimizer

    # ---------------------------------------------------------------------------------------- data
    with accelerator.main_process_first():
        data = load_images(cfg.data)
    say(f"data: {data.summary()}")
    set_seed(cfg.train.seed)  # every optimizer starts from the same weights and sees the same batches
    train_ds = ImageTensorDataset(
        data.train_images, data.train_labels, data.mean, data.std, train=cfg.data.augment
    )
    test_ds = ImageTensorDataset(data.test_images, data.test_labels, data.mean, data.std, train=False)
    train_dl = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    test_dl = make_loader(test_ds, cfg.train.eval_batch(), shuffle=False)

    # --------------------------------------------------------------------------------------- model
    model = resnet18(num_classes=len(data.classes), width=cfg.model.width)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    n_params = sum(p.numel() for p in model.parameters())

    # ----------------------------------------------------------------------------------- optimizer
    spec = choice.resolve()
    params = param_groups(model, spec.weight_decay) if choice.no_decay_norm_and_bias else model.parameters()
    optimizer = make_optimizer(spec, params, impl=choice.impl)
    # the step, counters and data position a resumed run continues from; the steps its data takes
    start, plan = plan_run(accelerator, train_dl, cfg.train, out)
    schedule = cfg.schedule
    scheduler = get_scheduler(
        schedule.name, optimizer, schedule.warmup_steps, num_training_steps=plan.total_steps
    )
    # "after 10% of the epochs" of the original table, in optimizer steps so that short runs have it too
    early_step = max(1, round(0.1 * plan.total_steps))
    say(
        f"{type(optimizer).__name__} {asdict(spec)}\nresnet18(width={cfg.model.width}) {n_params:,} params; "
        f"{plan.total_steps} steps ({plan.updates_per_epoch}/epoch, {plan.epochs} epochs), early eval at "
        f"step {early_step}"
    )
    model, optimizer, train_dl, test_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, test_dl, scheduler
    )
    metrics = Metrics(accelerator)
    resume(accelerator, start, metrics, scheduler)  # model, optimizer, schedule, RNG, data position, curves
    record_config(accelerator, cfg, out, "cifar_resnet")

    # ---------------------------------------------------------------------------------------- eval
    def evaluate() -> dict[str, float]:
        model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in test_dl:
                logits, y = accelerator.gather_for_metrics(
                    (model(x.contiguous(memory_format=memory_format)), y)
                )
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
                correct += (logits.argmax(-1) == y).sum().item()
                n += y.numel()
        model.train()
        return {"eval/loss": loss_sum / n, "eval/accuracy": correct / n}

    # ---------------------------------------------------------------------------------------- loop
    peak = PeakMemory(accelerator.device)

    def loss_fn(model, batch):
        x, y = batch
        loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)), y)
        peak.sample()  # after the forward, while the activations are alive
        return loss

    model.train()
    result = run_training(
        accelerator, model, train_dl, optimizer, scheduler, plan, cfg.train,
        evaluate=evaluate, metrics=metrics, output_dir=out, loss_fn=loss_fn, eval_at_steps={early_step},
        start_step=start.step, skipped_steps=start.skipped_steps, seconds_before=start.train_seconds,
        position=start.position,
    )  # fmt: skip

    # ---------------------------------------------------------------------------------------- save
    evals = [r for r in metrics.history if "eval/accuracy" in r]
    early = [r for r in evals if r["step"] == early_step] or [{"step": math.nan, "eval/accuracy": math.nan}]
    run = RunResult(
        name=choice.label,
        spec=asdict(spec),
        setup=f"resnet18(width={cfg.model.width}) on {data.name} ({len(data.train_labels)} train / "
        f"{len(data.test_labels)} test), batch {cfg.train.batch_size} x {accelerator.num_processes}, "
        f"{plan.epochs} epochs, {schedule.name} lr",
        steps=result.steps,
        epochs=plan.epochs,
        updates_per_epoch=plan.updates_per_epoch,
        train_seconds=round(result.train_seconds, 2),
        final_accuracy=evals[-1]["eval/accuracy"],
        early_accuracy=early[0]["eval/accuracy"],
        early_epoch=round(early[0]["step"] / plan.updates_per_epoch, 3),
        peak_memory_bytes=peak.bytes,
        peak_memory_kind=peak.kind,
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        history=metrics.history,
    )
    final = {k: v for k, v in asdict(run).items() if k != "history"}
    metrics_path = metrics.write(out, final)
    if accelerator.is_main_process:
        plot = plot_curves(metrics.history, out / "curves.png", title=f"cifar_resnet: {choice.label}")
        say(f"\n{choice.label}: test accuracy {run.final_accuracy:.4f} after {run.steps} steps")
        say(f"plot:    {plot}\nmetrics: {metrics_path}\nconfig:  {out / 'config.yaml'}")
    accelerator.end_training()
    accelerator.free_memory()  # drop this run's prepared model / optimizer before a next one
    return run


if __name__ == "__main__":
    with exit_on_error():  # a config / data / checkpoint / divergence error: one `error:` line, exit 2
        main(parse_args(Config, sys.argv[1:], description=__doc__.split("\n")[0]))
