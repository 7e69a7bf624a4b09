"""The `migration-fsm` command line: parses, calls `commands`, prints, maps errors to exit codes.

stdout carries only the command's output (one JSON document with `--json`); logs and
errors go to stderr. This is the only module that configures logging.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from . import commands, log, views
from .config import Settings, load_settings, refuse_process_local_stores
from .exceptions import UNEXPECTED_ERROR_EXIT_CODE, BadInput, MigrationFSMError
from .fsm import PHASES, Phase
from .journal.db import redact_text, remember_secrets
from .views import escape

if TYPE_CHECKING:
    from .journal import Journal
    from .migration import GuardRecord, TransitionResult

F = TypeVar("F", bound=Callable[..., Any])


def _console() -> Console:
    """The console for stdout. Piped output is not cut at 80 columns: a log file or a pager
    can hold wide tables."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


#: Made again by each `main` call, for the stdout of that call.
out = _console()


def common_options(func: F) -> F:
    """`-m/--migration`, `--db`, `--config`, `--actor` on every command, after its name."""

    @click.option("-m", "--migration", default="default", show_default=True, help="Migration name.")
    @click.option(
        "--db", "database_url", metavar="URL", help="Database URL [env MIGRATION_FSM_DATABASE_URL]."
    )
    @click.option(
        "--config",
        "config_path",
        metavar="PATH",
        envvar="MIGRATION_FSM_CONFIG",
        help="TOML config file [env MIGRATION_FSM_CONFIG].",
    )
    @click.option(
        "--actor", metavar="NAME", help="Who is acting [env MIGRATION_FSM_ACTOR; default user@host]."
    )
    @functools.wraps(func)
    def wrapper(
        migration: str, database_url: str | None, config_path: str | None, actor: str | None, **kwargs: Any
    ) -> Any:
        settings = load_settings(config_path, database_url=database_url, actor=actor)
        remember_secrets(
            settings.database_url, settings.ledger_url, *(store.url for store in settings.stores.values())
        )
        refuse_process_local_stores(settings)
        return func(settings, migration, **kwargs)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="migration-fsm")
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    help="On an error, print its traceback on stderr (before the command's name).",
)
@click.pass_context
def cli(ctx: click.Context, show_traceback: bool) -> None:
    """Move a running backend from its old task manager to a new task queue, phase by phase."""
    if isinstance(ctx.obj, _Run):
        ctx.obj.show_traceback = show_traceback


@cli.group()
def db() -> None:
    """The migration database's schema."""


@db.command("upgrade")
@common_options
def db_upgrade(
    settings: Settings,
    migration: str,  # noqa: ARG001  common_options passes -m; the schema is not per migration
) -> int:
    """Create or upgrade the schema to the newest revision (idempotent)."""
    before, after = commands.db_upgrade(settings)
    at = ", ".join(sorted(after))
    if before == after:
        out.print(f"schema already at {at}")
    else:
        out.print(f"schema upgraded from {', '.join(sorted(before)) or 'nothing'} to {at}")
    return 0


@cli.command()
@common_options
def init(settings: Settings, migration: str) -> int:
    """Create the migration in `preparation`."""
    state = commands.init(settings, migration)
    out.print(f"migration '{escape(state.name)}' created in {state.phase}")
    out.print("next: `migration-fsm advance` starts dual writes (docs/MIGRATION.md)")
    return 0


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--watch", is_flag=True, help="Redraw every second until interrupted.")
def status(settings: Settings, migration: str, as_json: bool, watch: bool) -> int:
    """Phase, version, percent, routing, interrupted transition, allowed triggers."""
    if watch:
        return _watch(settings, migration)
    report = commands.status(settings, migration)
    if as_json:
        _print_json(report.as_json())
    else:
        out.print(views.status_view(report))
    return 0


def _watch(settings: Settings, migration: str) -> int:
    with commands.open_store(settings, readonly=True) as store, Live(console=out, auto_refresh=False) as live:
        try:
            while True:
                live.update(_watch_view(settings, migration, store), refresh=True)
                time.sleep(1.0)
        except KeyboardInterrupt:
            return 0


def _watch_view(settings: Settings, migration: str, store: Journal) -> Any:
    try:
        view: Any = views.status_view(commands.status(settings, migration, store))
    except MigrationFSMError as exc:  # keep watching through an outage
        view = f"[red]{escape(redact_text(str(exc)))}[/red]"
    return Group(view, f"[dim]{time.strftime('%H:%M:%S')}  (Ctrl-C to stop)[/dim]")


@cli.command()
@common_options
@click.option("--dry-run", is_flag=True, help="Evaluate the guards and print the plan; change nothing.")
@click.option("--force", is_flag=True, help="Override failing guards (needs --reason).")
@click.option("--reason", metavar="TEXT", help="Why (journaled).")
def advance(settings: Settings, migration: str, dry_run: bool, force: bool, reason: str | None) -> int:
    """Take the next edge."""
    outcome = commands.advance(settings, migration, dry_run=dry_run, force=force, reason=reason)
    return _print_outcomes([outcome], force=force)


@cli.command()
@common_options
@click.option("--reason", metavar="TEXT", required=True, help="Why (journaled).")
@click.option("--to", "to", metavar="PHASE", help="Roll back edge by edge down to PHASE.")
@click.option("--dry-run", is_flag=True, help="Evaluate the guards and print the plan; change nothing.")
def rollback(settings: Settings, migration: str, reason: str, to: str | None, dry_run: bool) -> int:
    """Go back one edge (or edge by edge to PHASE)."""
    target = _phase(to) if to is not None else None
    outcomes = commands.rollback(settings, migration, reason=reason, to=target, dry_run=dry_run)
    return _print_outcomes(outcomes, force=False)


@cli.command()
@common_options
@click.argument("percent", metavar="PERCENT")
@click.option("--reason", metavar="TEXT", help="Why (journaled).")
def ramp(settings: Settings, migration: str, percent: str, reason: str | None) -> int:
    """Set the cutover percent (0..100)."""
    # Plain ASCII digits only: `int()` would also take ' 50', '+50', '050' and other scripts' digits.
    if re.fullmatch(r"0|[1-9][0-9]?|100", percent) is None:
        raise BadInput(f"percent must be a whole number from 0 to 100, not '{escape(percent)}'")
    value = int(percent)
    return _print_outcomes([commands.ramp(settings, migration, value, reason=reason)], force=False)


@cli.command()
@common_options
@click.option("--edge", metavar="EDGE", required=True, help="The edge to approve, e.g. cutover->cleanup.")
@click.option("--reason", metavar="TEXT", required=True, help="Why (journaled).")
def approve(settings: Settings, migration: str, edge: str, reason: str) -> int:
    """Approve an edge of [approvals] for another operator to take (two-person rule)."""
    entry = commands.approve(settings, migration, edge=edge, reason=reason)
    out.print(
        f"approved {escape(edge)} as {escape(entry.actor)} (#{entry.seq}): another operator may take it"
    )
    return 0


@cli.command()
@common_options
@click.option("--steal", is_flag=True, help="Take the lease now, even if its holder's has not expired.")
def resume(settings: Settings, migration: str, steal: bool) -> int:
    """Finish an interrupted transition."""
    return _print_outcomes([commands.resume(settings, migration, steal=steal)], force=False)


@cli.command()
@common_options
@click.option("--reason", metavar="TEXT", required=True, help="Why (journaled).")
def abort(settings: Settings, migration: str, reason: str) -> int:
    """Undo the done steps of an interrupted transition; stay in the source phase."""
    return _print_outcomes([commands.abort(settings, migration, reason=reason)], force=False)


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def history(settings: Settings, migration: str, as_json: bool) -> int:
    """The journal, oldest first."""
    entries = commands.history(settings, migration)
    if as_json:
        _print_json(commands.history_json(entries))
    else:
        out.print(views.history_table(migration, entries))
        checks = commands.validation_runs(settings, migration)
        if checks:
            out.print(views.validation_runs_table(checks))
    return 0


@cli.command()
@common_options
@click.option(
    "--expect-head",
    metavar="HASH",
    help="A head hash printed by an earlier verify and kept outside the database (e.g. in the"
    " change ticket): fail unless it is still a row of the chain.",
)
def verify(settings: Settings, migration: str, expect_head: str | None) -> int:
    """Check the hash chain, the replayed phase and the digests of the rows guards trust;
    print the head hash to keep outside the database (see docs/VERIFY.md)."""
    result = commands.verify(settings, migration, expect_head=expect_head)
    anchored = "" if result.anchor_seq is None else f", the expected head is row #{result.anchor_seq}"
    out.print(
        f"journal of '{escape(result.migration)}' verified: {result.rows} rows,"
        f" replay gives {result.phase} at {result.percent}%{anchored}"
    )
    # On a line of its own, whole, to paste into the change ticket (`--expect-head` later).
    out.print(f"head {result.head_hash or ''}", soft_wrap=True)
    return 0


@cli.command()
@common_options
@click.option("--batch-size", type=click.IntRange(min=1), metavar="N", help="Tasks per batch [config].")
@click.option(
    "--max-rate", type=click.FloatRange(min=0, min_open=True), metavar="N", help="At most N tasks a second."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def backfill(
    settings: Settings, migration: str, batch_size: int | None, max_rate: float | None, as_json: bool
) -> int:
    """Copy the old side's tasks to the new side (continues from the last checkpoint)."""
    from .tools.progress import for_stderr

    progress = for_stderr("backfill", "backfill_progress")
    result = commands.backfill(
        settings, migration, batch_size=batch_size, max_rate=max_rate, progress=progress
    )
    if as_json:
        _print_json(result.as_json())
    else:
        after = f" after key '{escape(result.resumed_from)}'" if result.resumed_from is not None else ""
        out.print(
            f"backfill done: copied {result.copied} tasks{after} in {result.seconds:.1f} s"
            f" ({result.rows_per_second:,.0f}/s); the new side holds {result.total}"
        )
        out.print("next: `migration-fsm reconcile`, then `migration-fsm validate`")
    return 0


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def validate(settings: Settings, migration: str, as_json: bool) -> int:
    """Compare both sides key by key; exit 1 when tasks are missing or mismatched."""
    report = commands.validate(settings, migration)
    if as_json:
        _print_json(report.as_json())
    else:
        out.print(views.validation_view(report.as_json()))
        out.print(
            "next: `migration-fsm advance --dry-run` shows the guards of the next edge"
            if report.ok
            else "next: fix what differs (docs/VALIDATION.md says how for each kind), then validate again"
        )
    return 0 if report.ok else 1


@cli.command()
@common_options
@click.option("--side", type=click.Choice(["old", "new"]), required=True, help="Which store to export.")
@click.option("--out", "out_path", metavar="FILE", required=True, help="JSON Lines file (.gz: gzip).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace FILE if it exists (never a configured database or a non-regular file).",
)
def export(settings: Settings, migration: str, side: str, out_path: str, overwrite: bool) -> int:
    """Write every task of one side to a file, with a verifiable summary line."""
    summary = commands.export(settings, migration, side=side, out=out_path, overwrite=overwrite)
    out.print(
        f"exported {summary.count} tasks of the {side} side ('{escape(summary.store)}') to {escape(out_path)}"
        f" (digest {summary.digest[:16]})"
    )
    return 0


@cli.command("import")
@common_options
@click.option("--side", type=click.Choice(["old", "new"]), required=True, help="Which store to load.")
@click.option("--in", "in_path", metavar="FILE", required=True, help="A file written by `export`.")
@click.option(
    "--into-other-side",
    is_flag=True,
    help="Load an export of the other side into --side (refused without it).",
)
def import_(settings: Settings, migration: str, side: str, in_path: str, into_other_side: bool) -> int:
    """Verify an export, then load its tasks into one side (idempotent; journaled)."""
    result = commands.import_(settings, migration, side=side, path=in_path, into_other_side=into_other_side)
    out.print(
        f"verified {escape(in_path)} ({result.summary.count} tasks exported from the"
        f" {escape(result.summary.side)} side) and loaded {result.loaded} tasks into the {side} side"
    )
    return 0


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def reconcile(settings: Settings, migration: str, as_json: bool) -> int:
    """Replay failed dual writes (the repair log) from the side that has them."""
    result = commands.reconcile(settings, migration)
    if as_json:
        _print_json(result.as_json())
    else:
        out.print(
            f"reconciled: {result.replayed} replayed, {result.already_current} already current,"
            f" {result.absent} absent on both sides, {result.failed} failed; {result.open} still open"
        )
    return 1 if result.failed else 0


@cli.command()
@click.option(
    "--tasks", type=click.IntRange(min=1), default=2000, show_default=True, help="Tasks to schedule."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=100.0,
    show_default=True,
    help="Tasks scheduled per second.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's SQLite files here instead of a temporary folder.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Also run `watch` on the demo's own error rate: an error burst in cutover rolls it back.",
)
def demo(tasks: int, rate: float, as_json: bool, directory: Path | None, watch: bool) -> int:
    """Run a whole migration under live traffic on SQLite and report what was lost or run twice."""
    from .demo.run import run_demo

    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission, ...
            raise BadInput(f"cannot use --dir {directory}: {exc.strerror or exc}: give a folder") from exc
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if err.is_terminal:
        with Live(console=err, auto_refresh=False, transient=True) as live:
            report = run_demo(
                tasks=tasks,
                rate=rate,
                directory=directory,
                say=live.console.print,
                view=lambda state: live.update(views.demo_view(state), refresh=True),
                watch=watch,
            )
    else:
        report = run_demo(tasks=tasks, rate=rate, directory=directory, say=err.print, watch=watch)
    data = report.as_json()
    if as_json:
        _print_json(data)
    else:
        out.print(views.demo_report(data))
    return 0 if data["lost"] == data["duplicated"] == data["executed_twice"] == 0 else 1


@cli.command()
@common_options
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default="127.0.0.1:9464",
    show_default=True,
    help="Where to listen (port 0: a free one).",
)
@click.option(
    "--token",
    metavar="TEXT",
    envvar="MIGRATION_FSM_SERVE_TOKEN",
    help="Require this token (Authorization: Bearer, or ?token= on the page)"
    " [env MIGRATION_FSM_SERVE_TOKEN].",
)
def serve(settings: Settings, migration: str, listen: str, token: str | None) -> int:
    """Serve Prometheus /metrics, /api/status, /api/history and a live status page (read-only)."""
    import signal

    from .serve import StatusServer, is_loopback

    server = StatusServer(settings, migration, listen=listen, token=token)
    host = server.address[0]
    if not token and not is_loopback(host):
        click.echo(f"warning: serving on {host} to anyone who can reach it: consider --token", err=True)
    click.echo(f"serving migration '{migration}' on {server.url} (metrics: {server.url}metrics)")
    sys.stdout.flush()

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
    return 0


@cli.command()
@common_options
@click.option("--once", is_flag=True, help="Evaluate one round and exit (for cron and tests).")
@click.option("--json", "as_json", is_flag=True, help="Print each round as one JSON object a line.")
@click.option("--release", is_flag=True, help="Release the standing hold (needs --reason) and exit.")
@click.option("--reason", metavar="TEXT", help="Why the hold is released (journaled).")
def watch(
    settings: Settings, migration: str, *, once: bool, as_json: bool, release: bool, reason: str | None
) -> int:
    """Evaluate the [watch] guards every interval while a phase soaks; pause, roll back or
    notify after failure_limit failed verdicts in a row. Runs until Ctrl-C or SIGTERM."""
    import signal
    import threading

    from . import watch as watching

    if release:
        entry = commands.release(settings, migration, reason=reason or "")
        out.print(f"released the hold as {escape(entry.actor)} (#{entry.seq}): advance and ramp up allowed")
        return 0
    if reason is not None:
        raise BadInput("--reason goes with --release")
    stop = threading.Event()

    def report(done: watching.WatchRound) -> None:
        if as_json:
            click.echo(json.dumps(done.as_json(), sort_keys=True))
        else:
            out.print(views.watch_round_line(done))
        sys.stdout.flush()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        watching.run(settings, migration, once=once, report=report, stopped=stop.wait)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


@cli.command()
def diagram() -> int:
    """Print the state machine as a Mermaid stateDiagram-v2."""
    click.echo(commands.diagram(), nl=False)
    return 0


def _phase(value: str) -> Phase:
    try:
        return Phase(value)
    except ValueError:
        raise BadInput(f"unknown phase '{value}' (phases: {', '.join(PHASES)})") from None


def _print_outcomes(outcomes: Sequence[TransitionResult], *, force: bool) -> int:
    code = 0
    for outcome in outcomes:
        edge = outcome.edge
        if outcome.status == "planned":
            refusing = [g for g in outcome.guards if not g.passed and not (force and g.forceable)]
            verdict = "[red]would be refused[/red]" if refusing else "[green]would be taken[/green]"
            out.print(f"plan: {edge.trigger} {edge.source} -> {edge.dest} ({outcome.percent}%): {verdict}")
            _print_guards(outcome.guards)
            out.print(f"steps: {escape(', '.join(outcome.steps) or '(none)')}")
            for warning in outcome.warnings:
                out.print(f"[yellow]warning:[/yellow] {escape(warning)}")
            code = max(code, 1 if refusing else 0)
            continue
        if outcome.status == "unchanged":
            out.print(f"unchanged: already at {outcome.percent}% (nothing journaled)")
            continue
        if outcome.guards:
            _print_guards(outcome.guards)
        state = outcome.state
        version = f", version {state.version}" if state is not None else ""
        forced = " [bold](forced)[/bold]" if outcome.forced else ""
        out.print(
            f"{outcome.status} #{outcome.seq}: {edge.trigger} {edge.source} -> {edge.dest}"
            f" ({outcome.percent}%){version}{forced}"
        )
    return code


def _print_guards(guards: list[GuardRecord]) -> None:
    if not guards:
        out.print("guards: (none)")
        return
    table = Table("guard", "result", "detail", "ms")
    for g in guards:
        result = "[green]pass[/green]" if g.passed else "[red]FAIL[/red]"
        name = escape(g.name) + ("" if g.forceable else " (always on)")
        table.add_row(name, result, escape(g.detail), str(g.duration_ms))
    out.print(table)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


class _Run:
    """What the group's options say about one `main` call."""

    show_traceback: bool = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (see `__main__`).

    Exit codes: 0 done, 1 refused or failed (see `exceptions`), 2 bad input, 3 conflict,
    4 environment, 70 an unexpected error (a bug), 130 interrupted.
    """
    global out  # noqa: PLW0603 - one console per run, on the stdout of that run
    out = _console()
    log.configure(redact=redact_text)
    run = _Run()
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="migration-fsm",
            standalone_mode=False,
            obj=run,
        )
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
        click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
        return exc.exit_code
    except MigrationFSMError as exc:
        if run.show_traceback:
            _print_traceback(exc)
        click.echo(f"error: {_one_line(redact_text(str(exc)))}", err=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: say so, with its own exit code
        if run.show_traceback:
            _print_traceback(exc)
            hint = "please report it with the traceback above"
        else:
            hint = "run it again as `migration-fsm --traceback COMMAND ...` to see where"
        what = _one_line(redact_text(f"{type(exc).__name__}: {exc}"))
        click.echo(f"error: unexpected {what}; this is a bug in migration-fsm: {hint}", err=True)
        return UNEXPECTED_ERROR_EXIT_CODE
    return code if isinstance(code, int) else 0


def _print_traceback(exc: BaseException) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(exc))))
    sys.stderr.flush()


def _one_line(message: str) -> str:
    """One line, its control characters shown (`\\x1b`): never raw to the terminal."""
    return log.visible(" ".join(message.split()))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
