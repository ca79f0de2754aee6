"""Small HTTP servers for tests that stand in for somebody else's endpoint.

A JWK Set, an RFC 7662 introspection endpoint, Status List Tokens, the site
an attacker's token points at: each test writes its own request handler
(:class:`QuietHandler` answers with :meth:`~QuietHandler.reply` and logs
nothing) and serves it with :class:`StubServer` on 127.0.0.1, a free port
(or the port it had, to come back after :meth:`~StubServer.stop`), from a
thread of this process. Importable from any test: ``tests`` is on pytest's
``pythonpath``.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["QuietHandler", "StubServer"]


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers in one call."""

    def reply(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str | None = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send ``status``, ``headers``, ``Content-Type`` (unless None), the length and ``body``."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    quiet_errors = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not self.quiet_errors:
            super().handle_error(request, client_address)


class StubServer:
    """Serves ``handler`` on 127.0.0.1 from a thread; also a context manager.

    ``port`` 0 takes a free port; :meth:`stop` then :meth:`start` again serves
    on the same one. ``tls`` wraps the listening socket (HTTPS).
    ``quiet_errors``: a client that resets its connection (a health check)
    prints no traceback.
    """

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        *,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        quiet_errors: bool = False,
    ) -> None:
        self.handler = handler
        self.port = port
        self.tls = tls
        self.quiet_errors = quiet_errors
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https`` with ``tls``), no trailing slash."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> StubServer:
        httpd = _Server(("127.0.0.1", self.port), self.handler)
        httpd.quiet_errors = self.quiet_errors
        if self.tls is not None:
            httpd.socket = self.tls.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"stub-http-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (kept-alive connections stay open)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        assert self._thread is not None
        self._thread.join()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
