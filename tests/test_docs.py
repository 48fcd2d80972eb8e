"""The layer names that README.md and RESULTS.md give for groups are the ones the code prunes.

Two forms are checked against `Pruner(build_model(name), x).groups`: the generated group table
between the `<!-- group table -->` markers (`python tests/test_docs.py` prints it), and mentions
`group N (`a`, `b`)` in the text, whose model is told by its names (`features.*`: vgg11_bn, else
resnet18). Any other layer name in the documents is an error, so none can drift unchecked.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from intrafusion.groups import Pruner
from intrafusion.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "RESULTS.md")
MODELS = ("vgg11_bn", "resnet18")
LAYER = re.compile(r"(?<![\w.])(?:features\.\d+|layer\d\.\d\.(?:conv\d|shortcut\.0)|conv1)(?!\.?\w)")
MENTION = re.compile(r"group (\d+)\**\s*\(((?:`[\w.]+`(?:,\s*)?)+)\)")
TABLE = re.compile(r"<!-- group table -->\n(.*?)<!-- end group table -->\n", re.S)


@lru_cache(maxsize=None)
def groups(name: str) -> tuple[tuple[str, ...], ...]:
    """The layers of each group of model `name`, by group index."""
    pruner = Pruner(build_model(name).eval(), torch.randn(1, 3, 32, 32))
    return tuple(g.layers for g in pruner.groups)


def group_table() -> str:
    """The Markdown table of every group's layers for MODELS."""
    rows = ["| group | " + " | ".join(MODELS) + " |", "|---" * (len(MODELS) + 1) + "|"]
    for i in range(max(len(groups(m)) for m in MODELS)):
        cells = [", ".join(f"`{n}`" for n in groups(m)[i]) if i < len(groups(m)) else "" for m in MODELS]
        rows.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def text(doc: str) -> str:
    return (ROOT / doc).read_text()


def test_readme_group_table_is_the_generated_one():
    tables = TABLE.findall(text("README.md"))
    assert tables == [group_table()], "regenerate it with `python tests/test_docs.py`"


@pytest.mark.parametrize("doc", DOCS)
def test_group_mentions_name_the_groups_layers(doc):
    mentions = list(MENTION.finditer(text(doc)))
    assert mentions or TABLE.search(text(doc))   # each document names groups somewhere
    for m in mentions:
        names = tuple(re.findall(r"`([\w.]+)`", m.group(2)))
        model = "vgg11_bn" if all(n.startswith("features.") for n in names) else "resnet18"
        assert set(names) == set(groups(model)[int(m.group(1))]), f"{doc}: {m.group(0)!r} ({model})"


@pytest.mark.parametrize("doc", DOCS)
def test_every_layer_name_is_in_a_checked_place(doc):
    body = text(doc)
    checked = [m.span() for m in MENTION.finditer(body)] + [m.span() for m in TABLE.finditer(body)]
    loose = [(body.count("\n", 0, m.start()) + 1, m.group(0)) for m in LAYER.finditer(body)
             if not any(a <= m.start() < b for a, b in checked)]
    assert loose == [], f"{doc}: layer names outside a group table or `group N (...)` mention"


def test_the_checks_catch_a_wrong_name():
    """RESULTS.md once called ResNet18 group 3 `layer3.1.conv1` (it is group 4)."""
    wrong = MENTION.search("group 3 (`layer3.1.conv1`)")
    assert set(groups("resnet18")[int(wrong.group(1))]) != {"layer3.1.conv1"}
    assert "layer3.1.conv1" in groups("resnet18")[4]
    assert [m.group(0) for m in LAYER.finditer("the `conv1.bias` of conv1 and layer2.0.shortcut.0")] == \
        ["conv1", "layer2.0.shortcut.0"]


if __name__ == "__main__":
    print(group_table(), end="")
