"""shardwise.data.text: the datasets.load_dataset code path (what hub names use) on local files."""

from __future__ import annotations

import csv
import json

import pytest
from transformers import BertTokenizerFast

from shardwise.data.assets import AssetsMissing, resolve
from shardwise.data.text import (
    CausalLMDataConfig,
    ClassificationDataConfig,
    group_into_blocks,
    load_causal_lm,
    load_classification,
)

ROWS = [("sports", "the team won the match"), ("politics", "the vote passed"), ("sports", "a late goal")] * 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = sorted({w for _, t in ROWS for w in t.split()} | {"late", "match"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path))
    tok.eos_token = "[SEP]"
    return tok


def _write(tmp_path, fmt):
    for split, rows in (("train", ROWS), ("test", ROWS[:5])):
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["label", "text"])
                w.writerows(rows)
        elif fmt == "json":
            path.write_text("\n".join(json.dumps({"label": lab, "text": t}) for lab, t in rows))
        else:
            import pandas as pd

            pd.DataFrame(rows, columns=["label", "text"]).to_parquet(path)
    return {"train": str(tmp_path / f"train.{fmt}"), "test": str(tmp_path / f"test.{fmt}")}


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_classification_from_local_files(tmp_path, tokenizer, fmt):
    cfg = ClassificationDataConfig(dataset=fmt, data_files=_write(tmp_path, fmt), max_length=8)
    train, evals, labels = load_classification(cfg, tokenizer)
    assert labels == ["politics", "sports"]
    assert len(train) == 12 and len(evals) == 5
    assert train[0]["labels"] == 1 and train[1]["labels"] == 0
    assert train[0]["input_ids"][0] == tokenizer.cls_token_id and len(train[0]["input_ids"]) <= 8


def test_classification_errors_name_the_fix(tmp_path, tokenizer):
    files = _write(tmp_path, "csv")
    with pytest.raises(ValueError, match="column 'sentence' not in the data set"):
        load_classification(ClassificationDataConfig(data_files=files, text_column="sentence"), tokenizer)
    with pytest.raises(ValueError, match=r"eval_split='validation' is not a split"):
        load_classification(ClassificationDataConfig(data_files=files, eval_split="validation"), tokenizer)
    with pytest.raises(ValueError, match=r"set data.data_files"):
        load_classification(ClassificationDataConfig(data_files=None), tokenizer)


def test_causal_lm_blocks(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text("the team won the match\n" * 20)
    (tmp_path / "val.txt").write_text("a late goal\n" * 10)
    cfg = CausalLMDataConfig(
        data_files={"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "val.txt")},
        block_size=7,
    )
    train, _ = load_causal_lm(cfg, tokenizer)
    assert all(len(x) == 7 for x in train["input_ids"]) and train["input_ids"] == train["labels"]
    assert len(train) == (20 * 5) // 7  # 5 word tokens per line (newlines are unknown to this vocab)
    with pytest.raises(ValueError, match="lower it"):
        load_causal_lm(CausalLMDataConfig(data_files=cfg.data_files, block_size=10_000), tokenizer)


def test_group_into_blocks_drops_remainder():
    assert group_into_blocks([[1, 2, 3], [4, 5], [6, 7, 8]], 3) == [[1, 2, 3], [4, 5, 6]]


def test_missing_asset_names_make_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_ASSETS", str(tmp_path))
    with pytest.raises(AssetsMissing, match="make assets"):
        resolve("assets:data/nothing.csv")
    assert resolve("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"


def test_check_data_files_samples_a_big_file(tmp_path, monkeypatch):
    """Only the first CHECK_BYTES are checked; a sample cut inside a quoted multi-line field or a
    multi-byte character is not an error, a float label inside the sample is."""
    import shardwise.data.text as text
    from shardwise.data.text import ClassificationDataConfig, check_data_files
    from shardwise.errors import DataError

    monkeypatch.setattr(text, "CHECK_BYTES", 64)
    path = tmp_path / "big.csv"
    path.write_text("text,label\n" + "".join(f'"line {i}, ünï\nmore",{i % 3}\n' for i in range(100)))
    cfg = ClassificationDataConfig(data_files={"train": str(path)})
    check_data_files(cfg, label_column="label")
    path.write_text("text,label\n" + "".join(f'"line {i}",{i % 3}.5\n' for i in range(100)))
    with pytest.raises(DataError, match="is a float"):
        check_data_files(cfg, label_column="label")
