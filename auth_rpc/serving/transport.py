"""Opening Thrift client connections: buffered or framed, plain or TLS.

thriftpy2's own client TLS context turns hostname checking off; here a TLS
client always verifies the server certificate *and* its hostname, unless the
caller passes an ``ssl.SSLContext`` of its own.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Any

from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.thrift import TClient
from thriftpy2.transport import (
    TCyBufferedTransportFactory,
    TCyFramedTransportFactory,
    TSocket,
)

__all__ = ["TLSClientConfig", "is_timeout", "open_client", "parse_hostport"]


@dataclass(frozen=True)
class TLSClientConfig:
    """TLS for a client: CA to trust, optional client certificate (mutual TLS)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None  # defaults to the host connected to

    def __post_init__(self) -> None:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file given without cert_file")

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the server certificate and its hostname.

        ``ca_file`` ``None`` trusts the system's CAs. Raises ``OSError`` /
        ``ssl.SSLError`` when a file is missing or malformed.
        """
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a read or write timing out (Python's, or the kernel's ``EAGAIN``)."""
    return isinstance(exc, (TimeoutError, BlockingIOError))


def parse_hostport(value: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``, or ``":port"``) as a pair.

    Raises ``ValueError`` when the port is missing, not a number or out of range.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {value!r}")
    host = host.strip("[]") or default_host
    return host, port


def open_client(
    service: Any,
    host: str,
    port: int,
    *,
    framed: bool = False,
    tls: TLSClientConfig | ssl.SSLContext | None = None,
    timeout_s: float = 5.0,
    connect_timeout_s: float = 2.0,
    kernel_timeouts: bool = False,
) -> Any:
    """Connect to ``service`` at ``host:port`` and return a thriftpy2 client.

    Raises ``OSError`` (including ``ssl.SSLError`` and ``TimeoutError``) when
    the connection or the TLS handshake fails. Close it with ``client.close()``.

    Each read and write is bounded by ``timeout_s``. With ``kernel_timeouts``
    (plain TCP only; TLS keeps Python's), the bound is the kernel's
    (``SO_RCVTIMEO``/``SO_SNDTIMEO`` on a blocking socket) instead of Python's
    socket timeout, which polls before every send and receive: half the system
    calls, and half the GIL hand-offs, of a call. A read or write over the
    bound then raises :func:`is_timeout` errors (``EAGAIN``), not ``TimeoutError``.
    """
    sock = socket.create_connection((host, port), timeout=connect_timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            if isinstance(tls, TLSClientConfig):
                ctx, hostname = tls.context(), tls.server_hostname or host
            else:
                ctx, hostname = tls, host
            sock = ctx.wrap_socket(sock, server_hostname=hostname)
            sock.settimeout(timeout_s)
        elif kernel_timeouts:
            seconds = int(timeout_s)
            timeval = struct.pack("ll", seconds, max(1, int((timeout_s - seconds) * 1e6)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.settimeout(None)
        else:
            sock.settimeout(timeout_s)
    except BaseException:
        sock.close()
        raise
    tsock = TSocket(sock=sock)
    factory = TCyFramedTransportFactory() if framed else TCyBufferedTransportFactory()
    trans = factory.get_transport(tsock)
    proto = TCyBinaryProtocolFactory().get_protocol(trans)
    return TClient(service, proto)
