"""Milliseconds per full `advance` (no guards, no steps) through the Python API.

Prints one JSON object: per database, the median and p99 of `Migration.advance()`, next to
a baseline measured in the same run on the same database: one plain `UPDATE` of one row
committed in its own transaction (the floor of any durable change).

    .venv/bin/python bench/transition.py [--rounds N] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from migration_fsm import log
from migration_fsm.config import load_settings
from migration_fsm.journal import Journal, make_engine
from migration_fsm.migration import Migration

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }


def measure(url: str, rounds: int) -> dict[str, Any]:
    store = Journal(url, engine=make_engine(url, create=True))
    store.upgrade()
    engine = Migration(
        store, load_settings(None, database_url=url, actor="bench"), f"bench-{uuid.uuid4().hex[:8]}"
    )
    engine.init()
    advance: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        engine.advance()
        advance.append(time.perf_counter() - started)
        engine.rollback(reason="bench")
    baseline: list[float] = []
    with store.engine.connect() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS bench_baseline (id INTEGER PRIMARY KEY, n INTEGER)"))
        conn.execute(text("DELETE FROM bench_baseline"))
        conn.execute(text("INSERT INTO bench_baseline VALUES (1, 0)"))
        conn.commit()
        for _ in range(rounds):
            started = time.perf_counter()
            conn.execute(text("UPDATE bench_baseline SET n = n + 1 WHERE id = 1"))
            conn.commit()
            baseline.append(time.perf_counter() - started)
        conn.execute(text("DROP TABLE bench_baseline"))
        conn.commit()
    store.close()
    result: dict[str, Any] = {"advance": summary(advance), "baseline_single_update_commit": summary(baseline)}
    result["advance_over_baseline"] = round(
        result["advance"]["median_ms"] / max(result["baseline_single_update_commit"]["median_ms"], 1e-9), 2
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--postgres", default=os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG))
    args = parser.parse_args()
    # Library callers choose their own logging; measure the engine, not a log renderer.
    log.configure(json=True, level=logging.WARNING)
    report: dict[str, Any] = {"benchmark": "transition", "rounds": args.rounds, "goal_median_ms": 5}
    with tempfile.TemporaryDirectory() as tmp:
        report["sqlite"] = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", args.rounds)
    name = f"mfsm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        from sqlalchemy.engine import make_url

        url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        report["postgresql"] = measure(url, args.rounds)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
