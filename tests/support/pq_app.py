"""A small Procrastinate application for the adapter's tests: one task, `effect`, whose side
effect (a row in `effects`, in Procrastinate's own database) is what the tests count."""

from __future__ import annotations

from typing import Any

import psycopg
from procrastinate import App, JobContext, PsycopgConnector

EFFECTS_DDL = (
    "CREATE TABLE IF NOT EXISTS effects (key text NOT NULL, job_id bigint NOT NULL, side text NOT NULL)"
)


def make_app(conninfo: str, side: str = "new") -> App:
    """An `App` on `conninfo` (libpq form) whose task records each execution in `effects`."""
    app = App(connector=PsycopgConnector(conninfo=conninfo))

    @app.task(name="effect", pass_context=True)
    def effect(context: JobContext, /, **payload: Any) -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO effects (key, job_id, side) VALUES (%s, %s, %s)",
                (str(payload.get("key", "")), context.job.id, side),
            )
        if payload.get("fail"):
            raise RuntimeError(f"task {payload.get('key')} fails on purpose")

    return app
