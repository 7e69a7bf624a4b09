"""The walk every "move onto Procrastinate" test runs (issue 13), and what each checks after it.

`walk_the_move` runs, with the old system's workers and two Procrastinate worker processes
already started: traffic through `DualWriter` that re-sends 5% of its tasks, preparation ->
dual_write (then `hooks.in_dual_write`), backfill, validate, cutover, ramp 100; a Procrastinate
worker SIGKILLed while it holds a task before its effect (`test_exactly_once` says why there);
a replacement; rollback (its pause names the dead worker gone, `drain_new` hands its job over to
the old side); cutover again, ramp 100 (then `hooks.in_cutover`), cleanup (then
`hooks.in_cleanup`); the traffic stops, every task runs, reconcile, complete. The default edge
table only: no step is configured.

`assert_exactly_once` then counts from the tasks' own side effects (lost 0, executed twice 0,
nothing else ran), and checks the ledger, `validate`, `verify`, the rollback's pause and that no
task ran on a side outside the time that side consumed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime

from migration_fsm import commands
from migration_fsm.client import DualWriter, PhaseClient
from migration_fsm.config import Settings
from migration_fsm.demo.run import OperatorWalk, Report
from migration_fsm.demo.systems import ExecutionLog
from migration_fsm.demo.worker import as_task_database
from migration_fsm.fsm import Phase
from migration_fsm.journal.ledger import Ledger
from migration_fsm.tasks.capabilities import Closeable
from migration_fsm.tasks.factory import build_store
from tests.system.test_exactly_once import (
    RESEND_SHARE,
    WAIT,
    ResendingProducer,
    Workers,
    consuming_windows,
    execution_rows,
    executions_by_key,
    wait_for,
)

MIGRATION = "prove"
#: The migration databases the moves onto Procrastinate (from a SQL table, Huey, RQ and Celery)
#: run on. `make test` runs them on SQLite only, to stay near ten minutes: what they add is the
#: old system and Procrastinate (always PostgreSQL), whose adapters do not depend on the
#: migration database, and `test_exactly_once` walks the same gates, ledger and journal with a
#: SIGKILL and a rollback on both databases. `MIGRATION_FSM_TEST_MOVES=all` adds PostgreSQL
#: (about 3 minutes more).
OLD_SYSTEM_MOVE_DATABASES: list[str] = (
    ["sqlite", "postgresql"] if os.environ.get("MIGRATION_FSM_TEST_MOVES") == "all" else ["sqlite"]
)
#: Tasks scheduled per second, and the most the producer schedules.
RATE = 30.0
LIMIT = 5000


@dataclass
class Hooks:
    """What a test adds to the walk: tasks enqueued by code that knows nothing of the migration
    (their keys), at three moments; `in_cleanup` gets the `DualWriter` too."""

    in_dual_write: Callable[[], list[str]] = list
    in_cutover: Callable[[], list[str]] = list
    in_cleanup: Callable[[DualWriter], list[str]] = lambda _writer: []


@dataclass
class MoveRun:
    """What the walk did: the keys that must each run once, the held (killed) tasks, figures."""

    scheduled: set[str]
    held: list[str]
    backfilled: int
    producer_errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def prepare(settings: Settings, log_url: str) -> None:
    """The migration database, the migration, and the `ExecutionLog`'s table."""
    commands.db_upgrade(settings)
    commands.init(settings, MIGRATION)
    ExecutionLog(as_task_database(log_url)).close()


def walk_the_move(
    settings: Settings,
    log_url: str,
    workers: Workers,
    *,
    start_new: Callable[[str], object],
    hooks: Hooks,
    label: str,
) -> MoveRun:
    """The walk (see the module's docstring); `workers.started` holds the running workers,
    the victim being the one named `new-2` (started with a hold file); `start_new(name)`
    starts a replacement Procrastinate worker."""
    [victim] = [w for w in workers.started if w.name == "new-2"]
    started = time.monotonic()
    client = PhaseClient(settings.database_url, migration=MIGRATION, ttl=0.05)
    old_store = build_store(settings.stores["old"], "old")
    new_store = build_store(settings.stores["new"], "new")
    writer = DualWriter(client, old_store, new_store)
    producer = ResendingProducer(writer, RATE, LIMIT, RESEND_SHARE)

    def seen(version: int) -> None:
        wait_for(lambda: client.snapshot().version >= version, f"the producer to see version {version}")

    walk = OperatorWalk(
        settings, MIGRATION, Report(), soak=time.sleep, seen=seen, say=lambda _: None, label=label
    )
    outsiders: list[str] = []
    try:
        producer.start()
        time.sleep(1.5)
        walk.step("advance: preparation -> dual_write", lambda: commands.advance(settings, MIGRATION))
        outsiders += hooks.in_dual_write()
        time.sleep(1.0)
        backfilled = commands.backfill(settings, MIGRATION).copied
        walk.check("before cutover")
        walk.step("advance: dual_write -> cutover", lambda: commands.advance(settings, MIGRATION))
        walk.step("ramp 100%", lambda: commands.ramp(settings, MIGRATION, 100))
        time.sleep(1.0)

        assert victim.hold_file is not None
        victim.hold_file.touch()
        marker = victim.hold_file.with_name(victim.hold_file.name + ".held")
        wait_for(marker.exists, "the victim worker to hold a task before its effect")
        os.kill(victim.proc.pid, signal.SIGKILL)
        assert -signal.SIGKILL == victim.proc.wait(timeout=WAIT)
        held = marker.read_text(encoding="utf-8").split()
        for key in held:  # claimed in the ledger, its effect never began
            assert key not in executions_by_key(log_url)
        start_new("new-3")
        time.sleep(0.5)
        walk.step(
            "rollback: cutover -> dual_write",
            lambda: commands.rollback(settings, MIGRATION, reason="prove: a Procrastinate worker died"),
        )
        time.sleep(1.0)
        walk.check("before the second cutover")
        walk.step("advance: dual_write -> cutover again", lambda: commands.advance(settings, MIGRATION))
        walk.step("ramp 100% again", lambda: commands.ramp(settings, MIGRATION, 100))
        outsiders += hooks.in_cutover()
        time.sleep(1.0)
        walk.check("before cleanup")
        walk.step("advance: cutover -> cleanup (retire_old)", lambda: commands.advance(settings, MIGRATION))
        outsiders += hooks.in_cleanup(writer)
        time.sleep(1.0)
        producer.stop()
        wanted = {*producer.scheduled, *outsiders}
        try:
            wait_for(lambda: wanted <= set(executions_by_key(log_url)), "every task to run")
        except BaseException:
            missing = sorted(wanted - set(executions_by_key(log_url)))
            with Ledger.open(settings.ledger_database_url) as ledger:
                claims = ledger.claims_of(MIGRATION, missing[:20])
            print("MISSING", len(missing))
            for key in missing[:20]:
                print(key, old_store.get(key), new_store.get(key), claims.get(key))
            for worker in workers.started:
                print(worker.name, worker.stderr()[-3000:])
            raise
        commands.reconcile(settings, MIGRATION)
        walk.step("advance: cleanup -> complete", lambda: commands.advance(settings, MIGRATION))
    finally:
        producer.stop()
        writer.close()
        client.close()
        for store in (old_store, new_store):
            if isinstance(store, Closeable):
                store.close()
    workers.stop_all()
    return MoveRun({*producer.scheduled, *outsiders}, held, backfilled, list(producer.errors), started)


def assert_exactly_once(
    settings: Settings, log_url: str, run: MoveRun, *, retried: Collection[str] = ()
) -> dict[str, int]:
    """Lost 0, executed twice 0 and nothing else ran, from the tasks' own side effects; the
    held tasks ran once (on the side that had them when a worker reached them); the ledger,
    `validate`, `verify`, the rollback's pause and the consuming windows agree. `retried` tasks
    fail on purpose and are retried by their own system: each may run again, on the side that
    ran it first (a retry the ledger allows). Returns the executions by side."""
    executions = executions_by_key(log_url)
    lost = sorted(run.scheduled - set(executions))
    twice = {
        key: sides
        for key, sides in executions.items()
        if len(sides) > 1 and not (key in retried and len(set(sides)) == 1)
    }
    assert ([], {}) == (lost, twice), f"lost {len(lost)}: {lost[:10]}; executed twice {len(twice)}: {twice}"
    assert set(executions) == run.scheduled
    assert [] == run.producer_errors
    for key in run.held:
        # Handed over to the old side at the rollback: run there once, or, when the old workers
        # did not reach it before the second cutover (a loaded machine), handed back to the new
        # side by that cutover's drain and transfer, and run there once.
        assert len(executions[key]) == 1, (key, executions[key])

    with Ledger.open(settings.ledger_database_url) as ledger:
        counts = ledger.counts(MIGRATION)
    assert 0 == counts.executed_twice
    assert (0, 0) == (counts.running, counts.failed)
    assert len(run.scheduled) == counts.succeeded
    assert counts.handed_over >= len(run.held) >= 1
    validation = commands.validate(settings, MIGRATION)
    assert validation.ok, validation.as_json()
    assert Phase.COMPLETE == commands.verify(settings, MIGRATION).phase

    history = commands.history(settings, MIGRATION)
    rollback = next(e for e in history if (e.source, e.dest) == (Phase.CUTOVER, Phase.DUAL_WRITE))
    pause = rollback.steps[0]
    assert pause.checkpoint is not None
    assert ("new", ["new-2"]) == (pause.checkpoint["side"], pause.checkpoint["gone"])
    windows = consuming_windows(history)
    outside = [
        (key, side, at)
        for key, side, at in execution_rows(log_url)
        if not any(start <= at <= end for start, end in windows[side])
    ]
    assert [] == outside, f"{len(outside)} executions outside their side's windows: {outside[:10]}"
    ran = Counter(side for sides in executions.values() for side in sides)
    assert min(ran["old"], ran["new"]) > 0  # both systems did real work
    print(
        json.dumps(
            {
                "database": settings.database_url.split(":", 1)[0],
                "scheduled": len(run.scheduled),
                "executions_by_side": dict(ran),
                "backfilled": run.backfilled,
                "held": run.held,
                "handed_over": counts.handed_over,
                "seconds": round(time.monotonic() - run.started, 1),
            }
        )
    )
    return dict(ran)


def ran_at(log_url: str) -> dict[str, float]:
    """When each key's (last) execution began."""
    return {key: at for key, _, at in execution_rows(log_url)}


def not_before(log_url: str, scheduled: dict[str, datetime]) -> dict[str, tuple[float, datetime]]:
    """The keys of `scheduled` (key -> run_at) that ran before their time."""
    began = ran_at(log_url)
    return {key: (began[key], at) for key, at in scheduled.items() if began[key] < at.timestamp()}
