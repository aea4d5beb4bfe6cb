"""The training loop the recipes share, and its pieces: step plan, optimizer build, progress, seeds.

Steps always count optimizer updates (after gradient accumulation), which is what the LR schedule,
``log_every``, ``eval_every``, ``checkpoint_every`` and ``max_steps`` are measured in.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import faults
from .config import OptimizerConfig, TrainConfig
from .errors import DataError, DivergenceError


@dataclass(frozen=True)
class StepPlan:
    updates_per_epoch: int  # optimizer steps in one pass over this process's batches
    total_steps: int  # what the schedule is built for
    epochs: int  # passes needed to reach total_steps

    def position(self, step: int, grad_accum: int) -> tuple[int, int]:
        """(epoch, micro-batches to skip in it) to resume after ``step`` optimizer updates."""
        epoch, within = divmod(step, self.updates_per_epoch)
        return epoch, within * grad_accum


def plan_steps(batches_per_epoch: int, train: TrainConfig) -> StepPlan:
    """Optimizer steps per epoch and in total; ``max_steps`` wins over ``epochs`` when set.

    The last accumulation window of an epoch may be short; accelerate still steps at the end of the
    data loader, hence the ceil.
    """
    if batches_per_epoch < 1:
        raise DataError(
            "the training data loader is empty: fewer samples than processes x batch_size?",
            hint="check the train split and data.max_train_samples, or lower train.batch_size",
        )
    per_epoch = math.ceil(batches_per_epoch / train.grad_accum_steps)
    if train.max_steps is not None:
        return StepPlan(per_epoch, train.max_steps, math.ceil(train.max_steps / per_epoch))
    return StepPlan(per_epoch, per_epoch * train.epochs, train.epochs)


def build_optimizer(model, opt: OptimizerConfig, total_steps: int):
    """shardwise optimizer (decay / no-decay groups) + LR schedule from the preset and the overrides.

    The optimizer skips (and counts) any step whose gradients are not finite (``skip_nonfinite``):
    the divergence guard of :func:`optimizer_steps` builds on it. Invalid hyperparameters surface as a
    ConfigError naming the ``optimizer.*`` key.
    """
    from shardwise.config import ConfigError
    from shardwise.optim import optimizer_and_scheduler

    if opt.warmup_steps is not None and opt.warmup_steps >= total_steps:
        raise ConfigError(
            f"optimizer.warmup_steps={opt.warmup_steps} is not below the run's {total_steps} optimizer steps",
            hint="lower optimizer.warmup_steps (or use optimizer.warmup_ratio), or train longer "
            "(train.max_steps / train.epochs)",
        )
    try:
        return optimizer_and_scheduler(
            opt.preset,
            model,
            total_steps,
            schedule=opt.schedule,
            warmup_steps=opt.warmup_steps,
            warmup_ratio=opt.warmup_ratio,
            skip_nonfinite=True,
            **opt.overrides(),
        )
    except (ValueError, KeyError) as e:  # the optimizer's and the preset registry's own validation
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"optimizer: {msg}", hint="see docs/optimizer.md for the options") from None


def describe_optimizer(optimizer, opt: OptimizerConfig) -> str:
    """Parameter counts per group (nanoGPT's configure_optimizers print) and the key options."""
    parts = []
    for i, g in enumerate(optimizer.param_groups):
        n = sum(p.numel() for p in g["params"])
        parts.append(f"group {i}: {len(g['params'])} tensors, {n:,} params, weight_decay={g['weight_decay']}")
    d = optimizer.defaults
    opts = [f"{k}={d[k]}" for k in ("lr", "betas", "eps", "variant", "amsgrad") if k in d]
    # storage / placement options are attributes, not per-group hyperparameters
    opts += [f"{k}={getattr(optimizer, k)}" for k in ("impl", "state_bits") if hasattr(optimizer, k)]
    opts.append(f"shard={opt.shard}")
    opts = ", ".join(opts)
    return f"{type(optimizer).__name__}({opts})\n  " + "\n  ".join(parts)


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def model_loss(model, batch):
    """The default loss: transformers models compute it from ``labels`` in the batch."""
    return model(**batch).loss


class Update(NamedTuple):
    """One optimizer update as :func:`optimizer_steps` yields it."""

    step: int  # optimizer updates done so far, this one included
    epoch: int
    loss: Any  # this process's mean loss over the update's micro-batches (0-d tensor, no host sync)
    skipped: bool  # the loss or the gradients were not finite: parameters and state left untouched


def skip_counter(optimizer):
    """The shardwise optimizer under accelerate's (and DeepSpeed's) wrappers, if it skips non-finite steps."""
    for _ in range(4):
        if getattr(optimizer, "skip_nonfinite", False) and hasattr(optimizer, "skipped_steps"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore_rng_after_first_batch(batches, state: dict[str, Any]):
    """Yield ``batches``; once the iterator exists (it draws a base seed from the global RNG), put the
    RNG state back, so that a run resumed mid-epoch draws the same dropout masks as an uninterrupted
    one, whose iterator was created (and whose number was drawn) before the checkpoint was taken."""
    for i, batch in enumerate(batches):
        if i == 0:
            set_rng_state(state)
        yield batch


def divergence_message(step: int, streak: int, optimizer, train: TrainConfig) -> DivergenceError:
    lr = optimizer.param_groups[0]["lr"] if getattr(optimizer, "param_groups", None) else "?"
    clip = f"train.max_grad_norm={train.max_grad_norm}" if train.max_grad_norm else "no clipping"
    return DivergenceError(
        f"training diverged: the last {streak} optimizer steps ({step - streak + 1}..{step}) had a "
        f"non-finite loss or gradients and were skipped (train.max_consecutive_skips="
        f"{train.max_consecutive_skips}; lr {lr:.3g}, {clip}). Parameters and optimizer state are those "
        f"of step {step - streak}; no checkpoint was written after it",
        hint="lower the learning rate (optimizer.lr), clip gradients (train.max_grad_norm=1.0), try "
        "optimizer.amsgrad=true, check the data's normalization and labels; then resume from the last "
        "good checkpoint (train.resume_from_checkpoint=latest)",
    )


def optimizer_steps(
    accelerator,
    model,
    train_dl,
    optimizer,
    scheduler,
    plan: StepPlan,
    train: TrainConfig,
    start_step: int = 0,
    loss_fn=model_loss,
):
    """Run the training micro-batches; yield an :class:`Update` ``(step, epoch, loss, skipped)`` after
    every optimizer update.

    The mechanics both recipes share: gradient accumulation (``accelerator.accumulate``), clipping
    (DeepSpeed clips itself, from its JSON), optimizer + LR-scheduler step, the seeded per-epoch data
    order, and — when ``start_step`` > 0 after a resume — skipping the micro-batches already seen in
    that epoch, with the restored RNG state (dropout masks) as it was at the checkpoint. ``loss`` is
    this process's mean loss over the update's micro-batches, a 0-d tensor on the device (no host sync
    here; reduce it when logging). The caller logs, evaluates and saves.

    Divergence guard: a non-finite micro-batch loss is turned into NaN gradients (multiplying by a
    factor that is exactly 1 when the loss is finite, so nothing changes then, and no host sync), which
    the optimizer (``skip_nonfinite``) skips on every rank alike. The update still counts as a step
    (the data and the schedule move on). After ``train.max_consecutive_skips`` skipped updates in a row
    this raises :class:`DivergenceError` with the remedies, before yielding, so no checkpoint of that
    state is written.
    """
    from .accel import is_deepspeed

    clip = train.max_grad_norm is not None and not is_deepspeed(accelerator)
    counter = skip_counter(optimizer)
    nan = torch.tensor(float("nan"), device=accelerator.device)
    start_epoch, skip = plan.position(start_step, train.grad_accum_steps)
    # the RNG state load_state restored, for the iterator of a resumed, already started epoch
    resumed_rng = rng_state() if skip else None
    step, streak = start_step, 0
    for epoch in range(start_epoch, plan.epochs):
        if step >= plan.total_steps:
            return
        train_dl.set_epoch(epoch)
        batches = train_dl
        if epoch == start_epoch and skip:
            rest = accelerator.skip_first_batches(train_dl, skip)
            batches = _restore_rng_after_first_batch(rest, resumed_rng)
        total, n = 0.0, 0
        skipped_before = counter.skipped_steps if counter is not None else 0
        for batch in batches:
            faults.maybe_raise(step + 1, accelerator.process_index)
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                if faults.nan_loss(step + 1, accelerator.process_index):
                    loss = loss * nan
                # exactly 1.0 for a finite loss; NaN makes every gradient NaN (all-reduced to all ranks)
                loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, nan)
                accelerator.backward(loss)
                if clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total, n = total + loss.detach().float(), n + 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()  # once per update: make_accelerator sets step_scheduler_with_optimizer=False
            step += 1
            if counter is not None:
                skipped = counter.skipped_steps > skipped_before
                skipped_before = counter.skipped_steps
            else:  # an optimizer without the guard: at least notice (the update was applied)
                skipped = not bool(torch.isfinite(total))
            streak = streak + 1 if skipped else 0
            if streak >= train.max_consecutive_skips:
                raise divergence_message(step, streak, optimizer, train)
            yield Update(step, epoch, total / n, skipped)
            total, n = 0.0, 0
            if step >= plan.total_steps:
                return


def due(step: int, every: int | None) -> bool:
    """True when a cadence of ``every`` optimizer steps (None = never) falls on ``step``."""
    return every is not None and step % every == 0


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer updates done, a resumed run's earlier ones included
    skipped_steps: int  # updates the divergence guard skipped, over the whole run
    train_seconds: float  # wall time of this run's loop (final evaluation included)


def run_training(
    accelerator,
    model,
    train_dl,
    optimizer,
    scheduler,
    plan: StepPlan,
    train: TrainConfig,
    *,
    evaluate: Callable[[], dict[str, float]],
    metrics,
    output_dir: Path,
    start_step: int = 0,
    skipped_steps: int = 0,
) -> TrainResult:
    """The training loop of the fine-tuning recipes, one iteration per optimizer update.

    :func:`optimizer_steps` does the update mechanics; this adds what a run reports and keeps: a
    progress bar, the train loss every ``log_every`` steps (mean over the updates since the last
    log and over processes, with the LR, epoch and skipped-update count), ``evaluate()`` every
    ``eval_every`` steps (default: every epoch), a checkpoint every ``checkpoint_every`` steps, but
    only after a good update, and a last evaluation of the final weights. ``metrics`` is a
    :class:`~shardwise.train.metrics.Metrics`; ``skipped_steps`` carries a resumed run's count.
    """
    from .checkpoint import save_checkpoint

    say = accelerator.print
    bar = progress(plan.total_steps, start_step, "train", accelerator.is_main_process and train.progress)
    step, window, last_eval_step = start_step, [], -1  # window: per-update losses since the last log
    started = time.perf_counter()
    for step, epoch, loss, skipped in optimizer_steps(
        accelerator, model, train_dl, optimizer, scheduler, plan, train, start_step
    ):
        bar.update(1)
        if skipped:  # non-finite loss or gradients: the optimizer left everything untouched
            skipped_steps += 1
            say(f"\nstep {step}: non-finite loss or gradients, update skipped ({skipped_steps} so far)")
        else:
            window.append(loss)
        if due(step, train.log_every) or step == plan.total_steps:
            mean = torch.stack(window).mean() if window else torch.tensor(float("nan"), device=loss.device)
            train_loss = accelerator.reduce(mean, "mean").item()  # over processes
            lr = scheduler.get_last_lr()[0]
            values = {"train/loss": train_loss, "train/lr": lr, "train/epoch": epoch}
            metrics.log(step, {**values, "train/skipped_steps": skipped_steps})
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", skipped=skipped_steps)
            window.clear()
        if due(step, train.eval_every or plan.updates_per_epoch):
            evaluation, last_eval_step = evaluate(), step
            metrics.log(step, evaluation)
            say(f"\nstep {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
        if due(step, train.checkpoint_every) and not skipped:
            meta = {"skipped_steps": skipped_steps}
            save_checkpoint(accelerator, output_dir, step, train.keep_last, meta=meta)
    bar.close()
    if last_eval_step != step:  # always finish with an evaluation of the final weights
        metrics.log(step, evaluate())
    return TrainResult(step, skipped_steps, time.perf_counter() - started)
