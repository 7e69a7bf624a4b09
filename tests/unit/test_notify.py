"""Events out (`[[notify]]`): the outbox written with each journal change, delivered in order to
a real local HTTP receiver and to real commands, the veto of a `before` event, and a crash
between a change and its delivery. Every persistence test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from migration_fsm import commands
from migration_fsm.config import Settings
from migration_fsm.exceptions import Refused, StepFailed
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal, make_engine, utcnow
from migration_fsm.journal import outbox as outbox_module
from migration_fsm.journal.schema import events_table, workers_table
from migration_fsm.plugins import notify
from migration_fsm.plugins.notify import TargetDelivery, summary
from tests.support import ROOT
from tests.support import steps as steps_module
from tests.support.cli import CliResult
from tests.support.strategies import SimulatedCrash

NOOP = "tests.support.steps:noop_step"
STEPS = {"preparation->dual_write": [NOOP], "dual_write->cutover": [NOOP]}


class Receiver:
    """An HTTP server of the test's own on 127.0.0.1: it records every JSON body POSTed to
    it, answers `status`, and while `hold` is clear (a `threading.Event` the test controls)
    keeps each request waiting. Stop it and start it again on the same port."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        self.fail_from: int | None = None  # from this many bodies on, answer 500
        self.hold = threading.Event()
        self.hold.set()
        self.waiting = threading.Event()  # set once a request is held
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                if not receiver.hold.is_set():
                    receiver.waiting.set()
                    receiver.hold.wait(30)
                failing = receiver.fail_from is not None and len(receiver.bodies) >= receiver.fail_from
                receiver.bodies.append(json.loads(data))
                self.send_response(500 if failing else receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def kinds(self) -> list[str]:
        return [body["event"] for body in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.hold.set()
    if r._server is not None:
        r.stop()


def outbox(url: str) -> list[tuple[int, str]]:
    """(id, kind) of every stored event, oldest first."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(events_table.c.id, events_table.c.kind).order_by(events_table.c.id))
            return [(row.id, row.kind) for row in rows]
    finally:
        engine.dispose()


def target(name: str = "hook", **fields: Any) -> dict[str, Any]:
    return {"name": name, "timeout_seconds": 5, **fields}


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# -- the outbox and HTTP delivery ----------------------------------------------------------------


def test_events_arrive_in_order_with_increasing_ids(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """Each command delivers its events at once: init, then claim, step and commit of each edge."""
    settings = make_settings(notify=[target(url=receiver.url)], steps=STEPS)
    commands.init(settings, "default")
    commands.advance(settings, "default")
    commands.advance(settings, "default")
    edge = ["claimed", "step_done", "committed"]
    assert ["init", *edge, *edge] == receiver.kinds()
    ids = [body["id"] for body in receiver.bodies]
    assert ids == sorted(set(ids))
    assert [(body["id"], body["event"]) for body in receiver.bodies] == outbox(settings.database_url)
    last = receiver.bodies[-1]
    assert (1, "default", 3, "advance", "dual_write->cutover", "tester") == (
        last["schema"],
        last["migration"],
        last["seq"],
        last["trigger"],
        last["edge"],
        last["actor"],
    )
    assert {"phase": "cutover", "percent": 0, "version": 3, "paused": None} == {
        k: last["state"][k] for k in ("phase", "percent", "version", "paused")
    }
    assert "new" == last["state"]["routing"]["consume_from"]
    assert [{"name": NOOP, "status": "done", "attempts": 1, "error": None}] == last["steps"]
    assert {"name": NOOP, "status": "done", "position": 0} == {
        k: receiver.bodies[-2]["step"][k] for k in ("name", "status", "position")
    }


def test_receiver_down_then_restarted_gets_every_event_once_in_order(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """Undelivered events stay in the migration database, are counted in `status`, and are
    sent again in order, each once, when the receiver is back."""
    settings = make_settings(notify=[target(url=receiver.url, timeout_seconds=0.5)], steps=STEPS)
    receiver.stop()
    commands.init(settings, "default")
    result = commands.advance(settings, "default")
    assert "committed" == result.status  # delivery never changes the outcome
    shown = commands.status(settings, "default").as_json()["notify"]
    assert 1 == len(shown)
    assert (4, 2) == (shown[0]["pending"], shown[0]["failures"])
    assert "URLError" in shown[0]["last_error"]
    receiver.start()  # same port
    report = commands.deliver_pending(settings, "default")
    assert (4, None) == (report.delivered, report.targets[0].error)
    assert outbox(settings.database_url) == [(b["id"], b["event"]) for b in receiver.bodies]
    commands.advance(settings, "default")
    assert ["init", "claimed", "step_done", "committed"] * 1 + ["claimed", "step_done", "committed"] == (
        receiver.kinds()
    )
    shown = commands.status(settings, "default").as_json()["notify"]
    assert (0, 0, None) == (shown[0]["pending"], shown[0]["failures"], shown[0]["last_error"])


def test_a_failing_endpoint_is_retried_and_counted(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """An HTTP 500 is a failure: the cursor stays, the next call sends the same event first."""
    settings = make_settings(notify=[target(url=receiver.url, timeout_seconds=1)])
    receiver.status = 500
    commands.init(settings, "default")
    assert len(receiver.bodies) >= 2  # retried with backoff within timeout_seconds
    assert {"init"} == set(receiver.kinds())
    shown = commands.status(settings, "default").as_json()["notify"][0]
    assert (1, 1) == (shown["pending"], shown["failures"])
    assert shown["last_error"].startswith("HTTP 500")
    receiver.status = 200
    receiver.bodies.clear()
    commands.advance(settings, "default")
    assert ["init", "claimed", "committed"] == receiver.kinds()


def test_a_hanging_receiver_does_not_hold_the_transition(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """The command returns, committed, while the receiver still holds its request."""
    settings = make_settings(notify=[target(url=receiver.url, timeout_seconds=0.5)])
    commands.init(settings, "default")
    receiver.hold.clear()
    result = commands.advance(settings, "default")
    assert receiver.waiting.is_set()
    assert not receiver.hold.is_set()
    assert "committed" == result.status
    assert Phase.DUAL_WRITE == commands.status(settings, "default").state.phase
    receiver.hold.set()


def test_a_failed_step_and_its_abort_are_events(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """step_failed (the transition interrupted), then the abort: takeover, step_undone, aborted."""
    steps_module.reset()
    steps_module.FAIL_ONCE.add("step_b")
    pair = {"do": "tests.support.steps:step_a", "undo": "tests.support.steps:undo_a"}
    settings = make_settings(
        notify=[target(url=receiver.url)],
        steps={"preparation->dual_write": [pair, "tests.support.steps:step_b"]},
    )
    commands.init(settings, "default")
    with pytest.raises(StepFailed):
        commands.advance(settings, "default")
    assert ["init", "claimed", "step_done", "step_failed"] == receiver.kinds()
    failed = receiver.bodies[-1]
    assert ("intent", "tests.support.steps:step_b") == (failed["status"], failed["step"]["name"])
    assert "step_b broke" in failed["step"]["error"]
    commands.abort(settings, "default", reason="give up for today")
    assert ["takeover", "step_undone", "aborted"] == receiver.kinds()[4:]
    aborted = receiver.bodies[-1]
    assert ("aborted", "give up for today", "preparation") == (
        aborted["status"],
        aborted["reason"],
        aborted["state"]["phase"],
    )
    assert "abort" == receiver.bodies[4]["takeover"]["command"]
    steps_module.reset()


def test_pause_and_gone_workers_are_events(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """pause_consumers writes `pause` and names a worker whose heartbeat stopped (`workers_gone`)."""
    settings = make_settings(
        notify=[target(url=receiver.url, events=["pause", "workers_gone", "committed"])],
        steps={"dual_write->cutover": ["pause_consumers"]},
        worker_ttl_seconds=1,
    )
    commands.init(settings, "default")
    commands.advance(settings, "default")
    engine = make_engine(settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(workers_table).values(
                    migration="default",
                    side="old",
                    worker_id="w-dead",
                    host="h",
                    pid=1,
                    seen_version=0,
                    heartbeat_at=utcnow() - timedelta(minutes=5),
                )
            )
    finally:
        engine.dispose()
    commands.advance(settings, "default")
    assert ["committed", "pause", "workers_gone", "committed"] == receiver.kinds()
    gone = receiver.bodies[2]
    assert ("old", ["w-dead"], "old") == (gone["side"], gone["workers"], gone["state"]["paused"])


def test_an_approval_is_an_event(make_settings: Callable[..., Settings], receiver: Receiver) -> None:
    """`approve` writes `approved`, with who approved which edge and why, and delivers it."""
    edge = "preparation->dual_write"
    settings = make_settings(notify=[target(url=receiver.url)], approvals={"edges": [edge]})
    commands.init(settings, "default")
    commands.approve(settings.model_copy(update={"actor": "ann"}), "default", edge=edge, reason="CAB-7")
    assert ["init", "approved"] == receiver.kinds()
    approved = receiver.bodies[-1]
    assert ("approved", edge, "ann", "CAB-7", "preparation") == (
        approved["status"],
        approved["edge"],
        approved["actor"],
        approved["reason"],
        approved["state"]["phase"],
    )


def test_slack_format_posts_one_readable_line(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """`format = "slack"` posts `{"text": ...}` saying what happened, where it stands now."""
    settings = make_settings(notify=[target(url=receiver.url, format="slack", events=["committed"])])
    commands.init(settings, "default")
    commands.advance(settings, "default", reason="ticket OPS-1")
    assert [
        {
            "text": "migration-fsm 'default' #2 advance preparation->dual_write committed by tester:"
            " now dual_write at 0% (version 2); reason: ticket OPS-1"
        }
    ] == receiver.bodies


def test_events_filter_sends_only_the_kinds_named(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """A target with `events` gets those kinds only; the others do not count as pending."""
    settings = make_settings(
        notify=[target(url=receiver.url, events=["refused", "aborted"])],
        guards={"preparation->dual_write": ["tests.support.steps:gate"]},
    )
    commands.init(settings, "default")
    with pytest.raises(Refused, match="refused"):
        commands.advance(settings, "default")
    commands.advance(settings, "default", force=True, reason="forced past the gate")
    assert ["refused"] == receiver.kinds()
    guards = receiver.bodies[0]["guards"]
    assert [("tests.support.steps:gate", False, "gate is closed")] == [
        (g["name"], g["passed"], g["detail"]) for g in guards if not g["passed"]
    ]
    assert 0 == commands.status(settings, "default").as_json()["notify"][0]["pending"]


def test_summary_says_who_refused_and_why() -> None:
    """The slack line of a refusal names the failing guards."""
    event = {
        "event": "refused",
        "migration": "m",
        "seq": 4,
        "trigger": "advance",
        "edge": "dual_write->cutover",
        "actor": "ann",
        "guards": [{"name": "counts_match", "passed": False, "detail": "3 missing"}],
        "state": {"phase": "dual_write", "percent": 0, "version": 2},
    }
    assert (
        "migration-fsm 'm' #4 advance dual_write->cutover REFUSED by ann by counts_match (3 missing):"
        " still dual_write at 0% (version 2)"
    ) == summary(event)


# -- command targets and the veto ------------------------------------------------------------------

RECORD = (
    "import json, os, sys; e = json.load(sys.stdin);"
    " open(sys.argv[1], 'a').write(json.dumps({'event': e, 'env': {k: v for k, v in os.environ.items()"
    " if k.startswith('MFSM_')}}) + '\\n')"
)


def test_a_command_target_gets_the_event_on_stdin_and_mfsm_variables(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Like a gh-ost hook: the event as JSON on stdin, MFSM_* variables in the environment."""
    out = tmp_path / "hook.jsonl"
    settings = make_settings(
        notify=[target(command=[*python_command(RECORD), str(out)], events=["committed"])]
    )
    commands.init(settings, "default")
    commands.advance(settings, "default")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 == len(lines)
    env = lines[0]["env"]
    assert {
        "MFSM_EVENT": "committed",
        "MFSM_MIGRATION": "default",
        "MFSM_EDGE": "preparation->dual_write",
        "MFSM_PHASE": "dual_write",
        "MFSM_SEQ": "2",
        "MFSM_ACTOR": "tester",
        "MFSM_EVENT_ID": str(lines[0]["event"]["id"]),
    }.items() <= env.items()


def veto_config(path: Path, url: str, code: str, *, veto: bool = True) -> str:
    command = json.dumps(python_command(code))
    path.write_text(
        f'database_url = "{url}"\n'
        f'[[notify]]\nname = "cab"\ncommand = {command}\nveto = {str(veto).lower()}\n'
        + ("" if veto else 'events = ["before"]\n')
        + "timeout_seconds = 10\n",
        encoding="utf-8",
    )
    return str(path)


REFUSE = (
    "import json, sys; e = json.load(sys.stdin);"
    " print('no change window for', e['edge'], 'password=hunter2'); sys.exit(3)"
)


def test_a_veto_command_refuses_the_edge_like_a_guard(
    upgraded_url: str, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """Exit 1, the phase stays, and the refusal is journaled as guard `notify:cab` with the
    command's output (redacted) and exit code."""
    config = veto_config(tmp_path / "veto.toml", upgraded_url, REFUSE)
    assert 0 == cli("init", "--config", config).code
    refused = cli("advance", "--config", config)
    assert 1 == refused.code
    assert "notify:cab" in refused.error_line
    history = json.loads(cli("history", "--json", "--config", config).stdout)
    assert "refused" == history[-1]["status"]
    assert [
        {
            "name": "notify:cab",
            "passed": False,
            "detail": "exit 3: no change window for preparation->dual_write password=***",
        }
    ] == history[-1]["guards"]
    assert "preparation" == json.loads(cli("status", "--json", "--config", config).stdout)["phase"]


def test_a_veto_command_that_exits_0_lets_the_edge_through(
    upgraded_url: str, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """A passing veto is journaled as a passed guard and the edge is taken."""
    says = (
        "import json, os, sys; e = json.load(sys.stdin);"
        " print(os.environ['MFSM_EVENT'], e['edge'], e['seq'], e['id'])"
    )
    config = veto_config(tmp_path / "veto.toml", upgraded_url, says)
    assert 0 == cli("init", "--config", config).code
    assert 0 == cli("advance", "--config", config).code
    history = json.loads(cli("history", "--json", "--config", config).stdout)
    passed = {"name": "notify:cab", "passed": True, "detail": "exit 0: before preparation->dual_write 2 None"}
    assert ("committed", [passed]) == (
        history[-1]["status"],
        history[-1]["guards"],
    )


def test_a_veto_command_that_does_not_answer_in_time_refuses(
    upgraded_url: str, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """A veto that outlives `timeout_seconds` is killed with its children and refuses."""
    config = tmp_path / "slow.toml"
    config.write_text(
        f'database_url = "{upgraded_url}"\n[[notify]]\nname = "slow"\n'
        'command = ["sh", "-c", "sleep 60; exit 0"]\nveto = true\ntimeout_seconds = 0.5\n',
        encoding="utf-8",
    )
    assert 0 == cli("init", "--config", str(config)).code
    started = time.monotonic()
    refused = cli("advance", "--config", str(config))
    assert time.monotonic() - started < 30  # not the minute the command asked for
    assert 1 == refused.code
    assert "notify:slow (no answer within 0.5 s (timeout_seconds))" in refused.error_line


def test_a_failing_command_without_veto_does_not_refuse(
    upgraded_url: str, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """A `before` hook that is not a veto may fail: the edge is taken all the same."""
    config = veto_config(tmp_path / "hook.toml", upgraded_url, REFUSE, veto=False)
    assert 0 == cli("init", "--config", config).code
    assert 0 == cli("advance", "--config", config).code
    history = json.loads(cli("history", "--json", "--config", config).stdout)
    assert ("committed", []) == (history[-1]["status"], history[-1]["guards"])


# -- a crash between a change and its delivery -----------------------------------------------------


@pytest.mark.parametrize("point", ["after_claim", "before_commit"])
def test_a_crash_leaves_an_event_iff_its_change_committed_and_resume_delivers_it(
    upgraded_url: str, tmp_path: Path, receiver: Receiver, point: str, cli: Callable[..., CliResult]
) -> None:
    """SIGKILL at `point`: the outbox holds the events of what committed (the claim; the step
    too before the commit), not the commit's; `resume --steal` delivers them all, in order, once."""
    config = tmp_path / "crash.toml"
    config.write_text(
        f'database_url = "{upgraded_url}"\n'
        f'[steps]\n"preparation->dual_write" = ["{NOOP}"]\n'
        f'[[notify]]\nname = "hook"\nurl = "{receiver.url}"\ntimeout_seconds = 5\n',
        encoding="utf-8",
    )
    assert 0 == cli("init", "--config", str(config)).code
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    crashed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.crashkit",
            "--crash-at",
            point,
            "--",
            "advance",
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert -9 == crashed.returncode, crashed.stderr
    committed = ["init", "claimed"] + (["step_done"] if point == "before_commit" else [])
    assert committed == [kind for _, kind in outbox(upgraded_url)]
    assert ["init"] == receiver.kinds()
    assert 0 == cli("resume", "--steal", "--config", str(config)).code
    steps = [] if point == "before_commit" else ["step_done"]
    assert [*committed, "takeover", *steps, "committed"] == receiver.kinds()
    assert outbox(upgraded_url) == [(b["id"], b["event"]) for b in receiver.bodies]


# -- the cursor, written once per batch of accepted events -----------------------------------------


def eleven_events(make_settings: Callable[..., Settings], receiver: Receiver, **fields: Any) -> Settings:
    """Settings with one URL target registered before migration `default` wrote 11 events (init,
    two advances, three ramps), none delivered yet; the events are the outbox's."""
    settings = make_settings(notify=[target(url=receiver.url, **fields)])
    with Journal.open(settings.database_url) as journal:
        notify.register(journal, settings, "default")
    quiet = make_settings()
    commands.init(quiet, "default")
    commands.advance(quiet, "default")
    commands.advance(quiet, "default")
    for percent in (10, 50, 100):
        commands.ramp(quiet, "default", percent)
    assert 11 == len(outbox(settings.database_url))
    assert [] == receiver.bodies
    return settings


@pytest.mark.parametrize(
    ("limits", "written_after"),
    [((4, 3600.0), [4, 8, 11]), ((100, 3600.0), [11]), ((100, 0.0), list(range(1, 12)))],
)
def test_the_cursor_is_written_once_per_batch_of_accepted_events(
    make_settings: Callable[..., Settings],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    limits: tuple[int, float],
    written_after: list[int],
) -> None:
    """The cursor moves after each `CURSOR_EVENTS` accepted events (or `CURSOR_SECONDS`) and at
    the end of the backlog, each time to the newest accepted event; every event arrives once."""
    settings = eleven_events(make_settings, receiver)
    written: list[int] = []
    record = outbox_module.record_delivered

    def recording(conn: Any, migration: str, name: str, cursor: int) -> None:
        written.append(cursor)
        record(conn, migration, name, cursor)

    monkeypatch.setattr(notify, "record_delivered", recording)
    monkeypatch.setattr(notify, "CURSOR_EVENTS", limits[0])
    monkeypatch.setattr(notify, "CURSOR_SECONDS", limits[1])
    report = commands.deliver_pending(settings, "default")
    assert (11, None) == (report.delivered, report.targets[0].error)
    ids = [event_id for event_id, _ in outbox(settings.database_url)]
    assert ids == [body["id"] for body in receiver.bodies]
    assert [ids[n - 1] for n in written_after] == written
    shown = commands.status(settings, "default").as_json()["notify"][0]
    assert (0, ids[-1]) == (shown["pending"], shown["cursor"])


def test_a_failure_mid_batch_keeps_the_accepted_events_and_resends_from_the_failed_one(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    """A target that accepted 5 events of a batch, then failed: its cursor is the 5th, written
    with the failure in one transaction; the next call starts at the 6th."""
    settings = eleven_events(make_settings, receiver, timeout_seconds=1)
    ids = [event_id for event_id, _ in outbox(settings.database_url)]
    receiver.fail_from = 5
    report = commands.deliver_pending(settings, "default")
    assert 5 == report.delivered
    assert report.targets[0].error is not None
    assert report.targets[0].error.startswith("HTTP 500")
    assert ids[:5] == [body["id"] for body in receiver.bodies[:5]]
    assert {ids[5]} == {body["id"] for body in receiver.bodies[5:]}  # retried, never skipped
    shown = commands.status(settings, "default").as_json()["notify"][0]
    assert (ids[4], 6, 1) == (shown["cursor"], shown["pending"], shown["failures"])
    receiver.fail_from = None
    receiver.bodies.clear()
    assert 6 == commands.deliver_pending(settings, "default").delivered
    assert ids[5:] == [body["id"] for body in receiver.bodies]


def test_a_crash_before_the_cursor_is_written_resends_the_unwritten_events_and_loses_none(
    make_settings: Callable[..., Settings], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deliverer dies at the 7th event with the cursor written after the 4th: the 5th and
    6th were received but not written, so the next delivery sends them again, in order, then
    the rest. Nothing is skipped; receivers de-duplicate the two by `id`."""
    settings = eleven_events(make_settings, receiver)
    ids = [event_id for event_id, _ in outbox(settings.database_url)]
    monkeypatch.setattr(notify, "CURSOR_EVENTS", 4)
    monkeypatch.setattr(notify, "CURSOR_SECONDS", 3600.0)
    send = notify.send

    def dies_at_the_seventh(chosen: Any, event: dict[str, Any], timeout: float) -> None:
        if event["id"] == ids[6]:
            raise SimulatedCrash
        send(chosen, event, timeout)

    monkeypatch.setattr(notify, "send", dies_at_the_seventh)
    with Journal.open(settings.database_url) as journal, pytest.raises(SimulatedCrash):
        notify._deliver_target(
            journal, "default", settings.notify[0], time.monotonic() + 5, TargetDelivery("hook")
        )
    assert ids[:6] == [body["id"] for body in receiver.bodies]
    shown = commands.status(settings, "default").as_json()["notify"][0]
    assert (ids[3], 7) == (shown["cursor"], shown["pending"])
    monkeypatch.setattr(notify, "send", send)
    receiver.bodies.clear()
    assert 7 == commands.deliver_pending(settings, "default").delivered
    assert ids[4:] == [body["id"] for body in receiver.bodies]


# -- bad config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('[[notify]]\nname = "x"\n', "needs exactly one of 'url' and 'command'"),
        ('[[notify]]\nname = "x"\nurl = "ftp://h/"\n', "url must start with http:// or https://"),
        ('[[notify]]\nname = "x"\nurl = "http://h/"\nveto = true\n', "veto = true needs a 'command' target"),
        ('[[notify]]\nname = "x"\nurl = "http://h/"\nevents = ["commited"]\n', "'commited' is not an event"),
        ('[[notify]]\nname = "x"\nurl = "http://h/"\ntimeout_seconds = 0\n', "notify.0.timeout_seconds"),
        ('[[notify]]\nname = "x"\nurl = "http://h/"\nretries = 3\n', "notify.0.retries' in"),
    ],
)
def test_bad_notify_config_is_one_line_exit_2_and_changes_nothing(
    upgraded_url: str, tmp_path: Path, cli: Callable[..., CliResult], body: str, says: str
) -> None:
    """A malformed `[[notify]]` table: exit 2, one line naming the key, nothing written."""
    good = tmp_path / "good.toml"
    good.write_text(f'database_url = "{upgraded_url}"\n', encoding="utf-8")
    assert 0 == cli("init", "--config", str(good)).code
    before = outbox(upgraded_url)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'database_url = "{upgraded_url}"\n{body}', encoding="utf-8")
    result = cli("advance", "--config", str(bad))
    assert 2 == result.code
    assert says in result.error_line
    assert 1 == len(result.stderr.strip().splitlines())
    assert before == outbox(upgraded_url)
    with Journal.open(upgraded_url) as journal:
        assert Phase.PREPARATION == journal.get("default").phase


def test_status_shows_a_failing_target(
    upgraded_url: str, tmp_path: Path, cli: Callable[..., CliResult], receiver: Receiver
) -> None:
    """`status` names each target with its pending events and failures in a row."""
    receiver.status = 503
    config = tmp_path / "c.toml"
    config.write_text(
        f'database_url = "{upgraded_url}"\n[[notify]]\nname = "pager"\nurl = "{receiver.url}"\n'
        "timeout_seconds = 0.5\n",
        encoding="utf-8",
    )
    assert 0 == cli("init", "--config", str(config)).code
    shown = cli("status", "--config", str(config))
    assert 0 == shown.code
    line = next(line for line in shown.stdout.splitlines() if "notify pager" in line)
    assert "url, 1 pending, 1 failed in a row: HTTP 503" in line
