"""The public face agrees with itself: the export table, `__all__`, the `TYPE_CHECKING`
imports and docs/API.md name the same things, and every old path or name still works
(with a warning) for one release (httpx's `tests/test_exported_members.py` checks the same)."""

from __future__ import annotations

import ast
import importlib
import re

import pytest

import migration_fsm
from tests.support import ROOT


def type_checking_imports() -> dict[str, str]:
    """name -> module of every import under `if TYPE_CHECKING:` in the package's __init__."""
    tree = ast.parse((ROOT / "migration_fsm" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    found: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            assert alias.name == alias.asname, f"{alias.name} must be re-exported `as` itself"
            found[alias.name] = (node.module or "").lstrip(".")
    return found


def test_all_is_the_export_table() -> None:
    """`__all__` lists the export table and the version, sorted, nothing else."""
    assert sorted([*migration_fsm._EXPORTS, "__version__"]) == migration_fsm.__all__


def test_type_checking_imports_match_the_export_table() -> None:
    """What a type checker sees is what `__getattr__` imports, from the same module."""
    assert dict(migration_fsm._EXPORTS) == type_checking_imports()


@pytest.mark.parametrize("name", sorted(migration_fsm._EXPORTS))
def test_every_public_name_resolves_to_its_module(name: str) -> None:
    """Each public name imports, and is defined (or re-exported) by the module the table names."""
    module = importlib.import_module(f"migration_fsm.{migration_fsm._EXPORTS[name]}")
    assert getattr(module, name) is getattr(migration_fsm, name)


def test_the_api_page_documents_exactly_the_public_names() -> None:
    """docs/API.md has one row per public name."""
    rows = re.findall(r"^\| `(\w+)` \|", (ROOT / "docs" / "API.md").read_text(), flags=re.MULTILINE)
    assert sorted(migration_fsm._EXPORTS) == sorted(rows)


@pytest.mark.parametrize(("old", "new"), sorted(migration_fsm._RENAMED.items()))
def test_a_renamed_public_name_warns_and_gives_the_new_object(old: str, new: str) -> None:
    """`migration_fsm.Store` is `migration_fsm.Journal`, with a DeprecationWarning naming it."""
    with pytest.warns(DeprecationWarning, match=f"{old} is now migration_fsm.{new}"):
        value = getattr(migration_fsm, old)
    assert getattr(migration_fsm, new) is value


OLD_PATHS = [
    ("migration_fsm.store", "Store", "migration_fsm", "Journal"),
    ("migration_fsm.engine", "Engine", "migration_fsm", "Migration"),
    ("migration_fsm.engine", "Outcome", "migration_fsm", "TransitionResult"),
    ("migration_fsm.context", "GuardResult", "migration_fsm", "GuardVerdict"),
    ("migration_fsm.builtins", "BUILTIN_GUARDS", "migration_fsm.plugins.registry", "BUILTIN_GUARDS"),
    ("migration_fsm.data.sql", "SqlTaskStore", "migration_fsm", "SqlTaskStore"),
    ("migration_fsm.data.sides", "SideName", "migration_fsm.fsm", "Side"),
    ("migration_fsm.data.records", "TaskRecord", "migration_fsm", "TaskRecord"),
    ("migration_fsm.data.validate", "validate", "migration_fsm.tools.validate", "validate"),
    ("migration_fsm.data.cutover", "drain", "migration_fsm.plugins.handover", "drain"),
]


@pytest.mark.parametrize(("path", "old", "module", "new"), OLD_PATHS)
def test_an_old_module_path_warns_and_still_gives_the_same_objects(
    path: str, old: str, module: str, new: str
) -> None:
    """Code written against 0.1.0's module paths keeps working until 0.2.0, with a warning."""
    import sys

    for name in [m for m in sys.modules if m in (path, "migration_fsm.data")]:
        del sys.modules[name]
    with pytest.warns(DeprecationWarning, match="moved to|was split"):
        shim = importlib.import_module(path)
    assert getattr(importlib.import_module(module), new) is getattr(shim, old)


def test_unknown_names_are_attribute_errors() -> None:
    """A typo is an AttributeError, not a silent None."""
    with pytest.raises(AttributeError, match="no attribute 'Jounral'"):
        _ = migration_fsm.Jounral
