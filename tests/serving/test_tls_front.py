"""TlsFront (TLS in front of an HTTP app): idle deadline both ways, limits, the hand-over."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
import trustme

from auth_rpc.serving.rpc import TLSServerConfig
from auth_rpc.serving.runner import bind_socket
from auth_rpc.serving.tls_front import TlsFront


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    tmp = tmp_path_factory.mktemp("front-pki")
    files: dict[str, str] = {}
    for name, blob in (
        ("ca", ca.cert_pem),
        ("server", ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem),
    ):
        path = tmp / f"{name}.pem"
        blob.write_to_path(str(path))
        files[name] = str(path)
    return files


class EchoBackend:
    """An app that echoes what a client sends (until the client stops reading).

    ``connect`` is the front's ``connect(peer, environ)``: one end of a socket
    pair, the other served by an echo thread.
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def connect(self, peer: object, environ: dict[str, object]) -> socket.socket:
        mine, theirs = socket.socketpair()
        thread = threading.Thread(target=self._echo, args=(theirs,), daemon=True)
        self._threads.append(thread)
        thread.start()
        return mine

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoBackend]:
    backend = EchoBackend()
    yield backend
    backend.close()


def _tls_client(pki: dict[str, str], port: int, *, rcvbuf: int | None = None) -> ssl.SSLSocket:
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", port))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server ends the connection within ``timeout_s``, without reading from it."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)  # POLLERR and POLLHUP always count
    return bool(poller.poll(timeout_s * 1000))


def test_a_client_that_stops_reading_is_cut_at_the_idle_timeout(
    pki: dict[str, str], echo: EchoBackend
) -> None:
    """It pipelines, never reads: no progress either way for the idle timeout ends it."""
    listener = bind_socket("127.0.0.1", 0)
    front = TlsFront(
        listener, echo.connect, TLSServerConfig(pki["server"], pki["server"]), idle_timeout_s=0.5
    ).start()
    client = _tls_client(pki, listener.getsockname()[1], rcvbuf=16 * 1024)
    try:
        client.setblocking(False)
        chunk = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 400
        sent = 0
        for _ in range(20_000):  # until the server stops reading (its buffers are full)
            try:
                sent += client.send(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
        started = time.monotonic()
        cut = _closed_by_server(client, timeout_s=10)
        elapsed = time.monotonic() - started
        print(
            f"\nclient that stopped reading ({sent / 1e6:.1f} MB sent) cut after {elapsed:.2f} s"
            " (idle timeout 0.5 s)"
        )
        assert cut, "the front kept the connection of a client that stopped reading"
        assert elapsed < 5.0
    finally:
        client.close()
        front.stop()
        listener.close()
