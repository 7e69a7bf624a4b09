"""Executions per second through the execution ledger (claim + finish of each task) with
concurrent workers, and the latency it adds per task.

Each worker is a process of its own (as real workers are) with its own `Ledger`; all start
together and, for `--seconds`, claim a new key and finish it `succeeded`, one after the
other (finishes not batched: the worst case). Next to it, in the same run on the same
database with the same workers: a plain `INSERT` of one row committed in its own
transaction per task (the floor of any durable record of an execution). Prints one JSON
object: per database, executions per second and the median and p99 latency per task.

With `--batch-finishes SECONDS`, a third run: each worker process runs a real `WorkerGate`
(background threads on) with `finish_batch_seconds=SECONDS`, and each task is
`with gate.executing(key)`: the claim is written before the task, the finish goes to the
gate's flusher (`Ledger.finish_many` every SECONDS or per `finish_batch_size`). Its latency is
what the gate adds to a task (the claim, and handing the finish to the flusher); the
executions counted are the ones finished in the ledger by the end of the run (after `close()`).

    .venv/bin/python bench/ledger.py [--workers 16] [--seconds 5] [--postgres URL] [--batch-finishes S]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from migration_fsm.journal import Journal, make_engine
from migration_fsm.journal.ledger import Ledger

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def summary(samples: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "executions_per_s": round(len(ordered) / seconds, 1),
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "tasks": len(ordered),
    }


def ledger_worker(url: str, migration: str, index: int, seconds: float, start: Any, out: Any) -> None:  # noqa: PLR0917
    ledger = Ledger(url)
    ledger.claim(migration, f"warm-{index}", "new", f"w{index}")  # connect before the clock starts
    samples: list[float] = []
    start.wait()
    deadline = time.perf_counter() + seconds
    n = 0
    while (began := time.perf_counter()) < deadline:
        result = ledger.claim(migration, f"{index}-{n}", "new", f"w{index}")
        assert result.claim is not None
        ledger.finish(result.claim, "succeeded")
        samples.append(time.perf_counter() - began)
        n += 1
    ledger.close()
    out.put(samples)


def gate_worker(url: str, migration: str, index: int, seconds: float, start: Any, out: Any) -> None:  # noqa: PLR0917
    from migration_fsm.client import PhaseClient, WorkerGate

    name, batch = migration.split("@")
    samples: list[float] = []
    with PhaseClient(url, name, ttl=3600, listen=False) as client:
        gate = WorkerGate(client, "old", f"w{index}", finish_batch_seconds=float(batch))
        with gate.executing(f"warm-{index}"):
            pass
        start.wait()
        deadline = time.perf_counter() + seconds
        n = 0
        while (began := time.perf_counter()) < deadline:
            with gate.executing(f"{index}-{n}") as run:
                assert run.allowed
            samples.append(time.perf_counter() - began)
            n += 1
        gate.close()
    out.put(samples)


def baseline_worker(url: str, migration: str, index: int, seconds: float, start: Any, out: Any) -> None:  # noqa: PLR0917, ARG001 - the same signature as ledger_worker (one process target)
    engine = make_engine(url)
    samples: list[float] = []
    statement = text("INSERT INTO bench_ledger_baseline (k, v) VALUES (:k, 1)")
    with engine.connect() as conn:
        conn.execute(statement, {"k": f"warm-{index}"})
        conn.commit()
        start.wait()
        deadline = time.perf_counter() + seconds
        n = 0
        while (began := time.perf_counter()) < deadline:
            conn.execute(statement, {"k": f"{index}-{n}"})
            conn.commit()
            samples.append(time.perf_counter() - began)
            n += 1
    engine.dispose()
    out.put(samples)


def run_workers(target: Any, url: str, migration: str, workers: int, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(url, migration, i, seconds, start, out)) for i in range(workers)
    ]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let every worker connect and warm up (not a measurement)
    start.set()
    samples: list[float] = []
    for _ in procs:
        samples.extend(out.get())
    for p in procs:
        p.join()
    return summary(samples, seconds)


def measure(url: str, workers: int, seconds: float, batch: float | None = None) -> dict[str, Any]:
    store = Journal(url, engine=make_engine(url, create=True))
    store.upgrade()
    with store.engine.connect() as conn:
        conn.execute(text("CREATE TABLE bench_ledger_baseline (k VARCHAR(400) PRIMARY KEY, v INTEGER)"))
        conn.commit()
    migration = f"bench-{uuid.uuid4().hex[:8]}"
    store.create(migration, "bench")
    store.close()
    result: dict[str, Any] = {
        "ledger_claim_finish": run_workers(ledger_worker, url, migration, workers, seconds),
        "baseline_insert_commit": run_workers(baseline_worker, url, migration, workers, seconds),
    }
    ours, base = result["ledger_claim_finish"], result["baseline_insert_commit"]
    result["added_latency_median_ms"] = ours["median_ms"]
    result["over_baseline"] = round(ours["median_ms"] / max(base["median_ms"], 1e-9), 2)
    if batch is not None:
        gated_migration = f"{migration}-gate"
        with Journal(url, engine=make_engine(url)) as journal:
            journal.create(gated_migration, "bench")
        gated = run_workers(gate_worker, url, f"{gated_migration}@{batch}", workers, seconds)
        ledger = Ledger(url)
        finished = ledger.counts(gated_migration).succeeded - workers  # less the warm-ups
        ledger.close()
        gated["finished_in_ledger"] = finished
        gated["executions_per_s"] = round(finished / seconds, 1)
        result["gate_batched_finishes"] = gated
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--postgres", default=os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG))
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--batch-finishes", type=float, default=None, metavar="SECONDS")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "ledger",
        "workers": args.workers,
        "seconds": args.seconds,
        "goal_executions_per_s": 2000,
        "goal_median_ms": 2,
    }
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            report["sqlite"] = measure(
                f"sqlite:///{Path(tmp) / 'bench.db'}", args.workers, args.seconds, args.batch_finishes
            )
    name = f"mfsm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        report["postgresql"] = measure(url, args.workers, args.seconds, args.batch_finishes)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
