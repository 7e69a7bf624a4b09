"""A gated RQ worker process (RQ's forking `Worker`) for the adapter's end-to-end test:

    python -m tests.support.rq_worker --redis URL --control URL --migration M --worker-id NAME

SIGTERM stops it (RQ's warm shutdown: the job in progress finishes first)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import redis

from migration_fsm.adapters.rq.worker import gated_worker


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.rq_worker")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--migration", default="default")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--worker-ttl-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    connection = redis.Redis.from_url(args.redis)
    worker = gated_worker(
        ["default"],
        connection,
        args.control,
        side="old",
        migration=args.migration,
        backoff_seconds=0.05,
        worker_id=args.worker_id,
        worker_ttl_seconds=args.worker_ttl_seconds,
    )
    print("worker old: ready", file=sys.stderr, flush=True)
    try:
        worker.work(with_scheduler=True, logging_level="WARNING")
    finally:
        worker.gate.close()
        worker.gate.client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
