"""Helpers for the data tools' tests: task records, SQL task tables, shared in-memory stores."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData

from migration_fsm.journal import make_engine
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tasks.sql import default_task_table

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES = tuple(TaskStatus)

#: Shared in-memory stores by slot, for configs with kind = "tests.support.datatools:memory_store".
MEMORY: dict[str, MemoryTaskStore] = {}


def memory_store(slot: str) -> MemoryTaskStore:
    """The shared in-memory store of `slot` (a store factory for the config)."""
    return MEMORY.setdefault(slot, MemoryTaskStore(name=slot))


class UnreadyStore(MemoryTaskStore):
    """A store that reads and writes but says its setup is incomplete (`SetupCheck`)."""

    def __init__(self, problem: str) -> None:
        super().__init__(name="unready")
        self.problem = problem

    def check_setup(self) -> list[str]:
        return [self.problem]


def memory_stores() -> dict[str, dict[str, Any]]:
    """A `stores` setting naming the shared in-memory stores `old` and `new`."""
    return {side: {"kind": "tests.support.datatools:memory_store", "slot": side} for side in ("old", "new")}


def task(
    i: int, *, status: TaskStatus = TaskStatus.PENDING, attempts: int = 0, prefix: str = "t"
) -> TaskRecord:
    """Task number `i`: key `t0000042`, a small payload, created `i` seconds after T0."""
    return TaskRecord(
        key=f"{prefix}{i:07d}",
        type="email" if i % 3 else "report",
        payload={"to": f"user{i}@example.com", "n": i, "tags": ["a", "b"]},
        status=status,
        attempts=attempts,
        created_at=T0 + timedelta(seconds=i),
        updated_at=T0 + timedelta(seconds=i),
        metadata={"origin": "test"} if i % 2 else {},
    )


def tasks(count: int, start: int = 0, *, mixed: bool = False, prefix: str = "t") -> list[TaskRecord]:
    """`count` tasks from number `start`; with `mixed`, statuses cycle through every status."""
    cycle = itertools.cycle(STATUSES if mixed else (TaskStatus.PENDING,))
    return [task(i, status=next(cycle), prefix=prefix) for i in range(start, start + count)]


def everything(store: Any) -> list[TaskRecord]:
    """Every record of a store, in key order."""
    found: list[TaskRecord] = []
    after = None
    while page := store.scan(after, 1000):
        found.extend(page)
        after = page[-1].key
    return found


def create_task_table(url: str, name: str) -> None:
    """A task table with the default column names (key sorts in code point order on PostgreSQL)."""
    engine = make_engine(url, create=True)
    metadata = MetaData()
    default_task_table(metadata, name, dialect=engine.dialect.name)
    metadata.create_all(engine)
    engine.dispose()


def row_counts(url: str, table: str) -> tuple[int, int]:
    """(rows, distinct keys) of a task table."""
    engine = make_engine(url)
    with engine.connect() as conn:
        rows, keys = conn.exec_driver_sql(f'SELECT count(*), count(DISTINCT "key") FROM {table}').one()
    engine.dispose()
    return int(rows), int(keys)


def sql_stores(url: str, old: str = "old_tasks", new: str = "new_tasks") -> dict[str, dict[str, Any]]:
    """A `stores` setting for two task tables in the database at `url`."""
    return {
        "old": {"kind": "sql", "url": url, "table": old},
        "new": {"kind": "sql", "url": url, "table": new},
    }


def write_stores_config(path: Path, stores: dict[str, dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """Write a TOML config with these stores (and `extra` top-level lines); returns its path."""
    lines = list(extra)
    for side, table in stores.items():
        lines.append(f"[stores.{side}]")
        lines += [f'{key} = "{value}"' for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@functools.cache
def hundred_thousand() -> tuple[TaskRecord, ...]:
    """100,000 pending tasks, built once per test session."""
    return tuple(tasks(100_000))
