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

On PostgreSQL the ledger is measured twice, with psycopg's prepared statements (the default,
as the engine's connections have) and without (`Ledger(prepared_statements=False)`, for
PgBouncer in transaction pooling), and so is the baseline: through SQLAlchemy (a `Connection`,
as before) and through a raw psycopg connection in autocommit (what the ledger's hot path uses
now, so the fair floor).
Every figure also gives the CPU it cost per task: `client_cpu_us` (the worker processes) and,
when the server runs on this machine, `server_cpu_us` (the backends of the benchmark's
database, from /proc). On a 2-core machine shared by the server and 16 workers, their sum
is what bounds executions per second.

    .venv/bin/python bench/ledger.py [--workers 16] [--seconds 5] [--postgres URL] [--no-sqlite]
        [--batch-finishes S] [--poll-seconds S]
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


def server_cpu_seconds(database: str | None) -> float | None:
    """CPU time used so far by the PostgreSQL backends connected to `database`, when the
    server runs on this machine (None when /proc shows none)."""
    if database is None or not Path("/proc").is_dir():
        return None
    total, found = 0, False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")].startswith("postgres") and f" {database} " in cmdline:
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
            found = True
    return total / os.sysconf("SC_CLK_TCK") if found else None


def timed_loop(task: Any, seconds: float, sync: Any) -> tuple[list[float], float]:
    """Say ready, then run `task(n)` for `seconds` once every worker is ready and `start` is
    set; the latencies, and the CPU the process used."""
    start, _, _, ready = sync
    samples: list[float] = []
    ready.release()
    start.wait()
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    n = 0
    while (began := time.perf_counter()) < deadline:
        task(n)
        samples.append(time.perf_counter() - began)
        n += 1
    return samples, time.process_time() - cpu


def ledger_worker(  # noqa: PLR0917
    url: str, migration: str, index: int, seconds: float, options: dict[str, Any], sync: Any
) -> None:
    _, out, done, _ = sync
    ledger = Ledger(url, prepared_statements=options.get("prepared", True))
    ledger.claim(migration, f"warm-{index}", "new", f"w{index}")  # connect before the clock starts

    def task(n: int) -> None:
        result = ledger.claim(migration, f"{index}-{n}", "new", f"w{index}")
        assert result.claim is not None
        ledger.finish(result.claim, "succeeded")

    out.put(timed_loop(task, seconds, sync))
    done.wait()  # stay connected until the server's CPU was read
    ledger.close()


def gate_worker(  # noqa: PLR0917
    url: str, migration: str, index: int, seconds: float, options: dict[str, Any], sync: Any
) -> None:
    from migration_fsm.client import PhaseClient, WorkerGate

    _, out, done, _ = sync
    with PhaseClient(url, migration, ttl=3600, listen=False) as client:
        gate = WorkerGate(
            client,
            "old",
            f"w{index}",
            finish_batch_seconds=options["batch"],
            poll_seconds=options["poll"],
            ledger_prepared_statements=options.get("prepared", True),
        )
        with gate.executing(f"warm-{index}"):
            pass

        def task(n: int) -> None:
            with gate.executing(f"{index}-{n}") as run:
                assert run.allowed

        out.put(timed_loop(task, seconds, sync))
        done.wait()
        gate.close()


def baseline_worker(  # noqa: PLR0917
    url: str,
    migration: str,  # noqa: ARG001 - the same signature as ledger_worker (one process target)
    index: int,
    seconds: float,
    options: dict[str, Any],
    sync: Any,
) -> None:
    _, out, done, _ = sync
    engine = make_engine(url)
    if options.get("raw"):  # a raw psycopg connection in autocommit, like the ledger's hot path
        import psycopg

        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        cparams.pop("context", None)
        raw = psycopg.connect(*cargs, **cparams, autocommit=True, prepare_threshold=None)
        insert = "INSERT INTO bench_ledger_baseline (k, v) VALUES (%(k)s, 1)"
        raw.execute(insert, {"k": f"warm-raw-{index}"})
        out.put(timed_loop(lambda n: raw.execute(insert, {"k": f"raw-{index}-{n}"}), seconds, sync))
        done.wait()
        raw.close()
        engine.dispose()
        return
    statement = text("INSERT INTO bench_ledger_baseline (k, v) VALUES (:k, 1)")
    with engine.connect() as conn:
        conn.execute(statement, {"k": f"warm-{index}"})
        conn.commit()

        def task(n: int) -> None:
            conn.execute(statement, {"k": f"{index}-{n}"})
            conn.commit()

        out.put(timed_loop(task, seconds, sync))
        done.wait()
    engine.dispose()


def run_workers(  # noqa: PLR0917
    target: Any, url: str, migration: str, workers: int, seconds: float, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    start, out, done, ready = ctx.Event(), ctx.Queue(), ctx.Event(), ctx.Semaphore(0)
    sync = (start, out, done, ready)
    procs = [
        ctx.Process(target=target, args=(url, migration, i, seconds, options or {}, sync))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every worker has connected and warmed up (not a measurement)
        if not ready.acquire(timeout=120):
            raise RuntimeError("a worker did not start within 120 s")
    time.sleep(0.2)
    database = make_url(url).database if make_url(url).get_backend_name() == "postgresql" else None
    server_before = server_cpu_seconds(database)
    start.set()
    samples: list[float] = []
    client_cpu = 0.0
    for _ in procs:
        latencies, cpu = out.get()
        samples.extend(latencies)
        client_cpu += cpu
    server_after = server_cpu_seconds(database)
    done.set()
    for p in procs:
        p.join()
    result: dict[str, Any] = summary(samples, seconds)
    result["client_cpu_us"] = round(client_cpu / max(len(samples), 1) * 1e6)
    if server_before is not None and server_after is not None:
        result["server_cpu_us"] = round((server_after - server_before) / max(len(samples), 1) * 1e6)
    return result


def measure(
    url: str, workers: int, seconds: float, batch: float | None = None, poll: float = 0.05
) -> dict[str, Any]:
    store = Journal(url, engine=make_engine(url, create=True))
    store.upgrade()
    with store.engine.connect() as conn:
        conn.execute(text("CREATE TABLE bench_ledger_baseline (k VARCHAR(400) PRIMARY KEY, v INTEGER)"))
        conn.commit()
    migration = f"bench-{uuid.uuid4().hex[:8]}"
    store.create(migration, "bench")
    pg = store.engine.dialect.name == "postgresql"
    store.close()
    result: dict[str, Any] = {
        "ledger_claim_finish": run_workers(ledger_worker, url, migration, workers, seconds),
        "baseline_insert_commit": run_workers(baseline_worker, url, migration, workers, seconds),
    }
    if pg:
        unprepared_migration = f"{migration}-unprepared"  # new keys: a migration of its own
        with Journal(url, engine=make_engine(url)) as journal:
            journal.create(unprepared_migration, "bench")
        result["ledger_claim_finish_unprepared"] = run_workers(
            ledger_worker, url, unprepared_migration, workers, seconds, {"prepared": False}
        )
        result["baseline_insert_commit_raw"] = run_workers(
            baseline_worker, url, migration, workers, seconds, {"raw": True}
        )
    ours, base = result["ledger_claim_finish"], result["baseline_insert_commit"]
    result["added_latency_median_ms"] = ours["median_ms"]
    result["over_baseline"] = round(ours["median_ms"] / max(base["median_ms"], 1e-9), 2)
    if batch is not None:
        variants = [("gate_batched_finishes", True)]
        if pg:
            variants.append(("gate_batched_finishes_unprepared", False))
        for name, prepared in variants:
            gated_migration = f"{migration}-{name}"
            with Journal(url, engine=make_engine(url)) as journal:
                journal.create(gated_migration, "bench")
            options = {"batch": batch, "poll": poll, "prepared": prepared}
            gated = run_workers(gate_worker, url, gated_migration, workers, seconds, options)
            ledger = Ledger(url)
            finished = ledger.counts(gated_migration).succeeded - workers  # less the warm-ups
            ledger.close()
            gated["finished_in_ledger"] = finished
            gated["executions_per_s"] = round(finished / seconds, 1)
            result[name] = gated
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--postgres", default=os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG))
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--batch-finishes", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--poll-seconds", type=float, default=0.05, metavar="SECONDS")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "ledger",
        "workers": args.workers,
        "seconds": args.seconds,
        "goal_executions_per_s": 2000,
        "goal_median_ms": 2,
        "batch_finishes_seconds": args.batch_finishes,
        "gate_poll_seconds": args.poll_seconds,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            report["sqlite"] = measure(
                f"sqlite:///{Path(tmp) / 'bench.db'}",
                args.workers,
                args.seconds,
                args.batch_finishes,
                args.poll_seconds,
            )
    name = f"mfsm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        report["postgresql"] = measure(
            url, args.workers, args.seconds, args.batch_finishes, args.poll_seconds
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
