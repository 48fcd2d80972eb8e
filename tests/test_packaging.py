"""pyproject.toml: every package is installed and the pins are requirements.txt's (the console
command is run in test_cli.py)."""
import tomllib

from setuptools import find_packages

from helpers import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(lines) -> dict[str, str]:
    """{name: version} of `name==version` lines (names lower-cased)."""
    pairs = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    assert all(len(p) == 2 for p in pairs), f"not pinned exactly: {pairs}"
    return {name.strip().lower(): version.strip() for name, version in pairs}


def test_every_folder_of_python_files_is_an_installed_package():
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    packages = set(find_packages(str(ROOT), include=find["include"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "intrafusion").rglob("*.py")}
    assert folders == packages and {"intrafusion.models", "intrafusion.experiments"} <= packages


def test_pins_are_the_requirements_lock():
    """requirements.txt is what the README installs: the dependencies and the test extra,
    each at the same exact version (torch stays 2.13.0)."""
    project = PYPROJECT["project"]
    declared = pins(project["dependencies"])
    test = pins(project["optional-dependencies"]["test"])
    assert not declared.keys() & test.keys()
    assert declared | test == pins((ROOT / "requirements.txt").read_text().splitlines())
    assert declared["torch"] == "2.13.0"

