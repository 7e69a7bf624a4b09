"""`migration-fsm serve` as an operator runs it: a process of its own, scraped by Prometheus'
own text parser, its JSON API read as the status page reads it; read-only, and behind a
token when given one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from migration_fsm import commands
from migration_fsm.config import Settings
from migration_fsm.exceptions import MigrationFSMError
from migration_fsm.journal import utcnow
from migration_fsm.migration import Migration
from migration_fsm.serve import METRICS, StatusServer
from migration_fsm.tools.runs import record_validation
from tests.support.cli import ROOT

TOKEN = "s3cret-token"  # noqa: S105  a test's own token


@contextmanager
def serving(url: str, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`migration-fsm serve --db URL --listen 127.0.0.1:0 ARGS` in a process of its own;
    yields the address it prints; stops it with SIGTERM and checks it exits 0."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    environ.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "migration_fsm", "serve", "--db", url, "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ,
        cwd=ROOT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("serving migration 'default' on http://127.0.0.1:"), (
            first,
            proc.stderr.read() if proc.stderr else "",
        )
        yield first.split(" on ", 1)[1].split()[0]
        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # and close the pipes


def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})  # noqa: S310  a local http URL
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels without `migration`) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "migration"))
            assert sample.labels["migration"] == "default"
            found[(sample.name, labels)] = sample.value
    return found


def walked(engine: Migration, settings: Settings) -> None:
    """preparation -> dual_write, a refused advance (a guard that fails), a stored validate."""
    engine.advance()
    refusing = Migration(
        engine.store,
        settings.model_copy(update={"guards": {"dual_write->cutover": ["tests.support.steps:broken_guard"]}}),
        "default",
    )
    with pytest.raises(MigrationFSMError):
        refusing.advance()
    now = utcnow()
    record_validation(
        engine.store,
        "default",
        phase="dual_write",
        started_at=now,
        finished_at=now,
        ok=False,
        summary={
            "old_count": 10,
            "new_count": 9,
            "missing": 1,
            "mismatched": 0,
            "extra": 0,
            "status_differs": 0,
        },
    )


def test_a_scrape_carries_every_documented_metric_with_the_migrations_figures(
    engine: Migration, make_settings: Callable[..., Settings], upgraded_url: str
) -> None:
    settings = make_settings()
    walked(engine, settings)
    state = engine.store.get("default")
    with serving(upgraded_url) as base:
        status, body = fetch(base + "metrics")
    assert 200 == status
    text = body.decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {name.removesuffix("_total") for name in METRICS} <= names
    found = samples(text)
    assert 1 == found[("mfsm_up", ())]
    assert 1 == found[("mfsm_phase", (("phase", "dual_write"),))]
    assert 0 == found[("mfsm_phase", (("phase", "preparation"),))]
    assert state.version == found[("mfsm_version", ())]
    assert 0 == found[("mfsm_percent", ())]
    committed = (("edge", "preparation->dual_write"), ("status", "committed"), ("trigger", "advance"))
    refused = (("edge", "dual_write->cutover"), ("status", "refused"), ("trigger", "advance"))
    assert 1 == found[("mfsm_transitions_total", committed)]
    assert 1 == found[("mfsm_transitions_total", refused)]
    assert 0 == found[("mfsm_validate_ok", ())]
    assert 1 == found[("mfsm_validate_tasks", (("kind", "missing"),))]
    assert 9 == found[("mfsm_validate_tasks", (("kind", "new_count"),))]
    assert 0 == found[("mfsm_ledger_executed_twice", ())]
    assert found[("mfsm_phase_seconds", ())] >= 0


def test_the_api_answers_what_status_and_history_print(
    engine: Migration, make_settings: Callable[..., Settings], upgraded_url: str
) -> None:
    settings = make_settings()
    walked(engine, settings)
    with serving(upgraded_url) as base:
        api_status = json.loads(fetch(base + "api/status")[1])
        api_history = json.loads(fetch(base + "api/history")[1])
        details = json.loads(fetch(base + "api/details")[1])
        page_status, page = fetch(base)
        missing = fetch(base + "api/nothing")[0]
    assert commands.status(settings, "default").as_json() == api_status
    assert commands.history_json(commands.history(settings, "default")) == api_history
    assert ["committed", "refused"] == [e["status"] for e in api_history[1:]]
    assert (False, 1) == (details["validate"]["ok"], details["validate"]["missing"])
    assert engine.store.get("default").last_seq == details["last_seq"]
    assert (200, 404) == (page_status, missing)
    assert b'id="phases"' in page


def test_serve_changes_nothing_and_answers_no_write(engine: Migration, upgraded_url: str) -> None:
    """Only GET and HEAD; a SQLite database is byte for byte what it was; on PostgreSQL the
    server's own connections cannot write (every transaction is READ ONLY)."""
    engine.advance()
    before = _fingerprint(engine, upgraded_url)
    with serving(upgraded_url) as base:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert 405 == fetch(base + "api/status", method=method)[0], method
        for path in ("", "metrics", "api/status", "api/history", "api/details"):
            assert 200 == fetch(base + path)[0], path
        assert 200 == fetch(base + "metrics", method="HEAD")[0]
    assert before == _fingerprint(engine, upgraded_url)

    server = StatusServer(engine.settings, "default", listen="127.0.0.1:0")
    try:
        with server.store.engine.connect() as conn:  # what the server's own connections allow
            if upgraded_url.startswith("postgresql"):
                with pytest.raises(Exception, match="read-only transaction"), conn.begin():
                    conn.exec_driver_sql("UPDATE mfsm_migrations SET percent = 7")
            else:
                with pytest.raises(Exception, match="readonly database"), conn.begin():
                    conn.exec_driver_sql("UPDATE mfsm_migrations SET percent = 7")
    finally:
        server.shutdown()
    assert 0 == engine.store.get("default").percent


def _fingerprint(engine: Migration, url: str) -> Any:
    if url.startswith("sqlite"):
        return hashlib.sha256(Path(url.removeprefix("sqlite:///")).read_bytes()).hexdigest()
    state = engine.store.get("default")
    return (state.version, state.last_seq, state.phase, state.percent, state.updated_at)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_with_a_token_every_page_needs_it(engine: Migration, upgraded_url: str) -> None:
    with serving(upgraded_url, env={"MIGRATION_FSM_SERVE_TOKEN": TOKEN}) as base:
        for path in ("", "metrics", "api/status"):
            assert 401 == fetch(base + path)[0], path
            assert 401 == fetch(base + path, headers={"Authorization": "Bearer wrong"})[0], path
            assert 200 == fetch(base + path, headers={"Authorization": f"Bearer {TOKEN}"})[0], path
        assert 200 == fetch(f"{base}?token={TOKEN}")[0]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_bad_input_is_one_line_and_exit_2(engine: Migration, upgraded_url: str, cli: Any) -> None:
    unknown = cli("serve", "--db", upgraded_url, "-m", "nope", "--listen", "127.0.0.1:0")
    assert 2 == unknown.code
    assert "nope" in unknown.error_line
    bad = cli("serve", "--db", upgraded_url, "--listen", "localhost")
    assert (2, "error: --listen 'localhost': expected HOST:PORT, e.g. 127.0.0.1:9464") == (
        bad.code,
        bad.error_line,
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_database_that_goes_away_gives_up_0_and_the_server_stays(
    engine: Migration, upgraded_url: str
) -> None:
    server = StatusServer(engine.settings, "default", listen="127.0.0.1:0")
    server.start()
    try:
        assert 1 == samples(fetch(server.url + "metrics")[1].decode())[("mfsm_up", ())]
        path = Path(upgraded_url.removeprefix("sqlite:///"))
        server.store.engine.dispose()
        path.rename(path.with_suffix(".moved"))
        status, body = fetch(server.url + "metrics")
        assert (200, {("mfsm_up", ()): 0.0}) == (status, samples(body.decode()))
        assert 503 == fetch(server.url + "api/status")[0]
        path.with_suffix(".moved").rename(path)
        assert 1 == samples(fetch(server.url + "metrics")[1].decode())[("mfsm_up", ())]
    finally:
        server.shutdown()


def test_the_docs_list_every_metric_and_no_other() -> None:
    text = (ROOT / "docs" / "OBSERVABILITY.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| `(mfsm_\w+)` \|", text, flags=re.MULTILINE)
    assert sorted(METRICS) == sorted(documented)
