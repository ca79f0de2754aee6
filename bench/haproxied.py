"""Posts replicas behind HAProxy, as the bench runs them: ``python -m bench.haproxied``.

``python -m bench.haproxied --replicas N -- POSTS_SERVE_ARGS...`` starts N
``posts-rpc serve`` processes (the real command, port 0, the given arguments:
one shared data directory) and HAProxy in front of them with the repository's
configuration (:func:`auth_rpc.serving.haproxy.render_config`, Thrift-level
health checks), waits until every replica has passed its check, prints
``bench-ready port=P replicas=N`` (the balancer's port) and stops everything on
SIGTERM/SIGINT, also one that arrives while it is still starting them (the
bench stops a server that is not ready in time). Every process is a child of
this one, so the bench's CPU figure for it (user+sys of the process tree) is
the replicas' and HAProxy's.

``--postgresql``: the replicas keep their posts in PostgreSQL instead: a
throw-away server started here (the test plugin's
:class:`~auth_rpc.testing.PostgresServer`: ``initdb`` in a temporary
directory, unix socket, ``fsync`` off), seeded with the bench's posts and
given to every replica with ``--database-url``; its processes are children of
this one too, so the CPU figure includes the database's. ``--no-haproxy``
(with one replica): the replica alone, its own port on the ready line.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from auth_rpc.serving.haproxy import HAProxy, Listener
from auth_rpc.serving.runner import run_until_signal
from bench.procs import ServerProcess, stop_all

PY = sys.executable


def _stop_while_starting(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGINT before the ready line: unwind, so that ``finally`` stops what was started.

    The default action would end the process at once and leave PostgreSQL
    (its own session), HAProxy and the replicas running. Further signals are
    ignored while cleaning up (the bench kills after its grace period).
    """
    _set_stop_handler(signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _set_stop_handler(handler: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.haproxied")
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--postgresql", action="store_true")
    parser.add_argument("--no-haproxy", action="store_true")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    serve_args = [a for a in args.serve_args if a != "--"]
    if args.no_haproxy and args.replicas != 1:
        parser.error("--no-haproxy runs one replica")
    _set_stop_handler(_stop_while_starting)
    work = Path(tempfile.mkdtemp(prefix="bench-haproxied-"))
    proxy: HAProxy | None = None
    database: Any = None
    try:
        if args.postgresql:
            database = _seeded_postgresql()
            serve_args = [*serve_args, "--database-url", database.url("bench")]
        if not args.no_haproxy:  # the repository's configuration tells each client's address
            serve_args = [*serve_args, "--proxy-protocol-from", "127.0.0.1"]
        replicas = [
            ServerProcess(
                f"posts{n}",
                [PY, "-c", "import sys; from posts_rpc.cli import main; sys.exit(main())",
                 "serve", "--port", "0", *serve_args],
                cpus=None, log_path=work / f"posts{n}.log", ready_prefix="posts-rpc ready",
            ).launch()
            for n in range(1, args.replicas + 1)
        ]
        ports = []
        for replica in replicas:
            line = replica.wait_ready().ready_line
            ports.append(int(line.split("thrift=", 1)[1].split()[0].rpartition(":")[2]))
        if args.no_haproxy:
            port = ports[0]
        else:
            proxy = HAProxy([Listener("posts", args.replicas, proxy_protocol=True)],
                            work_dir=work)
            proxy.start({"posts": [("127.0.0.1", port) for port in ports]})
            port = proxy.port("posts")

        def stop() -> None:
            if proxy is not None:
                proxy.stop()
            stop_all()

        return run_until_signal(f"bench-ready port={port} replicas={args.replicas}", stop)
    finally:
        _set_stop_handler(signal.SIG_IGN)
        if proxy is not None:
            proxy.stop()
        stop_all()
        if database is not None:
            database.stop()
        shutil.rmtree(work, ignore_errors=True)


def _seeded_postgresql() -> Any:
    """A started throw-away PostgreSQL with a database ``bench`` holding the bench's posts."""
    from auth_rpc.testing import PostgresServer, find_postgresql_bindir
    from bench.posts_sut import seed
    from posts_rpc.store import PostgresPostStore

    bindir = find_postgresql_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(bindir)
    try:
        server.start()
        server.create_database("bench")
        store = PostgresPostStore.open(server.url("bench"), cache=False)
        try:
            seed(store)
        finally:
            store.close()
    except BaseException:
        server.stop()
        raise
    return server


if __name__ == "__main__":
    sys.exit(main())
