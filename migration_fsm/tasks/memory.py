"""`MemoryTaskStore`: a thread-safe in-memory `TaskStore`, for tests, demos and users' tests."""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING

from .records import TaskRecord, TaskStatus, is_behind

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import datetime

    from .records import ProgressUpdate


class MemoryTaskStore:
    """A `TaskStore` held in a dict; `scan` is in Python string order of keys."""

    def __init__(self, name: str = "memory", records: Sequence[TaskRecord] = ()) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._records: dict[str, TaskRecord] = {}
        self._keys: list[str] = []
        self.put_many(records)

    def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._keys, after)
            return [self._records[key] for key in self._keys[start : start + limit]]

    def get(self, key: str) -> TaskRecord | None:
        with self._lock:
            return self._records.get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, TaskRecord]:
        with self._lock:
            return {key: self._records[key] for key in keys if key in self._records}

    def put(self, record: TaskRecord) -> None:
        self.put_many([record])

    def put_forward(self, record: TaskRecord) -> bool:
        """`put`, unless the stored task of this key is further along (`SqlTaskStore.put_forward`)."""
        with self._lock:
            stored = self._records.get(record.key)
            if stored is not None and is_behind(record.status, stored.status):
                return False
            if stored is None:
                bisect.insort(self._keys, record.key)
            self._records[record.key] = record
            return True

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        """Set the task's status, attempts and updated_at only (`capabilities.SetProgress`)."""
        with self._lock:
            stored = self._records.get(key)
            if stored is None:
                return False
            self._records[key] = stored.model_copy(
                update={"status": status, "attempts": attempts, "updated_at": updated_at}
            )
            return True

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        """`set_progress` for a batch, each row under its own condition (`capabilities.SetProgressMany`)."""
        done = 0
        with self._lock:
            for update in updates:
                stored = self._records.get(update.key)
                if stored is None or (update.expected is not None and stored.status is not update.expected):
                    continue
                self._records[update.key] = stored.model_copy(
                    update={
                        "status": update.status,
                        "attempts": update.attempts,
                        "updated_at": update.updated_at,
                    }
                )
                done += 1
        return done

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        with self._lock:
            for record in records:
                if record.key not in self._records:
                    bisect.insort(self._keys, record.key)
                self._records[record.key] = record
        return len(records)

    def delete(self, key: str) -> None:
        """Remove a record (a test helper; not part of the protocol)."""
        with self._lock:
            if self._records.pop(key, None) is not None:
                self._keys.remove(key)

    def count_by_status(self) -> Mapping[TaskStatus, int]:
        with self._lock:
            counts = dict.fromkeys(TaskStatus, 0)
            for record in self._records.values():
                counts[record.status] += 1
            return counts

    def __len__(self) -> int:
        return len(self._records)
