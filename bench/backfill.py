"""Tasks per second of `backfill` between two task tables, next to baselines measured in the same run.

SQLite to SQLite with N tasks of about 200 bytes of payload (old.db -> new.db, the default
table layout): `backfill` as the CLI runs it (`backfill_migration`: the configured stores,
a checkpoint per batch in the migration database), next to

- a plain sqlite3 keyset-batch copy between the same two files (SELECT a batch after the
  last key, executemany INSERT, COMMIT; the practical limit), and
- a per-task `put` loop through the same stores (`new.put(record)` for each record the old
  store scans), run on a sample of the tasks and extrapolated to N (it is too slow for all).

PostgreSQL to PostgreSQL (two tables of a database created for the run and dropped at the
end, key column `COLLATE "C"`): `backfill` next to COPY into the same table (`COPY (SELECT
... ORDER BY key) TO STDOUT` streamed into `COPY ... FROM STDIN`, one transaction). With
both tables in one database the batches are copied inside it; the same backfill into a
table of a second database (the rows through Python) is reported too.

Every measured piece runs in a subprocess of its own, so its peak resident memory (ru_maxrss:
interpreter, imports and all) is its own; pieces alternate `--repeat` times and the best run
of each counts (the machine may be shared: the load average is reported, and on SQLite the
rates per CPU second too, which other processes disturb less). Prints one JSON object.

    .venv/bin/python bench/backfill.py [N] [--batch-size B] [--repeat R] [--sample S]
        [--postgres URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import MetaData, create_engine, text
from sqlalchemy.engine import make_url

from migration_fsm import log
from migration_fsm.config import load_settings
from migration_fsm.journal import Journal, make_engine
from migration_fsm.migration import Migration
from migration_fsm.tasks.records import TaskRecord, TaskStatus, canonical_json
from migration_fsm.tasks.sql import SqlTaskStore, default_task_table
from migration_fsm.tools.backfill import backfill_migration

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
COLUMNS = ("key", "type", "payload", "status", "attempts", "created_at", "updated_at", "metadata")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES = tuple(TaskStatus)
GOALS = {"vs_plain_copy": 0.75, "vs_put_loop": 5.0, "vs_copy": 0.5, "peak_rss_mb": 200}


# -- the tasks --------------------------------------------------------------------------------


def task(i: int) -> TaskRecord:
    """Task number `i`: about 200 bytes of canonical JSON payload, statuses in turn."""
    created = T0 + timedelta(seconds=i, microseconds=i % 1_000_000)
    return TaskRecord(
        key=f"task-{i:09d}",
        type="email.send" if i % 4 else "report.build",
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
        status=STATUSES[i % len(STATUSES)],
        attempts=i % 3,
        created_at=created,
        updated_at=created + timedelta(milliseconds=5),
        metadata={"origin": "bench"},
    )


def sqlite_row(i: int) -> tuple[Any, ...]:
    """Task `i` as `SqlTaskStore` writes it to the default SQLite layout (checked by `verify`)."""
    record = task(i)
    return (
        record.key,
        record.type,
        canonical_json(record.payload),
        str(record.status),
        record.attempts,
        record.created_at.replace(tzinfo=None).isoformat(" ", "microseconds"),
        record.updated_at.replace(tzinfo=None).isoformat(" ", "microseconds"),
        canonical_json(record.metadata),
    )


def pg_row(i: int) -> tuple[Any, ...]:
    """Task `i` as a row for COPY into the default PostgreSQL layout."""
    record = task(i)
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


def task_table(url: str, name: str) -> None:
    """The default task table (every field in the column of its name), as the tests make it."""
    engine = make_engine(url, create=True)
    metadata = MetaData()
    default_task_table(metadata, name, dialect=engine.dialect.name)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    engine.dispose()


def fill_sqlite(path: Path, n: int) -> None:
    """N tasks in `tasks` of the SQLite file at `path`."""
    task_table(f"sqlite:///{path}", "tasks")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    marks = ", ".join("?" * len(COLUMNS))
    for start in range(0, n, 10_000):
        rows = [sqlite_row(i) for i in range(start, min(n, start + 10_000))]
        conn.executemany(f"INSERT INTO tasks ({', '.join(COLUMNS)}) VALUES ({marks})", rows)  # noqa: S608
    conn.execute("COMMIT")
    conn.close()


def fill_postgres(url: str, table: str, n: int) -> None:
    """N tasks in `table` of the PostgreSQL database at `url`, through COPY."""
    task_table(url, table)
    with psycopg.connect(libpq(url)) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for i in range(n):
                copy.write_row(pg_row(i))
        cursor.execute(f"ANALYZE {table}")


def verify(url: str, table: str, n: int) -> None:
    """The store reads a sample of the filled tasks back exactly as `task` made them."""
    with SqlTaskStore(url, table, name="check") as store:
        for i in {0, 1, n // 2, n - 1}:
            found = store.get(task(i).key)
            assert found == task(i), (found, task(i))


def libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as a libpq connection string."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def payload_bytes() -> int:
    return len(canonical_json(task(123_456).payload).encode("utf-8"))


# -- measured pieces, each in its own process ------------------------------------------------


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def timed(run: Callable[[], int]) -> dict[str, Any]:
    """Run `run` (which returns how many tasks it moved): wall and CPU seconds, tasks, peak RSS."""
    cpu, wall = time.process_time(), time.perf_counter()
    tasks = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "tasks": tasks,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mb": peak_rss_mb(),
    }


def migration_store(url: str) -> tuple[Journal, str]:
    """The migration database at `url`, upgraded, with a fresh migration in it."""
    store = Journal(url, engine=make_engine(url, create=True))
    store.upgrade()
    name = f"bench-{uuid.uuid4().hex[:8]}"
    Migration(store, load_settings(None, database_url=url, actor="bench"), name).init()
    return store, name


def timed_backfill(
    journal_url: str, old: tuple[str, str], new: tuple[str, str], batch: int, n: int
) -> dict[str, Any]:
    """`backfill_migration` from `old` to `new` (url, table), a fresh migration in the journal
    at `journal_url` (made before the clock starts), timed."""
    store, name = migration_store(journal_url)
    stores = {
        side: {"kind": "sql", "url": url, "table": table}
        for side, (url, table) in zip(("old", "new"), (old, new), strict=True)
    }
    settings = load_settings(
        None, database_url=journal_url, actor="bench", stores=stores, backfill_batch_size=batch
    )

    def run() -> int:
        result = backfill_migration(store, settings, name)
        assert (n, n) == (result.copied, result.total), result
        return result.copied

    try:
        return timed(run)
    finally:
        store.close()


def piece_sqlite_backfill(work: Path, n: int, batch: int) -> dict[str, Any]:
    (work / "new.db").unlink(missing_ok=True)
    task_table(f"sqlite:///{work / 'new.db'}", "tasks")
    (work / "mfsm.db").unlink(missing_ok=True)
    journal = f"sqlite:///{work / 'mfsm.db'}"
    old, new = (f"sqlite:///{work / 'old.db'}", "tasks"), (f"sqlite:///{work / 'new.db'}", "tasks")
    return timed_backfill(journal, old, new, batch, n)


def piece_sqlite_plain(work: Path, n: int, batch: int) -> dict[str, Any]:
    """The plain copy: keyset batches read from old.db, inserted into plain.db, a commit each."""
    target = work / "plain.db"
    target.unlink(missing_ok=True)
    task_table(f"sqlite:///{target}", "tasks")
    names = ", ".join(COLUMNS)
    read = f"SELECT {names} FROM tasks WHERE key > ? ORDER BY key LIMIT ?"  # noqa: S608
    write = f"INSERT INTO tasks ({names}) VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608

    def run() -> int:
        source = sqlite3.connect(work / "old.db")
        sink = sqlite3.connect(target, isolation_level=None)
        copied, after = 0, ""
        while rows := source.execute(read, (after, batch)).fetchall():
            sink.execute("BEGIN IMMEDIATE")
            sink.executemany(write, rows)
            sink.execute("COMMIT")
            copied += len(rows)
            after = rows[-1][0]
        source.close()
        sink.close()
        assert n == copied
        return copied

    return timed(run)


def piece_sqlite_put_loop(work: Path, batch: int, sample: int) -> dict[str, Any]:
    """The per-task loop: `new.put(record)` for each of the first `sample` records old scans."""
    target = work / "loop.db"
    target.unlink(missing_ok=True)
    task_table(f"sqlite:///{target}", "tasks")

    def run() -> int:
        with (
            SqlTaskStore(f"sqlite:///{work / 'old.db'}", "tasks", name="old") as old,
            SqlTaskStore(f"sqlite:///{target}", "tasks", name="new") as new,
        ):
            copied, after = 0, None
            while copied < sample and (page := old.scan(after, min(batch, sample - copied))):
                for record in page:
                    new.put(record)
                copied += len(page)
                after = page[-1].key
        return copied

    return timed(run)


def piece_pg_backfill(url: str, n: int, batch: int, target: str = "") -> dict[str, Any]:
    """Into `new_tasks` of the same database, or of the database at `target`."""
    target = target or url
    task_table(target, "new_tasks")
    return timed_backfill(url, (url, "old_tasks"), (target, "new_tasks"), batch, n)


def piece_pg_copy(url: str, n: int) -> dict[str, Any]:
    """COPY into the same table: the old table's rows streamed out and in, one transaction."""
    task_table(url, "new_tasks")
    names = ", ".join(COLUMNS)
    copy_out = f"COPY (SELECT {names} FROM old_tasks ORDER BY key) TO STDOUT"  # noqa: S608
    copy_in = f"COPY new_tasks ({names}) FROM STDIN"

    def run() -> int:
        with psycopg.connect(libpq(url)) as source, psycopg.connect(libpq(url)) as sink:
            with source.cursor().copy(copy_out) as out, sink.cursor().copy(copy_in) as into:
                for block in out:
                    into.write(block)
            sink.commit()
            copied = sink.execute("SELECT count(*) FROM new_tasks").fetchone()
        assert copied is not None
        assert n == copied[0]
        return n

    return timed(run)


def run_piece(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    if args.piece == "sqlite-backfill":
        return piece_sqlite_backfill(work, args.n, args.batch_size)
    if args.piece == "sqlite-plain":
        return piece_sqlite_plain(work, args.n, args.batch_size)
    if args.piece == "sqlite-put-loop":
        return piece_sqlite_put_loop(work, args.batch_size, args.sample)
    if args.piece == "pg-backfill":
        return piece_pg_backfill(args.url, args.n, args.batch_size)
    if args.piece == "pg-backfill-two-databases":
        return piece_pg_backfill(args.url, args.n, args.batch_size, args.target)
    if args.piece == "pg-copy":
        return piece_pg_copy(args.url, args.n)
    raise SystemExit(f"unknown piece {args.piece}")


# -- the run ----------------------------------------------------------------------------------


def spawn(
    piece: str, args: argparse.Namespace, work: Path, url: str = "", target: str = ""
) -> dict[str, Any]:
    """Run one piece in a fresh interpreter; its JSON line."""
    argv = [sys.executable, __file__, str(args.n), "--piece", piece, "--work", str(work), "--url", url]
    argv += ["--batch-size", str(args.batch_size), "--sample", str(args.sample), "--target", target]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"piece {piece} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one piece, summarised: the best (fastest) run's rates, every run's seconds."""
    fastest = min(runs, key=lambda r: r["seconds"])
    tasks = fastest["tasks"]
    return {
        "tasks_per_second": round(tasks / fastest["seconds"]),
        "cpu_tasks_per_second": round(tasks / max(min(r["cpu_seconds"] for r in runs), 1e-9)),
        "median_tasks_per_second": round(tasks / statistics.median(r["seconds"] for r in runs)),
        "seconds": [r["seconds"] for r in runs],
        "cpu_seconds": [r["cpu_seconds"] for r in runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def versus(ours: dict[str, Any], theirs: dict[str, Any], goal: float, *, cpu: bool) -> dict[str, Any]:
    ratio = ours["tasks_per_second"] / theirs["tasks_per_second"]
    result: dict[str, Any] = {"ratio": round(ratio, 3), "goal": goal, "met": ratio >= goal}
    if cpu:
        result["cpu_ratio"] = round(ours["cpu_tasks_per_second"] / theirs["cpu_tasks_per_second"], 3)
    return result


def measure_sqlite(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    fill_sqlite(work / "old.db", args.n)
    verify(f"sqlite:///{work / 'old.db'}", "tasks", args.n)
    ours: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        ours.append(spawn("sqlite-backfill", args, work))
        plain.append(spawn("sqlite-plain", args, work))
    loop = spawn("sqlite-put-loop", args, work)
    backfill, copy = best(ours), best(plain)
    loop_rate = loop["tasks"] / loop["seconds"]
    put_loop = {
        "sample": loop["tasks"],
        "tasks_per_second": round(loop_rate),
        "cpu_tasks_per_second": round(loop["tasks"] / max(loop["cpu_seconds"], 1e-9)),
        "extrapolated_seconds_for_n": round(args.n / loop_rate, 1),
        "note": f"measured on the first {loop['tasks']} tasks, extrapolated linearly to N",
        "peak_rss_mb": loop["peak_rss_mb"],
    }
    return {
        "backfill": backfill,
        "plain_sqlite3_copy": copy,
        "put_loop": put_loop,
        "vs_plain_copy": versus(backfill, copy, GOALS["vs_plain_copy"], cpu=True),
        "vs_put_loop": versus(backfill, put_loop, GOALS["vs_put_loop"], cpu=True),
        "peak_rss": {
            "mb": backfill["peak_rss_mb"],
            "goal_mb": GOALS["peak_rss_mb"],
            "met": backfill["peak_rss_mb"] < GOALS["peak_rss_mb"],
        },
    }


@contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    """A database created for the run, dropped at the end."""
    name = f"mfsm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def measure_postgres(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with pg_database(args.postgres) as url, pg_database(args.postgres) as other:
        fill_postgres(url, "old_tasks", args.n)
        verify(url, "old_tasks", args.n)
        migration_store(url)[0].close()  # the journal's schema, before any clock starts
        ours: list[dict[str, Any]] = []
        copies: list[dict[str, Any]] = []
        apart: list[dict[str, Any]] = []
        for _ in range(args.repeat):
            ours.append(spawn("pg-backfill", args, work, url))
            copies.append(spawn("pg-copy", args, work, url))
            apart.append(spawn("pg-backfill-two-databases", args, work, url, other))
    backfill, copy, two_databases = best(ours), best(copies), best(apart)
    return {
        "backfill": backfill,
        "copy": copy,
        "vs_copy": versus(backfill, copy, GOALS["vs_copy"], cpu=False),
        "backfill_between_two_databases": {
            **two_databases,
            "vs_copy": round(two_databases["tasks_per_second"] / copy["tasks_per_second"], 3),
            "note": "old and new in two databases of the server: the rows pass through Python (COPY in)",
        },
        "peak_rss": {
            "mb": backfill["peak_rss_mb"],
            "goal_mb": GOALS["peak_rss_mb"],
            "met": backfill["peak_rss_mb"] < GOALS["peak_rss_mb"],
        },
    }


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments bench/backfill.py and bench/validate.py share."""
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="tasks (default 100,000)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measured piece")
    parser.add_argument("--postgres", default=os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG))
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--piece", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)


def report_header(benchmark: str, args: argparse.Namespace, goals: dict[str, float]) -> dict[str, Any]:
    """The start of the JSON report: what ran, on what machine, against which goals."""
    return {
        "benchmark": benchmark,
        "n": args.n,
        "batch_size": args.batch_size,
        "payload_bytes": payload_bytes(),
        "repeat": args.repeat,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        },
        "goals": goals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--sample", type=int, default=20_000, help="tasks of the per-task put loop")
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Library callers choose their own logging; measure the copy, not a log renderer.
    log.configure(json=True, level=logging.WARNING)
    if args.piece:
        print(json.dumps(run_piece(args)))
        return
    args.sample = min(args.sample, args.n)
    report = report_header("backfill", args, GOALS)
    with tempfile.TemporaryDirectory() as tmp:
        report["sqlite"] = measure_sqlite(args, Path(tmp))
        if not args.no_postgres:
            report["postgresql"] = measure_postgres(args, Path(tmp))
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
