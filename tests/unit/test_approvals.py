"""Approvals (`[approvals]`, `migration-fsm approve`): an edge that needs one is taken only
with a live approval by another operator; the approval is a hash-chained journal row; it
lapses with its ttl and when the phase changes; `--force` never replaces it; bad input
changes nothing. On SQLite and PostgreSQL, through the commands and the CLI as operators
run them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import update
from structlog.testing import capture_logs

from migration_fsm import commands
from migration_fsm.config import Settings
from migration_fsm.exceptions import BadInput, Refused, TransitionInterrupted
from migration_fsm.fsm import EntryStatus, Phase
from migration_fsm.journal import Journal, journal_table
from migration_fsm.migration import Migration
from tests.support import steps as engsteps

EDGE = "dual_write->cutover"


def as_(make_settings: Callable[..., Settings], actor: str, **approvals: Any) -> Settings:
    return make_settings(actor=actor, approvals={"edges": [EDGE], **approvals})


@pytest.fixture
def alice(make_settings: Callable[..., Settings], store: Journal) -> Settings:
    settings = as_(make_settings, "alice")
    commands.init(settings, "default")
    commands.advance(settings, "default")  # dual_write: the edge that needs an approval leaves it
    return settings


def test_an_approval_by_another_operator_lets_the_edge_be_taken(
    alice: Settings, make_settings: Callable[..., Settings]
) -> None:
    bob = as_(make_settings, "bob")
    with pytest.raises(
        Refused, match=r"dual_write->cutover needs an approval .*`migration-fsm approve --edge"
    ):
        commands.advance(alice, "default")
    entry = commands.approve(bob, "default", edge=EDGE, reason="load test passed")
    assert (EntryStatus.APPROVED, "bob", Phase.DUAL_WRITE, Phase.CUTOVER) == (
        entry.status,
        entry.actor,
        entry.source,
        entry.dest,
    )
    plan = commands.advance(alice, "default", dry_run=True)
    assert ("approval", True) == (plan.guards[0].name, plan.guards[0].passed)
    assert "approved by bob" in plan.guards[0].detail
    assert Phase.CUTOVER == commands.advance(alice, "default").edge.dest
    history = commands.history_json(commands.history(alice, "default"))
    assert ["committed", "committed", "refused", "approved", "committed"] == [e["status"] for e in history]
    assert ("bob", "load test passed") == (history[3]["actor"], history[3]["reason"])
    commands.verify(alice, "default")  # the approval is in the hash chain


def test_the_operator_who_approved_cannot_take_the_edge_and_force_does_not_replace_it(
    alice: Settings, make_settings: Callable[..., Settings]
) -> None:
    commands.approve(alice, "default", edge=EDGE, reason="I checked it myself")
    with pytest.raises(Refused, match=r"approved only by alice, who is taking it.*two-person rule"):
        commands.advance(alice, "default")
    with pytest.raises(Refused, match="an approval cannot be replaced by --force: get one"):
        commands.advance(alice, "default", force=True, reason="urgent")
    assert Phase.DUAL_WRITE == commands.status(alice, "default").state.phase
    carol = as_(make_settings, "carol")  # bob's approval would do for carol, alice's does too
    assert Phase.CUTOVER == commands.advance(carol, "default").edge.dest


def test_an_approval_lapses_when_the_phase_changes(
    alice: Settings, make_settings: Callable[..., Settings]
) -> None:
    bob = as_(make_settings, "bob")
    commands.approve(bob, "default", edge=EDGE, reason="ok")
    commands.rollback(alice, "default", reason="not yet")
    commands.advance(alice, "default")  # dual_write again: the earlier approval was for the last visit
    with pytest.raises(Refused, match="needs an approval"):
        commands.advance(alice, "default")


def test_an_approval_lapses_after_its_ttl(make_settings: Callable[..., Settings], store: Journal) -> None:
    alice = as_(make_settings, "alice", approval_ttl_seconds=0.5)
    commands.init(alice, "default")
    commands.advance(alice, "default")
    commands.approve(as_(make_settings, "bob"), "default", edge=EDGE, reason="ok")
    time.sleep(0.6)
    with pytest.raises(Refused, match=r"needs an approval given in this phase within 0.5 s"):
        commands.advance(alice, "default")


def test_bad_approvals_change_nothing(alice: Settings, make_settings: Callable[..., Settings]) -> None:
    bob = as_(make_settings, "bob")
    before = commands.status(alice, "default").state
    with pytest.raises(BadInput, match="--edge 'cutover->cleanup' needs no approval"):
        commands.approve(bob, "default", edge="cutover->cleanup", reason="x")
    with pytest.raises(BadInput, match="--edge 'nonsense' needs no approval"):
        commands.approve(bob, "default", edge="nonsense", reason="x")
    with pytest.raises(BadInput, match="approve needs a reason"):
        commands.approve(bob, "default", edge=EDGE, reason=" ")
    assert before == commands.status(alice, "default").state
    commands.rollback(alice, "default", reason="back")
    with pytest.raises(BadInput, match="does not leave the current phase preparation"):
        commands.approve(bob, "default", edge=EDGE, reason="x")
    assert 3 == commands.status(alice, "default").state.last_seq  # init, advance, rollback


def test_an_approval_waits_for_an_interrupted_transition(
    make_settings: Callable[..., Settings], store: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        actor="alice",
        approvals={"edges": ["cutover->cleanup"]},
        steps={"dual_write->cutover": ["tests.support.steps:flaky"]},
    )
    commands.init(settings, "default")
    commands.advance(settings, "default")
    monkeypatch.setenv(engsteps.FAIL_ENV, "1")
    with pytest.raises(Exception, match="injected failure"):
        commands.advance(settings, "default")
    bob = settings.model_copy(update={"actor": "bob"})
    with pytest.raises(TransitionInterrupted):
        Migration(store, bob, "default").approve("cutover->cleanup", reason="x")


def test_a_tampered_approval_fails_verify(
    alice: Settings, make_settings: Callable[..., Settings], store: Journal
) -> None:
    entry = commands.approve(as_(make_settings, "bob"), "default", edge=EDGE, reason="ok")
    commands.verify(alice, "default")
    with store.transaction() as conn:
        conn.execute(
            update(journal_table).where(journal_table.c.seq == entry.seq).values(actor="alice-again")
        )
    with pytest.raises(Exception, match=f"row #{entry.seq} was altered"):
        commands.verify(alice, "default")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_approves_and_refuses_bad_input_with_exit_2(
    alice: Settings, cli: Any, upgraded_url: str
) -> None:
    config = ["--db", upgraded_url]
    env = {"MIGRATION_FSM_APPROVALS": '{"edges": ["dual_write->cutover"]}'}
    refused = cli("advance", *config, "--actor", "alice", env=env)
    assert 1 == refused.code
    assert "needs an approval" in refused.error_line
    wrong = cli("approve", *config, "--actor", "bob", "--edge", "cleanup->complete", "--reason", "x", env=env)
    assert (
        2,
        "error: --edge 'cleanup->complete' needs no approval (edges that do: dual_write->cutover)",
    ) == (
        wrong.code,
        wrong.error_line,
    )
    done = cli("approve", *config, "--actor", "bob", "--edge", EDGE, "--reason", "soaked a day", env=env)
    assert (0, "approved dual_write->cutover as bob (#4): another operator may take it") == (
        done.code,
        done.stdout.strip(),
    )
    assert 0 == cli("advance", *config, "--actor", "alice", env=env).code


def test_approvals_config_names_advance_and_rollback_edges_only(
    make_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(Exception, match="'cutover->cutover' is not an advance or rollback edge"):
        make_settings(approvals={"edges": ["cutover->cutover"]})
    with pytest.raises(Exception, match="'up->down' is not an advance or rollback edge"):
        make_settings(approvals={"edges": ["up->down"]})


def test_an_edge_that_needs_no_approval_is_refused_naming_those_that_do(
    make_settings: Callable[..., Settings], store: Journal
) -> None:
    two = make_settings(actor="bob", approvals={"edges": [EDGE, "cleanup->complete"]})
    none = make_settings(actor="bob")
    commands.init(two, "default")
    with pytest.raises(BadInput) as refused:
        commands.approve(two, "default", edge="cutover->cleanup", reason="x")
    assert (
        "--edge 'cutover->cleanup' needs no approval (edges that do: dual_write->cutover, cleanup->complete)"
        == str(refused.value)
    )
    with pytest.raises(BadInput) as refused:
        commands.approve(none, "default", edge=EDGE, reason="x")
    assert (
        "--edge 'dual_write->cutover' needs no approval (edges that do: none: [approvals] lists no edge)"
        == str(refused.value)
    )
    commands.advance(two, "default")
    with capture_logs() as logs:
        entry = commands.approve(two, "default", edge=EDGE, reason="soaked")
    assert [{"migration": "default", "seq": entry.seq, "edge": EDGE, "actor": "bob"}] == [
        {k: v for k, v in line.items() if k not in ("event", "log_level")}
        for line in logs
        if line["event"] == "approval"
    ]
