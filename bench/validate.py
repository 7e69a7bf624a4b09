"""Tasks per second of `validate` on every layout of the matrix, next to a baseline measured in the same run.

Per layout (`--layouts all|NAME,...`, from migration_fsm/tasks/sql/layouts.py), on SQLite:

- old.db holds N tasks in the layout (its SQL fill);
- new.db holds the same tasks in the default layout, as a correct backfill leaves them
  (converted in SQL: timestamps as DATETIME text, statuses through the map, JSON as it is);
  the integer-key layout is compared with itself instead (a plain merge of integer keys
  with text keys would have to sort them);
- new-1pct.db is new.db with 1% of its rows differing: of every 300 tasks, one has another
  attempts count, one another payload, one is deleted.

`validate` runs as the CLI runs it (`validate_migration`: the configured stores, the run
recorded in a migration database made before the clock starts), old against new and old
against new-1pct. The baseline is the practical limit of the job done plainly: a sqlite3
keyset scan of both tables (pages of the batch size) merged by key, comparing the raw values
of the identity and progress columns (type, payload, created_at, status, attempts), which
is what `validate` compares without decoding. It neither hashes nor decodes anything, so it
costs what `validate`'s Python path would cost with none of its care; where the two tables
hold a value in different forms it counts every row as differing, which costs it nothing.

Each measured piece (`validate` or the baseline, both variants) runs in a process of its own,
so its peak resident memory is its own; the pieces alternate `--repeat` rounds (default 3)
and each figure is the median. CPU seconds are reported next to wall seconds: the machine
may be shared, and the load average is reported too. With `--postgres [URL]`, PostgreSQL's
default layout too, both tables in one database made for the run (psycopg for the baseline,
columns as text); reported, no goals. Prints a table on stderr and one JSON object on stdout.

    .venv/bin/python bench/validate.py [N] [--layouts all|NAME,...] [--batch-size B]
        [--repeat R] [--postgres [URL]]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import MetaData, create_engine, literal, select, text
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url

from migration_fsm import log
from migration_fsm.config import load_settings
from migration_fsm.journal import Journal, make_engine
from migration_fsm.migration import Migration
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tasks.sql.identity_sql import canonical_time, identity_columns
from migration_fsm.tasks.sql.layouts import LAYOUTS, Layout, layout_named, layouts_for
from migration_fsm.tools.validate import validate_migration

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GOALS = {"tasks_per_second": 250_000, "vs_plain_scan": 1.0, "peak_rss_mb": 200}
VARIANTS = ("equal", "differ_1pct")
#: Of every 300 tasks (by number i): i % 300 == 0 another attempts count, 100 another
#: payload, 200 deleted.
CHANGES = (
    "UPDATE {t} SET {attempts} = {attempts} + 1 WHERE {i} % 300 = 0",
    "UPDATE {t} SET {payload} = {other} WHERE {i} % 300 = 100",
    "DELETE FROM {t} WHERE {i} % 300 = 200",
)


def expected(n: int, variant: str) -> tuple[int, int, int]:
    """(status_differs, mismatched, missing) of old against the variant."""
    if variant == "equal":
        return 0, 0, 0
    return tuple((n + 299 - r) // 300 for r in (0, 100, 200))  # type: ignore[return-value]


def new_layout(layout: Layout) -> Layout:
    """The layout of the new side for `layout`'s old side (see the module docstring)."""
    return layout if layout.integer_key else layout_named("default")


# -- the tables -------------------------------------------------------------------------------


def make_tables(work: Path, layout: Layout, n: int) -> None:
    """old.db, new.db and new-1pct.db for `layout` in `work`."""
    for name in ("old.db", "new.db", "new-1pct.db"):
        (work / name).unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{work / 'old.db'}", create=True)
    with engine.begin() as conn:
        layout.create(conn, "tasks")
        layout.fill(conn, "tasks", n)
    engine.dispose()
    target = new_layout(layout)
    if target is layout:
        shutil.copyfile(work / "old.db", work / "new.db")
    else:
        engine = make_engine(f"sqlite:///{work / 'new.db'}", create=True)
        with engine.begin() as conn:
            target.create(conn, "tasks")
        engine.dispose()
        conn3 = sqlite3.connect(work / "new.db", isolation_level=None)
        conn3.execute("ATTACH DATABASE ? AS src", (str(work / "old.db"),))
        conn3.execute("BEGIN")
        conn3.execute(backfilled_sql(work, layout))
        conn3.execute("COMMIT")
        conn3.close()
    shutil.copyfile(work / "new.db", work / "new-1pct.db")
    conn3 = sqlite3.connect(work / "new-1pct.db", isolation_level=None)
    number = "key" if target.integer_key else "CAST(substr(key, 6) AS INTEGER)"
    for change in CHANGES:
        conn3.execute(
            change.format(
                t="tasks", attempts="attempts", payload="payload", other="'{\"other\": 1}'", i=number
            )
        )
    conn3.close()


def backfilled_sql(work: Path, layout: Layout) -> str:
    """INSERT into new.db's default table of old.db's tasks (attached as `src`), converted
    as a backfill converts them: the identity row's canonical forms are the default layout's."""
    with SqlTaskStore(f"sqlite:///{work / 'old.db'}", "tasks", name="old", **layout.store_options()) as old:
        mapping = old.mapping
        table = mapping.table.to_metadata(MetaData(), schema="src")
        dialect = sqlite_dialect.dialect()
        key, type_, payload, created, status, attempts, _ = identity_columns(mapping, table, dialect, "")
        updated = canonical_time(mapping.by_name["updated_at"], table.c[layout.column("updated_at")], dialect)
        metadata = table.c[layout.column("metadata")] if layout.metadata else literal("{}")
        query = select(key, type_, payload, status, attempts, created, updated, metadata)
        compiled = query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    columns = "key, type, payload, status, attempts, created_at, updated_at, metadata"
    return f"INSERT INTO tasks ({columns}) {compiled}"


# -- measured pieces, each in its own process ------------------------------------------------


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def timed(run: Callable[[], Any]) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    outcome = run()
    return {
        "seconds": round(time.perf_counter() - wall, 3),
        "cpu_seconds": round(time.process_time() - cpu, 3),
        "outcome": outcome,
    }


def migration_store(url: str) -> tuple[Journal, str]:
    """The migration database at `url`, upgraded, with a fresh migration in it."""
    store = Journal(url, engine=make_engine(url, create=True))
    store.upgrade()
    name = f"bench-{uuid.uuid4().hex[:8]}"
    Migration(store, load_settings(None, database_url=url, actor="bench"), name).init()
    return store, name


def piece_validate(args: argparse.Namespace, stores: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> Any:
    """`validate_migration` of old against each variant's new side, timed."""
    results = {}
    for variant, configs in stores.items():
        journal_url = args.journal or f"sqlite:///{Path(args.work) / 'mfsm.db'}"
        if not args.journal:
            (Path(args.work) / "mfsm.db").unlink(missing_ok=True)
        store, name = migration_store(journal_url)
        settings = load_settings(
            None,
            database_url=journal_url,
            actor="bench",
            stores=dict(zip(("old", "new"), configs, strict=True)),
            backfill_batch_size=args.batch_size,
        )

        def run() -> dict[str, Any]:
            report = validate_migration(store, settings, name)[1]  # noqa: B023 -- run at once
            return report.as_json()

        try:
            result = timed(run)
        finally:
            store.close()
        report = result.pop("outcome")
        found = (report["old_count"], report["status_differs"], report["mismatched"], report["missing"])
        assert (args.n, *expected(args.n, variant)) == found, report
        result["rows_by_path"] = report["rows_by_path"]
        results[variant] = result
    return results


def merge_count(old: Iterator[list[Any]], new: Iterator[list[Any]]) -> int:
    """Merge two key-ordered streams of pages of rows; how many keys differ (on one side only,
    or other values)."""
    differ = 0
    a_rows: list[Any] = []
    b_rows: list[Any] = []
    i = j = 0
    while True:
        if i == len(a_rows):
            a_rows, i = next(old, []), 0
        if j == len(b_rows):
            b_rows, j = next(new, []), 0
        if not a_rows or not b_rows:
            differ += len(a_rows) - i + len(b_rows) - j + sum(map(len, old)) + sum(map(len, new))
            return differ
        a, b = a_rows[i], b_rows[j]
        if a[0] == b[0]:
            differ += a[1:] != b[1:]
            i, j = i + 1, j + 1
        elif a[0] < b[0]:
            differ, i = differ + 1, i + 1
        else:
            differ, j = differ + 1, j + 1


def keyset(fetch: Callable[[Any, int], list[Any]], first: Any, batch: int) -> Iterator[list[Any]]:
    """Keyset pages: `fetch(after, limit)` until a short page."""
    after = first
    while True:
        page = fetch(after, batch)
        if page:
            yield page
            after = page[-1][0]
        if len(page) < batch:
            return


def piece_baseline(
    args: argparse.Namespace, files: dict[str, tuple[Path, Path]], layouts: tuple[Layout, Layout]
) -> Any:
    """The plain sqlite3 keyset scan of both tables, merged by key, raw values compared."""

    def read_sql(layout: Layout) -> str:
        names = ", ".join(
            layout.column(f) for f in ("key", "type", "payload", "created_at", "status", "attempts")
        )
        key = layout.column("key")
        return f"SELECT {names} FROM tasks WHERE {key} > ? ORDER BY {key} LIMIT ?"  # noqa: S608 -- our names

    first = -1 if layouts[0].integer_key else ""
    results = {}
    for variant, (old_path, new_path) in files.items():

        def run(old_path: Path = old_path, new_path: Path = new_path) -> int:
            connections = [sqlite3.connect(old_path), sqlite3.connect(new_path)]
            pages = [
                keyset(_fetcher(conn, read_sql(layout)), first, args.batch_size)
                for conn, layout in zip(connections, layouts, strict=True)
            ]
            differ = merge_count(*pages)
            for conn in connections:
                conn.close()
            return differ

        result = timed(run)
        result["differ"] = result.pop("outcome")
        results[variant] = result
    return results


def _fetcher(conn: Any, sql: str) -> Callable[[Any, int], list[Any]]:
    """`fetch(after, limit)` for `keyset`: the page of `sql` through `conn` (sqlite3 or psycopg)."""

    def fetch(after: Any, limit: int) -> list[Any]:
        rows: list[Any] = conn.execute(sql, (after, limit)).fetchall()
        return rows

    return fetch


def piece_pg_baseline(args: argparse.Namespace, tables: dict[str, str]) -> Any:
    """The same baseline through psycopg, columns as text."""
    columns = "key, type, payload::text, created_at::text, status, attempts"
    results = {}
    for variant, table in tables.items():

        def run(table: str = table) -> int:
            with psycopg.connect(libpq(args.url)) as old, psycopg.connect(libpq(args.url)) as new:
                sql = f"SELECT {columns} FROM {{}} WHERE key > %s ORDER BY key LIMIT %s"  # noqa: S608 -- ours
                pages = [
                    keyset(_fetcher(conn, sql.format(name)), "", args.batch_size)
                    for conn, name in ((old, "old_tasks"), (new, table))
                ]
                return merge_count(*pages)

        result = timed(run)
        result["differ"] = result.pop("outcome")
        results[variant] = result
    return results


def run_piece(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    layout = layout_named(args.layout)
    target = new_layout(layout)
    if args.piece == "validate":
        old = layout.store_config(f"sqlite:///{work / 'old.db'}", "tasks")
        stores = {
            v: (old, target.store_config(f"sqlite:///{work / f}", "tasks"))
            for v, f in zip(VARIANTS, ("new.db", "new-1pct.db"), strict=True)
        }
        results = piece_validate(args, stores)
    elif args.piece == "baseline":
        files = {
            v: (work / "old.db", work / f) for v, f in zip(VARIANTS, ("new.db", "new-1pct.db"), strict=True)
        }
        results = piece_baseline(args, files, (layout, target))
    elif args.piece == "pg-validate":
        old = layout.store_config(args.url, "old_tasks")
        stores = {
            v: (old, layout.store_config(args.url, t))
            for v, t in zip(VARIANTS, ("new_tasks", "new_1pct"), strict=True)
        }
        results = piece_validate(args, stores)
    elif args.piece == "pg-baseline":
        results = piece_pg_baseline(args, dict(zip(VARIANTS, ("new_tasks", "new_1pct"), strict=True)))
    else:
        raise SystemExit(f"unknown piece {args.piece}")
    return {"variants": results, "peak_rss_mb": peak_rss_mb()}


# -- the run ----------------------------------------------------------------------------------


def spawn(args: argparse.Namespace, piece: str, layout: str, work: Path, url: str = "") -> dict[str, Any]:
    """Run one piece in a fresh interpreter; its JSON line."""
    argv = [sys.executable, __file__, str(args.n), "--piece", piece, "--layout", layout, "--work", str(work)]
    argv += ["--batch-size", str(args.batch_size), "--url", url, "--journal", url if url else ""]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"piece {piece} ({layout}) failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summary(n: int, runs: list[dict[str, Any]], variant: str) -> dict[str, Any]:
    """The medians of one piece's runs for one variant."""
    wall = statistics.median(r["variants"][variant]["seconds"] for r in runs)
    cpu = statistics.median(r["variants"][variant]["cpu_seconds"] for r in runs)
    found = {
        "tasks_per_second": round(n / wall),
        "cpu_tasks_per_second": round(n / max(cpu, 1e-9)),
        "seconds": [r["variants"][variant]["seconds"] for r in runs],
        "cpu_seconds": [r["variants"][variant]["cpu_seconds"] for r in runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }
    for extra in ("rows_by_path", "differ"):
        if extra in runs[0]["variants"][variant]:
            found[extra] = runs[0]["variants"][variant][extra]
    return found


def measure(
    args: argparse.Namespace, pieces: tuple[str, str], layout: str, work: Path, url: str = ""
) -> dict[str, Any]:
    """Both pieces, `--repeat` interleaved rounds; per variant, each piece's medians and the ratio."""
    runs: dict[str, list[dict[str, Any]]] = {piece: [] for piece in pieces}
    for _ in range(args.repeat):
        for piece in pieces:
            runs[piece].append(spawn(args, piece, layout, work, url))
    result: dict[str, Any] = {}
    for variant in VARIANTS:
        ours, theirs = (summary(args.n, runs[piece], variant) for piece in pieces)
        result[variant] = {
            "validate": ours,
            "plain_scan": theirs,
            "ratio": round(ours["tasks_per_second"] / theirs["tasks_per_second"], 3),
            "cpu_ratio": round(ours["cpu_tasks_per_second"] / theirs["cpu_tasks_per_second"], 3),
        }
    return result


def goals_met(result: dict[str, Any]) -> dict[str, bool]:
    worst = min(result[v]["ratio"] for v in VARIANTS)
    slowest = min(result[v]["validate"]["tasks_per_second"] for v in VARIANTS)
    peak = max(result[v]["validate"]["peak_rss_mb"] for v in VARIANTS)
    return {
        "vs_plain_scan": worst >= GOALS["vs_plain_scan"],
        "tasks_per_second": slowest >= GOALS["tasks_per_second"],
        "peak_rss_mb": peak < GOALS["peak_rss_mb"],
    }


def measure_sqlite(args: argparse.Namespace, names: list[str], tmp: Path) -> dict[str, Any]:
    results = {}
    for name in names:
        work = tmp / name
        work.mkdir()
        started = time.monotonic()
        make_tables(work, layout_named(name), args.n)
        prepared = time.monotonic() - started
        result = measure(args, ("validate", "baseline"), name, work)
        result["pair"] = f"{name} -> {new_layout(layout_named(name)).name}"
        result["goals_met"] = goals_met(result)
        result["prepare_seconds"] = round(prepared, 1)
        results[name] = result
        shutil.rmtree(work)
        print(f"bench: {name} done", file=sys.stderr, flush=True)
    return results


def libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as a libpq connection string."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


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


def measure_postgres(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    layout = layout_named("default")
    with pg_database(args.postgres) as url:
        engine = make_engine(url)
        with engine.begin() as conn:
            for table in ("old_tasks", "new_tasks", "new_1pct"):
                layout.create(conn, table)
            layout.fill(conn, "old_tasks", args.n)
            conn.execute(text("INSERT INTO new_tasks SELECT * FROM old_tasks"))
            conn.execute(text("INSERT INTO new_1pct SELECT * FROM old_tasks"))
            number = "CAST(substr(key, 6) AS INTEGER)"
            for change in CHANGES:
                sql = change.format(
                    t="new_1pct", attempts="attempts", payload="payload", other="'{\"other\": 1}'", i=number
                )
                conn.execute(text(sql))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in ("old_tasks", "new_tasks", "new_1pct"):
                conn.execute(text(f"ANALYZE {table}"))
        engine.dispose()
        migration_store(url)[0].close()  # the journal's schema, before any clock starts
        result = measure(args, ("pg-validate", "pg-baseline"), "default", tmp, url)
    result["pair"] = "default -> default, one database"
    return result


def table_lines(report: dict[str, Any]) -> list[str]:
    """The human table: per layout and variant, validate next to its baseline."""
    lines = [
        f"validate, N = {report['n']:,}, median of {report['repeat']}; goals (SQLite):"
        f" >= 1.0x the plain scan, >= {GOALS['tasks_per_second']:,}/s, peak < {GOALS['peak_rss_mb']} MB",
        f"{'backend':<8} {'layout pair':<36} {'tables':<12} {'validate/s':>11} {'cpu/s':>11}"
        f" {'plain scan/s':>12} {'cpu/s':>11} {'ratio':>6} {'cpu ratio':>9} {'MB':>6}",
    ]
    sections = [("sqlite", r) for r in report.get("sqlite", {}).values()]
    if "postgresql" in report:
        sections.append(("postgres", report["postgresql"]))
    for backend, result in sections:
        for variant in VARIANTS:
            row = result[variant]
            ours, theirs = row["validate"], row["plain_scan"]
            lines.append(
                f"{backend:<8} {result['pair']:<36} {variant:<12} {ours['tasks_per_second']:>11,}"
                f" {ours['cpu_tasks_per_second']:>11,} {theirs['tasks_per_second']:>12,}"
                f" {theirs['cpu_tasks_per_second']:>11,} {row['ratio']:>5.2f}x {row['cpu_ratio']:>8.2f}x"
                f" {ours['peak_rss_mb']:>6}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=200_000, help="tasks per table (default 200,000)")
    parser.add_argument("--layouts", default="all", help="all, or layout names separated by commas")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (the median counts)")
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=DEFAULT_PG,
        help=f"also PostgreSQL's default layout (default URL {DEFAULT_PG})",
    )
    for hidden in ("--piece", "--layout", "--work", "--url", "--journal"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Library callers choose their own logging; measure the comparison, not a log renderer.
    log.configure(json=True, level=logging.WARNING)
    if args.piece:
        print(json.dumps(run_piece(args)))
        return
    known = [layout.name for layout in layouts_for("sqlite")]
    names = known if args.layouts == "all" else [name.strip() for name in args.layouts.split(",")]
    unknown = [name for name in names if name not in known]
    if unknown or args.n < 1:
        what = (
            f"unknown layout {', '.join(unknown)} (SQLite layouts: {', '.join(known)})"
            if unknown
            else "N must be >= 1"
        )
        raise SystemExit(f"bench/validate.py: {what}")
    report: dict[str, Any] = {
        "benchmark": "validate",
        "n": args.n,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "layouts": {layout.name: layout.description for layout in LAYOUTS if layout.name in names},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        },
        "goals": GOALS,
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        report["sqlite"] = measure_sqlite(args, names, Path(tmp))
        if args.postgres:
            report["postgresql"] = measure_postgres(args, Path(tmp))
    report["goals_met"] = {
        goal: all(result["goals_met"][goal] for result in report["sqlite"].values()) for goal in GOALS
    }
    report["seconds"] = round(time.monotonic() - started, 1)
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print("\n".join(table_lines(report)), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
