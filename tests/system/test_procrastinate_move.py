"""Prove it for a move onto Procrastinate (issue 13): an existing SQL task table (the demo's old
task manager, mapped with the `sql` kind) -> Procrastinate, with real worker processes on both
sides: the demo's gated old workers, and Procrastinate's own worker (`tests.support.pq_worker`:
`App.run_worker_async` with `gated(app, gate)`) on the new side. The migration database and the
old table are SQLite files or PostgreSQL schemas; Procrastinate is always PostgreSQL.

The walk is `tests/system/moves.py`'s (traffic with re-sends, a SIGKILLed Procrastinate worker,
a rollback, the default edges only). Also: tasks enqueued with a scheduled time (none runs
early), and a job deferred through Procrastinate's own API by code that knows nothing of the
migration (the adapter sees it; its worker runs it once). Counted from the tasks' own side
effects: lost 0, executed twice 0.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from migration_fsm.client import DualWriter
from migration_fsm.config import Settings, StoreConfig
from migration_fsm.demo.run import walk_settings
from migration_fsm.demo.systems import OldTaskManager
from migration_fsm.demo.worker import as_task_database
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from tests.support.cli import ROOT
from tests.support.forkserver import child_env
from tests.support.queues import procrastinate_schema
from tests.system.moves import (
    MIGRATION,
    OLD_SYSTEM_MOVE_DATABASES,
    Hooks,
    assert_exactly_once,
    not_before,
    prepare,
    walk_the_move,
)
from tests.system.test_exactly_once import (
    DRAIN_TIMEOUT_SECONDS,
    PAUSE_TIMEOUT_SECONDS,
    SLOW_MS,
    SLOW_SHARE,
    WORK_MS,
    WORKER_TTL_SECONDS,
    WorkerProcess,
    Workers,
    executions_by_key,
)
from tests.unit.test_procrastinate_store import sql

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("many_pg_connections")]


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


@pytest.fixture(params=OLD_SYSTEM_MOVE_DATABASES)
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
    urls: dict[str, str], workers: MixedWorkers
) -> None:
    settings = move_settings(urls)
    prepare(settings, urls["log"])
    OldTaskManager(as_task_database(urls["old"]))
    workers.start("old-1", "old")
    workers.start("old-2", "old")
    workers.start_procrastinate("new-1")
    workers.start_procrastinate("new-2", hold=True)
    workers.wait_ready()
    later: dict[str, datetime] = {}

    def deferred_by_procrastinate() -> list[str]:
        """A job deferred through Procrastinate's own function, by code that knows nothing of
        the migration: the adapter sees it under its reserved key, its worker runs it."""
        [(job_id,)] = sql(
            urls["new"],
            "SELECT (procrastinate_defer_jobs_v1(ARRAY[ROW('default', 'charge_card', 0, NULL, NULL,"
            " '{\"n\": 999}'::jsonb, NULL)::procrastinate_job_to_defer_v1]))[1]",
        )
        return [f"procrastinate-job-{job_id:020d}"]

    def scheduled_tasks(writer: DualWriter) -> list[str]:
        """Tasks with a scheduled time (the old table has no column for one: from cleanup on,
        DualWriter writes the new side only), which Procrastinate must not run early."""
        now = datetime.now(UTC)
        for i in range(5):
            at = now + timedelta(seconds=2)
            writer.write(
                TaskRecord(
                    key=f"later-{i}",
                    type="send_email",
                    payload={"n": -i},
                    status=TaskStatus.PENDING,
                    created_at=now,
                    updated_at=now,
                    run_at=at,
                )
            )
            later[f"later-{i}"] = at
        return list(later)

    hooks = Hooks(in_cutover=deferred_by_procrastinate, in_cleanup=scheduled_tasks)
    run = walk_the_move(
        settings, urls["log"], workers, start_new=workers.start_procrastinate, hooks=hooks, label="pq"
    )
    assert_exactly_once(settings, urls["log"], run)
    [outsider] = [key for key in run.scheduled if key.startswith("procrastinate-job-")]
    assert ["new"] == executions_by_key(urls["log"])[outsider]
    assert {} == not_before(urls["log"], later)
    # Procrastinate's own view: every job of the migration finished, none left to run.
    statuses = {
        str(status): int(str(count))
        for status, count in sql(
            urls["new"], "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"
        )
    }
    assert not {"todo", "doing"} & set(statuses), statuses
