"""Tasks per second of `backfill` on every layout of the matrix, next to baselines measured in the same run.

For each layout (`migration_fsm.tasks.sql.layouts`; `--layouts all` or names), N tasks of
about 200 bytes of payload are filled into the old table in SQL, and `backfill` runs as the
CLI runs it (`backfill_migration`: the configured stores, a checkpoint per batch in the
migration database) into the default layout, the new queue's usual table. Baselines:

- SQLite: a plain sqlite3 keyset copy with the settings a person would choose for a bulk
  copy: SELECT a batch (`--plain-batch-size`, 5,000) after the last key, executemany INSERT
  into a table of the same layout (no conversion at all) in a WAL file with
  `synchronous=NORMAL`, COMMIT. The backfill's target file is in WAL mode too. For the
  default layout also a per-task `put` loop on `--sample` tasks.
- PostgreSQL (a database created for the run and dropped at the end): COPY of the old
  table's rows out and into a table of the same layout, one transaction. For the default
  layout also the backfill into a table of a second database (the rows through Python).

Every measured piece runs in a subprocess of its own, so its peak resident memory (ru_maxrss:
interpreter, imports and all) is its own. Backfill and baseline alternate `--repeat` (3)
rounds; the median of each counts, wall and CPU seconds. The load average is reported: the
machine may be shared. Prints one JSON object on stdout and the table on stderr.

    .venv/bin/python bench/backfill.py [N] [--layouts all|NAME,...] [--batch-size B]
        [--plain-batch-size B] [--repeat R] [--sample S] [--postgres URL | --no-postgres]

(Over 500 lines: the validate benchmark imports its fills and timers from here.)
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
from migration_fsm.tasks.sql.layouts import LAYOUTS, Layout, layout_named, layouts_for
from migration_fsm.tools.backfill import backfill_migration

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
COLUMNS = ("key", "type", "payload", "status", "attempts", "created_at", "updated_at", "metadata")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES = tuple(TaskStatus)
GOALS = {
    "vs_plain_copy": 1.0,
    "vs_plain_copy_floor": 0.75,
    "vs_put_loop": 5.0,
    "vs_copy": 0.6,
    "peak_rss_mb": 200,
}


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


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def layout_table(url: str, layout: Layout, name: str, *, rows: int = 0, wal: bool = False) -> None:
    """`layout`'s table `name` at `url` (dropped first), holding rows 0 to `rows` - 1 (filled in
    SQL); with `wal`, the SQLite file in WAL mode, as a person sets up a bulk copy."""
    engine = make_engine(url, create=True)
    try:
        with engine.begin() as conn:
            layout.create(conn, name)
            if rows:
                layout.fill(conn, name, rows)
        if wal and engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        if engine.dialect.name == "postgresql" and rows:
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(f"ANALYZE {name}")
    finally:
        engine.dispose()


def timed_layout_backfill(
    journal_url: str, old: tuple[str, str], new: tuple[str, str], layout: Layout, *, batch: int, n: int
) -> dict[str, Any]:
    """`backfill_migration` from `old` (a table of `layout`) to `new` (the default layout),
    a fresh migration in the journal at `journal_url` (made before the clock starts), timed;
    with how many rows took which path."""
    store, name = migration_store(journal_url)
    stores = {
        "old": layout.store_config(*old),
        "new": {"kind": "sql", "url": new[0], "table": new[1]},
    }
    settings = load_settings(
        None, database_url=journal_url, actor="bench", stores=stores, backfill_batch_size=batch
    )
    paths: dict[str, int] = {}

    def run() -> int:
        result = backfill_migration(store, settings, name)
        assert (n, n) == (result.copied, result.total), result
        paths.update(fast=result.fast, records=result.records)
        return result.copied

    try:
        return {**timed(run), "paths": paths}
    finally:
        store.close()


def piece_sqlite_backfill(work: Path, layout: Layout, n: int, batch: int) -> dict[str, Any]:
    """Old (the layout) -> new.db (the default layout, WAL), the journal in mfsm.db."""
    for name in ("new.db", "mfsm.db"):
        for suffix in ("", "-wal", "-shm"):
            (work / (name + suffix)).unlink(missing_ok=True)
    layout_table(sqlite_url(work / "new.db"), layout_named("default"), "tasks", wal=True)
    old, new = (sqlite_url(work / f"old-{layout.name}.db"), "tasks"), (sqlite_url(work / "new.db"), "tasks")
    return timed_layout_backfill(sqlite_url(work / "mfsm.db"), old, new, layout, batch=batch, n=n)


def piece_sqlite_plain(work: Path, layout: Layout, n: int, batch: int) -> dict[str, Any]:
    """The plain copy, with the best plain settings for a bulk copy: keyset batches of the
    layout's own columns read from the old file, executemany INSERT into a table of the same
    layout in a WAL file with synchronous=NORMAL, a commit per batch."""
    target = work / "plain.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    layout_table(sqlite_url(target), layout, "tasks", wal=True)
    names = [column.name for column in layout.table(MetaData(), "tasks", "sqlite").c]
    key = names[0]
    read = f"SELECT {', '.join(names)} FROM tasks WHERE {key} > ? ORDER BY {key} LIMIT ?"  # noqa: S608
    write = f"INSERT INTO tasks ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608

    def run() -> int:
        source = sqlite3.connect(work / f"old-{layout.name}.db")
        sink = sqlite3.connect(target, isolation_level=None)
        sink.execute("PRAGMA synchronous = NORMAL")
        copied, after = 0, -1 if layout.integer_key else ""
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
    task_table(sqlite_url(target), "tasks")

    def run() -> int:
        with (
            SqlTaskStore(sqlite_url(work / "old-default.db"), "tasks", name="old") as old,
            SqlTaskStore(sqlite_url(target), "tasks", name="new") as new,
        ):
            copied, after = 0, None
            while copied < sample and (page := old.scan(after, min(batch, sample - copied))):
                for record in page:
                    new.put(record)
                copied += len(page)
                after = page[-1].key
        return copied

    return timed(run)


def piece_pg_backfill(url: str, layout: Layout, n: int, batch: int, target: str = "") -> dict[str, Any]:
    """old_<layout> -> `new_tasks` (the default layout) of the same database, or of the
    database at `target`."""
    target = target or url
    task_table(target, "new_tasks")
    return timed_layout_backfill(
        url, (url, f"old_{layout.name}"), (target, "new_tasks"), layout, batch=batch, n=n
    )


def piece_pg_copy(url: str, layout: Layout, n: int) -> dict[str, Any]:
    """COPY into a table of the same layout: the old table's rows streamed out and in, one
    transaction."""
    layout_table(url, layout, "copy_tasks")
    names = ", ".join(column.name for column in layout.table(MetaData(), "t", "postgresql").c)
    key = layout.column("key")
    copy_out = f"COPY (SELECT {names} FROM old_{layout.name} ORDER BY {key}) TO STDOUT"  # noqa: S608
    copy_in = f"COPY copy_tasks ({names}) FROM STDIN"

    def run() -> int:
        with psycopg.connect(libpq(url)) as source, psycopg.connect(libpq(url)) as sink:
            with source.cursor().copy(copy_out) as out, sink.cursor().copy(copy_in) as into:
                for block in out:
                    into.write(block)
            sink.commit()
            copied = sink.execute("SELECT count(*) FROM copy_tasks").fetchone()
        assert copied is not None
        assert n == copied[0]
        return n

    return timed(run)


def run_piece(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    layout = layout_named(args.layout)
    if args.piece == "sqlite-backfill":
        return piece_sqlite_backfill(work, layout, args.n, args.batch_size)
    if args.piece == "sqlite-plain":
        return piece_sqlite_plain(work, layout, args.n, args.plain_batch_size)
    if args.piece == "sqlite-put-loop":
        return piece_sqlite_put_loop(work, args.batch_size, args.sample)
    if args.piece == "pg-backfill":
        return piece_pg_backfill(args.url, layout, args.n, args.batch_size)
    if args.piece == "pg-backfill-two-databases":
        return piece_pg_backfill(args.url, layout, args.n, args.batch_size, args.target)
    if args.piece == "pg-copy":
        return piece_pg_copy(args.url, layout, args.n)
    raise SystemExit(f"unknown piece {args.piece}")


# -- the run ----------------------------------------------------------------------------------


def spawn(
    piece: str,
    args: argparse.Namespace,
    work: Path,
    url: str = "",
    *,
    target: str = "",
    layout: str = "default",
) -> dict[str, Any]:
    """Run one piece in a fresh interpreter; its JSON line."""
    argv = [sys.executable, __file__, str(args.n), "--piece", piece, "--work", str(work), "--url", url]
    argv += ["--batch-size", str(args.batch_size), "--sample", str(args.sample), "--target", target]
    argv += ["--layout", layout, "--plain-batch-size", str(getattr(args, "plain_batch_size", 5000))]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"piece {piece} ({layout}) failed:\n{done.stderr}")
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


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one piece, summarised by their medians (wall and CPU seconds), every run's
    seconds, the highest peak resident memory, and (backfill) how its rows went."""
    tasks = runs[0]["tasks"]
    wall = statistics.median(r["seconds"] for r in runs)
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    summary = {
        "tasks_per_second": round(tasks / wall),
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "all_seconds": [r["seconds"] for r in runs],
        "all_cpu_seconds": [r["cpu_seconds"] for r in runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }
    if "paths" in runs[0]:
        summary["paths"] = runs[0]["paths"]
    return summary


def versus(
    ours: dict[str, Any], theirs: dict[str, Any], goal: float, *, floor: float | None = None
) -> dict[str, Any]:
    """Ours next to the baseline: the ratio of rates (wall), of CPU seconds, and the goal."""
    ratio = ours["tasks_per_second"] / theirs["tasks_per_second"]
    result: dict[str, Any] = {"ratio": round(ratio, 3), "goal": goal, "met": ratio >= goal}
    if floor is not None:
        result.update(floor=floor, above_floor=ratio >= floor)
    if ours.get("cpu_seconds") and theirs.get("cpu_seconds"):
        result["cpu_ratio"] = round(theirs["cpu_seconds"] / ours["cpu_seconds"], 3)
    return result


def measure_sqlite(args: argparse.Namespace, work: Path, layouts: list[Layout]) -> dict[str, Any]:
    """Per SQLite layout: backfill and the plain copy, `--repeat` interleaved rounds each."""
    report: dict[str, Any] = {}
    for layout in layouts:
        layout_table(sqlite_url(work / f"old-{layout.name}.db"), layout, "tasks", rows=args.n)
        ours: list[dict[str, Any]] = []
        plain: list[dict[str, Any]] = []
        for _ in range(args.repeat):
            ours.append(spawn("sqlite-backfill", args, work, layout=layout.name))
            plain.append(spawn("sqlite-plain", args, work, layout=layout.name))
        backfill, copy = median_of(ours), median_of(plain)
        report[layout.name] = {
            "backfill": backfill,
            "plain_sqlite3_copy": copy,
            "vs_plain_copy": versus(
                backfill, copy, GOALS["vs_plain_copy"], floor=GOALS["vs_plain_copy_floor"]
            ),
            "peak_rss_met": backfill["peak_rss_mb"] < GOALS["peak_rss_mb"],
        }
        if layout.name == "default" and args.sample:
            loop = spawn("sqlite-put-loop", args, work, layout=layout.name)
            rate = loop["tasks"] / loop["seconds"]
            report[layout.name]["put_loop"] = {
                "sample": loop["tasks"],
                "tasks_per_second": round(rate),
                "note": f"measured on the first {loop['tasks']} tasks",
            }
            report[layout.name]["vs_put_loop"] = versus(
                backfill, {"tasks_per_second": rate}, GOALS["vs_put_loop"]
            )
        (work / f"old-{layout.name}.db").unlink()
    return report


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


def measure_postgres(args: argparse.Namespace, work: Path, layouts: list[Layout]) -> dict[str, Any]:
    """Per PostgreSQL layout: backfill inside one database and COPY, `--repeat` interleaved
    rounds each; for the default layout also backfill into a second database."""
    report: dict[str, Any] = {}
    with pg_database(args.postgres) as url, pg_database(args.postgres) as other:
        migration_store(url)[0].close()  # the journal's schema, before any clock starts
        for layout in layouts:
            layout_table(url, layout, f"old_{layout.name}", rows=args.n)
            ours: list[dict[str, Any]] = []
            copies: list[dict[str, Any]] = []
            apart: list[dict[str, Any]] = []
            for _ in range(args.repeat):
                ours.append(spawn("pg-backfill", args, work, url, layout=layout.name))
                copies.append(spawn("pg-copy", args, work, url, layout=layout.name))
                if layout.name == "default":
                    apart.append(
                        spawn("pg-backfill-two-databases", args, work, url, target=other, layout=layout.name)
                    )
            backfill, copy = median_of(ours), median_of(copies)
            report[layout.name] = {
                "backfill": backfill,
                "copy": copy,
                "vs_copy": versus(backfill, copy, GOALS["vs_copy"]),
                "peak_rss_met": backfill["peak_rss_mb"] < GOALS["peak_rss_mb"],
            }
            if apart:
                two = median_of(apart)
                report[layout.name]["backfill_between_two_databases"] = {
                    **two,
                    "vs_copy": round(two["tasks_per_second"] / copy["tasks_per_second"], 3),
                    "note": "old and new in two databases: the rows pass through Python (COPY in)",
                }
            with create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
                conn.execute(text(f"DROP TABLE old_{layout.name}"))
    return report


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


def chosen_layouts(spec: str) -> list[Layout]:
    """`--layouts`: all, or names separated by commas (an unknown name: exit 2, naming the known ones)."""
    if spec == "all":
        return list(LAYOUTS)
    try:
        return [layout_named(name.strip()) for name in spec.split(",") if name.strip()]
    except KeyError as exc:
        raise SystemExit(f"--layouts: {exc.args[0]}") from None


def table_lines(report: dict[str, Any]) -> list[str]:
    """The layout matrix as a plain text table: per backend and layout, ours next to the baseline."""
    lines = [
        f"{'backend':<10} {'layout':<18} {'backfill/s':>11} {'cpu s':>7} {'baseline/s':>11} {'cpu s':>7}"
        f" {'ratio':>6} {'goal':>9} {'fast':>9} {'records':>8} {'rss MB':>7}"
    ]
    for backend, baseline, against in (
        ("sqlite", "plain_sqlite3_copy", "vs_plain_copy"),
        ("postgresql", "copy", "vs_copy"),
    ):
        for name, row in report.get(backend, {}).items():
            ours, theirs, ratio = row["backfill"], row[baseline], row[against]
            goal = f">={ratio['goal']}" + (
                "" if ratio["met"] else (" LOW" if ratio.get("above_floor", True) else " NO")
            )
            lines.append(
                f"{backend:<10} {name:<18} {ours['tasks_per_second']:>11,} {ours['cpu_seconds']:>7.2f}"
                f" {theirs['tasks_per_second']:>11,} {theirs['cpu_seconds']:>7.2f} {ratio['ratio']:>5.2f}x"
                f" {goal:>9} {ours['paths']['fast']:>9,} {ours['paths']['records']:>8,}"
                f" {ours['peak_rss_mb']:>7.1f}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    common_arguments(parser)
    parser.set_defaults(repeat=3, batch_size=5000)  # a few thousand rows a batch, as the plain copy
    parser.add_argument("--layouts", default="default", help="all, or layout names separated by commas")
    parser.add_argument("--plain-batch-size", type=int, default=5000, help="rows per batch of the plain copy")
    parser.add_argument("--sample", type=int, default=20_000, help="tasks of the per-task put loop (0: none)")
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    args = parser.parse_args()
    # Library callers choose their own logging; measure the copy, not a log renderer.
    log.configure(json=True, level=logging.WARNING)
    if args.piece:
        print(json.dumps(run_piece(args)))
        return
    layouts = chosen_layouts(args.layouts)
    args.sample = min(args.sample, args.n)
    report = report_header("backfill", args, GOALS)
    report["layouts"] = [layout.name for layout in layouts]
    report["plain_batch_size"] = args.plain_batch_size
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_sqlite:
            report["sqlite"] = measure_sqlite(
                args, Path(tmp), [x for x in layouts if x in layouts_for("sqlite")]
            )
        if not args.no_postgres:
            report["postgresql"] = measure_postgres(
                args, Path(tmp), [x for x in layouts if x in layouts_for("postgresql")]
            )
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    for line in table_lines(report):
        print(line, file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
