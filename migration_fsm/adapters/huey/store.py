"""`HueyTaskStore`: a `TaskStore` over a Huey application with SQLite storage (`SqliteHuey`),
plus a registry table of ours in the same SQLite file.

**Why a registry.** Huey keeps a task only as a pickled message in its `task` (or `schedule`)
table, and deletes that row when a consumer takes the task; a finished task leaves at most its
result (no name, no arguments); `running` is never stored; there is no enqueue time, attempt
count or timestamp. So the adapter records each task it sees in `mfsm_huey_tasks` (created by
`python -m migration_fsm.adapters.huey setup`, in Huey's own database): key (the Huey task
id), type, payload, status, attempts, created_at, updated_at, run_at, metadata. Tasks enter
the registry three ways: written through the adapter; found in Huey's queue or schedule
(enqueued by code that knows nothing of the migration: each read of the whole store first
registers the messages it has not seen); or taken by a gated consumer
(`migration_fsm.adapters.huey.worker`), which also records every status the task reaches
(running at the dequeue, then completed, failed, pending again for a retry, cancelled).

**Mapping.** `key` is the task id; `type` the Huey task name (`module.function`, through
`type_map`); `payload` the task's keyword arguments, with positional arguments named by the
task function's signature (which needs `app`: a task with positional arguments and no
signature to read is refused, never guessed); `run_at` the message's `eta`; `created_at` when
the registry first saw the task (or the record's own, when written through the adapter).

**Writes into Huey** go through Huey's own API: a new pending task is a message with the key
as its id, the payload as keyword arguments and `run_at` as its `eta` (enqueued, or added to
the schedule when in the future); a task moved away from pending (finished, cancelled, running
on the other side) is revoked (`revoke_by_id`), so a consumer, gated or stock, skips it; a task
moved back to pending is restored (`restore_by_id`) and, when its message is gone (a consumer
took it), enqueued again.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sqlite3
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from migration_fsm.exceptions import ConfigError, DatabaseUnavailable, DataError
from migration_fsm.tasks.records import TaskRecord, TaskStatus, is_behind, to_utc, utc_text

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from huey import Huey

    from migration_fsm.tasks.records import ProgressUpdate

#: The registry table (`setup` creates it, in Huey's SQLite file).
REGISTRY: Final = "mfsm_huey_tasks"
REGISTRY_DDL: Final = (
    f"CREATE TABLE IF NOT EXISTS {REGISTRY} ("
    " queue TEXT NOT NULL, key TEXT NOT NULL, type TEXT NOT NULL, payload TEXT NOT NULL,"
    " status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,"
    " updated_at TEXT NOT NULL, run_at TEXT, metadata TEXT NOT NULL DEFAULT '{}',"
    " PRIMARY KEY (queue, key))"
)
_COLUMNS: Final = "key, type, payload, status, attempts, created_at, updated_at, run_at, metadata"


def load_app(path: str) -> Huey:
    """The `Huey` instance at `package.module:attribute`."""
    from huey import Huey

    module_name, _, attr = path.partition(":")
    try:
        app = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot load the Huey application '{path}': {exc}") from exc
    if not isinstance(app, Huey):
        raise ConfigError(f"'{path}' is a {type(app).__name__}, not a Huey application")
    return app


class Registry:
    """The registry rows of one Huey queue, through the Huey storage's own SQLite connection
    and lock (so a consumer's registry writes queue behind its dequeues, never beside them)."""

    def __init__(self, huey: Huey) -> None:
        from huey.storage import SqliteStorage

        if not isinstance(huey.storage, SqliteStorage):
            raise ConfigError(
                f"the Huey application '{huey.name}' uses {type(huey.storage).__name__}: the adapter"
                " supports SqliteHuey (SqliteStorage) only"
            )
        self.huey = huey
        self.storage = huey.storage
        self.queue = huey.name

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        try:
            with self.storage.db(commit=True) as cursor:
                yield cursor
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise DataError(
                    f"Huey database {self.storage.filename} has no {REGISTRY} table: run"
                    " `python -m migration_fsm.adapters.huey setup --app MODULE:HUEY`"
                ) from exc
            raise DatabaseUnavailable(f"Huey database {self.storage.filename}: {exc}") from exc

    def rows(self, where: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self.transaction() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM {REGISTRY} WHERE queue = ? AND {where}", (self.queue, *params)
            )
            return list(cur.fetchall())

    def set_status(
        self,
        key: str,
        status: TaskStatus,
        *,
        only_from: Sequence[TaskStatus] | None = None,
        attempts_plus: int = 0,
    ) -> bool:
        """Set `key`'s status (and updated_at to now), when it is in one of `only_from`."""
        sql = (
            f"UPDATE {REGISTRY} SET status = ?, attempts = attempts + ?, updated_at = ?"
            " WHERE queue = ? AND key = ?"
        )
        params: list[Any] = [status.value, attempts_plus, utc_text(datetime.now(UTC)), self.queue, key]
        if only_from is not None:
            sql += f" AND status IN ({','.join('?' * len(only_from))})"
            params += [s.value for s in only_from]
        with self.transaction() as cur:
            cur.execute(sql, params)
            return cur.rowcount == 1

    def insert(self, cur: sqlite3.Cursor, record: TaskRecord, type_name: str) -> bool:
        cur.execute(
            f"INSERT OR IGNORE INTO {REGISTRY} (queue, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.queue, record.key, type_name, *_progress_and_identity(record)),
        )
        return cur.rowcount == 1


def _progress_and_identity(record: TaskRecord) -> tuple[Any, ...]:
    return (
        json.dumps(record.payload, sort_keys=True),
        record.status.value,
        record.attempts,
        utc_text(record.created_at),
        utc_text(record.updated_at),
        utc_text(record.run_at) if record.run_at is not None else None,
        json.dumps(record.metadata, sort_keys=True),
    )


def _message(key: str, task_name: str, eta: datetime | None, kwargs: dict[str, Any]) -> Any:
    """A Huey message (its `Message` tuple) of a task called with keyword arguments only."""
    from huey.registry import Message

    return Message(key, task_name, eta, 0, 0, None, (), kwargs)


def _parse(text: str) -> datetime:
    return to_utc(datetime.fromisoformat(text.removesuffix("Z")))


class HueyTaskStore:
    """A `TaskStore` over a `SqliteHuey` application (see the module's docstring).

    `app`: `package.module:huey`, the application (its tasks' signatures name positional
    arguments; its serializer reads the messages). Without `app`, `filename` (and `queue`,
    Huey's `name`) build a bare `SqliteHuey` on that file: enough for tasks called with
    keyword arguments only. `type_map`: Huey task name -> record type, where they differ."""

    keeps_metadata: Final = True
    keeps_run_at: Final = True

    def __init__(
        self,
        app: str | Huey | None = None,
        *,
        filename: str | None = None,
        queue: str = "huey",
        name: str = "huey",
        type_map: Mapping[str, str] | None = None,
    ) -> None:
        from huey import SqliteHuey

        if app is None and filename is None:
            raise ConfigError(f"store '{name}': give 'app' (package.module:huey) or 'filename'")
        if app is None:
            huey: Huey = SqliteHuey(queue, filename=filename)
        else:
            huey = load_app(app) if isinstance(app, str) else app
        self.name = name
        self.registry = Registry(huey)
        self.huey = huey
        self.type_of = dict(type_map or {})
        self.task_of = {type_: task for task, type_ in self.type_of.items()}
        if len(self.task_of) != len(self.type_of):
            raise ConfigError(f"store '{name}': two Huey task names map to one type in 'type_map'")

    # -- reading ------------------------------------------------------------------------------

    def scan(self, after: str | None, limit: int) -> list[TaskRecord]:
        """Up to `limit` tasks with key > `after`, in key order (SQLite's binary order of UTF-8
        text is Python's `str` order); a scan from the start registers Huey's unseen messages first."""
        if limit <= 0:
            return []
        if after is None:
            self.sync()
            rows = self.registry.rows("1 ORDER BY key LIMIT ?", (limit,))
        else:
            rows = self.registry.rows("key > ? ORDER BY key LIMIT ?", (after, limit))
        return [self._record(row) for row in rows]

    def get(self, key: str) -> TaskRecord | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, TaskRecord]:
        found: dict[str, TaskRecord] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            rows = self.registry.rows(f"key IN ({','.join('?' * len(chunk))})", chunk)
            found.update((row[0], self._record(row)) for row in rows)
        if len(found) < len(set(keys)) and self.sync():
            return self.get_many([key for key in keys if key not in found]) | found
        return found

    def count_by_status(self) -> dict[TaskStatus, int]:
        self.sync()
        counts = dict.fromkeys(TaskStatus, 0)
        with self.registry.transaction() as cur:
            cur.execute(
                f"SELECT status, count(*) FROM {REGISTRY} WHERE queue = ? GROUP BY status",
                (self.registry.queue,),
            )
            for status, count in cur.fetchall():
                counts[TaskStatus(status)] += int(count)
        return counts

    def count(self) -> int:
        return sum(self.count_by_status().values())

    def sync(self) -> int:
        """Register the messages in Huey's queue and schedule that the registry has not seen
        (enqueued by code that knows nothing of the migration); how many were registered."""
        from huey.registry import Message

        messages = [
            *self.huey.storage.enqueued_items(),
            *self.huey.storage.scheduled_items(),
        ]
        if not messages:
            return 0
        now = datetime.now(UTC)
        added = 0
        records = []
        for data in messages:
            message = self.huey.serializer.deserialize(data)
            if not isinstance(message, Message):
                continue
            records.append(self.record_of(message, now))
        with self.registry.transaction() as cur:
            for record in records:
                added += self.registry.insert(cur, record, self.task_of.get(record.type, record.type))
        return added

    def record_of(self, message: Any, now: datetime) -> TaskRecord:
        """The pending record of a Huey message first seen at `now`."""
        return TaskRecord(
            key=str(message.id),
            type=self.type_of.get(message.name, message.name),
            payload=self.payload_of(message),
            status=TaskStatus.PENDING,
            attempts=0,
            created_at=now,
            updated_at=now,
            run_at=to_utc(message.eta) if message.eta is not None else None,
        )

    def payload_of(self, message: Any) -> dict[str, Any]:
        """The message's arguments as keyword arguments (positional ones named by the task
        function's signature), refused when they cannot be named or are not JSON."""
        args, kwargs = tuple(message.args or ()), dict(message.kwargs or {})
        kwargs.pop("task", None)  # a context task's injected self
        if args:
            func = self._function(message.name)
            if func is None:
                raise DataError(
                    f"store '{self.name}': Huey task {message.id} ({message.name}) has positional arguments,"
                    " and the adapter cannot read its function's signature: give the store 'app'"
                )
            try:
                bound = inspect.signature(func).bind_partial(*args, **kwargs)
            except TypeError as exc:
                raise DataError(f"store '{self.name}': Huey task {message.id}: {exc}") from exc
            if any(
                p.kind is p.VAR_POSITIONAL
                for p in bound.signature.parameters.values()
                if p.name in bound.arguments
            ):
                raise DataError(
                    f"store '{self.name}': Huey task {message.id} ({message.name}) takes *args, which a"
                    " payload cannot name"
                )
            kwargs = dict(bound.arguments)
        try:
            json.dumps(kwargs, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"store '{self.name}': Huey task {message.id}'s arguments are not JSON: {exc}"
            ) from exc
        return kwargs

    def _function(self, task_name: str) -> Any:
        """The function behind a registered Huey task (the `func` its task class's `execute`
        calls), or None when this process does not know the task."""
        task_class = self.huey._registry._registry.get(task_name)  # noqa: SLF001 - Huey has no public lookup
        if task_class is None:
            return None
        execute = getattr(task_class, "execute", None)
        func = inspect.getclosurevars(execute).nonlocals.get("func") if execute is not None else None
        return func if callable(func) else None

    # -- writing ------------------------------------------------------------------------------

    def put(self, record: TaskRecord) -> None:
        self.put_many([record])

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        last = {record.key: record for record in records}
        for record in last.values():
            self._write(record, forward=False)
        return len(records)

    def put_forward(self, record: TaskRecord) -> bool:
        return self._write(record, forward=True)

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        from migration_fsm.tasks.records import ProgressUpdate

        return self.set_progress_many([ProgressUpdate(key, status, attempts, updated_at)]) == 1

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        changed = 0
        for update in updates:
            with self.registry.transaction() as cur:
                cur.execute(
                    f"SELECT status FROM {REGISTRY} WHERE queue = ? AND key = ?",
                    (self.registry.queue, update.key),
                )
                row = cur.fetchone()
                if row is None or (update.expected is not None and row[0] != update.expected.value):
                    continue
                cur.execute(
                    f"UPDATE {REGISTRY} SET status = ?, attempts = ?, updated_at = ?"
                    " WHERE queue = ? AND key = ?",
                    (
                        update.status.value,
                        update.attempts,
                        utc_text(update.updated_at),
                        self.registry.queue,
                        update.key,
                    ),
                )
                self._follow(cur, update.key, TaskStatus(row[0]), update.status)
            changed += 1
        return changed

    def close(self) -> None:
        self.huey.storage.close()

    def check_setup(self) -> list[str]:
        """The registry table exists; Huey is a version the adapter knows."""
        from importlib import metadata

        problems = []
        with self.huey.storage.db() as cur:
            cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (REGISTRY,))
            if cur.fetchone() is None:
                problems.append(
                    f"store '{self.name}': Huey database {self.huey.storage.filename} has no {REGISTRY}"
                    " table: run `python -m migration_fsm.adapters.huey setup --app MODULE:HUEY`"
                )
        version = metadata.version("huey")
        if not version.startswith(("2.", "3.")):
            problems.append(
                f"store '{self.name}': Huey {version} is installed; the adapter supports 2.x and 3.x"
            )
        return problems

    # -- internals ----------------------------------------------------------------------------

    def _write(self, record: TaskRecord, *, forward: bool) -> bool:
        task_name = self.task_of.get(record.type, record.type)
        with self.registry.transaction() as cur:
            cur.execute(
                f"SELECT status FROM {REGISTRY} WHERE queue = ? AND key = ?",
                (self.registry.queue, record.key),
            )
            row = cur.fetchone()
            before = TaskStatus(row[0]) if row is not None else None
            if forward and before is not None and is_behind(record.status, before):
                return False
            if before is None:
                self.registry.insert(cur, record, task_name)
            else:
                cur.execute(
                    f"UPDATE {REGISTRY} SET type = ?, payload = ?, status = ?, attempts = ?, created_at = ?,"
                    " updated_at = ?, run_at = ?, metadata = ? WHERE queue = ? AND key = ?",
                    (task_name, *_progress_and_identity(record), self.registry.queue, record.key),
                )
            self._follow(cur, record.key, before, record.status)
        return True

    def _follow(self, cur: sqlite3.Cursor, key: str, before: TaskStatus | None, after: TaskStatus) -> None:
        """Make Huey agree with a registry move from `before` to `after`, in the registry's
        transaction (the SQL of Huey's own `revoke_by_id`, `restore_by_id`, `enqueue` and
        `add_schedule` on SqliteStorage, so the move and Huey's side commit together)."""
        queue, revoke_id = self.registry.queue, f"r:{key}"
        if after is not TaskStatus.PENDING:
            if before in (None, TaskStatus.PENDING):  # a message may wait: every consumer skips it
                revoked = self.huey.serializer.serialize((None, False))
                cur.execute(
                    "INSERT OR REPLACE INTO kv (queue, key, value) VALUES (?, ?, ?)",
                    (queue, revoke_id, revoked),
                )
            return
        if before is TaskStatus.PENDING:
            return
        cur.execute("DELETE FROM kv WHERE queue = ? AND key = ?", (queue, revoke_id))
        if before is not None and self._has_message(cur, key):
            return
        cur.execute(f"SELECT type, payload, run_at FROM {REGISTRY} WHERE queue = ? AND key = ?", (queue, key))
        task_name, payload, run_at = cur.fetchone()
        eta = _parse(run_at).replace(tzinfo=None) if run_at is not None else None
        data = self.huey.serializer.serialize(_message(key, task_name, eta, json.loads(payload)))
        if eta is not None and eta > datetime.now(UTC).replace(tzinfo=None):
            cur.execute(
                "INSERT INTO schedule (queue, data, timestamp) VALUES (?, ?, ?)",
                (queue, data, eta.timestamp()),
            )
        else:
            cur.execute("INSERT INTO task (queue, data, priority) VALUES (?, ?, 0)", (queue, data))

    def _has_message(self, cur: sqlite3.Cursor, key: str) -> bool:
        """Whether Huey's queue or schedule holds a message of task `key`."""
        for table in ("task", "schedule"):
            cur.execute(f"SELECT data FROM {table} WHERE queue = ?", (self.registry.queue,))
            for (data,) in cur.fetchall():
                if str(getattr(self.huey.serializer.deserialize(data), "id", None)) == key:
                    return True
        return False

    def _record(self, row: Sequence[Any]) -> TaskRecord:
        key, type_name, payload, status, attempts, created_at, updated_at, run_at, metadata = row
        return TaskRecord(
            key=key,
            type=self.type_of.get(type_name, type_name),
            payload=json.loads(payload),
            status=TaskStatus(status),
            attempts=attempts,
            created_at=_parse(created_at),
            updated_at=_parse(updated_at),
            metadata=json.loads(metadata),
            run_at=_parse(run_at) if run_at is not None else None,
        )


def setup(app: str | Huey) -> list[str]:
    """Create the registry table in the Huey application's SQLite file and register the
    messages already queued or scheduled; what was done, one line each."""
    store = HueyTaskStore(app)
    try:
        with store.huey.storage.db(commit=True) as cur:
            cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (REGISTRY,))
            existed = cur.fetchone() is not None
            cur.execute(REGISTRY_DDL)
        registered = store.sync()
        where = store.huey.storage.filename
        return [
            f"{REGISTRY} {'already exists' if existed else 'created'} in {where}",
            f"{registered} queued or scheduled tasks registered",
        ]
    finally:
        store.close()
