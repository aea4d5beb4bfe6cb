"""How many optimizer steps a run makes, and where a resumed run picks up.

Steps always count optimizer updates (after gradient accumulation), which is what the LR schedule,
``log_every``, ``eval_every``, ``checkpoint_every`` and ``max_steps`` are measured in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardwise.errors import DataError

from .sections import TrainConfig


@dataclass(frozen=True)
class StepPlan:
    updates_per_epoch: int  # optimizer steps in one pass over this process's batches
    total_steps: int  # what the schedule is built for
    epochs: int  # passes needed to reach total_steps

    def position(self, step: int, grad_accum: int) -> tuple[int, int]:
        """(epoch, micro-batches to skip in it) to resume after ``step`` optimizer updates."""
        epoch, within = divmod(step, self.updates_per_epoch)
        return epoch, within * grad_accum


def batches_per_process(train_dl, num_processes: int) -> int:
    """Batches one process sees per epoch: accelerate splits the global batch list evenly over the
    processes (the last process's share padded), hence the ceil."""
    return -(-len(train_dl) // num_processes)


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
