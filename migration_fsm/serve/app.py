"""The HTTP side of `migration-fsm serve`: `/metrics`, `/api/*` and the status page.

Read-only by construction: the migration database is opened read-only (a SQLite file in
read-only mode; on PostgreSQL every transaction is `READ ONLY`), the server answers GET and
HEAD only, and no handler calls anything that writes. Standard library `http.server` (one
thread per request): a handful of operators and one Prometheus scrape do not need more.
"""

from __future__ import annotations

import hmac
import json
import threading
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import event

from .. import commands
from ..exceptions import BadInput, MigrationFSMError
from ..journal import Journal, redact_text
from ..log import get_logger
from .metrics import MigrationCollector, Snapshot, read_snapshot

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine

    from ..config import Settings

log = get_logger()

DEFAULT_LISTEN: Final = "127.0.0.1:9464"
#: The journal entries the page shows, newest first.
PAGE_HISTORY: Final = 50


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) -> (host, port); bad input is `BadInput`."""
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise BadInput(f"--listen '{value}': expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port_text)


def read_only_on_postgresql(engine: Engine) -> None:
    """Make every transaction of `engine` `READ ONLY` on PostgreSQL (a SQLite engine opened
    read-only already is): the server then cannot write even through a bug."""
    if engine.dialect.name != "postgresql":
        return
    engine.dispose()  # connections made before the listener would not be read-only

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.read_only = True


def is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


class StatusServer:
    """Serves one migration until `shutdown()`. `address` is where it listens (port 0 picks
    a free one)."""

    def __init__(
        self, settings: Settings, migration: str, *, listen: str = DEFAULT_LISTEN, token: str | None = None
    ) -> None:
        host, port = parse_listen(listen)
        self.settings = settings
        self.migration = migration
        self.token = token or None
        self.store = Journal.open(settings.database_url, readonly=True)
        try:
            read_only_on_postgresql(self.store.engine)
            self.store.get(migration)  # an unknown migration is bad input, before listening
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(MigrationCollector(migration, self.snapshot))
            self.page = resources.files(__package__).joinpath("page.html").read_bytes()
            handler = partial(_Handler, self)
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except BaseException:
            self.store.close()
            raise
        self.httpd.daemon_threads = True
        self._serving = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def snapshot(self) -> Snapshot:
        return read_snapshot(self.settings, self.migration, self.store)

    def serve_forever(self) -> None:
        self._serving = True
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, embedding); `shutdown()` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="mfsm-serve", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        if self._serving:  # `httpd.shutdown()` waits for a loop that never ran otherwise
            self.httpd.shutdown()
        self.httpd.server_close()
        self.store.close()

    def authorized(self, headers: Any, query: dict[str, list[str]]) -> bool:
        if self.token is None:
            return True
        offered = headers.get("Authorization", "")
        given = offered.removeprefix("Bearer ").strip() if offered.startswith("Bearer ") else None
        if given is None:
            given = (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    # -- the routes: each returns (status, content type, body) ------------------------

    def route(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        if path == "/":
            return HTTPStatus.OK, "text/html; charset=utf-8", self.page
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        api: Callable[[], Any] | None = {
            "/api/status": self._status,
            "/api/history": self._history,
            "/api/details": self._details,
        }.get(path)
        if api is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})
        try:
            return _json(HTTPStatus.OK, api())
        except MigrationFSMError as exc:  # the database is down: say so, keep serving
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": redact_text(str(exc))})

    def _status(self) -> dict[str, Any]:
        return commands.status(self.settings, self.migration, self.store).as_json()

    def _history(self) -> list[dict[str, Any]]:
        return commands.history_json(commands.history(self.settings, self.migration, self.store))

    def _details(self) -> dict[str, Any]:
        return self.snapshot().details()


def _json(status: HTTPStatus, data: Any) -> tuple[HTTPStatus, str, bytes]:
    return status, "application/json", json.dumps(data).encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "migration-fsm"

    def __init__(self, app: StatusServer, *args: Any) -> None:
        self.app = app
        super().__init__(*args)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _refuse_write(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, "application/json", b'{"error": "read-only"}', False)

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse_write

    def _answer(self, *, head: bool) -> None:
        parts = urlsplit(self.path)
        if not self.app.authorized(self.headers, parse_qs(parts.query)):
            status, kind, body = _json(HTTPStatus.UNAUTHORIZED, {"error": "a token is required"})
        else:
            status, kind, body = self.app.route(parts.path)
        self._send(status, kind, body, head)

    def _send(self, status: HTTPStatus, kind: str, body: bytes, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("serve_request", client=self.client_address[0], request=format % args)
