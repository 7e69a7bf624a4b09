"""A gated Procrastinate worker process for the adapter's end-to-end tests:

    python -m tests.support.pq_worker --pq URL --control URL --log URL --migration M \\
        --worker-id NAME [--concurrency 2] [--slow-ms 300 --slow-share 0.1] [--hold-file PATH]

Procrastinate's own worker (`App.run_worker_async`) on the `default` queue, with
`migration_fsm.adapters.procrastinate.worker.gated`. Its tasks (`send_email`, `resize_image`,
`charge_card`, the demo producer's types) record each execution in the demo's `ExecutionLog`
(`--log`), the side effect the tests count. `--hold-file` is `migration_fsm.demo.worker.Hold`:
once the file exists the next task stops inside `executing()` before its effect, and
FILE.held names it once no other task of this process is between its effect and the ledger's
finish (so a SIGKILL then never lands between them). SIGTERM stops it; it prints its figures
as one JSON object on stdout."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from procrastinate import App, JobContext, PsycopgConnector
from procrastinate.worker import Worker

from migration_fsm.adapters.procrastinate.worker import KEY_CONTEXT, gated
from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.demo.systems import ExecutionLog
from migration_fsm.demo.worker import Hold, as_task_database, stable_share
from tests.support.queues import libpq_url

#: The demo producer's types, and the types of the old systems' own test tasks (`add`, `flaky`).
TASK_TYPES = ("send_email", "resize_image", "charge_card", "add", "flaky")
_EFFECT = "effect_started"


def build_app(
    conninfo: str, log: ExecutionLog, args: argparse.Namespace, hold: Hold | None, stop: threading.Event
) -> App:
    app = App(connector=PsycopgConnector(conninfo=conninfo))

    def run(context: JobContext, /, **_payload: Any) -> None:
        key = str(context.additional_context[KEY_CONTEXT])
        if hold is not None:
            hold.before_effect(key, stop)
            context.additional_context[_EFFECT] = True
        log.record(key, "new")
        slow = args.slow_ms and stable_share(key) < args.slow_share
        time.sleep((args.slow_ms if slow else args.work_ms) / 1000)

    for name in TASK_TYPES:
        app.task(name=name, pass_context=True)(run)
    return app


def after_finish(hold: Hold) -> Callable[..., Awaitable[Any]]:
    """The outermost worker middleware: once the gate's middleware has finished the execution
    in the ledger, the hold may count this task as out of its effect."""

    async def middleware(
        call_next: Callable[[], Awaitable[Any]], context: JobContext, _worker: Worker
    ) -> Any:
        try:
            return await call_next()
        finally:
            if context.additional_context.pop(_EFFECT, False):
                hold.after_finish()

    return middleware


async def work(args: argparse.Namespace) -> dict[str, Any]:
    stop = threading.Event()
    hold = Hold(args.hold_file) if args.hold_file is not None else None
    log = ExecutionLog(as_task_database(args.log))
    client = PhaseClient(args.control, migration=args.migration, ttl=0.05)
    gate = WorkerGate(client, "new", args.worker_id, worker_ttl_seconds=args.worker_ttl_seconds)
    app = build_app(libpq_url(args.pq), log, args, hold, stop)
    worker = gated(app, gate, backoff_seconds=0.05)
    options = worker.worker_options()
    if hold is not None:
        options["worker_middleware"] = [after_finish(hold), *options["worker_middleware"]]
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        async with app.open_async():
            running = asyncio.create_task(
                app.run_worker_async(
                    queues=["default"],
                    concurrency=args.concurrency,
                    fetch_job_polling_interval=0.05,
                    install_signal_handlers=False,
                    **options,
                )
            )
            print("worker new: ready", file=sys.stderr, flush=True)
            await stopping.wait()
            stop.set()  # held tasks go on once stopping
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    finally:
        gate.close()
        client.close()
        log.close()
    return {"counters": dict(worker.counters), "gate": gate.counters(), "errors": []}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.pq_worker")
    parser.add_argument("--pq", required=True, help="Procrastinate's database (SQLAlchemy URL)")
    parser.add_argument("--control", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--migration", default="demo")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--work-ms", type=float, default=10.0)
    parser.add_argument("--slow-ms", type=float, default=0.0)
    parser.add_argument("--slow-share", type=float, default=0.0)
    parser.add_argument("--worker-ttl-seconds", type=float, default=10.0)
    parser.add_argument("--hold-file", type=Path, default=None)
    args = parser.parse_args(argv)
    figures = asyncio.run(work(args))
    print(json.dumps(figures, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
