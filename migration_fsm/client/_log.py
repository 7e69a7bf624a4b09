"""The client's logger and its one-line description of an error (shared by every module of
the client package, none of which may import another's internals in a cycle)."""

from __future__ import annotations

import logging

log = logging.getLogger("migration_fsm.client")


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line logs and repair entries."""
    from ..journal.db import redact_text

    text = redact_text(str(exc).strip())
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
