"""shardwise.train: step plan, checkpoint rotation / lookup, metrics files, plots, config flattening."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from shardwise.train.checkpoint import find_checkpoint, list_checkpoints
from shardwise.train.metrics import Metrics, curve_panels, flat_config, format_table, plot_curves
from shardwise.train.plan import plan_steps
from shardwise.train.sections import OptimizerConfig, TrainConfig


def test_plan_steps_epochs_accumulation_and_max_steps():
    plan = plan_steps(10, TrainConfig(epochs=3, grad_accum_steps=4))
    assert (plan.updates_per_epoch, plan.total_steps, plan.epochs) == (3, 9, 3)  # ceil(10 / 4) = 3
    assert plan.position(4, 4) == (1, 4)  # resume after 4 updates: epoch 1, skip 1 window of 4
    plan = plan_steps(10, TrainConfig(epochs=1, max_steps=25))
    assert (plan.total_steps, plan.epochs) == (25, 3)
    with pytest.raises(ValueError, match="empty"):
        plan_steps(0, TrainConfig())


def test_checkpoint_listing_and_lookup(tmp_path):
    for step, complete in ((2, True), (10, True), (4, True), (12, False)):
        d = tmp_path / "checkpoints" / f"step_{step:07d}"
        d.mkdir(parents=True)
        if complete:
            (d / "progress.json").write_text(json.dumps({"step": step}))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000004", "step_0000010"]
    assert find_checkpoint(tmp_path, "latest").name == "step_0000010"  # the half-written one is ignored
    assert find_checkpoint(tmp_path, str(tmp_path / "checkpoints/step_0000004")).name == "step_0000004"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoints/step_0000012"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint") as err:
        find_checkpoint(tmp_path / "empty", "latest")
    assert "checkpoint_every" in err.value.hint


def test_metrics_json_plot_and_table(tmp_path):
    acc = SimpleNamespace(trackers=[], is_main_process=True)
    m = Metrics(acc)
    for step in range(1, 6):
        m.log(step, {"train/loss": 2.0 / step, "train/lr": 1e-3})
    m.log(5, {"eval/accuracy": 0.9, "eval/loss": 0.3})
    assert m.last("eval/") == {"eval/accuracy": 0.9, "eval/loss": 0.3}
    path = m.write(tmp_path, {"eval/accuracy": 0.9})
    data = json.loads(path.read_text())
    assert data["final"]["eval/accuracy"] == 0.9 and len(data["history"]) == 6
    png = plot_curves(m.history, tmp_path / "curves.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert curve_panels(m.history) == [["train/loss", "eval/loss"], ["train/lr"], ["eval/accuracy"]]
    table = format_table({"eval/accuracy": 0.91234, "steps": 5})
    assert "| eval/accuracy | 0.9123 |" in table and "steps" in table


def test_flat_config_is_scalar():
    from dataclasses import dataclass, field

    @dataclass
    class C:
        optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
        train: TrainConfig = field(default_factory=TrainConfig)

    flat = flat_config(C())
    assert flat["optimizer.preset"] == "finetune" and flat["train.report_to"] == "['tensorboard']"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_skipped_steps_panel_only_when_a_step_was_skipped():
    history = [{"step": s, "train/loss": 1.0, "train/lr": 0.1, "train/epoch": 0, "train/skipped_steps": 0}
               for s in (1, 2)]  # fmt: skip
    assert curve_panels(history) == [["train/loss"], ["train/lr"]]
    history[1]["train/skipped_steps"] = 1
    assert curve_panels(history)[-1] == ["train/skipped_steps"]


def test_check_fsdp_engaged_flags_an_ignored_fsdp_plugin(monkeypatch):
    from accelerate.utils import DistributedType

    from shardwise.train.accel import check_fsdp_engaged

    fake = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=None), distributed_type=DistributedType.MULTI_CPU
    )
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_fsdp_engaged(fake)  # nothing asked
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="falls back to DDP"):
        check_fsdp_engaged(fake)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    fake.state.fsdp_plugin = object()  # asked in code: Accelerator(fsdp_plugin=...)
    with pytest.raises(RuntimeError, match="fully_shard"):
        check_fsdp_engaged(fake)
    fake.distributed_type = DistributedType.FSDP
    check_fsdp_engaged(fake)  # really running FSDP


def test_shard_under_deepspeed_is_a_config_error(monkeypatch):
    """DeepSpeed ZeRO partitions the state itself: a second ZeRO-1 on top is refused before training."""
    import torch

    from shardwise.errors import ConfigError
    from shardwise.train.optimizer import build_optimizer

    model = torch.nn.Linear(4, 4)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="optimizer.shard=true under DeepSpeed"):
        build_optimizer(model, OptimizerConfig(shard=True), total_steps=10)
    build_optimizer(model, OptimizerConfig(shard=False), total_steps=10)  # DeepSpeed's own ZeRO: fine


def test_configure_deepspeed_keeps_the_recipe_optimizer_under_offload():
    """ZeRO-Offload without zero_force_ds_cpu_optimizer=false: accelerate silently swaps the recipe's
    optimizer for DeepSpeedCPUAdam; configure_deepspeed sets the key, and refuses an explicit true."""
    from accelerate.utils import DistributedType

    from shardwise.errors import ConfigError
    from shardwise.train.accel import configure_deepspeed

    def fake(ds: dict):
        plugin = SimpleNamespace(deepspeed_config=ds)
        return SimpleNamespace(
            distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
        )

    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    ds = {**offload, "gradient_clipping": "auto"}
    configure_deepspeed(fake(ds), TrainConfig(max_grad_norm=0.5))
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["gradient_clipping"] == 0.5
    no_offload = {"zero_optimization": {"stage": 2}}
    configure_deepspeed(fake(no_offload), TrainConfig())
    assert "zero_force_ds_cpu_optimizer" not in no_offload  # nothing to swap without offload
    with pytest.raises(ConfigError, match="zero_force_ds_cpu_optimizer"):
        configure_deepspeed(fake({**offload, "zero_force_ds_cpu_optimizer": True}), TrainConfig())
