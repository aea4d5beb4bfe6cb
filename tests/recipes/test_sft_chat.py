"""sft_chat: the tiny config end to end on 1 and 2 processes (and under each accelerate config that runs
on CPU), LoRA with an adapter / merged-model round trip, exact resume, and bad input (one `error:` line,
exit 2)."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from ..helpers import ROOT, ensure_assets, metrics, recipe_cmd, run

FAST = ["train.report_to=[]", "train.progress=false"]
TINY = "sft_tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def _assets():
    ensure_assets("smollm2", "chitchat")


def _check(out, steps: int = 8, train_loss_falls: bool = True, replies: bool = True) -> dict:
    m = metrics(out)
    final = m["final"]
    assert final["steps"] == steps and final["skipped_steps"] == 0
    assert math.isclose(final["eval/perplexity"], math.exp(final["eval/loss"]), rel_tol=1e-6)
    evals = [r for r in m["history"] if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == steps  # the curve starts at the baseline
    assert final["eval/loss"] < final["eval/loss_before"], final  # held-out assistant tokens, learned
    losses = [r["train/loss"] for r in m["history"] if "train/loss" in r]
    assert losses[-1] < losses[0] or not train_loss_falls, losses
    assert final["train/tokens_per_s"] > 0 and final["peak_memory_mib"] > 0
    samples = (out / "samples.md").read_text()
    assert "## User: Hi! How are you doing today?" in samples
    if replies:  # (not under ZeRO-3, whose weights are split over the ranks)
        assert "**before (step 0)**" in samples and f"**after (step {steps})**" in samples
    return m


@pytest.mark.slow
def test_tiny_one_process(tmp_path):
    out = tmp_path / "run"
    proc = run(recipe_cmd("sft_chat.py", TINY, f"train.output_dir={out}"))
    _check(out)
    assert "--- user: Hi! How are you doing today?" in proc.stdout
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard events were not written"


@pytest.mark.slow
def test_tiny_two_processes_sharded_8bit(tmp_path):
    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", "optimizer.shard=true", "optimizer.state_bits=8", *FAST]
    proc = run(recipe_cmd("sft_chat.py", TINY, *overrides, accelerate_config="cpu_ddp.yaml"))
    assert "MULTI_CPU x2" in proc.stdout and "state_bits=8, shard=True" in proc.stdout
    _check(out)


# the shipped accelerate configs that run on a CPU machine besides cpu_ddp (test_configs.py checks
# that every other one is GPU- or cluster-only, and why)
ACCELERATE_CONFIGS = [
    ("single_gpu.yaml", [], "NO x1"),  # one process; no GPU: the recipe runs on the CPU
    ("multi_gpu.yaml", ["--num_processes", "2"], "MULTI_CPU x2"),  # DDP over gloo
    ("deepspeed_zero1.yaml", [], "DEEPSPEED x2"),
    ("deepspeed_zero2.yaml", [], "DEEPSPEED x2"),
    ("deepspeed_zero3.yaml", [], "DEEPSPEED x2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config, extra, engine", ACCELERATE_CONFIGS)
def test_tiny_under_accelerate_configs(tmp_path, accelerate_config, extra, engine):
    """Every shipped accelerate config that can run on a CPU machine runs this recipe (the others are
    checked in test_configs.py::test_every_accelerate_config_is_exercised)."""
    out = tmp_path / "run"
    cmd = recipe_cmd(
        "sft_chat.py", TINY, f"train.output_dir={out}", *FAST, accelerate_config=accelerate_config
    )
    at = cmd.index("--config_file") + 2
    cmd[at:at] = extra
    proc = run(cmd, timeout=900)  # the first DeepSpeed run JIT-builds a comm op (~2 min, cached)
    assert f"== sft_chat: {engine}" in proc.stdout
    _check(out, replies=accelerate_config != "deepspeed_zero3.yaml")


@pytest.mark.slow
def test_fsdp_on_cpu_fails_loudly(tmp_path):
    """accelerate ignores its FSDP plugin on CPU (it would silently run DDP): the recipe refuses."""
    cmd = recipe_cmd(
        "sft_chat.py", TINY, f"train.output_dir={tmp_path}", *FAST, accelerate_config="fsdp2.yaml"
    )
    at = cmd.index("--config_file") + 2
    cmd[at:at] = ["--num_processes", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "silently falls back to DDP" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------
# LoRA


def _tiny_base(path):
    """A saved tiny random Llama with SmolLM2's tokenizer: a base that an adapter can be reloaded onto."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(
        ensure_assets("smollm2") / "models" / "SmolLM2-135M-Instruct"
    ).save_pretrained(path)
    return path


@pytest.mark.slow
def test_lora_adapter_and_merged_round_trip(tmp_path):
    """LoRA on a saved base: the optimizer sees the adapters only; the adapter reloads onto the base with
    peft, the merged model with transformers alone, and both give the same logits (not the base's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _tiny_base(tmp_path / "base")
    out = tmp_path / "run"
    lora = "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj], save_merged: true}"
    overrides = [f"train.output_dir={out}", f"model.name_or_path={base}", "model.from_scratch=false", lora]
    overrides += ["train.gradient_checkpointing=true", "optimizer.lr=1e-2"]
    proc = run(recipe_cmd("sft_chat.py", TINY, *overrides, *FAST))
    # r=4 adapters on q (32 -> 32) and v (32 -> 16, one KV head) of 2 layers: 2 * (4*32 + 32*4 + 4*32 + 16*4)
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    assert f"{base_params + 896:,} params, 896 trainable" in proc.stdout, proc.stdout[-3000:]
    _check(out, train_loss_falls=False)  # 896 adapter weights on a random base: held-out loss falls a little
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "adapter" / "model.safetensors").exists()  # the adapter alone, not the base

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
        adapted = adapted(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert not torch.allclose(adapted, plain, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """Resumed from the step-4 (mid-epoch) and step-6 (epoch boundary) checkpoints, with dropout on,
    8-bit state and 2-micro-batch token windows, a run repeats the uninterrupted run's losses and
    learning rates exactly."""
    full = tmp_path / "full"
    common = [
        "data.max_train_samples=48",  # 6 batches of 8: 3 updates of 2 micro-batches per epoch
        "train.grad_accum_steps=2",
        "train.checkpoint_every=2",
        "train.keep_last=4",
        "train.log_every=1",
        "optimizer.state_bits=8",
        "model.config_overrides.attention_dropout=0.1",
        "sample.prompts=[]",
        *FAST,
    ]
    proc = run(recipe_cmd("sft_chat.py", TINY, f"train.output_dir={full}", *common))
    assert "(3/epoch, 3 epochs)" in proc.stdout
    a = {r["step"]: r for r in metrics(full)["history"] if "train/loss" in r}
    for start in (4, 6):
        resumed = tmp_path / f"from_{start}"
        ckpt = full / "checkpoints" / f"step_{start:07d}"
        overrides = [f"train.output_dir={resumed}", f"train.resume_from_checkpoint={ckpt}"]
        proc = run(recipe_cmd("sft_chat.py", TINY, *overrides, *common))
        assert f"at step {start}" in proc.stdout
        b = {r["step"]: r for r in metrics(resumed)["history"] if "train/loss" in r}
        assert sorted(b) == list(range(1, 9))  # the steps before the checkpoint travel with it
        assert [(b[s]["train/loss"], b[s]["train/lr"]) for s in b] == [
            (a[s]["train/loss"], a[s]["train/lr"]) for s in b
        ]
        assert metrics(resumed)["history"] == metrics(full)["history"]  # evaluations too


# ----------------------------------------------------------------------------------------------------
# bad input: one `error:` line (+ hint), exit 2


def _main_error(capsys, *overrides: str) -> str:
    """Run sft_chat's main in-process as the CLI does; return its error (it must exit 2)."""
    from accelerate.state import AcceleratorState

    from shardwise.configfile import load_config
    from shardwise.errors import exit_on_error

    from .test_faults import _recipe

    sft = _recipe("sft_chat")
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, exit_on_error():
        sft.main(load_config(sft.Config, ROOT / "configs" / "recipes" / TINY, [*FAST, *overrides]))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err, err
    lines = err[err.rindex("error: ") :].strip().splitlines()
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: ")), err
    return "\n".join(lines)


def _data(tmp_path, rows: list[dict]) -> list[str]:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"data.data_files.train={path}", f"data.data_files.validation={path}"]


CHAT = [
    {"role": "user", "content": "Hi there, how was your day?"},
    {"role": "assistant", "content": "Pretty good, I went hiking. And yours?"},
]


def test_bad_input_one_error_line(tmp_path, capsys):
    out = f"train.output_dir={tmp_path / 'run'}"
    err = _main_error(capsys, out, *_data(tmp_path, [{"conversation": CHAT}]))
    assert "column 'messages' not in the data set" in err and "data.messages_column" in err

    bad_role = [{"role": "bot", "content": "hello"}, *CHAT]
    err = _main_error(capsys, out, *_data(tmp_path, [{"messages": CHAT}, {"messages": bad_role}]))
    assert "row 1" in err and "'bot'" in err

    err = _main_error(
        capsys, out, "data.max_length=16", "data.overlong=error", *_data(tmp_path, [{"messages": CHAT}])
    )
    assert "more than data.max_length=16" in err and "data.overlong=truncate" in err

    from transformers import AutoTokenizer

    plain = tmp_path / "plain_tokenizer"
    tok = AutoTokenizer.from_pretrained(ensure_assets("smollm2") / "models" / "SmolLM2-135M-Instruct")
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    err = _main_error(capsys, out, f"model.tokenizer={plain}")
    assert "chat template" in err and "chat_template" in err


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path):
    overrides = [f"train.output_dir={tmp_path / 'run'}", *_data(tmp_path, [{"text": "no messages here"}])]
    proc = subprocess.run(
        recipe_cmd("sft_chat.py", TINY, *overrides, *FAST),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: data.messages_column: column 'messages' not in" in proc.stderr
    assert "Traceback" not in proc.stderr
