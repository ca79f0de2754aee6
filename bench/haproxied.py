"""Posts replicas behind HAProxy, as the bench runs them: ``python -m bench.haproxied``.

``python -m bench.haproxied --replicas N -- POSTS_SERVE_ARGS...`` starts N
``posts-rpc serve`` processes (the real command, port 0, the given arguments:
one shared data directory) and HAProxy in front of them with the repository's
configuration (:func:`auth_rpc.serving.haproxy.render_config`, Thrift-level
health checks), waits until every replica has passed its check, prints
``bench-ready port=P replicas=N`` (the balancer's port) and stops everything on
SIGTERM/SIGINT. Every process is a child of this one, so the bench's CPU
figure for it (user+sys of the process tree) is the replicas' and HAProxy's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from auth_rpc.serving.haproxy import HAProxy, Listener
from auth_rpc.serving.runner import run_until_signal
from bench.procs import ServerProcess, stop_all

PY = sys.executable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.haproxied")
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    serve_args = [a for a in args.serve_args if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="bench-haproxied-"))
    proxy: HAProxy | None = None
    try:
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
        proxy = HAProxy([Listener("posts", args.replicas)], work_dir=work)
        proxy.start({"posts": [("127.0.0.1", port) for port in ports]})

        def stop() -> None:
            if proxy is not None:
                proxy.stop()
            stop_all()

        return run_until_signal(
            f"bench-ready port={proxy.port('posts')} replicas={args.replicas}", stop
        )
    finally:
        if proxy is not None:
            proxy.stop()
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
