"""The PROXY protocol (versions 1 and 2): a client's address, told by the proxy in front.

Behind a TCP proxy (HAProxy in ``mode tcp``) every connection comes from the
proxy's address, so whatever a service decides per source address (the Auth
service's password-hashing admission, the logs) would see one client. With
``send-proxy-v2`` (or ``send-proxy``, version 1, as nginx's stream module
sends) the proxy writes a header before the client's first byte naming the
client's address. A listener reads it only from the proxies it is told to
trust (:func:`parse_networks`; ``--proxy-protocol-from``); anybody else's
bytes are Thrift from the first one, so a client cannot claim an address by
sending a header of its own. From a trusted proxy the header may be absent
(:func:`begins_with_header`: a Thrift message, framed or not, and a TLS
handshake begin with other bytes): the connection is then the proxy's own,
as a direct connection from the proxy's host would be; one that begins like
a header but is not a valid one is closed unread.

:func:`read_header` reads exactly the header and nothing after it. A
``LOCAL`` header (version 2: the proxy's own connection, e.g. a health
check) or ``UNKNOWN`` (version 1) names no client: the connection keeps the
proxy's address. Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence

__all__ = [
    "V2_SIGNATURE",
    "IPNetwork",
    "ProxyHeaderError",
    "begins_with_header",
    "encode_v2",
    "is_trusted",
    "parse_networks",
    "read_header",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The 12 bytes every version 2 header begins with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V1_MAX = 107  # the longest version 1 line, CRLF included
_V2_MAX_ADDRESSES = 2048  # more than any address block and its TLVs need
_FAMILIES = {0x11: (socket.AF_INET, 4), 0x21: (socket.AF_INET6, 16)}  # TCP over IPv4 / IPv6


class ProxyHeaderError(ValueError):
    """A connection from a trusted proxy did not begin with a valid PROXY header."""


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``10.0.0.5``, ``10.0.0.0/24``, ``::1``...: the networks whose connections carry a header.

    Raises ``ValueError`` naming a value that is not an address or network.
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
            ) from None
    return tuple(networks)


def is_trusted(host: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether a connection from ``host`` (an address as ``accept`` gives it) is a proxy's."""
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def begins_with_header(first_byte: bytes) -> bool:
    """Whether a connection whose first byte is ``first_byte`` begins with a PROXY header.

    A header begins with ``\\r`` (version 2) or ``P`` (version 1). Nothing a Thrift
    client sends first does: a strict binary message begins with ``0x80``, a framed
    one with its length's high byte (``0x00`` below 16 MiB; ``\\r`` or ``P`` would
    announce over 200 MiB, beyond any listener's limit), a TLS handshake with ``0x16``.
    """
    return first_byte in (b"\r", b"P")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProxyHeaderError(f"connection closed after {len(data)} byte(s) of the header")
        data += chunk
    return bytes(data)


def read_header(sock: socket.socket) -> tuple[str, int] | None:
    """Read one PROXY header from ``sock`` (blocking, under the socket's timeout).

    Returns the client's ``(address, port)``, or ``None`` for ``LOCAL`` /
    ``UNKNOWN`` (no client named). Raises :class:`ProxyHeaderError` when the
    bytes are not a header, ``TimeoutError``/``OSError`` as the socket does.
    """
    start = _recv_exactly(sock, len(V2_SIGNATURE))
    if start == V2_SIGNATURE:
        return _read_v2(sock)
    if start.startswith(_V1_PREFIX):
        return _read_v1(sock, start)
    raise ProxyHeaderError("no PROXY protocol header (is the proxy sending one?)")


def _read_v2(sock: socket.socket) -> tuple[str, int] | None:
    version_command, family, length = struct.unpack("!BBH", _recv_exactly(sock, 4))
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY version {version_command >> 4}, not 2")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 command {command}: neither LOCAL nor PROXY")
    if length > _V2_MAX_ADDRESSES:
        raise ProxyHeaderError(f"PROXY v2 address block of {length} bytes")
    block = _recv_exactly(sock, length)
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return None
    if family not in _FAMILIES:
        if family == 0x00:  # UNSPEC: no address to tell
            return None
        raise ProxyHeaderError(f"PROXY v2 address family 0x{family:02x}: not TCP over IP")
    af, size = _FAMILIES[family]
    if length < 2 * size + 4:
        raise ProxyHeaderError(
            f"PROXY v2 address block of {length} bytes for family 0x{family:02x}"
        )
    address = socket.inet_ntop(af, block[:size])
    (port,) = struct.unpack("!H", block[2 * size : 2 * size + 2])
    return address, port


def _read_v1(sock: socket.socket, start: bytes) -> tuple[str, int] | None:
    line = bytearray(start)
    while not line.endswith(b"\r\n"):
        if len(line) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        line += _recv_exactly(sock, 1)
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 line is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    malformed = ProxyHeaderError("PROXY v1 line has a malformed address or port")
    if not (fields[4].isdigit() and fields[5].isdigit() and int(fields[4]) <= 65535):
        raise malformed
    try:
        source = ipaddress.ip_address(fields[2])
    except ValueError:
        raise malformed from None
    if source.version != (4 if fields[1] == "TCP4" else 6):
        raise malformed
    return str(source), int(fields[4])


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A version 2 header: ``PROXY`` from ``source`` (``LOCAL`` when ``None``).

    For tests and for clients that are themselves proxies; HAProxy writes its own.
    """
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)
    family = 0x21 if ":" in source[0] else 0x11
    af, _ = _FAMILIES[family]
    destination = destination or (("::" if family == 0x21 else "0.0.0.0"), 0)  # noqa: S104
    block = (
        socket.inet_pton(af, source[0])
        + socket.inet_pton(af, destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block
