"""LocalVerifier: RFC 8725 / RFC 9068 failure modes and the happy path per algorithm."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.verify.principal import Principal
from auth_rpc.verify.verifiers import LocalVerifier, make_verifier

from _http_stub import QuietHandler, StubServer

NOW = 1_800_000_000
ISS = "https://issuer.test"
AUD = "posts"
SECRET = b"s" * 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "sub": "alice",
        "aud": AUD,
        "iat": NOW,
        "exp": NOW + 900,
        "jti": "jti-1",
        "scope": "posts:read posts:write",
        "client_id": "cli",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: Any, alg: str, *, headers: dict[str, Any] | None = None, **over: Any) -> str:
    all_headers = {"typ": "at+jwt", "kid": "k1", **(headers or {})}
    return jwt.encode(claims(**over), key, algorithm=alg, headers=all_headers)


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    head, body = b64(json.dumps(header).encode()), b64(json.dumps(payload).encode())
    return f"{head}.{body}.{b64(signature)}"


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(private_key: Any) -> bytes:
    data: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def verifier(clock_at: float = NOW, **kwargs: Any) -> LocalVerifier:
    kwargs.setdefault("issuer", ISS)
    kwargs.setdefault("audience", AUD)
    kwargs.setdefault("status_list", "off")  # a test issuer without Token Status Lists
    return LocalVerifier(clock=lambda: clock_at, **kwargs)


# -- happy path ----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "EdDSA", "RS256", "ES256"])
def test_accepts_a_valid_token(
    alg: str, ed_key: Any, rsa_key: Any, ec_key: Any
) -> None:
    if alg == "HS256":
        v, signing_key = verifier(hs256_secret=SECRET), SECRET
    else:
        private = {"EdDSA": ed_key, "RS256": rsa_key, "ES256": ec_key}[alg]
        v, signing_key = verifier(public_key_pem=pem(private)), private
    assert v.algorithms == {alg}
    principal = v.verify(mint(signing_key, alg))
    assert principal == Principal(
        subject="alice",
        scopes=frozenset({"posts:read", "posts:write"}),
        expires_at=NOW + 900,
        token_id="jti-1",
        client_id="cli",
        issuer=ISS,
        audience=(AUD,),
    )


def test_key_object_and_audience_list(ed_key: Any) -> None:
    v = verifier(key=ed_key.public_key())
    p = v.verify(mint(ed_key, "EdDSA", aud=["other", AUD]))
    assert p.audience == ("other", AUD)


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT", "Application/At+Jwt"])
def test_typ_variants_accepted(typ: str) -> None:
    verifier(hs256_secret=SECRET).verify(mint(SECRET, "HS256", headers={"typ": typ}))


def test_leeway_applies_to_exp() -> None:
    token = mint(SECRET, "HS256")
    verifier(clock_at=NOW + 900 + 29, hs256_secret=SECRET, cache_ttl_s=0).verify(token)
    with pytest.raises(TokenRejected, match="token expired"):
        verifier(clock_at=NOW + 900 + 30, hs256_secret=SECRET, cache_ttl_s=0).verify(token)
    with pytest.raises(TokenRejected, match="token expired"):
        verifier(clock_at=NOW + 901, hs256_secret=SECRET, leeway_s=0).verify(token)


def test_optional_claims_may_be_absent() -> None:
    p = verifier(hs256_secret=SECRET).verify(mint(SECRET, "HS256", scope=None, client_id=None))
    assert p.scopes == frozenset() and p.client_id == ""


# -- RFC 8725 failure modes ----------------------------------------------------


def _alg_none(casing: str) -> Callable[[Any], str]:
    return lambda keys: raw_token({"alg": casing, "typ": "at+jwt", "kid": "k1"}, claims())


def _hs256_with_public_key(keys: Any) -> str:
    # The classic key-confusion attack: the public key's PEM used as an HMAC secret.
    header = {"alg": "HS256", "typ": "at+jwt", "kid": "k1"}
    head = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    sig = hmac.new(pem(keys["ed"]), head.encode(), hashlib.sha256).digest()
    return f"{head}.{b64(sig)}"


def _tampered(keys: Any) -> str:
    good = mint(keys["ed"], "EdDSA").split(".")
    evil = b64(json.dumps(claims(sub="admin", scope="posts:admin")).encode())
    return f"{good[0]}.{evil}.{good[2]}"


def _other_key(keys: Any) -> str:
    return mint(ed25519.Ed25519PrivateKey.generate(), "EdDSA")


FAILURES: dict[str, tuple[Callable[[Any], str], str]] = {
    "alg none": (_alg_none("none"), "algorithm not allowed"),
    "alg None": (_alg_none("None"), "algorithm not allowed"),
    "alg NONE": (_alg_none("NONE"), "algorithm not allowed"),
    "alg nOnE": (_alg_none("nOnE"), "algorithm not allowed"),
    "hs256 signed with the public key": (_hs256_with_public_key, "algorithm not allowed"),
    "es256 token for an eddsa key": (
        lambda k: mint(ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "algorithm not allowed",
    ),
    "wrong audience": (lambda k: mint(k["ed"], "EdDSA", aud="billing"), "wrong audience"),
    "audience list without ours": (
        lambda k: mint(k["ed"], "EdDSA", aud=["a", "b"]),
        "wrong audience",
    ),
    "wrong issuer": (lambda k: mint(k["ed"], "EdDSA", iss="https://evil.test"), "wrong issuer"),
    "typ JWT": (lambda k: mint(k["ed"], "EdDSA", headers={"typ": "JWT"}), "wrong token type"),
    "no typ": (lambda k: mint(k["ed"], "EdDSA", headers={"typ": None}), "wrong token type"),
    "expired": (lambda k: mint(k["ed"], "EdDSA", iat=NOW - 1000, exp=NOW - 31), "token expired"),
    "issued in the future": (
        lambda k: mint(k["ed"], "EdDSA", iat=NOW + 60, exp=NOW + 600),
        "issued in the future",
    ),
    "not yet valid": (lambda k: mint(k["ed"], "EdDSA", nbf=NOW + 60), "not yet valid"),
    "lifetime too long": (
        lambda k: mint(k["ed"], "EdDSA", exp=NOW + 86401),
        "lifetime too long",
    ),
    "exp before iat": (
        lambda k: mint(k["ed"], "EdDSA", iat=NOW, exp=NOW - 1),
        "invalid token lifetime",
    ),
    "crit header": (
        lambda k: mint(k["ed"], "EdDSA", headers={"crit": ["exp"], "exp": 1}),
        "critical header",
    ),
    "crit b64": (
        lambda k: mint(k["ed"], "EdDSA", headers={"crit": ["b64"], "b64": True}),
        "critical header",
    ),
    "tampered payload": (_tampered, "invalid token signature"),
    "signed by another key": (_other_key, "invalid token signature"),
    "signature cut": (lambda k: mint(k["ed"], "EdDSA")[:-10], "invalid token signature"),
    "signature removed": (
        lambda k: mint(k["ed"], "EdDSA").rsplit(".", 1)[0] + ".",
        "invalid token signature",
    ),
    "oversize": (lambda k: mint(k["ed"], "EdDSA", pad="x" * 9000), "token too large"),
    "exp as string": (lambda k: mint(k["ed"], "EdDSA", exp=str(NOW + 900)), "invalid exp"),
    "exp as bool": (lambda k: mint(k["ed"], "EdDSA", exp=True), "invalid exp"),
    "empty sub": (lambda k: mint(k["ed"], "EdDSA", sub=""), "invalid sub"),
    "scope as list": (lambda k: mint(k["ed"], "EdDSA", scope=["posts:read"]), "invalid scope"),
    "aud as number": (lambda k: mint(k["ed"], "EdDSA", aud=5), "invalid aud"),
    "two segments": (lambda k: "abc.def", "malformed token"),
    "four segments": (lambda k: mint(k["ed"], "EdDSA") + ".x", "malformed token"),
    "garbage header": (lambda k: "!!!.e30.e30", "malformed token"),
    "header not an object": (lambda k: f"{b64(b'[1]')}.e30.", "malformed token"),
    "payload not json": (
        lambda k: f"{mint(k['ed'], 'EdDSA').split('.')[0]}.{b64(b'nope')}.AAAA",
        "invalid token signature",
    ),
    "empty": (lambda k: "", "missing token"),
    "non ascii": (lambda k: "é" + mint(k["ed"], "EdDSA"), "malformed token"),
}
for _claim in ("exp", "iat", "iss", "aud", "sub", "jti"):
    FAILURES[f"no {_claim}"] = (
        (lambda c: lambda k: mint(k["ed"], "EdDSA", **{c: None}))(_claim),
        f"lacks the {_claim} claim",
    )


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_rejects(case: str, ed_key: Any) -> None:
    make, reason = FAILURES[case]
    token = make({"ed": ed_key})
    v = verifier(public_key_pem=pem(ed_key))
    with pytest.raises(TokenRejected, match=reason) as info:
        v.verify(token)
    if token:
        assert token not in info.value.message
    assert len(v.cache) == 0, "a rejected token must never be cached"


def test_rejects_non_string() -> None:
    with pytest.raises(TokenRejected, match="missing token"):
        verifier(hs256_secret=SECRET).verify(None)  # type: ignore[arg-type]


def test_kid_is_informational_for_a_single_key_unless_configured() -> None:
    token = mint(SECRET, "HS256", headers={"kid": "whatever"})
    verifier(hs256_secret=SECRET).verify(token)
    with pytest.raises(TokenRejected, match="unknown signing key"):
        verifier(hs256_secret=SECRET, kid="k1").verify(token)
    verifier(hs256_secret=SECRET, kid="whatever").verify(token)


def test_only_configured_rsa_algorithms(rsa_key: Any) -> None:
    token = mint(rsa_key, "PS256")
    with pytest.raises(TokenRejected, match="algorithm not allowed"):
        verifier(public_key_pem=pem(rsa_key)).verify(token)
    assert verifier(public_key_pem=pem(rsa_key), algorithms=["RS256", "PS256"]).verify(token)


def test_hs384_needs_configuration() -> None:
    token = mint(SECRET + SECRET, "HS384")
    with pytest.raises(TokenRejected, match="algorithm not allowed"):
        verifier(hs256_secret=SECRET + SECRET).verify(token)
    verifier(hs256_secret=SECRET + SECRET, algorithms=["HS384"]).verify(token)


# -- keys, URLs and headers carried in the token are never used ------------------


class _CountingServer:
    def __init__(self, body: bytes = b"{}") -> None:
        self.hits = 0
        counter = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                counter.hits += 1
                self.reply(200, body, content_type=None)

        self._http = StubServer(Handler).start()
        self.url = self._http.url

    def stop(self) -> None:
        self._http.stop()


@pytest.fixture
def bait_server() -> Iterator[_CountingServer]:
    server = _CountingServer()
    yield server
    server.stop()


def test_jku_x5u_jwk_headers_are_never_used(ed_key: Any, bait_server: _CountingServer) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    attacker_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(attacker.public_key()))
    headers = {
        "jku": bait_server.url + "/jwks.json",
        "x5u": bait_server.url + "/cert.pem",
        "jwk": attacker_jwk,
    }
    v = verifier(public_key_pem=pem(ed_key))
    with pytest.raises(TokenRejected, match="invalid token signature"):
        v.verify(mint(attacker, "EdDSA", headers=headers))
    # A genuine token that merely carries such headers is accepted, the headers ignored.
    assert v.verify(mint(ed_key, "EdDSA", headers=headers)).subject == "alice"
    assert bait_server.hits == 0


# -- revocation ----------------------------------------------------------------


class _Revoked:
    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.calls = 0

    def is_revoked(self, token_id: str) -> bool:
        self.calls += 1
        return token_id in self.ids


def test_revocations_are_consulted_on_cache_hits() -> None:
    revoked = _Revoked()
    v = verifier(hs256_secret=SECRET, revocations=revoked)
    token = mint(SECRET, "HS256")
    v.verify(token)
    v.verify(token)
    assert revoked.calls == 2 and len(v.cache) == 1
    revoked.ids.add("jti-1")
    with pytest.raises(TokenRejected, match="token revoked"):
        v.verify(token)


def test_failing_revocation_check_fails_closed() -> None:
    class Broken:
        def is_revoked(self, token_id: str) -> bool:
            raise ConnectionError("list unavailable")

    with pytest.raises(DependencyUnavailable):
        verifier(hs256_secret=SECRET, revocations=Broken()).verify(mint(SECRET, "HS256"))


# -- misconfiguration is a ValueError at construction ----------------------------


def test_misconfiguration(ed_key: Any, rsa_key: Any, ec_key: Any) -> None:
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_pem = ed_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    bad: list[dict[str, Any]] = [
        {"hs256_secret": b"short"},
        {"hs256_secret": b"x" * 31},
        {"hs256_secret": pem(rsa_key)},  # a public key is not an HMAC secret
        {"hs256_secret": SECRET, "algorithms": ["none"]},
        {"hs256_secret": SECRET, "algorithms": ["RS256"]},
        {"hs256_secret": SECRET, "algorithms": []},
        {"hs256_secret": SECRET, "algorithms": ["HS512"]},  # RFC 7518: 64-byte key
        {"public_key_pem": pem(rsa_key), "algorithms": ["HS256"]},
        {"public_key_pem": pem(ed_key), "algorithms": ["ES256"]},
        {"public_key_pem": pem(ec_key), "algorithms": ["ES384"]},
        {"public_key_pem": pem(small_rsa)},
        {"public_key_pem": b"not a key"},
        {"public_key_pem": private_pem},
        {"public_key_pem": pem(ed_key), "hs256_secret": SECRET},
        {},
        {"hs256_secret": SECRET, "issuer": ""},
        {"hs256_secret": SECRET, "audience": ""},
        {"hs256_secret": SECRET, "max_lifetime_s": 0},
        {"hs256_secret": SECRET, "cache_ttl_s": -1},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            verifier(**kwargs)


def test_make_verifier_local_reads_files(tmp_path: Any, ed_key: Any) -> None:
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    (tmp_path / "pub.pem").write_bytes(pem(ed_key))
    v1 = make_verifier(
        "local", hs256_secret_file=tmp_path / "secret", issuer=ISS, audience=AUD,
        clock=lambda: NOW, status_list="off",
    )
    assert v1.verify(mint(SECRET, "HS256")).subject == "alice"
    v2 = make_verifier(
        "local", public_key_file=str(tmp_path / "pub.pem"), issuer=ISS, audience=AUD,
        clock=lambda: NOW, status_list="off",
    )
    assert v2.verify(mint(ed_key, "EdDSA")).subject == "alice"
    with pytest.raises(ValueError, match="unknown verification mode"):
        make_verifier("magic", issuer=ISS, audience=AUD)
    with pytest.raises(ValueError, match="bad settings"):
        make_verifier("local", hs256_secret=SECRET, issuer=ISS, audience=AUD, colour="red")
