"""Prove it for Celery -> Procrastinate (issue 13): Celery's own worker (`celery worker`, prefork
pool, gated by `gate_worker` in the application module `tests.support.celery_app`) on the old
side, with Redis (a database number of the test's own) as its broker and result backend;
Procrastinate's own worker (`tests.support.pq_worker`) on the new side; the default edge table
with no steps configured, under traffic through `DualWriter` that re-sends 5% of its tasks.

The walk: preparation -> dual_write; tasks sent through Celery's own API by code that knows
nothing of the migration (`add(a, b)` with positional arguments, tasks with an ETA two seconds
ahead, a task that fails once and that Celery retries), and tasks with a scheduled time written
through `DualWriter` (an ETA on Celery's side); a Celery pool child SIGKILLed while it
holds a task before its effect (Celery requeues it; it runs once); backfill, validate, cutover
(the Celery workers' pause, `drain_old`, `transfer_state` into Procrastinate), ramp 100; a
Procrastinate worker process SIGKILLed while it holds a task (before its effect); rollback (the
pause names it gone, `drain_new` hands its job over to Celery, `reverse_sync`); cutover again,
cleanup (`retire_old` takes Celery's copies of what ran on Procrastinate out of the broker),
complete. Then a stock, ungated `celery worker` started against the old queue runs nothing.
Counted from the tasks' own side effects: lost 0, executed twice 0; no ETA task ran early.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from migration_fsm.client import DualWriter, PhaseClient
from migration_fsm.config import Settings, StoreConfig
from migration_fsm.tasks.capabilities import Closeable
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from tests.support import celery_app
from tests.support.cli import ROOT
from tests.support.forkserver import child_env
from tests.support.queues import private_redis_db
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
    SLOW_MS,
    SLOW_SHARE,
    WORK_MS,
    WORKER_TTL_SECONDS,
    WorkerProcess,
    execution_rows,
    executions_by_key,
    wait_for,
)
from tests.system.test_procrastinate_move import MixedWorkers, move_databases, move_settings

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("many_pg_connections")]


@pytest.fixture(params=OLD_SYSTEM_MOVE_DATABASES)
def urls(request: pytest.FixtureRequest, tmp_path: Path, pg_database: str) -> Iterator[dict[str, str]]:
    """As in test_procrastinate_move (control and log SQLite or PostgreSQL, new Procrastinate),
    and `redis`: a Redis database number of the test's own, Celery's broker and result backend
    (this process's `celery_app.app` uses it too)."""
    with move_databases(request.param, tmp_path, pg_database) as found, private_redis_db() as redis_url:
        celery_app.use_redis(redis_url)
        try:
            yield {**found, "redis": redis_url}
        finally:
            celery_app.use_redis(celery_app.REDIS)


class CeleryWorkers(MixedWorkers):
    def start_celery(self, name: str, *, gated: bool = True) -> WorkerProcess:
        log = self.folder / name
        hold_file = self.folder / f"{name}.arm"
        env = {
            "MFSM_TEST_CELERY_REDIS": self.urls["redis"],
            "MFSM_TEST_LOG": self.urls["log"],
            "MFSM_TEST_MIGRATION": MIGRATION,
            "MFSM_TEST_WORKER_ID": name,
            "MFSM_TEST_WORKER_TTL": str(WORKER_TTL_SECONDS),
            "MFSM_TEST_WORK_MS": str(WORK_MS),
            "MFSM_TEST_SLOW_MS": str(SLOW_MS),
            "MFSM_TEST_SLOW_SHARE": str(SLOW_SHARE),
            "MFSM_TEST_HOLD_FILE": str(hold_file),
        }
        if gated:
            env["MFSM_TEST_CONTROL"] = self.urls["control"]
        argv = [  # Celery's own command, as an operator starts a worker
            str(Path(sys.executable).parent / "celery"),
            *("-A", "tests.support.celery_app", "worker", "-P", "prefork", "-c", "2"),
            *("-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"),
        ]
        with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=child_env(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        worker = WorkerProcess(name, "old", proc, log, hold_file)
        self.started.append(worker)
        return worker


@pytest.fixture
def workers(tmp_path: Path, urls: dict[str, str]) -> Iterator[CeleryWorkers]:
    started = CeleryWorkers(tmp_path, urls)
    try:
        yield started
    finally:
        started.stop_all()


def celery_settings(urls: dict[str, str]) -> Settings:
    settings = move_settings(urls)
    old = StoreConfig.model_validate(
        {"kind": "migration_fsm.adapters.celery:store", "app": "tests.support.celery_app:app"}
    )
    return settings.model_copy(update={"stores": {"old": old, "new": settings.stores["new"]}})


def test_celery_moves_onto_procrastinate_with_every_task_run_exactly_once(
    urls: dict[str, str], workers: CeleryWorkers
) -> None:
    from migration_fsm.adapters.celery import setup

    settings = celery_settings(urls)
    prepare(settings, urls["log"])
    setup(celery_app.app)
    old = workers.start_celery("old-1")
    workers.start_celery("old-2")
    workers.start_procrastinate("new-1")
    workers.start_procrastinate("new-2", hold=True)
    workers.wait_ready()
    flaky: list[str] = []
    later: dict[str, datetime] = {}
    killed: list[str] = []

    def sent_through_celery() -> list[str]:
        """Code that knows nothing of the migration sends through Celery's own API: positional
        arguments, tasks with an ETA, a task that fails once and that Celery retries; and a
        Celery pool child is SIGKILLed while it holds a task (before its effect)."""
        assert old.hold_file is not None
        old.hold_file.touch()
        marker = old.hold_file.with_name(old.hold_file.name + ".held")
        wait_for(marker.exists, "a Celery pool child to hold a task")
        key, pid = marker.read_text(encoding="utf-8").split()
        assert key not in executions_by_key(urls["log"])
        os.kill(int(pid), signal.SIGKILL)
        killed.append(key)
        flaky.append(celery_app.flaky.delay("flaky-1", 1).id)
        for i in range(5):
            at = datetime.now(UTC) + timedelta(seconds=2)
            later[celery_app.add.apply_async((i, 2000), eta=at).id] = at
        return [*(celery_app.add.delay(i, 1000).id for i in range(5)), *flaky, *later, *scheduled()]

    def scheduled() -> list[str]:
        """Tasks with a scheduled time written through `DualWriter` (both sides: Celery's
        message carries it as its ETA)."""
        old_store, new_store = (
            build_store(settings.stores["old"], "old"),
            build_store(settings.stores["new"], "new"),
        )
        with PhaseClient(settings.database_url, migration=MIGRATION) as client:
            writer = DualWriter(client, old_store, new_store)
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
            writer.close()
        for store in (old_store, new_store):
            if isinstance(store, Closeable):
                store.close()
        return [f"later-{i}" for i in range(5)]

    run = walk_the_move(
        settings,
        urls["log"],
        workers,
        start_new=workers.start_procrastinate,
        hooks=Hooks(in_dual_write=sent_through_celery),
        label="celery",
    )
    assert 1 == len(executions_by_key(urls["log"])[killed[0]])  # came back after the kill, ran once
    assert {} == not_before(urls["log"], later)
    # A stock Celery worker (no gate) started against the old queue after `complete` runs nothing.
    broker = redis.Redis.from_url(urls["redis"])
    assert (0, 0) == (broker.llen("celery"), broker.hlen("unacked"))  # nothing left for any worker
    before = execution_rows(urls["log"])
    stock = workers.start_celery("stock", gated=False)

    def listening() -> bool:  # it consumes the old queue
        replies = celery_app.app.control.inspect(timeout=1.0, limit=1).active_queues() or {}
        return any(q["name"] == "celery" for queues in replies.values() for q in queues)

    wait_for(listening, "the stock Celery worker to consume the old queue")
    workers.stop(stock)
    assert (0, 0) == (broker.llen("celery"), broker.hlen("unacked"))
    broker.close()
    assert before == execution_rows(urls["log"])
    assert_exactly_once(settings, urls["log"], run, retried=flaky)
