"""A test clock that stands for the `time` module inside one module under test (monkeypatched
there): `monotonic()` is whatever the test sets, and `sleep()` moves it on and is recorded."""

from __future__ import annotations


class FakeClock:
    """`time` for a module under test: `monotonic()` returns `now`; `sleep(s)` records `s` in
    `slept` and moves `now` on by it, at once."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
