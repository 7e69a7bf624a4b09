"""Every error migration-fsm raises, each carrying the CLI exit code it maps to.

This module is a leaf: it imports nothing from the package.

::

    MigrationFSMError                 exit 1 unless a subclass says otherwise
    ├── Refused                       1  a guard refused the edge
    ├── StepFailed                    1  a step raised; the transition is interrupted
    ├── DataError                     1  the tasks are wrong (bad record, duplicate key, bad archive)
    ├── DualWriteError                1  a strict DualWriter missed the second side (repair entry kept)
    ├── BadInput                      2  nothing was written
    │   ├── ConfigError               2  malformed config (names the key)
    │   ├── UnknownMigration          2
    │   └── TriggerNotAllowed         2  trigger not allowed from the current phase
    ├── Conflict                      3  nothing was written
    │   ├── LeaseHeld                 3  another operator holds the lease or lock
    │   ├── ConcurrentChange          3  the migration moved under us
    │   └── TransitionInterrupted     3  `resume` or `abort` first
    └── EnvironmentProblem            4
        ├── DatabaseUnavailable       4
        ├── SchemaNotCurrent          4  run `migration-fsm db upgrade`
        └── JournalCorrupt            4  `verify` failed

    any other exception               70 a bug in migration-fsm (EX_SOFTWARE); `--traceback` shows it
    Ctrl-C                            130
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime

#: The CLI's exit code for an error that is not a `MigrationFSMError`: a bug, not a refusal
#: (`EX_SOFTWARE` of sysexits.h). `migration-fsm --traceback COMMAND` prints its traceback.
UNEXPECTED_ERROR_EXIT_CODE = 70


class MigrationFSMError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Refused(MigrationFSMError):
    """A guard refused the transition (journaled as `refused`)."""

    exit_code = 1


class StepFailed(MigrationFSMError):
    """A step raised: the transition is left interrupted with the error recorded."""

    exit_code = 1


class DataError(MigrationFSMError):
    """The tasks themselves are wrong: a bad record, a duplicate or unordered key, an archive
    that does not verify. The message names the store and the key; no batch is half-written."""

    exit_code = 1


class DualWriteError(MigrationFSMError):
    """A strict `DualWriter` could not write the second side (a repair entry was recorded)."""

    exit_code = 1


class BadInput(MigrationFSMError):
    """The request itself is wrong; nothing was written."""

    exit_code = 2


class ConfigError(BadInput):
    """The configuration is malformed; the message names the key."""


class UnknownMigration(BadInput):
    """No migration of that name exists in this database."""


class TriggerNotAllowed(BadInput):
    """The trigger has no edge from the current phase.

    `trigger` is what was asked, `phase` the phase it was asked in, `allowed` the triggers
    that phase has edges for (empty for a final phase). Raised without them, `trigger` and
    `phase` are None and `allowed` is empty.
    """

    def __init__(
        self,
        message: str,
        *,
        trigger: str | None = None,
        phase: str | None = None,
        allowed: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.trigger = trigger
        self.phase = phase
        self.allowed: list[str] = list(allowed) if allowed is not None else []

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle with the fields (the default would keep the message only)."""
        return (_trigger_not_allowed, (self.message, self.trigger, self.phase, self.allowed))


class Conflict(MigrationFSMError):
    """Another operator, or an unfinished transition, is in the way."""

    exit_code = 3


class LeaseHeld(Conflict):
    """Another operator holds the lease (or the PostgreSQL advisory lock).

    `holder` names that operator and `expires_at` is when its lease ends, when known."""

    def __init__(
        self, message: str, *, holder: str | None = None, expires_at: datetime | None = None
    ) -> None:
        super().__init__(message)
        self.holder = holder
        self.expires_at = expires_at


class ConcurrentChange(Conflict):
    """The migration row changed between our read and our write."""


class TransitionInterrupted(Conflict):
    """A transition is interrupted; only `resume` or `abort` may act."""


class EnvironmentProblem(MigrationFSMError):
    """The database or its schema is not usable."""

    exit_code = 4


class DatabaseUnavailable(EnvironmentProblem):
    """The database cannot be reached or opened."""


class SchemaNotCurrent(EnvironmentProblem):
    """The schema is missing or behind the Alembic head."""


class JournalCorrupt(EnvironmentProblem):
    """The journal's hash chain or replay does not match the stored state."""


def _trigger_not_allowed(
    message: str, trigger: str | None, phase: str | None, allowed: list[str]
) -> TriggerNotAllowed:
    return TriggerNotAllowed(message, trigger=trigger, phase=phase, allowed=allowed)
