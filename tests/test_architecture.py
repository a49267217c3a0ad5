"""docs/architecture.md is the rule: every module is in one layer and imports only its own layer,
the layers above it in the table, or an upward import the document allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _table(first_header: str) -> list[list[str]]:
    """The cells of the Markdown table whose first header cell is ``first_header``."""
    lines = DOC.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def _paths(cell: str) -> list[str]:
    return re.findall(r"`([\w/]+\.py)`", cell)


LAYERS = {path: rank for rank, row in enumerate(_table("Layer")) for path in _paths(row[1])}
UPWARD = {(_paths(row[0])[0], _paths(row[1])[0]) for row in _table("From")}


def _module_path(name: str) -> str | None:
    """``pipeline.ps.wire`` -> ``pipeline/ps/wire.py`` (a package -> its ``__init__.py``)."""
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(ROOT).as_posix()
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(ROOT).as_posix()
    return None


def _imports(path: str) -> set[str]:
    """The project modules ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                names.append(sub if _module_path(sub) else node.module)
        for name in names:
            if name.split(".")[0] in ("pipeline", "kernels") and (target := _module_path(name)):
                found.add(target)
    return found - {path}


def test_every_module_is_in_one_layer() -> None:
    modules = {p.relative_to(ROOT).as_posix() for d in ("pipeline", "kernels") for p in (ROOT / d).rglob("*.py")}
    assert sorted(modules - set(LAYERS)) == [], "add these modules to a layer of docs/architecture.md"
    assert sorted(set(LAYERS) - modules) == [], "docs/architecture.md lists modules that do not exist"
    assert len(LAYERS) == sum(len(_paths(row[1])) for row in _table("Layer")), "a module is in two layers"


def test_no_module_imports_a_layer_below_its_own() -> None:
    wrong = [
        f"{path} ({rank}) imports {target} ({LAYERS[target]})"
        for path, rank in LAYERS.items()
        for target in sorted(_imports(path))
        if target in LAYERS and LAYERS[target] > rank and (path, target) not in UPWARD
    ]
    assert wrong == []
    assert UPWARD and all(t in _imports(f) for f, t in UPWARD), "an allowed upward import no longer exists"
