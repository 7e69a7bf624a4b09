"""Streaming reads of a task store: keyset pages, and the merge of two key-ordered scans.

Memory stays bounded by one page per side, whatever the size of the stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exceptions import DataError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from .records import TaskRecord, TaskStore


def pages(store: TaskStore, batch_size: int, after: str | None = None) -> Iterator[Sequence[TaskRecord]]:
    """Keyset pages of `store` with keys > `after`, each checked to be strictly ascending.

    Raises `DataError` naming the store and the key when a key repeats or goes backwards
    (a duplicate key, or a collation that is not Python's string order)."""
    last = after
    while True:
        found = page(store, batch_size, last)
        if found:
            last = found[-1].key
            yield found
        if len(found) < batch_size:
            return


def page(store: TaskStore, batch_size: int, after: str | None = None) -> Sequence[TaskRecord]:
    """One keyset page of `store`: up to `batch_size` records with keys > `after`, checked as
    `pages` checks them."""
    found = store.scan(after, batch_size)
    check_ascending(store.name, after, [record.key for record in found])
    return found


def check_ascending(name: str, after: str | None, keys: Sequence[str]) -> None:
    """Raise the `DataError` naming store `name` and the first key of `keys` that is not
    above the one before it (`after` before the first)."""
    last = after
    for key in keys:
        if last is not None and not key > last:
            raise DataError(
                f"store '{name}' returned key '{key}' after '{last}': keys must be unique and"
                " ascending in Python string order (a duplicate key, or a collation that is not binary)"
            )
        last = key


def records(store: TaskStore, batch_size: int, after: str | None = None) -> Iterator[TaskRecord]:
    """Every record of `store` with key > `after`, in key order, one page in memory at a time."""
    for found in pages(store, batch_size, after):
        yield from found


def merge(
    left: Iterator[TaskRecord], right: Iterator[TaskRecord]
) -> Iterator[tuple[TaskRecord | None, TaskRecord | None]]:
    """Pairs of records with the same key from two key-ordered streams; None for a side
    that lacks the key. Yields in key order."""
    a = next(left, None)
    b = next(right, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a.key < b.key):
            yield a, None
            a = next(left, None)
        elif a is None or b.key < a.key:
            yield None, b
            b = next(right, None)
        else:
            yield a, b
            a = next(left, None)
            b = next(right, None)
