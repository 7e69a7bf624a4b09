"""A tiny Prometheus of the test's own: a local HTTP server speaking the query API
(`/api/v1/query`, `/api/v1/query_range`) with whatever answer a test sets."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


class FakePrometheus:
    """A local HTTP server answering `/api/v1/query` and `/api/v1/query_range` with whatever
    `answer(path, form)` returns: (HTTP status, body). Records each request's path and form."""

    def __init__(self) -> None:
        self.answer: Callable[[str, dict[str, str]], tuple[int, bytes]] = lambda path, form: (
            200,
            vector(0.0),
        )
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.authorizations: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                fake.requests.append((self.path, form))
                fake.authorizations.append(self.headers.get("Authorization"))
                status, body = fake.answer(self.path, form)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop listening (again: a no-op); the port then refuses connections."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()


def success(result_type: str, result: Any) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": result_type, "result": result}}).encode()


def vector(*values: float | str, at: float = 1_700_000_000.0) -> bytes:
    """An instant vector: one series per value, labelled `pod="p<i>"`."""
    return success(
        "vector",
        [{"metric": {"pod": f"p{i}"}, "value": [at, str(v)]} for i, v in enumerate(values)],
    )


def matrix(form: dict[str, str], *series: Callable[[int], float]) -> bytes:
    """A range answer from `start` to `end` by `step`: series i's value at sample n is series[i](n)."""
    start, end, step = float(form["start"]), float(form["end"]), float(form["step"])
    times = [start + n * step for n in range(int((end - start) // step) + 1)]
    return success(
        "matrix",
        [
            {
                "metric": {"__name__": "ratio", "pod": f"p{i}"},
                "values": [[t, str(f(n))] for n, t in enumerate(times)],
            }
            for i, f in enumerate(series)
        ],
    )
