"""The update mechanics every recipe shares: micro-batches in, one :class:`Update` per optimizer step out.

Accumulation, clipping, optimizer + LR-scheduler step, the seeded per-epoch data order, the exact
mid-epoch resume, the divergence guard, and (opt-in) the loss as a mean over the target tokens of a
whole optimizer step. What a run reports and keeps (logging, evaluation,
checkpoints) is :func:`shardwise.train.loop.run_training`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch

from shardwise.errors import DivergenceError

from . import faults
from .accel import is_deepspeed
from .plan import DataCursor, DataPosition, StepPlan
from .rng import restore_rng_after_first_batch, rng_state
from .sections import TrainConfig


def model_loss(model, batch):
    """The default loss: transformers models compute it from ``labels`` in the batch."""
    return model(**batch).loss


class Update(NamedTuple):
    """One optimizer update as :func:`optimizer_steps` yields it."""

    step: int  # optimizer updates done so far, this one included
    epoch: int
    # this process's share of the update's loss (0-d tensor, no host sync); the mean over processes is
    # the update's loss: micro-batch mean losses averaged, or (count_targets) the step's token mean
    loss: Any
    skipped: bool  # the loss or the gradients were not finite: parameters and state left untouched


def windows(batches: Iterable, size: int) -> Iterator[list]:
    """Consecutive micro-batches in lists of ``size`` (the last one of an epoch may be shorter): the
    accumulation windows accelerate also forms (it steps every ``size`` batches and at the epoch's end)."""
    window: list = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


@contextmanager
def window_sync(accelerator, model, sync: bool):
    """``accelerator.accumulate`` for a window the loop formed itself: gradients are all-reduced (and
    the optimizer steps) on the window's last micro-batch only.

    accelerate decides that from its own micro-batch counter and the data loader's end-of-epoch flag,
    which reading a whole window ahead sets too early; so set its flag directly, as transformers'
    Trainer does when it reads ahead to count a step's tokens.
    """
    accelerator.gradient_state._set_sync_gradients(sync)
    with nullcontext() if sync else accelerator.no_sync(model):
        yield


def find_skipping_optimizer(optimizer):
    """The shardwise optimizer under accelerate's (and DeepSpeed's) wrappers when it skips non-finite
    steps (and counts them in ``skipped_steps``); None for any other optimizer."""
    for _ in range(4):
        if getattr(optimizer, "skip_nonfinite", False) and hasattr(optimizer, "skipped_steps"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def divergence_error(step: int, streak: int, optimizer, train: TrainConfig) -> DivergenceError:
    """The error that stops a diverged run: which steps were skipped, the settings, the remedies."""
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
    cursor: DataCursor | None = None,
    count_targets: Callable | None = None,
):
    """Run the training micro-batches; yield an :class:`Update` ``(step, epoch, loss, skipped)`` after
    every optimizer update.

    The mechanics all recipes share: gradient accumulation (``accelerator.accumulate``), clipping
    (DeepSpeed clips itself, from its JSON), optimizer + LR-scheduler step, the seeded per-epoch data
    order, and — when ``start_step`` > 0 after a resume — skipping the micro-batches already seen in
    that epoch, with the restored RNG state (dropout masks) as it was at the checkpoint. ``loss`` is
    this process's mean loss over the update's micro-batches, a 0-d tensor on the device (no host sync
    here; reduce it when logging). ``loss_fn(model, batch)`` returns a micro-batch's 0-d loss. The
    caller logs, evaluates and saves.

    Token-mean loss (opt-in, ``count_targets``): the loss of an update is the mean over ALL target
    tokens of its micro-batches on all processes, ``L = sum_{p,k} S_pk / N`` with ``S_pk`` the summed
    token losses of micro-batch k on process p and ``N`` the step's target count; not the mean of
    micro-batch means, which weights the tokens of a short micro-batch (or short last window, or of a
    process with fewer targets) more. ``loss_fn`` then returns ``(S, n)``, ``count_targets(batch)`` the
    count ``n`` from the labels alone. The loop reads the window ahead, counts its targets (one
    all-reduce per update) and backpropagates ``S_pk * world * grad_accum / N`` per micro-batch (DDP
    averages gradients over ``world`` processes, ``accelerator.backward`` divides by ``grad_accum``),
    so the summed gradient is exactly that of ``L``. ``loss`` is then ``world * sum_k S_pk / N``, whose
    mean over processes is ``L``.

    Divergence guard: a non-finite micro-batch loss is turned into NaN gradients (multiplying by a
    factor that is exactly 1 when the loss is finite, so nothing changes then, and no host sync), which
    the optimizer (``skip_nonfinite``) skips on every rank alike. The update still counts as a step
    (the data and the schedule move on). After ``train.max_consecutive_skips`` skipped updates in a row
    this raises :class:`DivergenceError` with the remedies, before yielding, so no checkpoint of that
    state is written. Under DeepSpeed the engine skips a non-finite step itself (before the optimizer
    sees it; the global gradient norm it all-reduces makes every rank agree), as accelerate's fp16
    GradScaler does; the guard counts those skips (``step_was_skipped``), except a gradient overflow
    under fp16 loss scaling with a finite loss: that is the loss scaler calibrating (it halves the
    scale), not a divergence.

    ``cursor.position`` (a resumed checkpoint's :class:`DataPosition`) places the resume in samples,
    right for any number of processes; without it (older checkpoints) the position is derived from
    ``start_step`` in this world's micro-batches. After each update ``cursor.position`` holds the
    samples consumed so far (what a checkpoint stores).
    """
    clip = train.max_grad_norm is not None and not is_deepspeed(accelerator)
    guarded = find_skipping_optimizer(optimizer)
    nan = torch.tensor(float("nan"), device=accelerator.device)
    global_micro = getattr(train_dl, "total_batch_size", None) or train.batch_size * accelerator.num_processes
    dataset_len = len(train_dl.dataset)
    cursor = cursor if cursor is not None else DataCursor()
    position = cursor.position
    if position is not None and start_step > 0:
        start_epoch, skip, again = position.resume(global_micro)
        if again:
            accelerator.print(
                f"resume: {position.samples} samples of epoch {start_epoch} were consumed; with "
                f"{global_micro} samples per global micro-batch the first {again} of the next one are "
                "trained on a second time (none skipped)"
            )
    else:
        start_epoch, skip = plan.position(start_step, train.grad_accum_steps)
    # DeepSpeed's engine and accelerate's fp16 GradScaler skip non-finite steps before our optimizer runs
    wrapper_skips = hasattr(optimizer, "step_was_skipped")
    fp16 = accelerator.mixed_precision == "fp16"
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
            batches = restore_rng_after_first_batch(rest, resumed_rng)
        total, n, done = 0.0, 0, skip if epoch == start_epoch else 0  # done: this epoch's micro-batches
        skipped_before = guarded.skipped_steps if guarded is not None else 0
        for batch, sync, scale in _micro_batches(accelerator, batches, train.grad_accum_steps, count_targets):
            faults.maybe_raise(step + 1, accelerator.process_index)
            faults.record_batch(batch, step + 1, accelerator.process_index)
            with accelerator.accumulate(model) if scale is None else window_sync(accelerator, model, sync):
                loss = loss_fn(model, batch)
                if scale is not None:  # (sum, count) -> this micro-batch's share of the step's token mean
                    loss = loss[0] * scale
                if faults.nan_loss(step + 1, accelerator.process_index):
                    loss = loss * nan
                # exactly 1.0 for a finite loss; NaN makes every gradient NaN (all-reduced to all ranks)
                loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, nan)
                accelerator.backward(loss)
                if clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            done += 1
            if scale is None:  # mean of the micro-batch means
                total, n = total + loss.detach().float(), n + 1
            else:  # the shares add up to world * S_p / N (undo backward's division by grad_accum)
                total, n = total + loss.detach().float() / train.grad_accum_steps, 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()  # once per update: make_accelerator sets step_scheduler_with_optimizer=False
            step += 1
            if guarded is not None:
                skipped = guarded.skipped_steps > skipped_before
                skipped_before = guarded.skipped_steps
            else:  # an optimizer without the guard (torch.optim.SGD): notice, though the update was applied
                skipped = not bool(torch.isfinite(total))
            if wrapper_skips and not skipped and optimizer.step_was_skipped:  # skipped by the wrapper
                skipped = not fp16 or not bool(
                    torch.isfinite(total)
                )  # fp16: a finite loss = scaler calibrating
            streak = streak + 1 if skipped else 0
            if streak >= train.max_consecutive_skips:
                raise divergence_error(step, streak, optimizer, train)
            cursor.position = DataPosition.after(epoch, done, global_micro, dataset_len)
            yield Update(step, epoch, total / n, skipped)
            total, n = 0.0, 0
            if step >= plan.total_steps:
                return


def _micro_batches(accelerator, batches, grad_accum: int, count_targets: Callable | None):
    """``(batch, sync, scale)``: ``scale`` None = accelerate's own accumulation (``accumulate``);
    with ``count_targets``, per window: sync on its last micro-batch, ``scale = world * grad_accum / N``
    with ``N`` the window's target count over all processes (one all-reduce)."""
    if count_targets is None:
        for batch in batches:
            yield batch, None, None
        return
    for window in windows(batches, grad_accum):
        local = torch.stack([torch.as_tensor(count_targets(b), device=accelerator.device) for b in window])
        tokens = accelerator.reduce(local.sum().float(), "sum")
        scale = accelerator.num_processes * grad_accum / tokens.clamp_min(1.0)
        for i, batch in enumerate(window):
            yield batch, i == len(window) - 1, scale
