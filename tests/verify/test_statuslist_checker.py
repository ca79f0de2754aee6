"""The Token Status List rules of the local and jwks verifiers, against a small list server.

Every rule of draft-ietf-oauth-status-list section 8.3 that a verifier
applies, and the local policy on top (the uri prefix, the fail-closed bound,
never an older list), with an injected clock: refreshes happen when the test
calls ``refresh()`` (the background refresher is off), nothing sleeps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.verify.local import LocalVerifier
from auth_rpc.verify.statuslist import MIN_REFRESH_S, StatusList, StatusListChecker

from _http_stub import QuietHandler, StubServer

T0 = 1_800_000_000.0
ISS = "https://issuer.test"
AUD = "posts"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StatusServer(StubServer):
    """Serves Status List Tokens by path, with ETags; ``stop()`` then ``start()`` keeps the port."""

    def __init__(self) -> None:
        self.lists: dict[str, str] = {}
        self.status: int | None = None
        self.location = ""
        self.hits = 0
        self.conditional = 0
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                server.hits += 1
                token = server.lists.get(self.path)
                if server.status is not None or token is None:
                    self.reply(
                        server.status or 404, content_type=None,
                        headers={"Location": server.location} if server.location else None,
                    )
                    return
                etag = '"' + hashlib.sha256(token.encode()).hexdigest()[:16] + '"'
                if self.headers.get("If-None-Match") == etag:
                    server.conditional += 1
                    self.send_response(304)  # no Content-Length: RFC 9110 section 8.6
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                self.reply(
                    200, token.encode(), content_type="application/statuslist+jwt",
                    headers={"ETag": etag},
                )

        super().__init__(Handler)

    @property
    def prefix(self) -> str:
        return f"{self.url}/statuslists/"

    def publish(self, k: int, token: str) -> None:
        self.lists[f"/statuslists/{k}"] = token


KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_KEY = ed25519.Ed25519PrivateKey.generate()
PEM = KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def list_token(
    uri: str,
    statuses: dict[int, int] | list[int] | None = None,
    *,
    size: int = 64,
    bits: int = 1,
    iat: float | None = T0,
    key: Any = KEY,
    typ: str = "statuslist+jwt",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {
        "iss": ISS,
        "sub": uri,
        "iat": None if iat is None else int(iat),
        "exp": int(T0 if iat is None else iat) + 600,
        "ttl": 1,
        "status_list": StatusList.build(size, statuses or [], bits=bits).to_json(),
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"typ": typ, "kid": "k1"})


def access_token(
    uri: str | None, idx: int = 0, *, at: float = T0, ttl: int = 900, **claims: Any
) -> str:
    payload: dict[str, Any] = {
        "iss": ISS, "sub": "alice", "aud": AUD, "iat": int(at), "exp": int(at) + ttl,
        "jti": f"jti-{uri}-{idx}-{at}", "scope": "posts:read", "client_id": "cli",
    }
    if uri is not None:
        payload["status"] = {"status_list": {"idx": idx, "uri": uri}}
    payload.update(claims)
    return jwt.encode(payload, KEY, algorithm="EdDSA", headers={"typ": "at+jwt", "kid": "k1"})


@pytest.fixture
def server() -> Iterator[StatusServer]:
    status_server = StatusServer().start()
    yield status_server
    status_server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


Make = Callable[..., LocalVerifier]


@pytest.fixture
def make(server: StatusServer, clock: Clock) -> Iterator[Make]:
    made: list[LocalVerifier] = []

    def build(**settings: Any) -> LocalVerifier:
        settings.setdefault("status_list_prefix", server.prefix)
        settings.setdefault("cache_ttl_s", 300)
        verifier = LocalVerifier(
            public_key_pem=PEM, issuer=ISS, audience=AUD, clock=clock, timeout_s=2, **settings
        )
        if verifier.status_checker is not None:
            verifier.status_checker.background = False  # the test refreshes, on its clock
        made.append(verifier)
        return verifier

    yield build
    for verifier in made:
        verifier.close()


def checker(verifier: LocalVerifier) -> StatusListChecker:
    assert verifier.status_checker is not None
    return verifier.status_checker


def test_a_token_is_refused_once_its_bit_is_set_cached_or_not(
    server: StatusServer, make: Make, clock: Clock
) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, [5]))
    v = make()
    good, revoked = access_token(uri, 4), access_token(uri, 5)
    assert v.verify(good).subject == "alice"
    with pytest.raises(TokenRejected, match="token revoked"):
        v.verify(revoked)
    assert v.verify(good).subject == "alice"  # now a cache hit
    assert len(v.cache) == 1
    clock.now += 1
    server.publish(1, list_token(uri, [4, 5], iat=clock.now))
    assert checker(v).refresh() == 1
    with pytest.raises(TokenRejected, match="token revoked"):
        v.verify(good)  # the cached answer does not hide the bit


def test_an_expired_token_is_expired_whatever_its_bit_and_nothing_is_fetched(
    server: StatusServer, make: Make
) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, [5]))
    v = make()
    for idx in (4, 5):
        with pytest.raises(TokenRejected, match="token expired"):
            v.verify(access_token(uri, idx, at=T0 - 7200))
    with pytest.raises(TokenRejected, match="invalid token signature"):
        v.verify(access_token(uri, 4)[:-4] + "AAAA")
    assert server.hits == 0  # section 8.3: no status procedure for a token that failed


@pytest.mark.parametrize(
    "tail",
    [
        "../1",
        "1/2",
        "1?x=1",
        "1#f",
        "",
        ".",
        "..",
        "%2e%2e",
        "1@evil.example",
        "x" * 65,
    ],
)
def test_a_uri_outside_the_prefix_is_never_fetched(
    server: StatusServer, make: Make, tail: str
) -> None:
    v = make()
    with pytest.raises(TokenRejected, match="status list not allowed"):
        v.verify(access_token(server.prefix + tail, 1))
    for uri in (
        "http://evil.example/statuslists/1",
        f"http://127.0.0.1:{server.port}/other/1",
        f"https://127.0.0.1:{server.port}/statuslists/1",
        "file:///etc/passwd",
    ):
        with pytest.raises(TokenRejected, match="status list not allowed"):
            v.verify(access_token(uri, 1))
    assert server.hits == 0


def test_an_index_outside_the_list_is_refused(server: StatusServer, make: Make) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, [], size=64))
    v = make()
    assert v.verify(access_token(uri, 63)).subject == "alice"
    with pytest.raises(TokenRejected, match="status index out of range"):
        v.verify(access_token(uri, 64))


def test_any_status_but_valid_is_refused(server: StatusServer, make: Make) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, {1: 1, 2: 2, 3: 3}, bits=2))
    v = make()
    assert v.verify(access_token(uri, 0)).subject == "alice"
    with pytest.raises(TokenRejected, match="token revoked"):
        v.verify(access_token(uri, 1))
    with pytest.raises(TokenRejected, match="token suspended"):
        v.verify(access_token(uri, 2))
    with pytest.raises(TokenRejected, match="token status not valid"):
        v.verify(access_token(uri, 3))


@pytest.mark.parametrize(
    ("what", "make_list"),
    [
        ("signed by another key", lambda uri: list_token(uri, key=OTHER_KEY)),
        ("typ at+jwt", lambda uri: list_token(uri, typ="at+jwt")),
        ("typ JWT", lambda uri: list_token(uri, typ="JWT")),
        ("sub another list", lambda uri: list_token(uri, sub=uri[:-1] + "2")),
        ("no sub", lambda uri: list_token(uri, sub=None)),
        ("another issuer", lambda uri: list_token(uri, iss="https://other.test")),
        ("no iat", lambda uri: _without(uri, "iat")),
        ("no exp", lambda uri: _without(uri, "exp")),
        ("expired", lambda uri: list_token(uri, iat=T0 - 7200, exp=int(T0) - 3600)),
        ("issued in the future", lambda uri: list_token(uri, iat=T0 + 3600)),
        ("ttl 0", lambda uri: list_token(uri, ttl=0)),
        ("bits 3", lambda uri: _with_status_list(uri, {"bits": 3, "lst": "eNrbuRgAAhcBXQ"})),
        ("lst not zlib", lambda uri: _with_status_list(uri, {"bits": 1, "lst": "AAAA"})),
        ("not a JWT", lambda uri: "this is not a token"),
    ],
)
def test_a_list_that_fails_a_check_is_not_used(
    server: StatusServer, make: Make, what: str, make_list: Callable[[str], str]
) -> None:
    uri = server.prefix + "1"
    server.publish(1, make_list(uri))
    v = make()
    with pytest.raises(DependencyUnavailable, match="status list unavailable"):
        v.verify(access_token(uri, 1))


def _without(uri: str, claim: str) -> str:
    removed: dict[str, Any] = {claim: None}
    return list_token(uri, **removed)


def _with_status_list(uri: str, value: dict[str, Any]) -> str:
    return list_token(uri, status_list=value)


def test_a_list_older_than_the_one_held_is_never_accepted(
    server: StatusServer, make: Make, clock: Clock
) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, [5], iat=T0))
    v = make(status_max_age_s=30)
    with pytest.raises(TokenRejected, match="token revoked"):
        v.verify(access_token(uri, 5))
    # A replayed older list, where the token was still valid: refused, the newer one stays.
    server.publish(1, list_token(uri, [], iat=T0 - 60))
    for _ in range(3):
        clock.now += 5
        checker(v).refresh()
        with pytest.raises(TokenRejected, match="token revoked"):
            v.verify(access_token(uri, 5))
    # Nor does it count as the issuer confirming the list held: past the bound, closed.
    clock.now = T0 + 31
    with pytest.raises(DependencyUnavailable):
        v.verify(access_token(uri, 4))
    # The same iat is accepted (a change within the second it was signed).
    server.publish(1, list_token(uri, [], iat=clock.now))
    clock.now += 2
    assert v.verify(access_token(uri, 5)).subject == "alice"


def test_unchanged_lists_cost_a_304_and_count_as_confirmed(
    server: StatusServer, make: Make, clock: Clock
) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, []))
    v = make(status_max_age_s=10)
    token = access_token(uri, 1)
    v.verify(token)
    for _ in range(30):  # 30 s of refreshes, each a 304
        clock.now += 1
        assert checker(v).refresh() == 1
        assert v.verify(token).subject == "alice"
    assert server.conditional == 30
    held = checker(v).held(uri)
    assert held is not None and held.confirmed_at == clock.now and held.fetched_at == T0


@pytest.mark.parametrize(
    ("ttl", "cap", "interval"),
    [
        (30, 5.0, 5.0),  # the verifier's cap bounds a long ttl
        (2, 5.0, 2.0),  # the issuer's shorter ttl is followed
        (0.01, 5.0, MIN_REFRESH_S),  # but never more often than the floor
        (None, 3.0, 3.0),  # no ttl: the cap
    ],
)
def test_a_list_is_refreshed_every_ttl_capped_by_the_verifier(
    server: StatusServer, make: Make, clock: Clock, ttl: float | None, cap: float, interval: float
) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, [], ttl=ttl))
    v = make(status_max_age_s=60, status_refresh_max_s=cap)
    token = access_token(uri, 1)
    v.verify(token)
    held = checker(v).held(uri)
    assert held is not None and held.interval_s == interval
    fetched = server.hits
    clock.now += interval - 0.01  # not yet due
    assert checker(v).refresh() == 0
    assert server.hits == fetched
    clock.now += 0.02  # due
    assert checker(v).refresh() == 1
    assert server.hits == fetched + 1


def test_with_the_issuer_down_the_last_list_serves_until_the_bound_then_calls_are_refused(
    server: StatusServer, make: Make, clock: Clock
) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, [5]))
    v = make(status_max_age_s=60)
    token, revoked = access_token(uri, 1), access_token(uri, 5)
    v.verify(token)
    server.stop()
    for _ in range(59):  # refreshes fail: the list held keeps answering
        clock.now += 1
        checker(v).refresh()
        assert v.verify(token).subject == "alice"
        with pytest.raises(TokenRejected, match="token revoked"):
            v.verify(revoked)
    clock.now = T0 + 60.5  # the bound: refused (Unavailable), never accepted
    for bad in (token, revoked):
        with pytest.raises(DependencyUnavailable, match="status list unavailable"):
            v.verify(bad)
    fetches = checker(v).fetch_count
    with pytest.raises(DependencyUnavailable):
        v.verify(token)
    assert checker(v).fetch_count == fetches  # a failed fetch is not retried on every call
    # The issuer returns: the next attempt (by a call, or the refresher) recovers by itself.
    server.publish(1, list_token(uri, [5], iat=clock.now))
    server.start()
    clock.now += 1.5
    assert v.verify(token).subject == "alice"
    with pytest.raises(TokenRejected, match="token revoked"):
        v.verify(revoked)


def test_the_refresher_recovers_by_itself_in_the_background(
    server: StatusServer, make: Make, clock: Clock
) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, []))
    v = make(status_max_age_s=30)
    token = access_token(uri, 1)
    v.verify(token)
    server.stop()
    clock.now += 31
    with pytest.raises(DependencyUnavailable):
        v.verify(token)
    server.publish(1, list_token(uri, [], iat=clock.now))
    server.start()
    clock.now += 2
    assert checker(v).refresh() == 1  # what the refresher thread does when it wakes
    held = checker(v).held(uri)
    assert held is not None and held.confirmed_at == clock.now
    assert v.verify(token).subject == "alice"


def test_an_unknown_list_is_refused_and_remembered(
    server: StatusServer, make: Make, clock: Clock
) -> None:
    v = make()
    token = access_token(server.prefix + "9", 1)
    with pytest.raises(TokenRejected, match="unknown status list"):
        v.verify(token)
    with pytest.raises(TokenRejected, match="unknown status list"):
        v.verify(token)
    assert server.hits == 1


def test_redirects_are_not_followed(server: StatusServer, make: Make) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, []))
    server.status, server.location = 302, "http://evil.example/statuslists/1"
    v = make()
    with pytest.raises(DependencyUnavailable):
        v.verify(access_token(uri, 1))
    assert server.hits == 1


def test_tokens_without_a_status_claim(server: StatusServer, make: Make) -> None:
    uri = server.prefix + "1"
    server.publish(1, list_token(uri, [5]))
    bare = access_token(None)
    with pytest.raises(TokenRejected, match="token has no status claim"):
        make().verify(bare)  # required: the default
    lenient = make(status_list="if-present")
    assert lenient.verify(bare).subject == "alice"
    with pytest.raises(TokenRejected, match="token revoked"):
        lenient.verify(access_token(uri, 5))  # a token that has one is checked
    off = make(status_list="off")
    assert off.status_checker is None
    assert off.verify(access_token(uri, 5)).subject == "alice"  # ignored altogether
    for bad in ({"status_list": {"idx": -1, "uri": uri}}, {"status_list": {"uri": uri}}, "x"):
        with pytest.raises(TokenRejected, match="invalid status claim"):
            make().verify(access_token(None, status=bad))


def test_configuration() -> None:
    with pytest.raises(ValueError, match="status list prefix"):
        LocalVerifier(public_key_pem=PEM, issuer="urn:example:issuer", audience=AUD)
    with pytest.raises(ValueError, match="status list prefix"):
        LocalVerifier(
            public_key_pem=PEM, issuer=ISS, audience=AUD,
            status_list_prefix="https://issuer.test/statuslists",  # no trailing slash
        )
    with pytest.raises(ValueError, match="status_list must be"):
        LocalVerifier(public_key_pem=PEM, issuer=ISS, audience=AUD, status_list="maybe")
    with pytest.raises(ValueError, match="max_age_s"):
        LocalVerifier(
            public_key_pem=PEM, issuer=ISS, audience=AUD,
            status_max_age_s=1, status_refresh_max_s=2,
        )
    # The default prefix is the issuer's; an issuer without lists opts out.
    v = LocalVerifier(public_key_pem=PEM, issuer=ISS, audience=AUD)
    assert checker(v).uri_prefix == ISS + "/statuslists/"
    v.close()
    LocalVerifier(
        public_key_pem=PEM, issuer="urn:example:issuer", audience=AUD, status_list="off"
    ).close()
