"""Celery's own worker (`celery -A tests.support.celery_app worker`, prefork pool, one process for
the module) gated by `gate_worker`, on a Redis database of the module's own and a SQLite
migration database: it stops consuming while the old side may not consume, claims every task in
the execution ledger around its execution, settles or puts back the tasks the ledger refuses,
honours the migration's persisted refusal, and a pool child SIGKILLed mid-task gives its task
back to run once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from migration_fsm.adapters.celery import CeleryTaskStore, setup
from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.journal import Journal
from migration_fsm.journal.db import make_engine
from migration_fsm.journal.ledger import SUCCEEDED, Ledger
from migration_fsm.journal.workers import Workers
from migration_fsm.migration import Migration
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.testing import T0
from tests.support.cli import ROOT
from tests.support.forkserver import child_env
from tests.support.queues import private_redis_db

M = "default"
WAIT = 60.0
pytestmark = pytest.mark.xdist_group("celery_worker")


def wait_for(done: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := done()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


@dataclass
class Rig:
    """The module's Redis, migration database, store and one gated `celery worker`."""

    redis_url: str
    control_url: str
    hold: Path
    proc: subprocess.Popen[bytes]
    err: Path
    journal: Journal
    engine: Migration
    client: PhaseClient
    app: Any
    store: CeleryTaskStore
    connection: redis.Redis

    def effects(self) -> list[str]:
        return sorted(raw.decode() for raw in self.connection.lrange("effects", 0, -1))

    def status(self, key: str) -> TaskStatus | None:
        record = self.store.get(key)
        return record.status if record is not None else None

    def acknowledged(self) -> bool:
        """Every live old worker applied the current routing version."""
        version = self.client.refresh().version
        workers = Workers.from_url(self.control_url)
        try:
            rows = workers.records(M, "old")
        finally:
            workers.close()
        return bool(rows) and all(w.seen_version == version for w in rows)

    def consuming(self) -> bool:
        replies = self.app.control.inspect(timeout=1.0).active_queues() or {}
        return any(q["name"] == "celery" for queues in replies.values() for q in queues)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    folder = tmp_path_factory.mktemp("celery-worker")
    control = f"sqlite:///{folder / 'control.db'}"
    with private_redis_db() as redis_url:
        os.environ["MFSM_TEST_CELERY_REDIS"] = redis_url
        from tests.support import celery_app

        app = celery_app.app
        app.conf.broker_url = app.conf.result_backend = redis_url
        journal = Journal(control, engine=make_engine(control, create=True))
        journal.upgrade()
        from migration_fsm.config import Settings

        engine = Migration(journal, Settings(database_url=control, actor="tester"), M)
        engine.init()
        setup(app)
        hold = folder / "hold"
        env = {
            "MFSM_TEST_CELERY_REDIS": redis_url,
            "MFSM_TEST_CONTROL": control,
            "MFSM_TEST_MIGRATION": M,
            "MFSM_TEST_WORKER_ID": "celery-1",
            "MFSM_TEST_HOLD_FILE": str(hold),
            "MFSM_TEST_WORK_MS": "1",
        }
        argv = [
            str(Path(sys.executable).parent / "celery"),
            *("-A", "tests.support.celery_app", "worker", "-c", "2", "-P", "prefork"),
            *("--without-gossip", "--without-mingle", "-l", "WARNING", "-n", f"w-{uuid.uuid4().hex[:6]}@%h"),
        ]
        err = folder / "worker.err"
        with err.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(env), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        client = PhaseClient(control, migration=M, ttl=0.05, listen=False)
        store = CeleryTaskStore(app)
        connection = redis.Redis.from_url(redis_url)
        rig = Rig(redis_url, control, hold, proc, err, journal, engine, client, app, store, connection)
        try:
            wait_for(lambda: rig.acknowledged() and rig.consuming(), "the gated worker to consume")
            yield rig
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=WAIT)
            print(err.read_text(errors="replace")[-4000:])
            store.close()
            connection.close()
            client.close()
            journal.close()


def test_each_task_runs_once_claimed_and_finished_in_the_ledger(rig: Rig) -> None:
    from tests.support import celery_app

    keys = [celery_app.add.delay(i, 1).id for i in range(4)]
    flaky = celery_app.flaky.delay("flaky", 1).id
    wait_for(lambda: set(keys) <= set(rig.effects()) and rig.status(flaky) == TaskStatus.COMPLETED, "the tasks")
    assert 2 == rig.effects().count(flaky)  # failed once, retried by Celery
    claims = Ledger(rig.control_url).claims_of(M, [*keys, flaky])
    assert dict.fromkeys([*keys, flaky], SUCCEEDED) == {k: c.state for k, c in claims.items()}
    records = {key: rig.store.get(key) for key in [*keys, flaky]}
    assert {k: TaskStatus.COMPLETED for k in records} == {k: r.status for k, r in records.items() if r}
    assert (0, 1) == (records[keys[0]].attempts, records[flaky].attempts)  # type: ignore[union-attr]
    assert {"a": 0, "b": 1} == records[keys[0]].payload  # type: ignore[union-attr]
