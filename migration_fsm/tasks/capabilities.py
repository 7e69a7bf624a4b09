"""The optional capabilities of a `TaskStore`, declared in one place.

A store implements the `TaskStore` protocol (`records.py`) and, when it can do better than
the plain path, any of these. Callers check with `isinstance(store, Capability)` and fall
back to the plain `TaskStore` methods otherwise; they never probe with `getattr`.

| capability | method | who uses it | plain path without it |
| --- | --- | --- | --- |
| `BulkGet` | `get_many(keys)` | validation re-reading its differences | one `get` per key |
| `IdentityScan` | `scan_identities`, `identity_checksum` | validation | identity rows from `scan`'s records |
| `ForwardPut` | `put_forward(record)` | `DualWriter`'s second write | `put` |
| `Count` | `count()` | backfill's total | the sum of `count_by_status()` |
| `Closeable` | `close()` | whoever opened the store (`sides.open_side`, the demo) | nothing to release |

`MemoryTaskStore` offers `BulkGet` and `ForwardPut`; `SqlTaskStore` offers all five.
Pure: this module imports nothing at run time but `typing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from .identity import IdentityRow
    from .records import TaskRecord


@runtime_checkable
class BulkGet(Protocol):
    """Many `get`s in a few round trips."""

    def get_many(self, keys: Sequence[str]) -> Mapping[str, TaskRecord]:
        """The records with these keys; a key with no record is left out."""
        ...


@runtime_checkable
class IdentityScan(Protocol):
    """Identity rows (`identity.py`) without decoding records."""

    name: str

    def scan_identities(self, after: str | None, limit: int) -> Sequence[IdentityRow]:
        """Up to `limit` identity rows with key > `after`, ascending in Python `str` order."""
        ...

    def identity_checksum(self, row: IdentityRow) -> str:
        """`TaskRecord.checksum()` of the record this row decodes to (a `DataError` when the
        row cannot be decoded)."""
        ...


@runtime_checkable
class ForwardPut(Protocol):
    """A write that never moves a task back (`records.is_behind`)."""

    def put_forward(self, record: TaskRecord) -> bool:
        """`put`, unless the stored task of this key is further along; whether it wrote."""
        ...


@runtime_checkable
class Count(Protocol):
    """How many tasks the store holds, cheaper than counting them by status."""

    def count(self) -> int:
        """How many tasks the store holds."""
        ...


@runtime_checkable
class Closeable(Protocol):
    """Resources (an engine, connections) that whoever opened the store releases."""

    def close(self) -> None:
        """Release them; the store is not used afterwards."""
        ...
