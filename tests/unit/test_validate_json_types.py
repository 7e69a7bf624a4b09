"""`validate` compares payloads as JSON, type-aware: `true`, `1` and `1.0` are three values
(Python's `==` says they are one), and key order alone is never a difference. Its verdict for
every key equals "the canonical JSON differs", over a generated family of JSON values
(memory stores) and a fixed family through SQL tables on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus, canonical_json, same_json
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools.validate import classify, validate
from tests.support.datatools import create_task_table

AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(max_size=6), json_values, max_size=5)


def confuse(value: Any) -> Any:
    """The same value as Python's `==` sees it, in other JSON types: true -> 1, 1 -> 1.0,
    1.0 -> 1 (and key order reversed)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return float(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [confuse(item) for item in value]
    if isinstance(value, dict):
        return {key: confuse(item) for key, item in reversed(value.items())}
    return value


def reorder(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, list):
        return [reorder(item) for item in value]
    if isinstance(value, dict):
        return {key: reorder(item) for key, item in reversed(value.items())}
    return value


@st.composite
def payload_pairs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    first = draw(payloads)
    how = draw(st.sampled_from(["same", "reordered", "confused", "other"]))
    if how == "same":
        return first, dict(first)
    if how == "reordered":
        return first, reorder(first)
    if how == "confused":
        return first, confuse(first)
    return first, draw(payloads)


def record(key: str, payload: dict[str, Any]) -> TaskRecord:
    return TaskRecord(
        key=key, type="send", payload=payload, status=TaskStatus.PENDING, created_at=AT, updated_at=AT
    )


def canonical_differs(a: Any, b: Any) -> bool:
    return canonical_json(a) != canonical_json(b)


@given(st.lists(payload_pairs(), min_size=1, max_size=12))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_verdict_is_canonical_json_differs(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    old = MemoryTaskStore("old", [record(f"k{i:03d}", a) for i, (a, _) in enumerate(pairs)])
    new = MemoryTaskStore("new", [record(f"k{i:03d}", b) for i, (_, b) in enumerate(pairs)])
    report = validate(old, new, batch_size=5, settle=0, sample_size=len(pairs))
    expected = {f"k{i:03d}" for i, (a, b) in enumerate(pairs) if canonical_differs(a, b)}
    assert expected == {sample["key"] for sample in report.sample_mismatched}
    assert len(expected) == report.mismatched
    assert report.ok is (not expected)
    for a, b in pairs:
        assert same_json(a, b) is not canonical_differs(a, b)
        verdict = classify(record("k", a), record("k", b))
        assert (verdict is not None) is canonical_differs(a, b)


@given(json_values, json_values)
@settings(max_examples=300, deadline=None)
def test_same_json_is_canonical_equality(a: Any, b: Any) -> None:
    assert same_json(a, b) is not canonical_differs(a, b)
    assert same_json(a, reorder(a))
    if canonical_differs(a, confuse(a)):
        assert not same_json(a, confuse(a))


#: (old payload, new payload, differs) through real tables.
FAMILY: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
    ({"v": True}, {"v": 1}, True),
    ({"v": 1}, {"v": 1.0}, True),
    ({"v": [True, 2]}, {"v": [1, 2]}, True),
    ({"v": False}, {"v": 0}, True),
    ({"v": {"x": 1.5}}, {"v": {"x": 1.5}}, False),
    ({"a": 1, "b": [1, {"c": None}]}, {"b": [1, {"c": None}], "a": 1}, False),
    ({"v": "1"}, {"v": 1}, True),
    ({"v": None}, {}, True),
    ({"v": 2**40}, {"v": float(2**40)}, True),
]


@pytest.mark.parametrize("fast", [True, False], ids=["identity-rows", "records"])
def test_a_family_through_sql_tables(db_url: str, fast: bool) -> None:
    """Both of validate's paths (raw identity rows, decoded records) on the real tables."""
    create_task_table(db_url, "old_tasks")
    create_task_table(db_url, "new_tasks")
    with (
        SqlTaskStore(db_url, "old_tasks", name="old") as old,
        SqlTaskStore(db_url, "new_tasks", name="new") as new,
    ):
        old.put_many([record(f"k{i}", a) for i, (a, _, _) in enumerate(FAMILY)])
        new.put_many([record(f"k{i}", b) for i, (_, b, _) in enumerate(FAMILY)])
        report = validate(old, new, batch_size=4, settle=0, sample_size=len(FAMILY), fast=fast)
    expected = {f"k{i}" for i, (_, _, differs) in enumerate(FAMILY) if differs}
    assert expected == {sample["key"] for sample in report.sample_mismatched}
    assert (len(expected), False) == (report.mismatched, report.ok)


def test_minus_zero_is_its_own_json() -> None:
    assert not same_json(-0.0, 0.0)
    assert math.copysign(1.0, -0.0) < 0
    assert same_json({"a": [1.5, "x"]}, {"a": [1.5, "x"]})
