"""Tasks per second through the adapters (issue 13): `DualWriter` over each move's two stores next
to enqueueing into the two systems directly, and `backfill` from each old system next to a plain
scan of its storage, each baseline measured in the same run.

**The systems** are a table (`SYSTEMS`): each entry knows how to make its storage (private to the
run), its `[stores.X]` config table, its own enqueue API with the best plain settings a person
would use, and, for an old side, how to fill it with N tasks through its own API and scan its
storage plainly. The moves (`MOVES`) are pairs of them. Adding a system is one `System` subclass
and one line in each table.

- `sql`, a task table of the default layout in PostgreSQL: one INSERT + COMMIT per task (raw
  psycopg, autocommit); scanned with keyset SELECTs of 1,000 rows;
- `procrastinate`: `app.configure_task(name).defer(**payload)` on a `SyncPsycopgConnector`;
- `huey`, a `SqliteHuey`: calling the task, `send_email(**payload)`; scanned with a sqlite3
  read of its `task` and `schedule` tables, each message unpickled;
- `rq`: `queue.enqueue("bench_jobs.send_email", **payload)`; scanned as the queue's job ids
  and a pipelined HGETALL of their hashes, each job's data unpickled;
- `celery`: `app.send_task("send_email", kwargs=payload, queue=queue)` on the application of
  `bench/bench_celery.py` (`app = "bench_celery:app"` in the config), its broker and result
  backend the run's Redis database; scanned as an LRANGE of the queue's list, each JSON
  message's body decoded.

**1. Dual write** (phase `dual_write`, both sides written): for each move, the tasks/s of
`DualWriter.write(record)` with the stores `build_store` makes from the config tables, next to
the same payloads enqueued through each system's own API, old then new, one after the other
(goal: at least 0.5x). Each system alone too: the adapter store's `put_forward` (what
`DualWriter` calls) next to the system's own enqueue, so a reader sees which side costs what.

**2. Backfill** from each old system into Procrastinate through `commands.backfill` (as the CLI
runs it: the configured stores, a checkpoint per batch in the migration database) of N pending
tasks enqueued through the old system's own API (and indexed by its adapter's `setup`, as an
operator does before the move), next to a plain scan of the old system's storage, and a plain
insert of the same N payloads into Procrastinate (`procrastinate_defer_jobs_v1`, batches of
1,000, a commit each).

Every piece is timed in this process, wall and CPU seconds (this process's CPU only: the
servers' is not in it), in `--rounds` rounds; rates are medians over the rounds, ratios the
median of the rounds' ratios. Within a round of the dual write the pieces take turns by
blocks of `n / --blocks` tasks (the order rotated by one each block), so a change in the
machine's load falls on all of them alike; a round of the backfill runs its three pieces once
each, in an order rotated from round to round, the clock started after each piece's setup (a
fresh Procrastinate schema, a migration in `dual_write`). Private resources: a PostgreSQL
database created for the run and dropped at the end, an empty Redis database number (1 to 15)
whose keys are deleted at the end, SQLite files in a temporary folder. The machine may be
shared: the load average is reported; read the ratios. `--quick` is a smoke run (a test runs
it); the defaults take about 4 to 6 minutes on 2 cores.

    .venv/bin/python bench/adapters.py [--n 500] [--backfill-n 5000] [--rounds 3] [--blocks 10]
        [--only dual-write|backfill] [--old sql|huey|rq|celery ...] [--quick] [--postgres URL]

`--old NAME` (repeatable) runs only the moves from those old systems (and, alone, only the
systems of those moves).
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import logging
import os
import pickle
import platform
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from backfill import DEFAULT_PG, libpq, pg_database, task_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migration_fsm import commands, log
from migration_fsm.client import DualWriter, PhaseClient
from migration_fsm.config import Settings, StoreConfig, load_settings
from migration_fsm.fsm import Phase
from migration_fsm.tasks.capabilities import Closeable, ForwardPut
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.records import TaskRecord, TaskStatus, canonical_json
from tests.support.queues import private_redis_db, procrastinate_schema

GOALS = {"dual_writer_vs_direct": 0.5}
TASK_TYPE = "send_email"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def task(key: str, i: int) -> TaskRecord:
    """A pending task with about 200 bytes of keyword arguments (the payload of bench/backfill.py)."""
    created = T0 + timedelta(seconds=i)
    return TaskRecord(
        key=key,
        type=TASK_TYPE,
        payload={
            "to": f"user{i}@example.com",
            "subject": "Your weekly report is ready",
            "template": "weekly-report-v2",
            "locale": "en-GB",
            "account": f"acct-{i % 9973:05d}",
            "n": i,
            "tags": ["report", "weekly"],
            "priority": i % 5,
        },
        status=TaskStatus.PENDING,
        attempts=0,
        created_at=created,
        updated_at=created,
    )


def tasks(prefix: str, n: int) -> list[TaskRecord]:
    """`n` tasks keyed `prefix-0000000`...: keys every system accepts (RQ: letters, digits, `-`)."""
    return [task(f"{prefix}-{i:07d}", i) for i in range(n)]


# -- the systems ------------------------------------------------------------------------------


class Enqueue:
    """A system's own client: `enqueue(record)` puts the record's payload in as the system's
    users do (the record's key is only used where the system's API wants an id of ours)."""

    def enqueue(self, record: TaskRecord) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the client's connections."""


@contextmanager
def opened(client: Enqueue) -> Iterator[Enqueue]:
    try:
        yield client
    finally:
        client.close()


class System:
    """One task system of the benchmark: its private storage, its store config, its own API.

    `name`: the system's name in the report. A subclass sets up its storage in `__init__`
    (from `Resources`, under the namespace `tag`, so two parts of the run never share tasks)
    and releases it in `close`."""

    name: ClassVar[str]

    def store_config(self) -> dict[str, Any]:
        """The `[stores.X]` table of the adapter over this storage."""
        raise NotImplementedError

    def native(self) -> Enqueue:
        """The system's own enqueue API, opened."""
        raise NotImplementedError

    def fill(self, records: Sequence[TaskRecord]) -> None:
        """As an old side: the records' payloads enqueued through the system's own API (in bulk
        where it has a bulk API), then the adapter's `setup` (an operator runs it before the move)."""
        raise NotImplementedError

    def plain_scan(self) -> int:
        """As an old side: every queued task read from storage and decoded (its arguments as
        Python objects), the plain way; how many."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop what `__init__` made."""


class Resources:
    """What the run owns: a PostgreSQL database, a Redis database number, a folder."""

    def __init__(self, stack: ExitStack, postgres_admin: str) -> None:
        self.stack = stack
        self.folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        self.pg = stack.enter_context(pg_database(postgres_admin))
        self.redis = stack.enter_context(private_redis_db())


class SqlTable(System):
    """A task table of our default layout in PostgreSQL (the `sql` kind), the old side of the
    SQL-table move; its own enqueue is one INSERT + COMMIT per task."""

    name = "sql"
    COLUMNS = ("key", "type", "payload", "status", "attempts", "created_at", "updated_at", "metadata")

    def __init__(self, res: Resources, tag: str) -> None:
        self.url = res.pg
        self.table = f"tasks_{tag}"
        task_table(self.url, self.table)

    def store_config(self) -> dict[str, Any]:
        return {"kind": "sql", "url": self.url, "table": self.table}

    def row(self, record: TaskRecord) -> tuple[Any, ...]:
        return (
            record.key,
            record.type,
            canonical_json(record.payload),
            str(record.status),
            record.attempts,
            record.created_at,
            record.updated_at,
            canonical_json(record.metadata),
        )

    def native(self) -> Enqueue:
        system = self
        sql = (
            f"INSERT INTO {self.table} ({', '.join(self.COLUMNS)})"  # noqa: S608 - our own table name
            f" VALUES ({', '.join(['%s'] * len(self.COLUMNS))})"
        )

        class Insert(Enqueue):
            def __init__(self) -> None:
                self.conn = psycopg.connect(libpq(system.url), autocommit=True)

            def enqueue(self, record: TaskRecord) -> None:
                self.conn.execute(sql, system.row(record))

            def close(self) -> None:
                self.conn.close()

        return Insert()

    def fill(self, records: Sequence[TaskRecord]) -> None:
        with psycopg.connect(libpq(self.url)) as conn, conn.cursor() as cursor:
            with cursor.copy(f"COPY {self.table} ({', '.join(self.COLUMNS)}) FROM STDIN") as copy:
                for record in records:
                    copy.write_row(self.row(record))
            cursor.execute(f"ANALYZE {self.table}")

    def plain_scan(self) -> int:
        names = ", ".join(self.COLUMNS)
        sql = f"SELECT {names} FROM {self.table} WHERE key > %s ORDER BY key LIMIT 1000"  # noqa: S608
        seen, after = 0, ""
        with psycopg.connect(libpq(self.url)) as conn:
            while rows := conn.execute(sql, (after,)).fetchall():
                seen += len(rows)
                after = rows[-1][0]
        return seen


class Procrastinate(System):
    """Procrastinate 3 in a schema of its own (Procrastinate's schema and the adapter's registry
    applied); its own enqueue is `configure_task(name).defer(**payload)` on a sync app."""

    name = "procrastinate"

    def __init__(self, res: Resources, tag: str) -> None:
        del tag  # a schema of its own already
        self._stack = ExitStack()
        self.url = self._stack.enter_context(procrastinate_schema(res.pg))

    def store_config(self) -> dict[str, Any]:
        return {"kind": "migration_fsm.adapters.procrastinate:store", "url": self.url}

    def native(self) -> Enqueue:
        from procrastinate import App, SyncPsycopgConnector

        app = App(connector=SyncPsycopgConnector(conninfo=libpq(self.url)))

        class Defer(Enqueue):
            def __init__(self) -> None:
                app.open()
                self.task = app.configure_task(TASK_TYPE)

            def enqueue(self, record: TaskRecord) -> None:
                self.task.defer(**record.payload)

            def close(self) -> None:
                app.close()

        return Defer()

    def insert_in_batches(self, records: Sequence[TaskRecord], batch: int = 1000) -> int:
        """The plain insert: `procrastinate_defer_jobs_v1` with `batch` jobs per call, a commit each."""
        sql = (
            "SELECT procrastinate_defer_jobs_v1(array_agg(ROW('default', %s, 0, NULL, NULL, a, NULL)"
            "::procrastinate_job_to_defer_v1)) FROM unnest(%s::jsonb[]) a"
        )
        with psycopg.connect(libpq(self.url), autocommit=True) as conn:
            for start in range(0, len(records), batch):
                chunk = records[start : start + batch]
                conn.execute(sql, (TASK_TYPE, [canonical_json(r.payload) for r in chunk]))
        return len(records)

    def close(self) -> None:
        self._stack.close()


def send_email(**_payload: Any) -> None:
    """The Huey task of the benchmark (never run: no consumer)."""


class Huey(System):
    """`SqliteHuey` on a file of its own (the adapter's registry created by its `setup`); its own
    enqueue is calling the task."""

    name = "huey"

    def __init__(self, res: Resources, tag: str) -> None:
        from huey import SqliteHuey

        from migration_fsm.adapters.huey import setup

        self.file = res.folder / f"huey-{tag}.db"
        self.huey = SqliteHuey("bench", filename=str(self.file))
        self.task = self.huey.task(name=TASK_TYPE)(send_email)
        setup(self.huey)

    def store_config(self) -> dict[str, Any]:
        return {"kind": "migration_fsm.adapters.huey:store", "filename": str(self.file), "queue": "bench"}

    def native(self) -> Enqueue:
        system = self

        class Call(Enqueue):
            def enqueue(self, record: TaskRecord) -> None:
                system.task(**record.payload)

        return Call()

    def fill(self, records: Sequence[TaskRecord]) -> None:
        from migration_fsm.adapters.huey import setup

        for record in records:  # Huey has no bulk enqueue
            self.task(**record.payload)
        setup(self.huey)

    def plain_scan(self) -> int:
        seen = 0
        conn = sqlite3.connect(self.file)
        try:
            for table in ("task", "schedule"):
                cursor = conn.execute(f"SELECT data FROM {table} WHERE queue = ?", ("bench",))  # noqa: S608
                while rows := cursor.fetchmany(1000):
                    for (data,) in rows:
                        message = pickle.loads(data)  # noqa: S301 - Huey's own messages, written above
                        seen += message.kwargs is not None
        finally:
            conn.close()
        return seen

    def close(self) -> None:
        self.huey.storage.close()


class Rq(System):
    """An RQ queue of its own in the run's Redis database (indexed by the adapter's `setup`); its
    own enqueue is `queue.enqueue(function name, **payload)`."""

    name = "rq"
    FUNCTION = f"bench_jobs.{TASK_TYPE}"

    def __init__(self, res: Resources, tag: str) -> None:
        import redis
        from rq import Queue

        from migration_fsm.adapters.rq import setup

        self.url = res.redis
        self.redis = redis.Redis.from_url(self.url)
        self.queue = Queue(f"bench-{tag}", connection=self.redis)
        setup(self.url, self.queue.name)

    def store_config(self) -> dict[str, Any]:
        return {
            "kind": "migration_fsm.adapters.rq:store",
            "url": self.url,
            "queue": self.queue.name,
            "type_map": {self.FUNCTION: TASK_TYPE},
        }

    def native(self) -> Enqueue:
        system = self

        class Call(Enqueue):
            def enqueue(self, record: TaskRecord) -> None:
                system.queue.enqueue(system.FUNCTION, **record.payload)

        return Call()

    def fill(self, records: Sequence[TaskRecord]) -> None:
        from rq import Queue

        from migration_fsm.adapters.rq import setup

        for start in range(0, len(records), 1000):
            self.queue.enqueue_many(
                [
                    Queue.prepare_data(self.FUNCTION, kwargs=r.payload, job_id=r.key, result_ttl=-1)
                    for r in records[start : start + 1000]
                ]
            )
        setup(self.url, self.queue.name)

    def plain_scan(self) -> int:
        from rq.job import Job

        seen = 0
        ids = [raw.decode() for raw in self.redis.lrange(self.queue.key, 0, -1)]  # type: ignore[union-attr]
        for start in range(0, len(ids), 1000):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids[start : start + 1000]:
                pipe.hgetall(Job.redis_job_namespace_prefix + job_id)
            for fields in pipe.execute():
                _func, _instance, _args, kwargs = pickle.loads(zlib.decompress(fields[b"data"]))  # noqa: S301
                seen += kwargs is not None
        return seen

    def close(self) -> None:
        self.redis.close()


class Celery(System):
    """A Celery application (`bench_celery:app`) whose broker and result backend are the run's
    Redis database, on a queue of its own (the adapter's registry created by its `setup`); its own
    enqueue is `app.send_task(name, kwargs=payload, queue=queue)`."""

    name = "celery"
    APP = "bench_celery:app"

    def __init__(self, res: Resources, tag: str) -> None:
        import bench_celery
        import redis

        from migration_fsm.adapters.celery import setup

        bench_celery.use_redis(res.redis)
        self.app = bench_celery.app
        self.queue = f"bench-{tag}"
        self.redis = redis.Redis.from_url(res.redis)
        setup(self.app, self.queue)

    def store_config(self) -> dict[str, Any]:
        return {"kind": "migration_fsm.adapters.celery:store", "app": self.APP, "queue": self.queue}

    def native(self) -> Enqueue:
        system = self

        class SendTask(Enqueue):
            def enqueue(self, record: TaskRecord) -> None:
                system.app.send_task(TASK_TYPE, kwargs=record.payload, queue=system.queue)

        return SendTask()

    def fill(self, records: Sequence[TaskRecord]) -> None:
        from migration_fsm.adapters.celery import setup

        for record in records:  # Celery has no bulk send
            self.app.send_task(TASK_TYPE, kwargs=record.payload, queue=self.queue)
        setup(self.app, self.queue)

    def plain_scan(self) -> int:
        seen = 0
        for raw in self.redis.lrange(self.queue, 0, -1):
            message = json.loads(raw)
            body = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            _args, kwargs, _embed = json.loads(body)
            seen += kwargs is not None
        return seen

    def close(self) -> None:
        self.redis.close()


#: The systems, by name.
SYSTEMS: dict[str, Callable[[Resources, str], System]] = {
    "sql": SqlTable,
    "procrastinate": Procrastinate,
    "huey": Huey,
    "rq": Rq,
    "celery": Celery,
}
#: The moves the adapters make (old -> new), each one more row in both parts of the report.
MOVES: tuple[tuple[str, str], ...] = (
    ("sql", "procrastinate"),
    ("huey", "procrastinate"),
    ("rq", "procrastinate"),
    ("celery", "procrastinate"),
)


# -- timing -----------------------------------------------------------------------------------


def timed(run: Callable[[], int]) -> dict[str, float]:
    """`run()` (which returns how many tasks it handled): tasks, wall and CPU seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    count = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"tasks": count, "seconds": round(wall, 4), "cpu_seconds": round(cpu, 4)}


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The rounds of one piece: the median round's rate, CPU microseconds per task, every round."""
    count = runs[0]["tasks"]
    seconds = statistics.median(r["seconds"] for r in runs)
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    return {
        "tasks": int(count),
        "tasks_per_second": round(count / seconds),
        "cpu_us_per_task": round(cpu / count * 1e6, 1),
        "seconds": [r["seconds"] for r in runs],
        "cpu_seconds": [r["cpu_seconds"] for r in runs],
    }


def versus(ours: dict[str, Any], theirs: dict[str, Any], goal: float | None = None) -> dict[str, Any]:
    """Our rate over the baseline's: `ratio` is the median of the rounds' ratios (each round's
    two figures were measured side by side, so their ratio is what the machine's load disturbs
    least); `ratio_of_medians` divides the two median rates."""
    per_round = [round(t / o, 3) for o, t in zip(ours["seconds"], theirs["seconds"], strict=True) if o]
    result: dict[str, Any] = {
        "ratio": round(statistics.median(per_round), 3),
        "per_round": per_round,
        "ratio_of_medians": round(ours["tasks_per_second"] / theirs["tasks_per_second"], 3),
    }
    if goal is not None:
        result |= {"goal": goal, "met": result["ratio"] >= goal}
    return result


Piece = Callable[[list[TaskRecord]], None]


def interleaved(
    pieces: dict[str, Piece], n: int, rounds: int, blocks: int
) -> dict[str, list[dict[str, float]]]:
    """`rounds` rounds of `n` tasks per piece; within a round the pieces take turns by blocks
    of `n / blocks` tasks, in an order rotated by one each block (so a change in the machine's
    load falls on every piece alike), each block's tasks made before its clock starts. Per
    round and piece: the tasks, and the wall and CPU seconds of its blocks added up."""
    names = list(pieces)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    size = max(n // blocks, 1)
    for number in range(rounds):
        print(f"adapters: dual write, round {number + 1}/{rounds}", file=sys.stderr, flush=True)
        totals = {name: {"tasks": 0.0, "seconds": 0.0, "cpu_seconds": 0.0} for name in names}
        for block in range(blocks):
            turn = number * blocks + block
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                records = tasks(f"{name.replace(' ', '').replace(':', '-')}-{number}-{block}", size)
                took = timed(functools.partial(run_piece, pieces[name], records))
                for field in totals[name]:
                    totals[name][field] += took[field]
        for name in names:
            runs[name].append({field: round(value, 4) for field, value in totals[name].items()})
    return runs


def run_piece(piece: Piece, records: list[TaskRecord]) -> int:
    piece(records)
    return len(records)


# -- 1. dual write ----------------------------------------------------------------------------


def migration_settings(res: Resources, old: System, new: System) -> Settings:
    return load_settings(
        None,
        database_url=f"sqlite:///{res.folder / 'migration.db'}",
        actor="bench",
        stores={"old": old.store_config(), "new": new.store_config()},
    )


def in_dual_write(settings: Settings, name: str) -> None:
    """Migration `name` made and advanced to `dual_write` (both sides written)."""
    commands.db_upgrade(settings)
    commands.init(settings, name)
    result = commands.advance(settings, name)
    assert result.state is not None
    assert Phase.DUAL_WRITE == result.state.phase, result


def close_store(store: object) -> None:
    if isinstance(store, Closeable):
        store.close()


def system_pieces(stack: ExitStack, system: System) -> dict[str, Piece]:
    """A system alone: its adapter store's `put_forward`, and its own enqueue."""
    name = system.name
    store = build_store(StoreConfig.model_validate(system.store_config()), name)
    stack.callback(close_store, store)
    assert isinstance(store, ForwardPut)
    native = stack.enter_context(opened(system.native()))

    def store_write(records: list[TaskRecord]) -> None:
        for record in records:
            assert store.put_forward(record)

    def native_enqueue(records: list[TaskRecord]) -> None:
        for record in records:
            native.enqueue(record)

    return {f"{name}: store put_forward": store_write, f"{name}: own enqueue": native_enqueue}


def move_pieces(stack: ExitStack, res: Resources, old: System, new: System) -> dict[str, Piece]:
    """A move in `dual_write`: `DualWriter` over the configured stores, and the two systems'
    own enqueues one after the other."""
    settings = migration_settings(res, old, new)
    migration = f"{old.name}-to-{new.name}"
    in_dual_write(settings, migration)
    client = PhaseClient(settings.database_url, migration=migration)
    stack.callback(client.close)
    old_store, new_store = (
        build_store(settings.stores["old"], "old"),
        build_store(settings.stores["new"], "new"),
    )
    stack.callback(close_store, old_store)
    stack.callback(close_store, new_store)
    writer = DualWriter(client, old_store, new_store)
    stack.callback(writer.close)
    old_native = stack.enter_context(opened(old.native()))
    new_native = stack.enter_context(opened(new.native()))

    def dual(records: list[TaskRecord]) -> None:
        for record in records:
            assert "old" == writer.write(record)

    def direct(records: list[TaskRecord]) -> None:
        for record in records:
            old_native.enqueue(record)
            new_native.enqueue(record)

    return {f"{migration}: DualWriter": dual, f"{migration}: direct": direct}


def measure_dual_write(
    res: Resources, n: int, rounds: int, blocks: int, moves: Sequence[tuple[str, str]] = MOVES
) -> dict[str, Any]:
    with ExitStack() as stack:
        systems = {}
        for name, make in SYSTEMS.items():
            if not any(name in move for move in moves):
                continue
            systems[name] = make(res, "dw")
            stack.callback(systems[name].close)
        pieces: dict[str, Piece] = {}
        for system in systems.values():
            pieces |= system_pieces(stack, system)
        for old_name, new_name in moves:
            pieces |= move_pieces(stack, res, systems[old_name], systems[new_name])
        runs = interleaved(pieces, n, rounds, blocks)
    report: dict[str, Any] = {"systems": {}, "moves": {}}
    for name in systems:
        ours, theirs = summary(runs[f"{name}: store put_forward"]), summary(runs[f"{name}: own enqueue"])
        report["systems"][name] = {
            "store_put_forward": ours,
            "own_enqueue": theirs,
            "vs_own_enqueue": versus(ours, theirs),
        }
    for old_name, new_name in moves:
        migration = f"{old_name}-to-{new_name}"
        ours, theirs = summary(runs[f"{migration}: DualWriter"]), summary(runs[f"{migration}: direct"])
        report["moves"][f"{old_name} -> {new_name}"] = {
            "dual_writer": ours,
            "direct_old_then_new": theirs,
            "vs_direct": versus(ours, theirs, GOALS["dual_writer_vs_direct"]),
        }
    return report


# -- 2. backfill ------------------------------------------------------------------------------


def measure_backfill(res: Resources, old_name: str, n: int, rounds: int) -> dict[str, Any]:
    old = SYSTEMS[old_name](res, f"bf_{old_name}")
    records = tasks(f"{old_name}-bf", n)
    try:
        old.fill(records)
        targets: list[Procrastinate] = []

        def backfill(number: int) -> int:
            new = Procrastinate(res, "")
            targets.append(new)
            settings = migration_settings(res, old, new)
            migration = f"backfill-{old_name}-{number}"
            in_dual_write(settings, migration)
            cpu, wall = time.process_time(), time.perf_counter()
            result = commands.backfill(settings, migration)
            assert (n, n) == (result.copied, result.total), result
            timing.append((time.perf_counter() - wall, time.process_time() - cpu))
            return n

        def plain_insert(number: int) -> int:
            del number
            new = Procrastinate(res, "")
            targets.append(new)
            cpu, wall = time.process_time(), time.perf_counter()
            new.insert_in_batches(records)
            timing.append((time.perf_counter() - wall, time.process_time() - cpu))
            return n

        def plain_scan(number: int) -> int:
            del number
            cpu, wall = time.process_time(), time.perf_counter()
            assert n == old.plain_scan()
            timing.append((time.perf_counter() - wall, time.process_time() - cpu))
            return n

        timing: list[tuple[float, float]] = []
        pieces = {"backfill": backfill, "plain scan": plain_scan, "plain insert": plain_insert}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in pieces}
        for number in range(rounds):  # as `interleaved`, but the clock excludes each piece's setup
            order = list(pieces)[number % 3 :] + list(pieces)[: number % 3]
            for name in order:
                print(
                    f"adapters: backfill {old_name}, round {number + 1}/{rounds}: {name}",
                    file=sys.stderr,
                    flush=True,
                )
                pieces[name](number)
                seconds, cpu = timing.pop()
                runs[name].append({"tasks": n, "seconds": round(seconds, 4), "cpu_seconds": round(cpu, 4)})
                while targets:
                    targets.pop().close()
    finally:
        old.close()
    ours, scan, insert = summary(runs["backfill"]), summary(runs["plain scan"]), summary(runs["plain insert"])
    both = [s + i for s, i in zip(scan["seconds"], insert["seconds"], strict=True)]
    scan_then_insert = {"tasks": n, "tasks_per_second": round(n / statistics.median(both)), "seconds": both}
    return {
        "backfill": ours,
        "plain_scan_of_old": scan,
        "plain_insert_into_procrastinate": insert,
        "scan_then_insert_sum": scan_then_insert,
        "vs_plain_scan": versus(ours, scan),
        "vs_plain_insert": versus(ours, insert),
        "vs_scan_then_insert": versus(ours, {**scan_then_insert, "seconds": both}),
    }


# -- the run ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="tasks per piece and round of the dual write")
    parser.add_argument("--backfill-n", type=int, default=5000, help="tasks backfilled from each old system")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=10, help="turns per round of the dual write's pieces")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    parser.add_argument("--postgres", default=os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG))
    parser.add_argument("--only", choices=("dual-write", "backfill"), help="run one part only")
    parser.add_argument(
        "--old",
        action="append",
        choices=[old for old, _new in MOVES],
        help="run only the moves from this old system (repeatable)",
    )
    args = parser.parse_args()
    moves = [move for move in MOVES if args.old is None or move[0] in args.old]
    if args.quick:
        args.n, args.backfill_n, args.rounds, args.blocks = 20, 200, 1, 2
    # A SIGTERM unwinds like an exception, so the database, the Redis keys and the files go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log.configure(json=True, level=logging.WARNING)  # measure the writes, not a log renderer
    logging.getLogger("procrastinate").setLevel(logging.ERROR)  # its "App in __main__" advice
    report: dict[str, Any] = {
        "benchmark": "adapters",
        "n": args.n,
        "backfill_n": args.backfill_n,
        "rounds": args.rounds,
        "blocks": args.blocks,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "goals": GOALS,
    }
    with ExitStack() as stack:
        res = Resources(stack, args.postgres)
        if args.only in (None, "dual-write"):
            report["dual_write"] = measure_dual_write(res, args.n, args.rounds, args.blocks, moves)
        if args.only in (None, "backfill"):
            report["backfill"] = {
                old: measure_backfill(res, old, args.backfill_n, args.rounds) for old, _new in moves
            }
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
