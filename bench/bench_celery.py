"""The Celery application of `bench/adapters.py`, importable as `bench_celery:app` (the
`[stores.X]` table's `app`; `bench/` is on `sys.path` when a benchmark runs), with the settings
the Celery adapter asks for and one task, `send_email` (never run: no worker).

Its broker and result backend are pointed at the run's own Redis database by `use_redis(url)`
(before its first use); until then they are a port nothing listens on, so the application never
writes into a database of someone else's.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

#: Nothing listens on port 1 (as tests/support/celery_app.py).
UNSET = "redis://127.0.0.1:1/0"
app = Celery("mfsm_bench", broker=UNSET, backend=UNSET)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_track_started=True,
    result_expires=None,
    broker_connection_retry_on_startup=True,
)


def send_email(**_payload: Any) -> None:
    """The benchmark's task (never run)."""


app.task(name="send_email")(send_email)  # registered by a call, as the Huey task: no untyped decorator


def use_redis(url: str) -> None:
    """Point the application (broker and result backend) at `url`, before it made any connection
    (Celery makes its connection pools and result backend on first use). A run has one Redis
    database: pointing the application at a second one is refused."""
    if app.conf.broker_url not in (UNSET, url):
        raise RuntimeError(f"the bench's Celery application already uses {app.conf.broker_url}")
    app.conf.broker_url = app.conf.result_backend = url
