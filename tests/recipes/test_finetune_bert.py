"""finetune_bert: the tiny config on 1 process and on 2 (cpu_ddp, ZeRO-1 sharded 8-bit), DeepSpeed
ZeRO-2, resume, and the outputs a user relies on (metrics.json, curves.png, config.yaml, the model)."""

from __future__ import annotations

import math

import pytest
import yaml

from ._run import ensure_assets, metrics, recipe_cmd, run

FAST = ["train.report_to=[]", "train.progress=false"]


@pytest.fixture(scope="module", autouse=True)
def _assets():
    ensure_assets("minilm", "reuters-r8")


def _check_outputs(out, steps):
    m = metrics(out)
    final = m["final"]
    assert final["steps"] == steps
    assert 0.0 <= final["eval/accuracy"] <= 1.0 and 0.0 <= final["eval/macro_f1"] <= 1.0
    losses = [r["train/loss"] for r in m["history"] if "train/loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert (out / "curves.png").stat().st_size > 1000
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == steps
    return m


def test_tiny_one_process(tmp_path):
    out = tmp_path / "run"
    proc = run(
        recipe_cmd("finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={out}", "train.report_to=[]")
    )
    _check_outputs(out, 8)
    assert "final metrics" in proc.stdout and "curves.png" in proc.stdout
    # the saved model loads for inference
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model(**tok(["oil prices rose"], return_tensors="pt")).logits.shape == (1, 8)
    assert model.config.id2label[2] == "earn"


@pytest.mark.slow
def test_tiny_two_processes_sharded_8bit(tmp_path):
    """Through launch/local.sh, as a user would: recipe, recipe config, accelerate config, overrides."""
    import sys

    from ._run import ACCELERATE, free_port

    out = tmp_path / "run"
    cmd = [
        "launch/local.sh",
        "recipes/finetune_bert.py",
        "configs/recipes/bert_tiny.yaml",
        "configs/accelerate/cpu_ddp.yaml",
        f"train.output_dir={out}",
        "optimizer.shard=true",
        "optimizer.state_bits=8",
        *FAST,
    ]
    env = {"PYTHON": sys.executable, "ACCELERATE": str(ACCELERATE), "MAIN_PROCESS_PORT": str(free_port())}
    proc = run(cmd, env=env)
    assert "MULTI_CPU x2" in proc.stdout and "state_bits=8, shard=True" in proc.stdout
    _check_outputs(out, 8)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_tiny_deepspeed(tmp_path, ds_config):
    out = tmp_path / "run"
    cmd = recipe_cmd(
        "finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={out}", *FAST, accelerate_config=ds_config
    )
    proc = run(cmd, timeout=900)  # the first DeepSpeed run JIT-builds a comm op (~2 min, cached)
    assert "DEEPSPEED x2" in proc.stdout
    _check_outputs(out, 8)
    from transformers import AutoModelForSequenceClassification

    # ZeRO-3 partitions the weights: save_pretrained must still get the full, gathered tensors
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.bert.embeddings.word_embeddings.weight.shape == (30522, 32)


def test_resume_continues_steps_and_schedule(tmp_path):
    """Stop-and-resume from the step-4 checkpoint reproduces the uninterrupted run's steps 5..8."""
    full = tmp_path / "full"
    # Dropout off: creating the data-loader iterator after load_state draws one number from the global
    # RNG, which shifts dropout masks (not the data order, the schedule or the step count under test).
    common = [
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.eval_every=8",
        "model.config_overrides.hidden_dropout_prob=0.0",
        "model.config_overrides.attention_probs_dropout_prob=0.0",
        *FAST,
    ]
    run(recipe_cmd("finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={full}", *common))
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["step_0000004", "step_0000008"]

    resumed = tmp_path / "resumed"
    ckpt = full / "checkpoints" / "step_0000004"
    proc = run(
        recipe_cmd(
            "finetune_bert.py",
            "bert_tiny.yaml",
            f"train.output_dir={resumed}",
            f"train.resume_from_checkpoint={ckpt}",
            *common,
        )
    )
    assert "at step 4" in proc.stdout
    a = {r["step"]: r for r in metrics(full)["history"] if "train/loss" in r}
    b = {r["step"]: r for r in metrics(resumed)["history"] if "train/loss" in r}
    assert sorted(b) == [5, 6, 7, 8]
    for s in b:
        assert b[s]["train/lr"] == pytest.approx(a[s]["train/lr"], rel=1e-6)
        assert b[s]["train/loss"] == pytest.approx(a[s]["train/loss"], rel=1e-4, abs=1e-5)
    assert metrics(resumed)["final"]["steps"] == 8


def test_bad_override_fails_with_key_and_hint(tmp_path):
    import subprocess
    import sys

    from ._run import ROOT

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes/finetune_bert.py"),
            "--config",
            "configs/recipes/bert_tiny.yaml",
            "optimizer.lrr=1e-3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "optimizer.lrr" in proc.stderr and "did you mean 'lr'" in proc.stderr


@pytest.mark.slow
def test_fsdp_on_cpu_fails_loudly(tmp_path):
    """accelerate ignores its FSDP plugin on CPU (it would silently run DDP): the recipe refuses."""
    import subprocess

    from ._run import ROOT

    cmd = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={tmp_path}",
        *FAST,
        accelerate_config="fsdp2.yaml",
    )
    cmd[cmd.index("--config_file") + 2 : cmd.index("--config_file") + 2] = ["--num_processes", "2"]
    assert "--main_process_port" in cmd
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "silently falls back to DDP" in proc.stdout + proc.stderr
