"""The training loop every recipe runs: :func:`run_training`, one iteration per optimizer update.

:func:`shardwise.train.update.optimizer_steps` does the update mechanics (accumulation, clipping,
schedule, resume, divergence guard); this adds what a run reports and keeps: progress, logged
metrics, evaluations, checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .plan import StepPlan
from .sections import TrainConfig
from .update import model_loss, optimizer_steps

HISTORY = "history.json"  # in each checkpoint: the metric history up to it (read_history reads it back)


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def due(step: int, every: int | None) -> bool:
    """True when a cadence of ``every`` optimizer steps (None = never) falls on ``step``."""
    return every is not None and step % every == 0


def read_history(checkpoint: Path) -> list[dict]:
    """The metric history a checkpoint of :func:`run_training` carries ([] for older checkpoints)."""
    import json

    path = Path(checkpoint) / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer updates done, a resumed run's earlier ones included
    skipped_steps: int  # updates the divergence guard skipped, over the whole run
    train_seconds: float  # wall time of the loop (final evaluation included), plus seconds_before


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
    seconds_before: float = 0.0,
    loss_fn: Callable = model_loss,
    count_targets: Callable | None = None,
    eval_at_steps: Collection[int] = (),
) -> TrainResult:
    """The training loop of the recipes, one iteration per optimizer update.

    A progress bar; the train loss every ``log_every`` steps (mean over the updates since the last
    log and over processes, with the LR, epoch and skipped-update count); ``evaluate()`` every
    ``eval_every`` steps (default: every epoch) and at each step of ``eval_at_steps`` (0 = the initial
    weights, before the first update, so every curve starts from the baseline); a checkpoint every
    ``checkpoint_every`` steps, but only after a good update; and a last evaluation of the final
    weights. ``metrics`` is a :class:`~shardwise.train.metrics.Metrics`; ``loss_fn(model, batch)``
    computes a micro-batch's loss (default: the transformers model's own ``.loss``); with
    ``count_targets(batch)`` it returns ``(sum, count)`` and an update's loss is the mean over all target
    tokens of the update (all micro-batches, all processes): see
    :func:`shardwise.train.update.optimizer_steps`.

    Resuming: ``start_step``, ``skipped_steps`` and ``seconds_before`` carry a resumed run's counts
    (each checkpoint stores the last two in its ``meta``, the metric history in ``history.json``).
    """
    say = accelerator.print
    bar = progress(plan.total_steps, start_step, "train", accelerator.is_main_process and train.progress)
    extra_evals = set(eval_at_steps)
    started = time.perf_counter()

    def log_evaluation(step: int) -> None:
        evaluation = evaluate()
        metrics.log(step, evaluation)
        say(f"\nstep {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))

    step, window, last_eval_step = start_step, [], -1  # window: per-update losses since the last log
    if start_step == 0 and 0 in extra_evals:
        log_evaluation(0)
    for step, epoch, loss, skipped in optimizer_steps(
        accelerator, model, train_dl, optimizer, scheduler, plan, train, start_step, loss_fn, count_targets
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
        if due(step, train.eval_every or plan.updates_per_epoch) or step in extra_evals:
            log_evaluation(step)
            last_eval_step = step
        if due(step, train.checkpoint_every) and not skipped:
            seconds = seconds_before + time.perf_counter() - started
            meta = {"skipped_steps": skipped_steps, "train_seconds": seconds}
            history = {HISTORY: metrics.history}
            save_checkpoint(accelerator, output_dir, step, train.keep_last, meta=meta, extra_files=history)
    bar.close()
    if last_eval_step != step:  # always finish with an evaluation of the final weights
        metrics.log(step, evaluate())
    return TrainResult(step, skipped_steps, seconds_before + time.perf_counter() - started)
