"""`RqTaskStore`: a `TaskStore` over one RQ queue's jobs in Redis, plus a sorted set of keys.

**The job is the task.** RQ keeps each job as a hash (`rq:job:<id>`) with its function name,
arguments, status and timestamps; the migration key is the job id (chosen with `job_id=`, so a
task written twice is one job). What RQ does not keep lives in the job's own `meta`, under
`"migration_fsm"`: the task's metadata, the `updated_at` last written through the adapter (and
when), and the status the migration gave a job it stopped (below).

**The key index.** Redis cannot list job ids in key order, so the adapter keeps a sorted set of
the queue's job ids (`mfsm:rq:<queue>:keys`, all scores 0, read with ZRANGEBYLEX: byte order of
UTF-8, Python's `str` order), created by `python -m migration_fsm.adapters.rq setup`. Jobs enter
it when written through the adapter, when a gated worker takes them, and when the store first
reads the whole queue (`scan` from the start, the counts), which registers every job of the queue
it has not seen (enqueued by code that knows nothing of the migration), found with SCAN.

**Mapping.** `type` is the job's function name (through `type_map`); `payload` its keyword
arguments, with positional arguments named by the function's signature (RQ imports the function
by name; a job whose function cannot be imported, or that takes `*args`, is refused when it has
positional arguments); statuses: `queued`, `deferred`, `scheduled`, `created` pending; `started`
running; `finished` completed; `failed` and `stopped` failed; `canceled` cancelled, or the status
the migration recorded when it stopped the job itself. `run_at` is the scheduled time (kept in
`meta` once seen, since RQ forgets it when it enqueues the job). `attempts` is the count the
adapter last wrote plus RQ's retries since.

**Writes** use RQ's own API: a new pending task is `Queue.enqueue_call` (or `enqueue_at` for a
future `run_at`) with the key as `job_id`, the payload as keyword arguments and no result
expiry (`result_ttl=-1`, `failure_ttl=-1`: a job RQ deleted would be a missing task); a pending
or running job moved to another status is cancelled (`Job.cancel`, so no worker runs it), the
status it stands for recorded in `meta`; a job moved back to pending is enqueued again
(`Queue.enqueue_job`).
"""

from __future__ import annotations

import importlib
import inspect
import re
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from migration_fsm.adapters._redis import index_page
from migration_fsm.exceptions import ConfigError, DatabaseUnavailable, DataError
from migration_fsm.tasks.records import TaskRecord, TaskStatus, is_behind, to_utc, utc_text

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from migration_fsm.tasks.records import ProgressUpdate

META: Final = "migration_fsm"
#: What RQ accepts as a job id.
_JOB_ID: Final = re.compile(r"[A-Za-z0-9_-]+")
SETUP_VERSION: Final = "1"

#: RQ's job status -> TaskStatus (a `canceled` job may stand for another status: `meta`).
STATUS_OF: Final[Mapping[str, TaskStatus]] = {
    "created": TaskStatus.PENDING,
    "queued": TaskStatus.PENDING,
    "deferred": TaskStatus.PENDING,
    "scheduled": TaskStatus.PENDING,
    "ready_to_enqueue": TaskStatus.PENDING,
    "rate_limited": TaskStatus.PENDING,
    "started": TaskStatus.RUNNING,
    "finished": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
    "stopped": TaskStatus.FAILED,
    "canceled": TaskStatus.CANCELLED,
}


def index_key(queue: str) -> str:
    return f"mfsm:rq:{queue}:keys"


def _status_text(job: Any) -> str:
    """RQ's status of `job` as its plain value (`JobStatus` is a `str` enum whose `str()` is its name)."""
    status = job.get_status(refresh=False)
    return str(getattr(status, "value", status) or "created")


def _time(value: datetime | None) -> datetime | None:
    return to_utc(value) if value is not None else None


class RqTaskStore:
    """A `TaskStore` over the jobs of RQ queue `queue` in the Redis at `url` (see the module's
    docstring). `type_map`: RQ function name (`module.function`) -> record type, where they differ."""

    keeps_metadata: Final = True
    keeps_run_at: Final = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        queue: str = "default",
        name: str = "rq",
        type_map: Mapping[str, str] | None = None,
    ) -> None:
        import redis
        from rq import Queue

        self.name = name
        self.url = url
        try:
            self.redis = redis.Redis.from_url(url)
        except ValueError as exc:
            raise ConfigError(f"store '{name}': 'url' {url!r} is not a Redis URL: {exc}") from exc
        self.queue = Queue(queue, connection=self.redis)
        self.index = index_key(queue)
        self.type_of = dict(type_map or {})
        self.func_of = {type_: func for func, type_ in self.type_of.items()}
        if len(self.func_of) != len(self.type_of):
            raise ConfigError(f"store '{name}': two RQ function names map to one type in 'type_map'")

    # -- reading ------------------------------------------------------------------------------

    def scan(self, after: str | None, limit: int) -> list[TaskRecord]:
        if limit <= 0:
            return []
        with self._redis():
            if after is None:
                self.sync()
            keys = index_page(self.redis, self.index, after, limit)
            found = self.get_many(keys, sync=False)
        return [found[key] for key in keys if key in found]

    def get(self, key: str) -> TaskRecord | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str], *, sync: bool = True) -> dict[str, TaskRecord]:
        from rq.job import Job

        found: dict[str, TaskRecord] = {}
        with self._redis():
            jobs = Job.fetch_many(list(keys), connection=self.redis)
            for key, job in zip(keys, jobs, strict=True):
                if job is not None and job.origin == self.queue.name:
                    found[key] = self._record(job)
        if sync and len(found) < len(set(keys)) and self.sync():
            return self.get_many([key for key in keys if key not in found], sync=False) | found
        return found

    def count_by_status(self) -> dict[TaskStatus, int]:
        counts = dict.fromkeys(TaskStatus, 0)
        after: str | None = None
        while batch := self.scan(after, 1000):
            for record in batch:
                counts[record.status] += 1
            after = batch[-1].key
        return counts

    def count(self) -> int:
        """How many tasks a scan of the whole store finds (the indexed jobs that exist and belong
        to the queue), read as each job's `origin` alone, not the whole job."""
        from rq.job import Job

        prefix = Job.redis_job_namespace_prefix
        total = 0
        with self._redis():
            self.sync()
            queue = self.queue.name.encode("utf-8")
            after: str | None = None
            while keys := index_page(self.redis, self.index, after, 1000):
                pipe = self.redis.pipeline(transaction=False)
                for key in keys:
                    pipe.hget(prefix + key, "origin")
                total += sum(origin == queue for origin in pipe.execute())
                after = keys[-1]
            return total

    def sync(self) -> int:
        """Index the queue's jobs the index has not seen (found with SCAN); how many."""
        from rq.job import Job

        prefix = Job.redis_job_namespace_prefix
        added = 0
        with self._redis():
            ids = [
                raw.decode("utf-8")[len(prefix) :]
                for raw in self.redis.scan_iter(match=f"{prefix}*", count=1000)
                if b":" not in raw[len(prefix) :]
            ]
            known = set()
            if ids:
                scores = self.redis.zmscore(self.index, ids)
                known = {job_id for job_id, score in zip(ids, scores, strict=True) if score is not None}
            new = [job_id for job_id in ids if job_id not in known]
            for job in Job.fetch_many(new, connection=self.redis):
                if job is None or job.origin != self.queue.name:
                    continue
                self._remember_run_at(job)
                added += int(self.redis.zadd(self.index, {job.id: 0}))  # type: ignore[arg-type]
        return added

    # -- writing ------------------------------------------------------------------------------

    def put(self, record: TaskRecord) -> None:
        self.put_many([record])

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        """Each record in turn (RQ has no transaction over jobs); every key is checked first, so
        a batch with a key RQ cannot hold writes nothing."""
        last = {record.key: record for record in records}
        for key in last:
            self._check_key(key)
        for record in last.values():
            self._write(record, forward=False)
        return len(records)

    def put_forward(self, record: TaskRecord) -> bool:
        self._check_key(record.key)
        return self._write(record, forward=True)

    def _check_key(self, key: str) -> None:
        if not _JOB_ID.fullmatch(key):
            raise DataError(
                f"store '{self.name}': key {key!r} cannot be an RQ job id (letters, digits, '_' and '-'"
                " only): keep such tasks off the RQ side"
            )

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        from migration_fsm.tasks.records import ProgressUpdate

        return self.set_progress_many([ProgressUpdate(key, status, attempts, updated_at)]) == 1

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        from rq.job import Job

        changed = 0
        with self._redis():
            for update in updates:
                job = self._fetch(update.key)
                if job is None:
                    continue
                current = self._status(job)
                if update.expected is not None and current != update.expected:
                    continue
                move(job, self.queue, current, update.status)
                job = Job.fetch(update.key, connection=self.redis)
                self._write_meta(job, attempts=update.attempts, updated_at=update.updated_at)
                changed += 1
        return changed

    def close(self) -> None:
        self.redis.close()

    def check_setup(self) -> list[str]:
        """`setup` has run for the queue; RQ is a version the adapter knows."""
        from importlib import metadata

        problems = []
        with self._redis():
            if self.redis.get(f"{self.index}:setup") is None:
                problems.append(
                    f"store '{self.name}': RQ queue '{self.queue.name}' has no key index: run"
                    f" `python -m migration_fsm.adapters.rq setup --url URL --queue {self.queue.name}`"
                )
        version = metadata.version("rq")
        if not version.startswith(("2.", "3.")):
            problems.append(
                f"store '{self.name}': RQ {version} is installed; the adapter supports 2.x and 3.x"
            )
        return problems

    # -- internals ----------------------------------------------------------------------------

    @contextmanager
    def _redis(self) -> Iterator[None]:
        """Redis errors of a read or write, as the store's own."""
        import redis

        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise DatabaseUnavailable(f"store '{self.name}': Redis is unavailable: {exc}") from exc

    def _fetch(self, key: str) -> Any:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(key, connection=self.redis)
        except NoSuchJobError:
            return None
        return job if job.origin == self.queue.name else None

    def _write(self, record: TaskRecord, *, forward: bool) -> bool:
        from rq.job import Job

        with self._redis():
            job = self._fetch(record.key)
            if job is not None and forward and is_behind(record.status, self._status(job)):
                return False
            func_name = self.func_of.get(record.type, record.type)
            if job is None and record.status is TaskStatus.PENDING:
                self._enqueue(record, func_name)
                return True
            if job is None:
                job = self._enqueue(record, func_name, save=False)
                current = TaskStatus.PENDING
            else:
                current = self._status(job)
                if (job.func_name, job.kwargs, job.args, _time(job.created_at)) != (
                    func_name,
                    record.payload,
                    (),
                    record.created_at,
                ):
                    job.func_name = func_name  # a different task under this key: replaced in place
                    job.args, job.kwargs = (), record.payload
                    job.created_at = record.created_at.astimezone(UTC).replace(tzinfo=None)
                    job.save()
            move(job, self.queue, current, record.status)
            job = Job.fetch(record.key, connection=self.redis)
            self._write_meta(
                job,
                attempts=record.attempts,
                updated_at=record.updated_at,
                metadata=record.metadata,
                run_at=record.run_at,
            )
            self.redis.zadd(self.index, {record.key: 0})
        return True

    def _enqueue(self, record: TaskRecord, func_name: str, *, save: bool = True) -> Any:
        """A new job for `record` through RQ's enqueue; then, with `save`, its creation time,
        the adapter's `meta` and its place in the key index written in one pipeline (the task
        is then whole: a new pending task needs nothing more)."""
        options: dict[str, Any] = {
            "job_id": record.key,
            "kwargs": record.payload,
            "result_ttl": -1,
            "failure_ttl": -1,
            "meta": {META: {"run_at": utc_text(record.run_at) if record.run_at else None}},
        }
        if record.run_at is not None and record.run_at > datetime.now(UTC):
            job = self.queue.enqueue_at(record.run_at, func_name, **options)
        else:
            job = self.queue.enqueue_call(func_name, **options)
        job.created_at = record.created_at.astimezone(UTC).replace(tzinfo=None)
        if not save:
            job.save()
            return job
        values = self._meta_values(
            job,
            attempts=record.attempts,
            updated_at=record.updated_at,
            metadata=record.metadata,
            run_at=record.run_at,
        )
        job.meta.setdefault(META, {}).update(values)
        pipe = self.redis.pipeline()
        job.save(pipeline=pipe)  # written_at is now, after RQ's enqueued_at
        pipe.zadd(self.index, {record.key: 0})
        pipe.execute()
        return job

    def _write_meta(
        self,
        job: Any,
        *,
        attempts: int,
        updated_at: datetime,
        metadata: Mapping[str, Any] | None = None,
        run_at: datetime | str | None = "keep",
    ) -> None:
        set_meta(
            job,
            **self._meta_values(
                job, attempts=attempts, updated_at=updated_at, metadata=metadata, run_at=run_at
            ),
        )

    @staticmethod
    def _meta_values(
        job: Any,
        *,
        attempts: int,
        updated_at: datetime,
        metadata: Mapping[str, Any] | None = None,
        run_at: datetime | str | None = "keep",
    ) -> dict[str, Any]:
        """The adapter's `meta` values for a write (`run_at` "keep": leave the one kept)."""
        values: dict[str, Any] = {
            "attempts": attempts,
            "retries_at_write": job.number_of_retries or 0,
            "updated_at": utc_text(updated_at),
            "written_at": utc_text(datetime.now(UTC)),
        }
        if metadata is not None:
            values["metadata"] = dict(metadata)
        if run_at != "keep":
            values["run_at"] = utc_text(run_at) if isinstance(run_at, datetime) else None
        return values

    def _remember_run_at(self, job: Any) -> None:
        """A scheduled job's time into `meta` (RQ forgets it once it enqueues the job)."""
        mine = job.meta.get(META, {})
        if "run_at" in mine or _status_text(job) != "scheduled":
            return
        from rq.registry import ScheduledJobRegistry

        at = ScheduledJobRegistry(queue=self.queue).get_scheduled_time(job)  # type: ignore[no-untyped-call]
        set_meta(job, run_at=utc_text(at))

    def _status(self, job: Any) -> TaskStatus:
        status = _status_text(job)
        recorded = job.meta.get(META, {}).get("status")
        if status == "canceled" and recorded is not None:
            return TaskStatus(recorded)
        try:
            return STATUS_OF[status]
        except KeyError:
            raise DataError(
                f"store '{self.name}': job {job.id} is in RQ status {status!r}, which the adapter"
                " does not map"
            ) from None

    def _record(self, job: Any) -> TaskRecord:
        mine = job.meta.get(META, {})
        if "run_at" not in mine and _status_text(job) == "scheduled":
            self._remember_run_at(job)
            mine = job.meta.get(META, {})
        times = [t for t in (_time(job.enqueued_at), _time(job.started_at), _time(job.ended_at)) if t]
        latest = max(times) if times else _time(job.created_at)
        updated = latest
        if "updated_at" in mine:
            written = datetime.fromisoformat(mine["written_at"].removesuffix("Z")).replace(tzinfo=UTC)
            if latest is None or latest <= written:
                updated = datetime.fromisoformat(mine["updated_at"].removesuffix("Z")).replace(tzinfo=UTC)
        attempts = (
            int(mine.get("attempts", 0)) + (job.number_of_retries or 0) - int(mine.get("retries_at_write", 0))
        )
        run_at = mine.get("run_at")
        created = _time(job.created_at)
        if created is None:
            raise DataError(f"store '{self.name}': job {job.id} has no creation time")
        try:
            return TaskRecord(
                key=job.id,
                type=self.type_of.get(job.func_name, job.func_name),
                payload=self._payload(job),
                status=self._status(job),
                attempts=max(attempts, 0),
                created_at=created,
                updated_at=updated or created,
                metadata=mine.get("metadata", {}),
                run_at=datetime.fromisoformat(run_at.removesuffix("Z")).replace(tzinfo=UTC)
                if run_at
                else None,
            )
        except ValueError as exc:
            raise DataError(f"store '{self.name}': job {job.id} is not a task: {exc}") from exc

    def _payload(self, job: Any) -> dict[str, Any]:
        args, kwargs = tuple(job.args or ()), dict(job.kwargs or {})
        if not args:
            return kwargs
        module_name, _, attr = str(job.func_name).rpartition(".")
        try:
            func = getattr(importlib.import_module(module_name), attr)
            bound = inspect.signature(func).bind_partial(*args, **kwargs)
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            raise DataError(
                f"store '{self.name}': job {job.id} ({job.func_name}) has positional arguments that cannot be"
                f" named: {exc}"
            ) from exc
        if any(
            p.kind is p.VAR_POSITIONAL
            for p in bound.signature.parameters.values()
            if p.name in bound.arguments
        ):
            raise DataError(
                f"store '{self.name}': job {job.id} ({job.func_name}) takes *args, which a payload"
                " cannot name"
            )
        return dict(bound.arguments)


def move(job: Any, queue: Any, current: TaskStatus, target: TaskStatus) -> None:
    """RQ follows a task's move from `current` to `target`: back to pending, the job is enqueued
    again; to any other status from a job a worker could still take or runs, it is cancelled (no
    worker runs it from then on), the status it stands for recorded in its `meta`."""
    if current == target:
        return
    if target is TaskStatus.PENDING:
        set_meta(job, status=None)
        queue.enqueue_job(job)
        return
    if _status_text(job) not in ("canceled", "finished", "failed", "stopped"):
        job.cancel()
    set_meta(job, status=target.value)


def set_meta(job: Any, **values: Any) -> None:
    """Values of the adapter's own in the job's `meta` (RQ's place for them)."""
    job.meta.setdefault(META, {}).update(values)
    job.save_meta()


def setup(url: str, queue: str = "default") -> list[str]:
    """Index the queue's existing jobs and mark the queue set up; what was done."""
    store = RqTaskStore(url, queue=queue)
    try:
        with store._redis():  # noqa: SLF001 - the module's own store
            existed = store.redis.get(f"{store.index}:setup") is not None
            registered = store.sync()
            store.redis.set(f"{store.index}:setup", SETUP_VERSION)
        return [
            f"RQ queue '{queue}': key index {'already set up' if existed else 'set up'} ({store.index})",
            f"{registered} jobs indexed",
        ]
    finally:
        store.close()
