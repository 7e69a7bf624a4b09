"""`demo --watch`: the demo's own error rate, served by a tiny Prometheus query API in the
demo's process, watched by `migration-fsm watch`'s rounds in a thread; a burst of errors
injected during the first cutover makes the watch roll the migration back by itself.

The error rate is errors / (errors + the new side's task executions) over the last
`WINDOW_SECONDS`. The errors are the demo's own failure counter: during a burst it grows by
`BURST_ERRORS_PER_SECOND` (what a failing downstream dependency would make the application
count), and outside one it stays still. The tasks themselves still run once: the burst feeds
the error counter, not the tasks' outcome, so the demo's exactly-once count is unaffected.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final

from .. import commands
from ..config import MetricGuard, Watch
from ..fsm import Phase
from ..watch import run as run_watch

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import Settings
    from ..watch import WatchRound
    from .systems import ExecutionLog

#: The error rate is measured over the executions of the last this many seconds.
WINDOW_SECONDS: Final = 2.0
#: The watched guard's bound, and the watch's rhythm (fast: a demo is short).
MAX_ERROR_RATE: Final = 0.05
INTERVAL_SECONDS: Final = 0.3
FAILURE_LIMIT: Final = 3
#: How fast the failure counter grows during a burst.
BURST_ERRORS_PER_SECOND: Final = 20.0


class ErrorRate:
    """The new side's error rate from the demo's execution log and its injected bursts."""

    def __init__(self, log: ExecutionLog) -> None:
        self.log = log
        self.bursts: list[tuple[float, float | None]] = []
        self._lock = threading.Lock()

    def start_burst(self) -> None:
        with self._lock:
            self.bursts.append((time.time(), None))

    def end_burst(self) -> None:
        with self._lock:
            start, _ = self.bursts[-1]
            self.bursts[-1] = (start, time.time())

    def errors(self, since: float, now: float) -> float:
        """The failure counter's growth from `since` to `now`."""
        with self._lock:
            bursts = list(self.bursts)
        seconds = sum(max(0.0, min(now, end or now) - max(since, start)) for start, end in bursts)
        return seconds * BURST_ERRORS_PER_SECOND

    def value(self, now: float) -> float:
        """Errors / (errors + executions on the new side) over the last `WINDOW_SECONDS`
        (0 when there were neither)."""
        since = now - WINDOW_SECONDS
        errors = self.errors(since, now)
        total = errors + len(self.log.times("new", since=since))
        return errors / total if total else 0.0


class PrometheusAPI:
    """A local HTTP server answering `/api/v1/query` with the error rate as an instant vector,
    as Prometheus would (`demo_task_error_ratio`)."""

    def __init__(self, rate: ErrorRate) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                now = time.time()
                result = [
                    {"metric": {"__name__": "demo_task_error_ratio"}, "value": [now, str(rate.value(now))]}
                ]
                body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="demo-prometheus", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def watched_settings(settings: Settings, url: str) -> Settings:
    """`settings` with the metric guard `error_rate` on the demo's API, watched in cutover:
    rolled back after `FAILURE_LIMIT` failed verdicts in a row."""
    guard = MetricGuard(kind="prometheus", url=url, query="demo_task_error_ratio", max=MAX_ERROR_RATE)
    watch = Watch(
        phases={"cutover": ["error_rate"]},
        interval_seconds=INTERVAL_SECONDS,
        failure_limit=FAILURE_LIMIT,
        on_failure="rollback",
        on_inconclusive="notify",
    )
    return settings.model_copy(update={"metric_guards": {"error_rate": guard}, "watch": watch})


@dataclass
class WatchedBurst:
    """The watch thread, the API it reads and the burst; `rollback` is what the report shows."""

    settings: Settings
    migration: str
    log: ExecutionLog
    say: Callable[[str], None]
    rounds: int = 0
    rollback: dict[str, Any] | None = None
    acted: WatchRound | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.rate = ErrorRate(self.log)
        self.api = PrometheusAPI(self.rate)
        self.watched = watched_settings(self.settings, self.api.url)
        self._thread = threading.Thread(target=self._run, name="demo-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        def report(done: WatchRound) -> None:
            self.rounds += 1
            if done.acted:
                self.acted = done
                self.say(f"demo: watch: {done.note}")

        run_watch(self.watched, self.migration, report=report, stopped=self._stop.wait)

    def burst(self, timeout: float = 60.0) -> None:
        """Inject errors on the new side until the watch has rolled back cutover -> dual_write."""
        self.say(
            f"demo: injecting an error burst on the new side; watch rolls back after {FAILURE_LIMIT} bad"
            " rounds"
        )
        self.rate.start_burst()
        deadline = time.monotonic() + timeout
        try:
            while commands.status(self.settings, self.migration).state.phase is not Phase.DUAL_WRITE:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    raise RuntimeError("demo: watch did not roll back the error burst")
                time.sleep(0.1)
        finally:
            self.rate.end_burst()
            self.close()  # the demo's story of the watch ends here: the rest of the walk is the plain one
        history = commands.history(self.settings, self.migration)
        row = next(e for e in reversed(history) if e.trigger == "rollback")
        values = [] if self.acted is None else [v.value for v in self.acted.verdicts if v.value is not None]
        self.rollback = {
            "seq": row.seq,
            "edge": f"{row.source}->{row.dest}",
            "actor": row.actor,
            "reason": row.reason,
            "value": max(values, default=None),
            "rounds": self.rounds,
        }

    def close(self) -> None:
        """Stop the watch thread and the API (again: a no-op)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=30)
        self.api.close()
