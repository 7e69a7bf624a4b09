"""Fixtures shared by the system tests (processes, crashes, real servers)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

#: The most one reaped process may take to exit once killed.
REAP_SECONDS = 60.0


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started; any still running at the end are killed and reaped."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=REAP_SECONDS)
