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
        raws: list[bytes] = self.connection.lrange("effects", 0, -1)  # type: ignore[assignment]
        return sorted(raw.decode() for raw in raws)

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

    def claims(self, keys: list[str]) -> dict[str, str]:
        """The ledger's state of each key's claim (the worker finishes a claim just after the
        task's result is stored)."""
        ledger = Ledger(self.control_url)
        try:
            return {key: claim.state for key, claim in ledger.claims_of(M, keys).items()}
        finally:
            ledger.close()

    def pause_old(self) -> None:
        """To cutover (the old side does not consume), and wait for the worker to stop consuming."""
        while self.client.refresh().phase != "cutover":
            self.engine.advance()
        wait_for(lambda: self.acknowledged() and not self.queues(), "the worker to stop consuming")

    def queues(self) -> set[str]:
        """The queues the worker consumes now."""
        replies = self.app.control.inspect(timeout=1.0, limit=1).active_queues() or {}
        return {q["name"] for queues in replies.values() for q in queues}

    def consuming(self) -> bool:
        return {"celery", "mail"} == self.queues()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    folder = tmp_path_factory.mktemp("celery-worker")
    control = f"sqlite:///{folder / 'control.db'}"
    with private_redis_db() as redis_url:
        from tests.support import celery_app

        celery_app.use_redis(redis_url)
        app = celery_app.app
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
            *("-A", "tests.support.celery_app", "worker", "-c", "2", "-P", "prefork", "-Q", "celery,mail"),
            *("--without-gossip", "--without-mingle", "-l", "WARNING", "-n", f"w-{uuid.uuid4().hex[:6]}@%h"),
        ]
        err = folder / "worker.err"
        with err.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=child_env(env), stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
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
            celery_app.use_redis(celery_app.REDIS)


def test_each_task_runs_once_claimed_and_finished_in_the_ledger(rig: Rig) -> None:
    from tests.support import celery_app

    keys = [celery_app.add.delay(i, 1).id for i in range(4)]
    flaky = celery_app.flaky.delay("flaky", 1).id
    wait_for(
        lambda: set(keys) <= set(rig.effects()) and rig.status(flaky) == TaskStatus.COMPLETED, "the tasks"
    )
    assert 2 == rig.effects().count(flaky)  # failed once, retried by Celery
    wanted = dict.fromkeys([*keys, flaky], SUCCEEDED)
    wait_for(lambda: wanted == rig.claims([*keys, flaky]), "every claim finished succeeded")
    records = {key: rig.store.get(key) for key in [*keys, flaky]}
    assert dict.fromkeys(records, TaskStatus.COMPLETED) == {k: r.status for k, r in records.items() if r}
    assert (0, 1) == (records[keys[0]].attempts, records[flaky].attempts)  # type: ignore[union-attr]
    assert {"a": 0, "b": 1} == records[keys[0]].payload  # type: ignore[union-attr]


def test_a_paused_side_stops_consuming_and_takes_nothing_until_it_consumes_again(rig: Rig) -> None:
    from tests.support import celery_app

    rig.pause_old()  # every queue the worker was started with (`-Q celery,mail`) is cancelled
    keys = [celery_app.add.delay(i, 2).id for i in range(3)]
    other = celery_app.add.apply_async((9, 9), queue="mail").id
    time.sleep(0.5)  # long enough for a consuming worker to take them (the first test: ~0.1 s)
    assert [] == [key for key in [*keys, other] if key in rig.effects()]
    assert (3, 1) == (rig.connection.llen("celery"), rig.connection.llen("mail"))
    assert {TaskStatus.PENDING} == {rig.status(key) for key in keys}
    rig.engine.rollback(reason="the old side consumes again")
    wait_for(lambda: {*keys, other} <= set(rig.effects()), "the tasks to run once the side consumes")
    assert all(rig.effects().count(key) == 1 for key in [*keys, other])
    wait_for(rig.consuming, "the worker to consume both its queues again")
    mail = CeleryTaskStore(rig.app, queue="mail")  # each task in the registry of its own queue
    try:
        wait_for(lambda: getattr(mail.get(other), "status", None) == TaskStatus.COMPLETED, "mail's registry")
    finally:
        mail.close()
    assert other not in {record.key for record in rig.store.scan(None, 1000)}


def test_a_task_the_migration_revoked_then_sent_again_runs_once(rig: Rig) -> None:
    """Celery's revoke lives in each worker's memory: a gated worker forgets the one the adapter
    broadcast once the migration sends the task again."""
    key = f"again-{uuid.uuid4().hex[:6]}"
    rig.pause_old()  # the message waits in the queue
    rig.store.put(
        TaskRecord(
            key=key,
            type="add",
            payload={"a": 3, "b": 4},
            status=TaskStatus.PENDING,
            created_at=T0,
            updated_at=T0,
        )
    )
    assert rig.store.set_progress(key, TaskStatus.CANCELLED, 0, T0)

    def revoked() -> bool:
        replies = rig.app.control.inspect(timeout=1.0, limit=1).revoked() or {}
        return any(key in ids for ids in replies.values())

    wait_for(revoked, "the worker to hold the revoke")
    assert rig.store.set_progress(key, TaskStatus.PENDING, 0, T0)
    rig.engine.rollback(reason="the old side consumes again")
    wait_for(lambda: key in rig.effects(), "the task sent again to run")
    wait_for(lambda: rig.status(key) == TaskStatus.COMPLETED, "the task to complete")
    assert 1 == rig.effects().count(key)


def test_ledger_refusals_settle_or_put_back_the_task_without_running_it(rig: Rig) -> None:
    from tests.support import celery_app

    ran, handed, running = (f"refused-{i}-{uuid.uuid4().hex[:6]}" for i in range(3))
    ledger = Ledger(rig.control_url)
    with WorkerGate(rig.client, "new", "new-1", background=False) as new:
        with new.executing(ran) as run:
            assert run.allowed
        ledger.hand_over(M, handed, "old", "new")
        holding = new.executing(running)
        assert holding.__enter__().allowed
        for key in (ran, handed, running):
            celery_app.add.apply_async((1, 1), task_id=key)
        wait_for(
            lambda: (rig.status(ran), rig.status(handed)) == (TaskStatus.COMPLETED, TaskStatus.CANCELLED),
            "the worker to settle what ran elsewhere and what was handed over",
        )
        wait_for(lambda: rig.status(running) == TaskStatus.PENDING, "the running one to be put back")
        holding.__exit__(None, None, None)  # new finished it: settled on old without running
    wait_for(lambda: rig.status(running) == TaskStatus.COMPLETED, "the put-back task to be settled")
    assert [] == [key for key in (ran, handed, running) if key in rig.effects()]
    assert (0, 0) == (rig.connection.llen("celery"), rig.connection.hlen("unacked"))


def test_a_task_the_migration_stopped_is_acknowledged_without_running(rig: Rig) -> None:
    """The refusal persists in the registry: a message of a cancelled task that reaches the
    worker later (sent after the revoke was broadcast, or restored) is not run."""
    from tests.support import celery_app

    key = f"stopped-{uuid.uuid4().hex[:6]}"
    rig.store.put(  # cancelled by the migration before any message: no revoke reached the worker
        TaskRecord(
            key=key,
            type="add",
            payload={"a": 1, "b": 2},
            status=TaskStatus.CANCELLED,
            created_at=T0,
            updated_at=T0,
        )
    )
    celery_app.add.apply_async((1, 2), task_id=key)  # a stray message of the stopped task
    wait_for(lambda: rig.connection.llen("celery") == 0 and rig.connection.hlen("unacked") == 0, "the take")
    celery_app.add.apply_async((0, 0), task_id=f"after-{key}").get(timeout=WAIT)  # the worker went past it
    assert key not in rig.effects()
    assert TaskStatus.CANCELLED == rig.status(key)


def test_a_pool_child_killed_mid_task_gives_the_task_back_and_it_runs_once(rig: Rig) -> None:
    from tests.support import celery_app

    rig.hold.touch()
    key = celery_app.add.delay(7, 7).id
    marker = rig.hold.with_name(rig.hold.name + ".held")
    wait_for(marker.exists, "a pool child to hold the task")
    held, pid = marker.read_text(encoding="utf-8").split()
    assert key == held
    assert TaskStatus.RUNNING == rig.status(key)
    os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: key in rig.effects(), "the task to come back and run")
    wait_for(lambda: rig.status(key) == TaskStatus.COMPLETED, "the task to complete")
    assert 1 == rig.effects().count(key)
    wait_for(lambda: {key: SUCCEEDED} == rig.claims([key]), "the claim finished succeeded")
    record = rig.store.get(key)
    assert record is not None
    assert 1 == record.attempts  # the lost execution


def test_a_worker_whose_settings_would_lose_tasks_refuses_to_start(tmp_path: Path) -> None:
    with private_redis_db() as redis_url:
        env = {
            "MFSM_TEST_CELERY_REDIS": redis_url,
            "MFSM_TEST_CONTROL": f"sqlite:///{tmp_path / 'control.db'}",
            "MFSM_TEST_ACKS_LATE": "0",
        }
        argv = [
            str(Path(sys.executable).parent / "celery"),
            *("-A", "tests.support.celery_app", "worker", "-c", "1", "--without-gossip", "--without-mingle"),
        ]
        done = subprocess.run(
            argv, cwd=ROOT, env=child_env(env), capture_output=True, text=True, timeout=WAIT, check=False
        )
    assert 0 != done.returncode
    assert (
        "the migration gate cannot run this worker: Celery setting task_acks_late is False; set it to True"
        in done.stderr
    )
