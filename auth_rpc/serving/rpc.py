"""The serving layer shared by every Thrift listener (Auth and Posts).

thriftpy2's ``TThreadedServer`` starts an unbounded thread per connection,
leaves Nagle's algorithm on for accepted sockets, does the TLS handshake inside
``accept()`` and drops the connection when a handler raises an exception the
IDL does not declare. :class:`RpcServer` replaces it:

- one accept thread; each connection is served by its own thread, up to
  ``max_connections`` at once and ``max_connections_per_peer`` from one
  source address. When the listener is full, a newcomer closes the
  connection that has been idle longest (waiting for its next message, never
  one in a call); when none is idle, or the peer is over its own cap, the
  newcomer is refused. A refused or evicted connection is answered, before
  any request of it is read, with a ``TApplicationException`` whose message
  starts with :data:`SERVER_BUSY_PREFIX` (:func:`is_server_busy`): the request
  was not run and may be sent again;
- ``TCP_NODELAY`` on every accepted socket (a reply over 4 KiB otherwise waits
  for the peer's delayed ACK);
- the TLS handshake runs in the connection's thread, bounded by
  ``handshake_timeout_s``;
- every incoming message is read and validated by :mod:`auth_rpc.serving.wire`
  against the wire limits (message, string and container sizes, element
  types, nesting) before thriftpy2's Cython codec decodes it; a refused
  message is answered with ``TApplicationException(PROTOCOL_ERROR)`` when its
  header could be read, and its connection closed;
- a new connection must begin its first message within
  ``first_message_timeout_s``, an idle one is closed after ``idle_timeout_s``,
  and a message must arrive whole within ``message_read_timeout_s``
  (slow-drip clients are cut);
- receive buffers grow with the bytes received and shrink back once their
  message is handled; their growth is bounded by a budget shared by the
  listener's connections (``max_buffered_bytes``): a message that does not
  fit is answered "server busy" and its connection closed;
- with mutual TLS the verified client certificate is available to handlers
  as ``current_call().peer_cert`` and ``current_call().peer_identity``;
- behind a TCP proxy (``proxy_protocol_from``), a connection from the proxy
  may begin with a PROXY protocol header (:mod:`auth_rpc.serving.proxy_protocol`),
  read within ``first_message_timeout_s``; ``current_call().peer`` is then the
  client it names (the connection caps still count the proxy's address);
- an undeclared handler exception becomes ``TApplicationException
  (INTERNAL_ERROR)`` carrying only a request id, logged once with the
  traceback, and the connection stays open;
- :meth:`RpcServer.stop` stops accepting, closes idle connections, lets calls
  in flight finish within a deadline, and joins every thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import heapq
import itertools
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from thriftpy2.protocol import TCyBinaryProtocol, TCyBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TMessageType, TProcessor, TType
from thriftpy2.transport import (
    TCyBufferedTransport,
    TCyFramedTransportFactory,
    TCyMemoryBuffer,
    TSocket,
    TTransportException,
)

from auth_rpc.serving.metrics import CallCounts, Snapshot
from auth_rpc.serving.proxy_protocol import (
    ProxyHeaderError,
    begins_with_header,
    is_trusted,
    parse_networks,
    read_header,
)
from auth_rpc.serving.wire import (
    BufferBudget,
    BufferBudgetExceeded,
    Message,
    MessageReader,
    MessageTimeout,
    WireError,
    WireLimits,
    peek_call_header,
)

__all__ = [
    "SERVER_BUSY_PREFIX",
    "SERVER_BUSY_TYPE",
    "CallContext",
    "Preencoded",
    "RpcServer",
    "ServerSettings",
    "TLSServerConfig",
    "current_call",
    "is_server_busy",
]

log = logging.getLogger("auth_rpc.serving.rpc")
access_log = logging.getLogger("auth_rpc.access")

#: The "server busy" answer: a ``TApplicationException`` of this type (UNKNOWN)
#: whose message starts with :data:`SERVER_BUSY_PREFIX`. A listener sends it,
#: as an EXCEPTION message, when it refuses a connection (connection caps) or
#: closes an idle one to make room, and instead of running a message that does
#: not fit its receive-buffer budget. The request was not run: it may be sent
#: again (on a new connection; the server closes this one). Its method name and
#: seqid are the request's when the server has them, else ``""`` and 0.
SERVER_BUSY_TYPE = TApplicationException.UNKNOWN
SERVER_BUSY_PREFIX = "server busy"


def is_server_busy(exc: BaseException) -> bool:
    """True when ``exc`` is a listener's "server busy" answer (the request was not run)."""
    return (
        isinstance(exc, TApplicationException)
        and exc.type == SERVER_BUSY_TYPE
        and isinstance(exc.message, str)
        and exc.message.startswith(SERVER_BUSY_PREFIX)
    )


@dataclass(frozen=True)
class TLSServerConfig:
    """TLS for a listener; ``client_ca_file`` turns on mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """The server context: TLS 1.2 or later, no renegotiation.

        With ``client_ca_file`` a client certificate signed by that CA is
        required (the handshake fails without one). Raises ``OSError`` /
        ``ssl.SSLError`` when a file is missing or does not hold what it should.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Client-initiated renegotiation (TLS 1.2) costs the server a handshake
        # per request of the client's choosing.
        ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            ctx.load_verify_locations(self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class ServerSettings:
    """Limits of one listener. Times in seconds, sizes in bytes.

    The wire limits (``max_message_bytes``, ``max_string_bytes``,
    ``max_container_items``, ``max_nesting_depth``, ``max_message_values``:
    fields and container elements of one message together) bound what one
    incoming call may declare; see :mod:`auth_rpc.serving.wire`. ``idle_timeout_s`` bounds the
    wait for the next call, ``message_read_timeout_s`` the time one call may
    take to arrive once it has begun. A reply is sent under the idle timeout:
    a client that stops reading holds its connection no longer than an idle
    one (and switching timeouts per call would cost two system calls).
    ``first_message_timeout_s`` bounds, from the moment a connection is
    accepted, the wait for its first message to begin (a connection that
    never speaks is cut sooner than an idle one between calls).

    ``max_connections_per_peer`` caps the connections from one source address
    (a newcomer over it is refused); at ``max_connections`` a newcomer closes
    the connection idle longest, or is refused when every one is in a call.
    ``max_buffered_bytes`` is the listener's receive-buffer budget: what
    buffers hold beyond 16 KiB each, summed over its connections (a message
    of ``max_message_bytes`` takes about as much; decoding it takes as much
    again for a moment, outside the budget).
    ``proxy_protocol_from``: the addresses or networks (``10.0.0.5``,
    ``10.0.0.0/24``) of the proxies in front; a connection from one of them
    may begin with a PROXY protocol header naming its client (one that begins
    like a header but is not a valid one is closed unread). Empty (the
    default): no header is read from anybody.
    ``thread_stack_bytes`` sets the stack size of connection threads
    (``None``: the interpreter's default; measured with 1,000 idle
    connections, 256 KiB cuts virtual memory from 8.9 GiB to 1.2 GiB but not
    resident memory, ~44 KiB per connection either way).
    """

    max_connections: int = 2048
    max_connections_per_peer: int = 64
    idle_timeout_s: float = 300.0
    first_message_timeout_s: float = 10.0
    handshake_timeout_s: float = 5.0
    shutdown_grace_s: float = 10.0
    framed: bool = False
    tls: TLSServerConfig | None = None
    backlog: int = 1024
    max_message_bytes: int = 4 * 1024 * 1024
    max_string_bytes: int = 1024 * 1024
    max_container_items: int = 10_000
    max_nesting_depth: int = 64
    max_message_values: int = 100_000
    message_read_timeout_s: float = 10.0
    thread_stack_bytes: int | None = None
    max_buffered_bytes: int = 64 * 1024 * 1024
    proxy_protocol_from: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.wire_limits()  # raises ValueError on a non-positive limit
        parse_networks(self.proxy_protocol_from)  # raises ValueError naming a bad one
        for name in (
            "idle_timeout_s",
            "first_message_timeout_s",
            "handshake_timeout_s",
            "message_read_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_connections", "max_connections_per_peer", "max_buffered_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def wire_limits(self) -> WireLimits:
        """The wire limits as :class:`auth_rpc.serving.wire.WireLimits`."""
        return WireLimits(
            max_message_bytes=self.max_message_bytes,
            max_string_bytes=self.max_string_bytes,
            max_container_items=self.max_container_items,
            max_depth=self.max_nesting_depth,
            max_values=self.max_message_values,
        )


@dataclass
class CallContext:
    """What a handler may know about the call it serves."""

    method: str
    request_id: str
    peer: tuple[str, int] | None
    peer_cert: dict[str, Any] | None = None
    subject: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peer_identity(self) -> str | None:
        """The verified client certificate's identity (mutual TLS), else ``None``.

        The subject's common name when it has one, otherwise the first
        subjectAltName (DNS, URI, email or IP address) in certificate order.
        Only set when the listener requires client certificates: the
        certificate has then been verified against ``client_ca_file``.
        """
        return _cert_identity(self.peer_cert)


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "auth_rpc_call", default=None
)


def current_call() -> CallContext | None:
    """The call being served on this thread, or ``None`` outside a call."""
    return _current.get()


def _cert_identity(cert: dict[str, Any] | None) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "URI", "email", "IP Address") and value:
            return str(value)
    return None


def accept_until(
    listener: socket.socket,
    closing: threading.Event,
    admit: Callable[[socket.socket, Any], None],
) -> None:
    """Accept connections on ``listener`` until ``closing`` is set; ``admit`` takes each.

    ``listener`` must have a timeout (so that ``closing`` is noticed). A
    failing ``accept()`` (e.g. EMFILE) is logged and retried after a short
    pause instead of spinning.
    """
    while not closing.is_set():
        try:
            sock, peer = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            if closing.is_set():
                return
            log.warning("accept failed", exc_info=True)
            closing.wait(0.01)
            continue
        admit(sock, peer)


_request_counter = itertools.count(1)
_request_prefix = os.urandom(4).hex()


def _reseed_request_ids() -> None:  # after fork: each worker its own prefix
    global _request_counter, _request_prefix
    _request_counter = itertools.count(1)
    _request_prefix = os.urandom(4).hex()


os.register_at_fork(after_in_child=_reseed_request_ids)


def _new_request_id() -> str:
    """Unique in practice (random per process, then a counter) and cheap on every call."""
    return f"{_request_prefix}{next(_request_counter):08x}"


class _Connection:
    __slots__ = (
        "busy",
        "closing",
        "evicted",
        "host",
        "idle_since",
        "linger_s",
        "lock",
        "notice",
        "origin",
        "peer",
        "sock",
        "thread",
    )

    def __init__(self, sock: socket.socket, peer: Any, host: str) -> None:
        self.sock = sock
        self.peer = peer
        self.host = host
        self.lock = threading.Lock()
        self.busy = False  # a call is being served
        self.closing = False  # stop() began, or evicted: serve no further call
        self.evicted = False  # closed to make room for a newcomer
        self.idle_since = time.monotonic()  # accepted, or its last call ended
        self.notice: bytes | None = None  # "server busy" answer to send before closing
        self.linger_s = 0.0  # how long to drain what the peer still sends after it
        self.origin: str | None = None  # the client a proxy's PROXY header named, for logs
        self.thread: threading.Thread | None = None

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def interrupt(self) -> None:
        """Wake the connection's thread from its wait for the next message.

        Shuts down reading only (the thread still answers "server busy"), on
        the file descriptor itself: ``SSLSocket.shutdown`` would also drop the
        TLS state under the thread's feet.
        """
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RD)


def _host(conn: _Connection) -> str:
    """The connection's address for the logs (and the proxy's, if it came through one)."""
    return conn.host if conn.origin is None else f"{conn.origin} via {conn.host}"


class Preencoded:
    """A handler's return value together with its encoded ``<method>_result`` struct.

    A handler that returns the same value to many calls (a cached page) can
    return it wrapped in this, made once: the reply is then sent from the
    stored bytes instead of being encoded again on every call. Raises
    thriftpy2's ``TDecodeException`` (or ``TypeError``) when ``value`` does
    not fit the method's return type.
    """

    __slots__ = ("result_bytes", "value")

    def __init__(self, service: Any, method: str, value: Any) -> None:
        result = getattr(service, f"{method}_result")(success=value)
        buf = TCyMemoryBuffer()
        result.write(TCyBinaryProtocol(buf))
        self.value = value
        self.result_bytes: bytes = buf.getvalue()


class _SafeProcessor(TProcessor):
    """A processor that keeps the connection on undeclared handler errors.

    ``process_in`` looks each method's argument and result structs up once,
    at construction, instead of on every call (thriftpy2's own searches the
    service's method list and its argument spec each time).
    """

    def __init__(self, service: Any, handler: object) -> None:
        super().__init__(service, handler)
        self._methods: dict[str, tuple[Any, Any, tuple[str, ...]]] = {}
        for api in service.thrift_services:
            args_cls = getattr(service, f"{api}_args")
            names = tuple(item[1] for item in args_cls.thrift_spec.values())
            self._methods[api] = (args_cls, getattr(service, f"{api}_result"), names)

    def process_in(self, iprot: Any) -> tuple[str, int, Any, Callable[[], Any] | None]:
        """Decode one call: ``(method, seqid, result struct, call)``, as thriftpy2's does."""
        api, _, seqid = iprot.read_message_begin()
        entry = self._methods.get(api)
        if entry is None:
            iprot.skip(TType.STRUCT)
            iprot.read_message_end()
            return api, seqid, TApplicationException(TApplicationException.UNKNOWN_METHOD), None
        args_cls, result_cls, names = entry
        args = args_cls()
        args.read(iprot)
        iprot.read_message_end()
        values = args.__dict__
        handler = self._handler

        def call() -> Any:
            return getattr(handler, api)(*[values[name] for name in names])

        return api, seqid, result_cls(), call

    #: Where calls are counted (:class:`~auth_rpc.serving.metrics.CallCounts`), or None.
    counts: CallCounts | None = None

    def process_call(
        self,
        api: str,
        seqid: int,
        result: Any,
        call: Callable[[], Any],
        oprot: Any,
        ctx: CallContext,
    ) -> None:
        """Run one call and send its reply; write one access-log line.

        Raises ``OSError`` or ``TTransportException`` when the reply cannot be
        sent (the caller closes the connection).
        """
        logged = access_log.isEnabledFor(logging.INFO)
        counts = self.counts
        started = time.perf_counter() if logged or counts is not None else 0.0
        outcome = "ok"
        reply_exc: TApplicationException | None = None
        token = _current.set(ctx)
        try:
            result.success = call()
        except TApplicationException as exc:
            outcome = "application_error"
            reply_exc = exc
        except Exception as exc:
            if self.handle_exception(exc, result):
                outcome = type(exc).__name__
            else:
                outcome = "internal_error"
                log.exception("undeclared error in %s (request id %s)", api, ctx.request_id)
                reply_exc = _internal_error(ctx)
        finally:
            _current.reset(token)
        try:
            if reply_exc is not None:
                self.send_exception(oprot, api, reply_exc, seqid)
            elif getattr(result, "success", None).__class__ is Preencoded:
                # A reply encoded once and sent many times (e.g. a cached page).
                oprot.write_message_begin(api, TMessageType.REPLY, seqid)
                oprot.trans.write(result.success.result_bytes)
                oprot.write_message_end()
                oprot.trans.flush()
            elif not result.oneway:
                try:
                    self.send_result(oprot, api, result, seqid)
                except (OSError, TTransportException):
                    raise
                except Exception:
                    # The handler returned something the IDL type cannot encode.
                    outcome = "internal_error"
                    log.exception("unencodable reply of %s (request id %s)", api, ctx.request_id)
                    self.send_exception(oprot, api, _internal_error(ctx), seqid)
        except (OSError, TTransportException):
            outcome = f"{outcome}+reply_failed"
            raise
        finally:
            if counts is not None or logged:
                elapsed = time.perf_counter() - started
                if counts is not None:
                    counts.record(api, outcome, elapsed)
                if logged:
                    log_access((api, outcome, elapsed * 1000.0, ctx.subject or "-", ctx.request_id))


#: The access line of a call (logger ``auth_rpc.access``, INFO).
ACCESS_MESSAGE = "call method=%s outcome=%s latency_ms=%.3f subject=%s request_id=%s"
#: The text format of ``configure_logging`` (:mod:`auth_rpc.serving.runner`).
TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _direct_handlers(logger: logging.Logger) -> list[logging.StreamHandler[Any]] | None:
    """The handlers an INFO record of ``logger`` reaches, when the line can be written directly.

    That is when every handler it reaches (following propagation, as
    ``Logger.callHandlers`` does) is a plain ``logging.StreamHandler`` without
    filters whose formatter is a plain ``logging.Formatter`` with
    :data:`TEXT_LOG_FORMAT` and the default time format, no logger on the way
    has a filter, and records are ``logging.LogRecord``: then the line
    :func:`log_access` builds is byte for byte what logging would write.
    ``None`` otherwise (and when no handler is reached: logging's last resort).
    """
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    if logging.getLevelName(logging.INFO) != "INFO":
        return None
    found: list[logging.StreamHandler[Any]] = []
    reached = 0
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            reached += 1
            if handler.level > logging.INFO:
                continue  # writes nothing for this record
            formatter = handler.formatter
            if (
                handler.__class__ is not logging.StreamHandler
                or handler.filters
                or formatter is None
                or formatter.__class__ is not logging.Formatter
                or formatter._fmt != TEXT_LOG_FORMAT
                or formatter._style.__class__ is not logging.PercentStyle
                or formatter.datefmt is not None
                or formatter.converter is not time.localtime
                or formatter.default_time_format != "%Y-%m-%d %H:%M:%S"
                or formatter.default_msec_format != "%s,%03d"
            ):
                return None
            found.append(handler)
        current = current.parent if current.propagate else None
    return found if reached else None


_asctime_cache: tuple[int, str] = (-1, "")


def _asctime(now: float) -> str:
    """``Formatter.formatTime`` of a record made at ``now``, default formats (cached per second)."""
    global _asctime_cache
    second = int(now)
    cached_second, text = _asctime_cache
    if cached_second != second:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        _asctime_cache = (second, text)
    return "%s,%03d" % (text, int((now - second) * 1000))  # noqa: UP031 - logging's own format


def log_access(args: tuple[Any, ...], *, now: float | None = None) -> None:
    """Log a call's access line (:data:`ACCESS_MESSAGE` with ``args``) on ``auth_rpc.access``.

    With the text format of ``configure_logging`` the line is written to the
    handlers' streams directly, as ``StreamHandler.emit`` does (under each
    handler's lock, then flushed), without a ``LogRecord``: about 3 us
    instead of 10. Any other configuration (other handlers or formatters,
    filters, the JSON format, tests capturing records) goes through
    ``Logger.info``. The caller has checked that INFO is enabled. ``now``
    (``time.time()`` by default) is for tests.
    """
    handlers = _direct_handlers(access_log)
    if handlers is None:
        access_log.info(ACCESS_MESSAGE, *args)
        return
    created = time.time() if now is None else now
    line = f"{_asctime(created)} INFO {access_log.name} {ACCESS_MESSAGE % args}"
    for handler in handlers:
        handler.acquire()
        try:
            handler.stream.write(line + handler.terminator)
            handler.flush()
        except RecursionError:
            raise
        except Exception:
            record = access_log.makeRecord(
                access_log.name, logging.INFO, "(unknown file)", 0, ACCESS_MESSAGE, args, None
            )
            handler.handleError(record)
        finally:
            handler.release()


def _internal_error(ctx: CallContext) -> TApplicationException:
    # The client learns only the request id; the details are in the server log.
    return TApplicationException(
        TApplicationException.INTERNAL_ERROR, f"internal error (request id {ctx.request_id})"
    )


class RpcServer:
    """A Thrift service on one listening socket.

    ``start()`` binds and listens (``port=0`` picks a free port, readable from
    :attr:`port` afterwards), then serves from background threads;
    ``stop()`` shuts down gracefully. Usable as a context manager.

    ``buffer_budget`` shares one receive-buffer budget between listeners of a
    process (default: a budget of ``settings.max_buffered_bytes`` of its own).

    ``counts`` (a :class:`~auth_rpc.serving.metrics.CallCounts`) turns on
    counting: calls by method and outcome, latencies, connections accepted
    and refused, messages refused; :meth:`metrics_snapshot` reads them for a
    :class:`~auth_rpc.serving.metrics.ServiceMetrics`. Without it nothing is
    counted.
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
        buffer_budget: BufferBudget | None = None,
        counts: CallCounts | None = None,
    ) -> None:
        self.service = service
        self.handler = handler
        self.host = host
        self._requested_port = port
        self.settings = settings or ServerSettings()
        self.name = name
        self._processor = _SafeProcessor(service, handler)
        self.counts = counts
        self._processor.counts = counts
        # A reply bigger than the write buffer leaves in two sends: 16 KiB holds
        # a page of posts in one.
        self._trans_factory = (
            TCyFramedTransportFactory()
            if self.settings.framed
            else _BufferedTransportFactory()
        )
        self._proto_factory = TCyBinaryProtocolFactory()
        self._limits = self.settings.wire_limits()
        self._decode_factory = TCyBinaryProtocolFactory(
            strict_decode=True, max_depth=self._limits.max_depth
        )
        self._ssl_context = self.settings.tls.context() if self.settings.tls else None
        self._proxies = parse_networks(self.settings.proxy_protocol_from)
        self._listener: socket.socket | None = sock
        self._owns_listener = sock is None
        self._port: int | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._per_peer: dict[str, int] = {}  # connections (evicted ones included) per address
        self._evicting = 0  # evicted connections not yet gone
        # Idle connections, oldest first, as of the last look (entries whose
        # connection was used since are skipped): see _evict_oldest_idle_locked.
        self._idle_order: list[tuple[float, int, _Connection]] = []
        self._idle_tiebreak = itertools.count()
        self._budget = buffer_budget or BufferBudget(self.settings.max_buffered_bytes)
        self._reports: dict[str, list[Any]] = {}  # rate-limited log lines: kind -> [count, due]
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._stopped = threading.Event()

    def _decoder(self, mem: Any) -> Any:
        """A protocol decoding validated messages from the memory buffer ``mem``.

        ``strict_decode``: a ``string`` argument that is not UTF-8 is refused
        rather than handed to the handler as ``bytes``.
        """
        return self._decode_factory.get_protocol(mem)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> RpcServer:
        tune_malloc()
        if self._listener is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self._requested_port))
            listener.listen(self.settings.backlog)
            self._listener = listener
        self._listener.settimeout(0.5)
        self._port = int(self._listener.getsockname()[1])
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    @property
    def port(self) -> int:
        """The bound port (still readable after :meth:`stop`)."""
        assert self._port is not None, "server not started"
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def metrics_snapshot(self) -> Snapshot:
        """The listener's counts (needs ``counts``), with the connections open now."""
        if self.counts is None:
            return {}
        snapshot = self.counts.snapshot()
        snapshot["thrift_connections_open"] = {(): self.connection_count}
        return snapshot

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the receive-buffer budget in use (buffers' growth beyond 16 KiB)."""
        return self._budget.used_bytes

    def __enter__(self) -> RpcServer:
        return self.start() if self._accept_thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, close idle connections, let calls in flight finish.

        New connections are refused from the moment ``stop`` begins. Calls in
        flight get until ``grace_s`` (default ``settings.shutdown_grace_s``)
        to finish and send their replies; connections still busy after that
        are cut. Joins every thread. Safe to call more than once.
        """
        if self._closing.is_set():
            self._stopped.wait()
            return
        self._closing.set()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        if self._listener is not None and self._owns_listener:
            # Wakes accept() at once; further connection attempts are refused.
            # Not on a socket given to us: pre-forked workers share it, and a
            # shutdown would end accepting in every one of them.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with conn.lock:
                conn.closing = True
                if not conn.busy:
                    conn.shutdown()
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
        accept_until(self._listener, self._closing, self._admit)

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        """Serve an accepted connection in its own thread, or refuse it (caps, stopping).

        At ``max_connections`` the connection idle longest is closed to make
        room; a newcomer is refused when its address is at
        ``max_connections_per_peer`` or when no connection is idle.
        """
        host = str(peer[0]) if isinstance(peer, tuple) else "?"
        settings = self.settings
        victim: _Connection | None = None
        refusal: str | None = None
        with self._lock:
            if self._closing.is_set():
                refusal = ""  # stopping: closed without an answer
            elif self._per_peer.get(host, 0) >= settings.max_connections_per_peer:
                refusal = "too many connections from this address"
            elif len(self._connections) - self._evicting >= settings.max_connections:
                victim = self._evict_oldest_idle_locked()
                if victim is None:
                    refusal = "connection limit reached, every connection in a call"
            if refusal is None:
                conn = _Connection(sock, peer, host)
                self._connections.add(conn)
                self._per_peer[host] = self._per_peer.get(host, 0) + 1
        counts = self.counts
        if counts is not None:
            if refusal is None:
                counts.connections += 1
                if victim is not None:
                    counts.refused.add("evicted_idle")
            elif refusal:
                counts.refused.add(
                    "peer_limit" if refusal.endswith("this address") else "connection_limit"
                )
        if refusal is not None:
            if refusal:
                self._report("refused", f"refusing connections ({refusal})", host)
                self._refuse(sock, refusal)
            else:
                sock.close()
            return
        if victim is not None:
            self._report("evicted", "closing idle connections to make room", victim.host)
            victim.interrupt()
        stack_bytes = self.settings.thread_stack_bytes
        thread = threading.Thread(
            target=self._serve_connection, args=(conn,), name=f"{self.name}-conn", daemon=True
        )
        conn.thread = thread
        try:
            if stack_bytes is None:
                thread.start()
            else:
                with _STACK_SIZE_LOCK:
                    previous = threading.stack_size(stack_bytes)
                    try:
                        thread.start()
                    finally:
                        threading.stack_size(previous)
        except RuntimeError:  # cannot start a thread: out of resources
            log.warning("cannot start a connection thread; refusing %s", host)
            if counts is not None:
                counts.refused.add("no_thread")
            with self._lock:
                self._forget_locked(conn)
            self._refuse(sock, "cannot start a connection thread")

    def _evict_oldest_idle_locked(self) -> _Connection | None:
        """Mark the connection idle longest as evicted and return it; ``None`` if none is idle.

        Idle: waiting for its next message (or its first), not in a call. The
        order is a heap made from every connection when the previous one runs
        out; entries whose connection has been used since (its ``idle_since``
        changed) are skipped, so a burst of newcomers costs O(log n) each.
        Called with ``self._lock`` held.
        """
        for fresh in (False, True):
            if fresh:
                self._idle_order = [
                    (c.idle_since, next(self._idle_tiebreak), c)
                    for c in self._connections
                    if not c.busy and not c.closing
                ]
                heapq.heapify(self._idle_order)
            order = self._idle_order
            while order:
                since, _, conn = heapq.heappop(order)
                if conn.idle_since != since or conn not in self._connections:
                    continue
                with conn.lock:
                    if conn.busy or conn.closing or conn.idle_since != since:
                        continue
                    conn.closing = conn.evicted = True
                self._evicting += 1
                return conn
        return None

    def _forget_locked(self, conn: _Connection) -> None:
        """Remove ``conn`` from the books (``self._lock`` held)."""
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        left = self._per_peer[conn.host] - 1
        if left:
            self._per_peer[conn.host] = left
        else:
            del self._per_peer[conn.host]
        if conn.evicted:
            self._evicting -= 1

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        """Answer "server busy" on a connection that gets no thread, and close it.

        Runs in the accept thread, so nothing here may block: the request, if
        it has already arrived, is read without waiting (its method name and
        seqid go into the answer; it is not run), the answer fits in an empty
        socket buffer, and the socket is closed at once. On a TLS listener the
        connection is closed without an answer (no handshake in this thread):
        the client sees its connection fail before sending anything.
        """
        try:
            if self._ssl_context is None:
                sock.setblocking(False)
                try:
                    head = sock.recv(_PEEK_BYTES)
                except (BlockingIOError, InterruptedError):
                    head = b""
                framed = self.settings.framed
                method, seqid = peek_call_header(memoryview(head)[4:] if framed else head)
                answer = f"{reason}; the request was not read"
                sock.send(_busy_notice(method, seqid, answer, framed))
                sock.shutdown(socket.SHUT_WR)
                _drain(sock, 0.0)
        except OSError:
            pass
        finally:
            sock.close()

    def _report(self, kind: str, what: str, host: str) -> None:
        """Log ``what`` at most once a second per ``kind``, with a count (an attack floods)."""
        now = time.monotonic()
        entry = self._reports.setdefault(kind, [0, 0.0])
        entry[0] += 1
        if now >= entry[1]:
            log.warning("%s: %d connection(s) since the last report, latest from %s",
                        what, entry[0], host)
            entry[0] = 0
            entry[1] = now + 1.0

    def _serve_connection(self, conn: _Connection) -> None:
        sock = conn.sock
        host = _host(conn)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._proxies and is_trusted(conn.host, self._proxies):
                self._read_proxy_header(conn)
                host = _host(conn)
            peer_cert = None
            if self._ssl_context is not None:
                sock.settimeout(self.settings.handshake_timeout_s)
                sock = self._ssl_context.wrap_socket(sock, server_side=True)
                conn.sock = sock
                peer_cert = sock.getpeercert() or None
            self._serve_calls(conn, sock, peer_cert)
        except BufferBudgetExceeded as exc:
            self._report("budget", f"refusing messages ({exc.reason})", host)
        except ProxyHeaderError as exc:
            self._report("proxy", f"closing connections from a proxy: {exc}", host)
        except WireError as exc:
            log.info("refused message from %s: %s", host, exc.reason)
        except MessageTimeout:
            log.info("closing connection from %s: message read deadline exceeded", host)
        except ssl.SSLError as exc:
            log.info("TLS failure with %s: %s", host, exc.reason or exc.__class__.__name__)
        except TimeoutError:
            log.debug("closing idle or silent connection from %s", host)
        except (OSError, TTransportException):
            pass  # the peer went away or the server is stopping
        except Exception:
            log.exception("connection from %s failed", host)
        finally:
            notice = conn.notice
            if notice is None and conn.evicted:
                notice = _busy_notice(
                    None, None, "idle connection closed to make room", self.settings.framed
                )
            if notice is not None:
                _send_notice(sock, notice, conn.linger_s)
            # One connection at a time closes and leaves: thousands of threads
            # ending at once (their peers all gone) otherwise convoy on the GIL
            # and starve the calls being served for seconds.
            with _TEARDOWN_GATE:
                with contextlib.suppress(OSError):
                    sock.close()
                with self._lock:
                    self._forget_locked(conn)

    def _read_proxy_header(self, conn: _Connection) -> None:
        """Read the PROXY header a trusted proxy's connection begins with, if any (before TLS).

        Within what is left of the first-message deadline; the connection's
        peer becomes the client the header names (a ``LOCAL`` header, such as
        a health check's, names none: the proxy stays the peer).
        """
        sock = conn.sock
        timeout = sock.gettimeout()
        left = conn.idle_since + self.settings.first_message_timeout_s - time.monotonic()
        sock.settimeout(max(0.001, left))
        try:
            if not begins_with_header(sock.recv(1, socket.MSG_PEEK)):
                return  # the proxy's own connection (or closed: the reader sees it)
            source = read_header(sock)
        finally:
            sock.settimeout(timeout)
        if source is not None:
            conn.peer = source
            conn.origin = source[0]

    def _serve_calls(
        self, conn: _Connection, sock: socket.socket, peer_cert: dict[str, Any] | None
    ) -> None:
        settings = self.settings
        # The first message must begin within first_message_timeout_s of the accept.
        first_wait = conn.idle_since + settings.first_message_timeout_s - time.monotonic()
        reader = MessageReader(
            sock,
            self._limits,
            framed=settings.framed,
            idle_timeout_s=max(0.001, min(first_wait, settings.idle_timeout_s)),
            message_timeout_s=settings.message_read_timeout_s,
            budget=self._budget,
        )
        first = True
        otrans = self._trans_factory.get_transport(
            _ReplySink(sock, reader) if reader.kernel_timeouts else TSocket(sock=sock)
        )
        oprot = self._proto_factory.get_protocol(otrans)
        mem = TCyMemoryBuffer()
        iprot = self._decoder(mem)
        processor = self._processor
        peer = conn.peer if isinstance(conn.peer, tuple) else None
        host = _host(conn)
        closing = self._closing
        try:
            while not closing.is_set():
                try:
                    message = reader.read_message()
                except BufferBudgetExceeded as exc:
                    if self.counts is not None:
                        self.counts.refused_messages.add("busy")
                    # Busy, not malformed: the client may send it again later.
                    conn.notice = _busy_notice(
                        exc.method, exc.seqid, f"{exc.reason}; the request was not run",
                        settings.framed,
                    )
                    conn.linger_s = _LINGER_S  # let it finish sending, then read the answer
                    raise
                except WireError as exc:
                    if self.counts is not None:
                        self.counts.refused_messages.add("wire_limit")
                    if exc.method is not None and exc.seqid is not None:
                        reader.set_timeout(_REFUSAL_WRITE_TIMEOUT_S)
                        _answer_refusal(processor, oprot, exc.method, exc.seqid, exc.reason)
                    raise
                if message is None:
                    return  # the peer closed between calls
                if first:
                    first = False
                    reader.set_idle_timeout(settings.idle_timeout_s)
                with conn.lock:
                    if conn.closing:
                        # stop() began, or a newcomer evicted this connection,
                        # while this call was arriving: it is not run.
                        if conn.evicted:
                            conn.notice = _busy_notice(
                                message.method,
                                message.seqid,
                                "idle connection closed to make room; the request was not run",
                                settings.framed,
                            )
                        return
                    conn.busy = True
                try:
                    self._handle(message, mem, iprot, oprot, peer, peer_cert, host=host)
                finally:
                    with conn.lock:
                        conn.busy = False
                        conn.idle_since = time.monotonic()
        finally:
            reader.close()

    def _handle(
        self,
        message: Message,
        mem: Any,
        iprot: Any,
        oprot: Any,
        peer: tuple[str, int] | None,
        peer_cert: dict[str, Any] | None,
        *,
        host: str,
    ) -> None:
        processor = self._processor
        payload = message.payload
        if len(payload) > _REUSE_DECODE_BUFFER:
            # Do not keep a large decode buffer alive for the connection's lifetime.
            mem = TCyMemoryBuffer()
            iprot = self._decoder(mem)
        mem.write(payload)
        payload.release()
        try:
            api, seqid, result, call = processor.process_in(iprot)
        except Exception as exc:
            # The message is well framed (validated), so the connection can
            # stay: e.g. a string field that is not UTF-8.
            if self.counts is not None:
                self.counts.refused_messages.add("undecodable")
            reason = f"undecodable arguments ({type(exc).__name__})"
            log.info("refused call %s from %s: %s", message.method, host, reason)
            _answer_refusal(processor, oprot, message.method, message.seqid, reason)
            return
        finally:
            mem.clean()
        # Drop the decode buffer (a large one is this call's own) now: an
        # exception the handler raises holds this frame in a reference cycle
        # until the cyclic GC runs, and a 4 MiB buffer with it.
        mem = iprot = None
        if isinstance(result, TApplicationException) or call is None:
            if self.counts is not None:
                self.counts.refused_messages.add("unknown_method")
            processor.send_exception(oprot, api, result, seqid)
            return
        ctx = CallContext(
            method=api,
            request_id=_new_request_id(),
            peer=peer,
            peer_cert=peer_cert,
        )
        processor.process_call(api, seqid, result, call, oprot, ctx)


class _ReplySink:
    """The socket end of a connection's reply transport, with kernel timeouts.

    Each reply must leave within the timeout in force when it is sent, as
    with a Python socket timeout (``sendall`` under one deadline): one
    ``send`` takes a reply that fits the socket buffer; a reply that does not
    is sent in pieces, each with what is left of the time.
    """

    __slots__ = ("_reader", "_sock")

    def __init__(self, sock: socket.socket, reader: MessageReader) -> None:
        self._sock = sock
        self._reader = reader

    def write(self, data: bytes) -> None:
        started = time.monotonic()
        try:
            sent = self._sock.send(data)
        except BlockingIOError:  # SO_SNDTIMEO expired
            raise TimeoutError("reply not sent within the timeout") from None
        if sent != len(data):
            self._send_rest(memoryview(data)[sent:], started)

    def _send_rest(self, rest: memoryview, started: float) -> None:
        reader = self._reader
        timeout = reader.timeout or 0.0
        deadline = started + timeout
        with rest:
            while rest:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("reply not sent within the timeout")
                if remaining < timeout:
                    reader.set_timeout(remaining)  # the next read sets its own again
                try:
                    sent = self._sock.send(rest)
                except BlockingIOError:
                    raise TimeoutError("reply not sent within the timeout") from None
                rest = rest[sent:]

    def flush(self) -> None:
        pass

    def is_open(self) -> bool:
        return True

    def close(self) -> None:
        pass  # the connection's owner closes the socket


_REUSE_DECODE_BUFFER = 128 * 1024
_WRITE_BUFFER_BYTES = 16 * 1024


class _BufferedTransportFactory:
    """thriftpy2's buffered transport with a write buffer of ``_WRITE_BUFFER_BYTES``."""

    def get_transport(self, trans: Any) -> Any:
        return TCyBufferedTransport(trans, buf_size=_WRITE_BUFFER_BYTES)
_REFUSAL_WRITE_TIMEOUT_S = 1.0
_STACK_SIZE_LOCK = threading.Lock()
_TEARDOWN_GATE = threading.Lock()
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MMAP_THRESHOLD_BYTES = 1024 * 1024
_malloc_tuned: bool | None = None
_MALLOC_LOCK = threading.Lock()


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at 1 MiB, once per process; whether it is in effect.

    glibc raises its threshold to the size of the first mmapped block freed
    (a 4 MiB receive or decode buffer, a 19 MiB argon2 buffer), so later large
    buffers come from a thread's malloc arena and stay resident once freed:
    after one 4 MiB call on each of 48 connections, posts-rpc kept ~100 MiB
    that way even with every buffer released, and Auth ~500 MiB after 100
    concurrent failed logins. A fixed threshold also stops the adaptation, so
    blocks of 1 MiB or more are unmapped when freed. Used by the listeners and
    by password hashing; a no-op returning ``False`` elsewhere than glibc.
    """
    global _malloc_tuned
    with _MALLOC_LOCK:
        if _malloc_tuned is None:
            _malloc_tuned = False
            try:
                if (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
                    mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
                    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                    mallopt.restype = ctypes.c_int
                    _malloc_tuned = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
            except (AttributeError, ValueError, OSError):
                pass
        return _malloc_tuned


#: What a refused connection may already have sent that is read for its header.
_PEEK_BYTES = 64 * 1024
#: How long a connection refused mid-message (budget) is drained before closing.
_LINGER_S = 2.0


def _busy_notice(method: str | None, seqid: int | None, reason: str, framed: bool) -> bytes:
    """The bytes of a "server busy" EXCEPTION message (see :data:`SERVER_BUSY_PREFIX`)."""
    buf = TCyMemoryBuffer()
    proto = TCyBinaryProtocol(buf)
    proto.write_message_begin(method or "", TMessageType.EXCEPTION, seqid or 0)
    TApplicationException(SERVER_BUSY_TYPE, f"{SERVER_BUSY_PREFIX}: {reason}").write(proto)
    proto.write_message_end()
    data: bytes = buf.getvalue()
    return struct.pack("!i", len(data)) + data if framed else data


def _send_notice(sock: socket.socket, notice: bytes, linger_s: float) -> None:
    """Send ``notice``, half-close, and read what the peer still sends for ``linger_s``.

    Closing a socket with unread bytes resets the connection, which may
    destroy the notice before the peer reads it; draining first avoids that.
    """
    with contextlib.suppress(OSError, ValueError):
        sock.settimeout(_REFUSAL_WRITE_TIMEOUT_S)
        sock.sendall(notice)
        sock.shutdown(socket.SHUT_WR)
        _drain(sock, linger_s)


def _drain(sock: socket.socket, linger_s: float) -> None:
    """Read and discard until the peer closes, for at most ``linger_s`` (0: what is there)."""
    scratch = bytearray(65536)
    deadline = time.monotonic() + linger_s
    with contextlib.suppress(OSError, ValueError):
        while True:
            remaining = deadline - time.monotonic()
            if remaining > 0:
                sock.settimeout(remaining)
            else:
                sock.setblocking(False)
            if sock.recv_into(scratch) == 0:
                return


def _answer_refusal(processor: Any, oprot: Any, method: str, seqid: int, reason: str) -> None:
    """Answer a refused message with ``TApplicationException(PROTOCOL_ERROR)``."""
    # If the peer is gone, there is no one to tell: the connection is closed anyway.
    with contextlib.suppress(OSError, TTransportException):
        processor.send_exception(
            oprot,
            method,
            TApplicationException(
                TApplicationException.PROTOCOL_ERROR, f"message refused: {reason}"
            ),
            seqid,
        )
