"""Prove it for Huey -> Procrastinate (issue 13): Huey's own consumer (`huey_consumer`, thread
workers, gated by `gate_consumer` in the application module `tests.support.huey_app`) on the
old side, Procrastinate's own worker (`tests.support.pq_worker`) on the new side, the default
edge table with no steps configured, under traffic through `DualWriter` that re-sends 5% of
its tasks.

The walk: preparation -> dual_write; tasks enqueued through Huey's own API by code that knows
nothing of the migration (`add(a, b)`, positional arguments; a task that fails once and is
retried by Huey); backfill, validate, cutover (the Huey consumers' pause, `drain_old`,
`transfer_state` into Procrastinate), ramp 100; a Procrastinate worker process SIGKILLed while
it holds a task (before its effect); rollback (the pause names it gone, `drain_new` hands its
job over to Huey, `reverse_sync`); cutover again, cleanup (`retire_old` revokes Huey's copies of
what ran on Procrastinate), complete. Then a stock, ungated `huey_consumer` started against the
old storage runs nothing. Counted from the tasks' own side effects: lost 0, executed twice 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from huey.storage import SqliteStorage

from migration_fsm import commands
from migration_fsm.client import DualWriter, PhaseClient
from migration_fsm.config import Settings, StoreConfig
from migration_fsm.demo.run import OperatorWalk, Report
from migration_fsm.demo.systems import ExecutionLog
from migration_fsm.demo.worker import as_task_database
from migration_fsm.fsm import Phase
from migration_fsm.journal.ledger import Ledger
from migration_fsm.tasks.capabilities import Closeable
from migration_fsm.tasks.factory import build_store
from tests.support import huey_app
from tests.support.cli import ROOT
from tests.support.forkserver import child_env
from tests.system.test_exactly_once import (
    RESEND_SHARE,
    SLOW_MS,
    SLOW_SHARE,
    WAIT,
    WORK_MS,
    WORKER_TTL_SECONDS,
    ResendingProducer,
    WorkerProcess,
    consuming_windows,
    execution_rows,
    executions_by_key,
    wait_for,
)
from tests.system.test_procrastinate_move import (
    LIMIT,
    MIGRATION,
    RATE,
    MixedWorkers,
    move_databases,
    move_settings,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("many_pg_connections")]

#: The Huey task names of the producer's types (module-prefixed, as Huey names them).
TYPE_MAP = {
    f"tests.support.huey_app.{name}": name
    for name in ("send_email", "resize_image", "charge_card", "add", "flaky")
}


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Path, pg_database: str) -> Iterator[dict[str, str]]:
    """As in test_procrastinate_move (control and log SQLite or PostgreSQL, new Procrastinate),
    and `huey`: the Huey application's SQLite file, which this process's `huey_app.huey` uses too."""
    huey_file = tmp_path / "huey.db"
    saved = huey_app.huey.storage
    with move_databases(request.param, tmp_path, pg_database) as found:
        huey_app.huey.storage = SqliteStorage("app", filename=str(huey_file))
        try:
            yield {**found, "huey": str(huey_file)}
        finally:
            huey_app.huey.storage.close()
            huey_app.huey.storage = saved


class HueyWorkers(MixedWorkers):
    def start_huey(self, name: str, *, gated: bool = True) -> WorkerProcess:
        log = self.folder / name
        env = {
            "MFSM_TEST_HUEY_FILE": self.urls["huey"],
            "MFSM_TEST_LOG": self.urls["log"],
            "MFSM_TEST_MIGRATION": MIGRATION,
            "MFSM_TEST_WORKER_ID": name,
            "MFSM_TEST_WORKER_TTL": str(WORKER_TTL_SECONDS),
            "MFSM_TEST_WORK_MS": str(WORK_MS),
            "MFSM_TEST_SLOW_MS": str(SLOW_MS),
            "MFSM_TEST_SLOW_SHARE": str(SLOW_SHARE),
        }
        if gated:
            env["MFSM_TEST_CONTROL"] = self.urls["control"]
        argv = [
            str(Path(sys.executable).parent / "huey_consumer"),
            "tests.support.huey_app.huey",
            *("-w", "2", "-k", "thread", "-d", "0.01", "-m", "0.05", "-g", "TERM", "-C"),
        ]
        with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=child_env(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        worker = WorkerProcess(name, "old", proc, log)
        self.started.append(worker)
        return worker

    def wait_ready(self) -> None:
        for worker in self.started:
            wait_for(
                lambda w=worker: (
                    any(s in w.stderr() for s in ("ready", "consumer started"))  # type: ignore[misc]
                    or w.proc.poll() is not None
                ),
                f"worker {worker.name} to be ready",
            )
            assert worker.proc.poll() is None, f"{worker.name} ended: {worker.stderr()[-3000:]}"


@pytest.fixture
def workers(tmp_path: Path, urls: dict[str, str]) -> Iterator[HueyWorkers]:
    started = HueyWorkers(tmp_path, urls)
    try:
        yield started
    finally:
        started.stop_all()


def huey_settings(urls: dict[str, str]) -> Settings:
    settings = move_settings(urls)
    old = StoreConfig.model_validate(
        {
            "kind": "migration_fsm.adapters.huey:store",
            "app": "tests.support.huey_app:huey",
            "type_map": TYPE_MAP,
        }
    )
    return settings.model_copy(update={"stores": {"old": old, "new": settings.stores["new"]}})


def test_huey_moves_onto_procrastinate_with_every_task_run_exactly_once(
    urls: dict[str, str], workers: HueyWorkers, tmp_path: Path
) -> None:
    from migration_fsm.adapters.huey import setup

    started = time.monotonic()
    settings = huey_settings(urls)
    commands.db_upgrade(settings)
    commands.init(settings, MIGRATION)
    setup(huey_app.huey)
    ExecutionLog(as_task_database(urls["log"])).close()

    workers.start_huey("old-1")
    workers.start_huey("old-2")
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
        settings, MIGRATION, report, soak=time.sleep, seen=seen, say=lambda _: None, label="huey"
    )
    outsiders: list[str] = []
    try:
        producer.start()
        time.sleep(1.5)
        walk.step("advance: preparation -> dual_write", lambda: commands.advance(settings, MIGRATION))
        # Code that knows nothing of the migration enqueues through Huey's own API.
        outsiders += [huey_app.add(i, 1000).id for i in range(5)]
        outsiders.append(huey_app.flaky("flaky-1", 1).id)
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
        time.sleep(1.0)
        walk.check("before cleanup")
        walk.step("advance: cutover -> cleanup (retire_old)", lambda: commands.advance(settings, MIGRATION))
        time.sleep(1.0)
        producer.stop()
        wanted = {*producer.scheduled, *outsiders}
        try:
            wait_for(lambda: wanted <= set(executions_by_key(urls["log"])), "every task to run")
        except BaseException:
            missing = sorted(wanted - set(executions_by_key(urls["log"])))
            print("MISSING", len(missing), [(k, old_store.get(k), new_store.get(k)) for k in missing[:10]])
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

    # A stock Huey consumer (no gate) started against the old storage after `complete` runs nothing.
    before = execution_rows(urls["log"])
    stock = workers.start_huey("stock", gated=False)
    wait_for(
        lambda: huey_app.huey.storage.queue_size() == 0 and huey_app.huey.storage.schedule_size() == 0,
        "the stock consumer to take every message left in Huey's queue",
    )
    workers.stop(stock)
    extra = execution_rows(urls["log"])[len(before) :]
    if extra:
        check = build_store(settings.stores["old"], "old")
        with Ledger.open(settings.ledger_database_url) as ledger:
            claims = ledger.claims_of(MIGRATION, [key for key, _, _ in extra[:5]])
        for key, _, _ in extra[:5]:
            print(
                "EXTRA",
                key,
                check.get(key),
                huey_app.huey.is_revoked(key),
                claims.get(key),
                executions_by_key(urls["log"])[key],
            )
    assert [] == extra

    executions = executions_by_key(urls["log"])
    scheduled = {*producer.scheduled, *outsiders}
    lost = sorted(scheduled - set(executions))
    twice = {key: sides for key, sides in executions.items() if len(sides) > 1 and key != outsiders[-1]}
    assert ([], {}) == (lost, twice), f"lost {len(lost)}: {lost[:10]}; executed twice {len(twice)}: {twice}"
    assert set(executions) == scheduled
    assert [] == producer.errors
    flaky = executions[outsiders[-1]]
    assert flaky in (["old", "old"], ["old", "new"], ["new"], ["old"]), flaky  # its retry is its own
    for key in held:
        assert ["old"] == executions[key], key

    with Ledger.open(settings.ledger_database_url) as ledger:
        counts = ledger.counts(MIGRATION)
    assert 0 == counts.executed_twice
    assert (0, 0) == (counts.running, counts.failed)
    assert len(scheduled) == counts.succeeded
    validation = commands.validate(settings, MIGRATION)
    assert validation.ok, validation.as_json()
    assert Phase.COMPLETE == commands.verify(settings, MIGRATION).phase

    history = commands.history(settings, MIGRATION)
    windows = consuming_windows(history)
    outside = [
        (key, side, at)
        for key, side, at in execution_rows(urls["log"])
        if not any(start <= at <= end for start, end in windows[side])
    ]
    assert [] == outside, f"{len(outside)} executions outside their side's windows: {outside[:10]}"
    ran = Counter(side for sides in executions.values() for side in sides)
    assert min(ran["old"], ran["new"]) > 0
    print(
        json.dumps(
            {
                "database": urls["control"].split(":", 1)[0],
                "scheduled": len(scheduled),
                "executions_by_side": dict(ran),
                "backfilled": backfilled.copied,
                "held": held,
                "handed_over": counts.handed_over,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )
