"""Prove it for a move onto Procrastinate (issue 13): an existing SQL task table (the demo's old
task manager, mapped with the `sql` kind) -> Procrastinate, with real worker processes on both
sides: the demo's gated old workers, and Procrastinate's own worker (`tests.support.pq_worker`:
`App.run_worker_async` with `gated(app, gate)`) on the new side. The migration database and the
old table are SQLite files or PostgreSQL schemas; Procrastinate is always PostgreSQL.

The walk is `test_exactly_once`'s, through the default edge table with no steps configured:
traffic through `DualWriter` that re-sends 5% of its tasks, backfill, validate, cutover (the
old workers' pause, drain, `transfer_state` into Procrastinate's jobs), ramp 100; a
Procrastinate worker process SIGKILLed while it executes a task (held before its effect: see
`test_exactly_once` for why there); rollback (the pause names it gone, `drain_new` hands its
`doing` job over to the old side, `reverse_sync`), a replacement worker, cutover again, cleanup
(`retire_old`), complete. Also: tasks enqueued with a scheduled time, and a task deferred
through Procrastinate's own API by code that knows nothing of the migration (the adapter sees
it; its worker runs it once). Counted from the tasks' own side effects: lost 0, executed twice 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from migration_fsm import commands
from migration_fsm.client import DualWriter, PhaseClient
from migration_fsm.config import Settings, StoreConfig
from migration_fsm.demo.run import OperatorWalk, Report, walk_settings
from migration_fsm.demo.systems import ExecutionLog, OldTaskManager
from migration_fsm.demo.worker import as_task_database
from migration_fsm.fsm import Phase
from migration_fsm.journal.ledger import Ledger
from migration_fsm.tasks.capabilities import Closeable
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from tests.support.cli import ROOT
from tests.support.forkserver import child_env
from tests.support.queues import procrastinate_schema
from tests.system.test_exactly_once import (
    DRAIN_TIMEOUT_SECONDS,
    PAUSE_TIMEOUT_SECONDS,
    RESEND_SHARE,
    SLOW_MS,
    SLOW_SHARE,
    WAIT,
    WORK_MS,
    WORKER_TTL_SECONDS,
    ResendingProducer,
    WorkerProcess,
    Workers,
    consuming_windows,
    execution_rows,
    executions_by_key,
    wait_for,
)
from tests.unit.test_procrastinate_store import sql

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("many_pg_connections")]

MIGRATION = "prove"
RATE = 30.0
LIMIT = 5000


@contextmanager
def move_databases(kind: str, tmp_path: Path, pg_database: str) -> Iterator[dict[str, str]]:
    """control, old and log (SQLite files or PostgreSQL schemas, by `kind`) and new
    (Procrastinate's schema in PostgreSQL), dropped afterwards."""
    roles = ("control", "old", "log")
    with procrastinate_schema(pg_database) as pq_url:
        if kind == "sqlite":
            yield {**{role: f"sqlite:///{tmp_path / f'{role}.db'}" for role in roles}, "new": pq_url}
            return
        schemas = {role: f"p_{role}_{uuid.uuid4().hex[:10]}" for role in roles}
        engine = create_engine(pg_database, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for schema in schemas.values():
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield {
                **{
                    role: f"{pg_database}?options=-csearch_path%3D{schema}"
                    for role, schema in schemas.items()
                },
                "new": pq_url,
            }
        finally:
            with engine.connect() as conn:
                for schema in schemas.values():
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Path, pg_database: str) -> Iterator[dict[str, str]]:
    with move_databases(request.param, tmp_path, pg_database) as found:
        yield found


class MixedWorkers(Workers):
    """The demo's old workers, and Procrastinate worker processes for the new side."""

    def start_procrastinate(self, name: str, *, hold: bool = False) -> WorkerProcess:
        log = self.folder / name
        hold_file = self.folder / f"{name}.arm" if hold else None
        argv = [
            sys.executable,
            "-m",
            "tests.support.pq_worker",
            *("--pq", self.urls["new"]),
            *("--control", self.urls["control"]),
            *("--log", self.urls["log"]),
            *("--migration", MIGRATION),
            *("--worker-id", name),
            *("--work-ms", str(WORK_MS)),
            *("--slow-ms", str(SLOW_MS)),
            *("--slow-share", str(SLOW_SHARE)),
            *("--worker-ttl-seconds", str(WORKER_TTL_SECONDS)),
        ]
        if hold_file is not None:
            argv += ["--hold-file", str(hold_file)]
        with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        worker = WorkerProcess(name, "new", proc, log, hold_file)
        self.started.append(worker)
        return worker


@pytest.fixture
def workers(tmp_path: Path, urls: dict[str, str]) -> Iterator[MixedWorkers]:
    started = MixedWorkers(tmp_path, urls)
    try:
        yield started
    finally:
        started.stop_all()


def move_settings(urls: dict[str, str]) -> Settings:
    """`walk_settings` with the new side Procrastinate, and no steps configured at all."""
    base = walk_settings(
        urls["control"],
        urls["old"],
        urls["old"],
        actor="prove-operator",
        worker_ttl_seconds=WORKER_TTL_SECONDS,
        drain_timeout_seconds=DRAIN_TIMEOUT_SECONDS,
    )
    new = StoreConfig.model_validate(
        {"kind": "migration_fsm.adapters.procrastinate:store", "url": urls["new"]}
    )
    return base.model_copy(
        update={
            "steps": {},
            "pause_timeout_seconds": PAUSE_TIMEOUT_SECONDS,
            "stores": {"old": base.stores["old"], "new": new},
        }
    )


def test_a_sql_table_moves_onto_procrastinate_with_every_task_run_exactly_once(
    urls: dict[str, str], workers: MixedWorkers, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = move_settings(urls)
    commands.db_upgrade(settings)
    commands.init(settings, MIGRATION)
    OldTaskManager(as_task_database(urls["old"]))
    ExecutionLog(as_task_database(urls["log"])).close()

    workers.start("old-1", "old")
    workers.start("old-2", "old")
    workers.start_procrastinate("new-1")
    victim = workers.start_procrastinate("new-2", hold=True)
    workers.wait_ready()

    client = PhaseClient(settings.database_url, migration=MIGRATION, ttl=0.05)
    old_store = build_store(settings.stores["old"], "old")
    new_store = build_store(settings.stores["new"], "new")
    writer = DualWriter(client, old_store, new_store)
    producer = ResendingProducer(writer, RATE, LIMIT, RESEND_SHARE)
    report = Report()

    def seen(version: int) -> None:
        wait_for(lambda: client.snapshot().version >= version, f"the producer to see version {version}")

    walk = OperatorWalk(
        settings, MIGRATION, report, soak=time.sleep, seen=seen, say=lambda _: None, label="pq"
    )
    scheduled_soon: dict[str, datetime] = {}
    try:
        producer.start()
        time.sleep(1.5)
        walk.step("advance: preparation -> dual_write", lambda: commands.advance(settings, MIGRATION))
        time.sleep(1.0)
        backfilled = commands.backfill(settings, MIGRATION)
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
        for key in held:
            assert key not in executions_by_key(urls["log"])
        workers.start_procrastinate("new-3")
        time.sleep(0.5)

        walk.step(
            "rollback: cutover -> dual_write",
            lambda: commands.rollback(settings, MIGRATION, reason="prove: a Procrastinate worker died"),
        )
        time.sleep(1.0)
        walk.check("before the second cutover")
        walk.step("advance: dual_write -> cutover again", lambda: commands.advance(settings, MIGRATION))
        walk.step("ramp 100% again", lambda: commands.ramp(settings, MIGRATION, 100))
        # A job deferred through Procrastinate's own function, by code that knows nothing of the migration.
        [(job_id,)] = sql(
            urls["new"],
            "SELECT (procrastinate_defer_jobs_v1(ARRAY[ROW('default', 'charge_card', 0, NULL, NULL,"
            " '{\"n\": 999}'::jsonb, NULL)::procrastinate_job_to_defer_v1]))[1]",
        )
        outsider = f"procrastinate-job-{job_id:020d}"
        time.sleep(1.0)
        walk.check("before cleanup")
        walk.step("advance: cutover -> cleanup (retire_old)", lambda: commands.advance(settings, MIGRATION))
        # Tasks with a scheduled time (the old table has no column for one: from cleanup on,
        # DualWriter writes the new side only), which Procrastinate must not run early.
        now = datetime.now(UTC)
        for i in range(5):
            record = TaskRecord(
                key=f"later-{i}",
                type="send_email",
                payload={"n": -i},
                status=TaskStatus.PENDING,
                created_at=now,
                updated_at=now,
                run_at=now + timedelta(seconds=2),
            )
            writer.write(record)
            scheduled_soon[record.key] = now + timedelta(seconds=2)
        time.sleep(1.0)
        producer.stop()
        wanted = {*producer.scheduled, *scheduled_soon, outsider}
        try:
            wait_for(lambda: wanted <= set(executions_by_key(urls["log"])), "every task to run")
        except BaseException:
            missing = sorted(wanted - set(executions_by_key(urls["log"])))
            with Ledger.open(settings.ledger_database_url) as ledger:
                claims = ledger.claims_of(MIGRATION, missing[:20])
            print("MISSING", len(missing), missing[:20])
            for key in missing[:20]:
                print(key, old_store.get(key), new_store.get(key), claims.get(key))
            for w in workers.started:
                print(w.name, w.stderr()[-3000:])
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

    executions = executions_by_key(urls["log"])
    scheduled = {*producer.scheduled, *scheduled_soon, outsider}
    lost = sorted(scheduled - set(executions))
    twice = {key: sides for key, sides in executions.items() if len(sides) > 1}
    assert ([], {}) == (lost, twice), f"lost {len(lost)}: {lost[:10]}; executed twice {len(twice)}: {twice}"
    assert set(executions) == scheduled
    assert [] == producer.errors
    for key in held:  # handed over to the old side at the rollback, and run there
        assert ["old"] == executions[key], key
    assert ["new"] == executions[outsider]
    ran_at = {key: at for key, _, at in execution_rows(urls["log"])}
    early = {key: (ran_at[key], at) for key, at in scheduled_soon.items() if ran_at[key] < at.timestamp()}
    assert {} == early

    with Ledger.open(settings.ledger_database_url) as ledger:
        counts = ledger.counts(MIGRATION)
    assert 0 == counts.executed_twice
    assert (0, 0) == (counts.running, counts.failed)
    assert len(scheduled) == counts.succeeded
    assert counts.handed_over >= len(held) >= 1
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
        for key, side, at in execution_rows(urls["log"])
        if not any(start <= at <= end for start, end in windows[side])
    ]
    assert [] == outside, f"{len(outside)} executions outside their side's windows: {outside[:10]}"
    ran = Counter(side for sides in executions.values() for side in sides)
    assert min(ran["old"], ran["new"]) > 0
    # Procrastinate's own view: every job of the migration finished, none left to run.
    statuses = {
        str(status): int(str(count))
        for status, count in sql(
            urls["new"], "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"
        )
    }
    assert not {"todo", "doing"} & set(statuses), statuses
    print(
        json.dumps(
            {
                "database": urls["control"].split(":", 1)[0],
                "scheduled": len(scheduled),
                "executions_by_side": dict(ran),
                "backfilled": backfilled.copied,
                "held": held,
                "handed_over": counts.handed_over,
                "procrastinate_jobs": statuses,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )
