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


@dataclass(frozen=True)
class DataPosition:
    """Where a run stands in its data: ``samples`` of epoch ``epoch``'s shuffled order consumed, by all
    processes together. Checkpoints store it (``meta["data"]``) so that a run resumes at the right
    sample on any number of processes: micro-batch counts are per process and change with the world
    size; the seeded shuffled order of an epoch does not (accelerate's seedable sampler permutes the
    whole data set, then deals consecutive per-process batches to the ranks in turn)."""

    epoch: int
    samples: int

    @staticmethod
    def after(epoch: int, micro_batches: int, global_micro_batch: int, dataset_len: int) -> DataPosition:
        """The position after ``micro_batches`` per-process micro-batches of ``epoch`` on a world whose
        micro-batch step takes ``global_micro_batch`` samples (per-process batch x processes). The
        last global batch of an epoch is padded by accelerate (even_batches): capped at the epoch."""
        samples = min(micro_batches * global_micro_batch, dataset_len)
        return DataPosition(epoch + 1, 0) if samples >= dataset_len else DataPosition(epoch, samples)

    def resume(self, global_micro_batch: int) -> tuple[int, int, int]:
        """(epoch, micro-batches per process to skip, samples seen again) for a world whose
        micro-batch step takes ``global_micro_batch`` samples.

        Exact (0 seen again) when ``samples`` is a multiple of it: always when the new world size
        divides the old one (2 -> 1, 8 -> 4), and whenever the run stopped on a global-batch boundary
        of the new world. Otherwise it rounds down to that boundary: the first ``samples mod
        global_micro_batch`` samples of the next global batch are trained on a second time; no sample
        is ever skipped.
        """
        skip, again = divmod(self.samples, global_micro_batch)
        return self.epoch, skip, again


@dataclass
class DataCursor:
    """The data position, kept current by :func:`shardwise.train.update.optimizer_steps`: set it to a
    resumed checkpoint's position before iterating; after each yielded update it holds the position
    after that update (what a checkpoint taken then stores)."""

    position: DataPosition | None = None


def batches_per_process(train_dl, num_processes: int) -> int:
    """Batches one process sees per epoch: accelerate splits the global batch list evenly over the
    processes (the last process's share padded), hence the ceil."""
    return -(-len(train_dl) // num_processes)


def plan_steps(
    batches_per_epoch: int,
    train: TrainConfig,
    resume: tuple[int, DataPosition | None] | None = None,
    global_micro_batch: int | None = None,
) -> StepPlan:
    """Optimizer steps per epoch and in total; ``max_steps`` wins over ``epochs`` when set.

    The last accumulation window of an epoch may be short; accelerate still steps at the end of the
    data loader, hence the ceil.

    ``resume`` = (the checkpoint's step, its :class:`DataPosition`), with ``global_micro_batch`` the
    samples one micro-batch step of this world takes: the total then counts the steps done plus the
    updates the remaining data takes on this world, which is the original total on the same world
    size and stays right when the world size (the global batch) changed: an ``epochs`` run ends with
    its data and its LR schedule, a ``max_steps`` run gets enough epochs to reach ``max_steps``.
    """
    if batches_per_epoch < 1:
        raise DataError(
            "the training data loader is empty: fewer samples than processes x batch_size?",
            hint="check the train split and data.max_train_samples, or lower train.batch_size",
        )
    per_epoch = math.ceil(batches_per_epoch / train.grad_accum_steps)
    step, position = resume if resume is not None else (0, None)
    if position is None or global_micro_batch is None:  # fresh, or an older checkpoint (same world)
        if train.max_steps is not None:
            return StepPlan(per_epoch, train.max_steps, math.ceil(train.max_steps / per_epoch))
        return StepPlan(per_epoch, per_epoch * train.epochs, train.epochs)
    epoch, skip, _ = position.resume(global_micro_batch)
    rest_of_epoch = math.ceil(max(0, batches_per_epoch - skip) / train.grad_accum_steps)
    if train.max_steps is None:
        later = max(0, train.epochs - epoch - 1) * per_epoch
        return StepPlan(per_epoch, step + rest_of_epoch + later, train.epochs)
    left = max(0, train.max_steps - step - rest_of_epoch)
    return StepPlan(per_epoch, train.max_steps, epoch + 1 + math.ceil(left / per_epoch))
