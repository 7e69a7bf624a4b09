"""`verify` is robust and whole (issue 11 item 6), on SQLite and on PostgreSQL.

- a row altered so that it no longer decodes is corruption (exit 4, the row named) for
  `verify`, `history` and `status`, never a traceback;
- every field the chain hashes, and the link to the previous row, is covered: altering any
  one of them makes `verify` fail;
- the rows outside the chain that guards trust (validation runs, the backfill checkpoint,
  `phase_entered_at`) are checked by `verify` and before a guard trusts them;
- the digests are pinned, and revision 0007 digests the rows written before it;
- `verify` prints the whole head hash, and `--expect-head HASH` detects a rewind of the tail
  together with the head, which the chain alone cannot.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import text, update

from migration_fsm.exceptions import DatabaseUnavailable
from migration_fsm.fsm import Phase, Trigger
from migration_fsm.journal import Journal, JournalEntry, journal_table, migrations_table, steps_table
from migration_fsm.journal.chain import row_digest
from migration_fsm.journal.db import make_engine
from migration_fsm.journal.revisions import alembic_config
from migration_fsm.journal.schema import backfill_table, validation_runs_table
from migration_fsm.tools import runs

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.support.cli import CliResult

NAME = "verified"
STEPS = [("tests.support.steps:step_a", None)]
READERS = (["verify"], ["history"], ["history", "--json"], ["status"], ["status", "--json"])


def _entry(**changes: Any) -> JournalEntry:
    values: dict[str, Any] = {
        "seq": 0,
        "trigger": Trigger.ADVANCE,
        "source": Phase.PREPARATION,
        "dest": Phase.DUAL_WRITE,
        "percent": 0,
        "status": "intent",
        "actor": "alice",
        "reason": "because",
        "forced": False,
        "guards": [{"name": "g", "passed": True, "detail": "fine", "duration_ms": 1}],
        "takeovers": [{"command": "resume", "holder": "bob"}],
        "started_at": datetime.now(UTC),
        "finished_at": None,
        "host": "test-host",
        "pid": 7,
        "error": None,
        "prev_hash": None,
        "hash": None,
    }
    return JournalEntry(**{**values, **changes})


def _journal(store: Journal) -> None:
    """`init`, one committed advance with guards, a takeover and a reason, one refused row."""
    store.create(NAME, "alice")
    lease, _ = store.claim(store.get(NAME), _entry(), STEPS, "alice [h:1]", 30)
    lease.start_step(0)
    lease.mark_step(0, "done")
    lease.commit()
    store.append_refused(store.get(NAME), _entry(source=Phase.DUAL_WRITE, dest=Phase.CUTOVER, error="no"))


def _run(cli: Callable[..., CliResult], url: str, *args: str) -> CliResult:
    return cli(*args, "--db", url, "-m", NAME)


def _sql(store: Journal, statement: Any, **params: Any) -> None:
    with store.transaction() as conn:
        conn.execute(statement, params)


def test_a_journal_written_by_this_version_verifies_and_prints_its_whole_head(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    _journal(store)
    result = _run(cli, upgraded_url, "verify")
    assert result.code == 0, result.stderr
    head = store.get(NAME).head_hash
    assert head is not None
    assert f"head {head}" in result.stdout.splitlines()


# -- every hashed field, and the link ------------------------------------------------------

#: column -> a different value of the right type for row #2 (the committed advance).
TAMPERED: dict[str, Any] = {
    "seq": 9,
    "trigger": "ramp",
    "source": "cutover",
    "dest": "cutover",
    "percent": 50,
    "status": "aborted",
    "actor": "mallory",
    "reason": "because!",
    "forced": True,
    "guards": [{"name": "g", "passed": False, "detail": "fine", "duration_ms": 1}],
    "takeovers": [],
    "started_at": datetime(2020, 1, 1, tzinfo=UTC),
    "finished_at": datetime(2020, 1, 1, tzinfo=UTC),
    "host": "other-host",
    "pid": 8,
    "error": "boom",
    "prev_hash": "0" * 64,
    "hash": "f" * 64,
}


def test_every_hashed_field_is_tampered_by_a_test() -> None:
    assert set(_entry().chained_fields(NAME)) - {"migration"} <= set(TAMPERED)


@pytest.mark.parametrize("column", sorted(TAMPERED))
def test_altering_any_hashed_field_or_the_link_fails_verify(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult], column: str
) -> None:
    _journal(store)
    migration_id = store.get(NAME).id
    _sql(
        store,
        update(journal_table)
        .where(journal_table.c.migration_id == migration_id, journal_table.c.seq == 2)
        .values({column: TAMPERED[column]}),
    )
    result = _run(cli, upgraded_url, "verify")
    assert result.code == 4, (column, result.stdout, result.stderr)
    assert "does not verify" in result.error_line


def test_renaming_the_migration_fails_verify(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    """The migration's name is hashed into every row: a journal moved to another name fails."""
    _journal(store)
    _sql(store, update(migrations_table).where(migrations_table.c.name == NAME).values(name="renamed"))
    result = cli("verify", "--db", upgraded_url, "-m", "renamed")
    assert result.code == 4, result.stderr
    assert "row #1 was altered" in result.error_line


# -- rows that no longer decode ------------------------------------------------------------


def _guard_context(store: Journal, url: str) -> Any:
    """The `ctx` a guard gets, on the migration as it stands."""
    from migration_fsm.config import load_settings
    from migration_fsm.log import get_logger
    from migration_fsm.plugins.context import Context

    state = store.get(NAME)
    return Context(
        migration=NAME,
        seq=None,
        source=state.phase,
        dest=state.phase,
        settings=load_settings(None, database_url=url),
        log=get_logger(),
        state=state,
        store=store,
        percent=state.percent,
    )


def _raw(store: Journal, sql: str) -> None:
    with store.transaction() as conn:
        conn.execute(text(sql))


@pytest.mark.parametrize(
    ("sql", "named", "sqlite_only"),
    [
        ("UPDATE mfsm_journal SET trigger = 'teleport' WHERE seq = 2", "row #2 does not decode", False),
        ("UPDATE mfsm_journal SET dest = 'nowhere' WHERE seq = 3", "row #3 does not decode", False),
        ("UPDATE mfsm_journal SET status = 'maybe' WHERE seq = 3", "row #3 does not decode", False),
        ("UPDATE mfsm_journal SET guards = '{not json' WHERE seq = 2", "row #2 does not decode", True),
        ("UPDATE mfsm_journal SET guards = '[1, 2]' WHERE seq = 2", "row #2 does not decode", False),
        ("UPDATE mfsm_journal SET started_at = 'yesterday' WHERE seq = 2", "row #2 does not decode", True),
        (
            "UPDATE mfsm_steps SET checkpoint = '{oops' WHERE seq = 2",
            "step 0 of row #2 does not decode",
            True,
        ),
        (
            "UPDATE mfsm_steps SET status = 'sideways' WHERE seq = 2",
            "step 0 of row #2 does not decode",
            False,
        ),
        (
            "UPDATE mfsm_migrations SET phase = 'limbo'",
            "the migration row of 'verified' does not decode",
            False,
        ),
        (
            "UPDATE mfsm_migrations SET phase_entered_at = 'soon'",
            "the migration row of 'verified' does not decode",
            True,
        ),
    ],
)
def test_a_row_that_no_longer_decodes_is_corruption_named_by_every_reader(
    store: Journal,
    upgraded_url: str,
    cli: Callable[..., CliResult],
    *,
    sql: str,
    named: str,
    sqlite_only: bool,
) -> None:
    _journal(store)
    if sqlite_only and store.dialect != "sqlite":
        # PostgreSQL's column types refuse the value (that corruption cannot be written there),
        # or read it as another valid one ('yesterday' is a timestamp): then the chain catches it.
        refused: list[str] = []
        try:
            _raw(store, sql)
        except DatabaseUnavailable as exc:
            refused.append(str(exc))
        if refused:
            assert "invalid input syntax" in refused[0]
        else:
            assert 4 == _run(cli, upgraded_url, "verify").code
        return
    _raw(store, sql)
    for args in READERS:
        if "mfsm_migrations" not in sql and args[0] == "status":
            continue  # status reads the migration row, and the journal row of a transition in progress
        result = _run(cli, upgraded_url, *args)
        assert result.code == 4, (args, result.stdout, result.stderr)
        assert named in result.error_line, (args, result.error_line)
        assert "Traceback" not in result.stderr


def test_verify_names_every_row_that_does_not_decode(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    _journal(store)
    _raw(store, "UPDATE mfsm_journal SET trigger = 'teleport' WHERE seq = 1")
    _raw(store, "UPDATE mfsm_journal SET dest = 'nowhere' WHERE seq = 3")
    result = _run(cli, upgraded_url, "verify")
    assert result.code == 4
    assert "row #1 does not decode" in result.error_line
    assert "row #3 does not decode" in result.error_line


def test_an_interrupted_transition_that_no_longer_decodes_is_corruption_for_status(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    store.create(NAME, "alice")
    store.claim(store.get(NAME), _entry(), STEPS, "alice [h:1]", 30)
    _raw(store, "UPDATE mfsm_steps SET status = 'sideways'")
    for args in (["status"], ["status", "--json"], ["verify"]):
        result = _run(cli, upgraded_url, *args)
        assert result.code == 4, (args, result.stderr)
        assert "step 0 of row #2 does not decode" in result.error_line


# -- the rows outside the chain that guards trust -----------------------------------------


def _validation(store: Journal, *, missing: int, started_at: datetime | None = None) -> int:
    now = started_at or datetime.now(UTC)
    summary = {
        "missing": missing,
        "mismatched": 0,
        "extra": 0,
        "status_differs": 0,
        "old_count": 3,
        "new_count": 3 - missing,
    }
    return runs.record_validation(
        store, NAME, phase="dual_write", started_at=now, finished_at=now, ok=missing == 0, summary=summary
    )


def test_a_validation_run_edited_to_pass_fails_verify_and_the_guard(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    """The defect: editing a failed run to "missing 0" made `checksums_match` pass while
    `verify` said the journal was fine."""
    from migration_fsm.plugins import guards

    _journal(store)
    run = _validation(store, missing=2)
    assert _run(cli, upgraded_url, "verify").code == 0
    bad = runs.latest_validation(store, NAME)
    assert bad is not None
    _sql(
        store,
        update(validation_runs_table)
        .where(validation_runs_table.c.id == run)
        .values(ok=True, summary={**bad.summary, "missing": 0, "new_count": 3}),
    )
    result = _run(cli, upgraded_url, "verify")
    assert result.code == 4
    assert f"validate run #{run} was altered" in result.error_line
    ctx = _guard_context(store, upgraded_url)
    verdict = guards.checksums_match(ctx)
    assert not verdict.passed
    assert f"validate run #{run} was altered" in verdict.detail
    _sql(store, update(validation_runs_table).values(digest=None))  # a digest removed is no better
    assert _run(cli, upgraded_url, "verify").code == 4


def test_a_backfill_checkpoint_edited_to_done_fails_verify_and_the_guard(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    from migration_fsm.plugins import guards

    _journal(store)
    runs.start_backfill(store, NAME)
    runs.save_backfill(store, NAME, cursor="k1", copied=1)
    progress = runs.backfill_progress(store, NAME)
    assert progress is not None
    assert progress.intact
    assert _run(cli, upgraded_url, "verify").code == 0
    _sql(store, update(backfill_table).where(backfill_table.c.migration == NAME).values(done=True))
    result = _run(cli, upgraded_url, "verify")
    assert result.code == 4
    assert "the backfill checkpoint was altered" in result.error_line
    ctx = _guard_context(store, upgraded_url)
    verdict = guards.backfill_complete(ctx)
    assert not verdict.passed
    assert "altered" in verdict.detail


def test_phase_entered_at_moved_back_fails_verify_and_every_transition_with_guards(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Any
) -> None:
    """Moving the phase's start back makes `min_soak` (and the guards that look at what
    happened since) pass early; it is outside the chain, so it is checked against it."""
    _journal(store)
    entered = store.get(NAME).phase_entered_at
    _sql(
        store,
        update(migrations_table)
        .where(migrations_table.c.name == NAME)
        .values(phase_entered_at=entered - timedelta(days=2)),
    )
    result = _run(cli, upgraded_url, "verify")
    assert result.code == 4
    assert "phase_entered_at" in result.error_line
    config = tmp_path / "soak.toml"
    config.write_text('min_soak_seconds = 3600\n[guards]\n"dual_write->cutover" = ["min_soak"]\n')
    before = store.get(NAME)
    result = cli("advance", "--db", upgraded_url, "-m", NAME, "--config", str(config))
    assert result.code == 4, result.stderr
    assert "phase_entered_at" in result.error_line
    assert before == store.get(NAME)


# -- pinned digests and the upgrade that digests old rows --------------------------------

PINNED_AT = datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=UTC)


def test_the_row_digests_are_pinned() -> None:
    """A database written by this version must verify with every later one: the digest
    formats never change (a new format gets a new version prefix)."""
    assert row_digest(
        "validation_run",
        {
            "id": 3,
            "migration": "orders",
            "phase": "dual_write",
            "started_at": PINNED_AT,
            "finished_at": PINNED_AT,
            "ok": False,
            "summary": {"missing": 2, "mismatched": 0, "note": "é"},
        },
    ) == ("v1:385731857dd62ee45104d7d109c7476c23da51390c2ecf3f79e664cb4c047556")
    assert row_digest(
        "backfill",
        {
            "migration": "orders",
            "cursor": "k0042",
            "copied": 42,
            "done": True,
            "started_at": PINNED_AT,
            "updated_at": PINNED_AT,
        },
    ) == ("v1:0d4b7c13b4f787ed0f34c3f27f7e9eb419f2cf9eeacdf55b1f6d428111e7a844")


def test_revision_0007_digests_the_rows_written_before_it(db_url: str, cli: Callable[..., CliResult]) -> None:
    from alembic import command

    store = Journal(db_url, engine=make_engine(db_url, create=True))
    try:
        cfg = alembic_config()
        with store.transaction() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0006")
        with store.transaction() as conn:
            conn.execute(
                text(
                    "INSERT INTO mfsm_validation_runs"
                    " (migration, phase, started_at, finished_at, ok, summary)"
                    " VALUES (:m, 'dual_write', :t, :t, false, :s)"
                ),
                {"m": NAME, "t": PINNED_AT, "s": '{"missing": 1, "mismatched": 0}'},
            )
            conn.execute(
                text(
                    "INSERT INTO mfsm_backfill (migration, cursor, copied, done, started_at, updated_at)"
                    " VALUES (:m, 'k9', 9, true, :t, :t)"
                ),
                {"m": NAME, "t": PINNED_AT},
            )
        store.upgrade()
        store.create(NAME, "alice")
        run = runs.latest_validation(store, NAME)
        progress = runs.backfill_progress(store, NAME)
        assert run is not None
        assert progress is not None
        assert (run.intact, progress.intact) == (True, True)
        assert run.summary["missing"] == 1
    finally:
        store.close()
    assert _run(cli, db_url, "verify").code == 0


# -- the anchor ---------------------------------------------------------------------------


def test_expect_head_detects_a_rewind_of_the_tail_and_the_head(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    """Deleting the last rows and setting the head back to the row before verifies (the chain
    is intact up to there): only a head kept outside the database detects it."""
    _journal(store)
    anchor = store.get(NAME).head_hash
    assert anchor is not None
    lease, _ = store.claim(
        store.get(NAME), _entry(source=Phase.DUAL_WRITE, dest=Phase.CUTOVER), [], "a [h:1]", 30
    )
    lease.commit()
    result = _run(cli, upgraded_url, "verify", "--expect-head", anchor)
    assert result.code == 0, result.stderr
    assert "the expected head is row #3" in result.stdout
    assert _run(cli, upgraded_url, "verify", "--expect-head", anchor[:12]).code == 0
    latest = store.get(NAME)
    assert latest.head_hash is not None
    # The rewind: row #4 goes, and the migration row is put back as it was after row #3.
    before = [line for line in _run(cli, upgraded_url, "status", "--json").stdout.splitlines() if line]
    assert before
    with store.transaction() as conn:
        conn.execute(journal_table.delete().where(journal_table.c.seq == 4))
        conn.execute(steps_table.delete().where(steps_table.c.seq == 4))
        conn.execute(
            update(migrations_table)
            .where(migrations_table.c.name == NAME)
            .values(
                phase="dual_write",
                last_seq=3,
                version=latest.version - 1,
                head_hash=anchor,
                phase_entered_at=store.journal(latest)[1].finished_at,
            )
        )
    assert _run(cli, upgraded_url, "verify").code == 0  # what the chain alone cannot detect
    result = _run(cli, upgraded_url, "verify", "--expect-head", latest.head_hash)
    assert result.code == 4
    assert "rewound or rewritten" in result.error_line
    assert _run(cli, upgraded_url, "verify", "--expect-head", "abc").code == 2
