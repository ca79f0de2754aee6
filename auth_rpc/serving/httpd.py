"""waitress for an HTTP listener, and the hand-over of connections from the TLS front.

:class:`HttpServer` serves a WSGI app with waitress, in one of two ways:

* on a listening TCP socket (plain HTTP), as waitress always does;
* behind :class:`auth_rpc.serving.tls_front.TlsFront`, listening on nothing.
  The front hands each decrypted connection over as one end of a
  :func:`socket.socketpair` (:meth:`HttpServer.open_connection`), with the WSGI
  environ entries of that connection (the client's address, the mutual-TLS
  client certificate). They travel on the waitress channel object itself, so
  there is no port, path or key another process could reach or forge: only the
  front, in this process, can open a connection to the app.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask

__all__ = ["HttpServer"]


class _Task(WSGITask):
    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        environ.update(getattr(self.channel, "extra_environ", {}))
        return environ


class _Channel(HTTPChannel):
    task_class = _Task
    #: WSGI environ entries of every request on this channel (set by the hand-over only).
    extra_environ: dict[str, Any] = {}  # noqa: RUF012 (replaced, never mutated)


class _TcpServer(TcpWSGIServer):
    channel_class = _Channel


class _HandedOverServer(BaseWSGIServer):
    """A waitress server accepting nothing: its channels come from the hand-over.

    waitress wants a socket for the server itself: an unbound AF_UNIX socket
    that never listens (no port, no path).
    """

    channel_class = _Channel

    def __init__(self, *args: Any, public: tuple[str, int], **kw: Any) -> None:
        self._public = public
        super().__init__(*args, **kw)

    def getsockname(self) -> tuple[str, str]:
        return self._public[0], str(self._public[1])  # SERVER_NAME / SERVER_PORT


class HttpServer:
    """waitress serving ``app`` on ``sock``, or (``sock=None``) only handed-over connections.

    ``public`` is the (host, port) clients connect to (reported as
    ``SERVER_PORT``); ``url_scheme`` is ``wsgi.url_scheme``. Run :meth:`run`
    in a thread; :meth:`close` from another.
    """

    def __init__(
        self,
        app: Any,
        *,
        sock: socket.socket | None,
        public: tuple[str, int],
        threads: int = 8,
        url_scheme: str = "http",
        idle_timeout_s: float = 30.0,
        connection_limit: int = 1000,
    ) -> None:
        adj = Adjustments(
            threads=threads,
            ident="auth-rpc",
            url_scheme=url_scheme,
            # waitress logs the peer of every failed request; it never logs bodies.
            expose_tracebacks=False,
            channel_timeout=max(1, round(idle_timeout_s)),
            asyncore_loop_timeout=0.2,
            connection_limit=connection_limit,
            max_request_body_size=1024 * 1024,
            clear_untrusted_proxy_headers=True,
        )
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adj.threads)
        self._lock = threading.Lock()
        self._pending: set[socket.socket] = set()  # handed over, not yet adopted
        self._closed = False
        self._server: Any
        if sock is not None:
            self._server = _TcpServer(
                app,
                map={},
                _sock=sock,
                dispatcher=dispatcher,
                adj=adj,
                bind_socket=False,
                sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
            )
        else:
            self._server = _HandedOverServer(
                app,
                map={},
                _start=False,  # never listens
                dispatcher=dispatcher,
                adj=adj,
                bind_socket=False,
                sockinfo=(socket.AF_UNIX, socket.SOCK_STREAM, None, None),
                public=public,
            )

    def run(self) -> None:
        """Serve until :meth:`close` (waitress's loop)."""
        self._server.run()

    def open_connection(self, peer: Any, environ: dict[str, Any]) -> socket.socket:
        """A new connection to the app, for the TLS front; the app sees ``peer`` and ``environ``.

        Returns the front's end of a socket pair; the other end becomes a
        waitress channel in the loop's own thread.
        """
        mine, theirs = socket.socketpair()
        server = self._server

        def adopt() -> None:  # in the loop's thread, as waitress wants
            with self._lock:
                if theirs not in self._pending:
                    return  # closed meanwhile
                self._pending.discard(theirs)
            channel = server.channel_class(server, theirs, peer, server.adj, map=server._map)
            channel.extra_environ = environ

        try:
            with self._lock:
                if self._closed:
                    raise OSError("the HTTP server is closed")
                self._pending.add(theirs)
            server.trigger.pull_trigger(adopt)
        except BaseException:
            with self._lock:
                self._pending.discard(theirs)
            theirs.close()
            mine.close()
            raise
        return mine

    def close(self) -> None:
        """Close every connection and the listener; finish the tasks in flight (5 s at most)."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, set()
        for sock in pending:
            sock.close()
        server = self._server
        server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
        # waitress keeps no public list of its channels.
        for channel in list(server._map.values()):
            with contextlib.suppress(OSError):
                channel.close()
        server.close()
