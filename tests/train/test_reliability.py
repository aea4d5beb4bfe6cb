"""Reliability of the training loop, in one process: the divergence guard, atomic checkpoints, the
output-folder guard, and the clean errors (config, optimizer) the recipes turn into `error:` lines."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardwise.configfile import ConfigError, from_dict
from shardwise.errors import CheckpointError, DivergenceError
from shardwise.train.accel import make_accelerator
from shardwise.train.checkpoint import (
    check_output_dir,
    checkpoint_problem,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_latest,
    save_checkpoint,
)
from shardwise.train.optimizer import build_optimizer
from shardwise.train.plan import plan_steps
from shardwise.train.sections import OptimizerConfig, TrainConfig
from shardwise.train.update import optimizer_steps


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _setup(tmp_path, state_bits=32, **train_kw):
    train = TrainConfig(report_to=[], progress=False, batch_size=8, **train_kw)
    acc = make_accelerator(train, str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.1), nn.Linear(16, 3))
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    dl = DataLoader(data, batch_size=train.batch_size, shuffle=True)
    plan = plan_steps(len(dl), train)
    opt, sched = build_optimizer(model, OptimizerConfig(lr=1e-2, state_bits=state_bits), plan.total_steps)
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    return acc, model, opt, dl, sched, plan, train


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in opt.optimizer.state.values()]
    return params, state


def _same(a, b):
    pa, sa = a
    pb, sb = b
    if len(sa) != len(sb):  # the first step creates the state
        return False
    return all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True)) and all(
        torch.equal(x[k], y[k]) for x, y in zip(sa, sb, strict=True) for k in x
    )


# ----------------------------------------------------------------------------------------------------
# divergence guard


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("poison", ["nan", "inf_loss_finite_grads"])
def test_nonfinite_updates_are_skipped_then_divergence_stops(tmp_path, state_bits, poison):
    """Steps 3, 4 are bad, 5 good, then 6, 7, 8 bad: 3 and 4 are skipped (parameters and 8-bit state
    bit-identical), 5 resets the streak, and the third bad one in a row (8) raises with the remedies."""
    acc, model, opt, dl, sched, plan, train = _setup(tmp_path, state_bits, max_consecutive_skips=3, epochs=2)
    bad_steps = {3, 4, 6, 7, 8}
    calls = {"step": 1}

    def loss_fn(m, batch):
        loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        if calls["step"] in bad_steps:
            # an overflow in the loss; the second form has finite gradients: only the loss shows it
            loss = loss * float("nan") if poison == "nan" else loss + float("inf")
        return loss

    seen, before = [], _snapshot(model, opt)
    with pytest.raises(DivergenceError) as err:
        updates = optimizer_steps(acc, model, dl, opt, sched, plan, train, loss_fn=loss_fn)
        for step, _, loss, skipped in updates:
            after = _snapshot(model, opt)
            seen.append((step, skipped))
            assert _same(before, after) == skipped, step  # skipped <=> nothing changed
            assert skipped or math.isfinite(loss.item())
            before, calls["step"] = after, step + 1
    assert seen == [(1, False), (2, False), (3, True), (4, True), (5, False), (6, True), (7, True)]
    msg, hint = str(err.value), err.value.hint
    assert "diverged" in msg and "6..8" in msg and "step 5" in msg
    for remedy in ("lower the learning rate", "train.max_grad_norm", "amsgrad", "normalization"):
        assert remedy in hint
    assert opt.optimizer.skipped_steps == 5
    assert _same(before, _snapshot(model, opt))  # step 8 changed nothing either


# ----------------------------------------------------------------------------------------------------
# atomic checkpoints


def test_checkpoints_atomic_latest_rotation_and_validation(tmp_path, capsys):
    acc, *_ = _setup(tmp_path)
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        path = save_checkpoint(acc, tmp_path, step, keep_last=2, meta={"skipped_steps": 0})
        assert path.name == f"step_{step:07d}" and read_latest(tmp_path) == path
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]
    progress = json.loads((root / "step_0000005" / "progress.json").read_text())
    assert progress["step"] == 5 and "model.safetensors" in progress["files"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004", "step_0000005"]

    # a crash mid-save leaves .tmp-*/.trash-* folders: ignored by lookups, removed by the next save
    (root / ".tmp-step_0000006").mkdir()
    (root / ".trash-step_0000003").mkdir()
    assert find_checkpoint(tmp_path, "latest").name == "step_0000005"
    save_checkpoint(acc, tmp_path, 6, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000005", "step_0000006"]

    # a damaged file (size differs from the manifest): detected; "latest" falls back and says so
    weights = root / "step_0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "model.safetensors" in checkpoint_problem(root / "step_0000006")
    assert find_checkpoint(tmp_path, "latest").name == "step_0000005"
    assert "using the newest complete checkpoint, step_0000005" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        find_checkpoint(tmp_path, str(root / "step_0000006"))

    # saving an earlier step again (resumed from an older checkpoint): the new one is never rotated out
    save_checkpoint(acc, tmp_path, 2, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002"]
    assert read_latest(tmp_path).name == "step_0000002"
    assert load_checkpoint(acc, find_checkpoint(tmp_path, "latest")) == 2


def test_output_dir_guard(tmp_path):
    out = tmp_path / "run"
    check_output_dir(out, resume=None, overwrite=False, is_main=True)  # nothing there: fine
    (out / "checkpoints" / "step_0000004").mkdir(parents=True)
    (out / "checkpoints" / "step_0000004" / "progress.json").write_text('{"step": 4}')
    with pytest.raises(CheckpointError, match="already holds another run's checkpoints") as err:
        check_output_dir(out, resume=None, overwrite=False, is_main=True)
    assert "resume_from_checkpoint=latest" in err.value.hint and "overwrite=true" in err.value.hint
    assert (out / "checkpoints" / "step_0000004").is_dir()  # nothing touched
    check_output_dir(out, resume="latest", overwrite=False, is_main=True)
    assert (out / "checkpoints" / "step_0000004").is_dir()
    check_output_dir(out, resume=None, overwrite=True, is_main=True)
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------
# clean config errors for values only known once the run is planned


def test_invalid_values_are_config_errors(tmp_path):
    for data, pattern in [
        ({"lr": -1e-3}, "lr must be a finite number > 0"),
        ({"lr": "nan"}, "lr must be a finite number > 0"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            from_dict(OptimizerConfig, data)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        from_dict(TrainConfig, {"batch_size": 0})
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"warmup_steps=10 is not below the run's 8") as err:
        build_optimizer(model, OptimizerConfig(warmup_steps=10), 8)
    assert "train longer" in err.value.hint
    with pytest.raises(ConfigError, match=r"optimizer: .*beta"):
        build_optimizer(model, OptimizerConfig(betas=(1.5, 0.9)), 8)


# ----------------------------------------------------------------------------------------------------
# run_training: the loss hook, extra evaluations, the history and clock in its checkpoints


def test_run_training_loss_hook_extra_evals_and_resume_state(tmp_path):
    from shardwise.train.checkpoint import resume_point
    from shardwise.train.loop import read_history, resume, run_training
    from shardwise.train.metrics import Metrics

    acc, model, opt, dl, sched, plan, train = _setup(tmp_path, max_steps=6, checkpoint_every=3, log_every=1)
    assert plan.updates_per_epoch == 8  # eval_every defaults to the epoch: only the extra ones fire
    losses_seen, evals = [], []

    def loss_fn(m, batch):
        losses_seen.append(1)
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    def evaluate():
        evals.append(1)
        return {"eval/loss": 1.0 / len(evals)}

    metrics = Metrics(acc)
    result = run_training(
        acc, model, dl, opt, sched, plan, train, evaluate=evaluate, metrics=metrics, output_dir=tmp_path,
        loss_fn=loss_fn, eval_at_steps={0, 2},
    )  # fmt: skip
    assert result.steps == 6 and len(losses_seen) == 6
    assert [h["step"] for h in metrics.history if "eval/loss" in h] == [0, 2, 6]  # baseline, extra, final
    assert metrics.history[0] == {"step": 0, "eval/loss": 1.0}  # before any update
    ckpt = tmp_path / "checkpoints" / "step_0000006"
    assert [h["step"] for h in read_history(ckpt) if "eval/loss" in h] == [
        0,
        2,
    ]  # saved before the final eval
    start = resume_point(tmp_path, "latest")
    assert (start.path, start.step, start.skipped_steps) == (ckpt, 6, 0)
    assert 0 < start.train_seconds <= result.train_seconds
    resumed_metrics = Metrics(acc)
    resume(acc, start, resumed_metrics)  # loads the state and continues the curves
    assert resumed_metrics.history == read_history(ckpt)
