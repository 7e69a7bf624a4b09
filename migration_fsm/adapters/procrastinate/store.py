"""`ProcrastinateTaskStore`: a `TaskStore` over Procrastinate's own tables (`procrastinate_jobs`,
`procrastinate_events`) in its PostgreSQL database, plus one small registry table of ours.

**Why a registry.** A Procrastinate job's identity is a BIGINT the database assigns, and its row
has no creation time, no free-form metadata and no place for a foreign id (its `args` are the
task function's keyword arguments: a key added there would reach the function). So the
adapter keeps, in Procrastinate's own database, `mfsm_procrastinate_tasks` (created by
`python -m migration_fsm.adapters.procrastinate setup`): one row per task written through the
adapter, with the migration key, the job id, the task's `created_at`, the `updated_at` last
written, when it was written, and the metadata. A job removed by Procrastinate takes its
registry row with it (`ON DELETE CASCADE`): run the workers with `delete_jobs="never"`, or
`validate` reports those tasks missing.

**Jobs the adapter did not write** (deferred by code that knows nothing of the migration) are
tasks too: their key is `procrastinate-job-` and the job id in 20 digits (so keys sort as ids
do), their `created_at` the time of their first event. Such keys are reserved: a record with
one may only be written over the job it names.

**Mapping.** `type` is `task_name` (at most 128 characters), `payload` is `args`, `attempts`
is `attempts`, `run_at` is `scheduled_at`. Statuses: `todo` pending, `doing` running,
`succeeded` completed, `failed` failed, `cancelled` and `aborted` cancelled (`aborting`, unused
since Procrastinate 3.0, is refused). `updated_at` is the value last written through the
adapter, unless Procrastinate recorded an event for the job since that write: then the time
of its latest event.

**Writes** go through Procrastinate's own SQL functions where one exists for the move: a new
task through `procrastinate_defer_jobs_v1` (so workers listening for the queue wake up), a
pending task finished through `procrastinate_finish_job_v1` (Procrastinate's own history
records this as *cancelled*: the task was done on the other side, never run here), a pending
one cancelled through `procrastinate_cancel_job_v1`. The other moves (pending to running,
running or failed back to pending, a finished task back to pending or to another end, a
running task cancelled: the hand-over of a task whose worker is gone) and the attempt count
are plain `UPDATE`s of the job row (Procrastinate's `retry_job` would also clear the
scheduled time and bump the attempts); its triggers record them in `procrastinate_events`
as they record their own functions' moves. A task's identity (task name,
arguments, scheduled time) written over a different one is updated in place.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from migration_fsm.exceptions import ConfigError, DatabaseUnavailable, DataError
from migration_fsm.journal import make_engine, safe_url, scrub
from migration_fsm.tasks.records import TaskRecord, TaskStatus, is_behind, to_utc

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from datetime import datetime

    from sqlalchemy import Connection, Engine

    from migration_fsm.tasks.records import ProgressUpdate

_T = TypeVar("_T")

#: The registry table (`setup` creates it).
REGISTRY: Final = "mfsm_procrastinate_tasks"
#: The key of a job the adapter did not write: this prefix and the job id in 20 digits.
JOB_KEY_PREFIX: Final = "procrastinate-job-"
_ID_DIGITS: Final = 20
#: Procrastinate's `varchar(128)` columns.
_NAME_LIMIT: Final = 128

#: Procrastinate's job status -> TaskStatus.
STATUS_OF: Final[Mapping[str, TaskStatus]] = {
    "todo": TaskStatus.PENDING,
    "doing": TaskStatus.RUNNING,
    "succeeded": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
    "cancelled": TaskStatus.CANCELLED,
    "aborted": TaskStatus.CANCELLED,
}
#: TaskStatus -> the job status the adapter writes.
JOB_STATUS: Final[Mapping[TaskStatus, str]] = {
    TaskStatus.PENDING: "todo",
    TaskStatus.RUNNING: "doing",
    TaskStatus.COMPLETED: "succeeded",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "cancelled",
}

REGISTRY_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS {REGISTRY} (
    key text COLLATE "C" PRIMARY KEY,
    job_id bigint NOT NULL UNIQUE REFERENCES procrastinate_jobs (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now(),
    metadata jsonb NOT NULL DEFAULT '{{}}'
)
"""

# Every read selects the same columns, in this order (`_record`).
_REGISTERED: Final = f"""
SELECT r.key, j.id, j.task_name, j.args, j.status::text, j.attempts, r.created_at,
       CASE WHEN e.last_at > r.written_at THEN e.last_at ELSE r.updated_at END,
       r.metadata, j.scheduled_at
FROM {REGISTRY} r
JOIN procrastinate_jobs j ON j.id = r.job_id
LEFT JOIN LATERAL (SELECT max(at) AS last_at FROM procrastinate_events WHERE job_id = j.id) e ON true
"""
_UNREGISTERED: Final = f"""
SELECT '{JOB_KEY_PREFIX}' || lpad(j.id::text, {_ID_DIGITS}, '0'), j.id, j.task_name, j.args,
       j.status::text, j.attempts, e.first_at, e.last_at, NULL::jsonb, j.scheduled_at
FROM procrastinate_jobs j
LEFT JOIN LATERAL (
    SELECT min(at) AS first_at, max(at) AS last_at FROM procrastinate_events WHERE job_id = j.id
) e ON true
WHERE NOT EXISTS (SELECT 1 FROM {REGISTRY} r WHERE r.job_id = j.id)
"""


@dataclass(frozen=True)
class _Stored:
    """What a write needs to know of a stored job."""

    job_id: int
    status: str
    registered: bool


class ProcrastinateTaskStore:
    """A `TaskStore` over a Procrastinate database (see the module's docstring for the mapping).

    `url`: the database Procrastinate uses (a SQLAlchemy or libpq URL). `queue`: the queue new
    tasks are deferred to; `queues`, when given, limits the store to jobs of those queues (a
    database shared with other applications' jobs). `task_names` maps a record's `type` to the
    Procrastinate task name when they differ (an old system's name with its module prefix)."""

    keeps_metadata: Final = True
    keeps_run_at: Final = True

    def __init__(
        self,
        url: str,
        *,
        name: str = "procrastinate",
        queue: str = "default",
        queues: Sequence[str] | None = None,
        task_names: Mapping[str, str] | None = None,
    ) -> None:
        if not url.startswith(("postgresql", "postgres")):
            raise ConfigError(f"store '{name}': Procrastinate runs on PostgreSQL, not on {safe_url(url)}")
        if queues is not None and queue not in queues:
            raise ConfigError(f"store '{name}': 'queue' {queue!r} must be one of 'queues' {list(queues)!r}")
        for label, value in (("queue", queue), *(("task_names", v) for v in (task_names or {}).values())):
            if not value or len(value) > _NAME_LIMIT:
                raise ConfigError(f"store '{name}': {label} {value!r} must be 1 to {_NAME_LIMIT} characters")
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        self.name = name
        self.url = url
        self.queue = queue
        self.queues = list(queues) if queues is not None else None
        self.task_names = dict(task_names or {})
        self._types = {task: type_ for type_, task in self.task_names.items()}
        if len(self._types) != len(self.task_names):
            raise ConfigError(f"store '{name}': two types map to one task name in 'task_names'")
        self.engine: Engine = make_engine(url)

    # -- reading ------------------------------------------------------------------------------

    def scan(self, after: str | None, limit: int) -> list[TaskRecord]:
        """Up to `limit` tasks with key > `after`, in Python `str` order: the registered tasks
        (by key, the registry's "C" collation is code point order) merged with the jobs the
        adapter did not write (by id, which is their keys' order)."""
        if limit <= 0:
            return []
        queue_filter, params = self._queue_filter()
        registered_sql = _REGISTERED + " WHERE TRUE" + queue_filter
        if after is not None:
            registered_sql += " AND r.key > :after"
            params["after"] = after
        registered_sql += " ORDER BY r.key LIMIT :limit"
        params["limit"] = limit
        first_id = _first_job_id_after(after)
        with self._connect(commit=False) as conn:
            rows = list(conn.execute(text(registered_sql), params))
            if first_id is not None:
                others_sql = (
                    _UNREGISTERED + queue_filter + " AND j.id >= :first_id ORDER BY j.id LIMIT :limit"
                )
                rows += conn.execute(text(others_sql), {**params, "first_id": first_id})
        rows.sort(key=lambda row: str(row[0]))
        return [self._record(row) for row in rows[:limit]]

    def get(self, key: str) -> TaskRecord | None:
        """The task with this key, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, TaskRecord]:
        """The tasks with these keys; a key with no task is left out."""
        if not keys:
            return {}
        queue_filter, params = self._queue_filter()
        job_ids = {job_id: key for key in keys if (job_id := _job_id_of(key)) is not None}
        found: dict[str, TaskRecord] = {}
        with self._connect(commit=False) as conn:
            rows = list(
                conn.execute(
                    text(_REGISTERED + " WHERE r.key = ANY(:keys)" + queue_filter),
                    {**params, "keys": list(keys)},
                )
            )
            if job_ids:
                rows += conn.execute(
                    text(_UNREGISTERED + queue_filter + " AND j.id = ANY(:ids)"),
                    {**params, "ids": list(job_ids)},
                )
        for row in rows:
            found[str(row[0])] = self._record(row)
        return found

    def count_by_status(self) -> dict[TaskStatus, int]:
        """How many jobs are in each status (every status present, zero included)."""
        counts = dict.fromkeys(TaskStatus, 0)
        queue_filter, params = self._queue_filter()
        sql = (
            "SELECT status::text, count(*) FROM procrastinate_jobs j WHERE TRUE"
            + queue_filter
            + " GROUP BY 1"
        )
        with self._connect(commit=False) as conn:
            for status, count in conn.execute(text(sql), params):
                counts[self._status(str(status), None)] += int(count)
        return counts

    def count(self) -> int:
        """How many jobs the store holds."""
        queue_filter, params = self._queue_filter()
        with self._connect(commit=False) as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM procrastinate_jobs j WHERE TRUE" + queue_filter), params
                ).scalar_one()
            )

    # -- writing ------------------------------------------------------------------------------

    def put(self, record: TaskRecord) -> None:
        """Insert or replace the task with this key."""
        self.put_many([record])

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        """Insert or replace each task by key, in one transaction (the last record of a key
        wins); returns how many records were written."""
        if not records:
            return 0
        last = {record.key: record for record in records}
        for record in last.values():
            self._check(record)
        self._write(lambda conn: self._put_all(conn, list(last.values())))
        return len(records)

    def put_forward(self, record: TaskRecord) -> bool:
        """`put`, unless the stored task of this key is further along; whether it wrote. The job
        row is locked from the read to the write, so a worker finishing it meanwhile waits."""
        self._check(record)

        def forward(conn: Connection) -> bool:
            found = self._stored(conn, [record.key])
            stored = found.get(record.key)
            if stored is not None and is_behind(record.status, self._status(stored.status, record.key)):
                return False
            self._put_all(conn, [record], found)  # the job read (and locked) above: not read again
            return True

        return self._write(forward)

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        """Set the status, attempts and updated_at of task `key`; False when there is no such task."""
        from migration_fsm.tasks.records import ProgressUpdate

        return self.set_progress_many([ProgressUpdate(key, status, attempts, updated_at)]) == 1

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        """Each update under its own condition (its key exists; with `expected`, its status still
        reads as `expected`), all in one transaction; how many rows changed."""
        if not updates:
            return 0

        def apply(conn: Connection) -> int:
            stored = self._stored(conn, [update.key for update in updates])
            changed = 0
            for update in updates:
                job = stored.get(update.key)
                if job is None:
                    continue
                if update.expected is not None and self._status(job.status, update.key) != update.expected:
                    continue
                job = self._move(conn, job, update.status)
                self._set_attempts(conn, job.job_id, update.attempts)
                if job.registered:
                    conn.execute(
                        text(f"UPDATE {REGISTRY} SET updated_at = :at, written_at = now() WHERE key = :key"),
                        {"at": to_utc(update.updated_at), "key": update.key},
                    )
                stored[update.key] = job
                changed += 1
            return changed

        return self._write(apply)

    def check_setup(self) -> list[str]:
        """What keeps this store from working, one line each with its fix (empty: ready):
        Procrastinate's schema, its version, the registry table."""
        problems = []
        with self._connect(commit=False) as conn:
            functions = set(
                conn.scalars(
                    text(
                        "SELECT proname FROM pg_proc"
                        " WHERE proname = ANY(:names) AND pg_function_is_visible(oid)"
                    ),
                    {"names": list(_FUNCTIONS)},
                )
            )
            has_jobs = conn.execute(text("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")).scalar_one()
            has_registry = conn.execute(
                text("SELECT to_regclass(:t) IS NOT NULL"), {"t": REGISTRY}
            ).scalar_one()
        if not has_jobs or functions != set(_FUNCTIONS):
            absent = ", ".join(sorted(set(_FUNCTIONS) - functions)) or "procrastinate_jobs"
            problems.append(
                f"store '{self.name}': {safe_url(self.url)} has no Procrastinate 3 schema (missing {absent}):"
                " apply it with `procrastinate schema --apply` (Procrastinate 3.x)"
            )
        elif not has_registry:
            problems.append(
                f"store '{self.name}': {safe_url(self.url)} has no {REGISTRY} table: run"
                " `python -m migration_fsm.adapters.procrastinate setup --url URL`"
            )
        version = _library_version()
        if version is not None and not version.startswith("3."):
            problems.append(
                f"store '{self.name}': Procrastinate {version} is installed; the adapter supports 3.x:"
                " install 'procrastinate>=3,<4'"
            )
        return problems

    def close(self) -> None:
        """Release the store's connections."""
        self.engine.dispose()

    # -- internals ----------------------------------------------------------------------------

    def _queue_filter(self) -> tuple[str, dict[str, Any]]:
        if self.queues is None:
            return "", {}
        return " AND j.queue_name = ANY(:queues)", {"queues": self.queues}

    def _check(self, record: TaskRecord) -> None:
        task_name = self.task_names.get(record.type, record.type)
        if not task_name or len(task_name) > _NAME_LIMIT:
            raise DataError(
                f"store '{self.name}': task {record.key!r} has type {record.type!r}, which is not a"
                f" Procrastinate task name (1 to {_NAME_LIMIT} characters): map it in 'task_names'"
            )

    def _stored(self, conn: Connection, keys: Sequence[str]) -> dict[str, _Stored]:
        """The stored jobs of these keys, locked for the rest of the transaction."""
        stored = {
            str(key): _Stored(int(job_id), str(status), True)
            for key, job_id, status in conn.execute(
                text(
                    f"SELECT r.key, j.id, j.status::text FROM {REGISTRY} r JOIN procrastinate_jobs j"
                    " ON j.id = r.job_id WHERE r.key = ANY(:keys) FOR UPDATE OF j"
                ),
                {"keys": list(keys)},
            )
        }
        job_ids = {
            job_id: key for key in keys if key not in stored and (job_id := _job_id_of(key)) is not None
        }
        if job_ids:
            for job_id, status, registered in conn.execute(
                text(
                    "SELECT j.id, j.status::text, EXISTS (SELECT 1 FROM"
                    f" {REGISTRY} r WHERE r.job_id = j.id) FROM procrastinate_jobs j"
                    " WHERE j.id = ANY(:ids) FOR UPDATE OF j"
                ),
                {"ids": list(job_ids)},
            ):
                if not registered:  # a registered job is known by its registered key only
                    stored[job_ids[int(job_id)]] = _Stored(int(job_id), str(status), False)
        return stored

    def _put_all(
        self, conn: Connection, records: Sequence[TaskRecord], stored: dict[str, _Stored] | None = None
    ) -> None:
        """Write `records` (one per key); `stored`: what `_stored` read of their keys in this
        transaction, when the caller already read it."""
        if stored is None:
            stored = self._stored(conn, [record.key for record in records])
        new = [record for record in records if record.key not in stored]
        for record in new:
            if record.key.startswith(JOB_KEY_PREFIX):
                raise DataError(
                    f"store '{self.name}': key {record.key!r} names no Procrastinate job; keys"
                    f" beginning {JOB_KEY_PREFIX!r} are reserved for jobs the adapter did not write"
                )
        for record, deferred in zip(new, self._defer(conn, new), strict=True):
            job = self._move(conn, deferred, record.status)
            if record.attempts:  # a deferred job starts at 0 attempts
                self._set_attempts(conn, job.job_id, record.attempts)
            stored[record.key] = _Stored(job.job_id, job.status, True)
        written = {record.key for record in new}
        for record in records:
            if record.key in written:
                continue
            job = stored[record.key]
            register = not job.registered
            conn.execute(
                text(
                    "UPDATE procrastinate_jobs SET task_name = :task_name, args = CAST(:args AS jsonb),"
                    " scheduled_at = :run_at WHERE id = :id AND (task_name, args, scheduled_at)"
                    " IS DISTINCT FROM (:task_name, CAST(:args AS jsonb), :run_at)"
                ),
                {**self._identity(record), "id": job.job_id},
            )
            job = self._move(conn, job, record.status)
            self._set_attempts(conn, job.job_id, record.attempts)
            values = {
                "key": record.key,
                "id": job.job_id,
                "created_at": record.created_at,
                "updated_at": record.updated_at,
                "metadata": json.dumps(record.metadata),
            }
            if register:  # a plain INSERT: a writer that inserted this key meanwhile makes it fail
                conn.execute(
                    text(
                        f"INSERT INTO {REGISTRY} (key, job_id, created_at, updated_at, metadata)"
                        " VALUES (:key, :id, :created_at, :updated_at, CAST(:metadata AS jsonb))"
                    ),
                    values,
                )
            else:
                conn.execute(
                    text(
                        f"UPDATE {REGISTRY} SET created_at = :created_at, updated_at = :updated_at,"
                        " written_at = now(), metadata = CAST(:metadata AS jsonb) WHERE key = :key"
                    ),
                    values,
                )
            stored[record.key] = _Stored(job.job_id, job.status, True)

    def _identity(self, record: TaskRecord) -> dict[str, Any]:
        return {
            "task_name": self.task_names.get(record.type, record.type),
            "args": json.dumps(record.payload),
            "run_at": record.run_at,
        }

    def _defer(self, conn: Connection, records: Sequence[TaskRecord]) -> list[_Stored]:
        """A new job in `todo` per record, deferred as Procrastinate's own `defer` does (all in
        one call of `procrastinate_defer_jobs_v1`, whose ids come back in the order of its jobs,
        as Procrastinate's own batch defer reads them), and their registry rows: one statement.
        A plain INSERT: a writer that inserted one of these keys meanwhile makes it fail (and
        `_write` retry)."""
        if not records:
            return []
        if len(records) == 1:  # a task at a time (`DualWriter`): the plainer statement costs less
            [record] = records
            job_id = conn.execute(
                text(
                    f"INSERT INTO {REGISTRY} (key, job_id, created_at, updated_at, metadata) VALUES (:key,"
                    " (procrastinate_defer_jobs_v1(ARRAY[ROW(:queue, :task_name, 0, NULL, NULL,"
                    " CAST(:args AS jsonb), :run_at)::procrastinate_job_to_defer_v1]))[1],"
                    " :created_at, :updated_at, CAST(:metadata AS jsonb)) RETURNING job_id"
                ),
                {
                    **self._identity(record),
                    "queue": self.queue,
                    "key": record.key,
                    "created_at": record.created_at,
                    "updated_at": record.updated_at,
                    "metadata": json.dumps(record.metadata),
                },
            ).scalar_one()
            return [_Stored(int(job_id), "todo", True)]
        identities = [self._identity(record) for record in records]
        rows = conn.execute(
            text(
                "WITH deferred AS (SELECT procrastinate_defer_jobs_v1(ARRAY("
                " SELECT ROW(:queue, t.task_name, 0, NULL, NULL, t.args, t.run_at)"
                "::procrastinate_job_to_defer_v1 FROM unnest(CAST(:task_names AS text[]),"
                " CAST(:args AS jsonb[]), CAST(:run_ats AS timestamptz[]))"
                " WITH ORDINALITY AS t(task_name, args, run_at, n) ORDER BY t.n)) AS ids)"
                f" INSERT INTO {REGISTRY} (key, job_id, created_at, updated_at, metadata)"
                " SELECT r.key, deferred.ids[r.n], r.created_at, r.updated_at, r.metadata FROM deferred,"
                " unnest(CAST(:keys AS text[]), CAST(:created AS timestamptz[]),"
                " CAST(:updated AS timestamptz[]), CAST(:metadata AS jsonb[]))"
                " WITH ORDINALITY AS r(key, created_at, updated_at, metadata, n)"
                " RETURNING key, job_id"
            ),
            {
                "queue": self.queue,
                "task_names": [identity["task_name"] for identity in identities],
                "args": [identity["args"] for identity in identities],
                "run_ats": [identity["run_at"] for identity in identities],
                "keys": [record.key for record in records],
                "created": [record.created_at for record in records],
                "updated": [record.updated_at for record in records],
                "metadata": [json.dumps(record.metadata) for record in records],
            },
        )
        job_ids = {str(key): int(job_id) for key, job_id in rows}
        return [_Stored(job_ids[record.key], "todo", True) for record in records]

    def _move(self, conn: Connection, job: _Stored, status: TaskStatus) -> _Stored:
        """The job moved to `status` (through Procrastinate's function for the move, if any)."""
        target = JOB_STATUS[status]
        if STATUS_OF.get(job.status) == status:
            return job
        params = {"id": job.job_id}
        if job.status in ("todo", "doing") and target in ("succeeded", "failed"):
            conn.execute(
                text(
                    "SELECT procrastinate_finish_job_v1(:id, CAST(:end AS procrastinate_job_status), false)"
                ),
                {**params, "end": target},
            )
        elif job.status == "todo" and target == "cancelled":
            conn.execute(text("SELECT procrastinate_cancel_job_v1(:id, false, false)"), params)
        else:
            conn.execute(
                text(
                    "UPDATE procrastinate_jobs SET status = CAST(:status AS procrastinate_job_status),"
                    " abort_requested = false WHERE id = :id"
                ),
                {**params, "status": target},
            )
        return _Stored(job.job_id, target, job.registered)

    @staticmethod
    def _set_attempts(conn: Connection, job_id: int, attempts: int) -> None:
        conn.execute(
            text(
                "UPDATE procrastinate_jobs SET attempts = :attempts WHERE id = :id AND attempts <> :attempts"
            ),
            {"id": job_id, "attempts": attempts},
        )

    def _record(self, row: Any) -> TaskRecord:
        key, job_id, task_name, args, status, attempts, created_at, updated_at, metadata, run_at = row
        if created_at is None:
            raise DataError(
                f"store '{self.name}': job {job_id} has no event in procrastinate_events, so its"
                " creation time is unknown"
            )
        try:
            return TaskRecord(
                key=key,
                type=self._types.get(task_name, task_name),
                payload=args,
                status=self._status(status, key),
                attempts=attempts,
                created_at=created_at,
                updated_at=updated_at if updated_at is not None else created_at,
                metadata=metadata or {},
                run_at=run_at,
            )
        except ValueError as exc:  # pydantic's ValidationError
            raise DataError(f"store '{self.name}': job {job_id} (key {key!r}) is not a task: {exc}") from exc

    def _status(self, status: str, key: str | None) -> TaskStatus:
        try:
            return STATUS_OF[status]
        except KeyError:
            where = f"task {key!r}" if key is not None else "a job"
            raise DataError(
                f"store '{self.name}': {where} is in Procrastinate status {status!r}, which the"
                " adapter does not map (Procrastinate 3 no longer uses 'aborting')"
            ) from None

    @contextmanager
    def _connect(self, *, commit: bool) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                if commit:
                    with conn.begin():
                        yield conn
                else:
                    yield conn
        except sa_exc.IntegrityError:
            raise
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise DatabaseUnavailable(
                f"store '{self.name}': database {safe_url(self.url)} is unavailable: {self._scrub(exc)}"
            ) from exc
        except sa_exc.ProgrammingError as exc:
            raise DataError(
                f"store '{self.name}': {safe_url(self.url)} has no Procrastinate schema or no"
                f" {REGISTRY} table ({self._scrub(exc)}): apply Procrastinate's schema, then run"
                " `python -m migration_fsm.adapters.procrastinate setup --url URL`"
            ) from exc
        except sa_exc.StatementError as exc:
            raise DataError(
                f"store '{self.name}': {safe_url(self.url)} refused the statement: {self._scrub(exc)}"
            ) from exc

    def _write(self, work: Callable[[Connection], _T]) -> _T:
        """`work(conn)` in one transaction; a new key inserted by another writer at the same time
        makes this one retry once, and the retry finds the key and updates its job."""
        for attempt in range(2):
            try:
                with self._connect(commit=True) as conn:
                    return work(conn)
            except sa_exc.IntegrityError as exc:
                if attempt:
                    raise DataError(
                        f"store '{self.name}': the batch was refused: {self._scrub(exc)}"
                    ) from exc
        raise AssertionError("unreachable")

    def _scrub(self, exc: sa_exc.StatementError) -> str:
        return scrub(str(exc.orig if exc.orig is not None else exc), self.url)


#: Procrastinate 3's SQL functions the adapter calls.
_FUNCTIONS: Final = (
    "procrastinate_defer_jobs_v1",
    "procrastinate_finish_job_v1",
    "procrastinate_cancel_job_v1",
)


def _library_version() -> str | None:
    """The installed Procrastinate's version, or None when it is not installed here (the store
    itself needs only the database)."""
    from importlib import metadata

    try:
        return metadata.version("procrastinate")
    except metadata.PackageNotFoundError:
        return None


def _job_id_of(key: str) -> int | None:
    """The job id a reserved key names, or None."""
    digits = key[len(JOB_KEY_PREFIX) :]
    if key.startswith(JOB_KEY_PREFIX) and len(digits) == _ID_DIGITS and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def _first_job_id_after(after: str | None) -> int | None:  # noqa: PLR0911 - one return per shape of `after`
    """The smallest job id whose reserved key sorts after `after` (0 for every job), or None
    when no reserved key does: the keyset bound of the unregistered jobs' scan."""
    if after is None or after < JOB_KEY_PREFIX:
        return 0
    if not after.startswith(JOB_KEY_PREFIX):
        return None  # after every key with the prefix
    rest = after[len(JOB_KEY_PREFIX) :]
    for i, char in enumerate(rest[:_ID_DIGITS]):
        if "0" <= char <= "9":
            continue
        if char < "0":  # every id with these first digits sorts after `after`
            return int(rest[:i].ljust(_ID_DIGITS, "0"))
        if i == 0:  # above "9": no digit string with this (empty) prefix is greater
            return None
        bumped = int(rest[:i]) + 1
        return None if bumped >= 10**i else int(str(bumped).rjust(i, "0").ljust(_ID_DIGITS, "0"))
    if len(rest) < _ID_DIGITS:  # a proper prefix of some keys: they sort after it
        return int(rest.ljust(_ID_DIGITS, "0"))
    return int(rest[:_ID_DIGITS]) + 1  # the key itself, or it followed by more text


def setup(url: str) -> list[str]:
    """Create the registry table in Procrastinate's database `url` (whose schema must be
    applied first); returns what was done, one line each. Running it again changes nothing."""
    store = ProcrastinateTaskStore(url)
    try:
        missing = [problem for problem in store.check_setup() if REGISTRY not in problem]
        if missing:
            raise DataError("; ".join(missing))
        with store._connect(commit=True) as conn:  # noqa: SLF001 - the module's own store
            existed = conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": REGISTRY}).scalar_one()
            conn.execute(text(REGISTRY_DDL))
        return [f"{REGISTRY} {'already exists' if existed else 'created'} in {safe_url(store.url)}"]
    finally:
        store.close()
