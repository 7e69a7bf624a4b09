"""`make bench`: every benchmark under bench/, at sizes that finish in a few minutes, and one table.

Runs each benchmark as its own process (its JSON on stdout, its progress on stderr), then
prints one table: per figure, what we measured, the baseline measured in the same run,
their ratio and the goal. `--json FILE` also writes every benchmark's whole JSON object
there; `--only NAME` (repeatable) runs a subset. The full-size runs and their figures are
in docs/PERFORMANCE.md.

    .venv/bin/python bench/run_all.py [--only NAME]... [--json FILE] [--n N] [--load-seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    benchmark: str
    figure: str
    ours: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: a figure with no goal


Rows = list[Row]


def fmt(value: float, unit: str = "") -> str:
    if value >= 1000:
        return f"{value:,.0f}{unit}"
    return f"{value:.3g}{unit}"


def _plain(value: float | None) -> float | None:
    """A figure without the sign of a negative zero."""
    return None if value is None else round(value, 1) + 0.0


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def transition_rows(r: dict[str, Any]) -> Rows:
    rows = []
    goal = r.get("goal_ratio", 6.0)
    for db in ("sqlite", "postgresql", "pgbouncer"):
        if "advance" not in r.get(db, {}):
            continue
        ours, base = r[db]["advance"], r[db]["baseline_single_update_commit"]
        rows.append(
            Row(
                "transition",
                f"advance median, {db}, [[notify]] on (p99 {ours['p99_ms']:.3g} ms)",
                fmt(ours["median_ms"], " ms"),
                f"{fmt(base['median_ms'], ' ms')} one UPDATE+COMMIT",
                ratio(ours["median_ms"], base["median_ms"]),
                f"<= {goal:g}x" if db != "sqlite" else "-",
                ours["median_ms"] <= goal * base["median_ms"] if db != "sqlite" else None,
            )
        )
    return rows


def routing_rows(r: dict[str, Any]) -> Rows:
    res, goal = r["results"], r["goal"]
    ours, base = res["routing_key"]["median_ns"], res["attribute_read"]["median_ns"]
    return [
        Row(
            "routing",
            "routing(key) from the cache, median",
            fmt(ours, " ns"),
            f"{fmt(base, ' ns')} attribute read",
            ratio(ours, base),
            f"< {goal['routing_key_median_ns_under']} ns, < {goal['ratio_to_attribute_read_under']}x",
            bool(goal["median_met"] and goal["ratio_met"]),
        )
    ]


def pollers_rows(r: dict[str, Any]) -> Rows:
    steady, prop, goal = r["steady"], r["propagation"], r["goal"]
    advance = prop["advance_all_clients_after_commit"]
    bare = prop["baseline_bare_listen_after_commit"]
    return [
        Row(
            "pollers",
            f"queries per client per ttl, {r['clients']} clients",
            f"{steady['queries_per_client_per_ttl']:.3g}",
            "-",
            "-",
            f"<= {goal['queries_per_client_per_ttl_at_most']}",
            bool(goal["queries_met"]),
        ),
        Row(
            "pollers",
            "transition seen by every client, max",
            fmt(advance["max_ms"], " ms"),
            f"{fmt(bare['max_ms'], ' ms')} bare LISTEN",
            ratio(advance["max_ms"], bare["max_ms"]),
            f"< {goal['propagation_max_ms_under']} ms",
            bool(goal["propagation_met"]),
        ),
        Row(
            "pollers",
            "extra queries after a change (herd), median",
            f"{_plain(r['herd']['server_extra_poll_queries_median'])}",
            f"noise {[_plain(x) for x in r['herd']['noise_no_change_windows_min_max']]}",
            "-",
            "about 0",
            None,
        ),
    ]


def backfill_rows(r: dict[str, Any]) -> Rows:
    """One row per layout and backend of the matrix: backfill next to its baseline (the plain
    sqlite3 copy, or COPY), both medians of the same run; and the peak memory."""
    n = f"N={r['n']:,}"
    rows = []
    for backend, baseline, against, name in (
        ("sqlite", "plain_sqlite3_copy", "vs_plain_copy", "plain sqlite3 copy"),
        ("postgresql", "copy", "vs_copy", "COPY"),
    ):
        for layout, m in r.get(backend, {}).items():
            ours, theirs, versus = m["backfill"], m[baseline], m[against]
            floor = f" (floor {versus['floor']}x)" if "floor" in versus else ""
            rows.append(
                Row(
                    "backfill",
                    f"{backend} {layout} tasks/s, {n}, {ours['paths']['records']:,} as records",
                    f"{fmt(ours['tasks_per_second'], '/s')} ({ours['cpu_seconds']:.1f} CPU s)",
                    f"{fmt(theirs['tasks_per_second'], '/s')} {name} ({theirs['cpu_seconds']:.1f} CPU s)",
                    f"{versus['ratio']:.2f}x",
                    f">= {versus['goal']}x{floor}",
                    bool(versus["met"]),
                )
            )
    peak = max(
        (
            m["backfill"]["peak_rss_mb"]
            for backend in ("sqlite", "postgresql")
            for m in r.get(backend, {}).values()
        ),
        default=0.0,
    )
    rows.append(Row("backfill", "peak resident memory", fmt(peak, " MB"), "-", "-", "< 200 MB", peak < 200))
    return rows


def validate_rows(r: dict[str, Any]) -> Rows:
    """One row per layout pair and kind of tables (equal, 1% differing), then PostgreSQL's."""
    n = f"N={r['n']:,}"
    goal = f">= 1x; >= {r['goals']['tasks_per_second']:,}/s"
    rows = []
    for result in r["sqlite"].values():
        for variant in ("equal", "differ_1pct"):
            row = result[variant]
            ours, theirs = row["validate"], row["plain_scan"]
            rows.append(
                Row(
                    "validate",
                    f"SQLite {result['pair']}, {variant}, {n}",
                    fmt(ours["tasks_per_second"], "/s"),
                    f"{fmt(theirs['tasks_per_second'], '/s')} plain scan",
                    f"{row['ratio']:.2f}x (CPU {row['cpu_ratio']:.2f}x)",
                    goal,
                    bool(row["ratio"] >= r["goals"]["vs_plain_scan"])
                    and ours["tasks_per_second"] >= r["goals"]["tasks_per_second"],
                )
            )
    peak = max(
        row["validate"]["peak_rss_mb"] for result in r["sqlite"].values() for row in (result["equal"],)
    )
    rows.append(
        Row(
            "validate",
            "SQLite peak resident memory",
            fmt(peak, " MB"),
            "-",
            "-",
            f"< {r['goals']['peak_rss_mb']} MB",
            peak < r["goals"]["peak_rss_mb"],
        )
    )
    if "postgresql" in r:
        for variant in ("equal", "differ_1pct"):
            row = r["postgresql"][variant]
            rows.append(
                Row(
                    "validate",
                    f"PostgreSQL default, {variant}, {n}",
                    fmt(row["validate"]["tasks_per_second"], "/s"),
                    f"{fmt(row['plain_scan']['tasks_per_second'], '/s')} plain scan",
                    f"{row['ratio']:.2f}x",
                    "-",
                    None,
                )
            )
    return rows


def load_rows(r: dict[str, Any]) -> Rows:
    floor = r["baseline"]["before"]["insert_commit_ms"]["p50"]
    rows = [
        Row(
            "load",
            f"scheduled {r['scheduled']:,}, lost / duplicated",
            f"{r['lost']} / {r['duplicated']}",
            "-",
            "-",
            "0 / 0",
            r["lost"] == 0 and r["duplicated"] == 0,
        ),
        Row(
            "load",
            "achieved tasks/s through DualWriter",
            fmt(r["achieved_rate"], "/s"),
            f"{fmt(r['target_rate'], '/s')} target",
            ratio(r["achieved_rate"], r["target_rate"]),
            "-",
            None,
        ),
    ]
    for phase in ("dual_write", "cutover"):
        latency = r["write_latency_ms"].get(phase, {})
        if latency.get("n"):
            rows.append(
                Row(
                    "load",
                    f"write p50 (p99 {latency['p99']:.3g} ms), {phase}",
                    fmt(latency["p50"], " ms"),
                    f"{fmt(floor, ' ms')} one INSERT+COMMIT",
                    ratio(latency["p50"], floor),
                    "-",
                    None,
                )
            )
    return rows


def ledger_rows(r: dict[str, Any]) -> Rows:
    rows = []
    for db in ("sqlite", "postgresql"):
        if db not in r:
            continue
        ours, base = r[db]["ledger_claim_finish"], r[db]["baseline_insert_commit"]
        goal = db == "postgresql"
        rows.append(
            Row(
                "ledger",
                f"claim+finish, {r['workers']} workers, {db} (p99 {ours['p99_ms']:.3g} ms)",
                f"{fmt(ours['executions_per_s'], '/s')}, median {fmt(ours['median_ms'], ' ms')}",
                f"{fmt(base['executions_per_s'], '/s')} one INSERT+COMMIT",
                ratio(ours["median_ms"], base["median_ms"]),
                f">= {r['goal_executions_per_s']}/s, < {r['goal_median_ms']} ms" if goal else "-",
                (
                    ours["executions_per_s"] >= r["goal_executions_per_s"]
                    and ours["median_ms"] < r["goal_median_ms"]
                )
                if goal
                else None,
            )
        )
    return rows


def adapters_rows(r: dict[str, Any]) -> Rows:
    rows = []
    for move, m in r.get("dual_write", {}).get("moves", {}).items():
        ours, base, versus = m["dual_writer"], m["direct_old_then_new"], m["vs_direct"]
        rows.append(
            Row(
                "adapters",
                f"DualWriter tasks/s, {move}, dual_write",
                fmt(ours["tasks_per_second"], "/s"),
                f"{fmt(base['tasks_per_second'], '/s')} own enqueue into both",
                f"{versus['ratio']:.2f}x",
                f">= {versus['goal']}x",
                bool(versus["met"]),
            )
        )
    for system, s in r.get("dual_write", {}).get("systems", {}).items():
        ours, base = s["store_put_forward"], s["own_enqueue"]
        rows.append(
            Row(
                "adapters",
                f"{system} store put_forward tasks/s",
                fmt(ours["tasks_per_second"], "/s"),
                f"{fmt(base['tasks_per_second'], '/s')} own enqueue",
                f"{s['vs_own_enqueue']['ratio']:.2f}x",
                "-",
                None,
            )
        )
    for old, b in r.get("backfill", {}).items():
        ours, scan, insert = b["backfill"], b["plain_scan_of_old"], b["plain_insert_into_procrastinate"]
        rows.append(
            Row(
                "adapters",
                f"backfill {old} -> procrastinate tasks/s, N={ours['tasks']:,}",
                fmt(ours["tasks_per_second"], "/s"),
                f"{fmt(scan['tasks_per_second'], '/s')} plain scan; "
                f"{fmt(insert['tasks_per_second'], '/s')} plain insert",
                f"{b['vs_plain_scan']['ratio']:.2f}x; {b['vs_plain_insert']['ratio']:.2f}x",
                "-",
                None,
            )
        )
    return rows


def _delivery_rows(db: str, d: dict[str, Any]) -> Rows:
    rows = []
    for kind, transport in (("json", "POST"), ("slack", "POST"), ("command", "subprocess")):
        ours, base = d[kind]["ours"], d[kind]["baseline"]
        rows.append(
            Row(
                "notify",
                f"events/s delivered, {kind} target, {db}",
                fmt(ours["events_per_second"], "/s"),
                f"{fmt(base['events_per_second'], '/s')} plain {transport} loop",
                f"{d[kind]['vs_baseline']['ratio']:.2f}x",
                "-",
                None,
            )
        )
    per_event = d["json_cursor_per_event"]
    rows.append(
        Row(
            "notify",
            f"events/s, json target, cursor written per event, {db}",
            fmt(per_event["ours"]["events_per_second"], "/s"),
            f"{fmt(d['json']['ours']['events_per_second'], '/s')} batched cursor",
            f"{1 / per_event['batched_over_per_event']['ratio']:.2f}x",
            "-",
            None,
        )
    )
    return rows


def notify_rows(r: dict[str, Any]) -> Rows:
    rows = []
    for db in ("sqlite", "postgresql"):
        if "delivery" in r.get(db, {}):
            rows += _delivery_rows(db, r[db]["delivery"])
        if "transition" in r.get(db, {}):
            t = r[db]["transition"]
            for how, name in (("commands.ramp", "ramp"), ("Migration.ramp + deliver", "engine_ramp")):
                on, off = t[f"{name}_notify_on"], t[f"{name}_notify_off"]
                rows.append(
                    Row(
                        "notify",
                        f"{how}, URL target, {db} (+{t[f'{name}_notify_on_added_ms']:.3g} ms a pair)",
                        fmt(on["median_ms"], " ms"),
                        f"{fmt(off['median_ms'], ' ms')} no target",
                        ratio(on["median_ms"], off["median_ms"]),
                        "-",
                        None,
                    )
                )
    return rows


@dataclass(frozen=True)
class Bench:
    name: str
    argv: Callable[[argparse.Namespace], list[str]]
    rows: Callable[[dict[str, Any]], Rows]


BENCHES = (
    Bench("transition", lambda _a: ["transition.py", "--rounds", "200"], transition_rows),
    Bench("routing", lambda _a: ["routing.py", "--repeats", "9"], routing_rows),
    Bench("ledger", lambda _a: ["ledger.py", "--workers", "16", "--seconds", "5"], ledger_rows),
    Bench(
        "pollers",
        lambda _a: ["pollers.py", "--clients", "100", "--seconds", "5", "--rounds", "3"],
        pollers_rows,
    ),
    Bench(
        "backfill",
        lambda a: ["backfill.py", str(a.n), "--repeat", "1", "--sample", "0", "--layouts", "all"],
        backfill_rows,
    ),
    Bench(
        "validate",
        lambda a: ["validate.py", str(a.n), "--repeat", "1", "--layouts", a.layouts, "--postgres"],
        validate_rows,
    ),
    Bench(
        "load",
        lambda a: ["load.py", "--seconds", str(a.load_seconds), "--rate", "500", "--clients", "50"],
        load_rows,
    ),
    Bench("adapters", lambda _a: ["adapters.py"], adapters_rows),
    Bench("notify", lambda _a: ["notify.py", "--events", "300", "--rounds", "3"], notify_rows),
)


def run(bench: Bench, args: argparse.Namespace) -> tuple[dict[str, Any] | None, float, str]:
    """One benchmark: its JSON (None when it failed), seconds, and the failure's last line."""
    argv = [sys.executable, str(HERE / bench.argv(args)[0]), *bench.argv(args)[1:]]
    print(f"bench: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False, cwd=HERE.parent)
    seconds = time.monotonic() - started
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return None, seconds, f"exit {done.returncode}, no JSON on stdout"
    return result, seconds, "" if done.returncode == 0 else f"exit {done.returncode}"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    names = [bench.name for bench in BENCHES]
    parser.add_argument("--only", action="append", choices=names, help="run this benchmark (repeatable)")
    parser.add_argument("--json", type=Path, help="also write every benchmark's JSON object here")
    parser.add_argument("--n", type=int, default=200_000, help="tasks for backfill and validate")
    parser.add_argument("--load-seconds", type=float, default=20.0, help="load.py --seconds")
    parser.add_argument("--layouts", default="all", help="validate.py --layouts (all, or names)")
    args = parser.parse_args()
    chosen = [bench for bench in BENCHES if not args.only or bench.name in args.only]
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    table = Table(title="make bench: ours next to a baseline measured in the same run")
    for column in ("benchmark", "figure", "ours", "baseline (same run)", "ratio", "goal", "met"):
        table.add_column(column, overflow="fold")
    failed = []
    for bench in chosen:
        result, seconds, problem = run(bench, args)
        results[bench.name] = result
        if result is None:
            failed.append(bench.name)
            table.add_row(bench.name, f"failed: {problem}", "", "", "", "", "no")
            continue
        if problem:  # load.py exits 1 when a task was lost or ran twice; its rows say so
            failed.append(bench.name)
        for row in bench.rows(result):
            met = "-" if row.met is None else ("yes" if row.met else "NO")
            table.add_row(row.benchmark, row.figure, row.ours, row.baseline, row.ratio, row.goal, met)
        table.add_row("", f"[dim]{seconds:.0f} s[/dim]", "", "", "", "", "", end_section=True)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Console(width=160).print(table)
    print(
        f"cpus {results['cpus']}, load average {results['load_average_at_start']} -> "
        f"{results['load_average_at_end']}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
