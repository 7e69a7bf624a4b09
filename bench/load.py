"""A whole migration on PostgreSQL under a steady stream of tasks: nothing lost, nothing run twice.

The demo's story (`migration_fsm.demo`) at load: the old task manager, the new queue, the
tasks' execution log (their own side effect, `ExecutionLog`) and the migration's control
database (with the execution ledger and the workers' table) all live in PostgreSQL (four
databases of one server). Four kinds of process, as in production:

- the application (`--producer-processes`, each with `--producers` threads): schedules
  `--rate` tasks per second in all through `DualWriter`, each thread on a PhaseClient of
  its own, and reads one task in ten back through `FallbackReader`;
- the application's other replicas (one process): `--clients` PhaseClients (ttl `--ttl`)
  answering `routing(key)` for task keys, sweep after sweep (`RoutingProbe`);
- the workers (one process per side): `--workers` threads claim with `FOR UPDATE SKIP
  LOCKED`, run and complete tasks, gated by the process's one `WorkerGate` as docs/WORKERS.md
  says (`migration_fsm.demo.worker.WorkerPool`): the gate says whether the side may take a
  task (the routing, and the pause the built-in `pause_consumers` step publishes and waits
  for), and claims each task in the execution ledger before it runs;
- the operator (this process): walks every phase through the same code as the CLI
  (`OperatorWalk`, the default edges): backfill, validate, cutover with the acknowledged
  pause, drain and state transfer, ramp
  10 -> 50 -> 100, cleanup with a crash and `resume --steal`, a rollback cleanup -> cutover
  -> dual_write, forward again, complete; after each step it waits until every client
  shows the new version.

`--seconds` is the time spent letting traffic run between the operator's steps; the steps
(backfill, validate, drains and syncs over every task so far) add their own time on top.
Should one operator command run `--stall-seconds` under traffic (a `validate` whose scan
cannot reach the end of a table growing faster than it reads), a watchdog stops the traffic
so the walk can finish, and the report says where (`traffic_stopped_early`).

Prints one JSON object (and exits 1 when a task was lost or ran twice, or the execution ledger
counts a key that succeeded twice): scheduled, executed, lost, duplicated (from the tasks'
own execution log), executed_twice and refused_executions (from the execution ledger), the
achieved rate, the `DualWriter.write` latency p50/p99 per phase
(bucketed by the phase the writer's client showed when the write began), fallback reads,
repair entries, seconds per phase, what the clients saw, and a baseline measured on the same
server in the same run, before and after the load: a single-row INSERT + COMMIT (the floor of
one durable write; a dual write is two upserts, each SELECT + INSERT + COMMIT) and the COPY
rate, so that figures from runs on a busy shared machine can be compared.

By default the server is a PRIVATE cluster started for the run (bench/pollers.py's: initdb
in a temporary directory, fsync off, max_connections 300, removed at the end), because
`--clients` connections plus the pools and workers exceed the shared server's 100. With
`--postgres URL` (a maintenance database such as `.../postgres`) the run creates its four
databases on that server and drops them at the end; keep `--clients`, `--producers` and
`--workers` small there (the test does).

    .venv/bin/python bench/load.py [--seconds S] [--rate N] [--clients N] [--producers N]
        [--producer-processes N] [--workers N] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import random
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from types import FrameType
from typing import Any, Protocol

import psycopg
from pollers import Cluster, pg_bin_dir
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from migration_fsm import commands, log
from migration_fsm.client import DualWriter, FallbackReader, PhaseClient, WorkerGate
from migration_fsm.demo import hooks
from migration_fsm.demo.run import WORKER_TTL_SECONDS, OperatorWalk, Report, ledger_figures, walk_settings
from migration_fsm.demo.systems import (
    NEW_STORE,
    OLD_STORE,
    ExecutionLog,
    NewQueue,
    OldTaskManager,
    PostgresDatabase,
)
from migration_fsm.demo.worker import WorkerPool
from migration_fsm.fsm import PHASES
from migration_fsm.journal import Journal
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools.reconcile import open_entries

MIGRATION = "load"
DATABASES = ("control", "old", "new", "execution_log")
KINDS = ("send_email", "resize_image", "charge_card", "sync_crm")


def say(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentiles(seconds: list[float]) -> dict[str, float | int]:
    """Count, p50, p99 and max, in milliseconds."""
    if not seconds:
        return {"n": 0}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 2)

    return {"n": len(ordered), "p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1] * 1000, 2)}


# -- the server and its databases -----------------------------------------------------------


@contextlib.contextmanager
def databases(admin_url: str) -> Iterator[dict[str, str]]:
    """Four fresh databases (control, old, new, execution_log) on `admin_url`'s server, dropped
    at the end."""
    prefix = f"mfsm_load_{uuid.uuid4().hex[:8]}"
    admin_info = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    urls = {
        role: make_url(admin_url)
        .set(drivername="postgresql+psycopg", database=f"{prefix}_{role}")
        .render_as_string(hide_password=False)
        for role in DATABASES
    }
    created: list[str] = []
    try:
        with psycopg.connect(admin_info, autocommit=True) as admin:
            for role in DATABASES:
                admin.execute(f'CREATE DATABASE "{prefix}_{role}"')
                created.append(f"{prefix}_{role}")
        yield urls
    finally:
        with psycopg.connect(admin_info, autocommit=True) as admin:
            for name in created:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure_baseline(url: str, rounds: int = 300, copy_rows: int = 20_000) -> dict[str, Any]:
    """The floor on this server now: single-row INSERT + COMMIT latency, and COPY rows per second."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE load_baseline (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, body TEXT NOT NULL)"
        )
        try:
            inserts: list[float] = []
            for i in range(rounds):
                started = time.perf_counter()
                conn.execute("INSERT INTO load_baseline (key, body) VALUES (%s, %s)", (f"b-{i}", "x" * 40))
                inserts.append(time.perf_counter() - started)
            started = time.perf_counter()
            with (
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy("COPY load_baseline (key, body) FROM STDIN") as copy,
            ):
                for i in range(copy_rows):
                    copy.write_row((f"c-{i}", "x" * 40))
            copy_seconds = time.perf_counter() - started
        finally:
            conn.execute("DROP TABLE load_baseline")
    return {
        "insert_commit_ms": percentiles(inserts),
        "copy_rows_per_s": round(copy_rows / copy_seconds),
    }


# -- what the processes share ------------------------------------------------------------------


class SharedInts(Protocol):
    """Integers in shared memory (a `multiprocessing` `RawArray("q", n)`): one writer each."""

    def __getitem__(self, index: int) -> int: ...

    def __setitem__(self, index: int, value: int) -> None: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Plan:
    """What every process of the run needs to know (sent to the children)."""

    urls: dict[str, str]
    rate: float
    processes: int
    producers: int
    workers: int
    work_ms: float
    clients: int
    ttl: float
    worker_ttl: float


def quiet_logging() -> None:
    """Library callers choose their own logging; measure the migration, not a log renderer."""
    log.configure(json=True, level=logging.WARNING)
    logging.getLogger("migration_fsm.client").setLevel(logging.ERROR)  # sampled shadow-read notes


def receive(pipe: Connection, timeout: float, what: str) -> Any:
    """The next message on `pipe`; a RuntimeError after `timeout` seconds or when the child
    at the other end died (its traceback is on stderr)."""
    if not pipe.poll(timeout):
        raise RuntimeError(f"no answer from a child process after {timeout:g} s ({what})")
    try:
        return pipe.recv()
    except EOFError:
        raise RuntimeError(f"a child process died ({what}): see its traceback above") from None


# -- the application: producer processes ------------------------------------------------------


class Traffic:
    """Producer threads writing their share of the schedule, each through its own
    `DualWriter` (on its own PhaseClient), reading one task in `read_every` back through a
    `FallbackReader`.

    The schedule is open-loop: task i is due at `t0 + i / rate` whoever writes it (this
    process writes i = first, first + stride, ...), so a producer that falls behind writes flat
    out until it catches up (`lag_max` says how far behind the schedule it got). `written[first]`
    counts the writes as they happen, for the other processes to see."""

    def __init__(
        self,
        writers: list[DualWriter],
        readers: list[FallbackReader],
        rate: float,
        written: SharedInts,
        *,
        first: int = 0,
        stride: int = 1,
        read_every: int = 10,
    ) -> None:
        self.writers = writers
        self.readers = readers
        self.rate = rate
        self.written = written
        self.first = first
        self.stride = stride
        self.read_every = read_every
        self.scheduled: list[str] = []
        self.errors: list[str] = []
        self.latencies: dict[str, list[float]] = {phase.value: [] for phase in PHASES}
        self.lag_max = 0.0
        self.t0 = self.started_at = self.stopped_at = 0.0
        self._sequence = itertools.count()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"load-producer-{i}", daemon=True)
            for i in range(len(writers))
        ]

    def start(self, t0: float) -> None:
        """Start writing; task i is due at `t0 + i / rate` (`time.monotonic()`, one clock for
        every process on Linux)."""
        self.t0 = t0
        self.started_at = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.stopped_at = time.monotonic()

    def _run(self, index: int) -> None:
        writer, reader = self.writers[index], self.readers[index]
        rng = random.Random(index)
        while not self._stop.is_set():
            i = self.first + self.stride * next(self._sequence)
            late = time.monotonic() - (self.t0 + i / self.rate)
            if late < 0:
                if self._stop.wait(-late):
                    return
            else:
                self.lag_max = max(self.lag_max, late)
            now = datetime.now(UTC)
            record = TaskRecord(
                key=f"load-{i:08d}",
                type=KINDS[i % len(KINDS)],
                payload={"n": i, "note": "x" * rng.randrange(10, 60)},
                status=TaskStatus.PENDING,
                created_at=now,
                updated_at=now,
            )
            phase = writer.client.snapshot().phase.value
            started = time.perf_counter()
            try:
                writer.write(record)
            except Exception as exc:  # noqa: BLE001 - counted: an unscheduled task is not lost
                self.errors.append(f"{record.key}: {exc}")
                continue
            self.latencies[phase].append(time.perf_counter() - started)
            self.scheduled.append(record.key)
            self.written[self.first] += 1  # one process per slot; the GIL orders its threads
            if i % self.read_every == 0:
                with contextlib.suppress(Exception):  # a failed read is counted by the reader
                    reader.get(self.scheduled[rng.randrange(len(self.scheduled))])


def producer_process(plan: Plan, index: int, written: SharedInts, pipe: Connection) -> None:
    """One application process: "ready", then writes from ("start", t0) until "stop", then
    sends what it wrote and measured."""
    quiet_logging()
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(PhaseClient(plan.urls["control"], migration=MIGRATION, ttl=plan.ttl))
            for _ in range(plan.producers)
        ]
        old_store = sql_store(plan.urls["old"], OLD_STORE, "old", plan.producers + 2)
        stack.callback(old_store.engine.dispose)
        new_store = sql_store(plan.urls["new"], NEW_STORE, "new", plan.producers + 2)
        stack.callback(new_store.engine.dispose)
        writers = [DualWriter(client, old_store, new_store) for client in clients]
        for writer in writers:
            stack.callback(writer.close)
        readers = [FallbackReader(client, old_store, new_store, shadow_sample=0.01) for client in clients]
        traffic = Traffic(writers, readers, plan.rate, written, first=index, stride=plan.processes)
        pipe.send("ready")
        command, t0 = pipe.recv()
        assert command == "start", command
        traffic.start(t0)
        assert pipe.recv() == "stop"
        traffic.stop()
        reads, writes = Counter[str](), Counter[str]()
        for reader in readers:
            reads.update(reader.counters())
        for writer in writers:
            writes.update(writer.counters())
        pipe.send(
            {
                "scheduled": traffic.scheduled,
                "latencies": traffic.latencies,
                "errors": traffic.errors,
                "lag_max": traffic.lag_max,
                "started_at": traffic.started_at,
                "stopped_at": traffic.stopped_at,
                "reads": dict(reads),
                "writes": dict(writes),
                "cpu_seconds": time.process_time(),
            }
        )


def sql_store(url: str, config: dict[str, Any], name: str, pool: int) -> SqlTaskStore:
    """A side's `SqlTaskStore` on an engine whose pool fits the threads that share it (an
    application sizes its pool so; SQLAlchemy's default of 5 would open and close a
    connection per write beyond that)."""
    engine = create_engine(
        make_url(url), pool_size=pool, max_overflow=pool, connect_args={"connect_timeout": 5}
    )
    return SqlTaskStore(
        url,
        config["table"],
        name=name,
        columns=config["columns"],
        status_map=config.get("status_map"),
        engine=engine,
    )


# -- the application's other replicas: PhaseClients answering routing(key) ------------------------


class RoutingProbe:
    """Asks every client `routing(key)` for task keys, sweep after sweep, and counts any two
    clients that answer differently for one key while showing the same version (must be 0).

    Each sweep also publishes every client's version in `versions` (so the operator can wait
    for all of them) and notes, per version, when the first and when the last client showed
    it: `spread()` (last - first, to within a sweep) is how far apart the clients follow a
    change.
    """

    def __init__(
        self,
        clients: list[PhaseClient],
        written: SharedInts,
        versions: SharedInts,
        interval: float = 0.02,
    ) -> None:
        self.clients = clients
        self.written = written
        self.versions = versions
        self.interval = interval
        self.calls = 0
        self.sweeps = 0
        self.disagreements = 0
        self.stale_seen = 0
        self.first_seen: dict[int, float] = {}
        self.all_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-routing-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        rng = random.Random(7)
        while not self._stop.wait(self.interval):
            written = sum(self.written[i] for i in range(len(self.written)))
            key = f"load-{rng.randrange(max(1, written)):08d}"
            answers: dict[int, set[tuple[str, str, str]]] = {}
            for client in self.clients:
                before = client.snapshot()
                route = client.routing(key)
                if client.snapshot() is not before:
                    continue  # the snapshot changed under the call: no version to file it under
                self.stale_seen += before.stale
                answers.setdefault(before.version, set()).add(
                    (route.read_from, route.authoritative, route.consume_from)
                )
                self.calls += 1
            self.disagreements += sum(1 for seen in answers.values() if len(seen) > 1)
            self.sweeps += 1
            self._note(time.monotonic())

    def _note(self, now: float) -> None:
        versions = [client.snapshot().version for client in self.clients]
        for i, version in enumerate(versions):
            self.versions[i] = version
        for version in range(min(versions), max(versions) + 1):
            self.first_seen.setdefault(version, now)
        for version in range(min(self.first_seen), min(versions) + 1):
            self.all_seen.setdefault(version, now)

    def spread(self) -> list[float]:
        """For each version every client reached after the first sweep: last - first showing."""
        first_sweep = min(self.first_seen.values(), default=0.0)
        return [
            self.all_seen[version] - seen
            for version, seen in self.first_seen.items()
            if seen > first_sweep and version in self.all_seen
        ]


def backend_process(plan: Plan, written: SharedInts, versions: SharedInts, pipe: Connection) -> None:
    """The application's other replicas: `plan.clients` PhaseClients probed by a
    `RoutingProbe` from "ready" until "stop", then their figures."""
    quiet_logging()
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(PhaseClient(plan.urls["control"], migration=MIGRATION, ttl=plan.ttl))
            for _ in range(plan.clients)
        ]
        probe = RoutingProbe(clients, written, versions)
        probe.start()
        pipe.send("ready")
        assert pipe.recv() == "stop"
        probe.stop()
        counters = Counter[str]()
        for client in clients:
            counters.update({k: int(v) for k, v in client.counters().items() if k != "stale"})
        spread = probe.spread()
        pipe.send(
            {
                "count": len(clients),
                "ttl_s": plan.ttl,
                "routing_calls": probe.calls,
                "routing_sweeps": probe.sweeps,
                "disagreements_at_same_version": probe.disagreements,
                "stale_answers": probe.stale_seen,
                "first_to_last_client_per_change_ms": {
                    "changes": len(spread),
                    "median": round(statistics.median(spread) * 1000, 1) if spread else None,
                    "max": round(max(spread) * 1000, 1) if spread else None,
                    "resolution_ms": round(probe.interval * 1000, 1),
                },
                "refreshes": counters["refreshes"],
                "notifications": counters["notifications"],
                "refresh_errors": counters["refresh_errors"],
                "cpu_seconds": time.process_time(),
            }
        )


# -- the workers' process --------------------------------------------------------------------


def worker_process(plan: Plan, side: str, pipe: Connection) -> None:
    """The workers of one side, gated by one `WorkerGate` (one per process): "ready", then work
    until "stop", answered with their errors and figures."""
    quiet_logging()
    # The execution log is bookkeeping, not a system under test: its commits need not wait for disk.
    log = ExecutionLog(PostgresDatabase(plan.urls["execution_log"], synchronous_commit=False))
    system = (OldTaskManager if side == "old" else NewQueue)(PostgresDatabase(plan.urls[side]))
    with (
        PhaseClient(plan.urls["control"], migration=MIGRATION, ttl=plan.ttl) as client,
        WorkerGate(client, side, worker_ttl_seconds=plan.worker_ttl) as gate,
    ):
        pool = WorkerPool(
            system,
            log,
            gate,
            workers=plan.workers,
            work_seconds=plan.work_ms / 1000,
            idle_seconds=0.05,
        )
        pool.start()
        pipe.send("ready")
        command = pipe.recv()
        assert command == "stop", command
        pool.stop()
        figures = pool.figures()
    log.close()
    pipe.send({**figures, "cpu_seconds": time.process_time()})


# -- the operator's process ------------------------------------------------------------------


class LoadRun:
    """One load run from the operator's process: the children, the walk, the figures."""

    def __init__(self, plan: Plan, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.plan = plan
        self.args = args
        urls = plan.urls
        self.settings = walk_settings(urls["control"], urls["old"], urls["new"], actor="load-operator")
        commands.db_upgrade(self.settings)
        commands.init(self.settings, MIGRATION)
        # Every table exists before a child reflects it.
        OldTaskManager(PostgresDatabase(urls["old"]))
        NewQueue(PostgresDatabase(urls["new"]))
        self.log = ExecutionLog(PostgresDatabase(urls["execution_log"]))
        stack.callback(self.log.close)
        spawn = multiprocessing.get_context("spawn")
        self.written: SharedInts = spawn.RawArray("q", plan.processes)
        self.versions: SharedInts = spawn.RawArray("q", plan.clients)
        self.children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self.finished = False
        stack.callback(self._end_children)
        say(
            f"load: starting {plan.processes} producer, 2 worker (one per side) and 1 backend process"
            f" ({plan.clients} PhaseClients, ttl {plan.ttl:g} s)"
        )
        self.worker_pipes = {
            side: self._spawn(spawn, f"load-workers-{side}", worker_process, plan, side)
            for side in ("old", "new")
        }
        self.backend_pipe = self._spawn(
            spawn, "load-backends", backend_process, plan, self.written, self.versions
        )
        self.producer_pipes = [
            self._spawn(spawn, f"load-producers-{index}", producer_process, plan, index, self.written)
            for index in range(plan.processes)
        ]
        # The operator's own view, as `status --watch` would show it.
        self.client = stack.enter_context(PhaseClient(urls["control"], migration=MIGRATION, ttl=plan.ttl))
        for _, pipe in self.children:
            if receive(pipe, 180.0, "ready") != "ready":
                raise RuntimeError("a child process did not start")
        hooks.RUNTIME.update(crash_pending=True)
        stack.callback(hooks.RUNTIME.clear)
        self.soak_seconds = args.seconds / OperatorWalk.SOAK_UNITS
        self.report = Report()
        self.produced: list[dict[str, Any]] = []
        self.backends: dict[str, Any] = {}
        self.workers: dict[str, Any] = {}
        self.waited = 0.0
        self.producing_since = 0.0
        self.stalled: dict[str, Any] | None = None
        self._traffic_lock = threading.Lock()
        self._watching = threading.Event()
        stack.callback(self._watching.set)

    def _spawn(self, spawn: SpawnContext, name: str, target: Callable[..., None], *args: Any) -> Connection:
        """Start `target(*args, pipe)` in a child process; our end of the pipe."""
        mine, theirs = spawn.Pipe()
        child = spawn.Process(target=target, args=(*args, theirs), name=name, daemon=True)
        child.start()
        theirs.close()  # the child holds its end now: should it die, ours reads EOF at once
        self.children.append((child, mine))
        return mine

    def _end_children(self) -> None:
        """Wait for the children to exit after their "stop"; on an error, end them now (our own
        children, by their handles)."""
        for child, _ in self.children:
            child.join(timeout=30 if self.finished else 0.1)
            if child.is_alive():
                child.terminate()
                child.join(timeout=10)

    def written_so_far(self) -> int:
        """Tasks the producers wrote so far."""
        return sum(self.written[i] for i in range(len(self.written)))

    def soak(self, units: float) -> None:
        """Let the traffic run for `units` soak units, saying how it goes every 5 s."""
        deadline = time.monotonic() + units * self.soak_seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 5.0))
            self.progress()

    def progress(self) -> None:
        """One line on stderr: phase, tasks written and executed so far."""
        by_side = self.log.by_side()
        snap = self.client.snapshot()
        written = self.written_so_far()
        elapsed = max(time.monotonic() - self.producing_since, 1e-9)
        say(
            f"load: {snap.phase.value} {snap.percent}%: written {written} ({written / elapsed:,.0f}/s),"
            f" executed old {by_side.get('old', 0)} new {by_side.get('new', 0)}"
        )

    def seen(self, version: int) -> None:
        """Return once the operator's client and every backend client show `version`."""
        deadline = time.monotonic() + 60
        while self.client.snapshot().version < version or any(
            self.versions[i] < version for i in range(len(self.versions))
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the clients did not show version {version} within 60 s")
            time.sleep(0.002)

    def stop_traffic(self) -> None:
        """Stop the producers and collect what they wrote (once)."""
        with self._traffic_lock:
            if self.produced:
                return
            for pipe in self.producer_pipes:
                pipe.send("stop")
            self.produced = [receive(pipe, 300.0, "stop producers") for pipe in self.producer_pipes]

    def watch(self, walk: OperatorWalk) -> None:
        """The watchdog: once one operator command has run `--stall-seconds` under traffic, stop
        the traffic (so the command can finish) and say so in the report."""
        while not self._watching.wait(1.0):
            doing = walk.doing
            if doing is None or self.produced:
                continue
            what, since = doing
            if (running := time.monotonic() - since) > self.args.stall_seconds:
                say(f"load: `{what}` has run {running:.0f} s under traffic: stopping the traffic")
                self.stalled = {
                    "during": what,
                    "after_s": round(running, 1),
                    "at_s": round(time.monotonic() - self.producing_since, 1),
                    "written": self.written_so_far(),
                }
                self.stop_traffic()
                return

    def go(self) -> None:
        """Traffic on, the operator's walk, traffic off, then wait for every task to run."""
        plan = self.plan
        self.producing_since = time.monotonic() + 0.2
        for pipe in self.producer_pipes:
            pipe.send(("start", self.producing_since))
        say(
            f"load: producing {plan.rate:g} tasks/s with {plan.processes} x {plan.producers}"
            f" threads through DualWriter; {plan.workers} workers per side;"
            f" soaking {self.soak_seconds:.1f} s per unit"
        )
        walk = OperatorWalk(
            self.settings, MIGRATION, self.report, soak=self.soak, seen=self.seen, say=say, label="load"
        )
        watchdog = threading.Thread(target=self.watch, args=(walk,), name="load-watchdog", daemon=True)
        watchdog.start()
        walk.run(stop_traffic=self.stop_traffic)
        self._watching.set()
        watchdog.join(timeout=10)
        scheduled = [key for part in self.produced for key in part["scheduled"]]
        self.waited = wait_until_executed(self.log, scheduled, quiet_for=max(60.0, self.args.seconds / 2))
        walk.finish()
        self.backend_pipe.send("stop")
        self.backends = receive(self.backend_pipe, 120.0, "stop backends")
        for pipe in self.worker_pipes.values():
            pipe.send("stop")
        self.workers = {
            side: receive(pipe, 120.0, f"stop {side} workers") for side, pipe in self.worker_pipes.items()
        }
        self.finished = True
        self.report.journal_verified = commands.verify(self.settings, MIGRATION).rows > 0

    def figures(self) -> dict[str, Any]:
        """The report: `Report.as_json` (the demo's keys) plus the load's own figures."""
        report, produced = self.report, self.produced
        executions = self.log.executions()
        scheduled = {key for part in produced for key in part["scheduled"]}
        report.scheduled = len(scheduled)
        report.executed = len(scheduled & set(executions))
        report.executions = sum(executions.values())
        report.lost = len(scheduled - set(executions))
        report.duplicated = sum(1 for count in executions.values() if count > 1)
        report.executions_by_side = self.log.by_side()
        ledger_figures(report, self.settings, MIGRATION)
        report.workers = {
            side: {k: v for k, v in part.items() if k != "cpu_seconds"} for side, part in self.workers.items()
        }
        reads, writes = Counter[str](), Counter[str]()
        latencies: dict[str, list[float]] = {phase.value: [] for phase in PHASES}
        for part in produced:
            reads.update(part["reads"])
            writes.update(part["writes"])
            for phase, samples in part["latencies"].items():
                latencies[phase].extend(samples)
        report.reads = reads["reads"]
        report.fallback_reads = reads["fallbacks"]
        report.shadow_mismatches = reads["shadow_mismatches"]
        report.repair_entries = writes["repair_entries"]
        with Journal.open(self.settings.database_url) as control:
            still_open = open_entries(control, MIGRATION)
        started = min(part["started_at"] for part in produced)
        stopped = max(part["stopped_at"] for part in produced)
        errors = [error for part in produced for error in part["errors"]]
        backends = dict(self.backends)
        return {
            **report.as_json(),
            "samples": {
                "lost": sorted(scheduled - set(executions))[:10],
                "duplicated": sorted(k for k, n in executions.items() if n > 1)[:10],
            },
            "executions_of_unscheduled_keys": len(set(executions) - scheduled),
            "target_rate": self.plan.rate,
            "achieved_rate": round(len(scheduled) / max(stopped - started, 1e-9), 1),
            "producers": {"processes": self.plan.processes, "threads_each": self.plan.producers},
            "producing_seconds": round(stopped - started, 1),
            "schedule_lag_max_s": round(max(part["lag_max"] for part in produced), 2),
            "write_errors": len(errors),
            "write_error_samples": errors[:5],
            "write_latency_ms": {phase: percentiles(samples) for phase, samples in latencies.items()},
            "writes": dict(writes),
            "repair_entries_open_at_end": still_open,
            "clients": {
                **{k: v for k, v in backends.items() if k != "cpu_seconds"},
                "more_in_producers": self.plan.processes * self.plan.producers,
                "more_in_workers_and_operator": 3,
            },
            "workers": {
                **report.workers,
                "per_side": self.plan.workers,
                "work_ms": self.plan.work_ms,
                "errors": [error for part in self.workers.values() for error in part["errors"]],
            },
            "cpu_seconds": {
                "producers": round(sum(part["cpu_seconds"] for part in produced), 1),
                "workers": round(sum(part.get("cpu_seconds", 0.0) for part in self.workers.values()), 1),
                "backends": round(backends.get("cpu_seconds", 0.0), 1),
                "operator": round(time.process_time(), 1),
            },
            "drained_after_traffic_s": round(self.waited, 1),
            "traffic_stopped_early": self.stalled,
        }


def wait_until_executed(log: ExecutionLog, scheduled: list[str], *, quiet_for: float) -> float:
    """Wait until every scheduled task ran, or until no task ran for `quiet_for` seconds (the
    rest would never run); the seconds waited."""
    began = time.monotonic()
    wanted = set(scheduled)
    last, last_change = -1, began
    while time.monotonic() - last_change < quiet_for:
        done = sum(log.by_side().values())
        if done >= len(wanted) and wanted <= set(log.executions()):
            break
        if done != last:
            last, last_change = done, time.monotonic()
        time.sleep(0.5)
    return time.monotonic() - began


def run(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """The load run on `plan.urls` (control, old, new, execution_log); returns the report."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        load = LoadRun(plan, args, stack)
        load.go()
        figures = load.figures()
    figures["seconds"] = round(time.monotonic() - started, 2)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="traffic time between the steps")
    parser.add_argument("--rate", type=float, default=1000.0, help="tasks scheduled per second")
    parser.add_argument("--clients", type=int, default=50, help="PhaseClients probed by the operator")
    parser.add_argument("--ttl", type=float, default=1.0, help="the clients' refresh interval")
    parser.add_argument("--producers", type=int, default=8, help="producer threads per process")
    parser.add_argument("--producer-processes", type=int, default=1, help="application processes")
    parser.add_argument("--workers", type=int, default=16, help="worker threads per side")
    parser.add_argument("--work-ms", type=float, default=5.0, help="what running one task takes")
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=180.0,
        help="stop the traffic once one operator command has run this long under it",
    )
    parser.add_argument("--postgres", default=None, help="use this server (a maintenance database URL)")
    parser.add_argument("--max-connections", type=int, default=300, help="of the private cluster")
    parser.add_argument("--pg-bin", default=None, help="PostgreSQL bin directory (default: newest)")
    args = parser.parse_args()
    counts = (args.clients, args.producers, args.producer_processes, args.workers)
    if min(counts) < 1 or args.rate <= 0:
        parser.error("--clients, --producers, --producer-processes, --workers and --rate must be positive")
    quiet_logging()

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # so the cluster is stopped by the `finally` below

    signal.signal(signal.SIGTERM, terminate)
    report: dict[str, Any] = {
        "benchmark": "load",
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }
    cluster: Cluster | None = None
    try:
        if args.postgres is None:
            bin_dir = pg_bin_dir(args.pg_bin)
            cluster = Cluster(bin_dir, args.max_connections)
            cluster.start()
            admin_url = cluster.url("postgres")
            report["server"] = {
                "private_cluster": bin_dir.parent.name,
                "max_connections": args.max_connections,
                "fsync": "off (the private cluster's: durability is irrelevant to a benchmark)",
            }
        else:
            admin_url = args.postgres
            report["server"] = {"given": make_url(admin_url).render_as_string(hide_password=True)}
        with databases(admin_url) as urls:
            plan = Plan(
                urls=urls,
                rate=args.rate,
                processes=args.producer_processes,
                producers=args.producers,
                workers=args.workers,
                work_ms=args.work_ms,
                clients=args.clients,
                ttl=args.ttl,
                worker_ttl=WORKER_TTL_SECONDS,
            )
            before = measure_baseline(urls["old"])
            result = run(plan, args)
            after = measure_baseline(urls["old"])
    finally:
        if cluster is not None:
            cluster.stop()
    report.update(result)
    report["baseline"] = {
        "what": "same server, same run: single-row INSERT + COMMIT (psycopg, autocommit), COPY",
        "before": before,
        "after": after,
    }
    report["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    return 0 if report["lost"] == report["duplicated"] == report["executed_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
