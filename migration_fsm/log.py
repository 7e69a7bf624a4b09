"""Structured logging: one event per transition, guard and step, on stderr.

Only the CLI calls `configure`; library users keep whatever structlog setup they have.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """Send structlog events to stderr: JSON lines unless stderr is a terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    # An event logged with `exc_info` keeps its traceback: as a structured `exception` list
    # in JSON, rendered as a traceback on a terminal.
    tail: list[Any] = (
        [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
        if json
        else [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    """A bound structlog logger carrying `context`."""
    return structlog.get_logger("migration_fsm").bind(**context)
