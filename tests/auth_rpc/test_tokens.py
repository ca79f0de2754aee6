"""Access-token minting and the RFC 8725 / RFC 9068 checks of validate."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth_rpc.auth.keys import SigningKey
from auth_rpc.auth.service import AuthService
from auth_rpc.auth.tokens import (
    MAX_TOKEN_BYTES,
    AccessTokenChecker,
    hash_refresh_token,
    mint_access_token,
    new_jti,
    new_refresh_token,
)
from auth_rpc.errors import TokenRejected

ISSUER = "https://auth.test"
AUDIENCE = "posts"
PASSWORD = "correct horse battery staple"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: object) -> str:
    return b64(json.dumps(obj).encode())


def good_claims(now: float) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "exp": int(now) + 600,
        "iat": int(now),
        "jti": new_jti(),
        "scope": "posts:read",
        "client_id": "c",
    }


# -- minting ----------------------------------------------------------------------


def test_mint_access_token_defaults() -> None:
    key = SigningKey.generate("EdDSA", kid="k1")
    token = mint_access_token(
        key,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="alice",
        scopes=["posts:read", "posts:write"],
        client_id="c",
        ttl_s=60,
        now=1_000_000,
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": "k1", "typ": "at+jwt"}
    claims = jwt.decode(
        token,
        key.verification_key,
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["exp"] == 1_000_060 and claims["iat"] == claims["nbf"] == 1_000_000
    assert claims["scope"] == "posts:read posts:write" and claims["client_id"] == "c"
    assert claims["sub"] == "alice" and claims["iss"] == ISSUER


def test_mint_overrides_and_removes() -> None:
    key = SigningKey.generate("ES256")
    token = mint_access_token(
        key,
        issuer=ISSUER,
        audience=["a", "b"],
        subject="s",
        scopes="x y",
        client_id="c",
        ttl_s=60,
        now=0,
        jti="fixed",
        headers={"typ": "JWT"},
        claims={"exp": None, "extra": 1},
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "exp" not in claims and claims["extra"] == 1 and claims["jti"] == "fixed"
    assert claims["aud"] == ["a", "b"] and claims["scope"] == "x y"
    assert jwt.get_unverified_header(token)["typ"] == "JWT"


def test_mint_refuses_non_positive_ttl() -> None:
    with pytest.raises(ValueError):
        mint_access_token(
            SigningKey.generate(),
            issuer=ISSUER,
            audience=AUDIENCE,
            subject="s",
            scopes=(),
            client_id="c",
            ttl_s=0,
            now=0,
        )


def test_random_values() -> None:
    jtis = {new_jti() for _ in range(100)}
    assert len(jtis) == 100 and all(len(j) * 6 >= 128 for j in jtis)
    token = new_refresh_token()
    assert len(token) * 6 >= 256
    assert hash_refresh_token(token) == hashlib.sha256(token.encode()).digest()


# -- the RFC 8725 / RFC 9068 checks, through AuthService.validate ------------------

Case = Callable[[AuthService, SigningKey, float], str]


def mint(key: SigningKey, now: float, **kwargs: Any) -> str:
    return mint_access_token(
        key,
        issuer=kwargs.pop("issuer", ISSUER),
        audience=kwargs.pop("audience", AUDIENCE),
        subject="alice",
        scopes="posts:read",
        client_id="c",
        ttl_s=kwargs.pop("ttl_s", 600),
        now=kwargs.pop("now", now),
        **kwargs,
    )


def unsigned(alg: str) -> Case:
    def make(service: AuthService, key: SigningKey, now: float) -> str:
        header = {"alg": alg, "typ": "at+jwt", "kid": key.kid}
        return f"{b64json(header)}.{b64json(good_claims(now))}."

    return make


def hs256_with_public_key(form: str) -> Case:
    """The classic confusion: an HMAC whose secret is our public key."""

    def make(service: AuthService, key: SigningKey, now: float) -> str:
        public = key.verification_key
        secret = (
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if form == "pem"
            else public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        header = {"alg": "HS256", "typ": "at+jwt", "kid": key.kid}
        signing_input = f"{b64json(header)}.{b64json(good_claims(now))}"
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(sig)}"

    return make


def tampered_payload(service: AuthService, key: SigningKey, now: float) -> str:
    head, _, sig = mint(key, now).split(".")
    claims = good_claims(now)
    claims["scope"] = "posts:admin"
    return f"{head}.{b64json(claims)}.{sig}"


def tampered_signature(service: AuthService, key: SigningKey, now: float) -> str:
    token = mint(key, now)
    flipped = "A" if token[-5] != "A" else "B"
    return token[:-5] + flipped + token[-4:]


def foreign_key_with_our_kid(service: AuthService, key: SigningKey, now: float) -> str:
    return mint(SigningKey.generate("EdDSA", kid=key.kid), now)


def rs256_with_our_kid(service: AuthService, key: SigningKey, now: float) -> str:
    return mint(SigningKey.generate("RS256", kid=key.kid), now)


def refresh_token_as_access_token(service: AuthService, key: SigningKey, now: float) -> str:
    service.add_user("alice", PASSWORD, "posts:read")
    return service.login("alice", PASSWORD).refresh_token


def revoked(service: AuthService, key: SigningKey, now: float) -> str:
    token = mint(key, now)
    service.revoke(token)
    return token


def too_long(service: AuthService, key: SigningKey, now: float) -> str:
    token = mint(key, now, claims={"pad": "x" * MAX_TOKEN_BYTES})
    assert len(token) > MAX_TOKEN_BYTES
    return token


def simple(offset: int = 0, rel_claims: dict[str, int] | None = None, **kwargs: Any) -> Case:
    """A token minted at now + ``offset``; ``rel_claims`` are times relative to now."""

    def make(service: AuthService, key: SigningKey, now: float) -> str:
        rest = {name: value for name, value in kwargs.items() if name != "claims"}
        claims = dict(kwargs.get("claims", {}))
        claims.update({name: int(now) + delta for name, delta in (rel_claims or {}).items()})
        return mint(key, now + offset, claims=claims, **rest)

    return make


def raw_header(header: dict[str, Any]) -> Case:
    """An EdDSA token signed by our key with exactly ``header``."""

    def make(service: AuthService, key: SigningKey, now: float) -> str:
        signing_input = f"{b64json(header)}.{b64json(good_claims(now))}"
        return f"{signing_input}.{b64(key.private_key.sign(signing_input.encode()))}"

    return make


REFUSED: dict[str, Case] = {
    "alg none": unsigned("none"),
    "alg None": unsigned("None"),
    "alg NONE": unsigned("NONE"),
    "alg nOnE": unsigned("nOnE"),
    "hs256 with public key pem": hs256_with_public_key("pem"),
    "hs256 with public key raw": hs256_with_public_key("raw"),
    "wrong audience": simple(audience="other"),
    "wrong audience list": simple(audience=["other", "another"]),
    "wrong issuer": simple(issuer="https://evil.test"),
    "typ JWT": simple(headers={"typ": "JWT"}),
    "typ missing": simple(headers={"typ": None}),
    "typ at+jwt with junk": simple(headers={"typ": "at+jwt; x"}),
    "expired": simple(offset=-1000),
    "missing exp": simple(claims={"exp": None}),
    "missing iat": simple(claims={"iat": None}),
    "missing iss": simple(claims={"iss": None}),
    "missing aud": simple(claims={"aud": None}),
    "missing sub": simple(claims={"sub": None}),
    "missing jti": simple(claims={"jti": None}),
    "exp not a number": simple(claims={"exp": "99999999999"}),
    "exp a boolean": simple(claims={"exp": True}),
    "sub not a string": simple(claims={"sub": 42}),
    "empty jti": simple(claims={"jti": ""}),
    "scope not a string": simple(claims={"scope": ["posts:read"]}),
    "not yet valid": simple(rel_claims={"nbf": 120}),
    "issued in the future": simple(rel_claims={"iat": 120}),
    "lifetime over a day": simple(ttl_s=86401),
    "valid until 9999": simple(claims={"exp": 253402300799}),
    "exp before iat": simple(rel_claims={"iat": 10, "exp": 5}),
    "exp equal to iat": simple(rel_claims={"iat": 0, "exp": 0}),
    "tampered payload": tampered_payload,
    "tampered signature": tampered_signature,
    "foreign key with our kid": foreign_key_with_our_kid,
    "RS256 with our kid": rs256_with_our_kid,
    "unknown kid": simple(headers={"kid": "unknown"}),
    "kid missing": raw_header({"alg": "EdDSA", "typ": "at+jwt"}),
    "kid not a string": raw_header({"alg": "EdDSA", "typ": "at+jwt", "kid": 7}),
    "too long": too_long,
    "refresh token": refresh_token_as_access_token,
    "revoked": revoked,
    "garbage": lambda s, k, n: "garbage",
    "empty": lambda s, k, n: "",
    "two segments": lambda s, k, n: ".".join(mint(k, n).split(".")[:2]),
    "four segments": lambda s, k, n: mint(k, n) + ".x",
    "non ascii": lambda s, k, n: mint(k, n) + "é",
    "header not json": lambda s, k, n: "bm90IGpzb24." + mint(k, n).split(".", 1)[1],
}


@pytest.mark.parametrize("make", REFUSED.values(), ids=REFUSED.keys())
def test_validate_refuses(service: AuthService, clock: Any, make: Case) -> None:
    token = make(service, service.signing_key(), clock())
    with pytest.raises(TokenRejected) as info:
        service.validate(token)
    assert token not in info.value.message or not token
    assert len(info.value.message) < 40
    assert service.introspect(token) == {"active": False}


ACCEPTED: dict[str, Case] = {
    "typ at+jwt": simple(),
    "typ application/at+jwt": simple(headers={"typ": "application/at+jwt"}),
    "typ AT+JWT": simple(headers={"typ": "AT+JWT"}),
    "aud list with ours": simple(audience=["other", AUDIENCE]),
    "expired within the leeway": simple(offset=-620),
    "nbf within the leeway": simple(rel_claims={"nbf": 20}),
    "iat within the leeway": simple(rel_claims={"iat": 20}),
    "lifetime of exactly a day": simple(ttl_s=86400),
    "hand-built header with our kid": lambda s, k, n: raw_header(
        {"alg": "EdDSA", "typ": "at+jwt", "kid": k.kid}
    )(s, k, n),
}


@pytest.mark.parametrize("make", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_validate_accepts(service: AuthService, clock: Any, make: Case) -> None:
    assert service.validate(make(service, service.signing_key(), clock())).subject == "alice"


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(max_size=300)
    | st.from_regex(r"[A-Za-z0-9_\-]{0,40}\.[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,40}")
)
def test_validate_refuses_any_junk_with_token_rejected(service: AuthService, junk: str) -> None:
    with pytest.raises(TokenRejected):
        service.validate(junk)


def test_checker_alone_with_a_test_key(clock: Any) -> None:
    key = SigningKey.generate("ES256")
    checker = AccessTokenChecker(
        issuer=ISSUER, audience=AUDIENCE, find_key={key.kid: key}.get, clock=clock
    )
    principal = checker.check(mint(key, clock()))
    assert principal.subject == "alice" and principal.audience == (AUDIENCE,)
    assert principal.scopes == frozenset({"posts:read"}) and principal.issuer == ISSUER


@pytest.mark.parametrize("depth", [2000, 4000])
def test_deeply_nested_header_is_rejected_not_a_crash(service: AuthService, depth: int) -> None:
    token = f"{b64(b'[' * depth)}.{b64json({'a': 1})}.c2ln"
    assert len(token) <= MAX_TOKEN_BYTES
    with pytest.raises(TokenRejected):
        service.validate(token)
    assert service.introspect(token) == {"active": False}
    service.revoke(token)  # a no-op
