"""The journal's hash chain: each closed row's hash covers the previous hash and the row."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

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
