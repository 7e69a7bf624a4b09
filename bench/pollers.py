"""What many `PhaseClient`s cost a PostgreSQL server, and how fast a transition reaches them.

Starts a PRIVATE PostgreSQL cluster (initdb + pg_ctl, as the `postgres` OS user when run
as root, in a temporary directory, on a free port, max_connections=300, fsync=off: this is a
benchmark, durability is irrelevant), because the shared server allows only 100 connections.
The cluster is stopped and deleted at the end, also on error or SIGTERM (not on SIGKILL).

In one process, `--clients` PhaseClients (ttl `--ttl`) follow one migration. Prints one
JSON object:

- steady: queries per second during a `--seconds` window with no change, server-side
  (pg_stat_statements calls of the client's query; pg_stat_database xact_commit as a
  cross-check) and client-side (counters()["refreshes"]), against <= 1 per client per ttl;
- propagation: time from a committed `Migration.advance` (and the `rollback` after it) until
  every client's snapshot().version shows it, `--rounds` times, against 500 ms, watched by
  a thread sweeping the snapshots every 0.5 ms; the reference is when the engine sent the
  COMMIT carrying the NOTIFY (SQLAlchemy "commit" event) and, conservatively, the call;
- herd: extra client queries the server saw from just before a change to 1 s after it,
  over the steady rate (up to one per client expected: a NOTIFY wakes one read of the row in
  each client, its payload is never applied), and the clients
  that queried more than once per ttl in it. The window lasts ttl x ceil(1 s / ttl) (1 s at
  ttl 1), a whole number of ttls, so each client polls a fixed number of times in it; the
  same figures for such windows of the steady phase, where nothing changed, give the noise;
- baseline, same run: a bare psycopg connection LISTENing on the same channel, receiving
  the same NOTIFYs, in a thread of this process (same GIL as the clients) and in a child
  process (the floor: server and socket only).

    .venv/bin/python bench/pollers.py [--clients N] [--seconds S] [--rounds N] [--ttl S]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import logging
import math
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from sqlalchemy import event

from migration_fsm import log
from migration_fsm.client import PhaseClient
from migration_fsm.config import load_settings
from migration_fsm.journal import NOTIFY_CHANNEL, Journal, make_engine
from migration_fsm.migration import Migration

GOAL_PROPAGATION_MS = 500
GOAL_QUERIES_PER_CLIENT_PER_TTL = 1.0
DATABASE = "mfsm_bench"
CLIENT_APP = "migration-fsm client"  # the application_name PhaseClient connects with
POLL_QUERY = "SELECT phase, percent, version FROM mfsm_migrations WHERE name = %"  # a LIKE pattern
STATS_SQL = """
SELECT
  coalesce(sum(calls) FILTER (WHERE query LIKE %(poll)s), 0)::bigint,
  coalesce(sum(calls) FILTER (WHERE query ILIKE 'LISTEN%%'), 0)::bigint,
  coalesce(sum(calls) FILTER (
    WHERE query NOT LIKE %(poll)s AND query NOT ILIKE 'LISTEN%%' AND query NOT LIKE '%%pg_stat%%'
  ), 0)::bigint
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
DB_SQL = """
SELECT xact_commit, sessions,
  (SELECT count(*) FROM pg_stat_activity WHERE application_name = %s)
FROM pg_stat_database WHERE datname = current_database()
"""


# -- the private cluster -----------------------------------------------------------------


def pg_bin_dir(requested: str | None) -> Path:
    if requested:
        return Path(requested)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise SystemExit("no PostgreSQL binaries under /usr/lib/postgresql/*/bin (use --pg-bin)")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """A throw-away PostgreSQL cluster owned by the `postgres` OS user (when we are root)."""

    def __init__(self, bin_dir: Path, max_connections: int) -> None:
        self.bin_dir = bin_dir
        self.max_connections = max_connections
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        self.tmp = Path(tempfile.mkdtemp(prefix="mfsm-pollers-"))
        if self.as_root:
            try:
                owner = pwd.getpwnam("postgres")
                os.chown(self.tmp, owner.pw_uid, owner.pw_gid)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        self.data = self.tmp / "data"
        self.logfile = self.tmp / "server.log"
        self.started = False
        self.stat_statements = False

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        done = subprocess.run(
            [*prefix, *argv], cwd=self.tmp, capture_output=True, text=True, check=False, timeout=120
        )
        if check and done.returncode != 0:
            tail = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr}{tail}")
        return done

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pkglib = self._run(str(self.bin_dir / "pg_config"), "--pkglibdir", check=False).stdout.strip()
        self.stat_statements = bool(pkglib) and Path(pkglib, "pg_stat_statements.so").exists()
        settings = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.tmp}'",
            f"max_connections = {self.max_connections}",
            "fsync = off",
            "full_page_writes = off",
        ]
        if self.stat_statements:
            settings += ["shared_preload_libraries = 'pg_stat_statements'", "pg_stat_statements.max = 1000"]
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# bench/pollers.py\n" + "\n".join(settings) + "\n")
        self.started = True  # from here on, stop() has something to stop
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "start")

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL of its postmaster) and delete it."""
        try:
            if self.started:
                pg_ctl = str(self.bin_dir / "pg_ctl")
                stopped = self._run(pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
                if stopped.returncode != 0:
                    self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
                pidfile = self.data / "postmaster.pid"
                if pidfile.exists():  # still running: end our own postmaster, by its pid
                    with contextlib.suppress(ValueError, OSError):
                        os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


# -- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    at: float
    poll_calls: int | None  # pg_stat_statements: the client's query
    listen_calls: int | None  # pg_stat_statements: LISTEN (one per client connection)
    other_calls: int | None  # pg_stat_statements: everything else but our own stats queries
    xact_commit: int
    sessions: int
    client_connections: int
    refreshes: int
    refresh_errors: int
    notifications: int
    per_client_refreshes: tuple[int, ...]


class Monitor:
    """Server-side counters (one autocommit connection) plus the clients' own counters."""

    def __init__(self, conninfo: str, clients: list[PhaseClient], stat_statements: bool) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True, application_name="bench monitor")
        self.clients = clients
        self.stat_statements = stat_statements

    def read(self) -> Reading:
        at = time.perf_counter()
        poll = listen = other = None
        if self.stat_statements:
            row = self.conn.execute(STATS_SQL, {"poll": POLL_QUERY}).fetchone()
            assert row is not None
            poll, listen, other = int(row[0]), int(row[1]), int(row[2])
        db = self.conn.execute(DB_SQL, (CLIENT_APP,)).fetchone()
        assert db is not None
        totals = {"refreshes": 0, "refresh_errors": 0, "notifications": 0}
        per_client = []
        for client in self.clients:
            counters = client.counters()
            per_client.append(int(counters["refreshes"]))
            for name in totals:
                totals[name] += int(counters[name])
        return Reading(
            at,
            poll,
            listen,
            other,
            int(db[0]),
            int(db[1] or 0),
            int(db[2]),
            totals["refreshes"],
            totals["refresh_errors"],
            totals["notifications"],
            tuple(per_client),
        )

    def close(self) -> None:
        self.conn.close()


class Listener:
    """The baseline: a bare psycopg LISTEN connection noting when each version arrives."""

    def __init__(self, conninfo: str, migration: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True, application_name="bench listener")
        self.conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self.migration = migration
        self.received: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for note in self.conn.notifies(timeout=0.25):
                at = time.perf_counter()
                data = json.loads(note.payload)
                if data.get("migration") == self.migration:
                    self.received.setdefault(int(data["version"]), at)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.conn.close()


LISTENER_SCRIPT = """
import json, sys, time
import psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True, application_name="bench listener process")
conn.execute("LISTEN " + sys.argv[2])
print("ready", flush=True)
for note in conn.notifies():
    print(json.dumps({"at": time.perf_counter(), "payload": note.payload}), flush=True)
"""


class ProcessListener:
    """The same baseline in a child process, free of this process's GIL: it reports
    time.perf_counter() at receipt (CLOCK_MONOTONIC on Linux: comparable across processes)."""

    def __init__(self, conninfo: str, migration: str) -> None:
        self.migration = migration
        self.received: dict[int, float] = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LISTENER_SCRIPT, conninfo, NOTIFY_CHANNEL],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self._stdout = self.proc.stdout
        if self._stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the listener process did not start")
        self._thread = threading.Thread(target=self._run, name="bench-listener-process", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for line in self._stdout:
            message = json.loads(line)
            data = json.loads(message["payload"])
            if data.get("migration") == self.migration:
                self.received.setdefault(int(data["version"]), float(message["at"]))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._stdout.close()


def ms_summary(seconds: list[float]) -> dict[str, float | int]:
    ordered = sorted(seconds)
    return {
        "n": len(ordered),
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "min_ms": round(ordered[0] * 1000, 2),
    }


def diff(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def wait_for_version(clients: list[PhaseClient], version: int, timeout: float) -> list[float]:
    """When each client was first seen at `version` (perf_counter; nan: never within `timeout`)."""
    seen = [math.nan] * len(clients)
    pending = list(range(len(clients)))
    deadline = time.perf_counter() + timeout
    while pending and time.perf_counter() < deadline:
        still = [i for i in pending if clients[i].snapshot().version < version]
        now = time.perf_counter()  # after the sweep: an upper bound for those just seen
        for i in set(pending) - set(still):
            seen[i] = now
        pending = still
        if pending:
            time.sleep(0.0005)
    return seen


def measure_change(
    engine: Migration,
    kind: str,
    clients: list[PhaseClient],
    *,
    listener: Listener,
    remote: ProcessListener,
    monitor: Monitor,
    commits: list[float],
    steady: tuple[float | None, float],
    window: float,
    ttl: float,
) -> dict[str, Any]:
    """One change: who saw it when, the bare listener, and the queries in the second after it."""
    steady_poll_rate, steady_refresh_rate = steady
    version = clients[0].snapshot().version + 1  # every committed transition adds one
    seen: list[float] = []
    watcher = threading.Thread(target=lambda: seen.extend(wait_for_version(clients, version, 10.0)))
    before = monitor.read()
    watcher.start()
    called = time.perf_counter()
    outcome = engine.advance() if kind == "advance" else engine.rollback(reason="bench")[-1]
    returned = time.perf_counter()
    watcher.join()
    assert outcome.state is not None
    assert outcome.state.version == version, outcome
    # The COMMIT that sends the NOTIFY is the last one the engine issued during the call.
    committed = max(at for at in commits if called <= at <= returned)
    time.sleep(max(0.0, before.at + window - time.perf_counter()))  # the herd window
    after = monitor.read()
    missing = sum(1 for at in seen if math.isnan(at))
    last = max((at for at in seen if not math.isnan(at)), default=math.nan)
    heard = listener.received.get(version, math.nan)
    heard_remote = remote.received.get(version, math.nan)
    window = after.at - before.at
    polls_per_window = round(window / ttl)
    poll = diff(after.poll_calls, before.poll_calls)

    def ms(seconds: float) -> float:
        return round(seconds * 1000, 2)

    return {
        "kind": kind,
        "version": version,
        "engine_call_ms": ms(returned - called),
        "commit_to_return_ms": ms(returned - committed),
        "clients_missing_after_10s": missing,
        "all_clients_after_commit_ms": ms(last - committed),
        "all_clients_after_call_ms": ms(last - called),
        "median_client_after_commit_ms": ms(statistics.median(seen) - committed),
        "baseline_listener_after_commit_ms": ms(heard - committed),
        "all_clients_after_baseline_ms": ms(last - heard),
        "baseline_process_listener_after_commit_ms": ms(heard_remote - committed),
        "herd_window_s": round(window, 3),
        "server_poll_queries_in_window": poll,
        "server_extra_poll_queries": None
        if poll is None or steady_poll_rate is None
        else round(poll - steady_poll_rate * window, 1),
        "server_listen_in_window": diff(after.listen_calls, before.listen_calls),  # > 0: reconnects
        "client_refreshes_in_window": after.refreshes - before.refreshes,
        "clients_over_one_query_per_ttl": over_budget(before, after, polls_per_window),
        "client_extra_refreshes": round(after.refreshes - before.refreshes - steady_refresh_rate * window, 1),
        "client_notifications_in_window": after.notifications - before.notifications,
        "client_refresh_errors_in_window": after.refresh_errors - before.refresh_errors,
    }


def close_clients(clients: list[PhaseClient], sequential: int) -> dict[str, Any]:
    """Close the first `sequential` clients one by one (timed), the rest in parallel."""
    each: list[float] = []
    for client in clients[:sequential]:
        started = time.perf_counter()
        client.close()
        each.append(time.perf_counter() - started)
    started = time.perf_counter()
    rest = clients[sequential:]
    if rest:
        with ThreadPoolExecutor(max_workers=min(64, len(rest))) as pool:
            list(pool.map(lambda c: c.close(), rest))
    return {
        "sequential_close": ms_summary(each) if each else None,
        "parallel_close_of_rest_ms": round((time.perf_counter() - started) * 1000, 1),
        "closed_in_parallel": len(rest),
    }


def over_budget(before: Reading, after: Reading, allowed: int) -> int:
    """How many clients refreshed more than `allowed` times between two readings."""
    pairs = zip(before.per_client_refreshes, after.per_client_refreshes, strict=True)
    return sum(1 for a, b in pairs if b - a > allowed)


def herd_window(ttl: float) -> float:
    """A whole number of ttls, at least 1 s."""
    return ttl * math.ceil(1.0 / ttl - 1e-9)


def measure_steady(monitor: Monitor, args: argparse.Namespace) -> tuple[dict[str, Any], float | None, float]:
    """Queries per second while nothing changes; with the poll and refresh rates per second."""
    piece = herd_window(args.ttl)
    readings = [monitor.read()]
    for step in range(1, max(1, round(args.seconds / piece)) + 1):  # back to back herd-sized windows
        time.sleep(max(0.0, readings[0].at + step * piece - time.perf_counter()))
        readings.append(monitor.read())
    first, last = readings[0], readings[-1]
    per_client = [b - a for a, b in zip(first.per_client_refreshes, last.per_client_refreshes, strict=True)]
    window = last.at - first.at
    poll = diff(last.poll_calls, first.poll_calls)
    poll_rate = None if poll is None else poll / window
    noise = [
        (b.poll_calls - a.poll_calls) - (poll_rate or 0.0) * (b.at - a.at)
        for a, b in itertools.pairwise(readings)
        if a.poll_calls is not None and b.poll_calls is not None
    ]
    allowed = round(piece / args.ttl)
    over = [over_budget(a, b, allowed) for a, b in itertools.pairwise(readings)]
    refresh_rate = (last.refreshes - first.refreshes) / window
    budget = args.clients / args.ttl
    own = 2 * (len(readings) - 1)  # the monitor's own statements, one transaction each
    xact_rate = (last.xact_commit - first.xact_commit - own) / window
    main_rate = poll_rate if poll_rate is not None else xact_rate
    steady = {
        "window_s": round(window, 2),
        "server_poll_queries_per_s": None if poll_rate is None else round(poll_rate, 1),
        "server_other_statements": diff(last.other_calls, first.other_calls),
        "server_listen_statements": diff(last.listen_calls, first.listen_calls),
        "server_xact_commit_per_s": round(xact_rate, 1),
        "server_xact_commit_note": "each backend flushes its counters at most once a second: +-1 s",
        "server_new_sessions": last.sessions - first.sessions,
        "server_client_connections": last.client_connections,
        "client_refreshes_per_s": round(refresh_rate, 1),
        "client_refresh_errors": last.refresh_errors - first.refresh_errors,
        "client_refreshes_in_window_per_client_min_max": [min(per_client), max(per_client)],
        "no_change_windows": len(readings) - 1,
        "no_change_window_s": round(piece, 3),
        "no_change_windows_extra_poll_queries_min_max": [round(min(noise), 1), round(max(noise), 1)]
        if noise
        else None,
        "no_change_windows_clients_over_one_query_per_ttl_max": max(over),
        "budget_queries_per_s": round(budget, 1),
        "queries_per_client_per_ttl": round(main_rate / budget, 3),
    }
    return steady, poll_rate, refresh_rate


def run(cluster: Cluster, args: argparse.Namespace, report: dict[str, Any]) -> None:
    admin_info = cluster.url("postgres", driver="postgresql")
    with psycopg.connect(admin_info, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{DATABASE}"')
    conninfo = cluster.url(DATABASE, driver="postgresql")
    url = cluster.url(DATABASE)
    if cluster.stat_statements:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    name = f"bench-{uuid.uuid4().hex[:8]}"
    store = Journal(url, engine=make_engine(url, create=True))
    commits: list[float] = []  # when the engine's COMMITs were sent (SQLAlchemy "commit" event)
    event.listen(store.engine, "commit", lambda _conn: commits.append(time.perf_counter()))
    clients: list[PhaseClient] = []
    with contextlib.ExitStack() as stack:
        stack.callback(store.close)
        store.upgrade()
        engine = Migration(store, load_settings(None, database_url=url, actor="bench"), name)
        engine.init()
        listener = Listener(conninfo, name)
        stack.callback(listener.close)
        remote = ProcessListener(conninfo, name)
        stack.callback(remote.close)

        closed: dict[str, Any] = {}

        def close_all() -> None:
            closed.update(close_clients(clients, min(args.sequential_close, len(clients))))

        stack.callback(close_all)
        started = time.perf_counter()
        for _ in range(args.clients):
            clients.append(PhaseClient(url, name, ttl=args.ttl))
        report["clients_start_s"] = round(time.perf_counter() - started, 2)
        monitor = Monitor(conninfo, clients, cluster.stat_statements)
        stack.callback(monitor.close)
        bad = [c.snapshot() for c in clients if c.snapshot().stale or c.snapshot().version != 1]
        if bad:
            raise SystemExit(f"{len(bad)} clients did not read the migration: {bad[0]}")
        time.sleep(args.warmup)

        # (a) steady state: no change, every client polls once per ttl.
        report["steady"], poll_rate, refresh_rate = measure_steady(monitor, args)

        # (b), (c), (d): each change, its propagation, the herd after it, the bare listener.
        changes = []
        for _ in range(args.rounds):
            for kind in ("advance", "rollback"):
                changes.append(
                    measure_change(
                        engine,
                        kind,
                        clients,
                        listener=listener,
                        remote=remote,
                        monitor=monitor,
                        commits=commits,
                        steady=(poll_rate, refresh_rate),
                        window=herd_window(args.ttl),
                        ttl=args.ttl,
                    )
                )
        report["changes"] = changes
        final = monitor.read()
        report["client_connections_before_close"] = final.client_connections
    report["close"] = closed
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(DB_SQL, (CLIENT_APP,)).fetchone()
        assert row is not None
        report["client_connections_after_close"] = int(row[2])
    report["client_threads_alive_after_close"] = sum(
        1 for t in threading.enumerate() if t.name.startswith("migration-fsm-client-")
    )
    summarise(changes, report)


def summarise(changes: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Propagation, herd and goals over every measured change."""

    def pick(field: str, kind: str | None = None) -> list[float]:
        return [c[field] / 1000 for c in changes if kind is None or c["kind"] == kind]

    advance_all = pick("all_clients_after_commit_ms", "advance")
    report["propagation"] = {
        "reference": "commit = when the engine sent the COMMIT that carries the NOTIFY",
        "advance_all_clients_after_commit": ms_summary(advance_all),
        "advance_all_clients_after_call": ms_summary(pick("all_clients_after_call_ms", "advance")),
        "rollback_all_clients_after_commit": ms_summary(pick("all_clients_after_commit_ms", "rollback")),
        "every_change_median_client_after_commit": ms_summary(pick("median_client_after_commit_ms")),
        "baseline_bare_listen_after_commit": ms_summary(pick("baseline_listener_after_commit_ms")),
        "every_change_all_clients_after_baseline": ms_summary(pick("all_clients_after_baseline_ms")),
        "baseline_bare_listen_other_process_after_commit": ms_summary(
            pick("baseline_process_listener_after_commit_ms")
        ),
        "clients_missing": sum(c["clients_missing_after_10s"] for c in changes),
    }
    extras = [c["server_extra_poll_queries"] for c in changes if c["server_extra_poll_queries"] is not None]
    report["herd"] = {
        "window": "from just before the change, ttl x ceil(1 s / ttl) long;"
        " extra = queries - steady rate x window",
        "server_extra_poll_queries_median": None if not extras else round(statistics.median(extras), 1),
        "server_extra_poll_queries_max": None if not extras else max(extras),
        "client_extra_refreshes_median": round(
            statistics.median(c["client_extra_refreshes"] for c in changes), 1
        ),
        "noise_no_change_windows_min_max": report["steady"]["no_change_windows_extra_poll_queries_min_max"],
        "clients_over_one_query_per_ttl_max": max(c["clients_over_one_query_per_ttl"] for c in changes),
        "server_listen_statements": sum(c["server_listen_in_window"] or 0 for c in changes),
        "client_notifications_per_change": sorted({c["client_notifications_in_window"] for c in changes}),
    }
    report["goal"] = {
        "queries_per_client_per_ttl_at_most": GOAL_QUERIES_PER_CLIENT_PER_TTL,
        "queries_met": report["steady"]["queries_per_client_per_ttl"] <= GOAL_QUERIES_PER_CLIENT_PER_TTL,
        "propagation_max_ms_under": GOAL_PROPAGATION_MS,
        "propagation_met": report["propagation"]["clients_missing"] == 0
        and max(advance_all) * 1000 < GOAL_PROPAGATION_MS,
        "herd_extra_queries_about": "up to one per client (the read a NOTIFY wakes)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="PhaseClients (threads in this process)")
    parser.add_argument("--seconds", type=float, default=10.0, help="the steady-state window")
    parser.add_argument("--rounds", type=int, default=5, help="advance + rollback pairs measured")
    parser.add_argument("--ttl", type=float, default=1.0, help="the clients' refresh interval")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--sequential-close", type=int, default=10, help="clients closed one by one")
    parser.add_argument("--max-connections", type=int, default=300)
    parser.add_argument("--pg-bin", default=None, help="PostgreSQL bin directory (default: newest)")
    args = parser.parse_args()
    if args.clients + 20 > args.max_connections:
        parser.error("--max-connections must leave room for the clients plus ~20 others")
    # Library callers choose their own logging; measure the clients, not a log renderer.
    log.configure(json=True, level=logging.WARNING)

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # so the cluster is stopped by the `finally` below

    signal.signal(signal.SIGTERM, terminate)
    bin_dir = pg_bin_dir(args.pg_bin)
    cluster = Cluster(bin_dir, args.max_connections)
    report: dict[str, Any] = {
        "benchmark": "pollers",
        "clients": args.clients,
        "ttl_s": args.ttl,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "server": {
            "private_cluster": str(bin_dir.parent.name),
            "max_connections": args.max_connections,
            "fsync": "off (benchmark only: durability is irrelevant here; it makes commits cheaper)",
            "full_page_writes": "off",
        },
    }
    started = time.perf_counter()
    try:
        cluster.start()
        report["server"]["pg_stat_statements"] = cluster.stat_statements
        run(cluster, args, report)
    finally:
        cluster.stop()
    report["cluster_removed"] = not cluster.tmp.exists()
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
