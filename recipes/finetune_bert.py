"""Fine-tune a BERT-style encoder for sequence classification with shardwise AdamW on Accelerate.

    python recipes/finetune_bert.py --config configs/recipes/bert_minilm_r8.yaml [dotted.key=value ...]
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml recipes/finetune_bert.py \
        --config configs/recipes/bert_tiny.yaml optimizer.shard=true optimizer.state_bits=8

Any ``AutoModelForSequenceClassification`` (default: all-MiniLM-L6-v2 from the offline asset cache)
on any ``datasets.load_dataset`` source (default: Reuters R8, 8 news topics). Evaluates accuracy and
macro-F1 every epoch (or every ``train.eval_every`` steps); writes checkpoints, TensorBoard logs,
``metrics.json``, ``curves.png``, the resolved ``config.yaml`` and the model (``save_pretrained``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from shardwise.configfile import parse_args
from shardwise.data.assets import resolve
from shardwise.data.text import ClassificationDataConfig, load_classification
from shardwise.errors import exit_on_error
from shardwise.models.pretrained import PretrainedModelConfig, enable_gradient_checkpointing, save_pretrained
from shardwise.train.accel import configure_deepspeed
from shardwise.train.loop import (
    final_metrics,
    plan_run,
    record_config,
    report,
    resume,
    run_training,
    start_run,
)
from shardwise.train.metrics import Metrics
from shardwise.train.optimizer import build_optimizer, describe_optimizer
from shardwise.train.preflight import preflight
from shardwise.train.sections import OptimizerConfig, TrainConfig
from shardwise.train.update import model_loss


@dataclass
class Config:
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    model: PretrainedModelConfig = field(
        default_factory=lambda: PretrainedModelConfig("assets:models/all-MiniLM-L6-v2")
    )
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/bert"))


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    f1s = []
    for c in range(num_classes):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(1, len(f1s))


def main(cfg: Config) -> dict:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
    )

    t_start = time.perf_counter()
    preflight(cfg)  # model, data files, lengths, precision, trackers, resume: fail before any work
    accelerator, out = start_run(cfg.train, "finetune_bert")
    set_seed(cfg.train.seed)
    say = accelerator.print

    # ---------------------------------------------------------------------------------------- data
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.tokenizer or cfg.model.name_or_path))
    with accelerator.main_process_first():  # rank 0 tokenizes and fills the datasets cache first
        train_ds, eval_ds, label_names = load_classification(cfg.data, tokenizer, seed=cfg.train.seed)
    collate = DataCollatorWithPadding(tokenizer)  # pad each batch to its longest text, not max_length
    train_dl = DataLoader(
        train_ds, cfg.train.batch_size, shuffle=True, collate_fn=collate, num_workers=cfg.train.num_workers
    )
    eval_dl = DataLoader(
        eval_ds, cfg.train.eval_batch(), collate_fn=collate, num_workers=cfg.train.num_workers
    )
    say(
        f"data: {len(train_ds)} train / {len(eval_ds)} eval examples, {len(label_names)} labels {label_names}"
    )
    loss_fn, count_targets = model_loss, None  # the model's own loss: the mean over the batch's texts

    # --------------------------------------------------------------------------------------- model
    name = resolve(cfg.model.name_or_path)
    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    model_config = cfg.model.hf_config(**labels)
    if cfg.model.from_scratch:
        model = AutoModelForSequenceClassification.from_config(model_config, **cfg.model.load_kwargs())
    else:  # a fresh classification head on the pretrained encoder
        model = AutoModelForSequenceClassification.from_pretrained(
            name, config=model_config, **cfg.model.load_kwargs()
        )
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
    record_config(accelerator, cfg, out, "finetune_bert")

    # -------------------------------------------------------------------------------------- eval
    def evaluate() -> dict[str, float]:
        model.eval()
        preds, golds, loss_sum, n = [], [], 0.0, 0
        with torch.no_grad():
            for batch in eval_dl:
                outputs = model(**batch)
                logits, golds_b = accelerator.gather_for_metrics((outputs.logits, batch["labels"]))
                loss_sum += torch.nn.functional.cross_entropy(logits.float(), golds_b, reduction="sum").item()
                n += golds_b.numel()
                preds.append(logits.argmax(-1).cpu())
                golds.append(golds_b.cpu())
        model.train()
        p, g = torch.cat(preds), torch.cat(golds)
        return {
            "eval/loss": loss_sum / n,
            "eval/accuracy": (p == g).float().mean().item(),
            "eval/macro_f1": macro_f1(p, g, len(label_names)),
        }

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

    # -------------------------------------------------------------------------------------- save
    save_pretrained(accelerator, model, tokenizer, out / "model")
    final = final_metrics(metrics, result, t_start)
    title = f"finetune_bert: {cfg.model.name_or_path}"
    report(
        accelerator,
        metrics,
        final,
        out,
        title,
        (f"model:   {out / 'model'}  (AutoModelForSequenceClassification.from_pretrained)",),
    )
    accelerator.end_training()
    return final


if __name__ == "__main__":
    with exit_on_error():  # a config / data / checkpoint / divergence error: one `error:` line, exit 2
        main(parse_args(Config, sys.argv[1:], description=__doc__.split("\n")[0]))
