"""The plugin protecting a service that is not Posts: a "notes" service.

As a user would: ``auth_server`` is overridden to issue tokens for the
audience ``notes``, and ``token_factory`` and ``make_verifier`` follow it, in
each of the four verification modes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import jwt
import pytest

from auth_rpc.errors import TokenRejected
from auth_rpc.testing import EXPIRED_FOR_S, ISSUER, VERIFIER_MODES, TokenFactory

NOTES_SCOPES = ("notes:read", "notes:write")
TIMES = ("iat", "nbf", "exp")


@pytest.fixture
def auth_server(make_auth_server: Any) -> Any:
    """The override a user of the plugin writes for their own service."""
    return make_auth_server(audience="notes")


def refusal(verifier: Any, token: str) -> str:
    """Why ``verifier`` refuses ``token`` (it must refuse it)."""
    with pytest.raises(TokenRejected) as refused:
        verifier.verify(token)
    return refused.value.message


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def test_token_factory_follows_the_auth_server(
    token_factory: TokenFactory, auth_server: Any
) -> None:
    assert (token_factory.issuer, token_factory.audience) == (ISSUER, "notes")
    assert token_factory.key.kid == auth_server.service.signing_key().kid
    claims = claims_of(token_factory.mint("nina"))
    assert (claims["iss"], claims["aud"], claims["sub"]) == (ISSUER, "notes", "nina")
    assert claims["scope"] == ""  # no Posts scopes, no scopes at all unless asked


def test_accounts_get_no_posts_scopes_unless_asked(
    make_user: Any, make_client: Any, auth_server: Any
) -> None:
    make_user("nina", "a long enough password")
    make_user("nora", "a long enough password", "notes:read")
    secret = make_client("notes-batch")
    service = auth_server.service
    assert service.login("nina", "a long enough password").scope == ""
    assert service.login("nora", "a long enough password").scope == "notes:read"
    assert service.client_token("notes-batch", secret).scope == ""


@pytest.mark.parametrize("mode", VERIFIER_MODES)
def test_minted_tokens_pass_a_notes_verifier(
    mode: str, make_verifier: Any, token_factory: TokenFactory
) -> None:
    principal = make_verifier(mode).verify(token_factory.mint("nina", NOTES_SCOPES))
    assert principal.subject == "nina"
    assert principal.scopes == frozenset(NOTES_SCOPES)


# RFC 7662: introspection answers only {"active": false}; the Auth service knows why.
EXPIRED = {
    "local": "token expired",
    "jwks": "token expired",
    "thrift": "token expired",
    "introspect": "token not active",
}


@pytest.mark.parametrize("mode", VERIFIER_MODES)
def test_expired_tokens_are_refused_for_being_expired(
    mode: str, make_verifier: Any, token_factory: TokenFactory, auth_server: Any
) -> None:
    verifier = make_verifier(mode, cache_ttl_s=0)
    options: dict[str, Any] = {"client_id": "notes-app", "jti": f"note-{mode}"}
    expired = token_factory.expired("nina", NOTES_SCOPES, **options)
    valid = token_factory.mint("nina", NOTES_SCOPES, **options)

    # The same token but for its times (and its own Token Status List entry): everything
    # else is right for the service.
    spoiled, good = claims_of(expired), claims_of(valid)
    own = (*TIMES, "status")
    assert {k: v for k, v in spoiled.items() if k not in own} == {
        k: v for k, v in good.items() if k not in own
    }
    assert spoiled["exp"] <= time.time() - EXPIRED_FOR_S + 1
    assert jwt.get_unverified_header(expired) == jwt.get_unverified_header(valid)

    assert verifier.verify(valid).subject == "nina"
    assert refusal(verifier, expired) == EXPIRED[mode]
    with pytest.raises(TokenRejected, match=r"^token expired$"):
        auth_server.service.validate(expired)


def test_expired_takes_a_reference_time_and_a_lifetime(token_factory: TokenFactory) -> None:
    now = time.time()
    claims = claims_of(token_factory.expired(scopes=NOTES_SCOPES, now=now, ttl_s=120))
    assert claims["exp"] == int(now) - EXPIRED_FOR_S
    assert claims["exp"] - claims["iat"] == 120
    assert claims["scope"] == " ".join(NOTES_SCOPES)


@pytest.mark.parametrize("mode", ["local", "jwks"])
def test_a_posts_token_is_refused_by_a_notes_verifier(
    mode: str, make_verifier: Any, token_factory: TokenFactory
) -> None:
    for_posts = token_factory.mint("nina", NOTES_SCOPES, audience="posts")
    assert refusal(make_verifier(mode), for_posts) == "wrong audience"
    # ...and accepted by a verifier for the audience it names.
    assert make_verifier(mode, audience="posts").verify(for_posts).subject == "nina"


@pytest.mark.parametrize("mode", VERIFIER_MODES)
def test_forged_tokens_are_refused(
    mode: str, make_verifier: Any, token_factory: TokenFactory
) -> None:
    forged = token_factory.forged("nina", NOTES_SCOPES)
    assert TokenFactory.kid_of(forged) == token_factory.key.kid
    reason = refusal(make_verifier(mode, cache_ttl_s=0), forged)
    if mode in ("local", "jwks"):
        assert reason == "invalid token signature"


def test_local_mode_with_an_hs256_auth_server(
    make_auth_server: Any, make_verifier: Any, tmp_path: Any
) -> None:
    secret = tmp_path / "hs256.secret"
    secret.write_bytes(b"s" * 32)
    hs = make_auth_server(audience="notes", alg="HS256", hs256_secret_file=secret)
    factory = TokenFactory.for_auth_server(hs, scopes=NOTES_SCOPES)
    verifier = make_verifier("local", auth=hs)
    assert verifier.verify(factory.mint("nina")).scopes == frozenset(NOTES_SCOPES)
    assert refusal(verifier, factory.expired("nina")) == "token expired"


def test_introspect_client_registered_once_per_auth_server(
    make_verifier: Any, make_auth_server: Any, token_factory: TokenFactory
) -> None:
    token = token_factory.mint("nina", NOTES_SCOPES)
    first, second = make_verifier("introspect"), make_verifier("introspect")
    assert first.verify(token).subject == second.verify(token).subject == "nina"
    other = make_auth_server(audience="notes")
    theirs = TokenFactory.for_auth_server(other).mint("nina", NOTES_SCOPES)
    assert make_verifier("introspect", auth=other).verify(theirs).subject == "nina"
    assert refusal(make_verifier("local", auth=other), token) == "invalid token signature"


def test_unknown_mode_is_a_value_error(make_verifier: Any) -> None:
    with pytest.raises(ValueError, match="unknown verification mode"):
        make_verifier("telepathy")


def test_the_auth_plugin_imports_neither_posts_nor_the_client() -> None:
    """The Auth side's plugin never reaches up (tests/test_layers.py reads every import)."""
    code = (
        "import sys, auth_rpc.testing\n"
        "up = sorted(m for m in sys.modules if m.split('.')[0] in ('posts_rpc', 'client'))\n"
        "assert not up, up\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
