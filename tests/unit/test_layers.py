"""The package's folders are its layers: every import goes down the order that
docs/ARCHITECTURE.md draws (click's `tests/test_imports.py` checks the same kind of rule)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "migration_fsm"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def layer_table() -> list[set[str]]:
    """The layers from the table in docs/ARCHITECTURE.md, top first."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Layers") :]
    section = section[: section.index("\n## ", 1)]
    layers: list[set[str]] = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        layers.append(set(re.findall(r"`([\w.]+)`", first_cell)))
    return layers


def top_of(module: str) -> str:
    """`migration_fsm.tasks.sql` -> `tasks`: the part of the package a module belongs to."""
    parts = module.split(".")
    assert parts[0] == "migration_fsm"
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every package module `path` imports (at top level, in functions, under TYPE_CHECKING)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("migration_fsm")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("migration_fsm"):
                continue
            if target == "migration_fsm" or (not node.module and node.level):
                # `from . import commands`: each name is a module of that package
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_the_layer_table_names_every_part_of_the_package_once() -> None:
    """Each top-level module and folder of the package stands in exactly one layer."""
    named = [name for layer in layer_table() for name in layer]
    parts = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    parts |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(parts) == sorted(named)


def upward_imports(path: Path, root: Path = ROOT) -> list[str]:
    """The imports of `path` that reach a layer above its own."""
    rank = {name: i for i, layer in enumerate(layer_table()) for name in layer}
    mine = rank[top_of(module_name(path, root))]
    return [
        f"line {line}: {target} ({top_of(target)} is above {top_of(module_name(path, root))})"
        for line, target in imports_of(path, root)
        if rank[top_of(target)] < mine
    ]


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path: Path) -> None:
    """No module imports a layer above its own."""
    assert [] == upward_imports(path)


def test_an_upward_import_inside_a_function_is_caught(tmp_path: Path) -> None:
    """The walk sees a lazy relative import inside a function, so the check above can fail."""
    fake = tmp_path / "migration_fsm" / "tasks" / "records.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..migration import Migration\n    from . import memory\n")
    assert ["line 2: migration_fsm.migration (migration is above tasks)"] == upward_imports(fake, tmp_path)


#: Above this many lines a module needs a row, and a reason, in docs/ARCHITECTURE.md.
LONG_MODULE = 500


def long_module_table() -> dict[str, int]:
    """The modules (paths under migration_fsm/) and line counts that docs/ARCHITECTURE.md's
    "Modules over 500 lines" lists, each with its reason."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Modules over 500 lines") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"^\| `([\w/.]+\.py)` \| (\d+) \| (.+) \|$", section, flags=re.MULTILINE)
    assert all(reason.strip() for *_, reason in rows)
    return {path: int(lines) for path, lines, _ in rows}


def test_every_module_over_500_lines_is_listed_with_its_reason() -> None:
    """A module past 500 lines has a row (and a reason) in the table; a listed one is still
    that long, and its count is within 50 lines of what the table says."""
    listed = long_module_table()
    long = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
        if len(path.read_text().splitlines()) > LONG_MODULE
    }
    assert sorted(long) == sorted(listed), "docs/ARCHITECTURE.md, 'Modules over 500 lines'"
    for path, lines in long.items():
        assert abs(lines - listed[path]) <= 50, f"{path}: {lines} lines, the table says {listed[path]}"
