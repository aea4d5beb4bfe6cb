"""finetune_bert: the tiny config on 1 process and on 2 (cpu_ddp, ZeRO-1 sharded 8-bit), DeepSpeed
ZeRO-2, resume, and the outputs a user relies on (metrics.json, curves.png, config.yaml, the model)."""

from __future__ import annotations

import math

import pytest
import yaml

from ..helpers import ensure_assets, metrics, recipe_cmd, run

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


@pytest.mark.slow
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

    from ..helpers import ACCELERATE, free_port

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


def _check_offloaded_8bit_checkpoint(out):
    """DeepSpeed's per-rank optimizer files hold shardwise's 8-bit codes: the client optimizer ran
    under ZeRO-Offload (accelerate did not swap in DeepSpeedCPUAdam, whose state is fp32)."""
    import torch

    files = sorted((out / "checkpoints" / "step_0000008").rglob("*optim_states.pt"))
    assert len(files) == 2, files  # one per rank
    for f in files:
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        dtypes = [s["exp_avg"].dtype for s in sd["base_optimizer_state"]["state"].values()]
        assert torch.int8 in dtypes, dtypes  # the decay group (weights); the small no-decay one: fp32


# (accelerate config, recipe overrides): also read by test_configs.py's every-config check
DEEPSPEED_CONFIGS = [
    ("deepspeed_zero2.yaml", []),
    ("deepspeed_zero3.yaml", []),
    ("deepspeed_zero2_offload.yaml", ["optimizer.state_bits=8"]),  # ZeRO-Offload, 8-bit state on the CPU
]


@pytest.mark.slow
@pytest.mark.parametrize("ds_config, overrides", DEEPSPEED_CONFIGS, ids=[c for c, _ in DEEPSPEED_CONFIGS])
def test_tiny_deepspeed(tmp_path, ds_config, overrides):
    out = tmp_path / "run"
    cmd = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={out}",
        *FAST,
        *overrides,
        accelerate_config=ds_config,
    )
    proc = run(cmd, timeout=900)  # the first DeepSpeed run JIT-builds a comm op (~2 min, cached)
    assert "DEEPSPEED x2" in proc.stdout
    _check_outputs(out, 8)
    if "offload" in ds_config:
        _check_offloaded_8bit_checkpoint(out)
    from transformers import AutoModelForSequenceClassification

    # ZeRO-3 partitions the weights: save_pretrained must still get the full, gathered tensors
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.bert.embeddings.word_embeddings.weight.shape == (30522, 32)


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """Resumed from the step-4 (an epoch boundary) and step-6 (mid-epoch) checkpoints, with dropout on
    and 8-bit optimizer state, a run repeats the uninterrupted run's losses and learning rates exactly:
    model, optimizer, schedule, RNG states and data order all continue."""
    full = tmp_path / "full"
    common = [
        "data.max_train_samples=64",  # 4 updates per epoch
        "train.checkpoint_every=2",
        "train.keep_last=4",
        "train.log_every=1",
        "train.eval_every=4",
        "optimizer.state_bits=8",
        *FAST,
    ]
    proc = run(recipe_cmd("finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={full}", *common))
    assert "epochs)" in proc.stdout and "(4/epoch, 2 epochs)" in proc.stdout
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000002", "step_0000004", "step_0000006", "step_0000008"]
    model_cfg = yaml.safe_load((full / "config.yaml").read_text())["model"]["config_overrides"]
    assert "hidden_dropout_prob" not in model_cfg  # MiniLM's dropout (0.1) is on

    a = {r["step"]: r for r in metrics(full)["history"] if "train/loss" in r}
    for start in (4, 6):
        resumed = tmp_path / f"from_{start}"
        ckpt = full / "checkpoints" / f"step_{start:07d}"
        overrides = [f"train.output_dir={resumed}", f"train.resume_from_checkpoint={ckpt}"]
        proc = run(recipe_cmd("finetune_bert.py", "bert_tiny.yaml", *overrides, *common))
        assert f"at step {start}" in proc.stdout
        b = {r["step"]: r for r in metrics(resumed)["history"] if "train/loss" in r}
        assert sorted(b) == list(range(1, 9))  # the steps before the checkpoint travel with it
        assert [(b[s]["train/loss"], b[s]["train/lr"]) for s in b] == [
            (a[s]["train/loss"], a[s]["train/lr"]) for s in b
        ]
        # metrics.json (and curves.png, drawn from it) continue the history: the same records
        assert metrics(resumed)["history"] == metrics(full)["history"]
        assert (resumed / "curves.png").is_file()
        assert metrics(resumed)["final"]["steps"] == 8


@pytest.mark.slow
def test_bad_override_fails_with_key_and_hint(tmp_path):
    import subprocess
    import sys

    from ..helpers import ROOT

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
    """accelerate ignores its FSDP plugin on CPU (it would silently run DDP): the recipe refuses, in one
    line, before the process group starts."""
    import subprocess
    import sys

    from ..helpers import ROOT

    cmd = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={tmp_path}",
        *FAST,
        accelerate_config="fsdp2.yaml",
    )
    cmd[cmd.index("--config_file") + 2 : cmd.index("--config_file") + 2] = ["--num_processes", "2"]
    assert "--main_process_port" in cmd and cmd[1] == "launch"
    cmd[:2] = [sys.executable, "-m", "shardwise.launch"]  # one error line, exit 2 (not one per rank)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = [ln for ln in output.splitlines() if "error: " in ln]
    assert len(errors) == 1 and "silently falls back to DDP" in errors[0], output[-3000:]
    assert "Traceback" not in output, output[-3000:]
