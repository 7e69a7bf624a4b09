"""Old module paths and class names, kept working for one release (until 0.2.0).

Each old module is a file of three lines that calls `moved()`: importing it warns once
with a `DeprecationWarning` naming the new place, and every attribute is read from the
new module, under its new name where a class was renamed.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

REMOVED_IN = "0.2.0"


def moved(
    old: str, new: str, renamed: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Warn that module `old` moved to `new`; return the old module's `__getattr__`, `__dir__`."""
    warnings.warn(
        f"{old} moved to {new}; the old path goes in migration-fsm {REMOVED_IN}",
        DeprecationWarning,
        stacklevel=3,
    )
    aliases = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        return getattr(importlib.import_module(new), aliases.get(name, name))

    def __dir__() -> list[str]:
        return sorted({*dir(importlib.import_module(new)), *aliases})

    return __getattr__, __dir__
