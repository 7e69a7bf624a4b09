"""`TaskRecord`, `TaskStatus` and the `TaskStore` protocol (DESIGN.md section 6, contract).

Pure: no I/O. Both the backend client and the data tools build on these.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


class TaskStatus(StrEnum):
    """Where a task is in its life, on either side."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: How far along a task is: pending, then running, then finished (any of the three ends).
_PROGRESS_RANK: dict[TaskStatus, int] = {
    TaskStatus.PENDING: 0,
    TaskStatus.RUNNING: 1,
    TaskStatus.COMPLETED: 2,
    TaskStatus.FAILED: 2,
    TaskStatus.CANCELLED: 2,
}


def is_behind(status: TaskStatus, stored: TaskStatus) -> bool:
    """Whether writing a task in `status` over one stored in `stored` would move it back
    (pending over running or finished, running over finished)."""
    return _PROGRESS_RANK[status] < _PROGRESS_RANK[stored]


#: Fields whose change means "a different task", not "the same task, further along".
IDENTITY_FIELDS: tuple[str, ...] = ("key", "type", "payload", "created_at", "run_at")
#: Fields that move as the task runs.
PROGRESS_FIELDS: tuple[str, ...] = ("status", "attempts")


def to_utc(value: datetime) -> datetime:
    """`value` as timezone-aware UTC; a naive timestamp is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_text(value: datetime) -> str:
    """The canonical text of a timestamp: UTC, microseconds, `Z`."""
    return to_utc(value).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the same bytes in every process and version."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def same_json(a: Any, b: Any) -> bool:
    """Whether two decoded JSON values have the same canonical JSON, without encoding them:
    equal and of the same JSON types all the way down (`True`, `1` and `1.0` are three values,
    as their JSON is; key order never matters; `-0.0` is not `0.0`). Python's `==` alone
    says `True == 1 == 1.0`."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(value, b[key]) for key, value in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def identity_digest(identity: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of an identity (`TaskRecord.identity()`'s form): the
    checksum, shared by `TaskRecord.checksum` and validation's raw rows."""
    return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()


def identity_of(
    key: str, type_: str, payload: dict[str, Any], created_at: datetime, run_at: datetime | None
) -> dict[str, Any]:
    """`TaskRecord.identity()` of a task with these values (shared with validation's raw rows)."""
    identity = {"key": key, "type": type_, "payload": payload, "created_at": utc_text(created_at)}
    if run_at is not None:
        identity["run_at"] = utc_text(run_at)
    return identity


class TaskRecord(BaseModel):
    """One task, as both systems know it. `key` is the identity they share."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(min_length=1)
    type: str
    payload: dict[str, Any]
    status: TaskStatus
    attempts: int = Field(default=0, ge=0)
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: When the task may run at the earliest (a scheduled task); None: as soon as a worker is free.
    run_at: datetime | None = None

    @field_validator("created_at", "updated_at", "run_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else to_utc(value)

    def identity(self) -> dict[str, Any]:
        """The fields the checksum covers, in canonical form. `run_at` is present only when
        the task has one, so the checksum of a task without a scheduled time is what it was
        before `run_at` existed (archives written then still verify)."""
        return identity_of(self.key, self.type, self.payload, self.created_at, self.run_at)

    def checksum(self) -> str:
        """SHA-256 of the canonical JSON of the identity fields (key, type, payload,
        created_at, and run_at when set)."""
        return identity_digest(self.identity())

    def differing_fields(self, other: TaskRecord) -> list[str]:
        """The identity and progress fields whose values differ from `other`'s."""
        mine, theirs = self.identity(), other.identity()
        fields = [
            name
            for name in IDENTITY_FIELDS
            if canonical_json(mine.get(name)) != canonical_json(theirs.get(name))
        ]
        fields += [name for name in PROGRESS_FIELDS if getattr(self, name) != getattr(other, name)]
        return fields


class ProgressUpdate(NamedTuple):
    """One row of `set_progress_many` (`capabilities.SetProgressMany`): set task `key`'s
    status, attempts and updated_at; with `expected`, only while its stored status still reads
    as `expected` (a compare-and-set on what the caller read)."""

    key: str
    status: TaskStatus
    attempts: int
    updated_at: datetime
    expected: TaskStatus | None = None


@runtime_checkable
class TaskStore(Protocol):
    """A side of the migration: the old task manager's tasks or the new queue's."""

    name: str

    def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
        """Up to `limit` records with key > `after`, ascending in Python `str` order."""
        ...

    def get(self, key: str) -> TaskRecord | None:
        """The record with this key, or None."""
        ...

    def put(self, record: TaskRecord) -> None:
        """Insert or replace the record with this key (idempotent)."""
        ...

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        """Insert or replace each record by key, as one batch; returns how many were written."""
        ...

    def count_by_status(self) -> Mapping[TaskStatus, int]:
        """How many records are in each status (every status present, zero included)."""
        ...
