"""The README's "Compress your own model" example, and its continuation in docs/library.md (Intra-Fusion
inside Torch-Pruning's pruner), run as written and print what the pages show."""
import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (page, section heading): run in this order, in one namespace
SECTIONS = (("README.md", "## Compress your own model"), ("docs/library.md", "## Inside Torch-Pruning's pruner"))


def section_blocks(page: str, heading: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the section of `page` under `heading`."""
    text = (ROOT / page).read_text()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)


@pytest.mark.parametrize("page, heading", SECTIONS)
def test_section_has_a_python_block_followed_by_its_output(page, heading):
    kinds = [lang for lang, _ in section_blocks(page, heading)]
    assert kinds == ["python", "text"]


@pytest.mark.filterwarnings("ignore:intra_fusion")
def test_the_example_prints_what_the_pages_show():
    namespace: dict = {"__name__": "readme_example"}
    for page, heading in SECTIONS:
        (_, code), (_, shown) = section_blocks(page, heading)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(ROOT / page), "exec"), namespace)
        assert out.getvalue() == shown, page
        if page == "README.md":
            assert namespace["small"].training  # it ends in train mode, as an ordinary network
