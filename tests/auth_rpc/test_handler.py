"""The Auth handler over real Thrift RPC (RpcServer on 127.0.0.1, port 0)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest

from auth_rpc import errors
from auth_rpc.auth.handler import AuthHandler
from auth_rpc.auth.service import USER_CLIENT_ID, AuthService
from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.rpc import RpcServer
from auth_rpc.serving.transport import open_client
from auth_rpc.verify.rpc_errors import ERROR_MAP

ISSUER = "https://auth.test"
AUDIENCE = "posts"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def server(service: AuthService) -> Iterator[RpcServer]:
    rpc = RpcServer(auth_thrift.Auth, AuthHandler(service), host="127.0.0.1", port=0, name="auth")
    rpc.start()
    yield rpc
    rpc.stop(5)


@pytest.fixture
def connect(server: RpcServer) -> Iterator[Callable[[], Any]]:
    clients: list[Any] = []

    def connect_() -> Any:
        client = open_client(auth_thrift.Auth, "127.0.0.1", server.port, timeout_s=30)
        clients.append(client)
        return client

    yield connect_
    for client in clients:
        client.close()


@pytest.fixture
def client(connect: Callable[[], Any]) -> Any:
    return connect()


@pytest.fixture(autouse=True)
def no_undeclared_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every refusal must travel as a declared exception, never an internal error."""
    caplog.set_level(logging.INFO, logger="auth_rpc")
    yield
    internal = [r for r in caplog.records if r.name == "auth_rpc.serving.rpc" and r.levelno >= 40]
    assert not internal, [r.getMessage() for r in internal]


def test_every_internal_error_has_a_mapping() -> None:
    for cls in (
        errors.TokenRejected,
        errors.InvalidCredentials,
        errors.InvalidInput,
        errors.Throttled,
        errors.DependencyUnavailable,
    ):
        assert cls in ERROR_MAP


def test_login_validate_refresh(service: AuthService, alice: str, client: Any) -> None:
    pair = client.login(alice, PASSWORD)
    assert pair.token_type == "Bearer" and pair.expires_in == 900
    assert pair.scope == "posts:read posts:write" and pair.refresh_token
    principal = client.validate(pair.access_token)
    claims = jwt.decode(pair.access_token, options={"verify_signature": False})
    assert principal.subject == "alice"
    assert principal.scopes == ["posts:read", "posts:write"]
    assert principal.expires_at == claims["exp"]
    assert principal.token_id == claims["jti"]
    assert principal.client_id == USER_CLIENT_ID
    assert principal.issuer == ISSUER and principal.audience == AUDIENCE
    rotated = client.refresh(pair.refresh_token)
    assert rotated.refresh_token != pair.refresh_token
    assert client.validate(rotated.access_token).subject == "alice"


@pytest.mark.parametrize("username", ["alice", "nobody"])
def test_login_bad_credentials(alice: str, client: Any, username: str) -> None:
    with pytest.raises(common_thrift.Unauthenticated) as info:
        client.login(username, "wrong")
    assert info.value.message == "invalid username or password"


def test_login_rate_limited(alice: str, client: Any) -> None:
    for _ in range(5):
        with pytest.raises(common_thrift.Unauthenticated):
            client.login(alice, "wrong")
    with pytest.raises(common_thrift.RateLimited) as info:
        client.login(alice, PASSWORD)
    assert info.value.retry_after_ms == 60_000


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (None, PASSWORD),
        ("alice", None),
        (None, None),
        ("", ""),
        ("a" * 200, PASSWORD),
        ("alice", "p" * 2000),
    ],
)
def test_login_invalid_argument(alice: str, client: Any, username: Any, password: Any) -> None:
    with pytest.raises(common_thrift.InvalidArgument):
        client.login(username, password)


def test_refresh_reuse_is_unauthenticated_and_revokes(alice: str, client: Any) -> None:
    pair = client.login(alice, PASSWORD)
    client.refresh(pair.refresh_token)
    with pytest.raises(common_thrift.Unauthenticated):
        client.refresh(pair.refresh_token)
    with pytest.raises(common_thrift.Unauthenticated):
        client.validate(pair.access_token)


@pytest.mark.parametrize("token", [None, "", "x" * 9000])
def test_refresh_invalid_argument(client: Any, token: Any) -> None:
    with pytest.raises(common_thrift.InvalidArgument):
        client.refresh(token)


def test_refresh_unknown_is_unauthenticated(client: Any) -> None:
    with pytest.raises(common_thrift.Unauthenticated):
        client.refresh("unknown")


def test_ten_concurrent_refreshes_over_rpc(
    alice: str, client: Any, connect: Callable[[], Any]
) -> None:
    token = client.login(alice, PASSWORD).refresh_token
    clients = [connect() for _ in range(10)]
    barrier = threading.Barrier(10)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(c: Any) -> None:
        barrier.wait()
        try:
            c.refresh(token)
            outcome = "ok"
        except common_thrift.Unauthenticated:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["ok"] + ["refused"] * 9


def test_client_token(service: AuthService, client: Any) -> None:
    secret = service.add_client("svc", "posts:read posts:admin")
    pair = client.client_token("svc", secret, "posts:read")
    assert pair.refresh_token == "" and pair.scope == "posts:read"
    principal = client.validate(pair.access_token)
    assert (principal.subject, principal.client_id, principal.scopes) == (
        "svc",
        "svc",
        ["posts:read"],
    )
    with pytest.raises(common_thrift.Unauthenticated):
        client.client_token("svc", "wrong", "")
    with pytest.raises(common_thrift.InvalidArgument):
        client.client_token("svc", secret, "posts:write")
    with pytest.raises(common_thrift.InvalidArgument):
        client.client_token(None, None, None)
    # An omitted scope means "all the client's scopes".
    assert client.client_token("svc", secret, None).scope == "posts:admin posts:read"


@pytest.mark.parametrize("token", [None, "", "garbage", "a.b.c", "x" * 9000])
def test_validate_refuses(client: Any, token: Any) -> None:
    with pytest.raises(common_thrift.Unauthenticated):
        client.validate(token)


def test_revoke(alice: str, client: Any) -> None:
    pair = client.login(alice, PASSWORD)
    assert client.revoke(pair.access_token) is None
    client.revoke(pair.access_token)
    with pytest.raises(common_thrift.Unauthenticated):
        client.validate(pair.access_token)
    client.revoke(pair.refresh_token)
    with pytest.raises(common_thrift.Unauthenticated):
        client.refresh(pair.refresh_token)
    client.revoke("garbage")


@pytest.mark.parametrize("token", [None, "", "x" * 9000])
def test_revoke_invalid_argument(client: Any, token: Any) -> None:
    with pytest.raises(common_thrift.InvalidArgument):
        client.revoke(token)


def test_jwks_is_json_text(service: AuthService, alice: str, client: Any) -> None:
    text = client.jwks()
    jwk_set = json.loads(text)
    assert jwk_set == service.jwks()
    token = client.login(alice, PASSWORD).access_token
    key = jwt.PyJWKSet.from_json(text)[jwt.get_unverified_header(token)["kid"]]
    assert (
        jwt.decode(token, key.key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER)["sub"]
        == "alice"
    )


def test_closed_service_is_unavailable(service: AuthService, alice: str, client: Any) -> None:
    pair = client.login(alice, PASSWORD)
    service.close()
    with pytest.raises(common_thrift.Unavailable):
        client.login(alice, PASSWORD)
    with pytest.raises(common_thrift.Unavailable):
        client.refresh(pair.refresh_token)
    with pytest.raises(common_thrift.Unavailable):
        client.validate(pair.access_token)
    with pytest.raises(common_thrift.Unavailable):
        client.revoke(pair.access_token)
    with pytest.raises(common_thrift.Unavailable):
        client.client_token("svc", "secret", "")
    json.loads(client.jwks())


def test_no_secret_in_logs_over_rpc(
    service: AuthService, alice: str, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pair = client.login(alice, PASSWORD)
    rotated = client.refresh(pair.refresh_token)
    with pytest.raises(common_thrift.Unauthenticated):
        client.refresh(pair.refresh_token)
    with pytest.raises(common_thrift.Unauthenticated):
        client.login(alice, "wrong-" + PASSWORD)
    client.revoke(rotated.access_token)
    with pytest.raises(common_thrift.Unauthenticated):
        client.validate(rotated.access_token)
    text = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    for secret in (
        PASSWORD,
        pair.access_token,
        pair.refresh_token,
        rotated.access_token,
        rotated.refresh_token,
        pair.access_token.split(".")[2],
    ):
        assert secret not in text


@pytest.mark.parametrize(
    ("method", "args", "raised", "expected"),
    [
        ("validate", ("t",), errors.InvalidInput("token", "x"), common_thrift.Unauthenticated),
        ("validate", ("t",), errors.Throttled("x", 5), common_thrift.Unauthenticated),
        ("refresh", ("t",), errors.Throttled("x", 5), common_thrift.Unavailable),
        ("revoke", ("t",), errors.TokenRejected("x"), common_thrift.Unavailable),
        ("login", ("a", "b"), errors.Forbidden("x"), common_thrift.Unavailable),
        ("client_token", ("a", "b", ""), errors.NotFoundError("x"), common_thrift.Unavailable),
    ],
)
def test_undeclared_internal_errors_become_declared_ones(
    service: AuthService,
    client: Any,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    args: tuple[str, ...],
    raised: Exception,
    expected: type[Exception],
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise raised

    monkeypatch.setattr(service, method, boom)
    with pytest.raises(expected):
        getattr(client, method)(*args)


def test_revocation_survives_a_restart_over_rpc(
    open_service: Callable[..., AuthService],
) -> None:
    def serve(service: AuthService) -> tuple[RpcServer, Any]:
        rpc = RpcServer(auth_thrift.Auth, AuthHandler(service), host="127.0.0.1", port=0)
        rpc.start()
        return rpc, open_client(auth_thrift.Auth, "127.0.0.1", rpc.port, timeout_s=30)

    first = open_service()
    first.add_user("alice", PASSWORD, "posts:read")
    rpc, c = serve(first)
    try:
        pair = c.login("alice", PASSWORD)
        kept = c.login("alice", PASSWORD)
        c.revoke(pair.access_token)
        c.revoke(pair.refresh_token)
    finally:
        c.close()
        rpc.stop(5)
        first.close()
    rpc, c = serve(open_service())
    try:
        with pytest.raises(common_thrift.Unauthenticated):
            c.validate(pair.access_token)
        with pytest.raises(common_thrift.Unauthenticated):
            c.refresh(pair.refresh_token)
        assert c.validate(kept.access_token).subject == "alice"
        assert c.refresh(kept.refresh_token).refresh_token
    finally:
        c.close()
        rpc.stop(5)
