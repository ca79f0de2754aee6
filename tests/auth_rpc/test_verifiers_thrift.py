"""ThriftVerifier against a tiny Auth handler served by auth_rpc.serving.rpc.RpcServer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.rpc import RpcServer
from auth_rpc.verify.verifiers import ThriftVerifier, make_verifier

T0 = 1_800_000_000.0
ISS = "https://issuer.test"
AUD = "posts"


class AuthStub:
    """Implements only ``validate``: known tokens map to principals."""

    def __init__(self) -> None:
        self.principals: dict[str, Any] = {}
        self.calls = 0
        self.unavailable = False
        self.crash = False
        self.gate: threading.Event | None = None

    def validate(self, token: str) -> Any:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.unavailable:
            raise common_thrift.Unavailable(message="database unavailable")
        if self.crash:
            raise RuntimeError("bug")
        principal = self.principals.get(token)
        if principal is None:
            raise common_thrift.Unauthenticated(message="token expired")
        return principal


def principal(**over: Any) -> Any:
    fields: dict[str, Any] = {
        "subject": "alice",
        "scopes": ["posts:read", "posts:write"],
        "expires_at": int(T0) + 900,
        "token_id": "jti-1",
        "client_id": "cli",
        "issuer": ISS,
        "audience": AUD,
    }
    fields.update(over)
    return auth_thrift.Principal(**fields)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Serve = Callable[..., RpcServer]


@pytest.fixture
def stub() -> AuthStub:
    s = AuthStub()
    s.principals["tok"] = principal()
    return s


def make(port: int, clock: Clock | None = None, **kw: Any) -> ThriftVerifier:
    settings: dict[str, Any] = {
        "host": "127.0.0.1", "port": port, "issuer": ISS, "audience": AUD,
        "timeout_s": 1.0, "clock": clock or Clock(),
    }
    settings.update(kw)
    return ThriftVerifier(**settings)


def test_valid_token_accepted_and_cached(serve_thrift: Serve, stub: AuthStub) -> None:
    server = serve_thrift(auth_thrift.Auth, stub)
    clock = Clock()
    v = make(server.port, clock, cache_ttl_s=30)
    p = v.verify("tok")
    assert (p.subject, p.scopes, p.expires_at, p.token_id, p.client_id, p.issuer, p.audience) == (
        "alice", frozenset({"posts:read", "posts:write"}), int(T0) + 900, "jti-1", "cli",
        ISS, (AUD,),
    )
    assert v.verify("tok") is p and stub.calls == 1
    clock.now = T0 + 30
    v.verify("tok")
    assert stub.calls == 2
    v.close()


def test_unauthenticated_is_rejected_and_not_cached(serve_thrift: Serve, stub: AuthStub) -> None:
    v = make(serve_thrift(auth_thrift.Auth, stub).port)
    for _ in range(2):
        with pytest.raises(TokenRejected, match="token expired"):
            v.verify("other")
    assert stub.calls == 2 and len(v.cache) == 0
    assert v.pool.opened == 1  # a typed exception leaves the connection usable
    v.close()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (principal(audience="billing"), "wrong audience"),
        (principal(audience="a b"), "wrong audience"),
        (principal(audience=None), "no audience"),
        (principal(issuer="https://evil.test"), "wrong issuer"),
        (principal(expires_at=int(T0)), "token expired"),
    ],
)
def test_checks_on_the_answer(
    serve_thrift: Serve, stub: AuthStub, answer: Any, reason: str
) -> None:
    stub.principals["tok"] = answer
    v = make(serve_thrift(auth_thrift.Auth, stub).port)
    with pytest.raises(TokenRejected, match=reason):
        v.verify("tok")
    v.close()


def test_optional_issuer_and_audience(serve_thrift: Serve, stub: AuthStub) -> None:
    stub.principals["tok"] = principal(issuer=None, audience=f"other {AUD}")
    port = serve_thrift(auth_thrift.Auth, stub).port
    v = make(port)
    assert v.verify("tok").audience == ("other", AUD)
    v.close()
    stub.principals["tok"] = principal(audience=None)
    v = make(port, require_audience=False)
    assert v.verify("tok").subject == "alice"
    v.close()


def test_unavailable_and_crash_fail_closed(serve_thrift: Serve, stub: AuthStub) -> None:
    v = make(serve_thrift(auth_thrift.Auth, stub).port)
    stub.unavailable = True
    with pytest.raises(DependencyUnavailable, match="auth service unavailable"):
        v.verify("tok")
    stub.unavailable, stub.crash = False, True
    with pytest.raises(DependencyUnavailable, match="auth service failed"):
        v.verify("tok")
    stub.crash = False
    assert v.verify("tok").subject == "alice"
    v.close()


def test_pool_reuses_one_connection(serve_thrift: Serve, stub: AuthStub) -> None:
    server = serve_thrift(auth_thrift.Auth, stub)
    v = make(server.port, cache_ttl_s=0)
    for _ in range(10):
        v.verify("tok")
    assert stub.calls == 10 and v.pool.opened == 1 and v.pool.idle == 1
    assert server.connection_count == 1
    v.close()


def test_pool_is_bounded_under_concurrency(serve_thrift: Serve, stub: AuthStub) -> None:
    server = serve_thrift(auth_thrift.Auth, stub)
    v = make(server.port, cache_ttl_s=0, pool_size=2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(20):
                v.verify("tok")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and stub.calls == 120
    assert v.pool.opened <= 2
    v.close()


def test_stopped_server_is_unavailable_then_a_new_server_recovers(stub: AuthStub) -> None:
    server = RpcServer(auth_thrift.Auth, stub).start()
    port = server.port
    v = make(port, cache_ttl_s=0)
    v.verify("tok")
    server.stop(grace_s=1.0)
    with pytest.raises(DependencyUnavailable, match="unreachable"):
        v.verify("tok")
    assert v.pool.idle == 0  # the broken connection was discarded
    replacement = RpcServer(auth_thrift.Auth, stub, port=port).start()
    try:
        assert v.verify("tok").subject == "alice"
        opened = v.pool.opened
        v.verify("tok")
        assert v.pool.opened == opened
    finally:
        v.close()
        replacement.stop(grace_s=1.0)


def test_pooled_connection_closed_by_the_server_is_retried_once(stub: AuthStub) -> None:
    server = RpcServer(auth_thrift.Auth, stub).start()
    port = server.port
    v = make(port, cache_ttl_s=0)
    v.verify("tok")
    server.stop(grace_s=1.0)  # the pooled connection is now dead
    replacement = RpcServer(auth_thrift.Auth, stub, port=port).start()
    try:
        assert v.verify("tok").subject == "alice"  # no error surfaced: retried on a new one
        assert v.pool.opened == 2
    finally:
        v.close()
        replacement.stop(grace_s=1.0)


def test_a_hung_server_is_bounded_by_the_timeout(serve_thrift: Serve, stub: AuthStub) -> None:
    stub.gate = threading.Event()
    v = make(serve_thrift(auth_thrift.Auth, stub).port, timeout_s=0.2)
    try:
        with pytest.raises(DependencyUnavailable, match="timed out"):
            v.verify("tok")
        assert stub.calls == 1  # a timeout is not retried
    finally:
        stub.gate.set()
        v.close()


def test_framed_transport(serve_thrift: Serve, stub: AuthStub) -> None:
    server = serve_thrift(auth_thrift.Auth, stub, framed=True)
    v = make(server.port, framed=True)
    assert v.verify("tok").subject == "alice"
    v.close()


def test_make_verifier_thrift(serve_thrift: Serve, stub: AuthStub) -> None:
    server = serve_thrift(auth_thrift.Auth, stub)
    v = make_verifier(
        "thrift", auth_addr=f"127.0.0.1:{server.port}", issuer=ISS, audience=AUD, clock=Clock()
    )
    assert v.verify("tok").subject == "alice"
    v.close()
    with pytest.raises(ValueError):
        make_verifier("thrift", auth_addr="nowhere", issuer=ISS, audience=AUD)


def test_misconfiguration() -> None:
    with pytest.raises(ValueError):
        make(0)
    for bad in ({"pool_size": 0}, {"timeout_s": 0}, {"issuer": ""}, {"host": ""}):
        with pytest.raises(ValueError):
            make(1, **bad)


def test_pool_slots_waiting_and_exhaustion() -> None:
    """The pool alone: a slot is given back on release and on a failed connect; a waiter is
    woken by a release (not by its deadline); past its deadline it is told the pool is full."""
    from auth_rpc.verify.thrift import _ClientPool

    made: list[object] = []
    fail = [False]

    def factory() -> object:
        if fail[0]:
            raise OSError("refused")
        made.append(object())
        return made[-1]

    pool = _ClientPool(factory, size=1, wait_s=5.0)
    fail[0] = True
    with pytest.raises(OSError):
        pool.acquire()
    fail[0] = False
    client, reused = pool.acquire()  # the failed connect gave its slot back
    assert not reused
    got: list[float] = []

    def waiter() -> None:
        started = time.monotonic()
        c, r = pool.acquire()
        got.append(time.monotonic() - started)
        assert c is client and r
        pool.release(c, broken=False)

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 5
    while not pool._waiting:  # the waiter is waiting for the only slot
        assert time.monotonic() < deadline
        time.sleep(0.005)
    pool.release(client, broken=False)
    t.join(timeout=10)
    assert got and got[0] < 4.0  # woken by the release, well before its 5 s deadline
    quick = _ClientPool(factory, size=1, wait_s=0.1)
    held, _ = quick.acquire()
    with pytest.raises(DependencyUnavailable, match="pool exhausted"):
        quick.acquire()
    quick.release(held, broken=True)  # a broken one is closed, its slot freed
    assert quick.idle == 0 and quick.acquire()[1] is False


def test_a_hung_call_holding_the_only_connection_bounds_the_next_caller(
    serve_thrift: Serve, stub: AuthStub
) -> None:
    stub.gate = threading.Event()
    stub.principals["tok2"] = principal()
    v = make(serve_thrift(auth_thrift.Auth, stub).port, timeout_s=0.3, pool_size=1)
    results: list[str] = []

    def call(token: str = "tok") -> None:
        try:
            v.verify(token)
            results.append("ok")
        except DependencyUnavailable as exc:
            results.append(str(exc))

    try:
        first = threading.Thread(target=call)
        first.start()
        deadline = time.monotonic() + 5
        while stub.calls < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        started = time.monotonic()
        call("tok2")  # another token: waits for the only connection at most timeout_s
        elapsed = time.monotonic() - started
        first.join(timeout=10)
        print(f"second caller answered after {elapsed:.2f} s (timeout 0.3 s)")
        assert sorted(results) == ["auth service connection pool exhausted",
                                   "auth service timed out"]
        assert elapsed < 0.3 + 2.0  # loose: a busy machine
    finally:
        stub.gate.set()
        v.close()
    again = make(serve_thrift(auth_thrift.Auth, stub).port, cache_ttl_s=0)
    try:
        assert again.verify("tok").subject == "alice"  # and the service is fine after
    finally:
        again.close()


def _concurrently(n: int, fn: Callable[[], Any]) -> list[Any]:
    """``fn()`` in ``n`` threads at once; each result or the exception it raised."""
    results: list[Any] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = fn()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def _release_when_waiting(stub: AuthStub, v: ThriftVerifier, waiters: int) -> None:
    """Open the stub's gate once one call reached it and ``waiters`` callers wait for it."""
    assert stub.gate is not None
    deadline = time.monotonic() + 10
    while stub.calls < 1 or not _waiting(v, waiters):
        assert time.monotonic() < deadline, "callers did not line up"
        time.sleep(0.005)
    stub.gate.set()


def _waiting(v: ThriftVerifier, n: int) -> bool:
    flights = list(v._flights.values())
    event = flights[0].event if len(flights) == 1 else None
    return event is not None and len(event._cond._waiters) >= n  # type: ignore[attr-defined]


def test_concurrent_misses_of_one_token_share_one_call(
    serve_thrift: Serve, stub: AuthStub
) -> None:
    stub.gate = threading.Event()
    v = make(serve_thrift(auth_thrift.Auth, stub).port)
    try:
        opener = threading.Thread(target=_release_when_waiting, args=(stub, v, 7))
        opener.start()
        results = _concurrently(8, lambda: v.verify("tok"))
        opener.join()
        assert [r.subject for r in results] == ["alice"] * 8
        assert stub.calls == 1 and len(v.cache) == 1 and not v._flights
    finally:
        v.close()


def test_a_rejection_is_shared_and_not_cached(serve_thrift: Serve, stub: AuthStub) -> None:
    stub.gate = threading.Event()
    v = make(serve_thrift(auth_thrift.Auth, stub).port)
    try:
        opener = threading.Thread(target=_release_when_waiting, args=(stub, v, 5))
        opener.start()
        results = _concurrently(6, lambda: v.verify("forged"))
        opener.join()
        assert all(isinstance(r, TokenRejected) and r.message == "token expired" for r in results)
        assert stub.calls == 1 and len(v.cache) == 0
        with pytest.raises(TokenRejected):
            v.verify("forged")
        assert stub.calls == 2  # asked again: a rejection is never remembered
    finally:
        v.close()


def test_an_unavailable_auth_fails_every_waiter_closed(serve_thrift: Serve, stub: AuthStub) -> None:
    stub.gate = threading.Event()
    stub.unavailable = True
    v = make(serve_thrift(auth_thrift.Auth, stub).port)
    try:
        opener = threading.Thread(target=_release_when_waiting, args=(stub, v, 3))
        opener.start()
        results = _concurrently(4, lambda: v.verify("tok"))
        opener.join()
        assert all(isinstance(r, DependencyUnavailable) for r in results), results
        assert stub.calls == 1 and len(v.cache) == 0
        stub.unavailable = False
        assert v.verify("tok").subject == "alice"  # and the next call asks afresh
    finally:
        v.close()


def test_a_hung_auth_holds_no_waiter_beyond_its_bound(serve_thrift: Serve, stub: AuthStub) -> None:
    stub.gate = threading.Event()  # never opened while the callers wait
    v = make(serve_thrift(auth_thrift.Auth, stub).port, timeout_s=0.2)
    try:
        started = time.monotonic()
        results = _concurrently(4, lambda: v.verify("tok"))
        elapsed = time.monotonic() - started
        print(f"4 callers of one token, hung Auth: all answered after {elapsed:.2f} s")
        assert all(isinstance(r, DependencyUnavailable) for r in results), results
        assert stub.calls == 1  # the waiters did not pile more calls on the hung service
        assert elapsed < 3 * 0.2 + 2.0  # their bound (3 x timeout_s), loose for a busy machine
        assert not v._flights
    finally:
        stub.gate.set()
        v.close()


def test_distinct_tokens_and_a_cache_turned_off_are_not_shared(
    serve_thrift: Serve, stub: AuthStub
) -> None:
    for i in range(6):
        stub.principals[f"tok{i}"] = principal(token_id=f"j{i}")
    server = serve_thrift(auth_thrift.Auth, stub)
    v = make(server.port)
    counter = iter(range(6))
    lock = threading.Lock()

    def next_token() -> str:
        with lock:
            return f"tok{next(counter)}"

    try:
        results = _concurrently(6, lambda: v.verify(next_token()))
        assert sorted(r.token_id for r in results) == [f"j{i}" for i in range(6)]
        assert stub.calls == 6
    finally:
        v.close()
    off = make(server.port, cache_ttl_s=0)  # revocation at once: every call asks
    try:
        _concurrently(4, lambda: off.verify("tok"))
        assert stub.calls == 10
    finally:
        off.close()
