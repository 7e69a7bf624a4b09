"""Milliseconds per full `advance` (no guards, no steps) through the Python API, next to one
UPDATE+COMMIT over the same connection path, with events out configured.

For each path (SQLite; PostgreSQL directly; PostgreSQL through a private PgBouncer in
transaction pooling, started by the benchmark on a free port and stopped by its pid), a
migration with one `[[notify]]` URL target pointing at an HTTP receiver the benchmark runs on
127.0.0.1. Each round, in alternating order: one `Migration.advance()` (timed; the `rollback`
after it is not), and one plain `UPDATE` of one row committed in its own transaction (the
floor of any durable change) on a connection of the same path. After each round the events
are delivered to the receiver (`notify.deliver_pending`, timed apart as `deliver`: a command
does it after its transition, outside the operator lock). Medians over the rounds; prints
one JSON object.

    .venv/bin/python bench/transition.py [--rounds N] [--postgres URL] [--no-pgbouncer]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support

from migration_fsm import log
from migration_fsm.config import load_settings
from migration_fsm.journal import Journal, make_engine
from migration_fsm.migration import Migration
from migration_fsm.plugins import notify
from tests.support.pgbouncer import start_pgbouncer

DEFAULT_PG: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: The goal of issue 15: an `advance` costs at most this many UPDATE+COMMITs of the same run.
GOAL_RATIO: Final = 6.0
#: Events one round writes: `claimed` and `committed`, for the advance and for the rollback.
EVENTS_PER_ROUND: Final = 4


class Receiver:
    """An HTTP server on 127.0.0.1 that counts the events POSTed to it and answers 200."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.count += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/events"
        threading.Thread(target=self._server.serve_forever, name="bench-receiver", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure(url: str, rounds: int, receiver: Receiver, *, schema_url: str | None = None) -> dict[str, Any]:
    """The interleaved rounds on `url` (its schema created through `schema_url` if given)."""
    setup = Journal(schema_url or url, engine=make_engine(schema_url or url, create=True))
    setup.upgrade()
    setup.close()
    store = Journal(url, engine=make_engine(url, create=True))
    name = f"bench-{uuid.uuid4().hex[:8]}"
    target = {"name": "bench", "url": receiver.url, "timeout_seconds": 5}
    settings = load_settings(None, database_url=url, actor="bench", notify=[target])
    engine = Migration(store, settings, name)
    notify.register(store, settings, name)
    engine.init()
    notify.deliver_pending(settings, name, journal=store)
    received_before = receiver.count
    baseline_engine = make_engine(url)
    advance: list[float] = []
    baseline: list[float] = []
    deliver: list[float] = []
    with baseline_engine.connect() as conn:
        table = f"bench_baseline_{uuid.uuid4().hex[:8]}"
        conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, n INTEGER)"))
        conn.execute(text(f"INSERT INTO {table} VALUES (1, 0)"))  # noqa: S608 - our own table name
        conn.commit()
        update = text(f"UPDATE {table} SET n = n + 1 WHERE id = 1")  # noqa: S608 - our own table name

        def one_update() -> None:
            conn.execute(update)
            conn.commit()

        for round_ in range(rounds):
            if round_ % 2:
                baseline.append(timed(one_update))
                advance.append(timed(engine.advance))
            else:
                advance.append(timed(engine.advance))
                baseline.append(timed(one_update))
            engine.rollback(reason="bench")
            deliver.append(timed(lambda: notify.deliver_pending(settings, name, journal=store)))
        conn.execute(text(f"DROP TABLE {table}"))
        conn.commit()
    baseline_engine.dispose()
    store.close()
    result: dict[str, Any] = {
        "advance": summary(advance),
        "baseline_single_update_commit": summary(baseline),
        "deliver_after_round": summary(deliver),
        "events_delivered": receiver.count - received_before,
        "events_expected": EVENTS_PER_ROUND * rounds,
    }
    ratio = result["advance"]["median_ms"] / max(result["baseline_single_update_commit"]["median_ms"], 1e-9)
    result["advance_over_baseline"] = round(ratio, 2)
    result["meets_goal"] = ratio <= GOAL_RATIO
    return result


@contextlib.contextmanager
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


@contextlib.contextmanager
def pgbouncer(server_url: str, folder: Path) -> Iterator[str]:
    """A private `pgbouncer` in transaction pooling in front of `server_url`'s server, on a
    free port, stopped by its pid at the end: `server_url` through it."""
    proc, port = start_pgbouncer(folder, server_url, pool_size=4)
    try:
        yield make_url(server_url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--postgres", default=os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG))
    parser.add_argument("--no-pgbouncer", action="store_true", help="skip the PgBouncer path")
    args = parser.parse_args()
    # Library callers choose their own logging; measure the engine, not a log renderer.
    log.configure(json=True, level=logging.WARNING)
    report: dict[str, Any] = {
        "benchmark": "transition",
        "rounds": args.rounds,
        "goal_median_ms": 5,
        "goal_ratio": GOAL_RATIO,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    receiver = Receiver()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report["sqlite"] = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", args.rounds, receiver)
            with pg_database(args.postgres) as url:
                report["postgresql"] = measure(url, args.rounds, receiver)
            if args.no_pgbouncer:
                pass
            elif shutil.which("pgbouncer") is None:
                report["pgbouncer"] = {"skipped": "pgbouncer is not installed: run `make pgbouncer`"}
            else:
                with pg_database(args.postgres) as url, pgbouncer(url, Path(tmp)) as bounced:
                    report["pgbouncer"] = measure(bounced, args.rounds, receiver, schema_url=url)
    finally:
        receiver.close()
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
