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

:class:`HttpLimits` bound what clients can hold (waitress alone has an idle
timeout and a total connection limit, at which it stops accepting and
newcomers queue until they time out):

* a request's header must arrive within ``header_timeout_s`` of its first
  byte, and its body within ``header_timeout_s`` of the header's end (a client
  dripping a byte now and then is cut, as the Thrift ports cut a message that
  takes over 10 s); a connection idle for ``idle_timeout_s`` is closed;
* one peer (IP address) holds at most ``per_peer_limit`` connections: the one
  over is closed at once;
* at ``connection_limit`` connections, a newcomer closes the connection that
  has waited longest without a request being served (the oldest idle one, or
  one still dripping its request); only when every connection is being served
  is the newcomer closed, at once.

The same limits apply in the TLS front (:class:`auth_rpc.serving.tls_front.TlsFront`),
which counts connections from their first byte, handshake included.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask

__all__ = ["HttpLimits", "HttpServer", "peer_key"]

log = logging.getLogger("auth_rpc.serving.httpd")


@dataclass(frozen=True)
class HttpLimits:
    """Limits of an HTTP listener (see the module's docstring). Times in seconds."""

    connection_limit: int = 1000
    per_peer_limit: int = 100
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("connection_limit", "per_peer_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("header_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


def peer_key(peer: Any) -> str:
    """The address a per-peer limit counts (an IPv4-mapped IPv6 address as IPv4)."""
    host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
    return host.removeprefix("::ffff:") if "." in host else host


class RateLimitedLog:
    """Log a warning at most once per ``every_s`` (an attack must not flood the log)."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self._log = logger
        self._every_s = every_s
        self._next: dict[str, float] = {}
        self._skipped: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def warning(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(message, 0.0):
                self._skipped[message] += 1
                return
            self._next[message] = now + self._every_s
            skipped = self._skipped.pop(message, 0)
        more = f" ({skipped} more since the last report)" if skipped else ""
        self._log.warning("%s%s", message, more)


class _Task(WSGITask):
    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        environ.update(getattr(self.channel, "extra_environ", {}))
        return environ


class _Channel(HTTPChannel):
    """A waitress channel that times its request and counts against its peer."""

    task_class = _Task
    #: WSGI environ entries of every request on this channel (set by the hand-over only).
    extra_environ: dict[str, Any] = {}  # noqa: RUF012 (replaced, never mutated)
    server: Any  # a _Limited waitress server

    def __init__(self, server: Any, sock: socket.socket, addr: Any, *args: Any, **kw: Any) -> None:
        self.peer = peer_key(addr)
        self._counted = False
        #: when the channel last began to wait for a request (opened, or a reply done)
        self.waiting_since = time.monotonic()
        self._request_began: float | None = None  # first byte of the request being read
        self._body_began: float | None = None  # end of its header
        super().__init__(server, sock, addr, *args, **kw)

    def add_channel(self, map: Any = None) -> None:
        super().add_channel(map)
        if not self._counted:
            self._counted = True
            self.server.peers[self.peer] += 1

    def del_channel(self, map: Any = None) -> None:
        super().del_channel(map)
        if self._counted:
            self._counted = False
            peers = self.server.peers
            peers[self.peer] -= 1
            if peers[self.peer] <= 0:
                del peers[self.peer]

    def received(self, data: bytes) -> bool:
        before = self.request
        result: bool = super().received(data)
        request = self.request
        if request is None:
            self._request_began = self._body_began = None
        else:
            now = time.monotonic()
            if request is not before:
                self._request_began, self._body_began = now, None
            if self._body_began is None and request.headers_finished:
                self._body_began = now
        return result

    def writable(self) -> bool:
        # While a request's task runs, the task sends its own output (waitress's
        # write_soon flushes at once) and pulls the loop's trigger when it ends;
        # waitress's own answer here is "yes" as soon as any output is buffered,
        # so each time the loop saw a response being written (header, then body)
        # it asked poll() for POLLOUT, which is always ready, found the output
        # locked by the task and went round again: a spin taking the CPU and the
        # GIL from the task. Only when the task waits for the loop (its output
        # over the high watermark), or the channel is closing, is it writable then.
        if (
            self.requests
            and self.total_outbufs_len <= self.adj.outbuf_high_watermark
            and not (self.will_close or self.close_when_flushed)
        ):
            return False
        return bool(super().writable())

    def service(self) -> None:
        super().service()
        now = time.monotonic()
        self.waiting_since = now
        if self._request_began is not None:  # a pipelined request waited meanwhile
            self._request_began = now
            if self._body_began is not None:
                self._body_began = now

    def request_overdue(self, now: float, timeout_s: float) -> bool:
        """Whether the header (or then the body) being read took over ``timeout_s``."""
        began = self._body_began if self._body_began is not None else self._request_began
        return began is not None and now - began > timeout_s


class _Limited:
    """What both waitress servers add: deadlines, per-peer cap, eviction at the cap."""

    limits: HttpLimits
    peers: collections.Counter[str]
    _next_check = 0.0
    _check_every_s = 1.0
    _warn: RateLimitedLog

    def _init_limits(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.peers = collections.Counter()
        # Deadlines are checked this often (waitress checks its idle timeout every 30 s).
        self._check_every_s = max(0.05, min(1.0, limits.header_timeout_s / 4))
        self._warn = RateLimitedLog(log)

    def readable(self) -> bool:
        # Called on every turn of waitress's loop (at least every asyncore_loop_timeout).
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check_every_s
            self.maintenance(time.time())
        # Never stop accepting at the limit: handle_accept makes room or refuses at once.
        return bool(self.accepting)  # type: ignore[attr-defined]

    def maintenance(self, now: float) -> None:
        """Close channels idle too long, or too slow to send their request."""
        mono = time.monotonic()
        idle_cutoff = now - self.limits.idle_timeout_s
        for channel in list(self.active_channels.values()):  # type: ignore[attr-defined]
            if channel.requests or channel.will_close:
                continue  # being served: the app's time is not the client's
            if (
                channel.request_overdue(mono, self.limits.header_timeout_s)
                or channel.last_activity < idle_cutoff
            ):
                channel.will_close = True  # the loop closes it on its next turn

    def handle_accept(self) -> None:
        try:
            accepted = self.accept()  # type: ignore[attr-defined]
            if accepted is None:
                return
            conn, addr = accepted
            self.set_socket_options(conn)  # type: ignore[attr-defined]
        except OSError:
            return  # e.g. the client left first
        addr = self.fix_addr(addr)  # type: ignore[attr-defined]
        if not self._make_room(peer_key(addr)):
            with contextlib.suppress(OSError):
                conn.close()
            return
        self.channel_class(self, conn, addr, self.adj, map=self._map)  # type: ignore[attr-defined]

    def _make_room(self, peer: str) -> bool:
        """Whether a new connection from ``peer`` may be served (closing another if need be)."""
        if self.peers[peer] >= self.limits.per_peer_limit:
            self._warn.warning("HTTP: a peer reached its connection limit; refusing it")
            return False
        channels = self.active_channels  # type: ignore[attr-defined]
        if len(channels) < self.limits.connection_limit:
            return True
        idle = [c for c in channels.values() if not c.requests]
        if not idle:
            self._warn.warning("HTTP: connection limit reached, all busy; refusing")
            return False
        # One already due to close (cut by a deadline) first, else the oldest idle one.
        victim = min(idle, key=lambda c: (not c.will_close, c.waiting_since))
        if not victim.will_close:
            self._warn.warning("HTTP: connection limit reached; closing the oldest idle connection")
        victim.handle_close()
        return True


class _TcpServer(_Limited, TcpWSGIServer):
    channel_class = _Channel

    def __init__(self, *args: Any, limits: HttpLimits, **kw: Any) -> None:
        self._init_limits(limits)
        super().__init__(*args, **kw)


class _HandedOverServer(_Limited, BaseWSGIServer):
    """A waitress server accepting nothing: its channels come from the hand-over.

    waitress wants a socket for the server itself: an unbound AF_UNIX socket
    that never listens (no port, no path).
    """

    channel_class = _Channel

    def __init__(self, *args: Any, public: tuple[str, int], limits: HttpLimits, **kw: Any) -> None:
        self._public = public
        self._init_limits(limits)
        super().__init__(*args, **kw)

    def getsockname(self) -> tuple[str, str]:
        return self._public[0], str(self._public[1])  # SERVER_NAME / SERVER_PORT


def _loop_timeout_s(limits: HttpLimits) -> float:
    """waitress's poll() timeout: often enough for the header deadline, at most 0.2 s."""
    return max(0.02, min(0.2, limits.header_timeout_s / 8))


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
        limits: HttpLimits | None = None,
    ) -> None:
        limits = limits if limits is not None else HttpLimits()
        self.limits = limits
        adj = Adjustments(
            threads=threads,
            ident="auth-rpc",
            url_scheme=url_scheme,
            # waitress logs the peer of every failed request; it never logs bodies.
            expose_tracebacks=False,
            # The idle timeout and the limits are _Limited's (to the tenth of a second).
            channel_timeout=max(1, round(limits.idle_timeout_s)),
            connection_limit=limits.connection_limit,
            # poll(), not select(): select() fails once a descriptor passes 1023.
            asyncore_use_poll=True,
            max_request_body_size=1024 * 1024,
            clear_untrusted_proxy_headers=True,
        )
        # How long waitress's loop waits in poll() when nothing happens: the deadlines
        # are checked on its turns (_Limited.readable). Set after the fact, because
        # Adjustments takes whole seconds only: ``asyncore_loop_timeout=0.2`` became 0,
        # a loop polling without waiting, that kept a CPU busy (and the GIL from the
        # request threads) even with no request at all.
        adj.asyncore_loop_timeout = _loop_timeout_s(limits)  # type: ignore[assignment]
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
                limits=limits,
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
                limits=limits,
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
        # waitress keeps no public list of its channels. A connection's channel is
        # closed by handle_close, which also closes its output buffers (a response
        # over outbuf_overflow sits in a temporary file: close() alone leaked it).
        for channel in list(server._map.values()):
            with contextlib.suppress(OSError):
                if isinstance(channel, HTTPChannel):
                    channel.handle_close()
                else:
                    channel.close()
        server.close()
