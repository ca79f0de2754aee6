"""TLS in front of waitress, which speaks only plain HTTP.

:class:`TlsFront` accepts TLS connections on the public socket, does each
handshake in the connection's own thread (bounded by a timeout, so a silent
client never blocks ``accept()``), and splices the decrypted stream to a
connection it opens to the app with ``connect(peer, environ)``:
:meth:`auth_rpc.serving.httpd.HttpServer.open_connection`, a socket pair
whose other end becomes a waitress channel. Nothing listens for the app, so
no other process can reach it. The WSGI environ entries of the connection
(``wsgi.url_scheme``, and for mutual TLS the verified client certificate
under :data:`PEER_CERT_KEY` and its identity under :data:`PEER_IDENTITY_KEY`)
go along with it, attached to that one connection.

Connections are capped in all and per client address (at the cap a newcomer
cuts the connection that has waited longest; see :class:`TlsFront`), and cut
(reset) after ``idle_timeout_s`` without progress either way: a client that
sends but never reads is cut like a silent one.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from auth_rpc.serving.httpd import RateLimitedLog, peer_key
from auth_rpc.serving.rpc import TLSServerConfig, _cert_identity, accept_until

__all__ = ["PEER_CERT_KEY", "PEER_IDENTITY_KEY", "Connect", "TlsFront"]

log = logging.getLogger("auth_rpc.serving.tls_front")

#: WSGI environ keys of a mutual-TLS request: the verified client certificate, its identity.
PEER_CERT_KEY = "auth_rpc.peer_cert"
PEER_IDENTITY_KEY = "auth_rpc.peer_identity"

_CHUNK = 64 * 1024

#: ``connect(peer, environ)``: a new connection to the app for the client at
#: ``peer``, whose requests get the WSGI ``environ`` entries.
Connect = Callable[[Any, dict[str, Any]], socket.socket]


class _Conn:
    """One client connection of the front (its sockets, its peer, its thread)."""

    __slots__ = ("backend", "counted", "last_delivery", "peer", "tls")

    def __init__(self, tls: ssl.SSLSocket, peer: str) -> None:
        self.tls = tls
        self.peer = peer
        self.backend: socket.socket | None = None
        self.counted = True
        #: when the client last got bytes from the app (or connected): the eviction order
        self.last_delivery = time.monotonic()

    def cut(self) -> None:
        """End the connection from another thread (its own thread then cleans up)."""
        for sock in (self.tls, self.backend):
            if sock is not None:
                _shutdown(sock)


class TlsFront:
    """Terminates TLS on ``listener`` and forwards each connection to ``connect(...)``.

    Limits, as the HTTP listener's (:class:`auth_rpc.serving.httpd.HttpLimits`):
    ``max_connections`` in all, ``max_per_peer`` per client IP address (the
    one over is closed at once); at ``max_connections`` a newcomer cuts the
    connection that has gone longest without getting a byte from the app
    (handshakes included). The handshake must end within
    ``handshake_timeout_s`` (a total deadline, not per read); after it, a
    connection is cut after ``idle_timeout_s`` without progress either way.
    """

    def __init__(
        self,
        listener: socket.socket,
        connect: Connect,
        tls: TLSServerConfig,
        *,
        max_connections: int = 1000,
        max_per_peer: int = 100,
        handshake_timeout_s: float = 5.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        if max_connections < 1 or max_per_peer < 1:
            raise ValueError("max_connections and max_per_peer must be at least 1")
        self._listener = listener
        self._connect = connect
        self._context = tls.context()
        self._max = max_connections
        self._max_per_peer = max_per_peer
        self._handshake_timeout_s = handshake_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()  # counted against the limits
        self._peers: collections.Counter[str] = collections.Counter()
        self._threads: set[threading.Thread] = set()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._warn = RateLimitedLog(log)

    @property
    def connection_count(self) -> int:
        """Connections counted against the limits (a cut one stops counting at once)."""
        with self._lock:
            return len(self._conns)

    def start(self) -> TlsFront:
        self._listener.settimeout(0.5)
        self._thread = threading.Thread(target=self._accept_loop, name="tls-front", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every connection, join every thread."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            conn.cut()
        for thread in threads:
            thread.join(10)

    def _accept_loop(self) -> None:
        accept_until(self._listener, self._closing, self._admit)

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        key = peer_key(peer)
        try:
            # No I/O yet: the handshake runs in the connection's thread.
            tls = self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            _close(sock)
            return
        conn = _Conn(tls, key)
        with self._lock:
            if self._peers[key] >= self._max_per_peer:
                self._warn.warning("TLS front: a peer reached its connection limit; refusing it")
                _close(tls)
                return
            if len(self._conns) >= self._max:
                victim = min(self._conns, key=lambda c: c.last_delivery)
                self._uncount(victim)
                victim.cut()
                self._warn.warning(
                    "TLS front: connection limit reached; cutting the longest-waiting connection"
                )
            thread = threading.Thread(
                target=self._serve, args=(conn, peer), name="tls-front-conn", daemon=True
            )
            self._conns.add(conn)
            self._peers[key] += 1
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no more threads
            with self._lock:
                self._uncount(conn)
                self._threads.discard(thread)
            _close(tls)
            self._warn.warning("TLS front: cannot start a thread; refusing a connection")

    def _uncount(self, conn: _Conn) -> None:
        """Stop counting ``conn`` against the limits (under the lock; idempotent)."""
        if conn.counted:
            conn.counted = False
            self._conns.discard(conn)
            self._peers[conn.peer] -= 1
            if self._peers[conn.peer] <= 0:
                del self._peers[conn.peer]

    def _serve(self, conn: _Conn, peer: Any) -> None:
        tls = conn.tls
        try:
            self._handshake(tls)
            environ: dict[str, Any] = {"wsgi.url_scheme": "https"}
            cert = tls.getpeercert()
            if cert:
                environ[PEER_CERT_KEY] = cert
                environ[PEER_IDENTITY_KEY] = _cert_identity(cert)
            with self._lock:
                if not conn.counted or self._closing.is_set():
                    return  # cut during the handshake
            conn.backend = self._connect(peer, environ)
            with self._lock:
                if not conn.counted:
                    return  # cut meanwhile (cut() may have missed the new backend)
            if self._splice(conn, tls, conn.backend):
                _abort(tls)  # idle: reset, the peer may never read a FIN
        except (OSError, ValueError):
            pass  # handshake failed or timed out, or a side went away
        finally:
            for sock in (conn.backend, tls):
                if sock is not None:
                    _close(sock)
            with self._lock:
                self._uncount(conn)
                self._threads.discard(threading.current_thread())

    def _handshake(self, tls: ssl.SSLSocket) -> None:
        """The TLS handshake, within ``handshake_timeout_s`` in all (a drip cannot stretch it)."""
        tls.setblocking(False)
        deadline = time.monotonic() + self._handshake_timeout_s
        with selectors.DefaultSelector() as sel:
            while True:
                try:
                    tls.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    events = selectors.EVENT_READ
                except ssl.SSLWantWriteError:
                    events = selectors.EVENT_WRITE
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("TLS handshake timed out")
                _watch(sel, tls, events)
                sel.select(remaining)

    def _splice(self, conn: _Conn, tls: ssl.SSLSocket, backend: socket.socket) -> bool:
        """Copy both ways until a side closes or nothing moves for ``idle_timeout_s``.

        Returns whether the connection went idle.

        Each direction holds at most one chunk: while it cannot be sent, its
        source is not read (so a client that stops reading stops the app too).
        The idle deadline runs from the last byte moved either way, so a
        client that sends but never reads is cut like a silent one.
        """
        tls.setblocking(False)
        backend.setblocking(False)
        to_app = b""  # read from the client, not yet sent to the app
        to_client = b""  # read from the app, not yet sent to the client
        app_done = False  # the app closed: send what is left, then end
        last_progress = time.monotonic()
        with selectors.DefaultSelector() as sel:
            while not self._closing.is_set():
                tls_wants = 0  # what the TLS socket waits for when no side can move
                moved = False
                if not to_app and not app_done:
                    data, wants = _recv(tls)
                    tls_wants |= wants
                    if data == b"":
                        return False  # the client closed
                    if data:
                        to_app, moved = data, True
                if to_app:
                    sent, _ = _send(backend, to_app)
                    if sent:
                        to_app, moved = to_app[sent:], True
                if not to_client and not app_done:
                    data, _ = _recv(backend)
                    if data == b"":
                        app_done = True
                    elif data:
                        to_client, moved = data, True
                if to_client:
                    sent, wants = _send(tls, to_client)
                    tls_wants |= wants
                    if sent:
                        to_client, moved = to_client[sent:], True
                        conn.last_delivery = time.monotonic()
                if app_done and not to_client:
                    return False
                now = time.monotonic()
                if moved:
                    last_progress = now
                    continue
                remaining = last_progress + self._idle_timeout_s - now
                if remaining <= 0:
                    return True  # idle: nothing moved either way
                _watch(sel, tls, tls_wants)
                _watch(
                    sel,
                    backend,
                    (selectors.EVENT_WRITE if to_app else 0)
                    | (selectors.EVENT_READ if not to_client and not app_done else 0),
                )
                sel.select(remaining)
        return False


def _recv(sock: socket.socket) -> tuple[bytes | None, int]:
    """``(data, 0)``, ``(b"", 0)`` at end of stream, ``(None, events to wait for)``."""
    try:
        return sock.recv(_CHUNK), 0
    except ssl.SSLWantWriteError:
        return None, selectors.EVENT_WRITE
    except (ssl.SSLWantReadError, BlockingIOError):
        return None, selectors.EVENT_READ
    except (ConnectionResetError, BrokenPipeError):
        return b"", 0


def _send(sock: socket.socket, data: bytes) -> tuple[int, int]:
    """``(bytes sent, 0)`` or ``(0, events to wait for)``; raises OSError if the peer is gone."""
    try:
        return sock.send(data), 0
    except ssl.SSLWantReadError:
        return 0, selectors.EVENT_READ
    except (ssl.SSLWantWriteError, BlockingIOError):
        return 0, selectors.EVENT_WRITE


def _watch(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    """Make ``sel`` wait for ``events`` on ``sock`` (none: not at all)."""
    try:
        key = sel.get_key(sock)
    except KeyError:
        if events:
            sel.register(sock, events)
        return
    if not events:
        sel.unregister(sock)
    elif key.events != events:
        sel.modify(sock, events)


def _shutdown(sock: socket.socket) -> None:
    """Wake and end whatever another thread does on ``sock`` (the system call only:
    ``SSLSocket.shutdown`` would also drop the TLS state under that thread)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _abort(sock: socket.socket) -> None:
    """Make the coming close() reset the connection (no FIN stuck behind unread data)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
