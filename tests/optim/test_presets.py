"""Presets: values from the cheat sheet, schedules from transformers, clear errors."""

from __future__ import annotations

import pytest
import torch

from shardwise.optim import PRESETS, Adam, AdamW, get_preset, optimizer_and_scheduler


def test_cheat_sheet_values():
    expect = {
        "vision": (AdamW, 1e-3, (0.9, 0.999), 0.01, "cosine"),
        "transformer": (AdamW, 5e-5, (0.9, 0.98), 0.01, "linear"),
        "finetune": (AdamW, 1e-5, (0.9, 0.999), 0.01, "linear"),
        "gan-generator": (Adam, 1e-4, (0.5, 0.999), 0.0, "constant"),
        "gan-discriminator": (Adam, 2e-4, (0.5, 0.999), 0.0, "constant"),
        "llm": (AdamW, 3e-4, (0.9, 0.95), 0.1, "cosine_with_min_lr"),
        "rnn": (Adam, 1e-3, (0.9, 0.995), 0.0, "constant"),
        "sparse": (Adam, 1e-3, (0.9, 0.95), 0.0, "constant"),
    }
    assert set(PRESETS) == set(expect)
    for name, (cls, lr, betas, wd, schedule) in expect.items():
        p = get_preset(name)
        assert (p.optimizer_class, p.lr, p.betas, p.weight_decay, p.schedule) == (
            cls,
            lr,
            betas,
            wd,
            schedule,
        )


def test_unknown_preset_suggests_closest():
    with pytest.raises(ValueError, match=r"Unknown preset: 'finetuen'\. Did you mean 'finetune'\?"):
        get_preset("finetuen")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_steps(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    opt, sched = optimizer_and_scheduler(name, model, num_training_steps=100)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    # Decay only on the two weight matrices; biases and the LayerNorm gain go undecayed.
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    if get_preset(name).weight_decay > 0:
        assert sum(len(g["params"]) for g in decayed) == 2


def test_linear_warmup_then_decay_shape():
    p = [torch.zeros(1, requires_grad=True)]
    opt, sched = optimizer_and_scheduler("finetune", p, num_training_steps=100)  # 10% warmup
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1e-5) and lrs[99] < 1e-6
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))


def test_llm_cosine_floors_at_ten_percent():
    p = [torch.zeros(1, requires_grad=True)]
    opt, sched = optimizer_and_scheduler("llm", p, num_training_steps=200)
    for _ in range(200):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-5, rel=1e-3)


def test_overrides_reach_optimizer_and_schedule():
    p = [torch.zeros(1, requires_grad=True)]
    opt, _ = optimizer_and_scheduler(
        "vision", p, 10, schedule="constant_with_warmup", warmup_steps=2, lr=0.5, variant="radam"
    )
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[0]["variant"] == "radam"
    assert opt.defaults["lr"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_training_steps=0), "Invalid num_training_steps: 0"),
        (dict(num_training_steps=10, warmup_steps=10), "Invalid warmup_steps: 10"),
        (dict(num_training_steps=10, warmup_ratio=1.5), "Invalid warmup_ratio: 1.5"),
    ],
)
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optimizer_and_scheduler("finetune", [torch.zeros(1, requires_grad=True)], **kwargs)
