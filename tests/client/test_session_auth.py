"""The session against a real in-process Auth service: refresh, renew-once, logout, TLS."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.rpc import ServerSettings, TLSServerConfig
from auth_rpc.serving.transport import TLSClientConfig
from client import (
    ClientError,
    Endpoint,
    NotLoggedIn,
    Session,
    Tokens,
    TransportError,
    Unauthenticated,
    connect_auth,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def _addr(server: Any) -> str:
    return f"127.0.0.1:{server.port}"


def test_thin_auth_client_passes_typed_exceptions_through(auth_server: Any, user: Any) -> None:
    with connect_auth(port=auth_server.port) as auth:
        with pytest.raises(common_thrift.Unauthenticated) as caught:
            auth.login(user.name, "wrong password")
        pair = auth.login(user.name, user.password)
        principal = auth.validate(pair.access_token)
    assert type(caught.value) is common_thrift.Unauthenticated
    assert isinstance(pair, auth_thrift.TokenPair)
    assert principal.subject == user.name


def test_connect_to_a_closed_port_is_a_transport_error(unused_port: int) -> None:
    with pytest.raises(TransportError, match="cannot connect"), connect_auth(port=unused_port):
        pass


def test_refresh_before_expiry_with_injected_clock(
    auth_server: Any, user: Any, auth_calls: Any
) -> None:
    clock = FakeClock()
    saved: list[Tokens] = []
    session = Session.login(
        _addr(auth_server), user.name, user.password,
        clock=clock, refresh_margin_s=60, on_tokens=saved.append,
    )
    first = session.tokens
    assert first.expires_at == pytest.approx(clock.now + 900)
    assert saved == [first]

    clock.advance(900 - 61)  # 61 s left: not yet due
    assert session.access_token() == first.access_token
    assert auth_calls.count("refresh") == 0

    clock.advance(2)  # 59 s left: inside the 60 s margin
    token = session.access_token()
    second = session.tokens
    assert token == second.access_token != first.access_token
    assert second.refresh_token != first.refresh_token  # rotated
    assert second.expires_at == pytest.approx(clock.now + 900)
    assert saved == [first, second]  # the rotated refresh token handed out at once
    assert auth_calls.count("refresh") == 1
    assert session.access_token() == token  # no second refresh
    assert auth_calls.count("refresh") == 1
    assert session.validate().subject == user.name


def test_margin_is_ten_percent_of_a_short_lifetime(
    make_auth_server: Any, make_user: Any, counting: Any
) -> None:
    server = make_auth_server(access_ttl_s=100)
    auth_calls = counting(server)
    make_user("bob", "bob's password here", service=server.service)
    clock = FakeClock()
    session = Session.login(_addr(server), "bob", "bob's password here", clock=clock)
    first = session.access_token()
    clock.advance(89)  # 11 s left of 100: the margin is min(60, 10) = 10 s
    assert session.access_token() == first
    clock.advance(2)
    assert session.access_token() != first
    assert auth_calls.count("refresh") == 1


def test_eight_threads_that_find_the_token_due_trigger_one_refresh(
    auth_server: Any, user: Any, auth_calls: Any
) -> None:
    clock = FakeClock()
    session = Session.login(_addr(auth_server), user.name, user.password, clock=clock)
    clock.advance(890)
    barrier = threading.Barrier(8)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            tokens.append(session.access_token())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert auth_calls.count("refresh") == 1


def test_unauthenticated_renews_once_and_the_retry_succeeds(
    auth_server: Any, user: Any, auth_calls: Any
) -> None:
    session = Session.login(_addr(auth_server), user.name, user.password)
    revoked = session.tokens.access_token
    with connect_auth(port=auth_server.port) as auth:
        auth.revoke(revoked)  # the server now refuses this access token

    assert session.validate().subject == user.name
    assert session.tokens.access_token != revoked
    assert auth_calls.calls("validate") == [("validate", "TokenRejected"), ("validate", "ok")]
    assert auth_calls.count("refresh") == 1


def test_a_refused_renewal_propagates_without_a_loop(
    auth_server: Any, user: Any, auth_calls: Any
) -> None:
    session = Session.login(_addr(auth_server), user.name, user.password)
    with connect_auth(port=auth_server.port) as auth:
        auth.revoke(session.tokens.refresh_token)  # the whole family
        auth.revoke(session.tokens.access_token)

    with pytest.raises(Unauthenticated):
        session.validate()
    assert auth_calls.calls("validate") == [("validate", "TokenRejected")]
    assert auth_calls.calls("refresh") == [("refresh", "TokenRejected")]


def test_client_credentials_session_gets_a_new_token_instead_of_refreshing(
    auth_server: Any, make_client: Any, auth_calls: Any
) -> None:
    secret = make_client("reporter", scopes="posts:read")
    clock = FakeClock()
    session = Session.for_client(
        _addr(auth_server), "reporter", secret, scope="posts:read", clock=clock
    )
    assert session.tokens.refresh_token == ""
    assert session.tokens.scope == "posts:read"
    first = session.access_token()
    with connect_auth(port=auth_server.port) as auth:
        auth.revoke(first)
    principal = session.validate()
    assert principal.subject == "reporter"
    assert principal.client_id == "reporter"
    assert auth_calls.count("client_token") == 2
    assert auth_calls.count("refresh") == 0

    clock.advance(899)  # due again: a third client_token, still no refresh grant
    assert session.access_token() not in (first, "")
    assert auth_calls.count("client_token") == 3


def test_early_refresh_failure_keeps_the_still_valid_token(
    make_auth_server: Any, make_user: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_auth_server()
    make_user("carol", "carol's password", service=server.service)
    clock = FakeClock()
    session = Session.login(_addr(server), "carol", "carol's password", clock=clock)
    token = session.access_token()
    server.stop()
    clock.advance(870)  # due, 30 s left
    with caplog.at_level(logging.WARNING, logger="client.session"):
        assert session.access_token() == token
    assert "could not refresh" in caplog.text
    assert token not in caplog.text
    clock.advance(31)  # expired: now the failure is the caller's
    with pytest.raises(TransportError):
        session.access_token()


def test_logout_revokes_both_tokens(auth_server: Any, user: Any) -> None:
    session = Session.login(_addr(auth_server), user.name, user.password)
    tokens = session.tokens
    session.logout()
    with pytest.raises(NotLoggedIn):
        session.access_token()
    with connect_auth(port=auth_server.port) as auth:
        with pytest.raises(Unauthenticated):
            auth.validate(tokens.access_token)
        with pytest.raises(Unauthenticated):
            auth.refresh(tokens.refresh_token)
    session.logout()  # a second logout does nothing


def test_reprs_never_show_tokens(auth_server: Any, user: Any) -> None:
    session = Session.login(_addr(auth_server), user.name, user.password)
    tokens = session.tokens
    for text in (repr(tokens), repr(session), str(tokens)):
        assert tokens.access_token not in text
        assert tokens.refresh_token not in text


def test_token_client_fills_the_token_of_any_token_first_service(
    auth_server: Any, user: Any
) -> None:
    session = Session.login(_addr(auth_server), user.name, user.password)
    with session.client(auth_thrift.Auth, _addr(auth_server)) as auth:
        assert auth.validate().subject == user.name  # `token` filled in
        assert "keys" in auth.jwks()  # no token argument: called as is
        with pytest.raises(TypeError, match="unexpected keyword"):
            auth.validate(tokn="x")
        with pytest.raises(TypeError, match="takes 0 arguments"):
            auth.validate("extra")
        with pytest.raises(AttributeError):
            auth.no_such_method  # noqa: B018
    assert isinstance(TransportError("x"), ClientError)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("tls")
    files = {
        "ca": directory / "ca.pem",
        "cert": directory / "server.pem",
        "key": directory / "server.key",
    }
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    return {name: str(path) for name, path in files.items()}


def test_tls_verifies_the_certificate_and_the_hostname(
    make_auth_server: Any, make_user: Any, tls_files: dict[str, str]
) -> None:
    server = make_auth_server(
        settings=ServerSettings(tls=TLSServerConfig(tls_files["cert"], tls_files["key"]))
    )
    make_user("dave", "dave's password", service=server.service)
    good = Endpoint("127.0.0.1", server.port, tls=TLSClientConfig(ca_file=tls_files["ca"]))
    session = Session.login(good, "dave", "dave's password")
    assert session.validate().subject == "dave"

    untrusted = Endpoint("127.0.0.1", server.port, tls=TLSClientConfig())
    with pytest.raises(TransportError, match="certificate"):
        Session.login(untrusted, "dave", "dave's password")
    wrong_name = Endpoint(
        "127.0.0.1", server.port,
        tls=TLSClientConfig(ca_file=tls_files["ca"], server_hostname="auth.example.org"),
    )
    with pytest.raises(TransportError, match="certificate"):
        Session.login(wrong_name, "dave", "dave's password")


def _aud(token: str) -> Any:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})["aud"]


def test_a_session_asks_for_an_audience_and_keeps_it(auth_server: Any) -> None:
    """RFC 8707: one Auth service, several services; the session stays on the one it asked for."""
    service = auth_server.service
    service.add_user("nina", "a long password", "notes:read", audiences=["posts", "notes"])
    address = f"127.0.0.1:{auth_server.port}"
    clock = FakeClock()
    with Session.login(address, "nina", "a long password", audience="notes", clock=clock) as s:
        assert _aud(s.access_token()) == "notes"
        clock.advance(3600)  # due: the session refreshes, and the family keeps "notes"
        assert _aud(s.access_token()) == "notes"
    with Session.login(address, "nina", "a long password") as s:
        assert _aud(s.access_token()) == auth_server.service.settings.audience
    with pytest.raises(common_thrift.InvalidArgument, match="audience"):
        Session.login(address, "nina", "a long password", audience="billing")


def test_a_client_session_renews_for_the_same_audience(auth_server: Any) -> None:
    secret = auth_server.service.add_client("reporter", "notes:read", audiences=["notes"])
    clock = FakeClock()
    address = f"127.0.0.1:{auth_server.port}"
    with Session.for_client(address, "reporter", secret, audience="notes", clock=clock) as s:
        first = s.access_token()
        assert _aud(first) == "notes"
        clock.advance(3600)
        second = s.access_token()
        assert second != first and _aud(second) == "notes"
