"""`CeleryTaskStore`: a `TaskStore` over one Celery queue with a Redis broker and a Redis result
backend, plus a registry of tasks kept in the result backend's Redis.

**Why a registry.** Celery cannot list its tasks: a waiting task is a message in the broker's
queue (kombu's Redis transport keeps a queue as a list of JSON messages, and the messages a worker
has taken but not acknowledged, ETA tasks included, in its `unacked` hash); a task a worker took
leaves a result record (`celery-task-meta-<id>`: state, result, `date_done`) and nothing else
(no name, no arguments, no creation time). So the adapter keeps, in the result backend's Redis
(created by `python -m migration_fsm.adapters.celery setup --app MODULE:APP`):

- `mfsm:celery:<queue>:keys`: a sorted set of the task ids, all scores 0, read with ZRANGEBYLEX
  (byte order of UTF-8: Python's `str` order);
- `mfsm:celery:<queue>:task:<id>`: a hash per task: `type` (the Celery task name), `payload`
  (JSON), `created_at`, `updated_at`, `run_at`, `metadata` (JSON), `attempts`, `status` (the
  status last written by the migration or a gated worker), `seen` (a digest of the task's result
  record when `status` was written), `stopped` (`1`: the migration stopped the task, a refusal
  every gated worker honours), `revoked` (`1`: the adapter broadcast a revoke) and `sent` (`1`:
  the message of the current `status` was published);
- `mfsm:celery:<queue>:setup`: the registry's version.

Tasks enter the registry when written through the adapter; when a read of the whole store
(`scan` from the start, the counts, an unknown key) finds them in the broker (in the queue's
lists or a worker's `unacked` hash: sent by code that knows nothing of the migration); when a
producer that called `register_published_tasks(app)` publishes them; and when a gated worker
takes them (`migration_fsm.adapters.celery.worker`). A task taken and finished by a stock worker
before any of these saw it is not known (its result record has no name or arguments).

**Status.** The registry's `status` stands while the task's result record is the one it saw
(`seen`); once Celery wrote another, Celery's state tells: `PENDING` and `RECEIVED` pending;
`STARTED` running; `RETRY` pending (Celery publishes the retry); `SUCCESS` completed; `FAILURE`
failed; `REVOKED` cancelled (but a task the migration stopped keeps the status it was given:
a worker that discards it after the adapter's revoke writes `REVOKED`); a custom state
(`update_state` from a running task) running.
Celery cannot represent `running elsewhere` or a task the migration finished on the other side:
those live in the registry only (`stopped`), and only a gated worker honours them; the adapter
also takes the task's messages out of the broker, so no worker started later finds them.
`attempts` is the count last written plus one for each failed execution a gated worker saw
(a stock worker's failures are not counted). `run_at` is the message's `eta`; `created_at` the
record's own, or when the registry first saw the task.

**Mapping.** `key` is the Celery task id; `type` the task name (through `type_map`); `payload`
the keyword arguments, with positional ones named by the task function's signature (the task
must be registered in `app`; `*args` is refused, never guessed). Messages are read as JSON only
(`task_serializer = "json"`, Celery's default).

**Writes** use Celery's own API: a new pending task is `app.send_task(name, kwargs=payload,
task_id=key, eta=run_at, queue=queue)` (a task written twice is one task: the second write
finds it registered and sends nothing); a task moved from pending or running to another status
is recorded as stopped, its messages are taken out of the broker's queue and `unacked` hash,
and, to a finished status, revoked (`app.control.revoke`, which reaches live workers only: the
registry is what makes the refusal persist); a task moved back to pending is sent again (its
old result record is deleted first, since Celery never overwrites a `SUCCESS`, and a gated
worker forgets the revoke the adapter broadcast for it). Each write is a compare-and-set of one
task (WATCH on its registry hash and its result record), then Celery follows; Redis and the
broker share no transaction, so a crash in between leaves a pending task whose message is not
`sent`, and the next write of the task sends it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import inspect
import json
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from migration_fsm.adapters._redis import index_page
from migration_fsm.exceptions import ConfigError, DatabaseUnavailable, DataError
from migration_fsm.tasks.records import TaskRecord, TaskStatus, canonical_json, is_behind, to_utc, utc_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import redis
    from celery import Celery

    from migration_fsm.tasks.records import ProgressUpdate

SETUP_VERSION: Final = "1"

#: Celery's state in a result record -> TaskStatus (any other, custom, state: running).
STATUS_OF: Final[Mapping[str, TaskStatus]] = {
    "PENDING": TaskStatus.PENDING,
    "RECEIVED": TaskStatus.PENDING,
    "RETRY": TaskStatus.PENDING,
    "STARTED": TaskStatus.RUNNING,
    "SUCCESS": TaskStatus.COMPLETED,
    "FAILURE": TaskStatus.FAILED,
    "REVOKED": TaskStatus.CANCELLED,
}
_FINISHED: Final = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)
_LIVE: Final = (TaskStatus.PENDING, TaskStatus.RUNNING)

#: Register a task unless the registry has it: KEYS = (hash, keys set), ARGV = (key, field,
#: value, ...). One script, so a worker and a store registering one task never both write it.
_REGISTER: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"""


def registry_prefix(queue: str) -> str:
    return f"mfsm:celery:{queue}"


def load_app(path: str) -> Celery:
    """The `Celery` application at `package.module:attribute`."""
    from celery import Celery

    module_name, _, attr = path.partition(":")
    try:
        app = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot load the Celery application '{path}': {exc}") from exc
    if not isinstance(app, Celery):
        raise ConfigError(f"'{path}' is a {type(app).__name__}, not a Celery application")
    return app


def digest(meta: bytes | None) -> str:
    """What the registry keeps of a result record: enough to tell whether Celery wrote another."""
    return "" if meta is None else hashlib.sha1(meta, usedforsecurity=False).hexdigest()


def _parse(text: str) -> datetime:
    return to_utc(datetime.fromisoformat(text.removesuffix("Z")))


def _text(value: bytes | str | None) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else (value or "")


class Message:
    """One task message as kombu's Redis transport keeps it (JSON, its body base64 or plain)."""

    def __init__(self, raw: bytes | str) -> None:
        data = json.loads(raw)
        self.raw = raw
        self.headers: dict[str, Any] = data.get("headers") or {}
        self.properties: dict[str, Any] = data.get("properties") or {}
        self.id = str(self.headers.get("id", ""))
        self.task = str(self.headers.get("task", ""))
        self.content_type = data.get("content-type")
        self._body = data.get("body")

    def arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """The task's positional and keyword arguments (Celery's message protocol 2, JSON)."""
        if self.content_type != "application/json":
            raise DataError(
                f"Celery task {self.id} ({self.task}) is a {self.content_type} message: the adapter reads"
                " JSON messages only (task_serializer = 'json')"
            )
        body = self._body
        if self.properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        return list(args), dict(kwargs)

    def eta(self) -> datetime | None:
        eta = self.headers.get("eta")
        return _parse(eta) if eta else None

    def routing_key(self) -> str | None:
        info = self.properties.get("delivery_info") or {}
        key = info.get("routing_key")
        return str(key) if key is not None else None


class CeleryTaskStore:
    """A `TaskStore` over the tasks of Celery queue `queue` of application `app` (see the
    module's docstring). `app`: `package.module:app` (or the application itself), whose broker
    and result backend are Redis; its registered tasks name positional arguments.
    `type_map`: Celery task name -> record type, where they differ."""

    keeps_metadata: Final = True
    keeps_run_at: Final = True

    def __init__(
        self,
        app: str | Celery,
        *,
        queue: str = "celery",
        name: str = "celery",
        type_map: Mapping[str, str] | None = None,
    ) -> None:
        import redis

        self.name = name
        self.app = load_app(app) if isinstance(app, str) else app
        self.queue = queue
        self.prefix = registry_prefix(queue)
        self.index = f"{self.prefix}:keys"
        self.type_of = dict(type_map or {})
        self.task_of = {type_: task for task, type_ in self.type_of.items()}
        if len(self.task_of) != len(self.type_of):
            raise ConfigError(f"store '{name}': two Celery task names map to one type in 'type_map'")
        conf = self.app.conf
        backend_url, broker_url = str(conf.result_backend or ""), str(conf.broker_url or "")
        for what, url in (("result_backend", backend_url), ("broker_url", broker_url)):
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(
                    f"store '{name}': the Celery application's {what} is {url or 'not set'!r}: the adapter"
                    " supports a Redis broker and a Redis result backend"
                )
        try:
            self.results: redis.Redis = redis.Redis.from_url(backend_url)
            self.broker: redis.Redis = redis.Redis.from_url(broker_url)
        except ValueError as exc:
            raise ConfigError(f"store '{name}': not a Redis URL: {exc}") from exc
        options = dict(conf.broker_transport_options or {})
        self.keyprefix = str(options.get("global_keyprefix", ""))
        self.unacked = self.keyprefix + str(options.get("unacked_key", "unacked"))
        self.unacked_index = self.keyprefix + str(options.get("unacked_index_key", "unacked_index"))
        sep = str(options.get("sep", "\x06\x16"))
        steps = options.get("priority_steps", [0, 3, 6, 9])
        self.queue_lists = [self.keyprefix + (queue if not step else f"{queue}{sep}{step}") for step in steps]
        self.meta_prefix = "celery-task-meta-"
        self._register = self.results.register_script(_REGISTER)

    # -- reading ------------------------------------------------------------------------------

    def scan(self, after: str | None, limit: int) -> list[TaskRecord]:
        if limit <= 0:
            return []
        with self._redis():
            if after is None:
                self.sync()
            keys = index_page(self.results, self.index, after, limit)
        found = self.get_many(keys, sync=False)
        return [found[key] for key in keys if key in found]

    def get(self, key: str) -> TaskRecord | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str], *, sync: bool = True) -> dict[str, TaskRecord]:
        found: dict[str, TaskRecord] = {}
        with self._redis():
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                for key, (fields, meta) in zip(chunk, self.read(chunk), strict=True):
                    if fields:
                        found[key] = self._record(key, fields, meta)
            if sync and len(found) < len(set(keys)) and self.sync():
                return self.get_many([key for key in keys if key not in found], sync=False) | found
        return found

    def read(self, keys: Sequence[str]) -> list[tuple[dict[str, str], bytes | None]]:
        """The registry hash (decoded) and the raw result record of each key."""
        pipe = self.results.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.task_key(key))
            pipe.get(self.meta_key(key))
        replies = pipe.execute()
        return [
            ({_text(k): _text(v) for k, v in replies[i].items()}, replies[i + 1])
            for i in range(0, len(replies), 2)
        ]

    def count_by_status(self) -> dict[TaskStatus, int]:
        counts = dict.fromkeys(TaskStatus, 0)
        after: str | None = None
        while batch := self.scan(after, 1000):
            for record in batch:
                counts[record.status] += 1
            after = batch[-1].key
        return counts

    def count(self) -> int:
        with self._redis():
            self.sync()
            return int(self.results.zcard(self.index))

    def sync(self) -> int:
        """Register the queue's messages in the broker (its lists and the workers' `unacked`
        hash) that the registry has not seen; how many were registered."""
        messages = self.messages()
        if not messages:
            return 0
        pipe = self.results.pipeline(transaction=False)
        for message in messages:
            pipe.exists(self.task_key(message.id))
        unseen = [m for m, known in zip(messages, pipe.execute(), strict=True) if not known]
        now = datetime.now(UTC)
        records = [self.record_of(m.id, m.task, m.arguments(), m.eta(), now) for m in unseen]
        return sum(self.register(record) for record in records)  # none when one is refused

    def messages(self) -> list[Message]:
        """The task messages of the queue the broker holds, waiting or taken but not acknowledged."""
        pipe = self.broker.pipeline(transaction=False)
        for name in self.queue_lists:
            pipe.lrange(name, 0, -1)
        pipe.hvals(self.unacked)
        *lists, unacked = pipe.execute()
        found = [Message(raw) for raws in lists for raw in raws]
        for raw in unacked:
            message, _exchange, routing_key = json.loads(raw)
            if routing_key == self.queue:
                found.append(Message(json.dumps(message)))
        return [m for m in found if m.id and m.task]

    def record_of(  # noqa: PLR0917 - one task's parts, in the order a message has them
        self,
        key: str,
        task_name: str,
        arguments: tuple[Sequence[Any], Mapping[str, Any]],
        eta: datetime | None,
        now: datetime,
        status: TaskStatus = TaskStatus.PENDING,
    ) -> TaskRecord:
        """The record of a Celery task (its id, name, arguments and eta) first seen at `now`."""
        args, kwargs = arguments
        return TaskRecord(
            key=key,
            type=self.type_of.get(task_name, task_name),
            payload=self.payload_of(key, task_name, args, kwargs),
            status=status,
            attempts=0,
            created_at=now,
            updated_at=now,
            run_at=to_utc(eta) if eta is not None else None,
        )

    def payload_of(
        self, key: str, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The arguments as keyword arguments (positional ones named by the task function's
        signature), refused when they cannot be named or are not JSON."""
        payload = dict(kwargs)
        if args:
            task = self.app.tasks.get(task_name)
            if task is None:
                raise DataError(
                    f"store '{self.name}': Celery task {key} ({task_name}) has positional arguments, and the"
                    " task is not registered in the adapter's application: its signature cannot name them"
                )
            try:
                bound = inspect.signature(task.run).bind_partial(*args, **kwargs)
            except (TypeError, ValueError) as exc:
                raise DataError(f"store '{self.name}': Celery task {key} ({task_name}): {exc}") from exc
            if any(
                p.kind is p.VAR_POSITIONAL
                for p in bound.signature.parameters.values()
                if p.name in bound.arguments
            ):
                raise DataError(
                    f"store '{self.name}': Celery task {key} ({task_name}) takes *args, which a payload"
                    " cannot name"
                )
            payload = dict(bound.arguments)
        try:
            canonical_json(payload)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"store '{self.name}': Celery task {key}'s arguments are not JSON: {exc}"
            ) from exc
        return payload

    # -- writing ------------------------------------------------------------------------------

    def put(self, record: TaskRecord) -> None:
        self.put_many([record])

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        last = {record.key: record for record in records}
        for record in last.values():  # every record first: a batch with one Celery cannot hold writes nothing
            self._check(record)
        for record in last.values():
            self._write(record, forward=False)
        return len(records)

    def put_forward(self, record: TaskRecord) -> bool:
        self._check(record)
        return self._write(record, forward=True)

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        from migration_fsm.tasks.records import ProgressUpdate

        return self.set_progress_many([ProgressUpdate(key, status, attempts, updated_at)]) == 1

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        changed = 0
        moves: dict[str, tuple[TaskStatus | None, TaskStatus]] = {}  # the last try of each key
        with self._redis():
            for update in updates:

                def change(
                    fields: dict[str, str], meta: bytes | None, update: ProgressUpdate = update
                ) -> dict[str, str] | None:
                    current = self.status(fields, meta)
                    if update.expected is not None and current != update.expected:
                        moves.pop(update.key, None)
                        return None
                    moves[update.key] = (current, update.status)
                    return {
                        **self.status_fields(current, update.status, meta, fields),
                        "attempts": str(update.attempts),
                        "updated_at": utc_text(update.updated_at),
                    }

                changed += self.update(update.key, change)
            self.follow(moves)
        return changed

    def _check(self, record: TaskRecord) -> None:
        """A Celery message carries JSON: a payload or metadata that is not JSON is refused."""
        try:
            canonical_json(record.payload)
            canonical_json(record.metadata)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"store '{self.name}': task {record.key}'s payload or metadata is not JSON: {exc}"
            ) from exc

    def _write(self, record: TaskRecord, *, forward: bool) -> bool:
        moves: dict[str, tuple[TaskStatus | None, TaskStatus]] = {}  # the last try's
        replaced = False

        def change(fields: dict[str, str], meta: bytes | None) -> dict[str, str] | None:
            nonlocal replaced
            moves.clear()
            replaced = False
            if not fields:  # a new task that is not pending is nothing to run here
                moves[record.key] = (None, record.status)
                stopped = "" if record.status is TaskStatus.PENDING else "1"
                return {**self.fields_of(record), "seen": digest(meta), "sent": "", "stopped": stopped}
            current = self.status(fields, meta)
            if forward and is_behind(record.status, current):
                return None
            replaced = current is TaskStatus.PENDING and self._identity(fields) != self._identity(
                self.fields_of(record)
            )
            moves[record.key] = (current, record.status)
            new = {**self.fields_of(record), **self.status_fields(current, record.status, meta, fields)}
            if replaced:
                new["sent"] = ""
            return new

        with self._redis():
            wrote = self.update(record.key, change, create=True)
            if replaced:
                self.withdraw({record.key})
            self.follow(moves)
        return bool(wrote)

    def fields_of(self, record: TaskRecord) -> dict[str, str]:
        """The registry fields of a record but `stopped`, `seen`, `sent` and `revoked`."""
        return {
            "type": self.task_of.get(record.type, record.type),
            "payload": canonical_json(record.payload),
            "created_at": utc_text(record.created_at),
            "updated_at": utc_text(record.updated_at),
            "run_at": utc_text(record.run_at) if record.run_at is not None else "",
            "metadata": canonical_json(record.metadata),
            "attempts": str(record.attempts),
            "status": record.status.value,
        }

    def status_fields(
        self, current: TaskStatus, target: TaskStatus, meta: bytes | None, fields: Mapping[str, str]
    ) -> dict[str, str]:
        """The registry's status fields once the migration moved a task from `current` to `target`."""
        new = {"status": target.value, "seen": digest(meta)}
        if target is TaskStatus.PENDING:
            new["stopped"] = ""
            if current is not TaskStatus.PENDING or fields.get("stopped"):
                new["sent"] = ""  # sent again
        elif current != target or fields.get("stopped"):
            new["stopped"] = "1"
        return new

    @staticmethod
    def _identity(fields: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(fields.get(name, "") for name in ("type", "payload", "created_at", "run_at"))

    def update(
        self,
        key: str,
        change: Callable[[dict[str, str], bytes | None], dict[str, str] | None],
        *,
        create: bool = False,
    ) -> bool:
        """Compare-and-set on one task: `change` gets the registry hash and the result record
        and returns the fields to write (None: nothing), written only if neither changed since."""
        import redis

        task_key = self.task_key(key)
        with self.results.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(task_key, self.meta_key(key))  # type: ignore[no-untyped-call]
                    raw = pipe.hgetall(task_key)
                    meta: bytes | None = pipe.get(self.meta_key(key))  # type: ignore[assignment]
                    fields = {_text(k): _text(v) for k, v in raw.items()}
                    if not fields and not create:
                        pipe.reset()
                        return False
                    new = change(fields, meta)
                    if new is None:
                        pipe.reset()
                        return False
                    pipe.multi()
                    pipe.hset(task_key, mapping=dict(new))  # type: ignore[arg-type]
                    pipe.zadd(self.index, {key: 0})
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def register(self, record: TaskRecord) -> bool:
        """Add `record` to the registry unless it has the key; whether it did."""
        fields = {**self.fields_of(record), "stopped": "", "seen": "", "sent": "1"}
        argv: list[str] = [record.key]
        for name, value in fields.items():
            argv += [name, value]
        return bool(self._register(keys=[self.task_key(record.key), self.index], args=argv))

    def follow(self, moves: Mapping[str, tuple[TaskStatus | None, TaskStatus]]) -> None:
        """Make Celery agree with the registry's moves (key -> status before, None for a new
        task, and after): messages of stopped tasks out of the broker (and revoked when
        finished), the tasks moved to pending sent."""
        stop = {
            key
            for key, (before, after) in moves.items()
            if before in _LIVE and after is not TaskStatus.PENDING
        }
        finished = sorted(key for key in stop if moves[key][1] in _FINISHED)
        if stop:
            self.withdraw(stop)
        if finished:
            self.app.control.revoke(finished)
            pipe = self.results.pipeline(transaction=False)
            for key in finished:
                pipe.hset(self.task_key(key), "revoked", "1")
            pipe.execute()
        self.send_unsent([key for key, (_before, after) in moves.items() if after is TaskStatus.PENDING])

    def send_unsent(self, keys: Sequence[str]) -> int:
        """Publish the message of each pending task whose message is not sent yet."""
        sent = 0
        for key, (fields, _meta) in zip(keys, self.read(keys), strict=True):
            if fields.get("status") != TaskStatus.PENDING.value or fields.get("sent") == "1":
                continue
            run_at = _parse(fields["run_at"]) if fields.get("run_at") else None
            # Celery never overwrites a SUCCESS result record: the one of the last execution goes.
            self.results.delete(self.meta_key(key))
            self.results.hset(self.task_key(key), "seen", "")
            self.app.send_task(
                fields["type"],
                kwargs=json.loads(fields["payload"]),
                task_id=key,
                eta=run_at if run_at is not None and run_at > datetime.now(UTC) else None,
                queue=self.queue,
            )
            self.results.hset(self.task_key(key), "sent", "1")
            sent += 1
        return sent

    def withdraw(self, keys: set[str]) -> int:
        """Take the messages of tasks `keys` out of the broker: the queue's lists and the
        workers' `unacked` hash (so neither a worker's restore nor a worker started later finds
        them); how many."""
        removed = 0
        for name in self.queue_lists:
            for raw in self.broker.lrange(name, 0, -1):
                if Message(raw).id in keys:
                    removed += int(self.broker.lrem(name, 1, raw))  # type: ignore[arg-type]
        unacked: dict[bytes, bytes] = self.broker.hgetall(self.unacked)  # type: ignore[assignment]
        for tag, raw in unacked.items():
            message, _exchange, _routing_key = json.loads(raw)
            if str((message.get("headers") or {}).get("id", "")) in keys:
                removed += int(self.broker.hdel(self.unacked, tag))
                self.broker.zrem(self.unacked_index, tag)
        return removed

    def close(self) -> None:
        self.results.close()
        self.broker.close()

    def check_setup(self) -> list[str]:
        """`setup` has run for the queue; Celery is a version the adapter knows; the
        application's settings keep its tasks (see `REQUIRED_SETTINGS`)."""
        from importlib import metadata

        problems = []
        with self._redis():
            if self.results.get(f"{self.prefix}:setup") is None:
                problems.append(
                    f"store '{self.name}': Celery queue '{self.queue}' has no registry: run"
                    f" `python -m migration_fsm.adapters.celery setup --app MODULE:APP --queue {self.queue}`"
                )
        version = metadata.version("celery")
        if not version.startswith("5."):
            problems.append(f"store '{self.name}': Celery {version} is installed; the adapter supports 5.x")
        problems += [f"store '{self.name}': {problem}" for problem in settings_problems(self.app)]
        return problems

    # -- internals ----------------------------------------------------------------------------

    def task_key(self, key: str) -> str:
        return f"{self.prefix}:task:{key}"

    def meta_key(self, key: str) -> str:
        return f"{self.meta_prefix}{key}"

    @contextmanager
    def _redis(self) -> Iterator[None]:
        """Redis and broker errors of a read or write, as the store's own."""
        import redis
        from kombu.exceptions import OperationalError

        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError) as exc:
            raise DatabaseUnavailable(f"store '{self.name}': Redis is unavailable: {exc}") from exc

    def status(self, fields: Mapping[str, str], meta: bytes | None) -> TaskStatus:
        """The task's status: the registry's while Celery's result record is the one it saw."""
        if meta is None or digest(meta) == fields.get("seen"):
            return TaskStatus(fields.get("status") or TaskStatus.PENDING.value)
        state = str(json.loads(meta).get("status", ""))
        if state == "REVOKED" and fields.get("stopped"):  # the echo of the adapter's own revoke
            return TaskStatus(fields["status"])
        return STATUS_OF.get(state, TaskStatus.RUNNING)

    def _record(self, key: str, fields: Mapping[str, str], meta: bytes | None) -> TaskRecord:
        try:
            return TaskRecord(
                key=key,
                type=self.type_of.get(fields["type"], fields["type"]),
                payload=json.loads(fields["payload"]),
                status=self.status(fields, meta),
                attempts=int(fields.get("attempts") or 0),
                created_at=_parse(fields["created_at"]),
                updated_at=_parse(fields["updated_at"]),
                metadata=json.loads(fields.get("metadata") or "{}"),
                run_at=_parse(fields["run_at"]) if fields.get("run_at") else None,
            )
        except (KeyError, ValueError) as exc:
            raise DataError(
                f"store '{self.name}': Celery task {key}'s registry entry is not a task: {exc}"
            ) from exc


#: The settings of the Celery application the adapter needs, what each must be, and why.
REQUIRED_SETTINGS: Final[Mapping[str, tuple[Any, str]]] = {
    "task_acks_late": (True, "a task is acknowledged after it ran, so a lost worker's task comes back"),
    "task_reject_on_worker_lost": (True, "a task whose worker process died is put back in the queue"),
    "task_track_started": (True, "a running task is STARTED in its result record, where the drain sees it"),
    "task_ignore_result": (False, "the result record tells the task's state"),
    "task_serializer": ("json", "the adapter reads the broker's messages"),
}


def settings_problems(app: Celery) -> list[str]:
    """What in the application's settings keeps the adapter from working safely, with the fix."""
    conf = app.conf
    problems = [
        f"Celery setting {setting} is {conf[setting]!r}; set it to {wanted!r}: {why}"
        for setting, (wanted, why) in REQUIRED_SETTINGS.items()
        if conf[setting] != wanted
    ]
    if conf.result_expires:
        problems.append(
            f"Celery setting result_expires is {conf.result_expires!r}; set it to None: a result record"
            " Redis deletes is a task whose status the migration no longer knows"
        )
    return problems


def register_published_tasks(
    app: Celery, *, queue: str = "celery", type_map: Mapping[str, str] | None = None
) -> Any:
    """Register every task this process publishes to `queue` through Celery's own API (a
    `after_task_publish` signal handler), so the store knows a task before any worker takes it;
    returns the handler (`celery.signals.after_task_publish.disconnect(handler)` removes it)."""
    from celery.signals import after_task_publish

    store = CeleryTaskStore(app, queue=queue, type_map=type_map)

    def registered(sender: str | None = None, headers: Any = None, body: Any = None, **info: Any) -> None:
        if not headers or info.get("routing_key") not in (queue, None) or str(sender).startswith("celery."):
            return
        args, kwargs, _embed = body
        eta = headers.get("eta")
        key = str(headers["id"])
        now = datetime.now(UTC)
        record = store.record_of(key, str(sender), (args, kwargs), _parse(eta) if eta else None, now)
        store.register(record)

    after_task_publish.connect(registered, weak=False)
    return registered


def setup(app: str | Celery, queue: str = "celery") -> list[str]:
    """Create the queue's registry in the result backend's Redis and register the messages
    already waiting; what was done, one line each."""
    store = CeleryTaskStore(app, queue=queue)
    try:
        with store._redis():  # noqa: SLF001 - the module's own store
            existed = store.results.get(f"{store.prefix}:setup") is not None
            registered = store.sync()
            store.results.set(f"{store.prefix}:setup", SETUP_VERSION)
        return [
            f"Celery queue '{queue}': registry {'already set up' if existed else 'set up'}"
            f" ({store.prefix}:*)",
            f"{registered} waiting tasks registered",
        ]
    finally:
        store.close()
