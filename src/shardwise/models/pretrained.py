"""Which pretrained transformers model a recipe loads: a hub id, a local folder or an offline asset.

``assets:models/...`` names resolve through the offline asset cache (``shardwise.data.assets``).
The section also says how to load it (weights' dtype, attention kernel); ``enable_gradient_checkpointing``
is what ``train.gradient_checkpointing: true`` does to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shardwise.data.assets import PREFIX, resolve
from shardwise.errors import ConfigError, did_you_mean


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


def looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("org/name" or "name"): absolute, ./ ../ ~, 2+ slashes."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout`` seconds (no HTTP, no retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy: a direct connect says nothing; let huggingface_hub try
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_source(name: str, key: str = "model.name_or_path") -> None:
    """Fail at once (ConfigError) when ``name`` cannot be loaded: an asset not in the cache, a local
    folder that does not exist or holds no ``config.json``, a hub id not in the local hub cache while
    offline (``HF_HUB_OFFLINE=1``, or the hub does not answer a 3 s connect) -- instead of a traceback
    after transformers' retries."""
    if name.startswith(PREFIX):
        resolve(name)  # AssetsMissing (a ShardwiseError) says to run `make assets`
        return
    path = Path(name).expanduser()
    if path.is_dir():
        # a tokenizer folder needs no model config: AutoTokenizer reads tokenizer_config.json
        wanted = ("config.json", "tokenizer_config.json") if key.endswith("tokenizer") else ("config.json",)
        if not any((path / f).is_file() for f in wanted) and not any(path.glob("*.gguf")):
            what = "a saved tokenizer or model" if len(wanted) > 1 else "a saved transformers model"
            raise ConfigError(
                f"{key}={name!r}: the folder holds no {' or '.join(wanted)} (not {what})",
                hint="point it at a folder written by save_pretrained (e.g. <output_dir>/model)",
            )
        return
    if looks_like_path(name) or path.exists():
        raise ConfigError(
            f"{key}={name!r}: no such folder",
            hint="fix the path (relative paths are from the directory you run in), or give a hub id",
        )
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # in the local hub cache: loads offline
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true")
    if offline or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} is unreachable"
        raise ConfigError(
            f"{key}={name!r}: offline ({why}) and the model is not in the local hub cache",
            hint="use an offline asset (assets:models/all-MiniLM-L6-v2, `make assets`) or a local folder, "
            "or download the model once with network access",
        )


def model_config_class(cfg: PretrainedModelConfig):
    """The transformers config (without overrides) the model is built from: cheap, JSON only."""
    from transformers import AutoConfig

    if cfg.model_type is not None:
        try:
            return AutoConfig.for_model(cfg.model_type)
        except ValueError as e:
            raise ConfigError(f"model.model_type={cfg.model_type!r}: {e}") from None
    return AutoConfig.from_pretrained(resolve(cfg.name_or_path))


def check_config_overrides(cfg: PretrainedModelConfig, base=None):
    """Every ``model.config_overrides`` key must be a field of the model's config class (a typo such as
    ``hiden_dropout_prob`` would be stored and ignored). Returns the config with the overrides."""
    import inspect

    base = model_config_class(cfg) if base is None else base
    valid = set(base.to_dict()) | set(getattr(base, "attribute_map", {}))
    for klass in type(base).__mro__:
        if "__init__" in vars(klass):
            valid |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    for key in cfg.config_overrides:
        if key not in valid:
            raise ConfigError(
                f"model.config_overrides.{key}: not a field of {type(base).__name__}"
                f"{did_you_mean(key, sorted(valid))}",
                hint=f"see the fields of {type(base).__name__} (transformers) or config.json",
            )
    return base


def max_positions(model_config) -> int | None:
    """The longest sequence the model's position embeddings allow (BERT: max_position_embeddings,
    GPT-2: n_positions), or None when the architecture has no such limit."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
