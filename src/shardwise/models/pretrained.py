"""Which pretrained transformers model a recipe loads: a hub id, a local folder or an offline asset.

``assets:models/...`` names resolve through the offline asset cache (``shardwise.data.assets``).
The section also says how to load it (weights' dtype, attention kernel); ``enable_gradient_checkpointing``
is what ``train.gradient_checkpointing: true`` does to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from shardwise.data.assets import resolve
from shardwise.errors import ConfigError


@dataclass
class PretrainedModelConfig:
    """Which pretrained model (hub id, local directory or ``assets:models/...``), or a fresh one.

    ``from_scratch: true`` builds the architecture from its config with random weights (tiny test
    models); ``config_overrides`` are passed to the config either way (e.g. ``hidden_size`` for a tiny
    model, ``hidden_dropout_prob`` when fine-tuning).
    """

    name_or_path: str
    tokenizer: str | None = None  # default: name_or_path
    from_scratch: bool = False
    # with from_scratch: build this architecture ("gpt2", "bert", ...) instead of name_or_path's config
    model_type: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # the weights' dtype. float32: full precision (with train.mixed_precision=bf16 for fast matmuls);
    # bfloat16 / float16: half the memory of weights, gradients and activations (pure low-precision
    # training: fine for LoRA's frozen base, lossy for a full fine-tune); auto: the checkpoint's own
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # the attention kernel: null = transformers' default (sdpa); flash_attention_2 needs CUDA and the
    # flash-attn package (packed batches then take its padding-free varlen path)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] | None = None

    def __post_init__(self) -> None:
        if self.model_type is not None and not self.from_scratch:
            raise ValueError("model_type builds a fresh architecture: set from_scratch: true as well")

    def hf_config(self, **extra: Any):
        """The transformers config: name_or_path's (or a fresh ``model_type``), with the overrides."""
        from transformers import AutoConfig

        if self.model_type is not None:
            return AutoConfig.for_model(self.model_type, **extra, **self.config_overrides)
        return AutoConfig.from_pretrained(resolve(self.name_or_path), **extra, **self.config_overrides)

    def load_kwargs(self) -> dict[str, Any]:
        """``dtype`` and ``attn_implementation`` for ``from_pretrained`` / ``from_config``."""
        import torch

        kwargs: dict[str, Any] = {"dtype": self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)}
        impl = self.attn_implementation
        if impl is not None and impl.startswith("flash"):
            reason = flash_unsupported_reason(impl)
            if reason is not None:
                raise ConfigError(
                    f"model.attn_implementation={impl}: {reason}",
                    hint="use model.attn_implementation=sdpa (the default) here",
                )
        if impl is not None:
            kwargs["attn_implementation"] = impl
        return kwargs


def flash_unsupported_reason(impl: str) -> str | None:
    """Why flash attention cannot run here (no CUDA, no flash-attn), or None when it can."""
    import torch
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if not torch.cuda.is_available():
        return "flash attention needs a CUDA GPU; this machine has none"
    available = is_flash_attn_3_available() if impl == "flash_attention_3" else is_flash_attn_2_available()
    if not available:
        return f"{impl} needs the flash-attn package (pip install flash-attn), which is not installed"
    return None


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward; with frozen embeddings (LoRA), make the inputs require grad.

    Non-reentrant checkpointing (``use_reentrant=False``) is what works with frozen inputs and DDP;
    ``enable_input_require_grads`` also covers reentrant checkpointing, where a checkpointed block
    whose inputs do not require grad would otherwise get no gradient at all.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing


def is_checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on, under either transformers name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = getattr(base, "is_activation_checkpointing", None)
    return bool(flag) if flag is not None else bool(base.is_gradient_checkpointing)
