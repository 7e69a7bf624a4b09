"""Nanoseconds per `PhaseClient.routing(key)` answered from memory (a cache hit).

Prints one JSON object: per call, the median and p90 over `--repeats` loops of `--calls`
calls each, of `client.routing(key)` in `cutover` at 50% (so the per-key bucket path runs),
`client.routing()` without a key and `client.snapshot()`, next to a baseline measured in the
same run the same way: a bare attribute read (`obj.attr` on a plain object). The subjects
are interleaved within each repeat so drift hits them alike; the garbage collector is off
during the loops (as `timeit` does). Per-call figures include the `for` loop's own cost; the
empty loop is reported too, and so are two parts of `routing(key)`, measured alone: the
class attribute `Phase.CUTOVER` and the bucket hash `zlib.crc32(key.encode()) % 100`.

    .venv/bin/python bench/routing.py [--calls N] [--repeats N] [--ttl SECONDS]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from migration_fsm import log
from migration_fsm.client import PhaseClient
from migration_fsm.config import load_settings
from migration_fsm.fsm import Phase, routing_for
from migration_fsm.journal import Journal, make_engine
from migration_fsm.migration import Migration

GOAL_MEDIAN_NS = 500
GOAL_RATIO = 15
KEY = "task-00042"  # any key: a cache hit costs the same for every key of this length


class Plain:
    """The baseline's object: one plain attribute, no slots, no property."""

    def __init__(self) -> None:
        self.attr = 1


def loop_empty(calls: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(calls):
        pass
    return time.perf_counter_ns() - started


def loop_attribute(obj: Plain, calls: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(calls):
        obj.attr  # noqa: B018 - the read is the thing measured
    return time.perf_counter_ns() - started


def loop_enum_member(calls: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(calls):
        Phase.CUTOVER  # noqa: B018 - what routing() does to test the phase
    return time.perf_counter_ns() - started


def loop_bucket(key: str, calls: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(calls):
        zlib.crc32(key.encode()) % 100  # what routing(key) does to find the bucket
    return time.perf_counter_ns() - started


def loop_routing_key(client: PhaseClient, key: str, calls: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(calls):
        client.routing(key)
    return time.perf_counter_ns() - started


def loop_routing(client: PhaseClient, calls: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(calls):
        client.routing()
    return time.perf_counter_ns() - started


def loop_snapshot(client: PhaseClient, calls: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(calls):
        client.snapshot()
    return time.perf_counter_ns() - started


def summary(per_call_ns: list[float]) -> dict[str, float]:
    ordered = sorted(per_call_ns)
    return {
        "median_ns": round(statistics.median(ordered), 1),
        "p90_ns": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 1),
        "min_ns": round(ordered[0], 1),
    }


def prepare(url: str, name: str) -> None:
    """A migration in `cutover` at 50%, through the Python API (init, advance x2, ramp)."""
    store = Journal(url, engine=make_engine(url, create=True))
    try:
        store.upgrade()
        engine = Migration(store, load_settings(None, database_url=url, actor="bench"), name)
        engine.init()
        engine.advance()
        engine.advance()
        engine.ramp(50, reason="bench")
    finally:
        store.close()


def measure(client: PhaseClient, calls: int, repeats: int) -> dict[str, list[float]]:
    obj = Plain()
    subjects: dict[str, Any] = {
        "empty_loop": lambda: loop_empty(calls),
        "attribute_read": lambda: loop_attribute(obj, calls),
        "routing_key": lambda: loop_routing_key(client, KEY, calls),
        "routing_no_key": lambda: loop_routing(client, calls),
        "snapshot": lambda: loop_snapshot(client, calls),
        "breakdown_enum_member_Phase.CUTOVER": lambda: loop_enum_member(calls),
        "breakdown_bucket_crc32": lambda: loop_bucket(KEY, calls),
    }
    for run in subjects.values():  # warm-up: first calls, caches, the adaptive interpreter
        run()
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, run in subjects.items():
                samples[name].append(run() / calls)
    finally:
        if enabled:
            gc.enable()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=15, help="timed loops per subject")
    parser.add_argument("--ttl", type=float, default=1.0, help="the client's refresh interval")
    args = parser.parse_args()
    # Library callers choose their own logging; measure the client, not a log renderer.
    log.configure(json=True, level=logging.WARNING)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        prepare(url, name)
        client = PhaseClient(url, name, ttl=args.ttl)
        try:
            snap = client.snapshot()
            if snap.phase is not Phase.CUTOVER or snap.percent != 50 or snap.stale:
                raise SystemExit(f"expected a fresh cutover at 50%, the client read {snap}")
            if client.routing(KEY) != routing_for(Phase.CUTOVER, 50, KEY):
                raise SystemExit("client.routing(key) disagrees with fsm.routing_for")
            samples = measure(client, args.calls, args.repeats)
            counters = client.counters()
        finally:
            client.close()
    results = {name: summary(values) for name, values in samples.items()}
    attribute = results["attribute_read"]["median_ns"]
    routing_key = results["routing_key"]["median_ns"]
    ratio = round(routing_key / max(attribute, 1e-9), 2)
    report: dict[str, Any] = {
        "benchmark": "routing",
        "backend": "sqlite (temporary file)",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "phase": str(snap.phase),
        "percent": snap.percent,
        "key": KEY,
        "calls_per_loop": args.calls,
        "repeats": args.repeats,
        "client_ttl_s": args.ttl,
        "gc_disabled_during_loops": True,
        "per_call_includes_loop_overhead": True,
        "results": results,
        "ratio_routing_key_over_attribute_read": ratio,
        "ratios_median": {
            name: round(results[name]["median_ns"] / max(attribute, 1e-9), 2)
            for name in ("routing_key", "routing_no_key", "snapshot")
        },
        "client_refreshes_during_run": int(counters["refreshes"]),
        "goal": {
            "routing_key_median_ns_under": GOAL_MEDIAN_NS,
            "ratio_to_attribute_read_under": GOAL_RATIO,
            "median_met": routing_key < GOAL_MEDIAN_NS,
            "ratio_met": ratio < GOAL_RATIO,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
