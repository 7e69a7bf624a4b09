"""Progress writes per second: what `transfer_state`, `reverse_sync`, the hand-over and
`retire_old` pay to change the status and attempts of the rows they touch (issue 12).

On each database, a task table of `--n` pending rows; then every row's progress is set once
with `SqlTaskStore.set_progress` (one transaction per row, the path before issue 12) and
once with `set_progress_many` in batches of `--batch` (one transaction per batch, each row a
compare-and-set on the status it was read with: the path the steps take now). SQLite runs in
WAL mode on a file. Prints one JSON object: per database, seconds and rows per second of each.

    .venv/bin/python bench/progress.py [--n 20000] [--batch 1000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migration_fsm.journal import utcnow
from migration_fsm.tasks.records import ProgressUpdate, TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from tests.support.datatools import create_task_table, tasks


def measure(url: str, n: int, batch: int) -> dict[str, Any]:
    create_task_table(url, "bench_tasks")
    store = SqlTaskStore(url, "bench_tasks")
    try:
        records = tasks(n)
        store.put_many(records)
        now = utcnow()
        started = time.perf_counter()
        for record in records:
            store.set_progress(record.key, TaskStatus.COMPLETED, 1, now)
        single = time.perf_counter() - started
        updates = [
            ProgressUpdate(r.key, TaskStatus.FAILED, 2, now, expected=TaskStatus.COMPLETED) for r in records
        ]
        started = time.perf_counter()
        changed = sum(store.set_progress_many(updates[i : i + batch]) for i in range(0, n, batch))
        many = time.perf_counter() - started
        assert changed == n, changed
    finally:
        store.close()
    return {
        "set_progress": {"seconds": round(single, 3), "rows_per_second": round(n / single)},
        "set_progress_many": {"seconds": round(many, 3), "rows_per_second": round(n / many)},
        "speedup": round(single / many, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    results: dict[str, Any] = {"n": args.n, "batch": args.batch}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.db"
        sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").fetchall()
        results["sqlite_wal"] = measure(f"sqlite:///{path}", args.n, args.batch)
    name = f"mfsm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        results["postgresql"] = measure(url, args.n, args.batch)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
