"""What the Redis-backed stores (RQ, Celery) share: the keyset page of their task index.

Each keeps its tasks' ids in one sorted set whose members all have score 0, so the set is in
byte order of the ids and a page is a lexicographic range after the last id of the one before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis


def index_page(client: redis.Redis, index: str, after: str | None, limit: int) -> list[str]:
    """Up to `limit` task ids of the sorted set `index` above `after` (from the first when None)."""
    low = b"-" if after is None else b"(" + after.encode("utf-8")
    raw: list[bytes] = list(client.zrangebylex(index, low, b"+", 0, limit))  # type: ignore[arg-type]
    return [key.decode("utf-8") for key in raw]
