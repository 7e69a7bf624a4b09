"""Structured logging: one event per transition, guard and step, on stderr.

Only the CLI calls `configure`; library users keep whatever structlog setup they have.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING, Any, Final

import structlog
from structlog.tracebacks import ExceptionDictTransformer

if TYPE_CHECKING:
    from collections.abc import Callable


def configure(
    *, json: bool | None = None, level: int = logging.INFO, redact: Callable[[str], str] | None = None
) -> None:
    """Send structlog events to stderr: JSON lines unless stderr is a terminal. `redact`
    (the CLI passes `journal.db.redact_text`) rewrites every string value of every event, so
    no secret of a database URL reaches a log line."""
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
            _visible_values,  # a terminal never gets raw control characters from data
            structlog.dev.ConsoleRenderer(
                colors=colors,
                exception_formatter=structlog.dev.RichTracebackFormatter(
                    color_system="truecolor" if colors else None, show_locals=False
                ),
            ),
        ]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
            *([_redacting(redact)] if redact is not None else []),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _redacting(redact: Callable[[str], str]) -> Callable[[Any, str, Any], Any]:
    """The last processor: the rendered line (traceback included), redacted."""

    def processor(logger: Any, method: str, rendered: Any) -> Any:  # noqa: ARG001  structlog's signature
        return redact(rendered) if isinstance(rendered, str) else rendered

    return processor


def get_logger(**context: Any) -> Any:
    """A bound structlog logger carrying `context`."""
    return structlog.get_logger("migration_fsm").bind(**context)


#: C0 and C1 controls, DEL, and the Unicode line separators and bidirectional overrides that
#: can reorder or hide what a terminal shows.
_CONTROLS: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(value: object) -> str:
    """`value` as text with every control character shown as an escape (`\\x1b`, `\\u202e`):
    text from the database or an operator never reaches a terminal raw."""

    def show(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROLS.sub(show, str(value))


def _visible_values(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """The console renderer's values with their control characters shown (JSON escapes them)."""
    return {key: visible(value) if isinstance(value, str) else value for key, value in event_dict.items()}
