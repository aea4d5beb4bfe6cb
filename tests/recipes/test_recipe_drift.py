"""The BERT and GPT recipes share their skeleton; the shared sections must stay identical (as
accelerate's tests diff its example scripts against a template), so the two cannot drift apart.

A section is the text under a banner comment (``# ---- optimizer``) inside ``main``; the recipe's own
name is the one allowed difference. What differs on purpose (data, model, eval, samples) is not
compared, but every data loader of both must pass ``num_workers`` (the drift that started this test).
"""

from __future__ import annotations

import re

import pytest

from ..helpers import ROOT

RECIPES = {
    "finetune_bert": ROOT / "recipes/finetune_bert.py",
    "finetune_gpt": ROOT / "recipes/finetune_gpt.py",
}
SHARED = ["start", "optimizer", "loop", "main"]


def sections(name: str) -> dict[str, str]:
    text = RECIPES[name].read_text().replace(name, "RECIPE")
    body = text[text.index("def main(") :]
    parts = re.split(r"^    # -{10,} (\w+)\n", body, flags=re.M)
    found = dict(zip(parts[1::2], parts[2::2], strict=True))
    start = parts[0]
    found["start"] = start[start.index("    t_start = ") :]  # after the recipe's own imports
    found["main"] = text[text.index('if __name__ == "__main__":') :]
    return found


@pytest.mark.parametrize("section", SHARED)
def test_shared_sections_are_identical(section):
    bert, gpt = sections("finetune_bert"), sections("finetune_gpt")
    assert section in bert and section in gpt, f"both recipes need a `{section}` section"
    assert bert[section] == gpt[section], (
        f"recipes/finetune_bert.py and finetune_gpt.py differ in `{section}`"
    )


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_data_loader_uses_the_configured_workers(name):
    data = sections(name)["data"]
    loaders = data.count("DataLoader(")
    assert loaders == 2 and data.count("num_workers=cfg.train.num_workers") == loaders
