"""Metric guards: a Prometheus query answered by a tiny server of the test's own speaking the
Prometheus HTTP API, a read-only query on a real store table (SQLite and PostgreSQL), the
new side's failure and completion rates; before an edge, in the journal, and as config."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from migration_fsm.commands import history_json, verify
from migration_fsm.config import Settings
from migration_fsm.exceptions import Refused
from migration_fsm.fsm import EntryStatus, Phase
from migration_fsm.journal import Journal, make_engine, utcnow
from migration_fsm.log import get_logger
from migration_fsm.migration import Migration
from migration_fsm.plugins import guards
from migration_fsm.plugins.context import Context
from migration_fsm.plugins.metric_guards import Outcome, evaluate_metric_guard
from migration_fsm.tasks.records import TaskStatus
from migration_fsm.tasks.sides import open_side
from tests.support.cli import CliResult
from tests.support.datatools import create_task_table, sql_stores, task, write_stores_config
from tests.support.prometheus import FakePrometheus, matrix, success, vector

# -- a Prometheus of the test's own (tests/support/prometheus.py) ------------------------


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    yield fake
    fake.close()


def prom_settings(make: Callable[..., Settings], url: str, **guard: Any) -> Settings:
    """Settings with one prometheus metric guard `error_rate` (max 0.01 unless given) on
    preparation->dual_write."""
    config: dict[str, Any] = {
        "kind": "prometheus",
        "url": url,
        "query": "sum(rate(failed[5m])) / sum(rate(all[5m]))",
    }
    config.update(guard)
    if "min" not in config:
        config.setdefault("max", 0.01)
    return make(metric_guards={"error_rate": config}, guards={"preparation->dual_write": ["error_rate"]})


def plain_settings(**overrides: Any) -> Settings:
    from migration_fsm.config import load_settings

    return load_settings(None, actor="tester", **overrides)


# -- Prometheus verdicts ------------------------------------------------------------------


def test_an_instant_query_passes_or_fails_against_max_and_names_the_value(prometheus: FakePrometheus) -> None:
    """for_seconds 0 is one /api/v1/query; the value and the threshold are in the detail."""
    settings = prom_settings(plain_settings, prometheus.url)
    prometheus.answer = lambda path, form: (200, vector(0.004))
    verdict = evaluate_metric_guard(settings, "error_rate")
    assert (Outcome.PASSED, 0.004, "error_rate = 0.004 (max 0.01)") == (
        verdict.outcome,
        verdict.value,
        verdict.detail,
    )
    assert ("/api/v1/query", None) == (prometheus.requests[-1][0], prometheus.authorizations[-1])
    assert "sum(rate(failed[5m])) / sum(rate(all[5m]))" == prometheus.requests[-1][1]["query"]
    prometheus.answer = lambda path, form: (200, vector(0.0123))
    verdict = evaluate_metric_guard(settings, "error_rate")
    assert (Outcome.FAILED, 0.0123, "error_rate = 0.0123 (max 0.01): 0.0123 is above max 0.01") == (
        verdict.outcome,
        verdict.value,
        verdict.detail,
    )


def test_every_series_must_pass_and_the_worst_is_named(prometheus: FakePrometheus) -> None:
    """Three series, one over the max: failed, naming that series and its value."""
    settings = prom_settings(plain_settings, prometheus.url)
    prometheus.answer = lambda path, form: (200, vector(0.001, 0.05, 0.002))
    verdict = evaluate_metric_guard(settings, "error_rate")
    assert Outcome.FAILED is verdict.outcome
    assert 0.05 == verdict.value
    assert 'the worst of 3 series, {pod="p1"}' in verdict.detail
    assert (('{pod="p0"}', 0.001), ('{pod="p1"}', 0.05), ('{pod="p2"}', 0.002)) == verdict.values


def test_a_scalar_result_and_min_thresholds(prometheus: FakePrometheus) -> None:
    """A scalar answer is one value; min fails below it, passes at it; min and max together."""
    settings = prom_settings(plain_settings, prometheus.url, min=0.99)
    prometheus.answer = lambda path, form: (200, success("scalar", [1_700_000_000, "0.985"]))
    verdict = evaluate_metric_guard(settings, "error_rate")
    assert (Outcome.FAILED, "error_rate = 0.985 (min 0.99): 0.985 is below min 0.99") == (
        verdict.outcome,
        verdict.detail,
    )
    prometheus.answer = lambda path, form: (200, success("scalar", [1_700_000_000, "0.99"]))
    assert Outcome.PASSED is evaluate_metric_guard(settings, "error_rate").outcome
    both = prom_settings(plain_settings, prometheus.url, min=0.5, max=2)
    prometheus.answer = lambda path, form: (200, vector(1, 3))
    verdict = evaluate_metric_guard(both, "error_rate")
    assert (Outcome.FAILED, 3.0) == (verdict.outcome, verdict.value)
    assert "(min 0.5, max 2): 3 is above max 2" in verdict.detail


def test_for_seconds_is_a_range_query_where_one_bad_sample_fails(prometheus: FakePrometheus) -> None:
    """With for_seconds every sample over the window must pass: one bad sample fails the guard."""
    settings = prom_settings(plain_settings, prometheus.url, for_seconds=600, step_seconds=30)
    prometheus.answer = lambda path, form: (200, matrix(form, lambda n: 0.001, lambda n: 0.002))
    now = time.time()
    verdict = evaluate_metric_guard(settings, "error_rate", now=now)
    assert Outcome.PASSED is verdict.outcome, verdict.detail
    path, form = prometheus.requests[-1]
    assert ("/api/v1/query_range", 600.0, "30") == (
        path,
        round(float(form["end"]) - float(form["start"]), 3),
        form["step"],
    )
    assert "the worst of 42 samples over the last 600 s" in verdict.detail
    prometheus.answer = lambda path, form: (
        200,
        matrix(form, lambda n: 0.001, lambda n: 0.5 if n == 7 else 0.0),
    )
    verdict = evaluate_metric_guard(settings, "error_rate", now=now)
    assert (Outcome.FAILED, 0.5) == (verdict.outcome, verdict.value)
    assert 'ratio{pod="p1"}' in verdict.detail


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ((200, vector()), "the query returned no series"),
        ((200, vector("NaN")), 'inconclusive: {pod="p0"} is NaN at'),
        ((200, b"<html>not json"), "answered something that is not a query result (JSONDecodeError"),
        ((200, success("string", [1, "x"])), "returned a string, not a number"),
        (
            (400, b'{"status":"error","errorType":"bad_data","error":"parse error at char 4"}'),
            "answered HTTP 400: bad_data: parse error at char 4",
        ),
    ],
)
def test_prometheus_answers_that_prove_nothing_are_inconclusive(
    prometheus: FakePrometheus, answer: tuple[int, bytes], why: str
) -> None:
    """Empty result, NaN, malformed JSON, a string, an error status: inconclusive, saying why."""
    settings = prom_settings(plain_settings, prometheus.url)
    prometheus.answer = lambda path, form: answer
    verdict = evaluate_metric_guard(settings, "error_rate")
    assert Outcome.INCONCLUSIVE is verdict.outcome
    assert why in verdict.detail
    assert verdict.detail.startswith("inconclusive: ")
    assert verdict.detail.endswith("(max 0.01): cannot prove the edge safe")


def test_a_range_that_does_not_cover_for_seconds_is_inconclusive(prometheus: FakePrometheus) -> None:
    """Samples only for the last minute of ten cannot show the condition held for ten."""
    settings = prom_settings(plain_settings, prometheus.url, for_seconds=600, step_seconds=15)

    def recent(path: str, form: dict[str, str]) -> tuple[int, bytes]:
        return 200, matrix({**form, "start": str(float(form["end"]) - 60)}, lambda n: 0.0)

    prometheus.answer = recent
    verdict = evaluate_metric_guard(settings, "error_rate")
    assert Outcome.INCONCLUSIVE is verdict.outcome
    assert "cover only the last 60 s of the 600 s asked" in verdict.detail


def test_an_unreachable_or_slow_prometheus_is_inconclusive(prometheus: FakePrometheus) -> None:
    """Nothing listening: inconclusive at once; an answer slower than timeout_seconds: inconclusive then."""
    url = prometheus.url
    gate = threading.Event()

    def slow(path: str, form: dict[str, str]) -> tuple[int, bytes]:
        gate.wait(5)
        return 200, vector(0.0)

    prometheus.answer = slow
    settings = prom_settings(plain_settings, url, timeout_seconds=0.3)
    started = time.monotonic()
    verdict = evaluate_metric_guard(settings, "error_rate")
    assert time.monotonic() - started < 3
    gate.set()
    assert Outcome.INCONCLUSIVE is verdict.outcome
    assert "is unreachable: " in verdict.detail
    prometheus.close()
    verdict = evaluate_metric_guard(settings, "error_rate")
    assert (Outcome.INCONCLUSIVE, None) == (verdict.outcome, verdict.value)
    assert f"Prometheus {url}/api/v1/query is unreachable: " in verdict.detail


# -- before an edge, in the journal -------------------------------------------------------


def test_a_failing_metric_guard_refuses_the_edge_and_journals_its_value(
    store: Journal, make_settings: Callable[..., Settings], prometheus: FakePrometheus
) -> None:
    """Failed: refused (exit 1) with the value in the stored guard dict; --force --reason
    overrides; the chain verifies; history --json keeps its documented keys."""
    settings = prom_settings(make_settings, prometheus.url)
    engine = Migration(store, settings, "default")
    engine.init()
    prometheus.answer = lambda path, form: (200, vector(0.02))
    with pytest.raises(
        Refused, match=r"refused by error_rate \(error_rate = 0.02 \(max 0.01\): 0.02 is above"
    ):
        engine.advance()
    refused = store.journal(store.get("default"))[-1]
    assert EntryStatus.REFUSED == refused.status
    assert [{"name": "error_rate", "passed": False, "value": 0.02}] == [
        {k: g[k] for k in ("name", "passed", "value")} for g in refused.guards
    ]
    forced = engine.advance(force=True, reason="the rate is a known spike")
    assert (EntryStatus.COMMITTED, True) == (forced.status, forced.forced)
    assert Phase.DUAL_WRITE is store.get("default").phase
    assert 3 == verify(settings, "default").rows
    shown = history_json(store.journal(store.get("default")))
    assert [["name", "passed", "detail"]] * 2 == [list(g) for e in shown for g in e["guards"]]


def test_an_inconclusive_metric_refuses_the_edge_and_says_why(
    store: Journal, make_settings: Callable[..., Settings], prometheus: FakePrometheus
) -> None:
    """Prometheus down: refused, naming the unreachable URL; nothing but the refused row changes."""
    url = prometheus.url
    prometheus.close()
    engine = Migration(store, prom_settings(make_settings, url), "default")
    engine.init()
    version = store.get("default").version
    with pytest.raises(Refused, match=r"refused by error_rate \(inconclusive: Prometheus .* is unreachable"):
        engine.advance()
    state = store.get("default")
    assert (Phase.PREPARATION, version) == (state.phase, state.version)
    assert "value" not in store.journal(state)[-1].guards[0]


def test_a_dry_run_guard_journals_would_refuse_and_lets_the_edge_through(
    store: Journal, make_settings: Callable[..., Settings], prometheus: FakePrometheus
) -> None:
    """dry_run = true: a failed verdict is journaled as "dry run: would refuse: ..."; the edge is taken."""
    settings = prom_settings(make_settings, prometheus.url, dry_run=True)
    engine = Migration(store, settings, "default")
    engine.init()
    prometheus.answer = lambda path, form: (200, vector(0.5))
    outcome = engine.advance()
    assert (EntryStatus.COMMITTED, False) == (outcome.status, outcome.forced)
    guard = store.journal(store.get("default"))[-1].guards[0]
    assert (True, 0.5) == (guard["passed"], guard["value"])
    assert "dry run: would refuse: error_rate = 0.5 (max 0.01): 0.5 is above max 0.01" == guard["detail"]
    assert 2 == verify(settings, "default").rows


def test_the_journaled_value_is_covered_by_the_hash_chain(
    store: Journal, make_settings: Callable[..., Settings], prometheus: FakePrometheus
) -> None:
    """A refused row's guard value edited in the database: `verify` says the row was altered."""
    from sqlalchemy import update

    from migration_fsm.exceptions import JournalCorrupt
    from migration_fsm.journal.schema import journal_table

    settings = prom_settings(make_settings, prometheus.url)
    engine = Migration(store, settings, "default")
    engine.init()
    prometheus.answer = lambda path, form: (200, vector(0.02))
    with pytest.raises(Refused):
        engine.advance()
    entry = store.journal(store.get("default"))[-1]
    assert 2 == verify(settings, "default").rows
    edited = [{**entry.guards[0], "value": 0.002}]
    with store.transaction() as conn:
        conn.execute(update(journal_table).where(journal_table.c.seq == entry.seq).values(guards=edited))
    with pytest.raises(JournalCorrupt, match=f"row #{entry.seq} was altered"):
        verify(settings, "default")


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(prometheus: FakePrometheus) -> None:
    """http://user:secret@host: an Authorization header; the detail names the URL without them."""
    url = prometheus.url.replace("http://", "http://ops:s%40cret@")
    prometheus.answer = lambda path, form: (503, b"down for maintenance")
    verdict = evaluate_metric_guard(prom_settings(plain_settings, url), "error_rate")
    assert ["Basic b3BzOnNAY3JldA=="] == prometheus.authorizations  # base64 of "ops:s@cret"
    assert (
        f"Prometheus {prometheus.url}/api/v1/query answered HTTP 503: down for maintenance" in verdict.detail
    )
    assert "cret" not in verdict.detail


# -- sql ----------------------------------------------------------------------------------


@pytest.fixture
def task_tables(upgraded_url: str) -> str:
    """Task tables old_tasks and new_tasks in the test database; new_tasks holds 99 completed
    tasks and 1 failed one."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    settings = plain_settings(database_url=upgraded_url, stores=sql_stores(upgraded_url))
    with open_side(settings, "new") as new:
        new.put_many([task(i, status=TaskStatus.COMPLETED) for i in range(99)])
        new.put(task(99, status=TaskStatus.FAILED))
    return upgraded_url


FAILURE_SHARE = (
    "SELECT CAST(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS FLOAT) / COUNT(*) FROM new_tasks"
)


def sql_settings(url: str, query: str, **guard: Any) -> Settings:
    config: dict[str, Any] = {"kind": "sql", "store": "new", "query": query, "max": 0.02, **guard}
    return plain_settings(database_url=url, stores=sql_stores(url), metric_guards={"new_failures": config})


def test_a_sql_guard_reads_one_number_from_a_store_table(task_tables: str) -> None:
    """1 failed of 100: passes under max 0.02, fails under max 0.005, with the value."""
    verdict = evaluate_metric_guard(sql_settings(task_tables, FAILURE_SHARE), "new_failures")
    assert (Outcome.PASSED, 0.01, "new_failures = 0.01 (max 0.02)") == (
        verdict.outcome,
        verdict.value,
        verdict.detail,
    )
    verdict = evaluate_metric_guard(sql_settings(task_tables, FAILURE_SHARE, max=0.005), "new_failures")
    assert (Outcome.FAILED, 0.01) == (verdict.outcome, verdict.value)


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("SELECT MAX(attempts) FROM new_tasks WHERE 1 = 0", "the query returned NULL"),
        ("SELECT attempts FROM new_tasks WHERE 1 = 0", "the query returned no row"),
        ("SELECT attempts FROM new_tasks", "the query returned several rows, not one number"),
        ("SELECT 1, 2", "the query returned 2 columns, not one number"),
        ("SELECT 'many'", "the query returned 'many', not a number"),
        ("SELECT * FROM no_such_table", "refused the query: "),
    ],
)
def test_a_sql_guard_without_one_number_is_inconclusive(task_tables: str, query: str, why: str) -> None:
    """NULL, no row, several rows or columns, text, an error: inconclusive, saying which."""
    verdict = evaluate_metric_guard(sql_settings(task_tables, query), "new_failures")
    assert (Outcome.INCONCLUSIVE, None) == (verdict.outcome, verdict.value)
    assert why in verdict.detail


def test_a_sql_guard_that_tries_to_write_is_refused_by_the_read_only_transaction(task_tables: str) -> None:
    """DELETE (and on PostgreSQL, COMMIT then DELETE) fails inconclusive and deletes nothing."""
    queries = ["DELETE FROM new_tasks"]
    if task_tables.startswith("postgresql"):
        queries.append("COMMIT; DELETE FROM new_tasks")
    for query in queries:
        verdict = evaluate_metric_guard(sql_settings(task_tables, query), "new_failures")
        assert Outcome.INCONCLUSIVE is verdict.outcome, query
        assert "read-only" in verdict.detail or "readonly" in verdict.detail, verdict.detail
    engine = make_engine(task_tables)
    with engine.connect() as conn:
        assert 100 == conn.execute(text("SELECT COUNT(*) FROM new_tasks")).scalar_one()
    engine.dispose()


def test_a_slow_sql_guard_stops_at_timeout_seconds(task_tables: str) -> None:
    """A query still running after timeout_seconds is stopped: inconclusive, in about that time."""
    slow = (
        "SELECT pg_sleep(10)::int"
        if task_tables.startswith("postgresql")
        else "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c"
    )
    started = time.monotonic()
    verdict = evaluate_metric_guard(sql_settings(task_tables, slow, timeout_seconds=0.5), "new_failures")
    assert time.monotonic() - started < 5
    assert Outcome.INCONCLUSIVE is verdict.outcome
    assert "refused the query: " in verdict.detail


# -- the new side's failure and completion rates -----------------------------------------


def rate_context(store: Journal, settings: Settings) -> Context:
    state = store.get("default")
    return Context(
        migration="default",
        seq=None,
        source=state.phase,
        dest=state.phase,
        settings=settings,
        log=get_logger(),
        state=state,
        store=store,
        percent=state.percent,
    )


def test_completion_rate_ok_counts_completed_among_finished_since_the_phase(
    store: Journal, make_settings: Callable[..., Settings], upgraded_url: str
) -> None:
    """completed / (completed + failed + cancelled) on the new side since the phase began,
    against min_completion_rate; the built-in and a configured completion_rate kind agree."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    settings = make_settings(stores=sql_stores(upgraded_url))
    Migration(store, settings, "default").init()
    ctx = rate_context(store, settings)
    verdict = guards.completion_rate_ok(ctx)
    assert (True, None) == (verdict.passed, verdict.value)
    assert verdict.detail.startswith("no task finished on the new side since preparation was entered at")
    assert verdict.detail.endswith("(minimum 99.00%)")
    now = utcnow() + timedelta(seconds=1)
    with open_side(settings, "new") as new:
        new.put(task(0, status=TaskStatus.COMPLETED))  # finished before the phase: not counted
        new.put_many([
            task(i, status=TaskStatus.COMPLETED).model_copy(update={"updated_at": now}) for i in range(1, 198)
        ])  # fmt: skip
        new.put(task(198, status=TaskStatus.CANCELLED).model_copy(update={"updated_at": now}))
        new.put(task(199, status=TaskStatus.FAILED).model_copy(update={"updated_at": now}))
        new.put(task(200, status=TaskStatus.PENDING).model_copy(update={"updated_at": now}))
    verdict = guards.completion_rate_ok(ctx)
    assert (
        False,
        197 / 199,
        "197 completed of 199 finished on the new side = 98.99% (minimum 99.00%): find out why tasks"
        " fail or are cancelled on the new side",
    ) == (verdict.passed, verdict.value, verdict.detail)
    looser = settings.model_copy(update={"min_completion_rate": 0.98})
    assert guards.completion_rate_ok(rate_context(store, looser)).passed
    configured = make_settings(
        stores=sql_stores(upgraded_url),
        metric_guards={"completions": {"kind": "completion_rate", "min": 0.995, "dry_run": True}},
    )
    dry = evaluate_metric_guard(configured, "completions", since=store.get("default").phase_entered_at)
    assert (Outcome.FAILED, 197 / 199) == (dry.outcome, dry.value)
    shown = dry.as_guard_verdict()
    assert shown.passed
    assert shown.detail.startswith(
        "dry run: would refuse: 197 completed of 199 finished on the new side = 98.99%"
    )
    failures = guards.failure_rate_ok(ctx)
    assert (True, 1 / 198, "1 failed of 198 finished on the new side = 0.51% (limit 1.00%)") == (
        failures.passed,
        failures.value,
        failures.detail,
    )


def test_a_task_rate_kind_whose_store_cannot_be_read_is_inconclusive(tmp_path: Path) -> None:
    """kind = "failure_rate" over a table that does not exist: inconclusive, naming the store."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    create_task_table(url, "old_tasks")
    settings = plain_settings(
        stores=sql_stores(url), metric_guards={"failures": {"kind": "failure_rate", "max": 0.01}}
    )
    verdict = evaluate_metric_guard(settings, "failures", since=utcnow())
    assert Outcome.INCONCLUSIVE is verdict.outcome
    assert (
        "inconclusive: the new side's tasks cannot be read: store 'new': table 'new_tasks' does not exist"
        in (verdict.detail)
    )


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "error"),
    [
        (
            [
                "[metric_guards.min_soak]",
                'kind = "prometheus"',
                'url = "http://p:9090"',
                'query = "up"',
                "max = 1",
            ],
            "config key 'metric_guards' in CONFIG is invalid: 'min_soak' is the name of a built-in guard",
        ),
        (
            ["[metric_guards.rate]", 'kind = "completion_rate"', "min = 0.99", 'url = "http://p:9090"'],
            "config key 'metric_guards.rate' in CONFIG is invalid: kind 'completion_rate' takes no 'url'",
        ),
        (
            ["[metric_guards.up]", 'kind = "prometheus"', 'url = "http://p:9090"', 'query = "up"'],
            "config key 'metric_guards.up' in CONFIG is invalid: a metric guard needs 'min', 'max' or both",
        ),
        (
            [
                "[metric_guards.up]",
                'kind = "prometheus"',
                'url = "prometheus:9090"',
                'query = "up"',
                "max = 1",
            ],
            "config key 'metric_guards.up' in CONFIG is invalid: url 'prometheus:9090' is not an http://",
        ),
        (
            ["[metric_guards.up]", 'kind = "sql"', 'store = "new"', 'query = " "', "max = 1"],
            "config key 'metric_guards.up' in CONFIG is invalid: a 'sql' metric guard needs a non-empty",
        ),
        (
            [
                "[metric_guards.up]",
                'kind = "sql"',
                'store = "new"',
                'query = "SELECT 1"',
                "max = 1",
                "maxx = 2",
            ],
            "config key 'metric_guards.up.maxx' in CONFIG is not a known setting: remove or rename it",
        ),
    ],
)
def test_a_bad_metric_guard_is_one_line_exit_2_and_writes_nothing(
    cli: Callable[..., CliResult], tmp_path: Path, table: list[str], error: str
) -> None:
    """A name of a built-in, neither min nor max, a bad URL, an empty query, an unknown key."""
    db = f"sqlite:///{tmp_path / 'm.db'}"
    assert 0 == cli("db", "upgrade", "--db", db).code
    assert 0 == cli("init", "--db", db).code
    config = tmp_path / "bad.toml"
    stores = sql_stores(f"sqlite:///{tmp_path / 'tasks.db'}")
    write_stores_config(config, stores, ["[guards]", '"preparation->dual_write" = ["up"]', *table])
    result = cli("advance", "--db", db, "--config", str(config))
    assert 2 == result.code, result.stderr
    assert result.error_line.startswith("error: " + error.replace("CONFIG", str(config))), result.error_line
    shown = cli("history", "--json", "--db", db)
    assert 1 == len(json.loads(shown.stdout))


def test_a_metric_guard_needs_the_store_it_reads() -> None:
    """A sql guard's store, and the new store of a task rate kind, must be configured."""
    from migration_fsm.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"^config key 'metric_guards' is invalid: q: store 'new' has no"):
        plain_settings(metric_guards={"q": {"kind": "sql", "store": "new", "query": "SELECT 1", "max": 1}})
    with pytest.raises(
        ConfigError, match=r"r: kind 'completion_rate' counts the new side's tasks: configure"
    ):
        plain_settings(metric_guards={"r": {"kind": "completion_rate", "min": 0.9}})


def test_metric_guards_come_from_the_environment_as_json(
    cli: Callable[..., CliResult], tmp_path: Path, prometheus: FakePrometheus
) -> None:
    """MIGRATION_FSM_METRIC_GUARDS and MIGRATION_FSM_GUARDS as JSON: the guard runs before the edge."""
    db = f"sqlite:///{tmp_path / 'm.db'}"
    assert 0 == cli("db", "upgrade", "--db", db).code
    assert 0 == cli("init", "--db", db).code
    env = {
        "MIGRATION_FSM_METRIC_GUARDS": json.dumps(
            {"error_rate": {"kind": "prometheus", "url": prometheus.url, "query": "up", "max": 0.01}}
        ),
        "MIGRATION_FSM_GUARDS": json.dumps({"preparation->dual_write": ["error_rate"]}),
    }
    prometheus.answer = lambda path, form: (200, vector(0.25))
    refused = cli("advance", "--db", db, env=env)
    assert 1 == refused.code
    assert "error_rate = 0.25 (max 0.01): 0.25 is above max 0.01" in refused.error_line
    prometheus.answer = lambda path, form: (200, vector(0.0))
    assert 0 == cli("advance", "--db", db, env=env).code
    bad = cli("status", "--db", db, env={**env, "MIGRATION_FSM_METRIC_GUARDS": "{not json"})
    assert 2 == bad.code
    assert bad.error_line.startswith("error: environment variable MIGRATION_FSM_METRIC_GUARDS is invalid")


def test_a_journaled_value_is_always_finite() -> None:
    """An infinite measurement is shown in the detail but journaled without a value (JSON has no Inf)."""
    from migration_fsm.plugins.metric_guards import judge

    verdict = judge("x", math.inf, low=None, high=1.0, figure="x = +Inf").as_guard_verdict()
    assert (False, None, "x = +Inf (max 1): +Inf is above max 1") == (
        verdict.passed,
        verdict.value,
        verdict.detail,
    )
