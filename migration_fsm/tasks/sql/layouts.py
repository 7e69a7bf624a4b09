"""The layout matrix: task tables as people have them, each a table, its store config and a
fast fill, on SQLite and on PostgreSQL where it applies.

The tests (tests/unit/test_layouts.py) and the benchmarks (bench/backfill.py, bench/validate.py)
take their layouts from here, so the layouts the fast paths are proved on are the ones they
are measured on. It lives in the package, not in tests/ or bench/, because both import it
(neither is a package the other can import) and because it is a ready set of tables for your
own contract tests (`migration_fsm.testing.TaskStoreContract`).

Row `i` of every layout is the same task, as far as the layout can hold it: key
`task-000000042` (or the integer 42), about 200 bytes of JSON payload, statuses in turn,
created 2026-01-01 00:00:00 UTC plus `i` seconds (plus a fraction where the layout holds
one), updated five seconds later. `fill` makes rows `start` to `start + n - 1` in one
INSERT ... SELECT over a recursive CTE (SQLite) or generate_series (PostgreSQL): a million
rows never pass through Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import JSON, BigInteger, Column, DateTime, Integer, MetaData, String, Table, Text, text
from sqlalchemy.dialects.postgresql import JSONB

if TYPE_CHECKING:
    from sqlalchemy import Connection

__all__ = ["LAYOUTS", "Layout", "layout_named", "layouts_for"]

BACKENDS: Final = ("sqlite", "postgresql")
#: 2026-01-01 00:00:00 UTC, in seconds since 1970.
T0_EPOCH: Final = 1_767_225_600
#: The statuses in turn (row i has STATUSES[i % 5]), and an old manager's names for them.
STATUSES: Final = ("pending", "running", "completed", "failed", "cancelled")
LEGACY_STATUS: Final = {
    "queued": "pending",
    "started": "running",
    "done": "completed",
    "error": "failed",
    "killed": "cancelled",
}


def _payload(dialect: str) -> str:
    """Row i's payload as canonical JSON text (sorted keys, no spaces), built in SQL."""
    pad5 = "printf('%05d', i % 9973)" if dialect == "sqlite" else "lpad((i % 9973)::text, 5, '0')"
    return (
        f"""'{{"account":"acct-' || {pad5} || '","locale":"en-GB","n":' || i || ',"priority":' || (i % 5)"""
        """ || ',"subject":"Your weekly report is ready","tags":["report","weekly"],"""
        """"template":"weekly-report-v2","to":"user' || i || '@example.com"}'"""
    )


def _time(dialect: str, form: str, seconds_after: int = 0) -> str:
    """Row i's created time (plus `seconds_after`) in `form`, as SQL of `i`. Fractions of a
    second: microseconds (i * 7919) % 1,000,000 where the form holds them (whole ms of it in ms)."""
    s = f"({T0_EPOCH} + i + {seconds_after})"
    micro = "((i * 7919) % 1000000)"
    if dialect == "sqlite":
        frac = f"printf('%06d', {micro})"
        stamp = {
            "iso_z": f"strftime('%Y-%m-%dT%H:%M:%S', {s}, 'unixepoch') || '.' || {frac} || 'Z'",
            "iso_offset": f"strftime('%Y-%m-%dT%H:%M:%S', {s}, 'unixepoch') || '.' || {frac} || '+00:00'",
            "iso_naive": f"strftime('%Y-%m-%dT%H:%M:%S', {s}, 'unixepoch') || '.' || {frac}",
            "sqlite_datetime": f"strftime('%Y-%m-%d %H:%M:%S', {s}, 'unixepoch') || '.' || {frac}",
            "current_timestamp": f"strftime('%Y-%m-%d %H:%M:%S', {s}, 'unixepoch')",
            "epoch_s": s,
            "epoch_ms": f"({s} * 1000 + {micro} / 1000)",
        }
        return stamp[form]
    zoned = f"(to_timestamp({s}) + {micro} * interval '1 microsecond')"
    utc = f"({zoned} AT TIME ZONE 'UTC')"
    stamp = {
        "iso_z": f'to_char({utc}, \'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\')',
        "iso_offset": f'to_char({utc}, \'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"\')',
        "iso_naive": f"to_char({utc}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')",
        "current_timestamp": f"to_char(to_timestamp({s}) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')",
        "epoch_s": f"{s}::bigint",
        "epoch_ms": f"({s}::bigint * 1000 + {micro} / 1000)",
        "timestamptz": zoned,
        "timestamp": utc,
    }
    return stamp[form]


@dataclass(frozen=True)
class Layout:
    """One task table layout: its columns, how the store maps them, and how to fill it.

    `time` is the form of both timestamps (`iso_z`, `iso_offset`, `iso_naive`,
    `sqlite_datetime`, `current_timestamp`, `epoch_s`, `epoch_ms`, `timestamptz`,
    `timestamp`); `payload` the payload column's kind (`text`, `json`, `jsonb`; also the
    metadata column's, when `metadata`). `columns`, `status_map` and `epoch_units` are the
    store's config keys."""

    name: str
    description: str
    time: str
    payload: str = "text"
    metadata: bool = False
    integer_key: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    status_map: dict[str, str] = field(default_factory=dict)
    backends: tuple[str, ...] = BACKENDS

    @property
    def epoch_units(self) -> dict[str, str]:
        unit = {"epoch_s": "s", "epoch_ms": "ms"}.get(self.time)
        return {"created_at": unit, "updated_at": unit} if unit else {}

    def column(self, field_name: str) -> str:
        return self.columns.get(field_name, field_name)

    def store_config(self, url: str, table: str) -> dict[str, Any]:
        """The `[stores.X]` table for this layout's table `table` at `url`."""
        config: dict[str, Any] = {"kind": "sql", "url": url, "table": table}
        for key in ("columns", "status_map", "epoch_units"):
            if getattr(self, key):
                config[key] = dict(getattr(self, key))
        return config

    def store_options(self) -> dict[str, Any]:
        """`SqlTaskStore`'s keyword arguments for this layout (besides url, table and name)."""
        return {"columns": self.columns, "status_map": self.status_map, "epoch_units": self.epoch_units}

    def table(self, metadata: MetaData, name: str, dialect: str) -> Table:
        """This layout's table `name` in `metadata`, for `dialect`."""
        if dialect not in self.backends:
            raise ValueError(f"layout {self.name} is not one of {dialect}'s")
        pg = dialect == "postgresql"
        if self.integer_key:
            key: Column[Any] = Column(self.column("key"), BigInteger if pg else Integer, primary_key=True)
        else:
            text_key = String(200, collation="C") if pg else String(200)
            key = Column(self.column("key"), text_key, primary_key=True)
        json_type: Any = {"text": Text, "json": JSON, "jsonb": JSONB}[self.payload]
        time_type: Any = {
            "epoch_s": BigInteger if pg else Integer,
            "epoch_ms": BigInteger if pg else Integer,
            "timestamptz": DateTime(timezone=True),
            "timestamp": DateTime(timezone=False),
            "sqlite_datetime": DateTime(timezone=False),
        }.get(self.time, Text)
        columns = [
            key,
            Column(self.column("type"), String(100), nullable=False),
            Column(self.column("payload"), json_type, nullable=False),
            Column(self.column("status"), String(20), nullable=False),
            Column(self.column("attempts"), Integer, nullable=False),
            Column(self.column("created_at"), time_type, nullable=False),
            Column(self.column("updated_at"), time_type, nullable=False),
        ]
        if self.metadata:
            columns.append(Column(self.column("metadata"), json_type, nullable=False))
        return Table(name, metadata, *columns)

    def create(self, conn: Connection, name: str) -> Table:
        """Create (after dropping any) this layout's table `name` through `conn`."""
        table = self.table(MetaData(), name, conn.dialect.name)
        table.drop(conn, checkfirst=True)
        table.create(conn)
        return table

    def fill_sql(self, dialect: str, name: str) -> str:
        """One INSERT ... SELECT of rows :start to :start + :n - 1 into table `name`."""
        status_names = list(self.status_map) if self.status_map else list(STATUSES)
        status = "CASE i % 5 " + " ".join(f"WHEN {n} THEN '{s}'" for n, s in enumerate(status_names)) + " END"
        key = "'task-' || printf('%09d', i)" if dialect == "sqlite" else "'task-' || lpad(i::text, 9, '0')"
        key = "i" if self.integer_key else key
        payload = _payload(dialect)
        if dialect == "postgresql" and self.payload != "text":
            payload = f"CAST({payload} AS {self.payload})"
        metadata = '\'{"origin":"bench"}\''
        if dialect == "postgresql" and self.payload != "text":
            metadata = f"CAST({metadata} AS {self.payload})"
        form = self.time
        if dialect == "sqlite" and form in ("timestamptz", "timestamp"):
            form = "sqlite_datetime"  # SQLAlchemy's DATETIME text there
        values = {
            "key": key,
            "type": "CASE WHEN i % 4 = 0 THEN 'report.build' ELSE 'email.send' END",
            "payload": payload,
            "status": status,
            "attempts": "i % 3",
            "created_at": _time(dialect, form),
            "updated_at": _time(dialect, form, seconds_after=5),
        }
        if self.metadata:
            values["metadata"] = metadata
        names = ", ".join(self.column(f) for f in values)
        select = ", ".join(values.values())
        if dialect == "sqlite":
            numbers = "SELECT :start UNION ALL SELECT i + 1 FROM s WHERE i < :start + :n - 1"
            insert = f"INSERT INTO {name} ({names}) SELECT {select} FROM s WHERE :n > 0"  # noqa: S608 -- our names
            return f"WITH RECURSIVE s(i) AS ({numbers}) {insert}"
        return (
            f"INSERT INTO {name} ({names}) SELECT {select}"  # noqa: S608 -- our names
            " FROM generate_series(CAST(:start AS bigint), CAST(:start AS bigint) + :n - 1) AS i"
        )

    def fill(self, conn: Connection, name: str, n: int, start: int = 0) -> None:
        """Rows `start` to `start + n - 1` into this layout's table `name`, in SQL."""
        conn.execute(text(self.fill_sql(conn.dialect.name, name)), {"start": start, "n": n})


#: Every layout of the matrix. `default` is `default_task_table`: the new side's usual table.
LAYOUTS: Final = (
    Layout(
        "default",
        "every field in the column of its name: native timestamps (DATETIME text on SQLite), JSON",
        "timestamptz",
        payload="json",
        metadata=True,
    ),
    Layout("iso_z", "ISO 8601 text with Z, payload and metadata as TEXT JSON", "iso_z", metadata=True),
    Layout("iso_offset", "ISO 8601 text with +00:00, payload TEXT JSON, no metadata", "iso_offset"),
    Layout("iso_naive", "ISO 8601 text without a zone (UTC), payload TEXT JSON, no metadata", "iso_naive"),
    Layout(
        "current_timestamp",
        "SQLite CURRENT_TIMESTAMP text (2026-11-29 10:00:00), payload TEXT JSON, no metadata",
        "current_timestamp",
    ),
    Layout("epoch_s", "integer seconds since 1970, payload TEXT JSON, no metadata", "epoch_s"),
    Layout("epoch_ms", "integer milliseconds since 1970, payload TEXT JSON, no metadata", "epoch_ms"),
    Layout(
        "pg_timestamp",
        "PostgreSQL timestamp without time zone (UTC), payload JSON, metadata",
        "timestamp",
        payload="json",
        metadata=True,
        backends=("postgresql",),
    ),
    Layout(
        "pg_jsonb",
        "PostgreSQL timestamptz, payload and metadata JSONB",
        "timestamptz",
        payload="jsonb",
        metadata=True,
        backends=("postgresql",),
    ),
    Layout(
        "renamed",
        "an old manager's table: renamed columns through the mapping, its own statuses, text timestamps",
        "current_timestamp",
        columns={
            "key": "run_id",
            "type": "job_kind",
            "payload": "args",
            "status": "state",
            "attempts": "tries",
            "created_at": "enqueued",
            "updated_at": "modified",
        },
        status_map=dict(LEGACY_STATUS),
    ),
    Layout(
        "integer_key",
        "an integer key column (keys are its decimal text), native timestamps, JSON",
        "timestamptz",
        payload="json",
        metadata=True,
        integer_key=True,
    ),
)


def layouts_for(dialect: str) -> list[Layout]:
    """The layouts that apply on `dialect` (`sqlite` or `postgresql`)."""
    return [layout for layout in LAYOUTS if dialect in layout.backends]


def layout_named(name: str) -> Layout:
    """The layout called `name` (a `KeyError` naming the known ones otherwise)."""
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise KeyError(f"no layout {name!r} (layouts: {', '.join(layout.name for layout in LAYOUTS)})")
