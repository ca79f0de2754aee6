"""Introspection is a permission a client is given (``add-client --introspect``).

Regression: any registered client, even one with only ``posts:read``, could
introspect any user's token and learn its ``sub``, ``username`` and ``scope``.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from auth_rpc.auth.accounts import client_secret_digest
from auth_rpc.auth.db import MIGRATIONS, Database
from auth_rpc.auth.service import DB_FILENAME, AuthService, AuthSettings
from auth_rpc.errors import DependencyUnavailable, Forbidden, InvalidCredentials

PASSWORD = "correct horse battery staple"


def test_only_a_client_given_the_permission_may_introspect_over_http(
    auth_server: Any, make_user: Callable[..., None], make_client: Callable[..., str]
) -> None:
    make_user("alice", PASSWORD)
    reader = make_client("reporter", ["posts:read"])
    posts_service = make_client("posts-service", (), introspect=True)
    base = auth_server.http_url.rstrip("/")
    token = requests.post(
        f"{base}/token", data={"grant_type": "password", "username": "alice",
                               "password": PASSWORD}, timeout=10,
    ).json()["access_token"]

    refused = requests.post(f"{base}/introspect", data={"token": token},
                            auth=("reporter", reader), timeout=10)
    assert refused.status_code == 403
    assert refused.json() == {
        "error": "unauthorized_client",
        "error_description": "this client is not allowed to introspect tokens",
    }
    assert "alice" not in refused.text and "posts:write" not in refused.text
    # Credentials are checked first: a wrong secret is 401, whatever the permission.
    wrong = requests.post(f"{base}/introspect", data={"token": token},
                          auth=("posts-service", reader), timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"

    allowed = requests.post(f"{base}/introspect", data={"token": token},
                            auth=("posts-service", posts_service), timeout=10)
    assert allowed.status_code == 200
    assert allowed.json()["active"] is True and allowed.json()["username"] == "alice"
    # The client without the permission may still do what it was registered for.
    assert requests.post(f"{base}/token", data={"grant_type": "client_credentials"},
                         auth=("reporter", reader), timeout=10).status_code == 200
    assert requests.post(f"{base}/revoke", data={"token": token},
                         auth=("reporter", reader), timeout=10).status_code == 200


def test_the_service_checks_the_permission(open_service: Callable[..., AuthService]) -> None:
    service = open_service()
    reader = service.add_client("reporter", "posts:read")
    scoped = service.add_client("scoped", "introspect")  # a scope is not the permission
    allowed = service.add_client("posts-service", (), introspect=True)
    assert service.authorize_introspection("posts-service", allowed) == "posts-service"
    for client_id, secret in (("reporter", reader), ("scoped", scoped)):
        assert service.authenticate_client(client_id, secret) == client_id
        with pytest.raises(Forbidden, match="not allowed to introspect"):
            service.authorize_introspection(client_id, secret)
    with pytest.raises(InvalidCredentials):
        service.authorize_introspection("posts-service", reader)
    with pytest.raises(InvalidCredentials):
        service.authorize_introspection("nobody", allowed)


def test_an_introspect_verifier_without_the_permission_says_so(
    make_verifier: Callable[..., Any],
    make_client: Callable[..., str],
    token_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = make_client("reporter", ["posts:read"])
    verifier = make_verifier("introspect", client_id="reporter", client_secret=secret)
    with caplog.at_level(logging.ERROR, logger="auth_rpc.verify.introspect"), pytest.raises(
        DependencyUnavailable, match="introspection not permitted for this client"
    ):
        verifier.verify(token_factory.mint("alice", "posts:read"))
    assert any("auth-rpc add-client ID --introspect" in r.getMessage() for r in caplog.records)
    assert secret not in caplog.text
    # make_verifier's own client is given the permission.
    assert make_verifier("introspect").verify(token_factory.mint("alice", "posts:read"))


def test_add_client_introspect_as_a_real_process(tmp_path: Path) -> None:
    data = tmp_path / "data"

    def add_client(*args: str) -> str:
        out = subprocess.run(  # our own command, fixed arguments
            [sys.executable, "-m", "auth_rpc.auth.cli", "add-client", *args,
             "--data-dir", str(data)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    out = add_client("posts-service", "--scope", "", "--introspect")
    assert "may introspect tokens; its secret:" in out
    allowed = out.strip().splitlines()[-1]
    reader = add_client("reporter").strip().splitlines()[-1]
    service = AuthService.open(AuthSettings(data_dir=data, issuer="https://auth.test"))
    try:
        assert service.authorize_introspection("posts-service", allowed) == "posts-service"
        with pytest.raises(Forbidden):
            service.authorize_introspection("reporter", reader)
    finally:
        service.close()


def test_clients_registered_before_keep_it_only_with_the_introspect_scope(
    open_service: Callable[..., AuthService], data_dir: Path
) -> None:
    """The migration: a client whose scope lists ``introspect`` (the documented way to
    register a resource server's client until now) keeps introspecting; others do not."""
    version = next(i for i, m in enumerate(MIGRATIONS) if "may_introspect" in m)
    data_dir.mkdir(mode=0o700)
    db = Database.open(data_dir / DB_FILENAME, migrations=MIGRATIONS[:version])
    secrets = {"old-intro": "s" * 43, "old-reader": "r" * 43, "old-both": "b" * 43}
    scopes = {"old-intro": "introspect", "old-reader": "posts:read",
              "old-both": "posts:read introspect"}
    with db.transaction() as conn:
        for client_id, secret in secrets.items():
            conn.execute(
                "INSERT INTO clients (client_id, secret_hash, scopes, created_at, secret_digest) "
                "VALUES (?, 'unused', ?, 0, ?)",
                (client_id, scopes[client_id], client_secret_digest(secret)),
            )
    db.close()

    service = open_service()
    for client_id in ("old-intro", "old-both"):
        assert service.authorize_introspection(client_id, secrets[client_id]) == client_id
    with pytest.raises(Forbidden):
        service.authorize_introspection("old-reader", secrets["old-reader"])
    with sqlite3.connect(data_dir / DB_FILENAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
