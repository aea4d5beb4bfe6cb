"""Which pretrained transformers model a recipe loads: a hub id, a local folder or an offline asset.

``assets:models/...`` names resolve through the offline asset cache (``shardwise.data.assets``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise.data.assets import resolve


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

    def __post_init__(self) -> None:
        if self.model_type is not None and not self.from_scratch:
            raise ValueError("model_type builds a fresh architecture: set from_scratch: true as well")

    def hf_config(self, **extra: Any):
        """The transformers config: name_or_path's (or a fresh ``model_type``), with the overrides."""
        from transformers import AutoConfig

        if self.model_type is not None:
            return AutoConfig.for_model(self.model_type, **extra, **self.config_overrides)
        return AutoConfig.from_pretrained(resolve(self.name_or_path), **extra, **self.config_overrides)


def save_pretrained(accelerator, model, tokenizer, model_dir: Path) -> None:
    """``save_pretrained`` of the trained model (+ tokenizer) from the main process, with the state dict
    accelerate gathers (DeepSpeed ZeRO-3 and FSDP hold shards). Every process must call it."""
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(
        model_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(model_dir)
