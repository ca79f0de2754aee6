"""TLS on the listener and the client: verification, hostname, mutual TLS, handshake timeout."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from thriftpy2.transport import TTransportException

from auth_rpc.serving.rpc import CallContext, TLSServerConfig
from auth_rpc.serving.transport import TLSClientConfig, open_client, parse_hostport


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(tmp_path: Path, ca: trustme.CA) -> dict[str, str]:
    """PEM files: the CA, a server cert for 127.0.0.1/localhost, a foreign CA, a client cert."""
    files: dict[str, str] = {}

    def write(name: str, blob: Any) -> None:
        path = tmp_path / f"{name}.pem"
        blob.write_to_path(str(path))
        files[name] = str(path)

    write("ca", ca.cert_pem)
    server = ca.issue_cert("127.0.0.1", "localhost")
    write("server_cert", server.cert_chain_pems[0])
    write("server_key", server.private_key_pem)
    other = ca.issue_cert("other.example")
    write("other_cert", other.cert_chain_pems[0])
    write("other_key", other.private_key_pem)
    write("foreign_ca", trustme.CA().cert_pem)
    client = ca.issue_cert("client.example", common_name="posts-service")
    write("client", client.private_key_and_cert_chain_pem)
    sans_only = ca.issue_cert("svc.example")
    write("client_sans_only", sans_only.private_key_and_cert_chain_pem)
    return files


def tls_client(wire: Any, server: Any, **config: Any) -> Any:
    return open_client(
        wire.echo_thrift.Echo,
        "127.0.0.1",
        server.port,
        framed=server.settings.framed,
        tls=TLSClientConfig(**config),
    )


@pytest.mark.parametrize("framed", [False, True], ids=["buffered", "framed"])
def test_tls_call_with_verified_server(
    wire: Any, make_server: Any, pki: dict[str, str], framed: bool
) -> None:
    server = make_server(framed=framed, tls=TLSServerConfig(pki["server_cert"], pki["server_key"]))
    client = tls_client(wire, server, ca_file=pki["ca"])
    try:
        assert client.echo("over tls") == "over tls"
        assert client.whoami() == ""  # no client certificate asked for
    finally:
        client.close()
    client = tls_client(wire, server, ca_file=pki["ca"], server_hostname="localhost")
    try:
        assert client.add(20, 22) == 42
    finally:
        client.close()


def test_wrong_hostname_is_refused(wire: Any, make_server: Any, pki: dict[str, str]) -> None:
    server = make_server(tls=TLSServerConfig(pki["other_cert"], pki["other_key"]))
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        tls_client(wire, server, ca_file=pki["ca"])
    server = make_server(tls=TLSServerConfig(pki["server_cert"], pki["server_key"]))
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        tls_client(wire, server, ca_file=pki["ca"], server_hostname="other.example")


def test_untrusted_ca_is_refused(wire: Any, make_server: Any, pki: dict[str, str]) -> None:
    server = make_server(tls=TLSServerConfig(pki["server_cert"], pki["server_key"]))
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_client(wire, server, ca_file=pki["foreign_ca"])
    assert wire.wait_for(lambda: server.connection_count == 0)


def test_plain_client_on_tls_listener_is_closed(
    wire: Any, make_server: Any, pki: dict[str, str]
) -> None:
    server = make_server(tls=TLSServerConfig(pki["server_cert"], pki["server_key"]))
    client = wire.client_of(server)
    try:
        with pytest.raises((TTransportException, OSError)):
            client.echo("plain")
    finally:
        client.close()
    assert wire.wait_for(lambda: server.connection_count == 0)


def test_mutual_tls_identity_reaches_the_handler(
    wire: Any, make_server: Any, pki: dict[str, str], handler: Any
) -> None:
    server = make_server(
        tls=TLSServerConfig(pki["server_cert"], pki["server_key"], client_ca_file=pki["ca"])
    )
    client = tls_client(wire, server, ca_file=pki["ca"], cert_file=pki["client"])
    try:
        assert client.whoami() == "posts-service"  # the subject's CN
    finally:
        client.close()
    client = tls_client(wire, server, ca_file=pki["ca"], cert_file=pki["client_sans_only"])
    try:
        assert client.whoami() == "svc.example"  # no CN: the first subjectAltName
    finally:
        client.close()


def test_mutual_tls_without_client_certificate_is_refused(
    wire: Any, make_server: Any, pki: dict[str, str]
) -> None:
    server = make_server(
        tls=TLSServerConfig(pki["server_cert"], pki["server_key"], client_ca_file=pki["ca"])
    )
    # With TLS 1.3 the client learns of the refusal on its first read.
    with pytest.raises((ssl.SSLError, TTransportException, OSError)):
        client = tls_client(wire, server, ca_file=pki["ca"])
        try:
            client.echo("no cert")
        finally:
            client.close()
    assert wire.wait_for(lambda: server.connection_count == 0)


def test_client_certificate_from_another_ca_is_refused(
    wire: Any, make_server: Any, pki: dict[str, str], tmp_path: Path
) -> None:
    server = make_server(
        tls=TLSServerConfig(pki["server_cert"], pki["server_key"], client_ca_file=pki["ca"])
    )
    stranger = trustme.CA().issue_cert("client.example", common_name="intruder")
    path = tmp_path / "stranger.pem"
    stranger.private_key_and_cert_chain_pem.write_to_path(str(path))
    with pytest.raises((ssl.SSLError, TTransportException, OSError)):
        client = tls_client(wire, server, ca_file=pki["ca"], cert_file=str(path))
        try:
            client.whoami()
        finally:
            client.close()


def test_silent_client_does_not_block_others_and_is_cut(
    wire: Any, make_server: Any, pki: dict[str, str]
) -> None:
    server = make_server(
        tls=TLSServerConfig(pki["server_cert"], pki["server_key"]), handshake_timeout_s=0.5
    )
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(5)]
    try:
        assert wire.wait_for(lambda: server.connection_count == 5)
        started = time.monotonic()
        client = tls_client(wire, server, ca_file=pki["ca"])
        try:
            assert client.echo("not blocked") == "not blocked"
        finally:
            client.close()
        served_in = time.monotonic() - started
        cut = [threading.Thread(target=wire.read_until_closed, args=(sock,)) for sock in silent]
        for thread in cut:
            thread.start()
        for thread in cut:
            thread.join(5)
        cut_in = time.monotonic() - started
        print(
            f"\nTLS client served in {served_in * 1000:.1f} ms beside 5 silent clients; "
            f"silent clients cut after {cut_in:.2f} s"
        )
        assert served_in < 0.5
        assert not any(thread.is_alive() for thread in cut)
        assert cut_in < 3.0
    finally:
        for sock in silent:
            sock.close()
    assert wire.wait_for(lambda: server.connection_count == 0)


def test_peer_identity_without_certificate_is_none() -> None:
    ctx = CallContext(method="m", request_id="r", peer=None)
    assert ctx.peer_identity is None
    ctx = CallContext(method="m", request_id="r", peer=None, peer_cert={"subject": ()})
    assert ctx.peer_identity is None


def test_tls_client_context_always_checks_hostname(pki: dict[str, str]) -> None:
    ctx = TLSClientConfig(ca_file=pki["ca"]).context()
    assert ctx.check_hostname is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org:9090", ("example.org", 9090)),
        (":9090", ("127.0.0.1", 9090)),
        ("[::1]:9090", ("::1", 9090)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["example.org", "host:0", "host:65536", "host:x", "host:-1"])
def test_parse_hostport_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_slow_drip_tls_handshake_is_cut_at_the_handshake_timeout(
    wire: Any, make_server: Any, pki: dict[str, str]
) -> None:
    server = make_server(
        tls=TLSServerConfig(pki["server_cert"], pki["server_key"]), handshake_timeout_s=0.5
    )
    # A real ClientHello, sent one byte every 50 ms.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello_maker = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        hello_maker.do_handshake()
    hello = outgoing.read()
    sock = wire.raw_connect(server)
    started = time.monotonic()
    try:
        for byte in hello:
            sock.sendall(bytes([byte]))
            sock.settimeout(0.05)
            try:
                if sock.recv(100) == b"":
                    break
            except TimeoutError:
                pass
    except OSError:
        pass
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    print(f"\nslow-drip ClientHello cut after {elapsed:.2f} s")
    assert 0.4 <= elapsed < 3.0


def test_client_key_without_certificate_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        TLSClientConfig(key_file="client.key")
