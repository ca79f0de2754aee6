"""Admission of password hashing: per source, in total, a short queue, a pool of threads.

Regression: every login queued for the same 4 argon2 slots for up to 10 s, so
a flood of logins for made-up names (never throttled: each name is new)
starved real users; and each hash ran in the caller's thread, whose glibc
arena kept its 19 MiB for good.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.auth.passwords import (
    BUSY,
    SOURCE_BUSY,
    HashAdmission,
    SecretHasher,
    source_key,
    tune_malloc,
)
from auth_rpc.auth.service import DB_FILENAME, AuthService, AuthSettings
from auth_rpc.errors import InvalidCredentials, Throttled

PASSWORD = "correct horse battery staple"


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.01)


def test_a_source_over_its_share_is_refused_at_once_and_others_are_not() -> None:
    admission = HashAdmission(slots=4, max_waiting=8, per_source=2, wait_s=5.0)
    held = [admission.acquire("192.0.2.7"), admission.acquire("192.0.2.7")]
    started = time.monotonic()
    with pytest.raises(Throttled) as info:
        admission.acquire("192.0.2.7")
    assert time.monotonic() - started < 0.5  # refused, not queued
    assert info.value.message == SOURCE_BUSY and info.value.retry_after_ms == 1000
    other = admission.acquire("198.51.100.1")  # a free slot, at once
    assert admission.snapshot() == (3, 0, 2)
    for key in (*held, other):
        admission.release(key)
    assert admission.snapshot() == (0, 0, 0)


def test_the_queue_is_short_waits_are_bounded_and_a_timeout_holds_nothing() -> None:
    admission = HashAdmission(slots=1, max_waiting=2, per_source=2, wait_s=0.2)
    busy = admission.acquire("10.0.0.1")
    errors: list[BaseException] = []

    def wait_in_line(source: str) -> None:
        try:
            admission.acquire(source)
        except Throttled as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait_in_line, args=(f"10.0.1.{i}",)) for i in range(2)]
    for t in waiters:
        t.start()
    _wait_for(lambda: admission.snapshot()[1] == 2, "two callers waiting")
    started = time.monotonic()
    with pytest.raises(Throttled) as info:  # the queue is full: at once
        admission.acquire("10.0.2.1")
    assert time.monotonic() - started < 0.5 and info.value.message == BUSY
    for t in waiters:
        t.join(timeout=30)
    assert len(errors) == 2 and all(e.message == BUSY for e in errors)  # type: ignore[attr-defined]
    assert admission.snapshot() == (1, 0, 1)  # timed-out waiters hold nothing
    admission.release(busy)


def test_waiters_are_served_in_order_of_arrival() -> None:
    admission = HashAdmission(slots=1, max_waiting=8, per_source=8, wait_s=30.0)
    first = admission.acquire("10.0.0.1")
    order: list[int] = []

    def take(i: int) -> None:
        key = admission.acquire(f"10.0.1.{i}")
        order.append(i)
        admission.release(key)

    threads = []
    for i in range(5):
        t = threading.Thread(target=take, args=(i,))
        t.start()
        threads.append(t)
        _wait_for(lambda i=i: admission.snapshot()[1] == i + 1, "one more waiter")
    admission.release(first)
    for t in threads:
        t.join(timeout=30)
    assert order == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # one holder's /64: one source
        ("fe80::1%eth0", "fe80::/64"),
        (None, "-"),
        ("", "-"),
        ("not an address", "not an address"),
    ],
)
def test_source_keys(source: str | None, key: str) -> None:
    assert source_key(source) == key


def test_hashes_run_on_the_pool_threads_only() -> None:
    """At most max_concurrent threads (glibc arenas) ever touch the 19 MiB buffers."""
    # A wait for a slot long enough for a loaded machine: eight verifications two at a
    # time take a few seconds when both cores are busy, and a refusal (Throttled) after
    # the default 2 s is admission doing its job, not what this test is about.
    hasher = SecretHasher(max_concurrent=2, acquire_timeout_s=60.0)
    seen: set[str] = set()
    real = hasher._check

    def spy(target: str, secret: str) -> bool:
        seen.add(threading.current_thread().name)
        return real(target, secret)

    hasher._check = spy  # type: ignore[method-assign]
    stored = hasher.hash(PASSWORD)
    results: list[bool | Exception] = []

    def verify(i: int) -> None:
        try:
            results.append(hasher.verify(stored, PASSWORD, source=f"10.0.0.{i}"))
        except Exception as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=verify, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert results == [True] * 8, results  # every verification ran, and on the pool
    assert seen and all(name.startswith("argon2") for name in seen), seen
    assert len(seen) <= 2
    hasher.close()


def test_glibc_mmap_threshold_is_set() -> None:
    import os

    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    assert tune_malloc() is libc.startswith("glibc")


@pytest.fixture
def service_with(data_dir: Path) -> Any:
    opened: list[AuthService] = []

    def open_(hasher: SecretHasher) -> AuthService:
        settings = AuthSettings(data_dir=data_dir, issuer="https://auth.test")
        opened.append(AuthService.open(settings, hasher=hasher))
        return opened[-1]

    yield open_
    for service in opened:
        service.close()


def test_a_login_waiting_for_a_slot_holds_none_of_the_names_attempts(
    service_with: Callable[[SecretHasher], AuthService], data_dir: Path
) -> None:
    """Regression: a login held one of the name's 5 in-flight attempts while it waited
    for a hashing slot (up to 10 s), so a flood could fill them for the real owner."""
    service = service_with(
        SecretHasher(max_concurrent=1, max_waiting=8, per_source=1, acquire_timeout_s=30.0)
    )
    service.add_user("alice", PASSWORD, ["posts:read"])
    blocker = service._hasher.admission.acquire("192.0.2.1")  # the only slot, taken
    outcomes: dict[int, str] = {}

    def login(i: int, password: str) -> None:
        try:
            service.login("alice", password, source=f"10.0.0.{i}")
            outcomes[i] = "ok"
        except (InvalidCredentials, Throttled) as exc:
            outcomes[i] = type(exc).__name__

    # Queued one at a time, so that the order of arrival (served in that order, see
    # test_waiters_are_served_in_order_of_arrival) is known: four wrong passwords, then
    # alice's. Threads started together may reach the queue in any order.
    waiting = [threading.Thread(target=login, args=(i, "wrong password")) for i in range(4)]
    waiting.append(threading.Thread(target=login, args=(9, PASSWORD)))
    for n, t in enumerate(waiting, start=1):
        t.start()
        _wait_for(lambda n=n: service._hasher.admission.snapshot()[1] == n, f"{n} logins waiting")
    with sqlite3.connect(data_dir / DB_FILENAME) as conn:
        assert conn.execute("SELECT COUNT(*) FROM throttle_reservations").fetchone()[0] == 0
    service._hasher.admission.release(blocker)
    for t in waiting:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in waiting)
    # Each got the slot in turn, then its reservation: four failures, then alice is in.
    assert outcomes == {0: "InvalidCredentials", 1: "InvalidCredentials",
                        2: "InvalidCredentials", 3: "InvalidCredentials", 9: "ok"}, outcomes
    # ... in that order: alice's success, last, ended the streak of four failures.
    with contextlib.closing(sqlite3.connect(data_dir / DB_FILENAME)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM throttle_streaks").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM throttle_reservations").fetchone()[0] == 0


@pytest.mark.parametrize("tls", [False, True])
def test_the_login_source_is_the_peer_over_thrift_and_http_and_behind_the_tls_front(
    make_auth_server: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    tls: bool,
) -> None:
    """Hashing is admitted per source: the service must be given the real peer address,
    also when the TLS front terminates TLS and hands the connection to waitress."""
    import socket
    import ssl

    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.thrift import TClient
    from thriftpy2.transport import TCyBufferedTransportFactory, TSocket

    from auth_rpc.idl import auth_thrift
    from auth_rpc.serving.rpc import ServerSettings, TLSServerConfig

    settings = ServerSettings()
    client_ctx: ssl.SSLContext | None = None
    if tls:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
        settings = ServerSettings(
            tls=TLSServerConfig(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
        )
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
    auth = make_auth_server(settings=settings)
    auth.service.add_user("alice", PASSWORD, ["posts:read"])
    sources: list[str | None] = []
    real_login = auth.service.login

    def spy(*args: Any, source: str | None = None, **kwargs: Any) -> Any:
        sources.append(source)
        return real_login(*args, source=source, **kwargs)

    monkeypatch.setattr(auth.service, "login", spy)

    def connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                        source_address=("127.0.0.2", 0))
        if client_ctx is not None:
            sock = client_ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        return sock

    trans = TCyBufferedTransportFactory().get_transport(TSocket(sock=connect(auth.port)))
    client = TClient(auth_thrift.Auth, TCyBinaryProtocolFactory().get_protocol(trans))
    assert client.login("alice", PASSWORD).access_token
    client.close()
    body = f"grant_type=password&username=alice&password={PASSWORD.replace(' ', '+')}"
    with contextlib.closing(connect(auth.http_port)) as sock:
        sock.sendall(
            b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert sources == ["127.0.0.2", "127.0.0.2"]
