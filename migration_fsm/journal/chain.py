"""The journal's hash chain: each closed row's hash covers the previous hash and the row;
and the digests of the rows outside the chain that guards trust (validation runs, the
backfill checkpoint). What each covers, and what neither can detect, is in docs/VERIFY.md."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .records import JournalEntry


def chain_hash(prev_hash: str | None, migration: str, entry: JournalEntry) -> str:
    """`H(prev_hash, row)`: SHA-256 over the previous hash and the row's canonical JSON."""
    body = json.dumps(
        entry.chained_fields(migration),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(f"{prev_hash or ''}\n{body}".encode()).hexdigest()


#: The digest formats of the rows outside the chain that guards trust (revision 0007). A
#: format never changes once released: a new one gets a new version, and `row_digest_ok`
#: keeps checking the old ones.
DIGEST_FORMATS: Final = {"validation_run": "v1", "backfill": "v1"}


def row_digest(kind: str, fields: dict[str, Any]) -> str:
    """`v1:` + SHA-256 over the kind, the format and the row's canonical JSON: the digest of a
    validation run or a backfill checkpoint, stored on the row and checked by `verify` and by
    the guards that read the row. Timestamps go in as ISO 8601 UTC with microseconds."""
    version = DIGEST_FORMATS[kind]
    body = json.dumps(
        {key: _canonical(value) for key, value in fields.items()},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return f"{version}:" + hashlib.sha256(f"mfsm:{kind}:{version}\n{body}".encode()).hexdigest()


def row_digest_ok(kind: str, fields: dict[str, Any], digest: str | None) -> bool:
    """Whether `digest` is the digest of the row (None, a row never digested, is not)."""
    return digest is not None and digest == row_digest(kind, fields)


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value
