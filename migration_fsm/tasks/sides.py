"""The two sides of the migration, built from the `[stores.old]` / `[stores.new]` config."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..exceptions import ConfigError
from ..fsm import Side  # noqa: TC001 -- read at run time by the old path's `SideName` (data/sides.py)
from .capabilities import Closeable

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..config import Settings
    from .records import TaskStore

SIDES: tuple[Side, Side] = ("old", "new")


def stores_configured(settings: Settings) -> bool:
    """Whether both `[stores.old]` and `[stores.new]` are configured."""
    return all(side in settings.stores for side in SIDES)


def side_name(value: str) -> Side:
    """`value` as a side name, or `BadInput` (exit 2)."""
    if value == "old":
        return "old"
    if value == "new":
        return "new"
    raise ConfigError(f"side must be 'old' or 'new', not '{value}'")


@contextmanager
def open_side(settings: Settings, side: Side) -> Iterator[TaskStore]:
    """The task store of `side`, closed (when it can be) on the way out."""
    config = settings.stores.get(side)
    if config is None:
        raise ConfigError(
            f"no [stores.{side}] table in the config: the data tools need both stores"
            ' (docs/REFERENCE.md, "Stores")'
        )
    from .factory import build_store

    store = build_store(config, side)
    try:
        yield store
    finally:
        if isinstance(store, Closeable):
            store.close()


@contextmanager
def open_sides(settings: Settings) -> Iterator[tuple[TaskStore, TaskStore]]:
    """The old and the new task store."""
    with open_side(settings, "old") as old, open_side(settings, "new") as new:
        yield old, new


def shares_migration_file(settings: Settings, side: Side) -> bool:
    """Whether `side`'s store is a table in the migration database's own SQLite file (a data
    fence then cannot hold that file's write lock while the tool writes)."""
    from ..journal.db import sqlite_path

    store = settings.stores.get(side)
    if store is None or not store.url:
        return False
    mine, theirs = sqlite_path(settings.database_url), sqlite_path(store.url)
    return mine is not None and theirs is not None and mine.resolve() == theirs.resolve()
