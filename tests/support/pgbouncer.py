"""A private PgBouncer in transaction pooling (the distribution's package; `make test` installs
it), started in the foreground on a free port with a config of its own, for the system tests
(`tests/system/test_pgbouncer.py`) and the ledger's in-process test of a lost prepared
statement (`tests/unit/test_ledger_connections.py`). The caller stops it by its pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_pgbouncer(
    folder: Path, server: str, *, pool_size: int = 2, databases: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `pgbouncer` in the foreground with a config of its own in `folder`, in front of
    `server`'s host and port: every database name passed through (`*`), unless `databases`
    maps names to PgBouncer's own connection strings (`dbname=... connect_query='...'`).
    `pool_size` server connections per database and user."""
    if shutil.which("pgbouncer") is None:  # a failure, never a skip counted as a pass
        pytest.fail("pgbouncer is not installed: `make test` installs it (apt-get install -y pgbouncer)")
    target = make_url(server)
    host = f"host={target.host or '127.0.0.1'} port={target.port or 5432}"
    port = free_port()
    (folder / "userlist.txt").write_text(f'"{target.username or "postgres"}" ""\n', encoding="utf-8")
    entries = [f"{name} = {host} {params}" for name, params in (databases or {}).items()]
    lines = [
        "[databases]",
        *(entries or [f"* = {host}"]),
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {folder / 'userlist.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {pool_size}",
        "max_client_conn = 500",
        "ignore_startup_parameters = extra_float_digits",
    ]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root; it drops to this user
        lines.append("user = postgres")
    config = folder / "pgbouncer.ini"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = (folder / "pgbouncer.log").open("wb")
    proc = subprocess.Popen(["pgbouncer", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc, port
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"pgbouncer did not start: {(folder / 'pgbouncer.log').read_text()}")
        time.sleep(0.05)
