"""The limit: a bare thriftpy2 threaded server for ``idl/posts.thrift``.

``list_posts`` returns the same 20 posts (built once, held in memory) without
looking at the token: no check, no store. It is thriftpy2's
``TThreadedServer`` with the Cython codec (``TCyBinaryProtocolFactory``,
``TCyBufferedTransportFactory``), composed as ``thriftpy2.rpc.make_server``
does, with one change: ``TCP_NODELAY`` is set on each accepted socket.
thriftpy2's ``TServerSocket.accept`` leaves Nagle's algorithm on, and a page
of 20 posts (~5 KiB) leaves in two writes, the second of which waits for the
client's delayed ACK (~40 ms): without the option this server measures the
kernel's ACK timer, not thriftpy2 (docs/benchmarks.md, "What is measured").

Run as ``python -m bench.bare [--port P]``; prints ``bench-ready port=P``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
from types import FrameType
from typing import Any

from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.server import TThreadedServer
from thriftpy2.thrift import TProcessor
from thriftpy2.transport import TCyBufferedTransportFactory, TServerSocket, TSocket

from auth_rpc.idl import posts_thrift
from bench.data import PAGE_SIZE, post_dicts

__all__ = ["BareHandler", "NoDelayServerSocket", "main", "make_bare_server"]


class BareHandler:
    """Answers ``list_posts`` from memory; never checks the token."""

    def __init__(self) -> None:
        self._posts = [posts_thrift.Post(**p) for p in post_dicts(100)]

    def list_posts(self, token: str, limit: int, before_id: int) -> Any:
        count = limit or PAGE_SIZE
        return posts_thrift.PostPage(posts=self._posts[:count], next_before_id=0)


class NoDelayServerSocket(TServerSocket):
    """thriftpy2's server socket, with ``TCP_NODELAY`` on accepted sockets.

    ``listen()`` is idempotent, so the port can be bound (and read, for port 0)
    before ``TThreadedServer.serve()`` calls it again.
    """

    def listen(self) -> None:
        if self.sock is None:
            super().listen()

    def accept(self) -> TSocket:
        client: TSocket = super().accept()
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client

    @property
    def bound_port(self) -> int:
        assert self.sock is not None, "listen() first"
        port: int = self.sock.getsockname()[1]
        return port


def make_bare_server(host: str = "127.0.0.1", port: int = 0) -> tuple[TThreadedServer, int]:
    """A bound (not yet serving) bare server and its port."""
    processor = TProcessor(posts_thrift.Posts, BareHandler())
    # client_timeout=None: thriftpy2's default (3 s) would drop a persistent
    # connection that idles between two measurement windows.
    trans = NoDelayServerSocket(host=host, port=port, client_timeout=None)
    trans.listen()
    server = TThreadedServer(
        processor,
        trans,
        iprot_factory=TCyBinaryProtocolFactory(),
        itrans_factory=TCyBufferedTransportFactory(),
        daemon=True,
    )
    return server, trans.bound_port


def _stop(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM during interpreter shutdown (when Python has put back
    # the default handlers) would end the process with -15: ignore it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server, port = make_bare_server(args.host, args.port)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"bench-ready port={port}", flush=True)
    with contextlib.suppress(SystemExit):
        server.serve()  # the accept loop; SIGTERM/SIGINT end it
    return 0


if __name__ == "__main__":
    sys.exit(main())
