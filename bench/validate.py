"""Tasks per second of `validate` on two equal task tables, next to a baseline measured in the same run.

SQLite: old.db holds N tasks of about 200 bytes of payload (bench/backfill.py's), new.db a
copy of it. `validate` runs as the CLI runs it (`validate_migration`: the configured
stores, the run recorded in the migration database); the baseline is the practical limit
of the job: a plain sqlite3 keyset scan of both tables (pages of the batch size) that
hashes each row's identity columns (SHA-256 of key, type, payload and created_at as
stored) and merges the two streams by key, comparing the digests. The same pair runs on
PostgreSQL too (two tables of a database created for the run and dropped at the end),
with psycopg for the baseline; its figures are reported, the goals are SQLite's.

Every measured piece runs in a subprocess of its own, so its peak resident memory is its
own; pieces alternate `--repeat` times and the best run of each counts (the machine may be
shared: the load average is reported, and the rates per CPU second, which other processes
disturb less). Prints one JSON object.

    .venv/bin/python bench/validate.py [N] [--batch-size B] [--repeat R]
        [--postgres URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from backfill import (
    best,
    common_arguments,
    fill_postgres,
    fill_sqlite,
    libpq,
    migration_store,
    pg_database,
    report_header,
    task_table,
    timed,
    verify,
)

from migration_fsm import log
from migration_fsm.config import load_settings
from migration_fsm.tools.validate import validate_migration

GOALS = {"tasks_per_second": 250_000, "vs_scan_hash_merge": 1.0, "peak_rss_mb": 200}
IDENTITY = ("key", "type", "payload", "created_at")

Page = list[tuple[Any, ...]]


# -- measured pieces, each in its own process ------------------------------------------------


def timed_validate(
    journal_url: str, old: tuple[str, str], new: tuple[str, str], batch: int, n: int
) -> dict[str, Any]:
    """`validate_migration` of `old` against `new` (url, table), recorded in the journal at
    `journal_url` (made before the clock starts), timed."""
    store, name = migration_store(journal_url)
    stores = {
        side: {"kind": "sql", "url": url, "table": table}
        for side, (url, table) in zip(("old", "new"), (old, new), strict=True)
    }
    settings = load_settings(
        None, database_url=journal_url, actor="bench", stores=stores, backfill_batch_size=batch
    )

    def run() -> int:
        _, report = validate_migration(store, settings, name)
        assert report.ok, report.as_json()
        assert (n, n, 0) == (report.old_count, report.new_count, report.status_differs), report.as_json()
        return n

    try:
        return timed(run)
    finally:
        store.close()


def digests(pages: Iterator[Page]) -> Iterator[tuple[str, bytes]]:
    """(key, SHA-256 of the identity columns as stored) of every row, in key order."""
    for page in pages:
        for row in page:
            yield row[0], hashlib.sha256("\x1f".join(map(str, row)).encode()).digest()


def merge_digests(old: Iterator[tuple[str, bytes]], new: Iterator[tuple[str, bytes]]) -> int:
    """Merge two key-ordered digest streams; how many keys differ (missing, extra, other digest)."""
    differ = 0
    a, b = next(old, None), next(new, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            differ += 1
            a = next(old, None)
        elif a is None or b[0] < a[0]:
            differ += 1
            b = next(new, None)
        else:
            differ += a[1] != b[1]
            a, b = next(old, None), next(new, None)
    return differ


def keyset(fetch: Callable[[str, int], Page], batch: int) -> Iterator[Page]:
    """Keyset pages: `fetch(after, limit)` until a short page."""
    after = ""
    while True:
        page = fetch(after, batch)
        if page:
            yield page
            after = page[-1][0]
        if len(page) < batch:
            return


def piece_sqlite_validate(work: Path, n: int, batch: int) -> dict[str, Any]:
    (work / "mfsm.db").unlink(missing_ok=True)
    old, new = (f"sqlite:///{work / 'old.db'}", "tasks"), (f"sqlite:///{work / 'new.db'}", "tasks")
    return timed_validate(f"sqlite:///{work / 'mfsm.db'}", old, new, batch, n)


def piece_sqlite_baseline(work: Path, n: int, batch: int) -> dict[str, Any]:
    """The plain keyset scan of both files, hashing the identity columns, merged by key."""
    read = f"SELECT {', '.join(IDENTITY)} FROM tasks WHERE key > ? ORDER BY key LIMIT ?"  # noqa: S608

    def run() -> int:
        old, new = sqlite3.connect(work / "old.db"), sqlite3.connect(work / "new.db")

        def pages(conn: sqlite3.Connection) -> Iterator[Page]:
            return keyset(lambda after, limit: conn.execute(read, (after, limit)).fetchall(), batch)

        differ = merge_digests(digests(pages(old)), digests(pages(new)))
        old.close()
        new.close()
        assert differ == 0
        return n

    return timed(run)


def piece_pg_validate(url: str, n: int, batch: int) -> dict[str, Any]:
    return timed_validate(url, (url, "old_tasks"), (url, "new_tasks"), batch, n)


def piece_pg_baseline(url: str, n: int, batch: int) -> dict[str, Any]:
    """The same baseline through psycopg: text columns, as stored."""
    columns = ", ".join(f"{name}::text" for name in IDENTITY)

    def run() -> int:
        with psycopg.connect(libpq(url)) as old, psycopg.connect(libpq(url)) as new:

            def pages(conn: psycopg.Connection[tuple[Any, ...]], table: str) -> Iterator[Page]:
                sql = f"SELECT {columns} FROM {table} WHERE key > %s ORDER BY key LIMIT %s"  # noqa: S608
                return keyset(lambda after, limit: conn.execute(sql, (after, limit)).fetchall(), batch)

            differ = merge_digests(digests(pages(old, "old_tasks")), digests(pages(new, "new_tasks")))
        assert differ == 0
        return n

    return timed(run)


def run_piece(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    if args.piece == "sqlite-validate":
        return piece_sqlite_validate(work, args.n, args.batch_size)
    if args.piece == "sqlite-baseline":
        return piece_sqlite_baseline(work, args.n, args.batch_size)
    if args.piece == "pg-validate":
        return piece_pg_validate(args.url, args.n, args.batch_size)
    if args.piece == "pg-baseline":
        return piece_pg_baseline(args.url, args.n, args.batch_size)
    raise SystemExit(f"unknown piece {args.piece}")


# -- the run ----------------------------------------------------------------------------------


def spawn(piece: str, args: argparse.Namespace, work: Path, url: str = "") -> dict[str, Any]:
    """Run one piece in a fresh interpreter; its JSON line."""
    argv = [sys.executable, __file__, str(args.n), "--piece", piece, "--work", str(work), "--url", url]
    argv += ["--batch-size", str(args.batch_size)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"piece {piece} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def compare(ours: dict[str, Any], baseline: dict[str, Any], *, goals: bool) -> dict[str, Any]:
    ratio = ours["tasks_per_second"] / baseline["tasks_per_second"]
    cpu_ratio = ours["cpu_tasks_per_second"] / baseline["cpu_tasks_per_second"]
    result: dict[str, Any] = {
        "validate": ours,
        "scan_hash_merge": baseline,
        "vs_scan_hash_merge": {"ratio": round(ratio, 3), "cpu_ratio": round(cpu_ratio, 3)},
        "peak_rss_mb": ours["peak_rss_mb"],
    }
    if goals:
        result["vs_scan_hash_merge"].update(goal=GOALS["vs_scan_hash_merge"], met=ratio >= 1.0)
        result["tasks_per_second_goal"] = {
            "goal": GOALS["tasks_per_second"],
            "met": ours["tasks_per_second"] >= GOALS["tasks_per_second"],
        }
        result["peak_rss"] = {
            "mb": ours["peak_rss_mb"],
            "goal_mb": GOALS["peak_rss_mb"],
            "met": ours["peak_rss_mb"] < GOALS["peak_rss_mb"],
        }
    return result


def alternate(args: argparse.Namespace, work: Path, pieces: tuple[str, str], url: str = "") -> list[Any]:
    """Each of the two pieces `--repeat` times, alternating; their summaries."""
    runs: dict[str, list[dict[str, Any]]] = {piece: [] for piece in pieces}
    for _ in range(args.repeat):
        for piece in pieces:
            runs[piece].append(spawn(piece, args, work, url))
    return [best(runs[piece]) for piece in pieces]


def measure_sqlite(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    fill_sqlite(work / "old.db", args.n)
    verify(f"sqlite:///{work / 'old.db'}", "tasks", args.n)
    shutil.copyfile(work / "old.db", work / "new.db")
    ours, baseline = alternate(args, work, ("sqlite-validate", "sqlite-baseline"))
    return compare(ours, baseline, goals=True)


def measure_postgres(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with pg_database(args.postgres) as url:
        fill_postgres(url, "old_tasks", args.n)
        verify(url, "old_tasks", args.n)
        task_table(url, "new_tasks")
        with psycopg.connect(libpq(url)) as conn:
            conn.execute("INSERT INTO new_tasks SELECT * FROM old_tasks")
            conn.commit()
            conn.execute("ANALYZE new_tasks")
        migration_store(url)[0].close()  # the journal's schema, before any clock starts
        ours, baseline = alternate(args, work, ("pg-validate", "pg-baseline"), url)
    return compare(ours, baseline, goals=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    common_arguments(parser)
    args = parser.parse_args()
    # Library callers choose their own logging; measure the comparison, not a log renderer.
    log.configure(json=True, level=logging.WARNING)
    if args.piece:
        print(json.dumps(run_piece(args)))
        return
    report = report_header("validate", args, GOALS)
    with tempfile.TemporaryDirectory() as tmp:
        report["sqlite"] = measure_sqlite(args, Path(tmp))
        if not args.no_postgres:
            report["postgresql"] = measure_postgres(args, Path(tmp))
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
