"""LoRA (and QLoRA) adapters on a Hugging Face causal LM, via ``peft``.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a pretrained weight W (d_out x d_in) and learns a
low-rank update: ``h = W x + (alpha / r) * B A dropout(x)`` with A (r x d_in, random) and B (d_out x r,
zeros at the start, so the adapted model starts as the base model). Only A and B are trained, so the
optimizer (and its 8-bit / sharded state) sees a few percent of the parameters. QLoRA (Dettmers et al.
2023, arXiv:2305.14314) stores the frozen W in 4-bit NF4 (bitsandbytes, CUDA) under the same adapters.

What a recipe does with this module::

    model = AutoModelForCausalLM.from_pretrained(path, **quantization_kwargs(cfg.lora))  # {} unless QLoRA
    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    optimizer = AdamW(trainable_parameters(model), ...)
    ...
    save_adapter(model, out / "adapter")            # PeftModel.from_pretrained(base, out / "adapter")
    save_merged(model, out / "merged", tokenizer)   # AutoModelForCausalLM.from_pretrained(out / "merged")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from shardwise.errors import ConfigError

# checkpointing lives with model loading (every recipe); apply_lora turns it on the LoRA-compatible way
from .pretrained import enable_gradient_checkpointing, is_checkpointing  # noqa: F401


@dataclass
class LoraConfig:
    """``model.lora``: the adapters. ``null`` (the recipe's default) means a full fine-tune."""

    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapter's input
    # module names (suffixes) to adapt, or ["all-linear"] (every linear layer but the output head)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes; CUDA only) and train adapters over it
    load_in_4bit: bool = False
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # besides the adapter: also save base + adapters merged into plain weights (loads without peft)
    save_merged: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module (or ['all-linear'])")


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "model.lora needs the peft package, which is not installed",
            hint="pip install 'shardwise[lora]' (or pip install peft), or set model.lora: null for a full "
            "fine-tune",
        ) from None
    return peft


def qlora_unsupported_reason() -> str | None:
    """Why 4-bit QLoRA cannot run here (no CUDA, no bitsandbytes), or None when it can."""
    if not torch.cuda.is_available():
        return "4-bit QLoRA needs a CUDA GPU (bitsandbytes' 4-bit kernels); this machine has none"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "4-bit QLoRA needs bitsandbytes, which is not installed (pip install 'shardwise[qlora]')"
    return None


def quantization_kwargs(cfg: LoraConfig | None) -> dict[str, Any]:
    """``from_pretrained`` kwargs for the base model: a 4-bit BitsAndBytesConfig for QLoRA, else {}."""
    if cfg is None or not cfg.load_in_4bit:
        return {}
    reason = qlora_unsupported_reason()
    if reason is not None:
        raise ConfigError(
            f"model.lora.load_in_4bit=true: {reason}",
            hint="set model.lora.load_in_4bit=false (plain LoRA runs everywhere), or run on a CUDA GPU",
        )
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, cfg.bnb_4bit_compute_dtype),
        )
    }


def apply_lora(model, cfg: LoraConfig, *, gradient_checkpointing: bool = False):
    """Wrap ``model`` in peft adapters (base frozen); checkpointing enabled the LoRA-compatible way."""
    peft = _require_peft()
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized:
        # casts norms to fp32 and enables input grads (+ checkpointing) as QLoRA needs
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        enable_gradient_checkpointing(model)
    targets: str | list[str] = (
        "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    )
    peft_cfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, peft_cfg)
    except ValueError as e:  # target modules not found in the model
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"model.lora.target_modules={cfg.target_modules}: {e}",
            hint=f"this model's linear layers are named {names}",
        ) from None


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the optimizer should see (adapters only under LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, for the recipe's log line."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in trainable_parameters(model)), total


def save_adapter(model, out: str | Path) -> Path:
    """The adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``), a few MB."""
    out = Path(out)
    model.save_pretrained(out)
    return out


def save_merged(model, out: str | Path, tokenizer=None) -> Path:
    """Base + adapters merged into plain weights: a transformers model with no peft needed to load it.

    Merging folds ``(alpha / r) B A`` into W, so do it last (it ends training of this model object).
    A 4-bit base cannot take the merged weights in place: reload the base unquantized and merge there.
    """
    if getattr(model, "is_loaded_in_4bit", False):
        raise ConfigError(
            "cannot save a merged model from a 4-bit (QLoRA) base",
            hint="save the adapter, then load the base in bf16/fp32 with the adapter and merge it there",
        )
    out = Path(out)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
