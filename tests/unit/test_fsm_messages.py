"""The machine's refusals say exactly what is wrong, with the trigger, the phase and what is
allowed; its self-checks refuse each kind of broken table. (Mutation survivors of fsm.py:
each assertion here is one a plausible one-line bug would break.)"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from migration_fsm import fsm
from migration_fsm.exceptions import TriggerNotAllowed
from migration_fsm.fsm import (
    EDGES,
    FINAL,
    INITIAL,
    Phase,
    Trigger,
    allowed_triggers,
    check_edges,
    check_graph,
    check_names,
    edge_for,
    mermaid,
    replay,
    resolve_edge,
    rollback_path,
    routing_for,
)


def test_a_rollback_to_a_phase_it_cannot_reach_says_so() -> None:
    with pytest.raises(TriggerNotAllowed) as info:
        rollback_path(Phase.DUAL_WRITE, Phase.CLEANUP)
    assert (
        "cannot roll back from 'dual_write' to 'cleanup':"
        " 'cleanup' is not an earlier phase reachable by rollback"
    ) == str(info.value)
    assert ("rollback", "dual_write", allowed_triggers(Phase.DUAL_WRITE)) == (
        info.value.trigger,
        info.value.phase,
        info.value.allowed,
    )


def test_a_rollback_to_the_current_phase_says_so() -> None:
    with pytest.raises(TriggerNotAllowed) as info:
        rollback_path(Phase.CUTOVER, Phase.CUTOVER)
    assert "the migration is already in 'cutover'" == str(info.value)
    assert ("rollback", "cutover", allowed_triggers(Phase.CUTOVER)) == (
        info.value.trigger,
        info.value.phase,
        info.value.allowed,
    )


def test_a_trigger_not_allowed_lists_what_is() -> None:
    with pytest.raises(TriggerNotAllowed) as info:
        resolve_edge(Phase.DUAL_WRITE, Trigger.RAMP)
    assert "'ramp' is not allowed from phase 'dual_write' (allowed: advance, rollback)" == str(info.value)
    with pytest.raises(TriggerNotAllowed) as final:
        resolve_edge(Phase.COMPLETE, Trigger.ADVANCE)
    assert "(allowed: none, the phase is final)" in str(final.value)
    with pytest.raises(TriggerNotAllowed) as direct:
        edge_for(Phase.PREPARATION, Trigger.RAMP)
    assert "'ramp' is not allowed from phase 'preparation'" == str(direct.value)


def test_resolving_an_edge_leaves_no_model_on_the_machine() -> None:
    before = len(fsm._MACHINE.models)
    for _ in range(3):
        resolve_edge(Phase.PREPARATION, Trigger.ADVANCE)
        with pytest.raises(TriggerNotAllowed):
            resolve_edge(Phase.PREPARATION, Trigger.RAMP)
    assert before == len(fsm._MACHINE.models)


INIT = (Trigger.INIT, None, Phase.PREPARATION, 0)


@pytest.mark.parametrize(
    ("rows", "says"),
    [
        ([], "no init row"),
        ([INIT, INIT], "unexpected init to preparation"),
        ([(Trigger.INIT, None, Phase.DUAL_WRITE, 0)], "unexpected init to dual_write"),
        (
            [(Trigger.ADVANCE, Phase.PREPARATION, Phase.DUAL_WRITE, 0)],
            "advance from preparation while the phase was None",
        ),
        (
            [INIT, (Trigger.ADVANCE, Phase.PREPARATION, Phase.CUTOVER, 0)],
            "advance from preparation leads to dual_write, not cutover",
        ),
    ],
)
def test_replay_says_which_row_breaks_the_machine(
    rows: list[tuple[Trigger, Phase | None, Phase, int]], says: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(says)}$"):
        replay(rows)


def test_the_graph_check_refuses_a_dead_end_and_a_final_phase_that_leaves() -> None:
    check_graph(EDGES, INITIAL, FINAL)  # the real table passes
    with pytest.raises(ValueError, match=r"^phase complete is a dead end$"):
        check_graph(EDGES, INITIAL, frozenset())
    with pytest.raises(ValueError, match=r"^final phase cleanup has outgoing edges$"):
        check_graph(EDGES, INITIAL, frozenset({Phase.COMPLETE, Phase.CLEANUP}))


def test_the_graph_check_refuses_a_routing_table_missing_a_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    partial = {phase: route for phase, route in fsm.ROUTING.items() if phase is not Phase.CLEANUP}
    monkeypatch.setattr(fsm, "ROUTING", partial)
    with pytest.raises(ValueError, match=r"^the routing table does not cover every phase$"):
        check_graph(EDGES, INITIAL, FINAL)


@pytest.mark.parametrize("rule", [True, -1, 101, 1.5])
def test_a_percent_rule_that_is_not_a_percent_is_refused(rule: Any) -> None:
    edge = next(e for e in EDGES if e.source is Phase.DUAL_WRITE and e.trigger is Trigger.ADVANCE)
    broken = dataclasses.replace(edge, rules=dataclasses.replace(edge.rules, percent=rule))
    with pytest.raises(ValueError, match=r"has percent rule .*, not 0\.\.100"):
        check_edges((broken,))


def test_a_default_step_with_another_undo_is_refused_naming_the_built_in_one() -> None:
    edge = next(e for e in EDGES if any(step.undo for step in e.rules.steps))
    step = next(s for s in edge.rules.steps if s.undo)
    guards = {name for e in EDGES for name in (*e.rules.always_on, *e.rules.guards)}
    steps = {name for e in EDGES for s in e.rules.steps for name in (s.name, s.undo) if name}
    says = f"undoes step '{step.name}' with {step.undo!r}, but the built-in undo is 'some_other_undo'"
    with pytest.raises(ValueError, match=re.escape(says)):
        check_names((edge,), guards, steps, {step.name: "some_other_undo"})


def test_the_diagram_ends_with_the_final_phases_and_one_newline() -> None:
    text = mermaid()
    assert text.startswith(f"stateDiagram-v2\n    [*] --> {INITIAL}\n")
    assert text.endswith("    complete --> [*]\n")


def test_routing_as_json_has_the_contract_keys_and_values() -> None:
    """`status --json`'s `routing` object (the contract's keys, in order)."""
    assert {
        "write_old": True,
        "write_new": True,
        "authoritative": "new",
        "read_from": "split",
        "read_fallback": "old",
        "consume_from": "new",
    } == routing_for(Phase.CUTOVER, 50).as_dict()
    assert ["write_old", "write_new", "authoritative", "read_from", "read_fallback", "consume_from"] == list(
        routing_for(Phase.DUAL_WRITE, 0).as_dict()
    )
    assert {"read_from": "old", "read_fallback": None} == {
        k: v for k, v in routing_for(Phase.DUAL_WRITE, 0).as_dict().items() if k.startswith("read")
    }
