"""Events out: the outbox (`journal/outbox.py`) delivered to the `[[notify]]` targets, and
the `before` event's veto commands (docs/OBSERVABILITY.md).

Delivery is at least once, in order, per target and migration: each target has a cursor
(the id of the last event it received) in `mfsm_notify_targets`; events are sent one at a
time, in id order, and the cursor only ever moves to an event the target accepted (HTTP 2xx,
or exit 0 for a command) after every event before it was accepted. The cursor is written once
per `CURSOR_EVENTS` accepted events or `CURSOR_SECONDS`, whichever comes first, and always
before a delivery stops (backlog sent, a failure, the deadline): one commit per event held a
backlog to the rate of commits. A crash in between sends the unwritten ones again (in order,
first): receivers de-duplicate by the event's `id`, as they must for an answer that was lost.
A failure stops that target at that event (the next call sends it again, first), counts a
consecutive failure and keeps the error, which `status` shows.

Nothing here raises into a command and nothing changes a transition's outcome, except a veto:
`deliver_pending` waits at most its budget (by default the largest `timeout_seconds` of the
targets), each target in a thread of its own, and never holds the operator lock or a
database transaction while it waits on a target.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..journal import Journal, redact_text
from ..journal.outbox import (
    pending_count,
    pending_events,
    record_delivered,
    record_failure,
    register_targets,
    target_states,
)
from ..log import get_logger

if TYPE_CHECKING:
    from ..config import NotifyTarget, Settings

#: Backoff between two attempts within one call: 0.1 s, doubled each time, at most this.
MAX_BACKOFF_SECONDS: Final = 2.0
#: The part of each target's `timeout_seconds` kept for recording the outcome (at most a fifth).
RECORDING_SECONDS: Final = 0.25
#: Events read from the outbox at a time.
BATCH: Final = 100
#: A target's cursor is written after this many accepted events ...
CURSOR_EVENTS: Final = 100
#: ... or once this many seconds have passed since it was last written, whichever comes first
#: (and always before a delivery stops): what a crash can make a target receive twice.
CURSOR_SECONDS: Final = 1.0
#: How much of a veto command's output the journal keeps.
OUTPUT_LIMIT: Final = 500

_log = get_logger(component="notify")


# -- what is sent ------------------------------------------------------------------------------


def body(target: NotifyTarget, event: dict[str, Any]) -> bytes:
    """What an HTTP target receives: the event, or with `format = "slack"` a Slack message."""
    payload = {"text": summary(event)} if target.format == "slack" else event
    return json.dumps(payload, sort_keys=True).encode("utf-8")


#: The one-line text of each kind of event (`summary`), filled from the event.
_SUMMARIES: Final = {
    "init": "migration-fsm '{name}' created{by}: {where}",
    "refused": "{head} REFUSED{by} by {failing}: still {where}",
    "approved": "{head} approved{by}{reason}: another operator may take it",
    "claimed": "{head} started{by}{forced}{reason}",
    "takeover": "{head}: taken over by {taker} to {command}{stolen}",
    "pause": "{head}: {side} consumers paused (version {version})",
    "lift": "{head}: pause lifted (version {version})",
    "workers_gone": "{head}: {side} workers gone: {workers}",
    "step_done": "{head}: step {step} done",
    "step_undone": "{head}: step {step} undone",
    "step_failed": "{head}: {what} {step} FAILED: {step_error}; run resume or abort",
    "committed": "{head} committed{by}: now {where}{reason}",
    "aborted": "{head} aborted{by}: stays {where}{reason}",
    "held": "migration-fsm '{name}' #{seq} HELD{by}: advance and ramp up refused until released{reason}",
    "released": "migration-fsm '{name}' #{seq} hold released{by}{reason}",
    "watch_verdict": "migration-fsm '{name}' watch: {guard} {outcome}: {detail}; {where}",
    "watch_alert": "migration-fsm '{name}' WATCH ALERT: {where}{reason}",
}


def summary(event: dict[str, Any]) -> str:
    """One readable line about `event` (the `slack` format's text)."""
    state = event.get("state") or {}
    step = event.get("step") or {}
    takeover = event.get("takeover") or {}
    failing = [g for g in event.get("guards") or [] if not g.get("passed")]
    head = f"migration-fsm '{event.get('migration')}' #{event.get('seq')} {event.get('trigger', '')}"
    values = {
        "name": event.get("migration"),
        "head": f"{head} {event.get('edge') or ''}".rstrip(),
        "by": f" by {event['actor']}" if event.get("actor") else "",
        "where": f"{state.get('phase')} at {state.get('percent')}% (version {state.get('version')})",
        "version": state.get("version"),
        "reason": f"; reason: {event['reason']}" if event.get("reason") else "",
        "forced": " (forced)" if event.get("forced") else "",
        "failing": ", ".join(f"{g.get('name')} ({g.get('detail')})" for g in failing) or "a guard",
        "taker": takeover.get("actor"),
        "command": takeover.get("command"),
        "stolen": " (stolen)" if takeover.get("stolen") else "",
        "side": event.get("side"),
        "workers": ", ".join(event.get("workers") or []),
        "step": step.get("name"),
        "step_error": step.get("error"),
        "what": "undo of step" if event.get("undo") else "step",
        "seq": event.get("seq"),
        "guard": event.get("guard"),
        "outcome": event.get("outcome"),
        "detail": event.get("detail"),
    }
    template = _SUMMARIES.get(str(event.get("event")), "{head}: " + str(event.get("event")) + "; {where}")
    return redact_text(" ".join(template.format(**values).split()))


def environment(event: dict[str, Any]) -> dict[str, str]:
    """The `MFSM_*` variables a command target receives (and the rest of our environment)."""
    state = event.get("state") or {}
    values = {
        "MFSM_SCHEMA": event.get("schema"),
        "MFSM_EVENT": event.get("event"),
        "MFSM_EVENT_ID": event.get("id"),
        "MFSM_MIGRATION": event.get("migration"),
        "MFSM_SEQ": event.get("seq"),
        "MFSM_TRIGGER": event.get("trigger"),
        "MFSM_EDGE": event.get("edge"),
        "MFSM_SOURCE": event.get("source"),
        "MFSM_DEST": event.get("dest"),
        "MFSM_STATUS": event.get("status"),
        "MFSM_ACTOR": event.get("actor"),
        "MFSM_REASON": event.get("reason"),
        "MFSM_PHASE": state.get("phase"),
        "MFSM_PERCENT": state.get("percent"),
        "MFSM_VERSION": state.get("version"),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFSM_")}
    env.update({k: "" if v is None else str(v) for k, v in values.items()})
    return env


# -- one attempt -------------------------------------------------------------------------------


class DeliveryFailed(Exception):
    """One attempt that the target did not accept (kept as the target's last error)."""


def _post(target: NotifyTarget, event: dict[str, Any], timeout: float) -> None:
    assert target.url is not None
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked in config (http or https)
        target.url,
        data=body(target, event),
        headers={"Content-Type": "application/json", "User-Agent": "migration-fsm"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - as above
            response.read(65536)
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryFailed(f"{type(exc).__name__}: {reason}") from exc


def _run(target: NotifyTarget, event: dict[str, Any], timeout: float) -> tuple[int, str]:
    """Run the command with the event on stdin; (exit code, its output trimmed). It runs in a
    process group of its own, killed whole at the timeout: a child it started (a shell's)
    cannot keep us waiting on its output."""
    try:
        proc = subprocess.Popen(  # noqa: S603 - the operator's own configured command, no shell
            target.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment(event),
            start_new_session=True,
        )
    except OSError as exc:
        raise DeliveryFailed(f"could not run {target.argv[0]}: {exc}") from exc
    try:
        out, err = proc.communicate(json.dumps(event, sort_keys=True).encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise DeliveryFailed(f"no answer within {timeout:.3g} s (timeout_seconds)") from exc
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    output = (out + err).decode("utf-8", "replace").strip()
    return proc.returncode, redact_text(" ".join(output.split()))[-OUTPUT_LIMIT:]


def send(target: NotifyTarget, event: dict[str, Any], timeout: float) -> None:
    """One attempt at delivering `event` to `target`; `DeliveryFailed` unless it accepted it."""
    if target.url is not None:
        _post(target, event, timeout)
        return
    code, output = _run(target, event, timeout)
    if code != 0:
        raise DeliveryFailed(f"exit {code}: {output}" if output else f"exit {code}")


def send_with_retries(target: NotifyTarget, event: dict[str, Any], deadline: float) -> None:
    """Attempts with exponential backoff until one succeeds or `deadline` (a monotonic time)
    leaves no room for another; `DeliveryFailed` with the last attempt's error then."""
    attempt = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeliveryFailed("timeout_seconds spent before an attempt")
        try:
            send(target, event, left)
            return
        except DeliveryFailed as exc:
            attempt += 1
            pause = min(MAX_BACKOFF_SECONDS, 0.1 * 2 ** (attempt - 1))
            if time.monotonic() + pause >= deadline:
                raise DeliveryFailed(f"{exc} (after {attempt} attempts)") from exc
            time.sleep(pause)


# -- delivering the outbox ---------------------------------------------------------------------


@dataclass(slots=True)
class TargetDelivery:
    """What one call delivered to one target."""

    name: str
    delivered: int = 0
    error: str | None = None
    finished: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What `deliver_pending` did, target by target (in config order)."""

    targets: list[TargetDelivery] = field(default_factory=list)

    @property
    def delivered(self) -> int:
        return sum(t.delivered for t in self.targets)


def register(journal: Journal, settings: Settings, migration: str) -> None:
    """Give every configured target of `settings` a cursor for `migration` (a new one starts
    after the newest event). Commands call it before they change the journal."""
    if not settings.notify:
        return
    try:
        with journal.transaction() as conn:
            register_targets(conn, migration, [t.name for t in settings.notify])
    except Exception as exc:  # noqa: BLE001 - events out never stops a command
        _log.warning("notify_register_failed", migration=migration, error=redact_text(str(exc)))


def deliver_pending(
    settings: Settings,
    migration: str,
    budget_seconds: float | None = None,
    *,
    journal: Journal | None = None,
) -> DeliveryReport:
    """Send every event of `migration` that a configured target has not received yet, in
    order, for at most `budget_seconds` (default: the largest `timeout_seconds` of the
    targets, which also bounds each target). Never raises; what is left waits in the outbox
    for the next call (the next command, or a `serve`/`watch` loop)."""
    targets = list(settings.notify)
    if not targets:
        return DeliveryReport()
    budget = max(t.timeout_seconds for t in targets) if budget_seconds is None else budget_seconds
    started = time.monotonic()
    own = journal is None
    reports = [TargetDelivery(t.name) for t in targets]
    threads: list[threading.Thread] = []
    try:
        store = journal or Journal(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - events out never stops a command
        _log.warning("notify_unavailable", migration=migration, error=redact_text(str(exc)))
        return DeliveryReport(reports)
    try:
        register(store, settings, migration)
        for target, report in zip(targets, reports, strict=True):
            allowed = min(budget, target.timeout_seconds)
            # The last part of the budget is kept for recording the outcome, so the thread
            # has ended (and given its connection back) when we stop waiting for it.
            deadline = started + allowed - min(RECORDING_SECONDS, allowed / 5)
            thread = threading.Thread(
                target=_deliver_target,
                args=(store, migration, target, deadline, report),
                name=f"migration-fsm-notify-{target.name}",
                daemon=True,  # one stuck on a hung endpoint must not keep the process alive
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(max(0.0, started + budget - time.monotonic()))
    finally:
        if own and not any(t.is_alive() for t in threads):
            store.close()
    for report in reports:
        if report.error is None and not report.finished:
            report.error = "timeout_seconds spent"
    return DeliveryReport(reports)


@dataclass(slots=True)
class _Cursor:
    """A target's position in the outbox during one delivery: the newest event it accepted,
    written to the database once per `CURSOR_EVENTS` accepted events or `CURSOR_SECONDS`, and
    when the delivery stops. It only ever holds an event the target accepted after all those
    before it (they are sent in id order and a failure stops the target), so what the database
    says is never ahead of what was received: at least once, never a gap."""

    journal: Journal
    migration: str
    target: str
    position: int
    unwritten: int = 0
    written_at: float = field(default_factory=time.monotonic)

    def accept(self, event_id: int) -> None:
        self.position = event_id
        self.unwritten += 1
        if self.unwritten >= CURSOR_EVENTS or time.monotonic() - self.written_at >= CURSOR_SECONDS:
            self.write()

    def write(self, error: str | None = None) -> None:
        """Record the accepted events (and `error`, a failed delivery) in one transaction."""
        if not self.unwritten and error is None:
            return
        with self.journal.transaction() as conn:
            if self.unwritten:
                record_delivered(conn, self.migration, self.target, self.position)
            if error is not None:
                record_failure(conn, self.migration, self.target, error)
        self.unwritten = 0
        self.written_at = time.monotonic()


def _deliver_target(
    journal: Journal, migration: str, target: NotifyTarget, deadline: float, report: TargetDelivery
) -> None:
    cursor: _Cursor | None = None
    try:
        while time.monotonic() < deadline:
            with journal.transaction(readonly=True) as conn:
                if cursor is None:
                    state = target_states(conn, migration).get(target.name)
                    if state is None:  # not registered (its database was unavailable)
                        report.finished = True
                        return
                    cursor = _Cursor(journal, migration, target.name, int(state["cursor"]))
                events = pending_events(conn, migration, cursor.position, target.kinds, BATCH)
            for event in events:
                try:
                    send_with_retries(target, event, deadline)
                except DeliveryFailed as exc:
                    report.error = redact_text(str(exc))
                    cursor.write(report.error)
                    _log.warning(
                        "notify_failed", target=target.name, event_id=event["id"], error=report.error
                    )
                    return
                cursor.accept(event["id"])
                report.delivered += 1
            if len(events) < BATCH:
                cursor.write()
                report.finished = True
                return
        if cursor is not None:  # the deadline, with events left: keep what was accepted
            cursor.write()
    except Exception as exc:  # noqa: BLE001 - events out never stops a command
        report.error = redact_text(f"{type(exc).__name__}: {exc}")
        _log.warning("notify_failed", target=target.name, error=report.error)
        if cursor is not None:
            with contextlib.suppress(Exception):  # best effort: what is unwritten is sent again
                cursor.write()


# -- what status shows ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetState:
    """One target's delivery state, as `status` shows it."""

    name: str
    kind: str  # url or command
    pending: int
    failures: int
    last_error: str | None
    last_attempt_at: str | None
    last_delivered_at: str | None
    cursor: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pending": self.pending,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_attempt_at": self.last_attempt_at,
            "last_delivered_at": self.last_delivered_at,
            "cursor": self.cursor,
        }


def target_report(journal: Journal, settings: Settings, migration: str) -> list[TargetState]:
    """Every configured target's delivery state for `migration` (a target that has not been
    registered yet shows nothing pending)."""
    if not settings.notify:
        return []
    out = []
    with journal.transaction(readonly=True) as conn:
        states = target_states(conn, migration)
        for target in settings.notify:
            state = states.get(target.name)
            kind = "url" if target.url is not None else "command"
            if state is None:
                out.append(TargetState(target.name, kind, 0, 0, None, None, None, None))
                continue
            out.append(
                TargetState(
                    target.name,
                    kind,
                    pending_count(conn, migration, int(state["cursor"]), target.kinds),
                    int(state["failures"]),
                    state["last_error"],
                    None if state["last_attempt_at"] is None else state["last_attempt_at"].isoformat(),
                    None if state["last_delivered_at"] is None else state["last_delivered_at"].isoformat(),
                    int(state["cursor"]),
                )
            )
    return out


# -- the before event and its vetoes ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Veto:
    """A veto command's answer to a `before` event, journaled as a guard result."""

    name: str
    passed: bool
    detail: str
    duration_ms: int


def before(settings: Settings, event: dict[str, Any]) -> list[Veto]:
    """Send the `before` event to every command target that takes it, all at once, each for at
    most its `timeout_seconds`; the answers of the `veto = true` ones (guard `notify:<name>`).
    A veto command that exits non-zero, cannot run or does not answer in time refuses."""
    targets = [t for t in settings.notify if t.wants_before()]
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="migration-fsm-before") as pool:
        answers = list(pool.map(lambda t: _before_one(t, event), targets))
    return [answer for answer in answers if answer is not None]


def _before_one(target: NotifyTarget, event: dict[str, Any]) -> Veto | None:
    started = time.perf_counter()
    try:
        code, output = _run(target, event, target.timeout_seconds)
        passed = code == 0
        detail = f"exit {code}: {output}" if output else f"exit {code}"
    except DeliveryFailed as exc:
        passed, detail = False, str(exc)
    except Exception as exc:  # noqa: BLE001 - a veto that cannot answer refuses; it never passes
        passed, detail = False, f"{type(exc).__name__}: {exc}"
    ms = round((time.perf_counter() - started) * 1000)
    if not target.veto:
        if not passed:
            _log.warning("notify_failed", target=target.name, kind="before", error=detail)
        return None
    return Veto(f"notify:{target.name}", passed, redact_text(detail), ms)
