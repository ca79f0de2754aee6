"""The PROXY protocol on Thrift listeners: the client's address from a trusted proxy only.

Behind HAProxy every connection comes from HAProxy's address; with
``proxy_protocol_from`` a listener reads the PROXY header HAProxy's
``send-proxy-v2`` writes and serves the call as from the client it names.
An attacker's view: a header from anyone else must not be believed, a
trusted proxy's connection that begins like a header but is not a valid one
must not be served, and a connection that never sends anything must not
hold a thread past the first-message deadline.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.thrift import TClient, TMessageType
from thriftpy2.transport import TCyBufferedTransportFactory, TSocket

from auth_rpc.serving.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeaderError,
    encode_v2,
    is_trusted,
    parse_networks,
    read_header,
)
from auth_rpc.serving.rpc import RpcServer, ServerSettings

# -- the header itself ---------------------------------------------------------


def _read(data: bytes) -> tuple[Any, bytes]:
    """``read_header`` over a socket pair holding ``data``: (result, the bytes left after it)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        ours.settimeout(5)
        result = read_header(ours)
        rest = b""
        while chunk := ours.recv(4096):
            rest += chunk
    return result, rest


@pytest.mark.parametrize(
    ("header", "source"),
    [
        (encode_v2(("203.0.113.9", 50123), ("10.0.0.1", 9090)), ("203.0.113.9", 50123)),
        (encode_v2(("2001:db8::7", 443)), ("2001:db8::7", 443)),
        (encode_v2(None), None),  # LOCAL: HAProxy's health check
        (V2_SIGNATURE + bytes([0x21, 0x00, 0, 0]), None),  # PROXY, family UNSPEC
        # with a TLV after the addresses (HAProxy may add some): skipped
        (V2_SIGNATURE + bytes([0x21, 0x11, 0, 12 + 4]) + socket.inet_aton("198.51.100.4")
         + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 1000, 9090) + b"\x04\x00\x01\x00",
         ("198.51.100.4", 1000)),
        (b"PROXY TCP4 198.51.100.22 10.0.0.1 35646 9090\r\n", ("198.51.100.22", 35646)),
        (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n", ("2001:db8::1", 1)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
    ],
    ids=["v2-tcp4", "v2-tcp6", "v2-local", "v2-unspec", "v2-tlv", "v1-tcp4", "v1-tcp6",
         "v1-unknown", "v1-unknown-long"],
)
def test_a_header_gives_the_client_and_leaves_the_bytes_after_it(
    header: bytes, source: tuple[str, int] | None
) -> None:
    call = b"\x80\x01\x00\x01 the first Thrift bytes"
    assert _read(header + call) == (source, call)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x07", "no PROXY protocol header"),
        (b"GET / HTTP/1.1\r\n\r\n", "no PROXY protocol header"),
        (V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12), "version 1, not 2"),
        (V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12), "command 2"),
        (V2_SIGNATURE + bytes([0x21, 0x31, 0, 216]) + bytes(216), "family 0x31"),  # unix
        (V2_SIGNATURE + bytes([0x21, 0x11, 0, 8]) + bytes(8), "block of 8 bytes"),
        (V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]), "block of 65535 bytes"),
        (V2_SIGNATURE + bytes([0x21, 0x11, 0, 12]) + bytes(5), "closed after 5 byte"),
        (V2_SIGNATURE[:7], "closed after 7 byte"),
        (b"PROXY TCP4 198.51.100.22 10.0.0.1 35646\r\n", "not 'PROXY TCP4|TCP6"),
        (b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n", "malformed address"),
        (b"PROXY TCP4 198.51.100.22 10.0.0.1 +1 2\r\n", "malformed address"),
        (b"PROXY TCP4 198.51.100.22 10.0.0.1 65536 2\r\n", "malformed address"),
        (b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n", "malformed address"),
        (b"PROXY TCP4 " + b"1" * 200 + b"\r\n", "longer than 107 bytes"),
        (b"PROXY TCP4 \xff\xfe 10.0.0.1 1 2\r\n", "not ASCII"),
        (b"PROXY TCP4 198.51.100.22 10.0.0.1 1 2", "closed after"),  # no CRLF
    ],
)
def test_anything_else_is_refused_with_its_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=re.escape(reason)):
        _read(data)


def test_trusted_networks() -> None:
    nets = parse_networks(["10.0.0.5", "192.0.2.0/24", "::1"])
    assert is_trusted("10.0.0.5", nets) and not is_trusted("10.0.0.6", nets)
    assert is_trusted("192.0.2.200", nets) and is_trusted("::1", nets)
    assert is_trusted("::ffff:10.0.0.5", nets)  # a dual-stack listener's IPv4 peer
    assert not is_trusted("10.0.0.5", ()) and not is_trusted("not an address", nets)
    expected = re.escape("'10.0.0.0/33' is not an IP address or network")
    with pytest.raises(ValueError, match=expected):
        parse_networks(["10.0.0.0/33"])
    with pytest.raises(ValueError, match="'haproxy' is not"):
        ServerSettings(proxy_protocol_from=("haproxy",))


# -- a listener behind a proxy -------------------------------------------------


@pytest.fixture
def call_peer(wire: Any) -> Callable[[socket.socket], str]:
    def call(sock: socket.socket) -> str:
        trans = TCyBufferedTransportFactory().get_transport(TSocket(sock=sock))
        client = TClient(wire.echo_thrift.Echo, TCyBinaryProtocolFactory().get_protocol(trans))
        value: str = client.peer()
        return value

    return call


def test_a_trusted_proxys_header_names_the_peer_of_every_call(
    make_server: Callable[..., RpcServer], wire: Any, call_peer: Callable[[socket.socket], str],
) -> None:
    server = make_server(proxy_protocol_from=("127.0.0.2",))
    with wire.connect_from(server, "127.0.0.2") as sock:  # the proxy
        sock.sendall(encode_v2(("203.0.113.9", 50123), ("127.0.0.1", server.port)))
        assert call_peer(sock) == "203.0.113.9 50123"
        assert call_peer(sock) == "203.0.113.9 50123"  # the connection's, not one call's
    with wire.connect_from(server, "127.0.0.2") as sock:  # v1, as nginx's stream module sends
        sock.sendall(b"PROXY TCP6 2001:db8::7 ::1 4711 9090\r\n")
        assert call_peer(sock) == "2001:db8::7 4711"
    with wire.connect_from(server, "127.0.0.2") as sock:  # LOCAL: the proxy itself
        sock.sendall(encode_v2(None))
        assert call_peer(sock).startswith("127.0.0.2 ")
    with wire.connect_from(server, "127.0.0.2") as sock:  # no header: the proxy's host itself
        assert call_peer(sock).startswith("127.0.0.2 ")
    with wire.connect_from(server, "127.0.0.3") as sock:  # anybody else: no header read
        assert call_peer(sock).startswith("127.0.0.3 ")


def test_a_header_from_anyone_else_is_not_believed(
    make_server: Callable[..., RpcServer], wire: Any, handler: Any,
) -> None:
    """A client that sends a header itself gets a protocol error and the connection closed:
    its bytes are Thrift from the first one, so it cannot choose the address it is served as."""
    server = make_server(proxy_protocol_from=("127.0.0.2",))
    for header in (encode_v2(("192.0.2.1", 1)), b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n"):
        with wire.connect_from(server, "127.0.0.3") as sock:
            sock.sendall(header + wire.encode_call("peer"))
            sock.shutdown(socket.SHUT_WR)
            answer = wire.read_until_closed(sock)
        assert b"192.0.2.1" not in answer
        assert answer == b"" or wire.decode_reply(answer)[1] == TMessageType.EXCEPTION
    # A listener that trusts nobody (the default) reads no header from anybody either.
    plain = make_server()
    with wire.connect_from(plain, "127.0.0.2") as sock:
        sock.sendall(encode_v2(("192.0.2.1", 1)) + wire.encode_call("peer"))
        sock.shutdown(socket.SHUT_WR)
        assert b"192.0.2.1" not in wire.read_until_closed(sock)


@pytest.mark.parametrize(
    "first",
    [b"", b"PROXY TCP4 198.51.100.22\r\n", V2_SIGNATURE[:5] + b"\x80\x01\x00\x01" + bytes(3)],
    ids=["nothing", "bad-v1", "bad-v2"],
)
def test_a_trusted_proxys_connection_without_a_valid_header_is_closed_unserved(
    make_server: Callable[..., RpcServer], wire: Any, first: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fail closed: what begins like a header must be one (nothing of it is served as
    Thrift), and a connection that sends nothing is cut at the first-message deadline,
    as any other."""
    server = make_server(proxy_protocol_from=("127.0.0.2",), first_message_timeout_s=0.3)
    caplog.set_level(logging.DEBUG, logger="auth_rpc.serving.rpc")
    started = time.monotonic()
    with wire.connect_from(server, "127.0.0.2", timeout_s=30) as sock:
        if first:
            sock.sendall(first)
        answer = wire.read_until_closed(sock)
    elapsed = time.monotonic() - started
    print(f"closed after {elapsed * 1000:.0f} ms")
    assert answer == b""  # nothing served, not even an error reply
    assert elapsed < 10  # 0.3 s deadline; generous for a busy machine
    if first == b"":
        assert elapsed >= 0.25
    else:
        assert "closing connections from a proxy" in caplog.text
        assert "127.0.0.2" in caplog.text


def test_the_header_comes_before_tls(
    make_server: Callable[..., RpcServer], wire: Any, call_peer: Callable[[socket.socket], str],
    tmp_path: Any,
) -> None:
    """HAProxy in TCP mode passes TLS through: its header precedes the client's handshake."""
    import ssl

    import trustme

    from auth_rpc.serving.rpc import TLSServerConfig

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server = make_server(
        proxy_protocol_from=("127.0.0.2",),
        tls=TLSServerConfig(str(tmp_path / "server.pem"), str(tmp_path / "server.key")),
    )
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with wire.connect_from(server, "127.0.0.2") as raw:
        raw.sendall(encode_v2(("198.51.100.4", 4242)))
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert call_peer(sock) == "198.51.100.4 4242"
