"""JwksVerifier against a JWK Set served by a small in-process HTTP server."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.verify.verifiers import JwksVerifier, make_verifier

from _http_stub import QuietHandler, StubServer

T0 = 1_800_000_000.0
ISS = "https://issuer.test"
AUD = "posts"


class JwksServer(StubServer):
    """Serves ``self.document`` at /jwks.json; ``stop()`` then ``start()`` reuses the port."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        self.location = ""
        self.hits = 0
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                server.hits += 1
                self.reply(
                    server.status, json.dumps(server.document).encode(),
                    headers={"Location": server.location} if server.location else None,
                )

        super().__init__(Handler)

    @property
    def url(self) -> str:
        return f"{super().url}/jwks.json"

    def publish(self, *keys: tuple[str, Any], **extra: Any) -> None:
        self.document = {"keys": [jwk_of(kid, key, **extra) for kid, key in keys]}


def jwk_of(kid: str, private_key: Any, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_to_jwk(private_key.public_key()))
    data.update({"kid": kid, "use": "sig", **extra})
    return data


def _to_jwk(public_key: Any) -> str:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return str(jwt.algorithms.OKPAlgorithm.to_jwk(public_key))
    if isinstance(public_key, rsa.RSAPublicKey):
        return str(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    return str(jwt.algorithms.ECAlgorithm.to_jwk(public_key))


def mint(key: Any, alg: str, kid: str, *, at: float = T0, **over: Any) -> str:
    claims: dict[str, Any] = {
        "iss": ISS, "sub": "alice", "aud": AUD, "iat": int(at), "exp": int(at) + 900,
        "jti": f"jti-{kid}-{at}", "scope": "posts:read", "client_id": "cli",
    }
    claims.update(over)
    headers = {"typ": "at+jwt", "kid": kid}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def k1() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def k2() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def make(server: JwksServer, clock: Clock, **kwargs: Any) -> JwksVerifier:
    kwargs.setdefault("issuer", ISS)
    kwargs.setdefault("audience", AUD)
    kwargs.setdefault("timeout_s", 1.0)
    kwargs.setdefault("status_list", "off")  # a test issuer without Token Status Lists
    return JwksVerifier(jwks_url=server.url, clock=clock, **kwargs)


def test_accepts_tokens_signed_by_published_keys(jwks_server: JwksServer, k1: Any) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.publish(("k1", k1), ("r1", rsa_key), ("e1", ec_key))
    clock = Clock()
    v = make(jwks_server, clock)
    assert v.verify(mint(k1, "EdDSA", "k1")).subject == "alice"
    assert v.verify(mint(rsa_key, "RS256", "r1")).subject == "alice"
    assert v.verify(mint(ec_key, "ES256", "e1")).subject == "alice"
    assert jwks_server.hits == 1 and v.key_ids == {"k1", "r1", "e1"}
    # The algorithm is bound to the key: an EdDSA kid cannot verify an ES256 token.
    with pytest.raises(TokenRejected, match="algorithm not allowed"):
        v.verify(mint(ec_key, "ES256", "k1"))
    v.close()


def test_rotation_picked_up_on_unknown_kid_and_cooldown_respected(
    jwks_server: JwksServer, k1: Any, k2: Any
) -> None:
    jwks_server.publish(("k1", k1))
    clock = Clock()
    v = make(jwks_server, clock, refresh_cooldown_s=30)
    v.verify(mint(k1, "EdDSA", "k1"))
    assert jwks_server.hits == 1

    jwks_server.publish(("k1", k1), ("k2", k2))  # the issuer rotates
    clock.now = T0 + 5  # within the cooldown: no fetch, so the verifier cannot decide yet
    # Not TokenRejected: that would make clients throw a valid token away. Unavailable is
    # retryable, and the key is fetched once the cooldown has passed.
    with pytest.raises(DependencyUnavailable, match="not fetched yet"):
        v.verify(mint(k2, "EdDSA", "k2", at=clock.now))
    for i in range(20):  # an attacker's random kids cannot make us fetch
        with pytest.raises(DependencyUnavailable):
            v.verify(mint(k2, "EdDSA", f"random-{i}", at=clock.now))
    assert jwks_server.hits == 1

    clock.now = T0 + 30
    assert v.verify(mint(k2, "EdDSA", "k2", at=clock.now)).subject == "alice"
    assert jwks_server.hits == 2
    clock.now = T0 + 40  # unknown kid again within the new cooldown
    with pytest.raises(DependencyUnavailable):
        v.verify(mint(k2, "EdDSA", "k3", at=clock.now))
    assert jwks_server.hits == 2
    # After the cooldown: fetched again, and a kid still unknown after a fresh fetch is refused.
    clock.now = T0 + 61
    with pytest.raises(TokenRejected, match="unknown signing key"):
        v.verify(mint(k2, "EdDSA", "k3", at=clock.now))
    assert jwks_server.hits == 3


def test_concurrent_unknown_kids_trigger_one_fetch(jwks_server: JwksServer, k1: Any) -> None:
    jwks_server.publish(("k1", k1))
    v = make(jwks_server, Clock())
    tokens = [mint(k1, "EdDSA", "k1", jti=f"t{i}") for i in range(8)]
    barrier = threading.Barrier(len(tokens))
    results: list[Any] = []

    def run(token: str) -> None:
        barrier.wait()
        try:
            results.append(v.verify(token).subject)
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["alice"] * len(tokens)
    assert jwks_server.hits == 1


def test_cached_keys_serve_while_the_endpoint_is_down(
    jwks_server: JwksServer, k1: Any, k2: Any
) -> None:
    jwks_server.publish(("k1", k1))
    clock = Clock()
    v = make(jwks_server, clock, max_key_age_s=300)
    v.verify(mint(k1, "EdDSA", "k1"))
    jwks_server.stop()

    clock.now = T0 + 400  # keys are stale: a refresh is attempted, fails, old keys serve
    assert v.verify(mint(k1, "EdDSA", "k1", at=clock.now)).subject == "alice"
    assert v.fetch_count == 2
    # A kid we cannot look up while the endpoint is down: cannot decide, fail closed.
    clock.now = T0 + 440
    with pytest.raises(DependencyUnavailable, match="JWKS endpoint unreachable"):
        v.verify(mint(k2, "EdDSA", "k2", at=clock.now))

    jwks_server.publish(("k1", k1), ("k2", k2))
    jwks_server.start()
    clock.now = T0 + 480
    assert v.verify(mint(k2, "EdDSA", "k2", at=clock.now)).subject == "alice"


def test_a_key_withdrawn_from_the_set_stops_verifying(
    jwks_server: JwksServer, k1: Any, k2: Any
) -> None:
    jwks_server.publish(("k1", k1), ("k2", k2))
    clock = Clock()
    v = make(jwks_server, clock, max_key_age_s=300, cache_ttl_s=0)
    v.verify(mint(k1, "EdDSA", "k1"))
    jwks_server.publish(("k2", k2))  # k1 retired (or compromised)
    clock.now = T0 + 299  # keys still fresh: k1 still verifies
    v.verify(mint(k1, "EdDSA", "k1", at=clock.now))
    clock.now = T0 + 300  # stale: fetched again, k1 is gone
    with pytest.raises(TokenRejected, match="unknown signing key"):
        v.verify(mint(k1, "EdDSA", "k1", at=clock.now))
    assert v.key_ids == {"k2"} and jwks_server.hits == 2


def test_down_with_no_keys_is_unavailable_then_recovers(
    jwks_server: JwksServer, k1: Any
) -> None:
    jwks_server.publish(("k1", k1))
    jwks_server.stop()
    clock = Clock()
    v = make(jwks_server, clock, failure_retry_s=2)
    token = mint(k1, "EdDSA", "k1")
    with pytest.raises(DependencyUnavailable):
        v.verify(token)
    with pytest.raises(DependencyUnavailable):
        v.prefetch()
    jwks_server.start()
    clock.now = T0 + 3  # two failures: the retry delay has grown from 2 to 4 s
    with pytest.raises(DependencyUnavailable):
        v.verify(token)
    assert jwks_server.hits == 0
    clock.now = T0 + 4
    assert v.verify(token).subject == "alice"
    assert jwks_server.hits == 1


def test_a_failed_fetch_is_retried_after_a_short_delay_not_the_cooldown(
    jwks_server: JwksServer, k1: Any, k2: Any
) -> None:
    jwks_server.publish(("k1", k1))
    clock = Clock()
    v = make(jwks_server, clock)  # defaults: 30 s cooldown, 1 s first retry after a failure
    v.verify(mint(k1, "EdDSA", "k1"))
    jwks_server.stop()  # the Auth service is down...
    clock.now = T0 + 31  # ...when a token under a key not fetched yet arrives
    with pytest.raises(DependencyUnavailable, match="unreachable"):
        v.verify(mint(k2, "EdDSA", "k2", at=clock.now))
    assert v.fetch_count == 2
    jwks_server.publish(("k1", k1), ("k2", k2))
    jwks_server.start()  # ...and comes back
    clock.now = T0 + 31.5
    with pytest.raises(DependencyUnavailable):
        v.verify(mint(k2, "EdDSA", "k2", at=clock.now))
    assert v.fetch_count == 2  # no fetch within the retry delay
    clock.now = T0 + 32  # 1 s after the failed fetch, not 30 s
    assert v.verify(mint(k2, "EdDSA", "k2", at=clock.now)).subject == "alice"
    assert v.fetch_count == 3


def _flood(v: JwksVerifier, clock: Clock, k: Any, *, start: float, end: float) -> list[float]:
    """Random kids, 5 every 0.25 s of the fake clock; returns when each fetch was made."""
    fetched_at: list[float] = []
    step = 0
    while (now := start + 0.25 * step) < end:
        clock.now = now
        for i in range(5):
            before = v.fetch_count
            with pytest.raises((DependencyUnavailable, TokenRejected)):
                v.verify(mint(k, "EdDSA", f"random-{step}-{i}", at=now))
            if v.fetch_count != before:
                fetched_at.append(now)
        step += 1
    return fetched_at


def test_a_flood_of_random_kids_is_bounded_up_and_down(
    jwks_server: JwksServer, k1: Any, k2: Any
) -> None:
    jwks_server.publish(("k1", k1))
    clock = Clock()
    v = make(jwks_server, clock, failure_retry_s=1, failure_retry_max_s=8)
    v.verify(mint(k1, "EdDSA", "k1"))
    # Endpoint up: one fetch per cooldown (30 s), however many unknown kids arrive.
    assert _flood(v, clock, k2, start=T0, end=T0 + 120) == [T0 + 30, T0 + 60, T0 + 90]
    # Endpoint down: retried after 1, 2, 4, then every 8 s (the bound), never more often.
    jwks_server.stop()
    fetched = _flood(v, clock, k2, start=T0 + 120, end=T0 + 180)
    assert [b - a for a, b in itertools.pairwise(fetched)] == [1, 2, 4, 8, 8, 8, 8, 8, 8]
    assert fetched[0] == T0 + 120
    assert v.key_ids == {"k1"}  # the cached keys stay in use


@pytest.mark.parametrize(
    ("status", "location"), [(500, ""), (404, ""), (302, "http://127.0.0.1:1/jwks.json")]
)
def test_error_answers_are_failures(
    jwks_server: JwksServer, k1: Any, status: int, location: str
) -> None:
    jwks_server.publish(("k1", k1))
    jwks_server.status, jwks_server.location = status, location
    v = make(jwks_server, Clock())
    with pytest.raises(DependencyUnavailable):
        v.verify(mint(k1, "EdDSA", "k1"))
    assert jwks_server.hits == 1  # redirects are not followed


def test_not_a_jwk_set_is_a_failure(jwks_server: JwksServer, k1: Any) -> None:
    jwks_server.document = {"keys": "nope"}
    with pytest.raises(DependencyUnavailable):
        make(jwks_server, Clock()).verify(mint(k1, "EdDSA", "k1"))


def test_key_selection_rules(jwks_server: JwksServer, k1: Any) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(k1))  # has "d"
    jwks_server.document = {
        "keys": [
            jwk_of("enc", k1, use="enc"),
            jwk_of("wrap", k1, key_ops=["wrapKey"]),
            {"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "oct"},
            jwk_of("rs-alg", rsa_key, alg="RS512"),  # not a configured algorithm
            jwk_of("small", small_rsa),
            {**jwk_of("nokid", k1), "kid": ""},
            "not a key",
            {"kty": "EC", "crv": "P-999", "kid": "badcurve", "x": "AA", "y": "AA"},
            {**private_jwk, "kid": "private", "use": "sig"},
            jwk_of("rs", rsa_key, alg="RS256"),
        ]
    }
    v = make(jwks_server, Clock())
    assert v.prefetch() == 2
    assert v.key_ids == {"private", "rs"}
    assert v.verify(mint(k1, "EdDSA", "private")).subject == "alice"
    assert v.verify(mint(rsa_key, "RS256", "rs")).subject == "alice"
    with pytest.raises(TokenRejected, match="algorithm not allowed"):
        v.verify(mint(rsa_key, "PS256", "rs"))


def test_token_without_kid(jwks_server: JwksServer, k1: Any) -> None:
    jwks_server.publish(("k1", k1))
    token = jwt.encode(
        {"iss": ISS, "sub": "a", "aud": AUD, "iat": int(T0), "exp": int(T0) + 60, "jti": "j"},
        k1, algorithm="EdDSA", headers={"typ": "at+jwt"},
    )
    with pytest.raises(TokenRejected, match="lacks a key id"):
        make(jwks_server, Clock()).verify(token)
    assert jwks_server.hits == 0  # a bad token triggers no fetch


def test_jku_in_the_token_is_never_fetched(jwks_server: JwksServer, k1: Any) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    bait = JwksServer().start()
    try:
        bait.publish(("evil", attacker))
        jwks_server.publish(("k1", k1))
        v = make(jwks_server, Clock())
        token = jwt.encode(
            {"iss": ISS, "sub": "a", "aud": AUD, "iat": int(T0), "exp": int(T0) + 60, "jti": "j"},
            attacker,
            algorithm="EdDSA",
            headers={"typ": "at+jwt", "kid": "evil", "jku": bait.url, "x5u": bait.url,
                     "jwk": jwk_of("evil", attacker)},
        )
        with pytest.raises(TokenRejected, match="unknown signing key"):
            v.verify(token)
        assert bait.hits == 0
    finally:
        bait.stop()


def test_issuer_mismatch_for_an_independent_issuer(jwks_server: JwksServer, k1: Any) -> None:
    jwks_server.publish(("k1", k1))
    v = make(jwks_server, Clock(), issuer="https://other-issuer.test")
    with pytest.raises(TokenRejected, match="wrong issuer"):
        v.verify(mint(k1, "EdDSA", "k1"))


def test_misconfiguration() -> None:
    for kwargs in (
        {"algorithms": ["HS256"]},
        {"algorithms": ["none"]},
        {"algorithms": []},
        {"jwks_url": "file:///etc/passwd"},
        {"jwks_url": "not a url"},
        {"timeout_s": 0},
        {"issuer": ""},
    ):
        settings: dict[str, Any] = {
            "jwks_url": "http://127.0.0.1:9/jwks.json", "issuer": ISS, "audience": AUD,
        }
        settings.update(kwargs)
        with pytest.raises(ValueError):
            JwksVerifier(**settings)


def test_make_verifier_jwks(jwks_server: JwksServer, k1: Any) -> None:
    jwks_server.publish(("k1", k1))
    v = make_verifier(
        "jwks", jwks_url=jwks_server.url, issuer=ISS, audience=AUD, clock=Clock(),
        status_list="off",
    )
    assert v.verify(mint(k1, "EdDSA", "k1")).subject == "alice"
    v.close()
