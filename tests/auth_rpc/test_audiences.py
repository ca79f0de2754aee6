"""RFC 8707 resource indicators: one Auth service, tokens for several audiences.

At the service (:class:`AuthService`), over Thrift (``Auth.login``,
``refresh``, ``client_token`` with their added ``audience`` argument) and
over HTTP (``/token`` with ``resource``), against real servers on 127.0.0.1;
and a database made by schema v3 migrated to v4.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import requests

from auth_rpc.auth.accounts import MAX_AUDIENCES
from auth_rpc.auth.db import MIGRATIONS, SCHEMA_VERSION, Database
from auth_rpc.auth.http import oauth_error_for
from auth_rpc.auth.passwords import SecretHasher
from auth_rpc.auth.service import AUDIENCE_REFUSED, DB_FILENAME, AuthService
from auth_rpc.auth.tokens import hash_refresh_token, mint_access_token
from auth_rpc.errors import InvalidCredentials, InvalidInput, TokenRejected
from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.transport import open_client

ISSUER = "https://auth.test"  # the issuer and audience of the local `service` fixture
AUDIENCE = "posts"
PASSWORD = "correct horse battery staple"
NOTES = "notes"
SCOPES = ("notes:read", "posts:read")
TIMEOUT = 10
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def aud(token: str) -> Any:
    return jwt.decode(token, options={"verify_signature": False})["aud"]


@pytest.fixture
def nina(service: AuthService) -> str:
    """A user who may ask for tokens for posts (the default) and notes."""
    service.add_user("nina", PASSWORD, SCOPES, audiences=[AUDIENCE, NOTES])
    return "nina"


@pytest.fixture
def noah(service: AuthService) -> str:
    """A user who may ask for notes tokens only (not the service's default)."""
    service.add_user("noah", PASSWORD, SCOPES, audiences=[NOTES])
    return "noah"


@contextmanager
def stored(service: AuthService) -> Iterator[Any]:
    """A connection to ``service``'s database, SQLite or PostgreSQL (``?`` statements)."""
    with service._db.read() as conn:
        yield conn


def family_state(service: AuthService, refresh_token: str) -> tuple[Any, ...]:
    """(used_at of the token, revoked_at of its family): what a refusal must not change."""
    with stored(service) as conn:
        row = conn.execute(
            "SELECT t.used_at, f.revoked_at FROM refresh_tokens t "
            "JOIN refresh_families f ON f.family_id = t.family_id WHERE t.token_hash = ?",
            (hash_refresh_token(refresh_token),),
        ).fetchone()
    assert row is not None
    return tuple(row)


def row_counts(service: AuthService) -> tuple[int, int, int]:
    with stored(service) as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("refresh_families", "refresh_tokens", "family_access_tokens")
        )


# -- the service ----------------------------------------------------------------


def test_without_an_audience_a_token_is_for_the_default_as_before(
    service: AuthService, alice: str
) -> None:
    pair = service.login(alice, PASSWORD)
    assert aud(pair.access_token) == AUDIENCE
    assert service.validate(pair.access_token).audience == (AUDIENCE,)
    assert aud(service.refresh(pair.refresh_token).access_token) == AUDIENCE
    secret = service.add_client("svc", "posts:read")
    assert aud(service.client_token("svc", secret).access_token) == AUDIENCE


def test_login_for_an_allowed_audience(service: AuthService, nina: str) -> None:
    pair = service.login(nina, PASSWORD, audience=NOTES)
    assert aud(pair.access_token) == NOTES
    principal = service.validate(pair.access_token)
    assert principal.audience == (NOTES,) and principal.subject == "nina"
    answer = service.introspect(pair.access_token)
    assert answer["active"] is True and answer["aud"] == NOTES
    # The default is among nina's audiences too, named or not.
    assert aud(service.login(nina, PASSWORD, audience=AUDIENCE).access_token) == AUDIENCE
    assert aud(service.login(nina, PASSWORD).access_token) == AUDIENCE


@pytest.mark.parametrize("audience", [NOTES, "wiki"])
def test_login_refuses_an_audience_the_user_may_not_use(
    service: AuthService, alice: str, audience: str
) -> None:
    # alice has no audiences stored: the default only. "notes" is another
    # account's, "wiki" nobody's: one answer for both.
    before = row_counts(service)
    with pytest.raises(InvalidInput) as refused:
        service.login(alice, PASSWORD, audience=audience)
    assert refused.value.field == "audience"
    assert refused.value.message == f"audience: {AUDIENCE_REFUSED}"
    assert row_counts(service) == before  # no family started, nothing issued


def test_an_account_without_the_default_must_name_its_audience(
    service: AuthService, noah: str
) -> None:
    with pytest.raises(InvalidInput, match=r"^audience: "):
        service.login(noah, PASSWORD)
    pair = service.login(noah, PASSWORD, audience=NOTES)
    assert aud(pair.access_token) == NOTES
    # A refresh without an audience keeps the login's.
    assert aud(service.refresh(pair.refresh_token).access_token) == NOTES


@pytest.mark.parametrize(
    "audience",
    ["", " notes", "notes ", "no tes", "notes\n", "-notes", "a" * 129, "nötes", "a#b", "a?b"],
)
def test_a_malformed_audience_is_refused_before_anything(
    service: AuthService, nina: str, audience: str
) -> None:
    pair = service.login(nina, PASSWORD)
    for grant in (
        lambda: service.login(nina, "wrong password", audience=audience),
        lambda: service.refresh(pair.refresh_token, audience=audience),
    ):
        with pytest.raises(InvalidInput, match=r"^audience: "):
            grant()
    assert family_state(service, pair.refresh_token) == (None, None)
    # Refused before the password was checked: no failure counted.
    service.login(nina, PASSWORD)


def test_refresh_may_ask_for_another_allowed_audience(service: AuthService, nina: str) -> None:
    pair = service.login(nina, PASSWORD)
    to_notes = service.refresh(pair.refresh_token, audience=NOTES)
    assert aud(to_notes.access_token) == NOTES
    assert service.validate(to_notes.access_token).subject == "nina"
    # The family is still nina's, of the same client, with its login's audience.
    back = service.refresh(to_notes.refresh_token)
    assert aud(back.access_token) == AUDIENCE
    assert service.validate(back.access_token).client_id == "auth-rpc"
    # ...and rotation still detects reuse across the audiences.
    with pytest.raises(TokenRejected, match="reused"):
        service.refresh(to_notes.refresh_token, audience=NOTES)


@pytest.mark.parametrize("audience", ["wiki", NOTES])
def test_a_refused_audience_leaves_the_refresh_token_unused(
    service: AuthService, alice: str, audience: str
) -> None:
    pair = service.login(alice, PASSWORD)
    before = row_counts(service)
    with pytest.raises(InvalidInput, match=r"^audience: "):
        service.refresh(pair.refresh_token, audience=audience)
    # Not consumed, not counted as reuse, the family and its tokens untouched.
    assert family_state(service, pair.refresh_token) == (None, None)
    assert row_counts(service) == before
    assert service.validate(pair.access_token).subject == "alice"
    again = service.refresh(pair.refresh_token)  # still usable, once
    assert aud(again.access_token) == AUDIENCE
    assert service.validate(pair.access_token).subject == "alice"  # no reuse detected


def test_client_token_for_its_audiences(service: AuthService) -> None:
    secret = service.add_client("notes-svc", "notes:read", audiences=[NOTES])
    token = service.client_token("notes-svc", secret, audience=NOTES).access_token
    assert aud(token) == NOTES
    assert service.validate(token).client_id == "notes-svc"
    for audience in (None, AUDIENCE, "wiki"):
        with pytest.raises(InvalidInput, match=r"^audience: "):
            service.client_token("notes-svc", secret, audience=audience)
    # The remembered authentication carries the audiences too.
    assert aud(service.client_token("notes-svc", secret, audience=NOTES).access_token) == NOTES
    # Wrong credentials stay wrong credentials, whatever the audience.
    with pytest.raises(InvalidCredentials):
        service.client_token("notes-svc", "not the secret", audience=NOTES)


@pytest.mark.parametrize(
    ("audiences", "message"),
    [
        ([], "at least one audience"),
        (["ok", "not ok"], "an audience name must be 1..128 characters of ASCII letters"),
        ([""], "an audience name must be"),
        (["x" * 129], "an audience name must be"),
        (["_x"], "starting with a letter or a digit"),
        ([f"a{i}" for i in range(MAX_AUDIENCES + 1)], f"at most {MAX_AUDIENCES} audiences"),
        ("notes", "must be a list of audience names"),
    ],
)
def test_admin_refuses_bad_audience_lists_and_makes_nothing(
    service: AuthService, audiences: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=f"^audience: .*{message}"):
        service.add_user("una", PASSWORD, SCOPES, audiences=audiences)
    with pytest.raises(InvalidInput, match=f"^audience: .*{message}"):
        service.add_client("uno", SCOPES, audiences=audiences)
    with pytest.raises(InvalidCredentials):
        service.login("una", PASSWORD)
    service.add_user("una", PASSWORD, SCOPES)  # the names are still free
    service.add_client("uno", SCOPES)


def test_admin_accepts_uri_audiences_and_drops_repeats(service: AuthService) -> None:
    uri = "https://notes.example.com/api"
    service.add_user("uri", PASSWORD, SCOPES, audiences=[uri, NOTES, uri])
    assert aud(service.login("uri", PASSWORD, audience=uri).access_token) == uri
    with stored(service) as conn:
        row = conn.execute("SELECT audiences FROM users WHERE username = 'uri'").fetchone()
    assert tuple(row) == (f"{uri} {NOTES}",)


def test_validate_accepts_the_audiences_accounts_may_use_and_no_other(
    service: AuthService, open_service: Callable[..., AuthService], clock: Any
) -> None:
    def token(audience: str | list[str]) -> str:
        return mint_access_token(
            service.signing_key(),
            issuer=ISSUER,
            audience=audience,
            subject="s",
            scopes="",
            client_id="c",
            ttl_s=60,
            now=clock(),
        )

    wiki = token("wiki")
    with pytest.raises(TokenRejected, match="wrong audience"):
        service.validate(wiki)
    assert service.introspect(wiki) == {"active": False}
    # Another process (an admin command) registers an account for "wiki":
    # this service knows the audience from then on, without a restart.
    admin = open_service(create_key=False)
    admin.add_client("wiki-svc", "wiki:read", audiences=["wiki"])
    assert service.validate(wiki).audience == ("wiki",)
    assert service.introspect(wiki)["aud"] == "wiki"
    # A list is accepted if one of its audiences is known (RFC 7519 4.1.3).
    assert service.validate(token(["elsewhere", "wiki"])).audience == ("elsewhere", "wiki")
    for bad in (token("elsewhere"), token([]), token(["a b"]), token(["x"] * 9)):
        with pytest.raises(TokenRejected, match="wrong audience"):
            service.validate(bad)


def test_revoke_works_for_every_audience(service: AuthService, nina: str) -> None:
    pair = service.login(nina, PASSWORD, audience=NOTES)
    service.revoke(pair.access_token)
    with pytest.raises(TokenRejected, match="revoked"):
        service.validate(pair.access_token)


# -- a v3 database --------------------------------------------------------------


def test_migration_from_v3_keeps_existing_accounts_on_the_default(
    data_dir: Path, open_service: Callable[..., AuthService], clock: Any
) -> None:
    """Accounts and a refresh token family made under schema v3 work unchanged after v4."""
    data_dir.mkdir(mode=0o700, parents=True)
    hasher = SecretHasher()
    secret = "a" * 43
    refresh_token = "r" * 43
    now = int(clock())
    db = Database.open(data_dir / DB_FILENAME, migrations=MIGRATIONS[:3])
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO users (username, password_hash, scopes, created_at) VALUES (?, ?, ?, ?)",
            ("olga", hasher.hash(PASSWORD), "posts:read", now),
        )
        conn.execute(
            "INSERT INTO clients (client_id, secret_hash, scopes, created_at) VALUES (?, ?, ?, ?)",
            ("old-svc", hasher.hash(secret), "posts:read", now),
        )
        conn.execute(
            "INSERT INTO refresh_families (family_id, subject, client_id, scopes, created_at, "
            "expires_at, revoked_at) VALUES ('f', 'olga', 'auth-rpc', 'posts:read', ?, ?, NULL)",
            (now, now + 3600),
        )
        conn.execute(
            "INSERT INTO refresh_tokens (token_hash, family_id, issued_at, used_at) "
            "VALUES (?, 'f', ?, NULL)",
            (hash_refresh_token(refresh_token), now),
        )
    assert db.schema_version == 3
    db.close()

    service = open_service()
    with sqlite3.connect(data_dir / DB_FILENAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT audiences FROM users").fetchall() == [(None,)]
        assert conn.execute("SELECT audiences FROM clients").fetchall() == [(None,)]
    assert aud(service.refresh(refresh_token).access_token) == AUDIENCE
    assert aud(service.login("olga", PASSWORD).access_token) == AUDIENCE
    assert aud(service.client_token("old-svc", secret).access_token) == AUDIENCE
    with pytest.raises(InvalidInput, match=r"^audience: "):
        service.login("olga", PASSWORD, audience=NOTES)


# -- over Thrift ---------------------------------------------------------------


@pytest.fixture
def auth(auth_server: Any) -> Any:
    """The plugin's Auth server (audience posts) with nina (posts, notes) and two clients."""
    auth_server.service.add_user("nina", PASSWORD, SCOPES, audiences=[AUDIENCE, NOTES])
    auth_server.service.add_user("alice", PASSWORD, SCOPES)
    return auth_server


@pytest.fixture
def thrift(auth: Any) -> Iterator[Any]:
    client = open_client(auth_thrift.Auth, "127.0.0.1", auth.port, timeout_s=30)
    yield client
    client.close()


def test_thrift_grants_with_and_without_an_audience(auth: Any, thrift: Any) -> None:
    # An older client sends no audience; a generated one may send "".
    assert aud(thrift.login("nina", PASSWORD).access_token) == AUDIENCE
    assert aud(thrift.login("nina", PASSWORD, "").access_token) == AUDIENCE
    pair = thrift.login("nina", PASSWORD, NOTES)
    assert aud(pair.access_token) == NOTES
    principal = thrift.validate(pair.access_token)
    assert principal.audience == NOTES and principal.issuer == auth.service.issuer
    rotated = thrift.refresh(pair.refresh_token, AUDIENCE)
    assert aud(rotated.access_token) == AUDIENCE
    assert aud(thrift.refresh(rotated.refresh_token).access_token) == NOTES  # the login's

    secret = auth.service.add_client("notes-svc", "notes:read", audiences=[NOTES])
    token = thrift.client_token("notes-svc", secret, "", NOTES).access_token
    assert aud(token) == NOTES and thrift.validate(token).audience == NOTES


def test_thrift_refusals_are_typed_and_change_nothing(auth: Any, thrift: Any) -> None:
    pair = thrift.login("alice", PASSWORD)
    for call in (
        lambda: thrift.login("alice", PASSWORD, NOTES),
        lambda: thrift.login("alice", PASSWORD, "wiki"),
        lambda: thrift.login("alice", PASSWORD, "not a name"),
        lambda: thrift.refresh(pair.refresh_token, NOTES),
        lambda: thrift.refresh(pair.refresh_token, "wiki"),
        lambda: thrift.client_token("nobody", "secret", "", "not a name"),
    ):
        with pytest.raises(common_thrift.InvalidArgument) as refused:
            call()
        assert refused.value.message.startswith("audience: ")
    # The refresh token was never consumed: it rotates once, normally.
    assert family_state(auth.service, pair.refresh_token) == (None, None)
    rotated = thrift.refresh(pair.refresh_token)
    assert thrift.validate(rotated.access_token).audience == AUDIENCE
    assert thrift.validate(pair.access_token).subject == "alice"  # no reuse detected
    secret = auth.service.add_client("posts-svc", "posts:read")
    with pytest.raises(common_thrift.InvalidArgument) as refused:
        thrift.client_token("posts-svc", secret, "", NOTES)
    assert refused.value.message == f"audience: {AUDIENCE_REFUSED}"


# -- over HTTP -----------------------------------------------------------------


def token_request(server: Any, data: Any, **kwargs: Any) -> requests.Response:
    return requests.post(server.http_url + "/token", data=data, timeout=TIMEOUT, **kwargs)


def password_grant(**extra: str) -> dict[str, str]:
    return {"grant_type": "password", "username": "nina", "password": PASSWORD, **extra}


def assert_invalid_target(r: requests.Response) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_target"
    assert "access_token" not in r.json()


def test_http_password_grant_with_a_resource(auth: Any) -> None:
    r = token_request(auth, password_grant(resource=NOTES))
    assert r.status_code == 200, r.text
    assert aud(r.json()["access_token"]) == NOTES
    r = token_request(auth, password_grant())
    assert r.status_code == 200 and aud(r.json()["access_token"]) == AUDIENCE


@pytest.mark.parametrize(
    ("body", "description"),
    [
        ({"resource": "wiki"}, "resource: " + AUDIENCE_REFUSED),
        ({"resource": "https://notes.example.com#x"}, "resource: an audience name must be"),
        ("resource=notes&resource=posts", "only one resource may be requested"),
        ("resource=notes&resource=notes", "only one resource may be requested"),
        ("resource=", "resource must not be empty"),
    ],
)
def test_http_bad_resources_are_invalid_target(auth: Any, body: Any, description: str) -> None:
    before = row_counts(auth.service)
    if isinstance(body, str):
        r = token_request(auth, f"{urlencode(password_grant())}&{body}", headers=FORM)
    else:
        r = token_request(auth, password_grant(**body))
    assert_invalid_target(r)
    assert r.json()["error_description"].startswith(description)
    assert row_counts(auth.service) == before


def test_http_alice_may_not_ask_for_notes(auth: Any) -> None:
    r = token_request(
        auth,
        {"grant_type": "password", "username": "alice", "password": PASSWORD, "resource": NOTES},
    )
    assert_invalid_target(r)


def test_http_refresh_grant_with_a_resource(auth: Any) -> None:
    login = token_request(auth, password_grant()).json()
    refresh = {"grant_type": "refresh_token", "refresh_token": login["refresh_token"]}
    # Refused: the refresh token is left as it was.
    assert_invalid_target(token_request(auth, {**refresh, "resource": "wiki"}))
    assert_invalid_target(token_request(auth, f"{urlencode(refresh)}&resource=", headers=FORM))
    assert family_state(auth.service, login["refresh_token"]) == (None, None)
    r = token_request(auth, {**refresh, "resource": NOTES})
    assert r.status_code == 200, r.text
    assert aud(r.json()["access_token"]) == NOTES
    assert r.json()["refresh_token"] != login["refresh_token"]
    # The old access token was not revoked by a reuse detection.
    assert auth.service.validate(login["access_token"]).subject == "nina"


def test_http_client_credentials_with_a_resource(auth: Any) -> None:
    secret = auth.service.add_client("notes-svc", "notes:read", audiences=[NOTES])
    grant = {"grant_type": "client_credentials"}
    r = token_request(auth, {**grant, "resource": NOTES}, auth=("notes-svc", secret))
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert aud(token) == NOTES
    assert_invalid_target(token_request(auth, grant, auth=("notes-svc", secret)))
    assert_invalid_target(
        token_request(auth, {**grant, "resource": AUDIENCE}, auth=("notes-svc", secret))
    )
    # RFC 7662: the introspection answer names the audience.
    introspector = auth.service.add_client("introspector", (), introspect=True)
    r = requests.post(
        auth.introspect_url,
        data={"token": token},
        auth=("introspector", introspector),
        timeout=TIMEOUT,
    )
    assert r.status_code == 200 and r.json()["active"] is True
    assert r.json()["aud"] == NOTES and r.json()["client_id"] == "notes-svc"


def test_resource_is_ignored_outside_the_token_endpoint(auth: Any) -> None:
    """/introspect takes no resource: one there neither helps nor breaks it."""
    secret = auth.service.add_client("introspector", (), introspect=True)
    token = token_request(auth, password_grant(resource=NOTES)).json()["access_token"]
    r = requests.post(
        auth.introspect_url,
        data={"token": token, "resource": "wiki"},
        auth=("introspector", secret),
        timeout=TIMEOUT,
    )
    assert r.status_code == 200 and r.json()["aud"] == NOTES


def test_an_audience_refusal_maps_to_invalid_target() -> None:
    error = oauth_error_for(InvalidInput("audience", AUDIENCE_REFUSED))
    assert (error.status, error.error) == (400, "invalid_target")
    assert error.description == "resource: " + AUDIENCE_REFUSED
    assert oauth_error_for(InvalidInput("username", "x")).error == "invalid_request"
