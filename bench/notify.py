"""Events out (`[[notify]]`, issue 14): events per second delivered from a backlog, and the
latency a URL target adds to a transition, each next to a baseline measured in the same run.

**1. Delivery from a backlog.** A migration's outbox (`mfsm_events`) holds `--events` events
(copies of the events real transitions wrote: init, claims, commits), and one target at a time
receives all of them through `plugins.notify.deliver_pending`, as a command or a `serve` loop
calls it: an HTTP receiver of the benchmark's own (`http.server` in a thread, on a free port
of 127.0.0.1) with `format = "json"` and `format = "slack"`, and a command target (`sh -c
'cat >/dev/null'`: a hook that reads its stdin). The baseline of each is a plain loop doing the
same transport with the same bodies, prepared before its clock starts: one `urllib` POST per
event to the same receiver, or one `subprocess.run` of the same command with the event on its
stdin. So the ratio says what the outbox costs: reading it, encoding each event, the cursor's
writes, the retry and timeout bookkeeping. `json_cursor_per_event` is the JSON target again
with the cursor written after every event (`CURSOR_EVENTS = 1`: how delivery worked before
the cursor was written per batch), so one run shows what the batched cursor changed.

**2. Added latency per transition.** `commands.ramp` (what `migration-fsm ramp` runs, less the
process start) on a migration in `cutover` with no `[[notify]]` target, next to the same ramp
on a second migration of the same database with one URL target (the same receiver): that
command also delivers the ramp's two events (claimed, committed) before it returns. The two
take turns, one ramp each, in an order rotated by one each turn; `ramp_notify_on_cursor_per_event`
takes its turn too. `engine_ramp_notify_off` / `_on` are the same ramps through a `Migration`
kept open (no database to open per ramp: the figure `bench/transition.py` measures), the `on`
one followed by `deliver_pending` with the same journal, as the command does once it has
ramped. `..._added_ms` is the median of the turns' differences between a piece and its `off`.

Both on a temporary SQLite file and on a PostgreSQL database created for the run and dropped
at the end. Delivery runs in `--rounds` rounds, its pieces in an order rotated from round to
round; rates are medians over the rounds, ratios the median of the rounds' ratios (each
round's pieces ran side by side, so their ratio is what the machine's load disturbs least).
Wall and CPU seconds: CPU of this process (the deliverer and the receiver's thread), and of
the commands it ran (`child_cpu_seconds`), not PostgreSQL's. The machine may be shared: the
load average is reported; read the ratios. `--quick` is a smoke run (a test runs it).

    .venv/bin/python bench/notify.py [--events 500] [--rounds 5] [--transitions 60]
        [--only delivery|transition] [--quick] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

from backfill import DEFAULT_PG, pg_database
from sqlalchemy import func, insert, select, update

from migration_fsm import commands, log
from migration_fsm.config import Settings, load_settings
from migration_fsm.journal import Journal, make_engine, utcnow
from migration_fsm.journal.outbox import register_targets
from migration_fsm.journal.schema import events_table, notify_targets_table
from migration_fsm.migration import Migration
from migration_fsm.plugins import notify

#: The command target: a hook that reads the event from its stdin and does nothing with it.
COMMAND = ["sh", "-c", "cat >/dev/null"]
FORMATS = ("json", "slack", "command")


# -- the receiver ------------------------------------------------------------------------------


class Receiver:
    """An HTTP server of the benchmark's own on 127.0.0.1: it reads each POSTed body, counts
    it and answers 200 with an empty body."""

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


# -- timing ------------------------------------------------------------------------------------


def timed(run: Callable[[], None]) -> dict[str, float]:
    """`run()`: its wall seconds, this process's CPU seconds and its children's."""
    before, cpu, wall = os.times(), time.process_time(), time.perf_counter()
    run()
    wall, cpu, after = time.perf_counter() - wall, time.process_time() - cpu, os.times()
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "child_cpu_seconds": (after.children_user + after.children_system)
        - (before.children_user + before.children_system),
    }


def rate(runs: list[dict[str, float]], events: int) -> dict[str, Any]:
    """The rounds of one delivery piece: the median round's events per second, CPU per event."""
    seconds = statistics.median(r["seconds"] for r in runs)
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    child = statistics.median(r["child_cpu_seconds"] for r in runs)
    result: dict[str, Any] = {
        "events": events,
        "events_per_second": round(events / seconds, 1),
        "cpu_ms_per_event": round(cpu / events * 1000, 3),
        "seconds": [round(r["seconds"], 4) for r in runs],
        "cpu_seconds": [round(r["cpu_seconds"], 4) for r in runs],
    }
    if child:
        result["child_cpu_ms_per_event"] = round(child / events * 1000, 3)
    return result


def versus(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Our rate over the baseline's: the median of the rounds' ratios, and every round's."""
    per_round = [round(t / o, 3) for o, t in zip(ours["seconds"], theirs["seconds"], strict=True) if o]
    return {
        "ratio": round(statistics.median(per_round), 3),
        "per_round": per_round,
        "ratio_of_medians": round(ours["events_per_second"] / theirs["events_per_second"], 3),
    }


def latency(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Milliseconds per transition: median, p90 and min wall; median CPU."""
    walls = sorted(s["seconds"] * 1000 for s in samples)
    return {
        "n": len(walls),
        "median_ms": round(statistics.median(walls), 3),
        "p90_ms": round(walls[min(len(walls) - 1, int(len(walls) * 0.9))], 3),
        "min_ms": round(walls[0], 3),
        "cpu_ms_median": round(statistics.median(s["cpu_seconds"] * 1000 for s in samples), 3),
    }


@contextmanager
def cursor_per_event() -> Iterator[None]:
    """Delivery as it was before the batched cursor: the cursor written after every event."""
    with mock.patch.object(notify, "CURSOR_EVENTS", 1):
        yield


# -- the migration database --------------------------------------------------------------------


def target(name: str, receiver: Receiver, kind: str) -> dict[str, Any]:
    """A `[[notify]]` table of kind json, slack or command, with time for a whole backlog."""
    if kind == "command":
        return {"name": name, "command": COMMAND, "timeout_seconds": 600}
    return {"name": name, "url": receiver.url, "format": kind, "timeout_seconds": 600}


def settings_for(url: str, targets: list[dict[str, Any]]) -> Settings:
    return load_settings(None, database_url=url, actor="bench", notify=targets)


def in_cutover(store: Journal, url: str, name: str, ramps: int = 0) -> None:
    """Migration `name` created and taken to `cutover` (then ramped `ramps` times), with no target."""
    engine = Migration(store, settings_for(url, []), name)
    engine.init()
    engine.advance()
    engine.advance()
    for number in range(ramps):
        engine.ramp(10 + number)


class Backlog:
    """`events` events of one migration waiting for the targets `names`, whose cursors can be
    put back before the backlog (`rewind`) for each round."""

    def __init__(self, store: Journal, url: str, events: int, names: list[str]) -> None:
        self.store = store
        self.migration = f"bench-backlog-{uuid.uuid4().hex[:8]}"
        in_cutover(store, url, self.migration, ramps=3)
        e = events_table.c
        with store.transaction() as conn:
            rows = conn.execute(
                select(e.seq, e.kind, e.event).where(e.migration == self.migration).order_by(e.id)
            ).all()
            register_targets(conn, self.migration, names)  # their cursors: the newest event
            t = notify_targets_table.c
            self.start = int(
                conn.execute(select(func.min(t.cursor)).where(t.migration == self.migration)).scalar_one()
            )
            now = utcnow()
            conn.execute(
                insert(events_table),
                [
                    {
                        "migration": self.migration,
                        "seq": rows[i % len(rows)].seq,
                        "kind": rows[i % len(rows)].kind,
                        "created_at": now,
                        "event": rows[i % len(rows)].event,
                    }
                    for i in range(events)
                ],
            )
            pending = conn.execute(
                select(e.id, e.event).where(e.migration == self.migration, e.id > self.start).order_by(e.id)
            ).all()
        self.events = [{**row.event, "id": row.id} for row in pending]
        assert events == len(self.events)

    def rewind(self, name: str) -> None:
        t = notify_targets_table.c
        with self.store.transaction() as conn:
            conn.execute(
                update(notify_targets_table)
                .where(t.migration == self.migration, t.target == name)
                .values(cursor=self.start)
            )


# -- 1. delivery from a backlog ----------------------------------------------------------------


def delivery_pieces(
    store: Journal, url: str, receiver: Receiver, events: int
) -> dict[str, Callable[[], None]]:
    """Each piece delivers the whole backlog once; a piece checks that every event arrived."""
    names = {kind: f"bench-{kind}" for kind in FORMATS}
    backlog = Backlog(store, url, events, list(names.values()))
    settings = {kind: settings_for(url, [target(names[kind], receiver, kind)]) for kind in FORMATS}

    def ours(kind: str, per_event: bool = False) -> Callable[[], None]:
        def run() -> None:
            backlog.rewind(names[kind])
            seen = receiver.count
            if per_event:
                with cursor_per_event():
                    report = notify.deliver_pending(settings[kind], backlog.migration, journal=store)
            else:
                report = notify.deliver_pending(settings[kind], backlog.migration, journal=store)
            assert report.targets[0].error is None, report.targets[0].error
            assert events == report.delivered
            assert kind == "command" or events == receiver.count - seen

        return run

    def posts(kind: str) -> Callable[[], None]:
        chosen = settings[kind].notify[0]
        bodies = [notify.body(chosen, event) for event in backlog.events]

        def run() -> None:
            seen = receiver.count
            for data in bodies:
                request = urllib.request.Request(  # noqa: S310 - our own http:// receiver
                    receiver.url,
                    data=data,
                    headers={"Content-Type": "application/json", "User-Agent": "migration-fsm"},
                    method="POST",
                )
                with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - as above
                    response.read(65536)
            assert events == receiver.count - seen

        return run

    def commands_run() -> None:
        for event in backlog.events:
            data = json.dumps(event, sort_keys=True).encode("utf-8")
            subprocess.run(COMMAND, input=data, capture_output=True, check=True, timeout=30)

    return {
        "json": ours("json"),
        "json_baseline": posts("json"),
        "slack": ours("slack"),
        "slack_baseline": posts("slack"),
        "command": ours("command"),
        "command_baseline": commands_run,
        "json_cursor_per_event": ours("json", per_event=True),
    }


def measure_delivery(
    store: Journal, url: str, receiver: Receiver, events: int, rounds: int
) -> dict[str, Any]:
    pieces = delivery_pieces(store, url, receiver, events)
    names = list(pieces)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for number in range(rounds):
        print(f"notify: delivery, {store.dialect}, round {number + 1}/{rounds}", file=sys.stderr, flush=True)
        turn = number % len(names)
        for name in names[turn:] + names[:turn]:
            runs[name].append(timed(pieces[name]))
    rates = {name: rate(runs[name], events) for name in names}
    result: dict[str, Any] = {}
    for kind in FORMATS:
        result[kind] = {
            "ours": rates[kind],
            "baseline": rates[f"{kind}_baseline"],
            "vs_baseline": versus(rates[kind], rates[f"{kind}_baseline"]),
        }
    result["json_cursor_per_event"] = {
        "ours": rates["json_cursor_per_event"],
        "vs_baseline": versus(rates["json_cursor_per_event"], rates["json_baseline"]),
        "batched_over_per_event": versus(rates["json"], rates["json_cursor_per_event"]),
    }
    return result


# -- 2. added latency per transition -----------------------------------------------------------


def measure_transition(store: Journal, url: str, receiver: Receiver, transitions: int) -> dict[str, Any]:
    """Interleaved ramps on two migrations in `cutover`, one with no target and one with a URL
    target: through `commands.ramp` (the command's path: it opens the database, registers the
    target, ramps, delivers), and through a `Migration` kept open (the ramp, then
    `deliver_pending` with the same journal, as the command does once it has ramped)."""
    quiet, told = f"bench-off-{uuid.uuid4().hex[:8]}", f"bench-on-{uuid.uuid4().hex[:8]}"
    in_cutover(store, url, quiet)
    in_cutover(store, url, told)
    off = settings_for(url, [])
    on = settings_for(url, [{"name": "bench-latency", "url": receiver.url, "timeout_seconds": 5}])
    commands.ramp(on, told, 1)  # registers the target; not timed
    engines = {"off": Migration(store, off, quiet), "on": Migration(store, on, told)}
    percents = {"off": 1, "on": 1}

    def ramp(kind: str, *, command: bool) -> None:
        percents[kind] = percents[kind] % 99 + 1
        seen = receiver.count
        if command:
            settings, name = (off, quiet) if kind == "off" else (on, told)
            result = commands.ramp(settings, name, percents[kind])
        else:
            result = engines[kind].ramp(percents[kind])
            if kind == "on":
                notify.deliver_pending(on, told, journal=store)
        assert "committed" == result.status
        assert kind == "off" or 2 == receiver.count - seen  # claimed, committed

    def ramp_per_event() -> None:
        with cursor_per_event():
            ramp("on", command=True)

    pieces: dict[str, Callable[[], None]] = {
        "ramp_notify_off": lambda: ramp("off", command=True),
        "ramp_notify_on": lambda: ramp("on", command=True),
        "ramp_notify_on_cursor_per_event": ramp_per_event,
        "engine_ramp_notify_off": lambda: ramp("off", command=False),
        "engine_ramp_notify_on": lambda: ramp("on", command=False),
    }
    names = list(pieces)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    print(f"notify: transitions, {store.dialect}", file=sys.stderr, flush=True)
    for number in range(transitions):
        turn = number % len(names)
        for name in names[turn:] + names[:turn]:
            samples[name].append(timed(pieces[name]))
    result: dict[str, Any] = {name: latency(samples[name]) for name in names}
    for name, base in (
        ("ramp_notify_on", "ramp_notify_off"),
        ("ramp_notify_on_cursor_per_event", "ramp_notify_off"),
        ("engine_ramp_notify_on", "engine_ramp_notify_off"),
    ):
        pairs = [
            (o["seconds"] - f["seconds"]) * 1000 for o, f in zip(samples[name], samples[base], strict=True)
        ]
        result[f"{name}_added_ms"] = round(statistics.median(pairs), 3)
        result[f"{name}_over_off"] = round(
            result[name]["median_ms"] / max(result[base]["median_ms"], 1e-9), 3
        )
    return result


# -- the run -----------------------------------------------------------------------------------


def measure(url: str, receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    store = Journal(url, engine=make_engine(url, create=True))
    try:
        store.upgrade()
        result: dict[str, Any] = {}
        if args.only in (None, "delivery"):
            result["delivery"] = measure_delivery(store, url, receiver, args.events, args.rounds)
        if args.only in (None, "transition"):
            result["transition"] = measure_transition(store, url, receiver, args.transitions)
        return result
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=500, help="events in the backlog")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the delivery pieces")
    parser.add_argument("--transitions", type=int, default=60, help="ramps per piece of the latency")
    parser.add_argument("--only", choices=("delivery", "transition"), help="run one part only")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    parser.add_argument("--postgres", default=os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG))
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds, args.transitions = 20, 1, 3
    # A SIGTERM unwinds like an exception, so the database and the files go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log.configure(json=True, level=logging.WARNING)  # measure delivery, not a log renderer
    report: dict[str, Any] = {
        "benchmark": "notify",
        "events": args.events,
        "rounds": args.rounds,
        "transitions": args.transitions,
        "cursor_events": notify.CURSOR_EVENTS,
        "cursor_seconds": notify.CURSOR_SECONDS,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
    }
    receiver = Receiver()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report["sqlite"] = measure(f"sqlite:///{Path(tmp) / 'notify.db'}", receiver, args)
        with pg_database(args.postgres) as url:
            report["postgresql"] = measure(url, receiver, args)
    finally:
        receiver.close()
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
