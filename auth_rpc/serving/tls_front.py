"""TLS in front of waitress, which speaks only plain HTTP.

:class:`TlsFront` accepts TLS connections on the public socket, does each
handshake in the connection's own thread (bounded by a timeout, so a silent
client never blocks ``accept()``), and splices the decrypted stream to
waitress listening on a private loopback socket. The verified client
certificate of a mutual-TLS connection is handed to the WSGI app through
:func:`peer_cert_middleware`: the front records it under the local port of its
loopback connection, which waitress reports as ``REMOTE_PORT``.

Connections are capped (``max_connections``) and cut after ``idle_timeout_s``
without traffic either way.
"""

from __future__ import annotations

import contextlib
import logging
import select
import selectors
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any

from auth_rpc.serving.rpc import TLSServerConfig, _cert_identity, accept_until

__all__ = ["PEER_CERT_KEY", "PEER_IDENTITY_KEY", "TlsFront", "peer_cert_middleware"]

log = logging.getLogger("auth_rpc.serving.tls_front")

#: WSGI environ keys the middleware sets for a mutual-TLS request.
PEER_CERT_KEY = "auth_rpc.peer_cert"
PEER_IDENTITY_KEY = "auth_rpc.peer_identity"

_CHUNK = 64 * 1024


class TlsFront:
    """Terminates TLS on ``listener`` and forwards each connection to ``backend``."""

    def __init__(
        self,
        listener: socket.socket,
        backend: tuple[str, int],
        tls: TLSServerConfig,
        *,
        max_connections: int = 1000,
        handshake_timeout_s: float = 5.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self._listener = listener
        self._backend = backend
        self._context = tls.context()
        self._max = max_connections
        self._handshake_timeout_s = handshake_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._peer_certs: dict[int, dict[str, Any]] = {}
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def peer_cert(self, backend_port: int) -> dict[str, Any] | None:
        """The client certificate of the connection whose loopback leg uses ``backend_port``."""
        return self._peer_certs.get(backend_port)

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
            sockets, threads = list(self._open), list(self._threads)
        for sock in sockets:
            _shutdown(sock)
        for thread in threads:
            thread.join(10)

    def _accept_loop(self) -> None:
        accept_until(self._listener, self._closing, self._admit)

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        with self._lock:
            if len(self._threads) >= self._max:
                sock.close()
                log.warning("TLS front: connection limit reached")
                return
            thread = threading.Thread(
                target=self._serve, args=(sock,), name="tls-front-conn", daemon=True
            )
            self._threads.add(thread)
            self._open.add(sock)
        thread.start()

    def _serve(self, raw: socket.socket) -> None:
        tls: ssl.SSLSocket | None = None
        backend: socket.socket | None = None
        port = 0
        try:
            raw.settimeout(self._handshake_timeout_s)
            tls = self._context.wrap_socket(raw, server_side=True)
            with self._lock:
                self._open.discard(raw)
                self._open.add(tls)
            backend = socket.create_connection(self._backend, timeout=self._handshake_timeout_s)
            with self._lock:
                self._open.add(backend)
            port = backend.getsockname()[1]
            cert = tls.getpeercert()
            if cert:
                self._peer_certs[port] = cert
            self._splice(tls, backend)
        except (OSError, ValueError):
            pass  # handshake failed or timed out, or a side went away
        finally:
            self._peer_certs.pop(port, None)
            for sock in (backend, tls, raw):
                if sock is not None:
                    _close(sock)
            with self._lock:
                self._open.difference_update({s for s in (backend, tls, raw) if s is not None})
                self._threads.discard(threading.current_thread())

    def _splice(self, tls: ssl.SSLSocket, backend: socket.socket) -> None:
        tls.setblocking(False)
        backend.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(tls, selectors.EVENT_READ, backend)
            sel.register(backend, selectors.EVENT_READ, tls)
            while not self._closing.is_set():
                # An SSL socket may hold decrypted bytes that select() cannot see.
                ready: list[tuple[Any, Any]] = [(tls, backend)] if tls.pending() else []
                if not ready:
                    events = sel.select(self._idle_timeout_s)
                    if not events:
                        return  # idle
                    ready = [(key.fileobj, key.data) for key, _ in events]
                for src, dst in ready:
                    if not _pump(src, dst):
                        return


def _pump(src: socket.socket, dst: socket.socket) -> bool:
    """Move what ``src`` has to ``dst``; ``False`` once ``src`` is closed."""
    try:
        data = src.recv(_CHUNK)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return True
    if not data:
        return False
    view = memoryview(data)
    while view:
        try:
            sent = dst.send(view)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            select.select([], [dst], [], 1.0)  # wait until the peer reads
            continue
        view = view[sent:]
    return True


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def peer_cert_middleware(
    app: Callable[..., Iterable[bytes]], front: TlsFront
) -> Callable[..., Iterable[bytes]]:
    """Mark requests as HTTPS and expose the mutual-TLS client certificate to ``app``."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.url_scheme"] = "https"
        try:
            cert = front.peer_cert(int(environ.get("REMOTE_PORT") or 0))
        except ValueError:
            cert = None
        if cert:
            environ[PEER_CERT_KEY] = cert
            environ[PEER_IDENTITY_KEY] = _cert_identity(cert)
        return app(environ, start_response)

    return wrapped
