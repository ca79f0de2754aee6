"""The serving layer shared by every Thrift listener (Auth and Posts).

thriftpy2's ``TThreadedServer`` starts an unbounded thread per connection,
leaves Nagle's algorithm on for accepted sockets, does the TLS handshake inside
``accept()`` and drops the connection when a handler raises an exception the
IDL does not declare. :class:`RpcServer` replaces it:

- one accept thread; each connection is served by its own thread, up to
  ``max_connections`` at once (further connections are closed at once);
- ``TCP_NODELAY`` on every accepted socket (a reply over 4 KiB otherwise waits
  for the peer's delayed ACK);
- the TLS handshake runs in the connection's thread, bounded by
  ``handshake_timeout_s``;
- an idle connection is closed after ``idle_timeout_s``;
- an undeclared handler exception becomes ``TApplicationException
  (INTERNAL_ERROR)`` carrying only a request id, logged once with the
  traceback, and the connection stays open;
- :meth:`RpcServer.stop` stops accepting, closes idle connections, lets calls
  in flight finish within a deadline, and joins every thread.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TApplicationException, TDecodeException, TProcessor
from thriftpy2.transport import (
    TCyBufferedTransportFactory,
    TCyFramedTransportFactory,
    TSocket,
    TTransportException,
)

__all__ = [
    "CallContext",
    "RpcServer",
    "ServerSettings",
    "TLSServerConfig",
    "current_call",
]

log = logging.getLogger("auth_rpc.serving")
access_log = logging.getLogger("auth_rpc.access")


@dataclass(frozen=True)
class TLSServerConfig:
    """TLS for a listener; ``client_ca_file`` turns on mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            ctx.load_verify_locations(self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class ServerSettings:
    """Limits of one listener. Times in seconds."""

    max_connections: int = 2048
    idle_timeout_s: float = 300.0
    handshake_timeout_s: float = 5.0
    shutdown_grace_s: float = 10.0
    framed: bool = False
    tls: TLSServerConfig | None = None
    backlog: int = 1024


@dataclass
class CallContext:
    """What a handler may know about the call it serves."""

    method: str
    request_id: str
    peer: tuple[str, int] | None
    peer_cert: dict[str, Any] | None = None
    subject: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "auth_rpc_call", default=None
)


def current_call() -> CallContext | None:
    """The call being served on this thread, or ``None`` outside a call."""
    return _current.get()


def _new_request_id() -> str:
    return os.urandom(8).hex()


class _Connection:
    __slots__ = ("busy", "lock", "peer", "sock", "thread")

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.sock = sock
        self.peer = peer
        self.lock = threading.Lock()
        self.busy = False
        self.thread: threading.Thread | None = None

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _host(conn: _Connection) -> str:
    return str(conn.peer[0]) if isinstance(conn.peer, tuple) else "?"



class _SafeProcessor(TProcessor):  # type: ignore[misc]  # thriftpy2 is untyped
    """A processor that keeps the connection on undeclared handler errors."""

    def process_call(
        self,
        api: str,
        seqid: int,
        result: Any,
        call: Callable[[], Any],
        oprot: Any,
        ctx: CallContext,
    ) -> None:
        started = time.perf_counter()
        outcome = "ok"
        token = _current.set(ctx)
        try:
            result.success = call()
        except TApplicationException as exc:
            outcome = "application_error"
            self.send_exception(oprot, api, exc, seqid)
            return
        except Exception as exc:
            if not self.handle_exception(exc, result):
                outcome = "internal_error"
                log.exception(
                    "undeclared error in %s (request id %s)", api, ctx.request_id
                )
                self.send_exception(
                    oprot,
                    api,
                    TApplicationException(
                        TApplicationException.INTERNAL_ERROR,
                        f"internal error (request id {ctx.request_id})",
                    ),
                    seqid,
                )
                return
            outcome = type(exc).__name__
        finally:
            _current.reset(token)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "call method=%s outcome=%s latency_ms=%.3f subject=%s request_id=%s",
                    api,
                    outcome,
                    (time.perf_counter() - started) * 1000.0,
                    ctx.subject or "-",
                    ctx.request_id,
                )
        if not result.oneway:
            self.send_result(oprot, api, result, seqid)


class RpcServer:
    """A Thrift service on one listening socket.

    ``start()`` binds and listens (``port=0`` picks a free port, readable from
    :attr:`port` afterwards), then serves from background threads;
    ``stop()`` shuts down gracefully. Usable as a context manager.
    """

    def __init__(
        self,
        service: Any,
        handler: object,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: ServerSettings | None = None,
        name: str = "thrift",
        sock: socket.socket | None = None,
    ) -> None:
        self.service = service
        self.handler = handler
        self.host = host
        self._requested_port = port
        self.settings = settings or ServerSettings()
        self.name = name
        self._processor = _SafeProcessor(service, handler)
        self._trans_factory = (
            TCyFramedTransportFactory() if self.settings.framed else TCyBufferedTransportFactory()
        )
        self._proto_factory = TCyBinaryProtocolFactory()
        self._ssl_context = self.settings.tls.context() if self.settings.tls else None
        self._listener: socket.socket | None = sock
        self._accept_thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._stopped = threading.Event()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> RpcServer:
        if self._listener is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self._requested_port))
            listener.listen(self.settings.backlog)
            self._listener = listener
        self._listener.settimeout(0.5)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._listener is not None, "server not started"
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def __enter__(self) -> RpcServer:
        return self.start() if self._accept_thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, close idle connections, let calls in flight finish.

        Connections still busy after ``grace_s`` are cut. Joins every thread.
        """
        if self._closing.is_set():
            self._stopped.wait()
            return
        self._closing.set()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with conn.lock:
                if not conn.busy:
                    conn.shutdown()
        deadline = time.monotonic() + grace
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - time.monotonic()))
        for conn in conns:
            conn.shutdown()
            if conn.thread is not None:
                conn.thread.join()
        self._stopped.set()

    def wait(self) -> None:
        """Block until :meth:`stop` has finished."""
        self._stopped.wait()

    # -- internals ---------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                sock, peer = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if self._closing.is_set():
                    return
                log.warning("accept failed", exc_info=True)
                time.sleep(0.01)  # e.g. EMFILE: do not spin
                continue
            with self._lock:
                if len(self._connections) >= self.settings.max_connections:
                    refused = True
                else:
                    refused = False
                    conn = _Connection(sock, peer)
                    self._connections.add(conn)
            if refused:
                log.warning("connection limit reached; refusing %s", peer[0])
                sock.close()
                continue
            thread = threading.Thread(
                target=self._serve_connection, args=(conn,), name=f"{self.name}-conn", daemon=True
            )
            conn.thread = thread
            thread.start()

    def _serve_connection(self, conn: _Connection) -> None:
        sock = conn.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer_cert = None
            if self._ssl_context is not None:
                sock.settimeout(self.settings.handshake_timeout_s)
                sock = self._ssl_context.wrap_socket(sock, server_side=True)
                conn.sock = sock
                peer_cert = sock.getpeercert() or None
            sock.settimeout(self.settings.idle_timeout_s)
            self._serve_calls(conn, sock, peer_cert)
        except (OSError, TTransportException):
            pass  # the peer went away, timed out, or failed the TLS handshake
        except (TProtocolException, TDecodeException) as exc:
            log.info("closing connection from %s: malformed message (%s)", _host(conn), exc)
        except Exception:
            log.exception("connection from %s failed", _host(conn))
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self._connections.discard(conn)

    def _serve_calls(
        self, conn: _Connection, sock: socket.socket, peer_cert: dict[str, Any] | None
    ) -> None:
        tsock = TSocket(sock=sock)
        itrans = self._trans_factory.get_transport(tsock)
        iprot = self._proto_factory.get_protocol(itrans)
        processor = self._processor
        peer = conn.peer if isinstance(conn.peer, tuple) else None
        while not self._closing.is_set():
            api, seqid, result, call = processor.process_in(iprot)
            with conn.lock:
                conn.busy = True
            try:
                if isinstance(result, TApplicationException):
                    processor.send_exception(iprot, api, result, seqid)
                else:
                    ctx = CallContext(
                        method=api,
                        request_id=_new_request_id(),
                        peer=peer,
                        peer_cert=peer_cert,
                    )
                    processor.process_call(api, seqid, result, call, iprot, ctx)
            finally:
                with conn.lock:
                    conn.busy = False
