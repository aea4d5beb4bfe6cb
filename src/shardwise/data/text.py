"""Text data for the recipes: sequence classification and causal-LM blocks, via ``datasets``.

Both loaders go through ``datasets.load_dataset``: a hub name (``glue`` + ``name: sst2``) for users with
a hub, or a builder over local files (``csv``, ``json``, ``parquet``, ``text``) — which is what the
shipped defaults use (files in the offline asset cache, named ``assets:...``). The same code path
serves both, so the tests exercise the hub loader on local files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from .assets import resolve

DataFiles = dict[str, str | list[str]]

LOCAL_BUILDERS = ("csv", "json", "parquet", "text", "arrow")


@dataclass
class ClassificationDataConfig:
    """What to classify. Defaults: Reuters R8 (8 news topics) from the asset cache."""

    # datasets.load_dataset path: a hub data set ("glue", "imdb") or a builder over data_files
    dataset: str = "csv"
    name: str | None = None  # hub config name, e.g. "sst2" for glue
    data_files: DataFiles | None = field(
        default_factory=lambda: {
            "train": "assets:data/reuters-r8/train.csv",
            "test": "assets:data/reuters-r8/test.csv",
        }
    )
    train_split: str = "train"
    eval_split: str = "test"
    text_column: str = "text"
    text_pair_column: str | None = None  # sentence-pair tasks (MNLI, MRPC, ...)
    label_column: str = "label"
    max_length: int = 128  # tokens; longer texts are truncated
    max_train_samples: int | None = None  # first N after a seeded shuffle (quick runs)
    max_eval_samples: int | None = None


@dataclass
class CausalLMDataConfig:
    """What to model. Defaults: Shakespeare's plays (Markdown) from the asset cache."""

    dataset: str = "text"
    name: str | None = None
    data_files: DataFiles | None = field(
        default_factory=lambda: {
            "train": "assets:data/shakespeare/train.txt",
            "validation": "assets:data/shakespeare/validation.txt",
        }
    )
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "text"
    block_size: int = 256  # tokens per training example (documents are concatenated, then cut)
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = None


def load_raw(dataset: str, name: str | None, data_files: DataFiles | None, **kwargs: Any):
    """``datasets.load_dataset`` with ``assets:`` paths resolved; a DatasetDict of all splits."""
    from datasets import load_dataset

    files = None
    if data_files is not None:
        files = {
            split: [resolve(p) for p in paths] if isinstance(paths, list) else resolve(paths)
            for split, paths in data_files.items()
        }
    if dataset == "text":
        kwargs.setdefault("keep_linebreaks", True)  # a causal LM should learn where lines end
    if dataset in LOCAL_BUILDERS and files is None:
        raise ValueError(f"data.dataset={dataset!r} reads local files: set data.data_files")
    return load_dataset(dataset, name, data_files=files, **kwargs)


def _split(ds, split: str, what: str):
    if split not in ds:
        raise ValueError(f"data.{what}={split!r} is not a split of this data set; it has {list(ds)}")
    return ds[split]


def _take(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def load_classification(cfg: ClassificationDataConfig, tokenizer, seed: int = 0):
    """Tokenized (train, eval) datasets with an integer ``labels`` column, and the label names.

    Labels that are a ``ClassLabel`` keep its names; strings are sorted and numbered (from both splits,
    so an eval-only class is still a class); plain integers are used as they are.
    """
    from datasets import ClassLabel

    raw = load_raw(cfg.dataset, cfg.name, cfg.data_files)
    train = _take(_split(raw, cfg.train_split, "train_split"), cfg.max_train_samples, seed)
    evals = _take(_split(raw, cfg.eval_split, "eval_split"), cfg.max_eval_samples, seed)
    for col in (cfg.text_column, cfg.text_pair_column, cfg.label_column):
        if col is not None and col not in train.column_names:
            raise ValueError(f"column {col!r} not in the data set; its columns are {train.column_names}")

    feature = train.features[cfg.label_column]
    if isinstance(feature, ClassLabel):
        label_names = list(feature.names)
        to_id = None
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        label_names = sorted(set(train[cfg.label_column]) | set(evals[cfg.label_column]))
        to_id = {name: i for i, name in enumerate(label_names)}
    else:
        num = max(max(train[cfg.label_column]), max(evals[cfg.label_column])) + 1
        label_names = [str(i) for i in range(num)]
        to_id = None

    def encode(batch):
        args = [batch[cfg.text_column]]
        if cfg.text_pair_column is not None:
            args.append(batch[cfg.text_pair_column])
        out = tokenizer(*args, truncation=True, max_length=cfg.max_length)
        labels = batch[cfg.label_column]
        out["labels"] = [to_id[x] for x in labels] if to_id is not None else labels
        return out

    def prepare(ds):
        return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")

    return prepare(train), prepare(evals), label_names


def group_into_blocks(ids: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenate token lists and cut into full blocks of ``block_size`` (the remainder is dropped)."""
    flat = list(chain.from_iterable(ids))
    n = (len(flat) // block_size) * block_size
    return [flat[i : i + block_size] for i in range(0, n, block_size)]


def load_causal_lm(cfg: CausalLMDataConfig, tokenizer, seed: int = 0):
    """(train, eval) datasets of ``input_ids`` / ``labels`` blocks of ``block_size`` tokens.

    Documents are tokenized, joined with the EOS token when the tokenizer has one, and cut into blocks,
    as in transformers' run_clm: no padding, every token is a target.
    """
    raw = load_raw(cfg.dataset, cfg.name, cfg.data_files)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    text_is_lines = cfg.dataset == "text"  # one row per line: the line breaks are already in the text

    def encode(batch):
        ids = tokenizer(batch[cfg.text_column], add_special_tokens=False)["input_ids"]
        if not text_is_lines:
            ids = [x + eos for x in ids]
        return {"ids": ids}

    def blocks(batch):
        chunks = group_into_blocks(batch["ids"], cfg.block_size)
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    def prepare(ds, limit):
        if cfg.text_column not in ds.column_names:
            raise ValueError(f"column {cfg.text_column!r} not in the data set; it has {ds.column_names}")
        ids = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")
        out = ids.map(blocks, batched=True, batch_size=1000, remove_columns=["ids"], desc="blocks")
        if len(out) == 0:
            raise ValueError(
                f"no block of data.block_size={cfg.block_size} tokens: the split is too short; lower it"
            )
        return _take(out, limit, seed)

    train = prepare(_split(raw, cfg.train_split, "train_split"), cfg.max_train_blocks)
    evals = prepare(_split(raw, cfg.eval_split, "eval_split"), cfg.max_eval_blocks)
    return train, evals
