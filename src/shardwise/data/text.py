"""Text data for the recipes: sequence classification and causal-LM blocks, via ``datasets``.

Both loaders go through ``datasets.load_dataset``: a hub name (``glue`` + ``name: sst2``) for users with
a hub, or a builder over local files (``csv``, ``json``, ``parquet``, ``text``) — which is what the
shipped defaults use (files in the offline asset cache, named ``assets:...``). The same code path
serves both, so the tests exercise the hub loader on local files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from shardwise.errors import DataError, did_you_mean

from .assets import AssetsMissing, resolve

DataFiles = dict[str, str | list[str]]

LOCAL_BUILDERS = ("csv", "json", "parquet", "text", "arrow")


def _at_least(cfg, low: int, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ValueError(
                f"{name} must be >= {low}{' or null' if name.startswith('max_') else ''}, got {value}"
            )


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

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_length", "max_train_samples", "max_eval_samples")


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

    def __post_init__(self) -> None:
        _at_least(self, 2, "block_size")  # a block predicts block_size - 1 tokens
        _at_least(self, 1, "max_train_blocks", "max_eval_blocks")


def _resolve_files(data_files: DataFiles) -> DataFiles:
    """``assets:`` names resolved; every local path (not a glob or URL) must exist."""
    out: DataFiles = {}
    for split, paths in data_files.items():
        resolved = []
        for p in paths if isinstance(paths, list) else [paths]:
            try:
                r = resolve(p)
            except AssetsMissing as e:
                raise DataError(f"data.data_files.{split}: {e}") from None
            is_pattern = any(c in r for c in "*?[") or "://" in r
            if not is_pattern and not Path(r).exists():
                raise DataError(
                    f"data.data_files.{split}: file not found: {r}",
                    hint="fix the path (relative paths are from the directory you run in)",
                )
            resolved.append(r)
        out[split] = resolved if isinstance(paths, list) else resolved[0]
    return out


def load_raw(dataset: str, name: str | None, data_files: DataFiles | None, **kwargs: Any):
    """``datasets.load_dataset`` with ``assets:`` paths resolved; a DatasetDict of all splits."""
    from datasets import load_dataset

    files = _resolve_files(data_files) if data_files is not None else None
    if dataset == "text":
        kwargs.setdefault("keep_linebreaks", True)  # a causal LM should learn where lines end
    if dataset in LOCAL_BUILDERS and files is None:
        raise DataError(f"data.dataset={dataset!r} reads local files: set data.data_files")
    try:
        return load_dataset(dataset, name, data_files=files, **kwargs)
    except (FileNotFoundError, ValueError) as e:  # unknown hub name / config, no hub, empty files
        empty = "corresponds to no data" in str(e)
        raise DataError(
            f"data.dataset={dataset!r} could not be loaded: {e}",
            hint="the data files are empty" if empty else "check data.dataset, data.name, data.data_files",
        ) from None


CHECK_BYTES = 16 << 20  # the checks read this much of each file (a big corpus is sampled, not read)


def _check_text_file(path: str, key: str) -> tuple[str, bool]:
    """The file's text (its first CHECK_BYTES, cut at a line end): refused (DataError) when empty or
    not UTF-8."""
    import codecs

    with open(path, "rb") as f:
        raw = f.read(CHECK_BYTES)
        truncated = bool(f.read(1))
    if not raw.strip():
        raise DataError(f"{key}: {path} is empty", hint="point it at a file with data")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not truncated)
        return (text[: text.rfind("\n") + 1] if truncated else text), truncated
    except UnicodeDecodeError as e:
        what = "a binary file" if b"\0" in raw[:4096] else "not UTF-8 text"
        raise DataError(
            f"{key}: {path} is {what} (byte {e.start}: {raw[e.start : e.start + 1]!r})",
            hint="convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or fix the path",
        ) from None


def _csv_header(path: str, key: str, text: str, truncated: bool = False) -> list[str]:
    """The CSV's header; every row must parse (strict quoting) and have the header's field count."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(
                    f"{key}: {path} line {reader.line_num} has {len(row)} fields, the header "
                    f"{len(header)} ({header})",
                    hint='quote fields that hold commas or line breaks ("like, this")',
                )
    except csv.Error as e:
        if truncated and "unexpected end of data" in str(e):
            return header  # the sample ends inside a quoted field that goes on in the file
        raise DataError(
            f"{key}: {path} is not valid CSV (line {reader.line_num}: {e})",
            hint='quote fields that hold commas or line breaks ("like, this"); double inner quotes',
        ) from None
    return header


def _csv_labels(path: str, text: str, column: str) -> list[str]:
    import csv
    import io

    rows = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return [v for row in rows if isinstance(v := row.get(column), str)]
    except csv.Error:  # a sample cut inside a quoted field (_csv_header checked the rest)
        return []


def check_data_files(cfg, *, label_column: str | None = None) -> None:
    """Check local ``csv`` / ``text`` data files before anything expensive runs: readable, non-empty,
    UTF-8, parseable CSV, the same columns in every split, the configured columns present, and
    classification labels that are class ids or names (a float label is refused). A DataError names
    the key and the file. Hub data sets and other builders are left to ``datasets``."""
    if cfg.dataset not in ("csv", "text") or not cfg.data_files:
        return
    headers: dict[str, list[str]] = {}
    for split, paths in _resolve_files(cfg.data_files).items():
        for path in paths if isinstance(paths, list) else [paths]:
            if any(c in path for c in "*?[") or "://" in path or Path(path).is_dir():
                continue
            key = f"data.data_files.{split}"
            text, truncated = _check_text_file(path, key)
            if cfg.dataset != "csv":
                continue
            header = _csv_header(path, key, text, truncated)
            first = next(iter(headers.items()), None)
            if first is not None and header != first[1]:
                raise DataError(
                    f"{key}: {path} has columns {header}, the {first[0]!r} split {first[1]}",
                    hint="every split needs the same columns (set each of data.data_files.* explicitly)",
                )
            headers.setdefault(split, header)
            columns = {"text_column": cfg.text_column, "label_column": label_column}
            columns["text_pair_column"] = getattr(cfg, "text_pair_column", None)
            for name, col in columns.items():
                if col is not None and col not in header:
                    raise DataError(
                        f"data.{name}: column {col!r} not in {path}; it has {header}"
                        f"{did_you_mean(col, header)}"
                    )
            if label_column is not None:
                _check_labels(_csv_labels(path, text, label_column), f"{key}: {path}", label_column)


def _check_labels(values: list[str], where: str, column: str) -> None:
    """Class ids (integers) or class names; a number with a fraction is a regression target."""
    for value in values:
        try:
            number = float(value)
        except ValueError:
            continue
        if not number.is_integer() or any(c in value for c in ".eE"):
            raise DataError(
                f"{where}: label {value!r} in column {column!r} is a float; classification needs "
                "integer class ids or class names",
                hint="round / bin the values into classes, or use a regression recipe",
            )


def _split(ds, split: str, what: str):
    if split not in ds:
        raise DataError(f"data.{what}={split!r} is not a split of this data set; it has {list(ds)}")
    if len(ds[split]) == 0:
        raise DataError(f"data.{what}={split!r} is empty", hint="check the file / data set it reads")
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
    keys = {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column}
    keys["label_column"] = cfg.label_column
    for ds, split in ((train, cfg.train_split), (evals, cfg.eval_split)):
        for key, col in keys.items():
            if col is not None and col not in ds.column_names:
                raise DataError(
                    f"data.{key}: column {col!r} not in the data set ({split!r} split); "
                    f"it has {ds.column_names}"
                )

    feature = train.features[cfg.label_column]
    dtype = getattr(feature, "dtype", None)
    if isinstance(feature, ClassLabel):
        label_names = list(feature.names)
        to_id = None
    elif dtype in ("string", "large_string"):
        label_names = sorted(set(train[cfg.label_column]) | set(evals[cfg.label_column]))
        to_id = {name: i for i, name in enumerate(label_names)}
    elif dtype is not None and "int" in dtype:
        num = max(max(train[cfg.label_column]), max(evals[cfg.label_column])) + 1
        label_names = [str(i) for i in range(num)]
        to_id = None
    else:
        raise DataError(
            f"data.label_column={cfg.label_column!r} holds {dtype or feature} values; classification "
            "needs integer class ids or class names (strings)"
        )
    if to_id is None:  # integer ids must index the classes: -1 (an unlabeled test split) or too large
        for ds, split in ((train, cfg.train_split), (evals, cfg.eval_split)):
            bad = [y for y in ds[cfg.label_column] if not 0 <= y < len(label_names)]
            if bad:
                raise DataError(
                    f"labels out of range in the {split!r} split: {sorted(set(bad))[:5]} (expected "
                    f"0..{len(label_names) - 1}, {len(bad)} rows)",
                    hint="a -1 label usually marks an unlabeled test split: evaluate on a labeled split "
                    "(data.eval_split), or filter those rows",
                )

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
            raise DataError(
                f"data.text_column: column {cfg.text_column!r} not in the data set; it has {ds.column_names}"
            )
        ids = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")
        out = ids.map(blocks, batched=True, batch_size=1000, remove_columns=["ids"], desc="blocks")
        if len(out) == 0:
            raise DataError(
                f"no block of data.block_size={cfg.block_size} tokens: the split is too short; lower it",
            )
        return _take(out, limit, seed)

    train = prepare(_split(raw, cfg.train_split, "train_split"), cfg.max_train_blocks)
    evals = prepare(_split(raw, cfg.eval_split, "eval_split"), cfg.max_eval_blocks)
    return train, evals
