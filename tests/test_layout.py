"""The package's shape: the library stands alone (only experiments/ and the CLI import the
experiment side) and no module imports, directly or through others, itself. Every import counts,
also those inside functions (a lazy import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "intrafusion"


def module_name(path: Path) -> str:
    parts = ["intrafusion", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` (module `name`) imports, resolved like Python does."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_only_the_experiment_side_and_the_cli_import_experiments():
    offenders = sorted(f"{name} imports {target}" for name, targets in graph().items()
                       for target in targets if target.startswith("intrafusion.experiments")
                       and not name.startswith("intrafusion.experiments") and name != "intrafusion.cli")
    assert offenders == []


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_walk_sees_real_imports():
    """The walk itself: known edges are found (a broken resolver would make the tests above pass)."""
    edges = graph()
    assert "intrafusion.evaluator" in edges["intrafusion.allocation.profile"]
    assert "intrafusion.experiments.parallel" in edges["intrafusion.experiments.grid"]
    assert "intrafusion.allocation" in edges["intrafusion.api"]
