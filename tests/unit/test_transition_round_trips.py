"""What one transition sends to its database, counted (never timed), so that it cannot creep
back: on PostgreSQL the round trips, statements and commits of libpq's protocol trace; on
SQLite the statements and transactions SQLAlchemy runs. docs/PERFORMANCE.md lists them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event

from migration_fsm.config import Settings
from migration_fsm.exceptions import Refused
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal
from migration_fsm.migration import Migration
from tests.support.pgtrace import engine_trace

#: An events-out target (never delivered to here: `Migration` only writes the outbox).
NOTIFY = [{"name": "hook", "url": "http://127.0.0.1:9/events", "timeout_seconds": 1}]


def _engine(store: Journal, make_settings: Callable[..., Settings]) -> Migration:
    engine = Migration(store, make_settings(notify=NOTIFY), "default")
    engine.init()
    return engine


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_advance_ramp_and_rollback_are_five_round_trips_and_two_commits_on_postgresql(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    """Lock and read (1), claim (1), the close's read (1) and write (1), unlock (1); 24 round
    trips and 4 COMMITs (2 of them ending reads) before the lock, claim and close were merged."""
    engine = _engine(store, make_settings)
    done: dict[str, tuple[int, int, int]] = {}
    for name, run in (
        ("advance", engine.advance),
        ("advance to cutover", engine.advance),
        ("ramp", lambda: engine.ramp(50)),
        ("rollback", lambda: engine.rollback(reason="counted")),
    ):
        with engine_trace(store.engine) as trace:
            run()
        done[name] = (trace.waits, len(trace.completed), trace.completed.count("COMMIT"))
    # (round trips, statements incl. BEGIN/COMMIT/ROLLBACK, commits)
    assert dict.fromkeys(done, (5, 11, 2)) == done
    assert Phase.DUAL_WRITE == store.get("default").phase


@dataclass
class _Counted:
    statements: list[str] = field(default_factory=list)
    commits: int = 0


@contextmanager
def _sqlite_count(store: Journal) -> Iterator[_Counted]:
    counted = _Counted()

    def statement(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        counted.statements.append(sql.split(maxsplit=1)[0].upper())

    def commit(_conn: Any) -> None:
        counted.commits += 1

    event.listen(store.engine, "before_cursor_execute", statement)
    event.listen(store.engine, "commit", commit)
    try:
        yield counted
    finally:
        event.remove(store.engine, "before_cursor_execute", statement)
        event.remove(store.engine, "commit", commit)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_advance_is_three_transactions_on_sqlite(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    """The read (migration and standing hold together), the claim, the close (one read, then
    the writes): 11 statements; 16 in 4 transactions before."""
    engine = _engine(store, make_settings)
    with _sqlite_count(store) as counted:
        engine.advance()
    assert 3 == counted.commits
    assert [
        *("BEGIN", "SELECT"),
        *("BEGIN", "UPDATE", "INSERT", "INSERT"),
        *("BEGIN", "SELECT", "UPDATE", "UPDATE", "INSERT"),
    ] == counted.statements


def test_the_read_taken_with_the_lock_sees_a_standing_hold_and_its_release(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    """`advance` reads the migration and whether a hold stands together, with the lock: a hold
    refuses it, and once released the next `advance` goes through (on SQLite and PostgreSQL)."""
    engine = _engine(store, make_settings)
    held = engine.hold(reason="error rate up", verdicts=[], seen_version=store.get("default").version)
    assert held is not None
    with pytest.raises(Refused, match="watch_hold"):
        engine.advance()
    engine.release(reason="looked again")
    assert "committed" == engine.advance().status
    assert Phase.DUAL_WRITE == store.get("default").phase
