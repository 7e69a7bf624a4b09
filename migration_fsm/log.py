"""Structured logging: one event per transition, guard and step, on stderr.

Only the CLI calls `configure`; library users keep whatever structlog setup they have.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer


def configure(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """Send structlog events to stderr: JSON lines unless stderr is a terminal."""
    colors = sys.stderr.isatty()
    if json is None:
        json = not colors
    # An event logged with `exc_info` keeps its traceback: a structured `exception` list in
    # JSON (structlog's `dict_tracebacks`), a rendered traceback on a terminal. Never the
    # frames' local variables: they hold settings, and so database URLs with passwords.
    tail: list[Any] = (
        [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
        if json
        else [
            structlog.dev.ConsoleRenderer(
                colors=colors,
                exception_formatter=structlog.dev.RichTracebackFormatter(
                    color_system="truecolor" if colors else None, show_locals=False
                ),
            )
        ]
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
