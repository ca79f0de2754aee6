"""AuthService end to end (in process): grants, refresh families, revocation, keys, throttling."""

from __future__ import annotations

import logging
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest

from auth_rpc.auth.keys import KEY_ACTIVATION_DELAY_S, RETIRE_SLACK_S, SigningKey
from auth_rpc.auth.service import USER_CLIENT_ID, AuthService, IssuedTokens
from auth_rpc.auth.tokens import mint_access_token
from auth_rpc.errors import (
    DependencyUnavailable,
    InvalidCredentials,
    InvalidInput,
    Throttled,
    TokenRejected,
)

ISSUER = "https://auth.test"
AUDIENCE = "posts"
PASSWORD = "correct horse battery staple"


@contextmanager
def stored(service: AuthService) -> Iterator[Any]:
    """A connection to ``service``'s database, SQLite or PostgreSQL (``?`` statements)."""
    with service._db.read() as conn:
        yield conn


def jwk_list(jwk_set: dict[str, object]) -> list[dict[str, str]]:
    keys = jwk_set["keys"]
    assert isinstance(keys, list)
    return keys


def header(token: str) -> dict[str, Any]:
    return jwt.get_unverified_header(token)


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# -- login -------------------------------------------------------------------


def test_login_issues_rfc9068_access_token_and_refresh_token(
    service: AuthService, alice: str
) -> None:
    tokens = service.login(alice, PASSWORD)
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in == 900
    assert tokens.scope == "posts:read posts:write"
    h = header(tokens.access_token)
    assert h["typ"] == "at+jwt" and h["alg"] == "EdDSA" and h["kid"]
    c = claims(tokens.access_token)
    assert c["iss"] == ISSUER and c["aud"] == AUDIENCE and c["sub"] == "alice"
    assert c["client_id"] == USER_CLIENT_ID
    assert c["exp"] - c["iat"] == 900
    assert len(c["jti"]) >= 22  # >= 128 bits base64url
    assert c["scope"] == "posts:read posts:write"
    assert len(tokens.refresh_token) >= 43 and "." not in tokens.refresh_token


def test_login_token_verifies_with_plain_pyjwt_and_the_jwks(
    service: AuthService, alice: str
) -> None:
    token = service.login(alice, PASSWORD).access_token
    jwks = jwt.PyJWKSet.from_dict(service.jwks())
    key = next(k for k in jwks.keys if k.key_id == header(token)["kid"])
    decoded = jwt.decode(token, key.key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER)
    assert decoded["sub"] == "alice"


def test_login_narrows_scope(service: AuthService, alice: str) -> None:
    tokens = service.login(alice, PASSWORD, "posts:read")
    assert tokens.scope == "posts:read"
    assert service.validate(tokens.access_token).scopes == frozenset({"posts:read"})


def test_login_refuses_scope_beyond_the_user(service: AuthService, alice: str) -> None:
    with pytest.raises(InvalidInput) as info:
        service.login(alice, PASSWORD, "posts:admin")
    assert info.value.field == "scope"


def test_login_with_a_given_client_id(service: AuthService, alice: str) -> None:
    tokens = service.login(alice, PASSWORD, client_id="web")
    assert service.validate(tokens.access_token).client_id == "web"


@pytest.mark.parametrize("username", ["alice", "nobody"])
def test_wrong_password_and_unknown_user_give_one_message(
    service: AuthService, alice: str, username: str
) -> None:
    with pytest.raises(InvalidCredentials) as info:
        service.login(username, "wrong password")
    assert info.value.message == "invalid username or password"


@pytest.mark.parametrize(
    ("username", "password", "scope", "field"),
    [
        ("", PASSWORD, "", "username"),
        ("a" * 129, PASSWORD, "", "username"),
        ("al\x00ice", PASSWORD, "", "username"),
        (" alice", PASSWORD, "", "username"),
        ("alice", "", "", "password"),
        ("alice", "x" * 1025, "", "password"),
        ("alice", "é" * 513, "", "password"),  # 1026 bytes
        ("alice", PASSWORD, "posts:read\x00", "scope"),
        ("alice", PASSWORD, 'a"b', "scope"),
        ("alice", PASSWORD, "x" * 1025, "scope"),
    ],
)
def test_login_input_validation(
    service: AuthService, alice: str, username: str, password: str, scope: str, field: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        service.login(username, password, scope)
    assert info.value.field == field


def test_login_accepts_long_limits(service: AuthService) -> None:
    name, password = "n" * 64, "p" * 1024
    service.add_user(name, password, "posts:read")
    assert service.validate(service.login(name, password).access_token).subject == name
    # A 128-character name made before the name rule (64 at most for new ones) still logs in.
    with pytest.raises(InvalidInput, match="username"):
        service.add_user("o" * 128, password, "posts:read")
    service._accounts.add_user(
        "o" * 128, service._hasher.hash(password), ("posts:read",), now=int(time.time())
    )
    assert service.validate(service.login("o" * 128, password).access_token).subject == "o" * 128


# -- throttling ----------------------------------------------------------------


def fail(service: AuthService, username: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(InvalidCredentials):
            service.login(username, "wrong password")


@pytest.mark.parametrize("username", ["alice", "nobody"])
def test_login_throttled_after_five_failures(
    service: AuthService, alice: str, clock: Any, username: str
) -> None:
    fail(service, username, 5)
    with pytest.raises(Throttled) as info:
        service.login(username, PASSWORD)
    assert info.value.retry_after_ms == 60_000
    assert "retry" in info.value.message


def test_throttling_is_the_same_for_known_and_unknown_users(
    service: AuthService, alice: str, clock: Any
) -> None:
    outcomes: dict[str, list[tuple[str, int]]] = {}
    for name in ("alice", "nobody"):
        seen = []
        for _ in range(7):
            try:
                service.login(name, "wrong password")
            except InvalidCredentials as exc:
                seen.append((exc.message, 0))
            except Throttled as exc:
                seen.append((exc.message, exc.retry_after_ms))
                clock.advance(exc.retry_after_ms / 1000)
        outcomes[name] = seen
    assert outcomes["alice"] == outcomes["nobody"]
    assert [ms for _, ms in outcomes["alice"]] == [0, 0, 0, 0, 0, 60_000, 0]


def test_throttle_delay_doubles_and_is_capped(service: AuthService, alice: str, clock: Any) -> None:
    fail(service, "alice", 5)
    delays = []
    for _ in range(6):
        with pytest.raises(Throttled) as info:
            service.login("alice", PASSWORD)
        delays.append(info.value.retry_after_ms)
        clock.advance(info.value.retry_after_ms / 1000)
        fail(service, "alice", 1)
    assert delays == [60_000, 120_000, 240_000, 480_000, 900_000, 900_000]


def test_owner_logs_in_after_the_delay_and_success_resets(
    service: AuthService, alice: str, clock: Any
) -> None:
    fail(service, "alice", 5)
    with pytest.raises(Throttled):
        service.login("alice", PASSWORD)
    clock.advance(60)
    service.login("alice", PASSWORD)
    fail(service, "alice", 4)  # counting starts again from zero
    service.login("alice", PASSWORD)


def test_failures_age_out_of_the_window(service: AuthService, alice: str, clock: Any) -> None:
    fail(service, "alice", 4)
    clock.advance(15 * 60 + 1)
    fail(service, "alice", 4)
    service.login("alice", PASSWORD)


def test_throttling_one_user_does_not_affect_another(service: AuthService, alice: str) -> None:
    service.add_user("bob", PASSWORD, "posts:read")
    fail(service, "alice", 5)
    service.login("bob", PASSWORD)


# -- refresh -------------------------------------------------------------------


def test_refresh_rotates_and_keeps_the_family_scopes(
    service: AuthService, alice: str, clock: Any
) -> None:
    first = service.login(alice, PASSWORD, "posts:read")
    clock.advance(100)
    second = service.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert second.scope == "posts:read"
    principal = service.validate(second.access_token)
    assert principal.subject == "alice" and principal.client_id == USER_CLIENT_ID
    assert claims(second.access_token)["iat"] == claims(first.access_token)["iat"] + 100
    third = service.refresh(second.refresh_token)
    assert service.validate(third.access_token).scopes == frozenset({"posts:read"})


def test_refresh_may_narrow_but_not_widen(service: AuthService, alice: str) -> None:
    first = service.login(alice, PASSWORD)
    narrowed = service.refresh(first.refresh_token, "posts:write")
    assert narrowed.scope == "posts:write"
    # The family keeps its scopes: the next refresh may ask for all again.
    again = service.refresh(narrowed.refresh_token)
    assert again.scope == "posts:read posts:write"
    with pytest.raises(InvalidInput):
        service.refresh(again.refresh_token, "posts:admin")
    # A refused scope does not consume the token.
    service.refresh(again.refresh_token)


def test_reused_refresh_token_revokes_the_family_and_its_access_tokens(
    service: AuthService, alice: str
) -> None:
    first = service.login(alice, PASSWORD)
    second = service.refresh(first.refresh_token)
    third = service.refresh(second.refresh_token)
    with pytest.raises(TokenRejected, match="reused"):
        service.refresh(first.refresh_token)  # the attacker's (or victim's) replay
    for tokens in (first, second, third):
        with pytest.raises(TokenRejected, match="revoked"):
            service.validate(tokens.access_token)
    with pytest.raises(TokenRejected):
        service.refresh(third.refresh_token)  # the live one of the family is dead too


def test_reuse_does_not_touch_other_families(service: AuthService, alice: str) -> None:
    mine = service.login(alice, PASSWORD)
    other = service.login(alice, PASSWORD)
    service.refresh(mine.refresh_token)
    with pytest.raises(TokenRejected):
        service.refresh(mine.refresh_token)
    service.validate(other.access_token)
    service.refresh(other.refresh_token)


def test_ten_concurrent_refreshes_give_exactly_one_success(
    service: AuthService, alice: str
) -> None:
    token = service.login(alice, PASSWORD).refresh_token
    barrier = threading.Barrier(10)
    results: list[object] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            outcome: object = service.refresh(token)
        except TokenRejected as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 10
    assert sum(isinstance(r, IssuedTokens) for r in results) == 1
    assert sum(isinstance(r, TokenRejected) for r in results) == 9


def test_refresh_family_lifetime_is_absolute(service: AuthService, alice: str, clock: Any) -> None:
    tokens = service.login(alice, PASSWORD)
    for _ in range(13):
        clock.advance(86400)
        tokens = service.refresh(tokens.refresh_token)
    clock.advance(86400)
    with pytest.raises(TokenRejected, match="expired"):
        service.refresh(tokens.refresh_token)


@pytest.mark.parametrize("token", ["nope", "a" * 43, "x.y.z"])
def test_refresh_refuses_unknown_tokens(service: AuthService, alice: str, token: str) -> None:
    with pytest.raises(TokenRejected):
        service.refresh(token)


def test_refresh_refuses_an_access_token(service: AuthService, alice: str) -> None:
    with pytest.raises(TokenRejected):
        service.refresh(service.login(alice, PASSWORD).access_token)


@pytest.mark.parametrize("token", ["", "a" * 8193])
def test_refresh_input_validation(service: AuthService, token: str) -> None:
    with pytest.raises(InvalidInput) as info:
        service.refresh(token)
    assert info.value.field == "refresh_token"


# -- client credentials --------------------------------------------------------


@pytest.fixture
def svc_secret(service: AuthService) -> str:
    return service.add_client("svc", ["posts:read", "posts:admin"])


def test_client_token(service: AuthService, svc_secret: str) -> None:
    tokens = service.client_token("svc", svc_secret)
    assert tokens.refresh_token == "" and tokens.token_type == "Bearer"
    assert tokens.scope == "posts:admin posts:read"
    p = service.validate(tokens.access_token)
    assert (p.subject, p.client_id) == ("svc", "svc")
    narrowed = service.client_token("svc", svc_secret, "posts:read")
    assert service.validate(narrowed.access_token).scopes == frozenset({"posts:read"})


def test_client_token_refuses_scope_beyond_the_client(
    service: AuthService, svc_secret: str
) -> None:
    with pytest.raises(InvalidInput):
        service.client_token("svc", svc_secret, "posts:write")


@pytest.mark.parametrize("client_id", ["svc", "unknown"])
def test_client_token_bad_credentials(
    service: AuthService, svc_secret: str, client_id: str
) -> None:
    with pytest.raises(InvalidCredentials) as info:
        service.client_token(client_id, "wrong" + svc_secret)
    assert info.value.message == "invalid client credentials"


@pytest.mark.parametrize(
    ("client_id", "secret", "field"),
    [("", "s", "client_id"), ("c" * 129, "s", "client_id"), ("svc", "", "client_secret")],
)
def test_client_token_input_validation(
    service: AuthService, client_id: str, secret: str, field: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        service.client_token(client_id, secret)
    assert info.value.field == field


def test_client_token_failures_throttled_not_the_client(
    service: AuthService, svc_secret: str, clock: Any
) -> None:
    for _ in range(5):
        with pytest.raises(InvalidCredentials):
            service.client_token("svc", "wrong")
    with pytest.raises(Throttled):
        service.client_token("svc", "wrong")
    service.client_token("svc", svc_secret)  # the right secret is never locked out
    clock.advance(60)
    with pytest.raises(InvalidCredentials):
        service.client_token("svc", "wrong")


def test_authenticate_client(service: AuthService, svc_secret: str) -> None:
    assert service.authenticate_client("svc", svc_secret) == "svc"
    for client_id, secret in [("svc", "bad"), ("unknown", svc_secret), ("", ""), ("svc", "")]:
        with pytest.raises(InvalidCredentials):
            service.authenticate_client(client_id, secret)


def test_client_secret_is_stored_hashed(
    service: AuthService, svc_secret: str, data_dir: Path
) -> None:
    with stored(service) as conn:
        rows = conn.execute("SELECT * FROM clients").fetchall()
    assert svc_secret not in repr(rows)
    assert rows[0][1].startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    for path in data_dir.glob("auth.sqlite3*"):
        assert svc_secret.encode() not in path.read_bytes()


# -- validate / introspect -----------------------------------------------------


def test_validate_returns_the_principal(service: AuthService, alice: str) -> None:
    token = service.login(alice, PASSWORD).access_token
    p = service.validate(token)
    c = claims(token)
    assert p.subject == "alice"
    assert p.scopes == frozenset({"posts:read", "posts:write"})
    assert p.expires_at == c["exp"] and p.token_id == c["jti"]
    assert p.issuer == ISSUER and p.audience == (AUDIENCE,)
    assert service.verify(token) == p


def test_validate_refuses_expired_tokens_after_the_leeway(
    service: AuthService, alice: str, clock: Any
) -> None:
    token = service.login(alice, PASSWORD).access_token
    clock.advance(900 + 29)
    service.validate(token)
    clock.advance(2)
    with pytest.raises(TokenRejected, match="expired"):
        service.validate(token)


def test_introspect_active(service: AuthService, alice: str) -> None:
    token = service.login(alice, PASSWORD).access_token
    body = service.introspect(token)
    c = claims(token)
    assert body == {
        "active": True,
        "scope": "posts:read posts:write",
        "client_id": USER_CLIENT_ID,
        "sub": "alice",
        "username": "alice",
        "exp": c["exp"],
        "iat": c["iat"],
        "nbf": c["nbf"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "jti": c["jti"],
        "token_type": "Bearer",
    }


def test_introspect_inactive(service: AuthService, alice: str, clock: Any) -> None:
    tokens = service.login(alice, PASSWORD)
    assert service.introspect("garbage") == {"active": False}
    assert service.introspect("") == {"active": False}
    assert service.introspect("x" * 10_000) == {"active": False}
    assert service.introspect(tokens.refresh_token) == {"active": False}
    revoked = service.login(alice, PASSWORD).access_token
    service.revoke(revoked)
    assert service.introspect(revoked) == {"active": False}
    clock.advance(1000)
    assert service.introspect(tokens.access_token) == {"active": False}


# -- revoke --------------------------------------------------------------------


def test_revoke_access_token_is_idempotent_and_survives_restart(
    open_service: Callable[..., AuthService], clock: Any
) -> None:
    service = open_service()
    service.add_user("alice", PASSWORD, "posts:read")
    token = service.login("alice", PASSWORD).access_token
    service.revoke(token)
    service.revoke(token)
    with pytest.raises(TokenRejected, match="revoked"):
        service.validate(token)
    service.close()
    reopened = open_service()
    with pytest.raises(TokenRejected, match="revoked"):
        reopened.validate(token)


def test_revoke_refresh_token_revokes_its_family(service: AuthService, alice: str) -> None:
    first = service.login(alice, PASSWORD)
    second = service.refresh(first.refresh_token)
    service.revoke(second.refresh_token)
    service.revoke(second.refresh_token)
    with pytest.raises(TokenRejected):
        service.refresh(second.refresh_token)
    for tokens in (first, second):
        with pytest.raises(TokenRejected):
            service.validate(tokens.access_token)


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "a" * 43, "é"])
def test_revoke_unknown_token_is_a_no_op(service: AuthService, alice: str, token: str) -> None:
    keep = service.login(alice, PASSWORD).access_token
    service.revoke(token)
    service.validate(keep)


def test_revoke_ignores_foreign_jwts(service: AuthService, alice: str) -> None:
    keep = service.login(alice, PASSWORD).access_token
    foreign = mint_access_token(
        SigningKey.generate("EdDSA", kid=header(keep)["kid"]),
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="alice",
        scopes="posts:read",
        client_id="x",
        ttl_s=60,
        now=claims(keep)["iat"],
        jti=claims(keep)["jti"],
    )
    service.revoke(foreign)  # same jti, but not signed by us: must not revoke ours
    service.validate(keep)


@pytest.mark.parametrize("token", ["", "a" * 8193])
def test_revoke_input_validation(service: AuthService, token: str) -> None:
    with pytest.raises(InvalidInput) as info:
        service.revoke(token)
    assert info.value.field == "token"


def test_revoked_rows_are_purged_after_expiry(
    service: AuthService, alice: str, clock: Any, data_dir: Path
) -> None:
    token = service.login(alice, PASSWORD).access_token
    service.revoke(token)
    clock.advance(3600)
    service.revoke("garbage")  # any write path purges opportunistically
    with stored(service) as conn:
        assert conn.execute("SELECT COUNT(*) FROM revoked_tokens").fetchone()[0] == 0


# -- keys ----------------------------------------------------------------------


def test_key_file_and_data_dir_modes(service: AuthService, data_dir: Path) -> None:
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "keys").stat().st_mode) == 0o700
    files = list((data_dir / "keys").iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "auth.sqlite3").stat().st_mode) == 0o600


def test_key_is_made_once_and_reused(open_service: Callable[..., AuthService]) -> None:
    first = open_service()
    kid = first.signing_key().kid
    first.close()
    assert open_service().signing_key().kid == kid


def test_key_rotation(service: AuthService, alice: str, clock: Any, data_dir: Path) -> None:
    old = service.login(alice, PASSWORD)
    old_kid = header(old.access_token)["kid"]
    clock.advance(10)
    new_kid = service.rotate_key()
    assert new_kid != old_kid
    # Published at once, signing only once verifiers have had time to fetch it.
    assert [k["kid"] for k in jwk_list(service.jwks())] == [new_kid, old_kid]
    assert header(service.login(alice, PASSWORD).access_token)["kid"] == old_kid
    clock.advance(KEY_ACTIVATION_DELAY_S)
    new = service.login(alice, PASSWORD)
    assert header(new.access_token)["kid"] == new_kid
    service.validate(old.access_token)
    assert [k["kid"] for k in jwk_list(service.jwks())] == [new_kid, old_kid]
    # A refresh after rotation is signed by the new key.
    assert header(service.refresh(old.refresh_token).access_token)["kid"] == new_kid
    clock.advance(900 + RETIRE_SLACK_S - 1)
    assert len(jwk_list(service.jwks())) == 2
    clock.advance(2)
    assert [k["kid"] for k in jwk_list(service.jwks())] == [new_kid]
    service.rotate_key()  # a reload drops the retired key's file
    assert not (data_dir / "keys" / f"{old_kid}.pem").exists()


def test_rotation_by_another_process_is_seen(
    open_service: Callable[..., AuthService], alice: str, service: AuthService
) -> None:
    admin = open_service(create_key=False)
    new_kid = admin.rotate_key(activate_after_s=0)  # an emergency rotation: signs at once
    token = mint_access_token(
        admin.signing_key(),
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="alice",
        scopes="posts:read",
        client_id="c",
        ttl_s=60,
        now=service._clock(),
    )
    assert service.validate(token).subject == "alice"  # an unknown kid triggers a reload
    assert service.signing_key().kid == new_kid


def test_rotation_to_another_algorithm(service: AuthService, alice: str, clock: Any) -> None:
    old = service.login(alice, PASSWORD).access_token
    service.rotate_key("ES256")
    clock.advance(KEY_ACTIVATION_DELAY_S)
    new = service.login(alice, PASSWORD).access_token
    assert header(new)["alg"] == "ES256"
    service.validate(old)
    service.validate(new)


def test_admin_open_makes_no_key(open_service: Callable[..., AuthService], data_dir: Path) -> None:
    admin = open_service(create_key=False)
    admin.add_user("alice", PASSWORD, "posts:read")
    with pytest.raises(DependencyUnavailable):
        admin.login("alice", PASSWORD)
    assert not admin.healthy()
    assert admin.jwks() == {"keys": []}


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_each_asymmetric_algorithm(open_service: Callable[..., AuthService], alg: str) -> None:
    service = open_service(alg=alg)
    service.add_user("alice", PASSWORD, "posts:read")
    token = service.login("alice", PASSWORD).access_token
    assert header(token)["alg"] == alg
    assert service.validate(token).subject == "alice"
    (jwk,) = jwk_list(service.jwks())
    assert jwk["alg"] == alg and "d" not in jwk


def test_switching_algorithm_on_restart_keeps_old_tokens_valid(
    open_service: Callable[..., AuthService], clock: Any
) -> None:
    first = open_service()
    first.add_user("alice", PASSWORD, "posts:read")
    token = first.login("alice", PASSWORD).access_token
    first.close()
    second = open_service(alg="RS256")
    # The RS256 key is published first; the EdDSA key signs until verifiers can know it.
    assert {k["alg"] for k in jwk_list(second.jwks())} == {"EdDSA", "RS256"}
    assert header(second.login("alice", PASSWORD).access_token)["alg"] == "EdDSA"
    clock.advance(KEY_ACTIVATION_DELAY_S)
    assert header(second.login("alice", PASSWORD).access_token)["alg"] == "RS256"
    second.validate(token)


def test_hs256(open_service: Callable[..., AuthService], tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"s" * 32 + b"\n")
    service = open_service(alg="HS256", hs256_secret_file=secret_file)
    service.add_user("alice", PASSWORD, "posts:read")
    token = service.login("alice", PASSWORD).access_token
    assert header(token)["alg"] == "HS256"
    assert jwt.decode(token, b"s" * 32, algorithms=["HS256"], audience=AUDIENCE)["sub"] == "alice"
    assert service.validate(token).subject == "alice"
    assert service.jwks() == {"keys": []}  # the secret is never published
    with pytest.raises(ValueError, match="HS256"):
        service.rotate_key()


def test_hs256_refuses_a_short_secret(
    open_service: Callable[..., AuthService], tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"s" * 31 + b"\n")
    with pytest.raises(ValueError, match="at least 32"):
        open_service(alg="HS256", hs256_secret_file=secret_file)


def test_hs256_needs_a_secret_file(open_service: Callable[..., AuthService]) -> None:
    with pytest.raises(ValueError, match="hs256_secret_file"):
        open_service(alg="HS256")


@pytest.mark.parametrize(
    "overrides",
    [
        {"alg": "none"},
        {"alg": "HS512"},
        {"issuer": ""},
        {"audience": ""},
        {"access_ttl_s": 0},
        {"refresh_ttl_s": 0},
    ],
)
def test_settings_validation(
    open_service: Callable[..., AuthService], overrides: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        open_service(**overrides)


# -- admin -----------------------------------------------------------------------


def test_add_user_refuses_duplicates_and_bad_input(service: AuthService, alice: str) -> None:
    with pytest.raises(InvalidInput) as info:
        service.add_user("alice", PASSWORD, "posts:read")
    assert info.value.field == "username"
    with pytest.raises(InvalidInput):
        service.add_user("bob", "", "posts:read")
    with pytest.raises(InvalidInput):
        service.add_user("bob", PASSWORD, ["posts read"])


def test_add_client_refuses_duplicates(service: AuthService) -> None:
    service.add_client("svc", "posts:read")
    with pytest.raises(InvalidInput) as info:
        service.add_client("svc", "posts:read")
    assert info.value.field == "client_id"


def test_add_client_returns_distinct_strong_secrets(service: AuthService) -> None:
    a, b = service.add_client("a"), service.add_client("b")
    assert a != b and len(a) >= 43


# -- failures of the database ------------------------------------------------------


def test_database_failure_is_dependency_unavailable(
    service: AuthService, alice: str, data_dir: Path
) -> None:
    token = service.login(alice, PASSWORD).access_token
    conn = sqlite3.connect(data_dir / "auth.sqlite3")
    conn.execute("DROP TABLE revoked_tokens")
    conn.execute("DROP TABLE status_bits")  # where a token's revocation is recorded
    conn.commit()
    conn.close()
    with pytest.raises(DependencyUnavailable):
        service.validate(token)
    with pytest.raises(DependencyUnavailable):
        service.revoke(token)
    assert service.introspect("garbage") == {"active": False}


def test_closed_service(service: AuthService, alice: str) -> None:
    tokens = service.login(alice, PASSWORD)
    assert service.healthy()
    service.close()
    service.close()
    assert not service.healthy()
    for call in (
        lambda: service.login(alice, PASSWORD),
        lambda: service.refresh(tokens.refresh_token),
        lambda: service.validate(tokens.access_token),
        lambda: service.revoke(tokens.access_token),
        lambda: service.introspect(tokens.access_token),
    ):
        with pytest.raises(DependencyUnavailable):
            call()


# -- logs ---------------------------------------------------------------------------


def test_no_secret_in_any_log_output(
    service: AuthService, caplog: pytest.LogCaptureFixture, clock: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    service.add_user("alice", PASSWORD, "posts:read")
    client_secret = service.add_client("svc", "posts:read")
    secrets_seen: list[str] = [PASSWORD, client_secret]
    tokens = service.login("alice", PASSWORD)
    secrets_seen += [tokens.access_token, tokens.refresh_token]
    rotated = service.refresh(tokens.refresh_token)
    secrets_seen += [rotated.access_token, rotated.refresh_token]
    with pytest.raises(TokenRejected):
        service.refresh(tokens.refresh_token)  # reuse: logged as a warning
    fail(service, "alice", 5)
    with pytest.raises(Throttled):
        service.login("alice", PASSWORD)
    wrong = "not-the-password-" + PASSWORD
    with pytest.raises(Throttled):
        service.login("alice", wrong)
    secrets_seen.append(wrong)
    ct = service.client_token("svc", client_secret)
    secrets_seen.append(ct.access_token)
    service.revoke(ct.access_token)
    with pytest.raises(TokenRejected):
        service.validate(ct.access_token)
    service.rotate_key()
    clock.advance(10_000)
    service.jwks()
    text = caplog.text + "".join(repr(r.args) + repr(r.__dict__) for r in caplog.records)
    assert caplog.records  # something was logged
    for secret in secrets_seen:
        assert secret not in text
    for piece in (PASSWORD, "BEGIN PRIVATE KEY"):
        assert piece not in text
    assert tokens.access_token.split(".")[2] not in text
    assert repr(tokens).find(tokens.access_token) == -1


def test_owner_logs_in_once_the_window_has_passed(
    service: AuthService, alice: str, clock: Any
) -> None:
    fail(service, "alice", 5)
    for _ in range(4):  # an attacker keeps guessing at every opening
        with pytest.raises(Throttled) as info:
            service.login("alice", PASSWORD)
        clock.advance(info.value.retry_after_ms / 1000)
        fail(service, "alice", 1)
    with pytest.raises(Throttled) as info:
        service.login("alice", PASSWORD)
    assert info.value.retry_after_ms <= 15 * 60 * 1000
    clock.advance(15 * 60 + 1)
    assert service.login("alice", PASSWORD).access_token


def test_a_database_failure_during_login_is_not_a_guess(
    service: AuthService, alice: str, data_dir: Path
) -> None:
    fail(service, "alice", 4)
    conn = sqlite3.connect(data_dir / "auth.sqlite3")
    conn.execute("ALTER TABLE users RENAME TO users_moved")
    conn.commit()
    for _ in range(3):
        with pytest.raises(DependencyUnavailable):
            service.login("alice", PASSWORD)
    conn.execute("ALTER TABLE users_moved RENAME TO users")
    conn.commit()
    conn.close()
    service.login("alice", PASSWORD)  # not throttled: outages are not failures


def test_unknown_user_costs_one_argon2_verification_like_a_wrong_password(
    service: AuthService, alice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str | None] = []
    real_verify = service._hasher.verify

    def spy(stored_hash: str | None, secret: str) -> bool:
        calls.append(stored_hash)
        return real_verify(stored_hash, secret)

    monkeypatch.setattr(service._hasher, "verify", spy)
    with pytest.raises(InvalidCredentials):
        service.login("nobody", "wrong password")
    with pytest.raises(InvalidCredentials):
        service.login("alice", "wrong password")
    assert len(calls) == 2
    assert calls[0] is None  # verified against the dummy hash made at startup
    assert calls[1] is not None and calls[1].startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def test_loose_file_modes_are_tightened_on_open(
    open_service: Callable[..., AuthService], data_dir: Path
) -> None:
    open_service().close()
    db_file = data_dir / "auth.sqlite3"
    (key_file,) = (data_dir / "keys").iterdir()
    for path, mode in ((data_dir, 0o755), (db_file, 0o644), (key_file, 0o644)):
        path.chmod(mode)
    open_service()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
