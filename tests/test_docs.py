"""The documents (README.md, RESULTS.md, docs/*.md) agree with the code.

- Layer names given for groups are the ones the code prunes. Two forms are checked against
  `Pruner(build_model(name), x).groups`: the generated group table between the `<!-- group table -->`
  markers (in docs/grid.md; `python tests/test_docs.py` prints it), and mentions
  `group N (`a`, `b`)` in the text, whose model is told by its names (`features.*`: vgg11_bn, else
  resnet18). Any other layer name in the documents is an error, so none can drift unchecked.
- Every relative link resolves to a file of the repository, and an anchor to a heading of it.
- Every `--flag` named is one that a command-line parser defines (the `intrafusion` commands of
  cli.COMMANDS, and the argparse flags of the bench/ and top-level scripts).
- README.md stays short (at most README_LINES lines); the rest lives in docs/.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from intrafusion.cli import COMMANDS, command_parser
from intrafusion.groups import Pruner
from intrafusion.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "RESULTS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
TABLE_DOC = "docs/grid.md"
README_LINES = 200
MODELS = ("vgg11_bn", "resnet18")
LAYER = re.compile(r"(?<![\w.])(?:features\.\d+|layer\d\.\d\.(?:conv\d|shortcut\.0)|conv1)(?!\.?\w)")
MENTION = re.compile(r"group (\d+)\**\s*\(((?:`[\w.]+`(?:,\s*)?)+)\)")
TABLE = re.compile(r"<!-- group table -->\n(.*?)<!-- end group table -->\n", re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


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


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but `-` and `_` dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of every heading of `doc` (code blocks left out)."""
    body = FENCE.sub("", doc.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", body, re.M)}


def broken_links(source: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `source` whose file is not in `root` or whose anchor is no heading of it."""
    broken = []
    for target in LINK.findall(FENCE.sub("", source.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.is_file() or not file.is_relative_to(root):
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    return broken


def script_flags(path: Path) -> set[str]:
    """The `--flags` that `path` passes to add_argument (a script building its own argparse)."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags.update(a.value for a in node.args
                         if isinstance(a, ast.Constant) and str(a.value).startswith("--"))
    return flags


@lru_cache(maxsize=None)
def known_flags() -> frozenset[str]:
    """Every option string of the `intrafusion` commands and of the bench/ and top-level scripts."""
    flags = {s for name in COMMANDS for action in command_parser(name)._actions
             for s in action.option_strings}
    for script in [*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        flags |= script_flags(script)
    return frozenset(flags)


def test_the_group_table_is_the_generated_one():
    tables = {doc: TABLE.findall(text(doc)) for doc in DOCS}
    assert tables.pop(TABLE_DOC) == [group_table()], "regenerate it with `python tests/test_docs.py`"
    assert not any(tables.values()), "the group table belongs in " + TABLE_DOC


@pytest.mark.parametrize("doc", DOCS)
def test_group_mentions_name_the_groups_layers(doc):
    for m in MENTION.finditer(text(doc)):
        names = tuple(re.findall(r"`([\w.]+)`", m.group(2)))
        model = "vgg11_bn" if all(n.startswith("features.") for n in names) else "resnet18"
        assert set(names) == set(groups(model)[int(m.group(1))]), f"{doc}: {m.group(0)!r} ({model})"


def test_results_name_groups_by_their_layers():
    assert MENTION.search(text("RESULTS.md"))


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


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    assert broken_links(ROOT / doc) == []


def test_the_link_check_catches_a_missing_file_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `b` (c)\n[ok](#a-b-c) [gone](missing.md) [bad](#nowhere) [web](https://x.y/z)\n"
                    "[self](page.md#a-b-c) [out](../x.md)\n")
    (tmp_path.parent / "x.md").write_text("# x\n")
    assert broken_links(page, tmp_path) == ["missing.md", "#nowhere", "../x.md"]
    assert slug("Every group pruned (`--group_idxs all`)") == "every-group-pruned---group_idxs-all"


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_named_exists(doc):
    body = LINK.sub("", text(doc))  # link targets hold anchors such as #…---group_idxs-all
    unknown = sorted(set(FLAG.findall(body)) - known_flags())
    assert unknown == [], f"{doc}: flags no parser defines"


def test_the_flag_check_knows_the_parsers():
    flags = known_flags()
    assert {"--group_idxs", "--no-resume", "--macs", "--round-to", "--json", "--paths", "--reps"} <= flags
    assert "--no-such-flag" not in flags
    assert FLAG.findall("`--a-b`, x--y, ---c, (--d_e)") == ["--a-b", "--d_e"]


def test_readme_is_short():
    assert len(text("README.md").splitlines()) <= README_LINES


def test_readme_runs_the_tests_as_ci_does():
    """The README's test command ends in the command .ci/run ends in."""
    ci = [line for line in text(".ci/run").splitlines() if line.strip()][-1]
    blocks = re.findall(r"```bash\n(.*?)```", text("README.md"), re.S)
    assert any(block.strip().endswith("&& " + ci) for block in blocks), ci


if __name__ == "__main__":
    print(group_table(), end="")
