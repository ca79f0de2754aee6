"""``auth-rpc migrate``: a populated SQLite data directory moved to PostgreSQL keeps
working there: logins, refreshes, old tokens, old revocations, disabled accounts, keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest

from auth_rpc.auth.service import AuthService, AuthSettings
from auth_rpc.errors import InvalidCredentials, TokenRejected
from auth_rpc.testing import PostgresServer
from auth_rpc.verify.statuslist import StatusList

PASSWORD = "correct horse battery staple"
ISSUER = "https://auth.test"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _bits(service: AuthService, token: str) -> tuple[int, list[int]]:
    """The list id of ``token``'s status entry, and that list's bits as the service serves it."""
    claim = jwt.decode(token, options={"verify_signature": False})["status"]
    entry = service._status_lists.entry_of(claim)
    served = service._status_lists.token(entry.list_id).token
    payload = jwt.decode(served, options={"verify_signature": False})
    status_list = StatusList.from_json(payload["status_list"])
    return entry.list_id, [i for i in range(status_list.size) if status_list.get(i)]


def _key_states(service: AuthService) -> list[tuple[str, str]]:
    states = service.keys()  # a method, not a dict's
    return [(k.record.kid, k.state) for k in states]


def _populate(data_dir: Path) -> dict[str, Any]:
    """A SQLite data directory in use: accounts, sessions, revocations, a pending key."""
    sqlite = AuthService.open(AuthSettings(data_dir=data_dir, issuer=ISSUER, audience="posts"))
    try:
        sqlite.add_user("alice", PASSWORD, ["posts:read", "posts:write"])
        sqlite.add_user("bob", PASSWORD, ["posts:read"])
        sqlite.add_user("dave", PASSWORD, ["posts:read"])
        secret = sqlite.add_client("svc", ["posts:read"], introspect=True)
        kept = sqlite.login("alice", PASSWORD)
        revoked = sqlite.login("alice", PASSWORD)
        sqlite.revoke(revoked.access_token)
        ended = sqlite.login("bob", PASSWORD)
        sqlite.revoke(ended.refresh_token)  # the family: refresh and access token
        sqlite._revocations.revoke("a-legacy-jti", expires_at=2**40)
        with pytest.raises(InvalidCredentials):
            sqlite.login("bob", "a wrong guess")  # a throttling streak
        sqlite.disable("dave")
        pending = sqlite.rotate_key(activate_after_s=3600)
        return {
            "secret": secret, "kept": kept, "revoked": revoked, "ended": ended,
            "pending": pending, "keys": _key_states(sqlite),
            "bits": _bits(sqlite, kept.access_token),
            "signer": sqlite.signing_key().kid,
        }
    finally:
        sqlite.close()


def test_migrate_a_populated_data_dir_then_use_it_on_postgresql(
    tmp_path: Path, postgresql_url: str, key_encryption_key_file: Path,
    postgresql_server: PostgresServer,
) -> None:
    data = tmp_path / "sqlite-data"
    before = _populate(data)
    kek = ["--key-encryption-key-file", str(key_encryption_key_file)]

    # Keys to seal and no KEK: refused, and nothing copied.
    empty = postgresql_server.create_database()
    done = _cli("migrate", "--data-dir", str(data), "--database-url", empty)
    assert done.returncode == 1
    assert "give --key-encryption-key-file" in done.stderr and "Traceback" not in done.stderr
    with psycopg.connect(empty) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)

    done = _cli("migrate", "--data-dir", str(data), "--database-url", postgresql_url, *kek)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    assert "users: 3" in done.stdout and "signing_keys: 2" in done.stdout

    # Again into the same database: refused, nothing changed.
    again = _cli("migrate", "--data-dir", str(data), "--database-url", postgresql_url, *kek)
    assert again.returncode == 1 and "already holds Auth data" in again.stderr, again.stderr

    # A replica on PostgreSQL, on a machine of its own (an empty data directory).
    pg = AuthService.open(AuthSettings(
        data_dir=tmp_path / "replica", issuer=ISSUER, audience="posts",
        database_url=postgresql_url, key_encryption_key_file=key_encryption_key_file,
    ))
    try:
        assert _key_states(pg) == before["keys"]
        assert pg.signing_key().kid == before["signer"]
        assert before["pending"] in [k["kid"] for k in pg.jwks()["keys"]]  # type: ignore[index]
        # Old tokens validate, old revocations hold.
        assert pg.validate(before["kept"].access_token).subject == "alice"
        with pytest.raises(TokenRejected):
            pg.validate(before["revoked"].access_token)
        with pytest.raises(TokenRejected):
            pg.validate(before["ended"].access_token)
        with pytest.raises(TokenRejected):
            pg.refresh(before["ended"].refresh_token)
        assert pg._revocations.is_revoked("a-legacy-jti")
        # The status list is the same list, with the same bits.
        assert _bits(pg, before["kept"].access_token) == before["bits"]
        # Sessions go on: a refresh rotates; reusing the old refresh token is caught.
        fresh = pg.refresh(before["kept"].refresh_token)
        assert pg.validate(fresh.access_token).subject == "alice"
        with pytest.raises(TokenRejected):
            pg.refresh(before["kept"].refresh_token)
        with pytest.raises(TokenRejected):  # ... and revoked the family
            pg.validate(fresh.access_token)
        # Accounts: logins, a disabled user, the client and its permission.
        assert pg.validate(pg.login("alice", PASSWORD).access_token).subject == "alice"
        with pytest.raises(InvalidCredentials):
            pg.login("dave", PASSWORD)
        assert pg.authorize_introspection("svc", before["secret"]) == "svc"
        assert pg.client_token("svc", before["secret"]).scope == "posts:read"
        # New entries never reuse an index of the migrated list.
        new = pg.login("bob", PASSWORD)
        assert pg.validate(new.access_token).subject == "bob"
    finally:
        pg.close()
    with psycopg.connect(postgresql_url) as conn:
        assert conn.execute("SELECT count(*) FROM throttle_streaks").fetchone() == (1,)
        assert conn.execute(
            "SELECT count(*) FROM signing_keys WHERE sealed_key IS NULL"
        ).fetchone() == (0,)


def test_migrate_refuses_what_it_cannot_do_cleanly(
    tmp_path: Path, postgresql_url: str, key_encryption_key_file: Path,
) -> None:
    missing = _cli("migrate", "--data-dir", str(tmp_path / "nothing"), "--database-url",
                   postgresql_url)
    assert missing.returncode == 1 and "no Auth database to migrate" in missing.stderr
    no_url = _cli("migrate", "--data-dir", str(tmp_path))
    assert no_url.returncode == 2 and "needs --database-url" in no_url.stderr
