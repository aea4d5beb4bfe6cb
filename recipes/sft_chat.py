"""Supervised fine-tuning on conversations (chat SFT) with shardwise AdamW on Accelerate.

    python recipes/sft_chat.py --config configs/recipes/sft_smollm2_chitchat.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml recipes/sft_chat.py \
        --config configs/recipes/sft_tiny.yaml optimizer.shard=true optimizer.state_bits=8

Any ``AutoModelForCausalLM`` with a chat template (default: SmolLM2-135M-Instruct) on any data set with
a ``messages`` column (default: chitchat-dataset's multi-turn chats). Each conversation is rendered
with the model's own chat template; the loss is on the assistant's turns only (end-of-turn token
included, so the model learns to stop), averaged over all assistant tokens of an optimizer step.
Optional: packing (``data.packing``), LoRA (``model.lora``), gradient checkpointing, bf16 weights.
Evaluates held-out assistant-token loss and perplexity from step 0; writes greedy replies to fixed
prompts before and after training (``samples.md``), checkpoints, ``metrics.json``, ``curves.png``,
``config.yaml`` and the model (``model/``, or ``adapter/`` + optional ``merged/`` under LoRA).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from shardwise.configfile import parse_args
from shardwise.data.assets import resolve
from shardwise.data.chat import ChatDataConfig, chat_collator, load_chat
from shardwise.errors import exit_on_error
from shardwise.models.lora import LoraConfig, apply_lora, parameter_counts, quantization_kwargs, save_merged
from shardwise.models.pretrained import PretrainedModelConfig, enable_gradient_checkpointing
from shardwise.train.accel import configure_deepspeed, is_deepspeed
from shardwise.train.loop import (
    final_metrics,
    plan_run,
    record_config,
    report,
    resume,
    run_training,
    start_run,
)
from shardwise.train.losses import batch_token_loss, count_target_tokens, row_token_losses
from shardwise.train.metrics import Metrics
from shardwise.train.optimizer import build_optimizer, describe_optimizer
from shardwise.train.preflight import preflight
from shardwise.train.sections import OptimizerConfig, TrainConfig


@dataclass
class ModelConfig(PretrainedModelConfig):
    """The pretrained model (dtype, attention kernel, ...) and ``lora`` (null = full fine-tune)."""

    lora: LoraConfig | None = None


@dataclass
class SampleConfig:
    """Greedy replies to these user messages, before and after training, saved to samples.md."""

    prompts: list[str] = field(
        default_factory=lambda: [
            "Hi! How are you doing today?",
            "What did you do last weekend?",
            "Do you have any plans for the summer?",
        ]
    )
    max_new_tokens: int = 48


@dataclass
class Config:
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig("assets:models/SmolLM2-135M-Instruct"))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(preset="llm", lr=1e-4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/sft", batch_size=8))
    sample: SampleConfig = field(default_factory=SampleConfig)


def main(cfg: Config) -> dict:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    preflight(cfg)  # model, lengths, precision, trackers, resume: fail before any work
    accelerator, out = start_run(cfg.train, "sft_chat")
    set_seed(cfg.train.seed)
    say = accelerator.print

    # ---------------------------------------------------------------------------------------- data
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.tokenizer or cfg.model.name_or_path))
    with accelerator.main_process_first():  # rank 0 tokenizes and fills the datasets cache first
        train_ds, eval_ds = load_chat(cfg.data, tokenizer, seed=cfg.train.seed)
    # padded: one conversation per row; packed: whole conversations per row, attention kept inside each
    collate = chat_collator(cfg.data, tokenizer, cfg.model.attn_implementation)
    dl_kw = {"collate_fn": collate, "num_workers": cfg.train.num_workers}
    train_dl = DataLoader(train_ds, cfg.train.batch_size, shuffle=True, **dl_kw)
    eval_dl = DataLoader(eval_ds, cfg.train.eval_batch(), **dl_kw)
    epoch_tokens = sum(len(x) for x in train_ds["input_ids"])  # real tokens (no padding) per epoch
    rows = "packed rows" if cfg.data.packing else "conversations"
    say(f"data: {len(train_ds)} train / {len(eval_ds)} eval {rows}, {epoch_tokens:,} train tokens/epoch")

    # --------------------------------------------------------------------------------------- model
    name = resolve(cfg.model.name_or_path)
    model_config = cfg.model.hf_config()
    if cfg.model.from_scratch:
        model_config.vocab_size = max(model_config.vocab_size, len(tokenizer))
        model = AutoModelForCausalLM.from_config(model_config, **cfg.model.load_kwargs())
    else:  # QLoRA: a 4-bit base (CUDA + bitsandbytes; a ConfigError elsewhere)
        kw = {**cfg.model.load_kwargs(), **quantization_kwargs(cfg.model.lora)}
        model = AutoModelForCausalLM.from_pretrained(name, config=model_config, **kw)
    if cfg.model.lora is not None:  # base frozen; the optimizer sees the adapters only
        model = apply_lora(model, cfg.model.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = parameter_counts(model)
    say(f"model: {type(model).__name__} from {name}, {total:,} params, {trainable:,} trainable")

    # ----------------------------------------------------------------------------------- optimizer
    # the step, counters and data position a resumed run continues from; the steps its data takes
    start, plan = plan_run(accelerator, train_dl, cfg.train, out)
    optimizer, scheduler = build_optimizer(model, cfg.optimizer, plan.total_steps)
    say(f"optimizer: {describe_optimizer(optimizer, cfg.optimizer)}")
    say(f"schedule: {plan.total_steps} steps ({plan.updates_per_epoch}/epoch, {plan.epochs} epochs)")
    configure_deepspeed(accelerator, cfg.train)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, scheduler
    )

    metrics = Metrics(accelerator)
    resume(accelerator, start, metrics, scheduler)  # model, optimizer, schedule, RNG, data position, curves
    record_config(accelerator, cfg, out, "sft_chat")

    # -------------------------------------------------------------------------------------- eval
    eval_seconds = 0.0  # kept out of the train throughput

    def evaluate() -> dict[str, float]:
        """Mean loss over all held-out assistant tokens (all processes), and its perplexity."""
        nonlocal eval_seconds
        t0 = time.perf_counter()
        model.eval()
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for batch in eval_dl:
                s, n = accelerator.gather_for_metrics(row_token_losses(model, batch))
                loss_sum, tokens = loss_sum + s.sum().item(), tokens + n.sum().item()
        model.train()
        eval_seconds += time.perf_counter() - t0
        mean = loss_sum / max(tokens, 1)
        return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0))}

    zero3 = is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def replies() -> list[str]:
        """Greedy replies to the sample prompts (main process; skipped under ZeRO-3's split weights)."""
        if not accelerator.is_main_process or zero3:
            return []
        gen_model = accelerator.unwrap_model(model)
        gen_model.eval()
        texts = []
        for prompt in cfg.sample.prompts:
            chat = [{"role": "user", "content": prompt}]
            enc = tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            ids = enc["input_ids"].to(accelerator.device)
            with torch.no_grad():
                gen = gen_model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=cfg.sample.max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=pad_id,
                )
            texts.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
        gen_model.train()
        return texts

    before = replies() if start.step == 0 else []

    # -------------------------------------------------------------------------------------- loop
    # one iteration per optimizer update; the loss of an update is the mean over ALL its assistant
    # tokens (every micro-batch, every process: the loop counts them first, one all-reduce per step),
    # evaluate() at step 0, every eval_every steps and at the end: shardwise.train.loop.run_training
    model.train()
    result = run_training(
        accelerator,
        model,
        train_dl,
        optimizer,
        scheduler,
        plan,
        cfg.train,
        evaluate=evaluate,
        metrics=metrics,
        output_dir=out,
        start_step=start.step,
        skipped_steps=start.skipped_steps,
        seconds_before=start.train_seconds,
        position=start.position,
        loss_fn=batch_token_loss,
        count_targets=lambda batch: count_target_tokens(batch["labels"]),
        eval_at_steps=(0,),
    )
    after = replies()

    # -------------------------------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    lora = cfg.model.lora
    model_dir = out / ("adapter" if lora is not None else "model")  # adapter: peft's files only
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # gathered under ZeRO-3 (a collective: every rank)
    unwrapped.save_pretrained(model_dir, is_main_process=accelerator.is_main_process, state_dict=state)
    train_seconds = result.train_seconds - start.train_seconds - eval_seconds  # this run's, no evals
    steps_run = result.steps - start.step
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    final = {
        **final_metrics(metrics, result, t_start),
        "eval/loss_before": next((r["eval/loss"] for r in metrics.history if r["step"] == 0), float("nan")),
        # real (unpadded) tokens of all processes per second of training, evaluations left out
        "train/tokens_per_s": round(steps_run / plan.updates_per_epoch * epoch_tokens / train_seconds, 1),
        "peak_memory_mib": round(peak, 1),  # this process: CPU max RSS, or CUDA max allocated
    }
    if accelerator.is_main_process:
        tokenizer.save_pretrained(model_dir)
        if lora is not None and lora.save_merged and not zero3:  # last: merging ends training
            say(f"merged:  {save_merged(unwrapped, out / 'merged', tokenizer)}  (no peft needed)")
        md = [f"# sft_chat: greedy replies ({cfg.model.name_or_path})\n"]
        for i, prompt in enumerate(cfg.sample.prompts):
            md.append(f"## User: {prompt}\n")
            for label, texts in (
                (f"before (step {start.step})", before),
                (f"after (step {result.steps})", after),
            ):
                if i < len(texts):
                    md.append(f"**{label}**\n\n> " + texts[i].replace("\n", "\n> ") + "\n")
        (out / "samples.md").write_text("\n".join(md))
        for prompt, reply in zip(cfg.sample.prompts, after, strict=False):
            say(f"--- user: {prompt}\n--- assistant: {reply}")
    loader = "PeftModel.from_pretrained(base, ...)" if lora is not None else "AutoModelForCausalLM"
    where = (f"model:   {model_dir}  ({loader})", f"samples: {out / 'samples.md'}")
    report(accelerator, metrics, final, out, f"sft_chat: {cfg.model.name_or_path}", where)
    accelerator.end_training()
    return final


if __name__ == "__main__":
    with exit_on_error():  # a config / data / checkpoint / divergence error: one `error:` line, exit 2
        main(parse_args(Config, sys.argv[1:], description=__doc__.split("\n")[0]))
