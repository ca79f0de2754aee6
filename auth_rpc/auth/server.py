"""The Auth service process: one :class:`AuthService`, two listeners.

The Thrift listener (``service Auth``) runs on :class:`auth_rpc.serving.rpc.RpcServer`;
the HTTP listener (JWKS, metadata, ``/token``, ``/introspect``, ``/revoke``,
``/healthz``) is the WSGI app of :mod:`auth_rpc.auth.http` served by waitress in the
same process. Both share the one service, so a revocation through either is
seen by both at once.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from auth_rpc.auth.handler import AuthHandler
from auth_rpc.auth.http import make_app
from auth_rpc.auth.service import AuthService
from auth_rpc.idl import auth_thrift
from auth_rpc.serving.httpd import HttpLimits, HttpServer
from auth_rpc.serving.metrics import CallCounts, ServiceMetrics
from auth_rpc.serving.rpc import RpcServer, ServerSettings, TLSServerConfig
from auth_rpc.serving.runner import bind_socket
from auth_rpc.serving.tls_front import TlsFront

__all__ = ["AuthServer", "HttpListener"]

log = logging.getLogger("auth_rpc.auth.server")


class HttpListener:
    """A WSGI app served by waitress from a background thread.

    Without TLS, waitress serves the listening socket itself. With TLS,
    :class:`TlsFront` terminates TLS on it and hands each connection to
    waitress over a socket pair (:meth:`HttpServer.open_connection`): waitress
    listens on nothing, so no other process can bypass TLS or mutual TLS, and
    the client certificate goes to the app with its own connection.

    ``limits`` (:class:`HttpLimits`) bound connections in all and per peer,
    the time a request may take to arrive and idle time, in waitress and in
    the TLS front alike; ``handshake_timeout_s`` bounds a TLS handshake.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int = 8,
        sock: socket.socket | None = None,
        tls: TLSServerConfig | None = None,
        limits: HttpLimits | None = None,
        handshake_timeout_s: float = 5.0,
    ) -> None:
        limits = limits if limits is not None else HttpLimits()
        self.limits = limits
        self._sock = sock if sock is not None else bind_socket(host, port)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.tls = tls
        self._front: TlsFront | None = None
        self._server = HttpServer(
            app,
            sock=None if tls is not None else self._sock,
            public=(host, self.port),
            threads=threads,
            url_scheme="https" if tls is not None else "http",
            limits=limits,
        )
        if tls is not None:
            self._front = TlsFront(
                self._sock,
                self._server.open_connection,
                tls,
                max_connections=limits.connection_limit,
                max_per_peer=limits.per_peer_limit,
                handshake_timeout_s=handshake_timeout_s,
                idle_timeout_s=limits.idle_timeout_s,
            )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> HttpListener:
        self._thread = threading.Thread(target=self._run, name="auth-http", daemon=True)
        self._thread.start()
        if self._front is not None:
            self._front.start()
        return self

    def _run(self) -> None:
        try:
            self._server.run()
        except OSError:
            # waitress's loop raises EBADF once close() has closed the sockets
            # under it; anything else while running is logged.
            if self._thread is not None and not getattr(self, "_closing", False):
                log.exception("HTTP listener stopped")

    def stop(self) -> None:
        """Stop accepting, close every connection, join the serving thread."""
        self._closing = True
        if self._front is not None:
            self._front.stop()
            self._sock.close()
        self._server.close()
        if self._thread is not None:
            self._thread.join(10)


class AuthServer:
    """The Auth service on a Thrift port and an HTTP port.

    ``start()`` binds both (``port=0`` picks free ports) and serves from
    background threads; ``stop()`` stops both gracefully. The caller owns the
    :class:`AuthService` and closes it after ``stop()``. ``http_limits`` are
    the HTTP listener's (:class:`HttpLimits`; ``settings`` are the Thrift one's).

    ``metrics`` (a :class:`~auth_rpc.serving.metrics.ServiceMetrics`) turns on
    counting (Thrift calls and connections, HTTP requests, token checks,
    throttling) and ``GET /metrics`` on the HTTP port; without it nothing is
    counted and ``/metrics`` is 404.
    """

    def __init__(
        self,
        service: AuthService,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        http_host: str | None = None,
        http_port: int = 0,
        http_sock: socket.socket | None = None,
        sock: socket.socket | None = None,
        settings: ServerSettings | None = None,
        http_limits: HttpLimits | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.service = service
        self.host = host
        self.metrics = metrics
        self._rpc = RpcServer(
            auth_thrift.Auth,
            AuthHandler(service),
            host=host,
            port=port,
            settings=settings,
            name="auth",
            sock=sock,
            counts=CallCounts() if metrics is not None else None,
        )
        if metrics is not None:
            metrics.add_source(self._rpc.metrics_snapshot)
            metrics.add_source(service.metrics_snapshot)
        http_host = http_host or host
        self._http_sock = http_sock if http_sock is not None else bind_socket(http_host, http_port)
        tls = settings.tls if settings is not None else None
        scheme = "https" if tls is not None else "http"
        base = f"{scheme}://{http_host}:{self._http_sock.getsockname()[1]}"
        self._http = HttpListener(
            make_app(service, base_url=base, metrics=metrics),
            host=http_host,
            sock=self._http_sock,
            tls=tls,
            limits=http_limits,
            handshake_timeout_s=settings.handshake_timeout_s if settings is not None else 5.0,
        )
        self._started = False

    def start(self) -> AuthServer:
        self._rpc.start()
        self._http.start()
        self._started = True
        return self

    @property
    def port(self) -> int:
        return self._rpc.port

    @property
    def http_port(self) -> int:
        return self._http.port

    @property
    def http_url(self) -> str:
        return self._http.url

    @property
    def metrics_url(self) -> str:
        return f"{self.http_url}/metrics"

    @property
    def jwks_url(self) -> str:
        return f"{self.http_url}/.well-known/jwks.json"

    @property
    def introspect_url(self) -> str:
        return f"{self.http_url}/introspect"

    def stop(self, grace_s: float | None = None) -> None:
        if not self._started:
            return
        self._started = False
        self._rpc.stop(grace_s)
        self._http.stop()

    def __enter__(self) -> AuthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
