"""Export and import: the backup and restore path, as JSON Lines (gzip when the name ends in .gz).

An archive holds one `TaskRecord` a line, in key order, then one summary line::

    {"summary": {"format": "migration-fsm-tasks/2", "side": "old", "store": "...",
                 "count": N, "digest": "...", "sha256": "...",
                 "started_at": "...", "finished_at": "..."}}

Format 2 added `run_at` (a task's scheduled time, null for none) to every record line; an
archive of format 1 (written before `run_at` existed) still imports, its tasks with no
scheduled time, and a format 1 archive with a `run_at` in it does not verify (no writer of
format 1 wrote one). A record's checksum covers `run_at` only when it is set, so format 1
digests verify unchanged.

`digest` is the SHA-256 of every record's `checksum()` followed by a newline, in file order;
`sha256` is the SHA-256 of the record lines' bytes, so any edit to a record (its status
included) is detected. The summary also names the `migration` the export was made for
(archives written before it was recorded have none).

An export is written to a new temporary file in the target's folder that is moved into place
when complete, so a half-written export never carries the final name. It never replaces an
existing file unless asked to (`overwrite`), and never one that is not a regular file (a
folder, a FIFO, a device, a symbolic link) or one of the migration's own databases, even
then. An import verifies the whole archive before it writes anything, then loads it in
batches of idempotent upserts, each under the caller's fence (no transition may start while
a batch is written).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import tempfile
import zlib
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError

from ..exceptions import BadInput, DataError
from ..journal import utcnow
from ..tasks.records import TaskRecord
from ..tasks.scan import pages

if TYPE_CHECKING:
    import io
    from collections.abc import Callable, Iterator, Mapping

    from ..tasks.records import TaskStore

FORMAT: Final = "migration-fsm-tasks/2"
#: The formats an import reads: 1 (no `run_at`) and the current one.
READABLE_FORMATS: Final = ("migration-fsm-tasks/1", FORMAT)
_FORMATS_WITH_RUN_AT: Final = (FORMAT,)


@dataclass(frozen=True, slots=True)
class ArchiveSummary:
    """An archive's summary line."""

    side: str
    store: str
    count: int
    digest: str
    sha256: str
    started_at: datetime
    finished_at: datetime
    format: str = FORMAT
    migration: str | None = None  # None: an archive written before the migration was recorded

    def as_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "migration": self.migration,
            "side": self.side,
            "store": self.store,
            "count": self.count,
            "digest": self.digest,
            "sha256": self.sha256,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Imported:
    """What `import` did: `loaded` records written to `store` from an archive with `summary`."""

    loaded: int
    store: str
    summary: ArchiveSummary

    def as_json(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "store": self.store, "summary": self.summary.as_json()}


def _gzipped(path: Path) -> bool:
    return path.name.endswith(".gz")


@contextmanager
def _open_write(path: Path, *, gzipped: bool) -> Iterator[io.BufferedIOBase]:
    if gzipped:
        with gzip.open(path, "wb", compresslevel=6) as handle:
            yield handle
    else:
        with path.open("wb") as handle:
            yield handle


@contextmanager
def _open_read(path: Path) -> Iterator[io.BufferedIOBase]:
    if not path.is_file():
        raise BadInput(f"archive {path} does not exist")
    if _gzipped(path):
        with gzip.open(path, "rb") as handle:
            yield handle
    else:
        with path.open("rb") as handle:
            yield handle


_KINDS: Final = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_export_target(path: str | Path, *, overwrite: bool, protected: Mapping[Path, str]) -> Path:
    """`path` as a file an export may write, or `BadInput` saying why not (nothing written).

    `protected` maps the files no export may replace (the migration's databases, with their
    journal files) to what they are."""
    target = Path(path)
    if str(path).endswith(("/", os.sep)) or target.is_dir():
        raise BadInput(
            f"cannot write {path}: it is a folder; give a file name (for example {target / 'tasks.jsonl.gz'})"
        )
    folder = target.parent
    if not folder.is_dir():
        raise BadInput(f"cannot write {target}: folder {folder} does not exist")
    try:
        found = os.lstat(target)
    except FileNotFoundError:
        found = None
    if found is not None:
        for test, kind in _KINDS:
            if test(found.st_mode):
                raise BadInput(f"cannot write {target}: it exists and is {kind}; export to a new file")
        for other, what in protected.items():
            try:
                mine = other.stat()
            except OSError:
                continue
            if (mine.st_dev, mine.st_ino) == (found.st_dev, found.st_ino):
                raise BadInput(f"cannot write {target}: it is {what}; export to another file")
        if not overwrite:
            raise BadInput(f"{target} exists: choose another file, or pass --overwrite to replace it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write {target}: folder {folder} is not writable")
    return target


def export_tasks(
    store: TaskStore,
    path: str | Path,
    *,
    side: str,
    migration: str | None = None,
    batch_size: int = 1000,
    overwrite: bool = False,
    protected: Mapping[Path, str] | None = None,
) -> ArchiveSummary:
    """Write every task of `store` to `path`, streaming, then the summary line (see the
    module's docstring for the files it refuses to replace)."""
    target = check_export_target(path, overwrite=overwrite, protected=protected or {})
    started = utcnow()
    count = 0
    digest, content = hashlib.sha256(), hashlib.sha256()
    try:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as exc:
        raise BadInput(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(handle)
    temporary = Path(name)
    try:
        with _open_write(temporary, gzipped=_gzipped(target)) as out:
            for page in pages(store, batch_size):
                chunk = []
                for record in page:
                    line = (record.model_dump_json() + "\n").encode("utf-8")
                    chunk.append(line)
                    content.update(line)
                    digest.update(f"{record.checksum()}\n".encode("ascii"))
                out.write(b"".join(chunk))
                count += len(page)
            summary = ArchiveSummary(
                side=side,
                store=store.name,
                count=count,
                digest=digest.hexdigest(),
                sha256=content.hexdigest(),
                started_at=started,
                finished_at=utcnow(),
                migration=migration,
            )
            out.write((json.dumps({"summary": summary.as_json()}) + "\n").encode("utf-8"))
        _move_into_place(temporary, target, overwrite=overwrite, protected=protected or {})
    finally:
        temporary.unlink(missing_ok=True)
    return summary


def _move_into_place(
    temporary: Path, target: Path, *, overwrite: bool, protected: Mapping[Path, str]
) -> None:
    """Give the finished export its name. Without `overwrite`, a hard link (which fails when
    the name exists, atomically) so a file that appeared meanwhile is not replaced."""
    check_export_target(target, overwrite=overwrite, protected=protected)  # again: time has passed
    if overwrite:
        os.replace(temporary, target)
        return
    try:
        os.link(temporary, target)
    except FileExistsError as exc:
        raise BadInput(
            f"{target} appeared while the export ran: choose another file, or pass --overwrite"
        ) from exc
    except OSError:  # a filesystem without hard links: the check above is the guard
        os.replace(temporary, target)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with _open_read(path) as handle:
            yield from enumerate(handle, start=1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"archive {path} cannot be read: {exc}") from exc


def _summary_of(path: Path, number: int, line: bytes) -> ArchiveSummary:
    try:
        data = json.loads(line)["summary"]
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(f"format {data.get('format')!r} is not one of {', '.join(READABLE_FORMATS)}")
        return ArchiveSummary(
            format=str(data["format"]),
            side=str(data["side"]),
            store=str(data["store"]),
            count=int(data["count"]),
            digest=str(data["digest"]),
            sha256=str(data["sha256"]),
            started_at=datetime.fromisoformat(data["started_at"]),
            finished_at=datetime.fromisoformat(data["finished_at"]),
            migration=None if data.get("migration") is None else str(data["migration"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"archive {path} line {number}: the summary line is malformed: {exc}") from exc


def _record_of(path: Path, number: int, line: bytes) -> TaskRecord:
    try:
        return TaskRecord.model_validate_json(line)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(line)"
        raise DataError(f"archive {path} line {number}: not a task record ({where}: {error['msg']})") from exc


def verify_archive(path: str | Path) -> ArchiveSummary:
    """Read the whole archive and check it against its summary line: the count, the digest of
    the checksums and the SHA-256 of the records. Raises `DataError` saying what is wrong."""
    source = Path(path)
    count = 0
    digest, content = hashlib.sha256(), hashlib.sha256()
    summary: ArchiveSummary | None = None
    scheduled: int | None = None  # the line of the first record with a run_at
    for number, line in _lines(source):
        if summary is not None:
            raise DataError(f"archive {source} line {number}: data after the summary line")
        if line.startswith(b'{"summary"'):
            summary = _summary_of(source, number, line)
            continue
        record = _record_of(source, number, line)
        if scheduled is None and record.run_at is not None:
            scheduled = number
        content.update(line)
        digest.update(f"{record.checksum()}\n".encode("ascii"))
        count += 1
    if summary is None:
        raise DataError(f"archive {source} has no summary line: it is truncated or not an export")
    problems = []
    if count != summary.count:
        problems.append(f"{count} records, the summary says {summary.count}")
    if digest.hexdigest() != summary.digest:
        problems.append("the digest of the checksums does not match")
    if content.hexdigest() != summary.sha256:
        problems.append("the SHA-256 of the records does not match")
    if scheduled is not None and summary.format not in _FORMATS_WITH_RUN_AT:
        problems.append(f"line {scheduled} has a run_at, which format {summary.format} does not hold")
    if problems:
        raise DataError(f"archive {source} does not verify: {'; '.join(problems)}")
    return summary


def import_tasks(
    store: TaskStore,
    path: str | Path,
    *,
    batch_size: int = 1000,
    fence: Callable[[], AbstractContextManager[object]] | None = None,
    check: Callable[[ArchiveSummary], None] | None = None,
    loaded_so_far: Callable[[int], None] | None = None,
) -> Imported:
    """Verify the archive at `path` (and `check` its summary: raise to refuse it), then upsert
    its records into `store` in batches, each written inside `fence()`; `loaded_so_far` is
    told the running total after each batch."""
    source = Path(path)
    summary = verify_archive(source)
    if check is not None:
        check(summary)
    fenced = fence or nullcontext
    loaded = 0
    batch: list[TaskRecord] = []
    for number, line in _lines(source):
        if line.startswith(b'{"summary"'):
            break
        batch.append(_record_of(source, number, line))
        if len(batch) >= batch_size:
            with fenced():
                loaded += store.put_many(batch)
            batch = []
            if loaded_so_far is not None:
                loaded_so_far(loaded)
    if batch:
        with fenced():
            loaded += store.put_many(batch)
        if loaded_so_far is not None:
            loaded_so_far(loaded)
    return Imported(loaded, store.name, summary)
