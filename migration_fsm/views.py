"""What the CLI draws: the rich tables of `status`, `history`, `validate` and `demo`.

Pure functions from reports to renderables; `cli` prints them. Text that comes from the
database or from an operator (names, reasons, errors, keys) goes through `escape`: rich
markup in it is shown as written (a reason like "[drill] go" is not markup, a name like
"[/x]" does not crash the table), and control characters are shown visibly (`\x1b`), so
an escape sequence in a reason cannot clear or recolour the operator's terminal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.markup import escape as escape_markup
from rich.table import Table

from .fsm import PHASES, EntryStatus
from .log import visible
from .tasks.records import TaskStatus

if TYPE_CHECKING:
    from . import commands
    from .journal import JournalEntry
    from .tools.runs import ValidationRun
    from .watch import WatchRound


def escape(value: object) -> str:
    """`visible(value)`, with rich markup in it escaped: safe inside any rich text."""
    return escape_markup(visible(value))


def status_view(report: commands.Status) -> Table:
    data = report.as_json()
    state = report.state
    table = Table(title=f"migration '{escape(state.name)}'", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    # The current phase is marked in words too: piped or on a dumb terminal reverse video is lost.
    table.add_row(
        "phase",
        " -> ".join(f"[reverse]\\[{p}][/reverse]" if p is state.phase else str(p) for p in PHASES),
    )
    table.add_row("version", str(state.version))
    table.add_row("percent", f"{state.percent}%")
    table.add_row("routing", ", ".join(f"{k}={v}" for k, v in data["routing"].items()))
    table.add_row("phase entered", state.phase_entered_at.strftime("%Y-%m-%d %H:%M:%S UTC"))
    if report.interrupted is not None:
        entry = report.interrupted
        step = data["interrupted"]["step"]
        lease = (
            f"held by {escape(state.lease_holder or '')} until {state.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC"
            if state.lease_live()
            else "free: run `migration-fsm resume` or `abort --reason TEXT`"
        )
        table.add_row(
            "[red]interrupted[/red]",
            f"#{entry.seq} {entry.trigger} {entry.source}->{entry.dest}"
            f" at step {escape(step or '(commit)')}; lease {lease}",
        )
        if entry.error:
            table.add_row("[red]error[/red]", escape(entry.error))
    if report.hold is not None:
        held = report.hold
        table.add_row(
            "[bold red]held[/bold red]",
            escape(
                f"by {held.actor} (#{held.seq}): advance and ramp up refused until"
                f" `watch --release --reason TEXT`; {held.reason}"
            ),
        )
    if state.paused_side:
        table.add_row(
            "[yellow]paused[/yellow]", f"{state.paused_side} side's consumers (until the commit or abort)"
        )
    for side, judged in (report.workers or {}).items():
        gone = judged.gone
        named = f" ({', '.join(escape(w.worker_id) for w in gone)})" if gone else ""
        table.add_row(
            f"workers {side}",
            f"{len(judged.live)} live, {len(judged.acknowledged)} acknowledged v{state.version},"
            f" {len(gone)} gone{named}",
        )
    if report.ledger is not None:
        ledger = report.ledger
        twice = f"[red]{ledger.executed_twice}[/red]" if ledger.executed_twice else "0"
        table.add_row(
            "ledger",
            f"executed twice {twice}, refused {ledger.refused_executions}, running {ledger.running},"
            f" handed over {ledger.handed_over}, succeeded {ledger.succeeded}, failed {ledger.failed}",
        )
    elif report.ledger_error:
        table.add_row("[red]ledger[/red]", escape(report.ledger_error))
    for target in report.notify:
        failing = f", [red]{target.failures} failed in a row: {escape(target.last_error or '')}[/red]"
        table.add_row(
            f"notify {escape(target.name)}",
            f"{target.kind}, {target.pending} pending" + (failing if target.failures else ""),
        )
    table.add_row("allowed", ", ".join(data["allowed"]) or "(none)")
    return table


def validation_runs_table(checks: list[ValidationRun]) -> Table:
    figures = ("old_count", "new_count", "missing", "mismatched", "extra", "status_differs")
    table = Table(title="validate runs", title_justify="left")
    for column in ("id", "started (UTC)", "phase", "result", *figures):
        table.add_column(column, no_wrap=column == "started (UTC)")
    for run in checks:
        table.add_row(
            str(run.id),
            f"{run.started_at:%Y-%m-%d %H:%M:%S}",
            escape(run.phase or ""),
            "[green]ok[/green]" if run.ok else "[red]NOT OK[/red]",
            *(str(run.summary[k]) for k in figures),
        )
    return table


def history_table(migration: str, entries: list[JournalEntry]) -> Table:
    table = Table(title=f"journal of '{escape(migration)}'", title_justify="left")
    for column in (
        "seq",
        "started (UTC)",
        "trigger",
        "edge",
        "%",
        "status",
        "actor",
        "reason",
        "guards",
        "steps",
    ):
        table.add_column(column, no_wrap=column in ("started (UTC)", "edge", "status"))
    colour: dict[str, str] = {
        EntryStatus.COMMITTED: "green",
        EntryStatus.REFUSED: "yellow",
        EntryStatus.ABORTED: "magenta",
        EntryStatus.INTENT: "red",
        EntryStatus.APPROVED: "cyan",
        EntryStatus.HELD: "bold red",
        EntryStatus.RELEASED: "cyan",
    }
    for e in entries:
        # Text from the database is escaped: a reason like "[drill] go" is not markup.
        guards = " ".join(f"{'✓' if g['passed'] else '✗'}{escape(g['name'])}" for g in e.guards)
        steps = " ".join(f"{escape(s.name)}:{s.status}" for s in e.steps)
        note = escape(e.reason or "")
        if e.forced:
            note = f"[bold]FORCED[/bold] {note}"
        for takeover in e.takeovers:
            how = "stolen by" if takeover.get("stolen") else "taken over by"
            note = (
                f"{note} ({escape(takeover.get('command'))}: {how} {escape(takeover.get('actor'))})".strip()
            )
        if e.error:
            note = f"{note} [red]{escape(e.error)}[/red]".strip()
        if e.status == EntryStatus.REFUSED:  # why, without --json: the refusing guards' details
            refusals = "; ".join(f"{g['name']}: {g['detail']}" for g in e.guards if not g["passed"])
            note = f"{note} [yellow]refused by {escape(refusals)}[/yellow]".strip()
        table.add_row(
            str(e.seq),
            f"{e.started_at:%Y-%m-%d %H:%M:%S}",
            str(e.trigger),
            f"{e.source or ''}->{e.dest}",
            str(e.percent),
            f"[{colour.get(e.status, 'white')}]{e.status}[/]",
            escape(e.actor),
            note,
            guards,
            steps,
        )
    return table


def validation_view(data: dict[str, Any]) -> Group:
    verdict = "[green]ok[/green]" if data["ok"] else "[red]NOT OK[/red]"
    table = Table(title=f"validation: {verdict}", title_justify="left")
    table.add_column("")
    table.add_column("old", justify="right")
    table.add_column("new", justify="right")
    table.add_row("[bold]tasks[/bold]", str(data["old_count"]), str(data["new_count"]))
    for status_name, count in data["counts_by_status"]["old"].items():
        table.add_row(f"  {status_name}", str(count), str(data["counts_by_status"]["new"][status_name]))
    found = Table(show_header=True)
    found.add_column("difference")
    found.add_column("count", justify="right")
    found.add_column("first keys")
    samples = data["samples"]
    mismatched = [f"{escape(m['key'])} ({', '.join(m['fields'])})" for m in samples["mismatched"]]
    for kind, why, keys in (
        ("missing", "on old, not on new", [escape(key) for key in samples["missing"]]),
        ("mismatched", "identity differs", mismatched),
        ("extra", "on new, not on old", [escape(key) for key in samples["extra"]]),
        ("status_differs", "other status or attempts", []),
    ):
        count = data[kind]
        style = "red" if count and kind in ("missing", "mismatched") else "white"
        found.add_row(f"{kind} ({why})", f"[{style}]{count}[/]", ", ".join(keys))
    for kind, why in (
        ("runnable_old_copies", "old copies still runnable, ran on new"),
        ("executed_twice", "ledger: succeeded more than once"),
        ("refused_executions", "ledger: second executions refused"),
    ):
        count = data.get(kind)
        shown = "n/a" if count is None else str(count)
        style = "red" if count and kind == "executed_twice" else "white"
        found.add_row(f"{kind} ({why})", f"[{style}]{shown}[/]", "")
    return Group(table, found)


def demo_view(state: dict[str, Any]) -> Table:
    table = Table(title=f"phase {state['phase']} ({state['percent']}%)", title_justify="left")
    table.add_column("")
    table.add_column("old", justify="right")
    table.add_column("new", justify="right")
    for status in (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED):
        table.add_row(status, str(state["old"].get(status, 0)), str(state["new"].get(status, 0)))
    table.add_row("executed here", str(state["by_side"].get("old", 0)), str(state["by_side"].get("new", 0)))
    routing = state["routing"]
    table.caption = (
        f"scheduled {state['scheduled']}, executed {state['executed']},"
        f" fallback reads {state['fallbacks']}; writes old={routing['write_old']}"
        f" new={routing['write_new']}, consume from {routing['consume_from']}"
    )
    return table


def demo_report(data: dict[str, Any]) -> Group:
    table = Table(title="demo report", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in (
        "scheduled",
        "executed",
        "lost",
        "duplicated",
        "executed_twice",
        "refused_executions",
        "fallback_reads",
        "repair_entries",
        "rollbacks",
    ):
        style = "green" if key in ("lost", "duplicated", "executed_twice") and data[key] == 0 else ""
        table.add_row(key.replace("_", " "), f"[{style}]{data[key]}[/]" if style else str(data[key]))
    table.add_row("crash resumed", str(data["crash_resumed"]))
    table.add_row("validations ok", str(data["validations_ok"]))
    table.add_row("journal verified", str(data["journal_verified"]))
    rolled = data.get("watch_rollback")
    if rolled:
        value = "" if rolled["value"] is None else f" at error rate {rolled['value']:.2%}"
        table.add_row(
            "rolled back by watch", escape(f"#{rolled['seq']} {rolled['edge']} by {rolled['actor']}{value}")
        )
    for side, pool in data.get("workers", {}).items():
        table.add_row(f"{side} workers", f"{pool['threads']} threads, ran {pool['executed']}")
    acknowledged = [
        f"{pause['side']} ({pause['acknowledged']}"
        + (f", {len(pause['gone'])} gone)" if pause["gone"] else ")")
        for pause in data.get("pauses", [])
    ]
    table.add_row("pauses acknowledged", ", ".join(acknowledged) or "none")
    if "ledger" in data:
        table.add_row("handed over", str(data["ledger"].get("handed_over", 0)))
    phases = Table(title="seconds per phase", title_justify="left")
    for phase in data["phases"]:
        phases.add_column(phase, justify="right")
    phases.add_row(*(f"{seconds:.1f}" for seconds in data["phases"].values()))
    return Group(table, phases)


def watch_round_line(done: WatchRound) -> str:
    """One round of `watch` as one or two lines (markup-escaped)."""
    marks = {
        "passed": "[green]ok[/green]",
        "failed": "[red]FAIL[/red]",
        "inconclusive": "[yellow]INCONCLUSIVE[/yellow]",
    }
    head = f"{done.at.strftime('%H:%M:%S')} {done.phase} {done.percent}% v{done.version}"
    parts = []
    for verdict in done.verdicts:
        failed, unknown = done.streaks.get(verdict.name, (0, 0))
        streak = f" [{max(failed, unknown)}]" if failed or unknown else ""
        dry = " (dry run)" if verdict.dry_run else ""
        mark = marks[str(verdict.outcome)]
        parts.append(f"{escape(verdict.name)} {mark}{dry}{streak}: {escape(verdict.detail)}")
    line = head + (": " + "; ".join(parts) if parts else "")
    if done.held:
        line += " [bold red](held)[/bold red]"
    if done.note:
        line += f"\n  {'[bold]' if done.acted else ''}{escape(done.note)}{'[/bold]' if done.acted else ''}"
    return line
