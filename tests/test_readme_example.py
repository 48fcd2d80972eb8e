"""The README's "Compress your own model" section runs as written and prints what it shows."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks(heading: str = "## Compress your own model") -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the README section under `heading`."""
    text = README.read_text()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S)


def test_section_has_python_blocks_each_followed_by_its_output():
    kinds = [lang for lang, _ in section_blocks()]
    assert kinds == ["python", "text", "python", "text"]


@pytest.mark.filterwarnings("ignore:intra_fusion")
def test_readme_example_prints_what_the_readme_shows():
    blocks = section_blocks()
    namespace: dict = {"__name__": "readme_example"}
    for (_, code), (_, shown) in zip(blocks[::2], blocks[1::2]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), namespace)
        assert out.getvalue() == shown
    assert namespace["small"].training  # the example ends in train mode, as an ordinary network
