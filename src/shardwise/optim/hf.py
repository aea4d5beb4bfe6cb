"""Hugging Face ``Trainer`` integration for sharded optimizer state (``shard=True``).

``Trainer`` saves the optimizer with ``torch.save(optimizer.state_dict(), ...)`` on the main
process only, and resumes by loading that file on every rank. shardwise's ZeRO-1 state lives in
pieces across ranks, so building the full state is a collective: called by rank 0 alone it would
hang. :class:`ShardwiseTrainerCallback` gathers the state on every rank at the moment ``Trainer``
has decided to save (its ``on_step_end`` / ``on_epoch_end`` / ``on_evaluate`` run on all ranks,
after ``Trainer`` sets ``control.should_save`` and before it writes the checkpoint); rank 0's
``state_dict()`` then returns it without communication. The checkpoint is the ordinary
``optimizer.pt`` of an unsharded optimizer: it resumes on any number of ranks, with or without
``shard=True``, and loads into ``torch.optim.AdamW``.

    trainer = Trainer(model, args, optimizers=(AdamW(model.parameters(), shard=True), None),
                      callbacks=[ShardwiseTrainerCallback()], ...)

Without the callback, the save fails at once with a message naming it (never a hang). The callback
does nothing for unsharded optimizers, so it is safe to add always.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


def _shardwise_optimizer(optimizer: Any):
    """The shardwise optimizer inside accelerate's / Trainer's wrappers, or None."""
    for _ in range(4):
        if optimizer is None or hasattr(optimizer, "prepare_state_dict"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class ShardwiseTrainerCallback(TrainerCallback):
    """Gathers ``shard=True`` optimizer state on every rank before each ``Trainer`` save."""

    def _prepare(self, optimizer: Any) -> None:
        opt = _shardwise_optimizer(optimizer)
        if opt is not None:
            opt.prepare_state_dict()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if control.should_save:
            self._prepare(optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        if control.should_save:
            self._prepare(optimizer)

    def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
        # save_strategy="best" decides to save after evaluation, once callbacks have run.
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
            self._prepare(optimizer)
