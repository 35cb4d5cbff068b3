"""The one direction of imports (docs/ARCHITECTURE.md): every import in the package, inside functions too, goes
to the importing module's own layer or to a layer below it. The layer order is read from the document itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flashlm"


def layers() -> dict[str, int]:
    """Top-level part of flashlm (subpackage or module) -> rank (0 = bottom), from the ```layers block."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S).group(1)
    rows = [line.split() for line in block.strip().splitlines()]
    return {name: rank for rank, row in enumerate(reversed(rows)) for name in row}


def part_of(module: str) -> str:
    """'flashlm.runtime.executor' -> 'runtime'; 'flashlm' (the package root: the API's lazy exports) -> 'model'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "model"


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every import of flashlm in the file, relative ones resolved."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if path.name == "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, node.lineno) for n in names if n == "flashlm" or n.startswith("flashlm.")]
    return found


def violations(rank: dict[str, int]) -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part_of(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
        for target, line in imports(path):
            there = part_of(target)
            if there not in rank or here not in rank:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {here!r} or {there!r} is not in the layer list")
            elif rank[there] > rank[here]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {target} (a layer above it)")
    return bad


def test_every_part_of_the_package_has_a_layer():
    rank = layers()
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert parts - set(rank) == set()


def test_imports_go_one_way():
    assert violations(layers()) == []


def test_the_check_catches_an_import_against_the_direction(tmp_path, monkeypatch):
    """A planted upward import (quant -> runtime, inside a function) is reported."""
    planted = PACKAGE / "quant" / "_planted_for_test.py"
    planted.write_text("def f():\n    from flashlm.runtime import executor\n    return executor\n")
    try:
        found = violations(layers())
    finally:
        planted.unlink()
    assert found == ["flashlm/quant/_planted_for_test.py:2: quant imports flashlm.runtime (a layer above it)"]


def test_the_package_does_not_import_the_labs():
    for path in PACKAGE.rglob("*.py"):
        assert not re.search(r"^\s*(from|import) labs\b", path.read_text(), re.M), path
