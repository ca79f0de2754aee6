"""The Posts stores alone, in-process: CPU per ``list_posts`` page, SQLite against PostgreSQL.

``python -m bench.store_micro [--calls N] [--rounds R]``: one store of each
kind holding the bench's 20 posts (``bench.data``), the page of ``list_posts``
(21 rows asked, 20 returned and encoded, as the handler does) read ``N`` times
per round, three ways:

- ``uncached``: ``list_page`` and the page's encoding every call (the query
  itself: what a call costs when the page cache cannot help);
- ``cached``: ``list_page_view``, the path a served ``list_posts`` takes
  (after the first call, a cache hit: on PostgreSQL ``Listener.quiet()``, one
  ``select``, and the generation; on SQLite the WAL-index header);
- both with the CPU of this process and, on PostgreSQL, of the database
  server's backends serving this process's pool (``/proc/PID/stat`` of the
  ``posts-rpc`` connections in ``pg_stat_activity``): the database's share is
  counted, as the issue's figure asks (server CPU per call).

PostgreSQL is a throw-away server (the test plugin's ``PostgresServer``:
``initdb`` in a temporary directory, unix socket, ``fsync`` off, which a read
does not touch). The machine may be busy: the 1-minute load average is
printed with the figures, and the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.posts_sut import seed
from bench.procs import cpu_seconds
from posts_rpc.handler import _page_builder
from posts_rpc.store import PostgresPostStore, SqlitePostStore

LIMIT = 20


def _backend_pids(url: str) -> list[int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'posts-rpc'"
        ).fetchall()
    return [int(row[0]) for row in rows]


def _per_call_us(
    fn: Callable[[], Any], calls: int, server_pids: Callable[[], list[int]]
) -> tuple[float, float]:
    """(this process's CPU, the database backends' CPU) per call, in microseconds."""
    for _ in range(200):
        fn()
    pids = server_pids()
    server0 = sum(cpu_seconds(p, descendants=False) for p in pids)
    mine0 = time.process_time()
    for _ in range(calls):
        fn()
    mine = time.process_time() - mine0
    server = sum(cpu_seconds(p, descendants=False) for p in pids) - server0
    return mine / calls * 1e6, server / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    from auth_rpc.testing import PostgresServer, find_postgresql_bindir

    parser = argparse.ArgumentParser(prog="python -m bench.store_micro")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    bindir = find_postgresql_bindir()
    if bindir is None:
        print("PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    load0 = os.getloadavg()[0]
    server = PostgresServer(bindir).start()
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        url = server.create_database("bench")
        stores: dict[str, Any] = {
            "SQLite": SqlitePostStore.open(work / "posts.db"),
            "PostgreSQL": PostgresPostStore.open(url, max_connections=1),
        }
        for store in stores.values():
            seed(store)
        build = _page_builder(LIMIT)
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for name, store in stores.items():
                pids: Callable[[], list[int]] = (
                    (lambda: _backend_pids(url)) if name == "PostgreSQL" else list
                )
                ways: dict[str, Callable[[], Any]] = {
                    "uncached": lambda s=store: build(s.list_page(LIMIT + 1, 0)),
                    "cached": lambda s=store: s.list_page_view(LIMIT + 1, 0, build),
                }
                for way, fn in ways.items():
                    results.setdefault((name, way), []).append(_per_call_us(fn, args.calls, pids))
        load1 = os.getloadavg()[0]
        print(f"Posts stores in-process, list_posts page of {LIMIT}, {args.calls} calls x "
              f"{args.rounds} rounds (median), load average {load0:.1f} -> {load1:.1f} "
              f"on {os.cpu_count()} CPUs")
        print(f"{'store':12s} {'page':9s} {'process us':>11s} {'database us':>12s} "
              f"{'total us':>9s}")
        for (name, way), samples in results.items():
            mine = statistics.median(s[0] for s in samples)
            db = statistics.median(s[1] for s in samples)
            print(f"{name:12s} {way:9s} {mine:11.1f} {db:12.1f} {mine + db:9.1f}")
        for store in stores.values():
            store.close()
    finally:
        server.stop()
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
