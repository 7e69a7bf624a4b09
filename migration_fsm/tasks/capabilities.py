"""The optional capabilities of a `TaskStore`, declared in one place.

A store implements the `TaskStore` protocol (`records.py`) and, when it can do better than
the plain path, any of these. Callers check with `isinstance(store, Capability)` and fall
back to the plain `TaskStore` methods otherwise; they never probe with `getattr`.

| capability | method | who uses it | plain path without it |
| --- | --- | --- | --- |
| `BulkGet` | `get_many(keys)` | validation re-reading its differences | one `get` per key |
| `IdentityScan` | `scan_identities`, `identity_checksum` | validation | identity rows from `scan`'s records |
| `IdentityGet` | `identities_of(keys)` | validation re-reading its differences | records (`BulkGet`) |
| `ForwardPut` | `put_forward(record)` | `DualWriter`'s writes | `put` |
| `SetProgress` | `set_progress(...)` | transfer, hand-over, `retire_old` | `get` + `put_forward` |
| `SetProgressMany` | `set_progress_many(updates)` | the same, a batch at a time | `set_progress` per row |
| `Count` | `count()` | backfill's total | the sum of `count_by_status()` |
| `Closeable` | `close()` | whoever opened the store (`sides.open_side`, the demo) | nothing to release |
| `SetupCheck` | `check_setup()` | `stores_reachable` (so `advance --dry-run`) | a scan and a count only |

`MemoryTaskStore` offers `BulkGet`, `ForwardPut`, `SetProgress` and `SetProgressMany`;
`SqlTaskStore` offers all eight but `SetupCheck`; the queue adapters (`migration_fsm.adapters`)
offer `SetupCheck` and what their system allows.
Pure: this module imports nothing at run time but `typing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import datetime

    from .identity import IdentityRow
    from .records import ProgressUpdate, TaskRecord, TaskStatus


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
class IdentityGet(Protocol):
    """Identity rows of given keys, in a few round trips (validation's re-read)."""

    def identities_of(self, keys: Sequence[str]) -> Mapping[str, IdentityRow]:
        """The identity rows (`scan_identities`' form) of these keys; a key with no task is
        left out."""
        ...


@runtime_checkable
class ForwardPut(Protocol):
    """A write that never moves a task back (`records.is_behind`)."""

    def put_forward(self, record: TaskRecord) -> bool:
        """`put`, unless the stored task of this key is further along; whether it wrote."""
        ...


@runtime_checkable
class SetProgress(Protocol):
    """An update of a stored task's progress columns alone (DESIGN.md section 10)."""

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        """Set the status, attempts and updated_at of the stored task `key`, in the store's own
        formats, leaving every other column as it is (a legacy table's payload text and
        created_at stay byte for byte); False when the store has no task `key`."""
        ...


@runtime_checkable
class SetProgressMany(Protocol):
    """`SetProgress` for a batch of rows, in one transaction (a store's
    `set_progress` costs a transaction, a commit, per row)."""

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        """Apply each update as `set_progress` would, all in one transaction; each row keeps
        its own condition: its key, and with `expected` the stored status it must still read
        as (a row that changed since the caller read it is left as it is). Returns how many
        rows were updated (a key the store does not have, or a failed `expected`, counts 0)."""
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


@runtime_checkable
class SetupCheck(Protocol):
    """A store over a real queue knows what it needs: the library's version, its schema, the
    settings that keep its tasks (DESIGN.md section 10, "Real queues")."""

    def check_setup(self) -> list[str]:
        """What keeps the store from working safely, one line each saying what to fix;
        empty when it is ready."""
        ...
