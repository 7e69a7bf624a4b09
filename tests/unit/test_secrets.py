"""No secret of a database URL reaches any output or the journal (issue 11 item 4).

A password can sit in a URL's user-info or in its query (`?password=...` is valid for libpq
and psycopg); a user-info that does not parse must not leak part of it as the host. Every
test plants a secret and searches everything the commands printed (stdout and stderr, logs
included, `--json` too) and, where the journal was written, every row of every table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import MetaData, create_engine, select

from migration_fsm.journal import db as journal_db
from migration_fsm.journal.db import redact_text, safe_url, scrub

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.support.cli import CliResult

SECRET = "S3cretPlanted"  # noqa: S105  planted on purpose
READ_COMMANDS = (["status"], ["status", "--json"], ["history"], ["history", "--json"], ["verify"])
WRITE_COMMANDS = (["init"], ["advance"], ["advance", "--dry-run"], ["db", "upgrade"])


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    """Each test starts with no remembered secret (the CLI remembers those it is given)."""
    journal_db._SECRETS.clear()
    yield
    journal_db._SECRETS.clear()


def _clean(result: CliResult, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout + result.stderr, (result.code, result.stdout, result.stderr)


#: Each case's id leaves out the word "postgresql": these tests need no server, and `make
#: mutate`'s selection (`-k "not postgresql"`) leaves out every test whose id holds it.
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            f"postgresql+psycopg://postgres@127.0.0.1:1/db?password={SECRET}&application_name=x",
            "postgresql+psycopg://postgres@127.0.0.1:1/db?password=***&application_name=x",
            id="query-password",
        ),
        pytest.param(
            f"postgresql://u:{SECRET}@h/db?sslpassword={SECRET}",
            "postgresql://u:***@h/db?sslpassword=***",
            id="user-info-and-sslpassword",
        ),
        pytest.param(f"postgresql://us:er:{SECRET}@host/db", "postgresql://us:***@host/db", id="two-colons"),
        pytest.param(
            f"postgresql://u:p@{SECRET}@host:5432/db", "postgresql://u:***@host:5432/db", id="two-ats"
        ),
        pytest.param(
            f"postgresql://u:{SECRET}@host:notaport/db", "postgresql://u:***@host:notaport/db", id="bad-port"
        ),
        pytest.param(
            f"postgresql://u@h/db?PassFile=/x&api_token={SECRET}",
            "postgresql://u@h/db?PassFile=***&api_token=***",
            id="passfile-and-token",
        ),
        pytest.param("sqlite:///relative.db?mode=ro", "sqlite:///relative.db?mode=ro", id="sqlite"),
        pytest.param(f"POSTGRESQL://u:{SECRET}@h/db", "POSTGRESQL://u:***@h/db", id="upper-case-scheme"),
        pytest.param(
            "postgresql://u@h/db?password=c2VjcmV0Cg==&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
            id="query-value-holding-=",
        ),
        pytest.param(f"postgresql://u:{SECRET}@", "postgresql://u:***@", id="no-host-no-path"),
        pytest.param(
            "sqlite:////data/backup:2024@host/journal.db",
            "sqlite:////data/backup:2024@host/journal.db",
            id="path-with-colon-and-at",  # the path of a file, not a user-info: nothing masked
        ),
    ],
)
def test_safe_url_hides_the_password_and_every_secret_query_parameter(url: str, shown: str) -> None:
    assert shown == safe_url(url)


def test_redact_text_hides_urls_conninfo_pairs_and_remembered_secrets() -> None:
    message = (
        f"connection to postgresql://u:p@{SECRET}@h/db failed: host=h password='{SECRET} x'"
        f" sslpassword={SECRET}; passed=True"
    )
    # The URL rendered by safe_url, each secret pair masked, not every word with 'pass' in it.
    assert (
        "connection to postgresql://u:***@h/db failed: host=h password=*** sslpassword=***; passed=True"
        == redact_text(message)
    )
    url = f"postgresql://us:er:{SECRET}@host/db"
    assert SECRET not in scrub(f"could not translate host name '{SECRET}@host'\nDETAIL", url)


@pytest.mark.parametrize(
    ("url", "quoted", "shown"),
    [
        pytest.param("postgresql://user:Pa55:word@h/db", "Pa55:word", "***", id="password-with-a-colon"),
        pytest.param(f"postgresql://us:er:{SECRET}@host/db", SECRET, "***", id="two-colons"),
        pytest.param(f"postgresql://u:p@{SECRET}@host/db", f"{SECRET}@host", "***@host", id="two-ats"),
        pytest.param("postgresql://u:Pa55%40word@h/db", "Pa55@word", "***", id="percent-encoded"),
        pytest.param("postgresql://u:Pa55%40word@h/db", "Pa55%40word", "***", id="as-written"),
        pytest.param(
            f"postgresql://u@h/db?sslpassword={SECRET}&application_name=app1",
            f"{SECRET} app1",
            "*** app1",
            id="query-secret-only",
        ),
        pytest.param(
            "postgresql://u@h/db?password=c2VjcmV0Cg==", "c2VjcmV0Cg==", "***", id="query-value-holding-="
        ),
        pytest.param(f"postgresql://u@h/db?SSLPassword={SECRET}", SECRET, "***", id="query-key-in-capitals"),
        pytest.param("postgresql://u:Ab12@h/db", "Ab12", "***", id="four-characters"),
        pytest.param("postgresql://u:abc@h/db", "abc", "abc", id="too-short-to-search"),
    ],
)
def test_scrub_masks_a_secret_a_driver_quotes_alone(url: str, quoted: str, shown: str) -> None:
    """A driver message about `url` may quote its password (or a piece of a user-info that
    does not parse) without its key: `scrub` remembers the URL's secrets, as written and
    percent-decoded, and masks them (a secret shorter than 4 characters is not searched)."""
    assert f"FATAL: {shown} rejected" == scrub(f"FATAL: {quoted} rejected\nDETAIL: more", url)


def test_a_url_shown_once_has_its_secrets_masked_in_any_later_text() -> None:
    """`safe_url` remembers the secrets of the URL it renders: a later message that quotes one
    alone (with no URL to scrub against) has it masked."""
    assert "postgresql://u:***@h/db" == safe_url(f"postgresql://u:{SECRET}@h/db")
    assert "the password *** was refused" == redact_text(f"the password {SECRET} was refused")


def test_redact_passes_none_through_and_redacts_text() -> None:
    """`redact`, for optional columns (a journaled error, a reason): None stays None."""
    assert journal_db.redact(None) is None
    assert "sslpassword=*** at postgresql://u:***@h/db" == journal_db.redact(
        f"sslpassword={SECRET} at postgresql://u:{SECRET}@h/db"
    )


def test_a_url_with_a_line_break_still_has_its_secret_remembered() -> None:
    """A URL read from a file with its line break: a driver message about it that quotes its
    password alone has the password masked (the URL's secrets are remembered whole)."""
    url = f"postgresql://u:{SECRET}@h/db\n"
    message = f"authentication failed for the password {SECRET}"
    assert "authentication failed for the password ***" == scrub(message, url)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"postgresql+psycopg://postgres@127.0.0.1:1/db?password={SECRET}", id="query-password"),
        pytest.param(f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:1/db", id="user-info"),
        pytest.param(f"postgresql://us:er:{SECRET}@127.0.0.1:1/db", id="two-colons"),
        pytest.param(f"postgresql://us:er@{SECRET}@127.0.0.1:1/db", id="two-ats"),
        pytest.param(f"postgresql://us:{SECRET}@127.0.0.1:notaport/db", id="bad-port"),
    ],
)
def test_an_unreachable_database_never_shows_its_secret(cli: Callable[..., CliResult], url: str) -> None:
    for args in (*READ_COMMANDS, *WRITE_COMMANDS):
        result = cli(*args, "--db", url)
        assert result.code in (2, 4), (args, result.stderr)
        _clean(result, SECRET)
        result = cli("--traceback", *args, env={"MIGRATION_FSM_DATABASE_URL": url})
        _clean(result, SECRET)


def _rows(url: str) -> str:
    """Every row of every table of the database at `url`, as text."""
    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return "\n".join(
                repr(row) for table in meta.sorted_tables for row in conn.execute(select(table)).all()
            )
    finally:
        engine.dispose()


def test_a_reachable_database_and_an_unreachable_store_keep_the_secret_out_of_the_journal(
    cli: Callable[..., CliResult], pg_database: str, tmp_path: Path
) -> None:
    """The migration database on PostgreSQL with `?password=` (trust auth ignores it), a store
    that cannot be reached with its secret in the query and in a malformed user-info: the
    `stores_reachable` guard refuses, and its detail is journaled for good."""
    url = f"{pg_database}?password={SECRET}"
    store_secret = "St0reSecret"  # noqa: S105  planted on purpose
    config = tmp_path / "secrets.toml"
    config.write_text(
        f"""
database_url = "{url}"
[stores.old]
kind = "sql"
url = "postgresql+psycopg://postgres@127.0.0.1:1/old?password={store_secret}"
table = "tasks"
[stores.new]
kind = "sql"
url = "postgresql://us:er:{store_secret}@127.0.0.1:1/new"
table = "tasks"
[guards]
"preparation->dual_write" = ["stores_reachable"]
""",
        encoding="utf-8",
    )
    results = [
        cli("db", "upgrade", "--config", str(config)),
        cli("init", "--config", str(config), "-m", "planted"),
    ]
    assert [0, 0] == [r.code for r in results], [r.stderr for r in results]
    for args in (["advance"], ["advance", "--dry-run"], *READ_COMMANDS, ["validate"], ["backfill"]):
        results.append(cli(*args, "--config", str(config), "-m", "planted"))
    assert results[2].code == 1, results[2].stderr  # refused by stores_reachable, journaled
    assert "unreachable" in results[2].stdout + results[2].stderr
    for result in results:
        _clean(result, SECRET, store_secret)
    journal = _rows(pg_database)
    assert "stores_reachable" in journal
    assert SECRET not in journal
    assert store_secret not in journal
    assert cli("verify", "--config", str(config), "-m", "planted").code == 0
