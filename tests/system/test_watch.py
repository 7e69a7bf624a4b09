"""`migration-fsm watch` as operators run it: a real process evaluating a metric guard against
a Prometheus of the test's own every 0.2 s, pausing (a hold), rolling back, or only alerting
on an inconclusive metric; not acting while a transition is interrupted; two watch processes
acting once; the hold refusing advance and ramp up until released; bad config. On SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from migration_fsm import commands
from migration_fsm.config import Settings
from migration_fsm.exceptions import Refused, StepFailed
from migration_fsm.fsm import EntryStatus, Phase
from migration_fsm.journal import Journal
from migration_fsm.journal.schema import events_table
from migration_fsm.migration import GuardRecord, Migration
from migration_fsm.serve.metrics import read_snapshot
from tests.support import ROOT
from tests.support.cli import run_cli_process
from tests.support.prometheus import FakePrometheus, vector

pytestmark = pytest.mark.xdist_group("watch")

QUERY = "sum(rate(app_task_failures_total[5m])) / sum(rate(app_tasks_total[5m]))"


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    yield fake
    fake.close()


def write_config(path: Path, url: str, **watch: Any) -> Path:
    """A config with one Prometheus metric guard `error_rate` (max 0.01) watched in cutover
    every 0.2 s; `watch` keys override."""
    values: dict[str, Any] = {
        "interval_seconds": 0.2,
        "failure_limit": 2,
        "on_failure": "pause",
        "on_inconclusive": "notify",
    }
    values.update(watch)
    lines = [
        "[metric_guards.error_rate]",
        'kind = "prometheus"',
        f'url = "{url}"',
        f"query = '{QUERY}'",
        "max = 0.01",
        "timeout_seconds = 10",  # a loaded machine answers late; an inconclusive round fails tests
        "",
        "[watch]",
        *(f"{k} = {json.dumps(v)}" for k, v in values.items()),
        "[watch.phases]",
        'cutover = ["error_rate"]',
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def soaking(make_settings: Callable[..., Settings]) -> Settings:
    """Migration `default` in cutover at 50%, soaking."""
    settings = make_settings()
    commands.init(settings, "default")
    commands.advance(settings, "default")
    commands.advance(settings, "default")
    commands.ramp(settings, "default", 50)
    return settings


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_watch_left_running() -> Iterator[None]:
    """A test that fails before it stops its watch processes does not leave them running
    (and their pipes open) for the next test of this worker to trip over."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def start_watch(config: Path, db: str, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migration_fsm",
            "watch",
            "--json",
            "--db",
            db,
            "--config",
            str(config),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    _STARTED.append(proc)
    return proc


def stop(proc: subprocess.Popen[str]) -> tuple[list[dict[str, Any]], str]:
    """SIGTERM, then its rounds (the JSON lines) and its stderr; it must exit 0."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert 0 == proc.returncode, err
    return [json.loads(line) for line in out.splitlines() if line.strip()], err


def wait_for(what: Callable[[], bool], procs: list[subprocess.Popen[str]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"watch exited {proc.returncode}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            raise AssertionError(f"timed out: {[p.communicate()[1][-2000:] for p in procs]}")
        time.sleep(0.1)


def statuses(settings: Settings) -> list[tuple[str, str, str | None]]:
    return [(str(e.status), e.actor, e.reason) for e in commands.history(settings, "default")]


def events(url: str, kind: str) -> list[dict[str, Any]]:
    with Journal.open(url) as store, store.transaction(readonly=True) as conn:
        e = events_table.c
        rows = conn.execute(select(e.event).where(e.kind == kind).order_by(e.id)).scalars()
        return [dict(row) for row in rows]


# -- pause ----------------------------------------------------------------------------------


def test_a_failing_metric_for_failure_limit_rounds_places_a_hold_that_refuses_advance_until_released(
    prometheus: FakePrometheus, soaking: Settings, upgraded_url: str, tmp_path: Path
) -> None:
    """Passing verdicts do nothing; two failed ones in a row hold the migration once: advance
    and ramp up are refused (not even --force), ramp down and rollback are not; --release
    (journaled) lifts it."""
    config = write_config(tmp_path / "watch.toml", prometheus.url, on_failure="pause")
    proc = start_watch(config, upgraded_url)
    wait_for(lambda: len(events(upgraded_url, "watch_verdict")) >= 3, [proc])
    assert ["passed"] == sorted({e["outcome"] for e in events(upgraded_url, "watch_verdict")})
    prometheus.answer = lambda path, form: (200, vector(0.0523))
    wait_for(lambda: any(s == "held" for s, _, _ in statuses(soaking)), [proc])
    failed_before = len([e for e in events(upgraded_url, "watch_verdict") if e["outcome"] == "failed"])
    wait_for(
        lambda: (
            len([e for e in events(upgraded_url, "watch_verdict") if e["outcome"] == "failed"])
            >= failed_before + 3
        ),
        [proc],
    )
    rounds, _ = stop(proc)

    held = [(actor, reason) for status, actor, reason in statuses(soaking) if status == "held"]
    assert 1 == len(held)
    actor, reason = held[0]
    assert "watch" == actor
    assert reason is not None
    assert "error_rate" in reason
    assert "0.0523" in reason
    assert any(r["acted"] and r["action"] == "pause" for r in rounds)
    failed = [e for e in events(upgraded_url, "watch_verdict") if e["outcome"] == "failed"]
    assert 0.0523 == failed[0]["value"]
    assert (None, "cutover") == (failed[0]["seq"], failed[0]["state"]["phase"])
    assert 1 == len(events(upgraded_url, "held"))

    with pytest.raises(Refused, match=r"watch_hold .*held by watch"):
        commands.advance(soaking, "default", force=True, reason="ship it")
    with pytest.raises(Refused, match="watch_hold"):
        commands.ramp(soaking, "default", 80)
    assert Phase.CUTOVER == commands.ramp(soaking, "default", 20).state.phase  # type: ignore[union-attr]
    assert commands.rollback(soaking, "default", reason="look", dry_run=True)[0].status == "planned"

    result = run_cli_process(
        "watch",
        "--release",
        "--reason",
        "false alarm: a deploy",
        "--actor",
        "tester",
        "--db",
        upgraded_url,
        "--config",
        str(config),
    )
    assert 0 == result.code, result.stderr
    assert "released the hold" in result.stdout
    assert 100 == commands.ramp(soaking, "default", 100).percent
    assert ["released", "tester", "false alarm: a deploy"] == list(statuses(soaking)[-2])
    commands.verify(soaking, "default")
    again = run_cli_process(
        "watch", "--release", "--reason", "x", "--db", upgraded_url, "--config", str(config)
    )
    assert (2, "error: migration 'default' has no standing hold: nothing to release") == (
        again.code,
        again.error_line,
    )


def test_a_hold_lapses_with_the_phase_and_never_blocks_rollback_or_abort(
    make_settings: Callable[..., Settings], store: Journal
) -> None:
    """A hold placed in cutover refuses advance; a rollback is taken; back in dual_write the
    hold no longer stands (the phase changed), and verify accepts held and released rows."""
    settings = make_settings()
    engine = Migration(store, settings, "default")
    engine.init()
    engine.advance()
    engine.advance()
    state = store.get("default")
    watching = Migration(store, settings.model_copy(update={"actor": "watch"}), "default")
    record = GuardRecord("error_rate", False, "error_rate = 0.2 (max 0.01)", 0, value=0.2)
    entry = watching.hold(reason="watch: error_rate failed", verdicts=[record], seen_version=state.version)
    assert entry is not None
    assert EntryStatus.HELD == entry.status
    assert None is watching.hold(reason="again", verdicts=[record], seen_version=state.version)
    with pytest.raises(Refused, match="watch_hold"):
        engine.advance()
    assert Phase.DUAL_WRITE == engine.rollback(reason="error rate")[0].edge.dest
    assert None is store.standing_hold(store.get("default"))
    assert Phase.CUTOVER == engine.advance().edge.dest
    assert 0.2 == commands.history(settings, "default")[3].guards[0]["value"]
    commands.verify(settings, "default")


# -- rollback ----------------------------------------------------------------------------------


def test_a_failing_metric_rolls_back_once_as_watch_with_the_measured_value(
    prometheus: FakePrometheus, soaking: Settings, upgraded_url: str, tmp_path: Path
) -> None:
    prometheus.answer = lambda path, form: (200, vector(0.004, 0.031))
    config = write_config(tmp_path / "watch.toml", prometheus.url, on_failure="rollback")
    proc = start_watch(config, upgraded_url)
    wait_for(lambda: commands.status(soaking, "default").state.phase is Phase.DUAL_WRITE, [proc])
    time.sleep(1.0)  # a few more rounds, in dual_write
    rounds, _ = stop(proc)

    rollbacks = [e for e in commands.history(soaking, "default") if e.trigger == "rollback"]
    assert 1 == len(rollbacks)
    row = rollbacks[0]
    assert ("committed", "watch", Phase.CUTOVER, Phase.DUAL_WRITE) == (
        row.status,
        row.actor,
        row.source,
        row.dest,
    )
    assert row.reason is not None
    assert "error_rate failed 2 times in a row" in row.reason
    assert "0.031" in row.reason
    acted = [r for r in rounds if r["acted"]]
    assert 1 == len(acted)
    assert "rollback" == acted[0]["action"]
    assert "nothing to watch in dual_write" in [r["note"] for r in rounds]  # [watch.phases]: cutover only
    commands.verify(soaking, "default")


# -- inconclusive ------------------------------------------------------------------------------


@pytest.mark.parametrize("on_inconclusive", ["notify", "pause"])
def test_an_unreachable_prometheus_never_rolls_back(
    prometheus: FakePrometheus, soaking: Settings, upgraded_url: str, tmp_path: Path, on_inconclusive: str
) -> None:
    """Inconclusive verdicts (the server is down) alert once, or hold, never roll back even
    with on_failure = "rollback"."""
    prometheus.close()
    config = write_config(
        tmp_path / "watch.toml", prometheus.url, on_failure="rollback", on_inconclusive=on_inconclusive
    )
    proc = start_watch(config, upgraded_url)
    wait_for(lambda: len(events(upgraded_url, "watch_verdict")) >= 6, [proc])
    rounds, _ = stop(proc)

    assert {"inconclusive"} == {e["outcome"] for e in events(upgraded_url, "watch_verdict")}
    assert Phase.CUTOVER == commands.status(soaking, "default").state.phase
    kinds = [status for status, _, _ in statuses(soaking)]
    assert "rollback" not in [str(e.trigger) for e in commands.history(soaking, "default")]
    if on_inconclusive == "notify":
        alerts = events(upgraded_url, "watch_alert")
        assert 1 == len(alerts)
        assert "unreachable" in alerts[0]["reason"]
        assert "watch" == alerts[0]["actor"]
        assert "held" not in kinds
    else:
        assert 1 == kinds.count("held")
        assert [] == events(upgraded_url, "watch_alert")
    assert 1 == len([r for r in rounds if r["acted"]])


# -- an interrupted transition ---------------------------------------------------------------


def test_watch_does_not_act_while_a_transition_is_interrupted(
    prometheus: FakePrometheus,
    make_settings: Callable[..., Settings],
    upgraded_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(steps={"cutover->dual_write": ["tests.support.steps:flaky"]})
    commands.init(settings, "default")
    commands.advance(settings, "default")
    commands.advance(settings, "default")
    monkeypatch.setenv("STEPS_FAIL", "1")
    with pytest.raises(StepFailed, match="injected failure"):
        commands.rollback(settings, "default", reason="drill")
    before = statuses(settings)
    prometheus.answer = lambda path, form: (200, vector(0.5))
    config = write_config(tmp_path / "watch.toml", prometheus.url, on_failure="rollback", failure_limit=1)
    result = run_cli_process("watch", "--once", "--json", "--db", upgraded_url, "--config", str(config))
    assert 0 == result.code, result.stderr
    done = json.loads(result.stdout)
    assert ("rollback", False) == (done["action"], done["acted"])
    assert "is in progress or interrupted: not acting" in done["note"]
    assert before == statuses(settings)


# -- two watch processes -----------------------------------------------------------------------


@pytest.mark.parametrize("on_failure", ["rollback", "pause"])
def test_two_watch_processes_act_once(
    prometheus: FakePrometheus, soaking: Settings, upgraded_url: str, tmp_path: Path, on_failure: str
) -> None:
    prometheus.answer = lambda path, form: (200, vector(0.2))
    config = write_config(
        tmp_path / "watch.toml", prometheus.url, on_failure=on_failure, interval_seconds=0.1
    )
    procs = [start_watch(config, upgraded_url), start_watch(config, upgraded_url)]
    if on_failure == "rollback":
        wait_for(lambda: commands.status(soaking, "default").state.phase is Phase.DUAL_WRITE, procs)
    else:
        wait_for(lambda: any(s == "held" for s, _, _ in statuses(soaking)), procs)
    time.sleep(1.0)  # both go on for a few rounds
    rounds = [stop(proc)[0] for proc in procs]

    history = commands.history(soaking, "default")
    if on_failure == "rollback":
        assert 1 == len([e for e in history if e.trigger == "rollback"])
    else:
        assert 1 == len([e for e in history if e.status == "held"])
    assert {"committed", "held"} >= {str(e.status) for e in history}  # no refusal, no conflict row
    assert 1 == sum(1 for each in rounds for r in each if r["acted"])
    commands.verify(soaking, "default")


# -- serve, config --------------------------------------------------------------------------------


def test_serve_counts_verdicts_and_the_hold(
    prometheus: FakePrometheus, soaking: Settings, upgraded_url: str, tmp_path: Path
) -> None:
    prometheus.answer = lambda path, form: (200, vector(0.3))
    config = write_config(tmp_path / "watch.toml", prometheus.url, failure_limit=1)
    for _ in range(2):
        result = run_cli_process("watch", "--once", "--db", upgraded_url, "--config", str(config))
        assert 0 == result.code, result.stderr
    with Journal.open(upgraded_url, readonly=True) as store:
        snapshot = read_snapshot(soaking, "default", store)
    assert {("error_rate", "failed"): 2} == snapshot.watch_verdicts
    assert snapshot.held_seq is not None
    assert "error_rate FAIL" in result.stdout


@pytest.mark.parametrize(
    ("table", "line"),
    [
        (
            'guards = ["error_rate"]\non_inconclusive = "rollback"',
            "config key 'watch.on_inconclusive' in {path} is invalid: an inconclusive verdict never rolls"
            " back: 'pause' or 'notify'",
        ),
        ('guards = ["nope"]', "config key 'watch' in {path} is invalid: 'nope' is not a metric guard"),
        (
            'guards = ["error_rate"]\nfailure_limit = 0',
            "config key 'watch.failure_limit' in {path} is invalid",
        ),
        (
            'guards = ["error_rate"]\non_failure = "panic"',
            "config key 'watch.on_failure' in {path} is invalid",
        ),
        (
            "[watch.phases]\ncomplete = []",
            "config key 'watch.phases' in {path} is invalid: 'complete' is not",
        ),
        ("interval_seconds = 5", "error: nothing to watch: [watch] names no guard"),
    ],
)
def test_bad_watch_config_is_one_line_and_exit_2(
    make_settings: Callable[..., Settings], upgraded_url: str, tmp_path: Path, table: str, line: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[metric_guards.error_rate]\nkind = 'prometheus'\nurl = 'http://127.0.0.1:9'\nquery = 'x'\nmax = 1\n"
        f"[watch]\n{table}\n",
        encoding="utf-8",
    )
    commands.init(make_settings(), "default")
    result = run_cli_process("watch", "--once", "--db", upgraded_url, "--config", str(path))
    assert 2 == result.code
    assert result.error_line.startswith(line.format(path=path)) or line.format(path=path) in result.error_line


# -- the demo -----------------------------------------------------------------------------------


def test_demo_watch_rolls_back_an_error_burst_by_itself(tmp_path: Path) -> None:
    """`demo --watch`: the error burst injected in the first cutover is rolled back by `watch`
    (actor watch, the measured error rate in its reason and in the report), and still nothing
    is lost or run twice."""
    result = run_cli_process(
        *("demo", "--watch", "--json", "--tasks", "400", "--rate", "80", "--dir", str(tmp_path / "demo")),
        timeout=300,
    )
    assert 0 == result.code, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (0, 0, 0) == (report["lost"], report["duplicated"], report["executed_twice"])
    rolled = report["watch_rollback"]
    assert ("watch", "cutover->dual_write") == (rolled["actor"], rolled["edge"])
    assert rolled["value"] > 0.05
    assert "error_rate failed 3 times in a row" in rolled["reason"]
    assert "watch: rolled back cutover->dual_write" in result.stderr
    rows = json.loads(
        run_cli_process(
            "history", "--json", "-m", "demo", "--db", f"sqlite:///{tmp_path / 'demo' / 'control.db'}"
        ).stdout
    )
    assert ["watch"] == [
        row["actor"] for row in rows if row["trigger"] == "rollback" and row["actor"] == "watch"
    ]
    assert 3 == sum(1 for row in rows if row["trigger"] == "rollback")


def test_each_round_delivers_the_pending_events_to_the_notify_targets(
    prometheus: FakePrometheus, soaking: Settings, upgraded_url: str, tmp_path: Path
) -> None:
    """A `watch_alert` (on_failure = "notify") reaches a [[notify]] command target in the same
    round; a target whose `events` do not name `watch_verdict` gets no verdict."""
    prometheus.answer = lambda path, form: (200, vector(0.7))
    received = tmp_path / "received.jsonl"
    config = write_config(tmp_path / "watch.toml", prometheus.url, on_failure="notify", failure_limit=1)
    with config.open("a", encoding="utf-8") as toml:
        toml.write(
            "\n[[notify]]\nname = 'pager'\n"
            f"command = ['sh', '-c', 'cat >> {received}; echo >> {received}']\n"
            "events = ['watch_alert', 'held']\n"
        )
    result = run_cli_process("watch", "--once", "--json", "--db", upgraded_url, "--config", str(config))
    assert 0 == result.code, result.stderr
    assert ("notify", True) == (json.loads(result.stdout)["action"], json.loads(result.stdout)["acted"])
    events_received = [json.loads(line) for line in received.read_text(encoding="utf-8").splitlines() if line]
    assert ["watch_alert"] == [e["event"] for e in events_received]
    assert 0.7 == events_received[0]["guards"][0]["value"]
