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

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huey.storage import SqliteStorage

from migration_fsm.config import Settings, StoreConfig
from tests.support import huey_app
from tests.support.cli import ROOT
from tests.support.forkserver import child_env
from tests.system.moves import (
    MIGRATION,
    OLD_SYSTEM_MOVE_DATABASES,
    Hooks,
    assert_exactly_once,
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
    wait_for,
)
from tests.system.test_procrastinate_move import MixedWorkers, move_databases, move_settings

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("many_pg_connections")]

#: The Huey task names of the producer's types (module-prefixed, as Huey names them).
TYPE_MAP = {
    f"tests.support.huey_app.{name}": name
    for name in ("send_email", "resize_image", "charge_card", "add", "flaky")
}


@pytest.fixture(params=OLD_SYSTEM_MOVE_DATABASES)
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
    urls: dict[str, str], workers: HueyWorkers
) -> None:
    from migration_fsm.adapters.huey import setup

    settings = huey_settings(urls)
    prepare(settings, urls["log"])
    setup(huey_app.huey)
    workers.start_huey("old-1")
    workers.start_huey("old-2")
    workers.start_procrastinate("new-1")
    workers.start_procrastinate("new-2", hold=True)
    workers.wait_ready()
    flaky: list[str] = []

    def enqueued_through_huey() -> list[str]:
        """Code that knows nothing of the migration enqueues through Huey's own API:
        positional arguments, and a task that fails once and that Huey retries."""
        flaky.append(huey_app.flaky("flaky-1", 1).id)
        return [*(huey_app.add(i, 1000).id for i in range(5)), *flaky]

    run = walk_the_move(
        settings,
        urls["log"],
        workers,
        start_new=workers.start_procrastinate,
        hooks=Hooks(in_dual_write=enqueued_through_huey),
        label="huey",
    )
    # A stock Huey consumer (no gate) started against the old storage after `complete` runs nothing.
    before = execution_rows(urls["log"])
    stock = workers.start_huey("stock", gated=False)
    wait_for(
        lambda: huey_app.huey.storage.queue_size() == 0 and huey_app.huey.storage.schedule_size() == 0,
        "the stock consumer to take every message left in Huey's queue",
    )
    workers.stop(stock)
    assert before == execution_rows(urls["log"])
    assert_exactly_once(settings, urls["log"], run, retried=flaky)
