"""The token-mean loss through the real loop (``run_training(count_targets=...)``): one optimizer step
over 8 conversations gives the same update however they are split into micro-batches and processes.

Plain SGD with lr 1 makes the update the (negated) gradient, so the test sees the loss normalization
directly (Adam's first step is nearly sign(g) and would hide it). The 8 rows have very different
numbers of target tokens, so a mean of micro-batch means is visibly different (the control).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shardwise.data.chat import PaddedChatCollator
from shardwise.train.loop import run_training
from shardwise.train.losses import batch_token_loss, count_target_tokens
from shardwise.train.metrics import Metrics
from shardwise.train.plan import plan_steps
from shardwise.train.sections import TrainConfig

from .._dist import run_workers

VOCAB = 23


class TinyLM(torch.nn.Module):
    """Embedding -> linear head: enough for a next-token loss with a gradient in every parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids))))


def rows() -> list[dict]:
    """8 conversations of 3..24 tokens; targets on 1 token in the shortest, on all but 1 in the longest."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, length in enumerate((24, 3, 17, 5, 9, 21, 4, 12)):
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        first_target = 1 if i % 2 == 0 else length - 2
        out.append({"input_ids": ids, "labels": [-100] * first_target + ids[first_target:]})
    return out


def micro_batch_mean(model, batch):
    loss_sum, n = batch_token_loss(model, batch)
    return loss_sum / n


def one_step(batch_size: int, grad_accum: int, out: str, token_mean: bool = True) -> list[torch.Tensor]:
    """The parameters' change after one optimizer step over all 8 rows (this process's part of them)."""
    from accelerate.state import AcceleratorState, GradientState

    from shardwise.train.accel import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train = TrainConfig(
        batch_size=batch_size,
        grad_accum_steps=grad_accum,
        max_steps=1,
        max_grad_norm=None,
        report_to=[],
        progress=False,
        output_dir=out,
    )
    accelerator = make_accelerator(train, out)
    model = TinyLM()
    before = [p.detach().clone() for p in model.parameters()]
    dl = torch.utils.data.DataLoader(rows(), batch_size, collate_fn=PaddedChatCollator(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    plan = plan_steps(-(-len(dl) // accelerator.num_processes), train)
    model, optimizer, dl, scheduler = accelerator.prepare(model, optimizer, dl, scheduler)
    if token_mean:
        hooks = {"loss_fn": batch_token_loss, "count_targets": lambda b: count_target_tokens(b["labels"])}
    else:  # the control: each micro-batch's own token mean, averaged over micro-batches
        hooks = {"loss_fn": micro_batch_mean}
    metrics = Metrics(accelerator)
    run_training(
        accelerator,
        model,
        dl,
        optimizer,
        scheduler,
        plan,
        train,
        evaluate=dict,
        metrics=metrics,
        output_dir=Path(out),
        **hooks,
    )
    loss = metrics.last("train/")["train/loss"]
    return [loss] + [
        (p.detach() - b).tolist() for p, b in zip(accelerator.unwrap_model(model).parameters(), before)
    ]


def reference() -> tuple[float, list[torch.Tensor]]:
    """The same step computed by hand: mean of per-token losses over all 8 rows' targets."""
    model = TinyLM()
    batch = PaddedChatCollator(0)(rows())
    s, n = batch_token_loss(model, batch)
    (s / n).backward()
    return (s / n).item(), [-p.grad for p in model.parameters()]


def _close(update, ref, **tol) -> bool:
    return all(torch.allclose(torch.tensor(a), b, **tol) for a, b in zip(update[1:], ref, strict=True))


def test_accumulation_splits_give_the_same_update(tmp_path):
    loss, ref = reference()
    for batch_size, accum in ((8, 1), (2, 4), (1, 8), (3, 3)):  # 3 x 3: micro-batches of 3, 3 and 2 rows
        update = one_step(batch_size, accum, str(tmp_path / f"{batch_size}x{accum}"))
        assert update[0] == pytest.approx(loss, rel=1e-5), (batch_size, accum)
        assert _close(update, ref, rtol=1e-5, atol=1e-6), (batch_size, accum)
    # control: a mean of micro-batch means is another update, so the comparison above has teeth
    update = one_step(2, 4, str(tmp_path / "means"), token_mean=False)
    assert not _close(update, ref, rtol=1e-3, atol=1e-5)


def _two_process_step(rank: int, world: int, tmp: str) -> None:
    update = one_step(2, 2, tmp)  # 2 processes x 2 micro-batches x 2 rows = the 8 rows once
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(update))


@pytest.mark.slow
def test_two_processes_same_update_as_one(tmp_path):
    """cpu_ddp-like: 2 processes with different target counts; the token mean is over both."""
    run_workers(_two_process_step, str(tmp_path), timeout=300)
    loss, ref = reference()
    for rank in range(2):
        update = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert update[0] == pytest.approx(loss, rel=1e-5)
        assert _close(update, ref, rtol=1e-5, atol=1e-6)
