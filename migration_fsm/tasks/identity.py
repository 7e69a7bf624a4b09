"""Identity rows: the cheap form of a task that validation compares.

Validation reads every task of both sides, and almost all of them are equal. Decoding a
row into a `TaskRecord` and hashing its canonical JSON costs ten times more than reading
it, so validation compares *identity rows* instead: the task's key, its raw identity
values (type, payload, created_at) as the store holds them, its status and its attempts.

An identity row is `(key, type, payload, created_at, status, attempts)` where `payload` is
JSON text or a dict, `created_at` is ISO 8601 text or a datetime (naive means UTC),
`status` is a `TaskStatus` value (a `str`) and `attempts` an int. Those are the values the
stores' readers decode, with the same rules on every store, so two rows whose raw identity
values are equal have equal identities. Rows whose raw values differ may still hold the same
identity in another form (JSON with other spacing, a timestamp in another zone):
`identity_checksum` settles that, and equals `TaskRecord.checksum()` of the decoded record.

A store offers identity rows cheaply through `capabilities.IdentityScan` (`SqlTaskStore` does: no
pydantic, no JSON parsing); any other store's rows are built from its records.
"""

from __future__ import annotations

import json
from datetime import datetime
from operator import itemgetter, lt
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import DataError
from .capabilities import BulkGet, IdentityScan
from .records import TaskRecord, TaskStatus, identity_digest, identity_of
from .scan import check_ascending

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from .records import TaskStore


#: (key, type, payload, created_at, status, attempts, run_at); see the module docstring.
IdentityRow = tuple[str, Any, Any, Any, str, int, Any]

#: Positions in an identity row.
KEY: Final = 0
TYPE: Final = 1
PAYLOAD: Final = 2
CREATED_AT: Final = 3
STATUS: Final = 4
ATTEMPTS: Final = 5
RUN_AT: Final = 6
_key_of = itemgetter(KEY)


def get_many(store: TaskStore, keys: Sequence[str]) -> Mapping[str, TaskRecord]:
    """`store.get_many(keys)` when the store offers it, else one `get` per key."""
    if isinstance(store, BulkGet):
        return store.get_many(keys)
    found = {key: store.get(key) for key in keys}
    return {key: record for key, record in found.items() if record is not None}


def record_row(record: TaskRecord) -> IdentityRow:
    """The identity row of a decoded record."""
    return (
        record.key,
        record.type,
        record.payload,
        record.created_at,
        record.status,
        record.attempts,
        record.run_at,
    )


def _timestamp(name: str, value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a timestamp")
    return value


def checksum_of(key: str, type_: Any, payload: Any, created_at: Any, run_at: Any = None) -> str:
    """`TaskRecord.checksum()` of a task with these raw identity values (JSON text or a dict,
    ISO text or a datetime; run_at None for none). Raises `ValueError`/`TypeError` when a
    value cannot be decoded."""
    if isinstance(payload, str | bytes):
        payload = json.loads(payload)
    if not isinstance(type_, str) or not isinstance(payload, dict):
        raise TypeError("type must be text and payload a JSON object")
    scheduled = None if run_at is None else _timestamp("run_at", run_at)
    identity = identity_of(key, type_, payload, _timestamp("created_at", created_at), scheduled)
    return identity_digest(identity)


class RecordRows:
    """Identity rows of any `TaskStore`, built from the records its `scan` returns."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.name = store.name

    def scan_identities(self, after: str | None, limit: int) -> Sequence[IdentityRow]:
        return [record_row(record) for record in self.store.scan(after, limit)]

    def identity_checksum(self, row: IdentityRow) -> str:
        try:
            return checksum_of(row[KEY], row[TYPE], row[PAYLOAD], row[CREATED_AT], row[RUN_AT])
        except (TypeError, ValueError) as exc:
            raise DataError(f"store '{self.name}': key {row[KEY]!r}: {exc}") from exc


def identity_source(store: TaskStore, *, fast: bool) -> IdentityScan:
    """The store itself when `fast` and it offers `IdentityScan`; else rows from its records."""
    if fast and isinstance(store, IdentityScan):
        return store
    return RecordRows(store)


def identity_pages(
    source: IdentityScan, batch_size: int, after: str | None = None
) -> Iterator[Sequence[IdentityRow]]:
    """Keyset pages of identity rows with keys > `after`, each checked to be strictly ascending
    (a `DataError` naming the store and the key otherwise, as `scan.pages` does)."""
    last = after
    while True:
        page = source.scan_identities(last, batch_size)
        if page:
            keys = list(map(_key_of, page))
            if (last is not None and not last < keys[0]) or not all(map(lt, keys, keys[1:])):
                check_ascending(source.name, last, keys)  # raises, naming the key
            last = keys[-1]
            yield page
        if len(page) < batch_size:
            return


def status_of(value: str) -> TaskStatus:
    """The `TaskStatus` of an identity row's status."""
    return value if isinstance(value, TaskStatus) else TaskStatus(value)
