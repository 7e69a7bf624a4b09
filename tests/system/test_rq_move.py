"""Prove it for RQ -> Procrastinate (issue 13): RQ's own forking worker, gated
(`tests.support.rq_worker`: `gated_worker`), on the old side, in a Redis database of the test's
own; Procrastinate's own worker (`tests.support.pq_worker`) on the new side; the default edge
table with no steps configured, under traffic through `DualWriter` that re-sends 5% of its tasks.

The walk: preparation -> dual_write; jobs enqueued through RQ's own API by code that knows
nothing of the migration (`add(a, b)`, positional arguments); backfill, validate, cutover (the RQ
workers' pause, `drain_old`, `transfer_state` into Procrastinate), ramp 100; a Procrastinate
worker process SIGKILLed while it holds a task (before its effect); rollback (the pause names it
gone, `drain_new` hands its job over to RQ, `reverse_sync`); cutover again, cleanup and complete
(`retire_old` cancels RQ's copies of what ran on Procrastinate). Then a stock, ungated `rq worker`
started against the old queue runs nothing. Counted from the tasks' own side effects: lost 0,
executed twice 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker

from migration_fsm.config import Settings, StoreConfig
from tests.support import rq_tasks
from tests.support.cli import ROOT
from tests.support.forkserver import child_env
from tests.support.queues import private_redis_db
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
    WAIT,
    WORK_MS,
    WORKER_TTL_SECONDS,
    WorkerProcess,
    wait_for,
)
from tests.system.test_procrastinate_move import MixedWorkers, move_databases, move_settings

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("many_pg_connections")]

#: The RQ function names of the producer's types.
TYPE_MAP = {
    f"tests.support.rq_tasks.{name}": name for name in ("send_email", "resize_image", "charge_card", "add")
}


@pytest.fixture(params=OLD_SYSTEM_MOVE_DATABASES)
def urls(request: pytest.FixtureRequest, tmp_path: Path, pg_database: str) -> Iterator[dict[str, str]]:
    """As in test_procrastinate_move (control and log SQLite or PostgreSQL, new Procrastinate),
    and `redis`: a Redis database number of the test's own, for RQ."""
    with move_databases(request.param, tmp_path, pg_database) as found, private_redis_db() as redis_url:
        yield {**found, "redis": redis_url}


class RqWorkers(MixedWorkers):
    def start_rq(self, name: str, *, gated: bool = True) -> WorkerProcess:
        log = self.folder / name
        env = {
            "MFSM_TEST_LOG": self.urls["log"],
            "MFSM_TEST_WORK_MS": str(WORK_MS),
            "MFSM_TEST_SLOW_MS": str(SLOW_MS),
            "MFSM_TEST_SLOW_SHARE": str(SLOW_SHARE),
        }
        if gated:
            argv = [
                sys.executable,
                "-m",
                "tests.support.rq_worker",
                *("--redis", self.urls["redis"]),
                *("--control", self.urls["control"]),
                *("--migration", MIGRATION),
                *("--worker-id", name),
                *("--worker-ttl-seconds", str(WORKER_TTL_SECONDS)),
            ]
        else:  # RQ's own command, as an operator would start a forgotten worker
            argv = [
                str(Path(sys.executable).parent / "rq"),
                "worker",
                "--url",
                self.urls["redis"],
                "default",
            ]
        with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=child_env(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        worker = WorkerProcess(name, "old", proc, log)
        self.started.append(worker)
        return worker


@pytest.fixture
def workers(tmp_path: Path, urls: dict[str, str]) -> Iterator[RqWorkers]:
    started = RqWorkers(tmp_path, urls)
    try:
        yield started
    finally:
        started.stop_all()


#: RQ forks a work horse per job: on a loaded machine a slow job takes longer to end than on the
#: other systems, and a drain that times out on a live worker's job stops the transition. The
#: drain ends as soon as nothing runs, so a longer bound costs a passing run nothing: 6 s was
#: exceeded once in `make test` here (a 0.3 s job's horse still running, under three xdist
#: workers), while the test alone passed in 38 s.
RQ_DRAIN_TIMEOUT_SECONDS = 20.0


def rq_settings(urls: dict[str, str]) -> Settings:
    settings = move_settings(urls).model_copy(update={"drain_timeout_seconds": RQ_DRAIN_TIMEOUT_SECONDS})
    old = StoreConfig.model_validate(
        {"kind": "migration_fsm.adapters.rq:store", "url": urls["redis"], "type_map": TYPE_MAP}
    )
    return settings.model_copy(update={"stores": {"old": old, "new": settings.stores["new"]}})


def test_rq_moves_onto_procrastinate_with_every_task_run_exactly_once(
    urls: dict[str, str], workers: RqWorkers
) -> None:
    from migration_fsm.adapters.rq import setup

    settings = rq_settings(urls)
    prepare(settings, urls["log"])
    setup(urls["redis"])
    connection = redis.Redis.from_url(urls["redis"])
    rq_queue = Queue("default", connection=connection)
    workers.start_rq("old-1")
    workers.start_rq("old-2")
    workers.start_procrastinate("new-1")
    workers.start_procrastinate("new-2", hold=True)
    workers.wait_ready()

    def enqueued_through_rq() -> list[str]:
        """Code that knows nothing of the migration enqueues through RQ's own API (positional arguments)."""
        return [rq_queue.enqueue(rq_tasks.add, i, 1000).id for i in range(5)]

    run = walk_the_move(
        settings,
        urls["log"],
        workers,
        start_new=workers.start_procrastinate,
        hooks=Hooks(in_dual_write=enqueued_through_rq),
        label="rq",
    )
    # A stock RQ worker (no gate) started against the old queue after `complete` runs nothing.
    stock = workers.start_rq("stock", gated=False)

    def listening() -> bool:  # registered (the gated ones have left), and idle: it waits on the queue
        found = Worker.all(connection=connection)
        return len(found) == 1 and found[0].get_state() == "idle"

    wait_for(listening, "the stock RQ worker to listen on the old queue")
    assert (0, 0) == (rq_queue.count, len(rq_queue.scheduled_job_registry))
    os.kill(stock.proc.pid, signal.SIGKILL)  # a forgotten worker; it has nothing to do
    stock.proc.wait(timeout=WAIT)
    connection.close()
    assert_exactly_once(settings, urls["log"], run)
