"""Metric guards (DESIGN.md section 11): measure a number, hold it to `min` and/or `max`, and
say what was measured either way.

A verdict is passed, failed or inconclusive (nothing could be measured: Prometheus
unreachable or erroring, an empty result, NaN, a SQL NULL or no row, a timeout). Before an
edge only a passed verdict lets it through: an inconclusive one cannot prove the edge safe.
With `dry_run` the verdict is recorded and never refuses.

`evaluate_metric_guard` needs no transition (a `watch` process evaluates the same guards every
interval); `metric_guard` wraps it as the guard an edge's list names.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

from ..exceptions import MigrationFSMError
from .context import GuardVerdict

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy import Engine

    from ..config import MetricGuard, Settings
    from .context import Context, GuardFn

#: At most this many bytes of a Prometheus answer are read (a runaway query is inconclusive).
MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
#: A range query asks for no more samples per series than this (Prometheus refuses 11,000).
MAX_SAMPLES: Final = 10_000
#: The range query's default resolution: Prometheus's default scrape interval.
DEFAULT_STEP_SECONDS: Final = 15.0


class Outcome(StrEnum):
    """What a metric guard found."""

    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class MetricVerdict:
    """One evaluation of a metric guard: the outcome, the measured value (the worst sample;
    None when nothing was measured), the worst value of each series by its labels, and a line
    naming the value(s) and the threshold."""

    name: str
    outcome: Outcome
    value: float | None
    detail: str
    values: tuple[tuple[str, float], ...] = ()
    dry_run: bool = False

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED

    def as_guard_verdict(self) -> GuardVerdict:
        """The guard's verdict before an edge: a failed or inconclusive verdict refuses, unless
        the guard is a dry run (then it is recorded as "dry run: would refuse: ...")."""
        value = self.value if self.value is not None and math.isfinite(self.value) else None
        if not self.dry_run:
            return GuardVerdict(self.passed, self.detail, value)
        said = self.detail if self.passed else f"would refuse: {self.detail}"
        return GuardVerdict(True, f"dry run: {said}", value)


class Inconclusive(MigrationFSMError):
    """Nothing could be measured; the message says why."""


def number(value: float) -> str:
    """A measured value or a threshold as printed: up to six significant digits."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.6g}"


def percent(value: float) -> str:
    return f"{value:.2%}"


def bounds_text(low: float | None, high: float | None, fmt: Callable[[float], str] = number) -> str:
    """`max 0.01`, `min 0.99`, or `min 0.5, max 2`."""
    parts = ([] if low is None else [f"min {fmt(low)}"]) + ([] if high is None else [f"max {fmt(high)}"])
    return ", ".join(parts)


def excess(value: float, low: float | None, high: float | None) -> float:
    """How far `value` lies outside [low, high] (<= 0 inside): the worst sample has the most."""
    over = -math.inf if high is None else value - high
    under = -math.inf if low is None else low - value
    return max(over, under)


def judge(
    name: str,
    value: float,
    *,
    low: float | None,
    high: float | None,
    figure: str,
    dry_run: bool = False,
    bounds: str | None = None,
    hint: str = "",
    values: tuple[tuple[str, float], ...] = (),
) -> MetricVerdict:
    """The verdict on a measured `value`: "`figure` (`bounds`)", and on failure which bound it
    crossed (or `hint`, what to do)."""
    bounds = bounds or bounds_text(low, high)
    if excess(value, low, high) <= 0:
        return MetricVerdict(name, Outcome.PASSED, value, f"{figure} ({bounds})", values, dry_run)
    if not hint:
        crossed = (
            f"above max {number(high)}"
            if high is not None and value > high
            else f"below min {number(low or 0)}"
        )
        hint = f"{number(value)} is {crossed}"
    return MetricVerdict(name, Outcome.FAILED, value, f"{figure} ({bounds}): {hint}", values, dry_run)


def inconclusive(
    name: str, why: str, *, bounds: str, dry_run: bool = False, value: float | None = None
) -> MetricVerdict:
    return MetricVerdict(
        name,
        Outcome.INCONCLUSIVE,
        value,
        f"inconclusive: {why} ({bounds}): cannot prove the edge safe",
        (),
        dry_run,
    )


# -- the configured guards ---------------------------------------------------------------


def evaluate_metric_guard(
    settings: Settings, name: str, *, since: datetime | None = None, now: float | None = None
) -> MetricVerdict:
    """Evaluate the metric guard `name` of `settings.metric_guards` once. `since` is when the
    current phase was entered (the task kinds count from it); `now` the Unix time the
    Prometheus queries end at (default: now). Never raises for a metric that cannot be read:
    that is an inconclusive verdict."""
    guard = settings.metric_guards[name]
    bounds = bounds_text(guard.min, guard.max)
    try:
        if guard.kind == "prometheus":
            return _judge_series(name, guard, prometheus_series(guard, time.time() if now is None else now))
        if guard.kind == "sql":
            value = sql_number(settings, guard)
            return judge(
                name,
                value,
                low=guard.min,
                high=guard.max,
                figure=f"{name} = {number(value)}",
                dry_run=guard.dry_run,
            )
        if since is None:
            raise Inconclusive("the phase's start is not known")  # a caller's mistake, said plainly
        try:
            finished = finished_on_new_side(settings, since)
        except MigrationFSMError as exc:
            raise Inconclusive(f"the new side's tasks cannot be read: {exc}") from exc
        return task_rate_verdict(
            name, guard.kind, finished,
            since_text=f"the phase was entered at {_at(since)}", low=guard.min, high=guard.max,
            dry_run=guard.dry_run, bounds=bounds_text(guard.min, guard.max, percent),
        )  # fmt: skip
    except Inconclusive as exc:
        return inconclusive(name, str(exc), bounds=bounds, dry_run=guard.dry_run)


def metric_guard(name: str) -> GuardFn:
    """The guard a `[guards]` list names for `[metric_guards.NAME]`."""

    def guard(ctx: Context) -> GuardVerdict:
        verdict = evaluate_metric_guard(ctx.settings, name, since=ctx.state.phase_entered_at)
        return verdict.as_guard_verdict()

    guard.__name__ = guard.__qualname__ = name
    return guard


def _at(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- Prometheus ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Series:
    """One series of a Prometheus answer: its labels and its (Unix time, value) samples."""

    labels: str
    samples: tuple[tuple[float, float], ...]


def labels_text(metric: Mapping[str, str]) -> str:
    """`name{a="1", b="2"}` (labels sorted), or `{}` for a series without any."""
    name = metric.get("__name__", "")
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{rest}}}"


def prometheus_series(guard: MetricGuard, now: float) -> list[Series]:
    """The guard's query through the Prometheus HTTP API: an instant query at `now`, or with
    `for_seconds` a range query over the last `for_seconds` up to `now`. `Inconclusive` if
    Prometheus cannot be reached, answers an error or something that is not a query result."""
    assert guard.url is not None  # the config checks it
    assert guard.query is not None
    # Prometheus reads a duration given as plain seconds ("0.5"), not "0.5s".
    form: dict[str, str] = {"query": guard.query, "timeout": f"{guard.timeout_seconds:g}"}
    if guard.for_seconds:
        step = max(guard.step_seconds or DEFAULT_STEP_SECONDS, guard.for_seconds / MAX_SAMPLES)
        form.update(start=f"{now - guard.for_seconds:.3f}", end=f"{now:.3f}", step=f"{step:g}")
        path = "/api/v1/query_range"
    else:
        form["time"] = f"{now:.3f}"
        path = "/api/v1/query"
    base, authorization = _without_credentials(guard.url)
    where = base.rstrip("/") + path  # what the detail names: never the URL's password
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    request = Request(  # noqa: S310  the config checks the URL is http(s)
        where, data=urlencode(form).encode(), headers=headers, method="POST"
    )
    try:
        with urlopen(request, timeout=guard.timeout_seconds) as response:  # noqa: S310  as above
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except HTTPError as exc:  # Prometheus says why in its JSON body (400 bad_data, 422, 503 ...)
        raise Inconclusive(
            f"Prometheus {where} answered HTTP {exc.code}: {_error_of(exc.read(4096))}"
        ) from exc
    except (URLError, OSError) as exc:  # refused, unknown host, timed out
        reason = exc.reason if isinstance(exc, URLError) else exc
        raise Inconclusive(f"Prometheus {where} is unreachable: {reason}") from exc
    if len(body) > MAX_RESPONSE_BYTES:
        raise Inconclusive(f"Prometheus {where} answered over {MAX_RESPONSE_BYTES} bytes: narrow the query")
    return _parse(body, where, guard, now)


def _without_credentials(url: str) -> tuple[str, str | None]:
    """`url` without `user:password@`, and the HTTP basic authorization they stand for."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return urlunsplit(parts._replace(netloc=host)), "Basic " + base64.b64encode(user.encode()).decode()


def _error_of(body: bytes) -> str:
    try:
        answer = json.loads(body)
        return f"{answer['errorType']}: {answer['error']}"
    except (ValueError, TypeError, KeyError):
        return body.decode("utf-8", "replace").strip()[:200] or "no body"


def _parse(body: bytes, where: str, guard: MetricGuard, now: float) -> list[Series]:
    try:
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise Inconclusive(
                f"Prometheus {where} answered status {answer.get('status')!r}: {_error_of(body)}"
            )
        data = answer["data"]
        kind, result = data["resultType"], data["result"]
        if kind == "scalar":
            series = [Series("scalar", ((float(result[0]), float(result[1])),))]
        elif kind == "vector":
            series = [
                Series(labels_text(item["metric"]), ((float(item["value"][0]), float(item["value"][1])),))
                for item in result
            ]
        elif kind == "matrix":
            series = [
                Series(labels_text(item["metric"]), tuple((float(t), float(v)) for t, v in item["values"]))
                for item in result
            ]
        else:
            raise Inconclusive(f"the query returned a {kind}, not a number: query a vector or scalar")
    except Inconclusive:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise Inconclusive(
            f"Prometheus {where} answered something that is not a query result ({type(exc).__name__}: {exc})"
        ) from exc
    series = [s for s in series if s.samples]
    if not series:
        raise Inconclusive(f"the query returned no series: {guard.query}")
    if guard.for_seconds:
        step = max(guard.step_seconds or DEFAULT_STEP_SECONDS, guard.for_seconds / MAX_SAMPLES)
        first = min(s.samples[0][0] for s in series)
        if first > now - guard.for_seconds + 2 * step:
            raise Inconclusive(
                f"the samples cover only the last {now - first:.0f} s of the {guard.for_seconds:g} s asked:"
                " the condition cannot be shown to hold that long"
            )
    return series


def _judge_series(name: str, guard: MetricGuard, series: list[Series]) -> MetricVerdict:
    """Every sample of every series must pass; the verdict names the worst."""
    bounds = bounds_text(guard.min, guard.max)
    worst_of: list[tuple[str, float, float]] = []  # (labels, time, value) of each series' worst
    for one in series:
        for at, value in one.samples:
            if math.isnan(value):
                raise Inconclusive(f"{one.labels} is NaN at {_at(datetime.fromtimestamp(at, UTC))}")
        at, value = max(one.samples, key=lambda sample: excess(sample[1], guard.min, guard.max))
        worst_of.append((one.labels, at, value))
    labels, at, value = max(worst_of, key=lambda worst: excess(worst[2], guard.min, guard.max))
    samples = sum(len(one.samples) for one in series)
    if guard.for_seconds:
        over = f"the worst of {samples} samples over the last {guard.for_seconds:g} s"
        over += f", at {_at(datetime.fromtimestamp(at, UTC))}"
    else:
        over = "the worst" if len(series) > 1 else ""
    if len(series) > 1:
        over += f" of {len(series)} series, {labels}"
    figure = f"{name} = {number(value)}" + (f" ({over})" if over else "")
    return judge(
        name,
        value,
        low=guard.min,
        high=guard.max,
        figure=figure,
        dry_run=guard.dry_run,
        bounds=bounds,
        values=tuple((lbl, v) for lbl, _, v in worst_of),
    )


# -- SQL ----------------------------------------------------------------------------------


def sql_number(settings: Settings, guard: MetricGuard) -> float:
    """The one number the guard's query returns, read from its store's database in a read-only
    transaction bounded by `timeout_seconds`. `Inconclusive` for no row, NULL, more than one
    row or column, something that is not a number, or any database error (a write included:
    the transaction refuses it)."""
    from sqlalchemy import exc as sa_exc

    from ..journal import make_engine, safe_url, scrub

    assert guard.store is not None  # the config checks both
    assert guard.query is not None
    store = settings.stores[guard.store]
    url = store.url or store.options["url"]
    try:
        engine = make_engine(
            _read_only_url(url), wal=False, timeout_seconds=guard.timeout_seconds, readonly=True
        )
    except MigrationFSMError as exc:
        raise Inconclusive(f"store '{guard.store}': {exc}") from exc
    try:
        _bound_sqlite(engine, guard.timeout_seconds)
        with engine.connect() as conn, conn.begin():
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            result = conn.exec_driver_sql(guard.query)
            rows = result.fetchmany(2) if result.returns_rows else []
            width = len(result.keys()) if result.returns_rows else 0
    except sa_exc.SQLAlchemyError as exc:
        message = scrub(str(getattr(exc, "orig", None) or exc), url).strip().splitlines()
        raise Inconclusive(
            f"store '{guard.store}' ({safe_url(url)}) refused the query: {message[0] if message else exc}"
        ) from exc
    finally:
        engine.dispose()
    if not rows:
        raise Inconclusive("the query returned no row")
    if len(rows) > 1 or width != 1:
        raise Inconclusive(
            f"the query returned {'several rows' if len(rows) > 1 else f'{width} columns'}, not one number"
        )
    raw = rows[0][0]
    if raw is None:
        raise Inconclusive("the query returned NULL")
    if isinstance(raw, bool):
        raw = int(raw)
    try:
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise Inconclusive(f"the query returned {str(raw)[:80]!r}, not a number") from exc
    if math.isnan(value):
        raise Inconclusive("the query returned NaN")
    return value


def _read_only_url(url: str) -> str:
    """`url`, on PostgreSQL with every transaction of the session read-only by default (a query
    that ends the guard's read-only transaction starts another read-only one)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url  # make_engine says why
    if parsed.get_backend_name() != "postgresql":
        return url
    given = parsed.query.get("options", "")
    options = [given] if isinstance(given, str) else list(given)
    options.append("-c default_transaction_read_only=on")
    return parsed.update_query_dict({"options": " ".join(o for o in options if o)}).render_as_string(
        hide_password=False
    )


def _bound_sqlite(engine: Engine, timeout_seconds: float) -> None:
    """On SQLite, refuse writes on the connection too (`query_only`: a database without a file,
    which cannot be opened read-only) and interrupt a query still running after
    `timeout_seconds` (PostgreSQL has its `statement_timeout`, which `make_engine` sets)."""
    if engine.dialect.name != "sqlite":
        return
    from sqlalchemy import event

    deadline = time.monotonic() + timeout_seconds

    def on_connect(dbapi_connection: Any, record: Any) -> None:  # noqa: ARG001  "connect" event
        dbapi_connection.execute("PRAGMA query_only = ON")
        dbapi_connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)

    event.listen(engine, "connect", on_connect)


# -- the new side's finished tasks ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finished:
    """The new side's tasks that finished since a moment, by how they finished."""

    completed: int = 0
    failed: int = 0
    cancelled: int = 0


def finished_on_new_side(settings: Settings, since: datetime) -> Finished:
    """Count the new side's tasks updated at or after `since` that completed, failed or were
    cancelled (one scan of the store)."""
    from ..tasks.records import TaskStatus
    from ..tasks.scan import records
    from ..tasks.sides import open_side

    counts = dict.fromkeys((TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED), 0)
    with open_side(settings, "new") as new:
        for record in records(new, settings.backfill_batch_size):
            if record.updated_at >= since and record.status in counts:
                counts[record.status] += 1
    return Finished(counts[TaskStatus.COMPLETED], counts[TaskStatus.FAILED], counts[TaskStatus.CANCELLED])


def task_rate_verdict(
    name: str,
    kind: str,
    finished: Finished,
    *,
    since_text: str,
    low: float | None,
    high: float | None,
    bounds: str,
    dry_run: bool = False,
) -> MetricVerdict:
    """`failure_rate`: failed / (completed + failed); `completion_rate`: completed /
    (completed + failed + cancelled). No finished task passes: nothing went wrong yet, and
    `min_soak` is the guard of time."""
    if kind == "failure_rate":
        bad, total = finished.failed, finished.completed + finished.failed
        what, hint = f"{bad} failed of {total}", "find out why tasks fail on the new side"
    else:
        bad = finished.completed
        total = finished.completed + finished.failed + finished.cancelled
        what = f"{bad} completed of {total}"
        hint = "find out why tasks fail or are cancelled on the new side"
    if total == 0:
        figure = f"no task finished on the new side since {since_text}"
        return MetricVerdict(name, Outcome.PASSED, None, f"{figure} ({bounds})", (), dry_run)
    rate = bad / total
    figure = f"{what} finished on the new side = {percent(rate)}"
    return judge(name, rate, low=low, high=high, figure=figure, dry_run=dry_run, bounds=bounds, hint=hint)
