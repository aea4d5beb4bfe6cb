"""Loop arithmetic and small pieces the recipes share: step plan, optimizer build, progress, seeds.

Steps always count optimizer updates (after gradient accumulation), which is what the LR schedule,
``log_every``, ``eval_every``, ``checkpoint_every`` and ``max_steps`` are measured in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import OptimizerConfig, TrainConfig


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
        raise ValueError("the training data loader is empty: fewer samples than processes x batch_size?")
    per_epoch = math.ceil(batches_per_epoch / train.grad_accum_steps)
    if train.max_steps is not None:
        return StepPlan(per_epoch, train.max_steps, math.ceil(train.max_steps / per_epoch))
    return StepPlan(per_epoch, per_epoch * train.epochs, train.epochs)


def build_optimizer(model, opt: OptimizerConfig, total_steps: int):
    """shardwise optimizer (decay / no-decay groups) + LR schedule from the preset and the overrides."""
    from shardwise.optim import optimizer_and_scheduler

    return optimizer_and_scheduler(
        opt.preset,
        model,
        total_steps,
        schedule=opt.schedule,
        warmup_steps=opt.warmup_steps,
        warmup_ratio=opt.warmup_ratio,
        **opt.overrides(),
    )


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
    """Run the training micro-batches; yield ``(step, epoch, loss)`` after every optimizer update.

    The mechanics both recipes share: gradient accumulation (``accelerator.accumulate``), clipping
    (DeepSpeed clips itself, from its JSON), optimizer + LR-scheduler step, the seeded per-epoch data
    order, and — when ``start_step`` > 0 after a resume — skipping the micro-batches already seen in
    that epoch. ``loss`` is this process's mean loss over the update's micro-batches, a 0-d tensor on
    the device (no host sync here; reduce it when logging). The caller logs, evaluates and saves.
    """
    from .accel import is_deepspeed

    clip = train.max_grad_norm is not None and not is_deepspeed(accelerator)
    start_epoch, skip = plan.position(start_step, train.grad_accum_steps)
    step = start_step
    for epoch in range(start_epoch, plan.epochs):
        if step >= plan.total_steps:
            return
        train_dl.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(train_dl, skip) if epoch == start_epoch and skip else train_dl
        )
        total, n = 0.0, 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
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
            yield step, epoch, total / n
            total, n = 0.0, 0
            if step >= plan.total_steps:
                return


def due(step: int, every: int | None) -> bool:
    """True when a cadence of ``every`` optimizer steps (None = never) falls on ``step``."""
    return every is not None and step % every == 0
