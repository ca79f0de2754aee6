"""``auth-rpc`` on PostgreSQL (``--database-url`` / ``AUTH_RPC_DATABASE_URL``), as real
processes; the signing keys sealed in the database with the key-encryption key."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from auth_rpc.auth.db import SCHEMA_VERSION
from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.sqlstore import redact_url, to_pyformat
from auth_rpc.serving.transport import open_client

from .test_cli import Served  # type: ignore[import-not-found]


def run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_admin_commands_and_serve_share_a_postgresql_database(
    tmp_path: Path, postgresql_url: str, key_encryption_key_file: Path
) -> None:
    data = tmp_path / "data"
    added = run(
        "add-user", "alice", "--data-dir", str(data), "--database-url", postgresql_url,
        "--password-stdin", stdin="a long enough password\n",
    )
    assert added.returncode == 0, added.stderr
    # The environment variable gives the URL too.
    client_out = run(
        "add-client", "reporting", "--data-dir", str(data), "--scope", "posts:read",
        env={"AUTH_RPC_DATABASE_URL": postgresql_url},
    )
    assert client_out.returncode == 0, client_out.stderr
    secret = client_out.stdout.strip().splitlines()[-1]
    assert not (data / "auth.sqlite3").exists()  # nothing went to SQLite
    with psycopg.connect(postgresql_url) as conn:
        assert conn.execute("SELECT username FROM users").fetchall() == [("alice",)]
        assert conn.execute(
            "SELECT version FROM schema_version WHERE component = 'auth'"
        ).fetchone() == (SCHEMA_VERSION,)

    # serve needs the key-encryption key (it seals the signing key in the
    # database); the account commands above and below do not.
    served = Served("--data-dir", str(data), "--database-url", postgresql_url,
                    "--key-encryption-key-file", str(key_encryption_key_file))
    try:
        with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", served.port)) as client:
            pair = client.login("alice", "a long enough password")
            assert client.validate(pair.access_token).subject == "alice"
            assert client.validate(client.refresh(pair.refresh_token).access_token)
            svc = client.client_token("reporting", secret, "posts:read")
            assert client.validate(svc.access_token).client_id == "reporting"
            with pytest.raises(common_thrift.Unauthenticated):
                client.login("alice", "wrong password")
            # The administration commands work on the same database, and a
            # disable reaches the running service from its next call.
            url = ["--data-dir", str(data), "--database-url", postgresql_url]
            listed = run("list", "--json", *url)
            assert listed.returncode == 0, listed.stderr
            names = [a["name"] for a in json.loads(listed.stdout)["accounts"]]
            assert names == ["alice", "reporting"]
            disabled = run("disable", "alice", *url)
            assert disabled.returncode == 0, disabled.stderr
            with pytest.raises(common_thrift.Unauthenticated):
                client.validate(pair.access_token)
            with pytest.raises(common_thrift.Unauthenticated):
                client.login("alice", "a long enough password")
    finally:
        code, err = served.stop()
    assert code == 0, err
    assert not (data / "auth.sqlite3").exists()


def test_a_bad_database_url_is_a_usage_error_without_the_password(tmp_path: Path) -> None:
    done = run("add-user", "x", "--data-dir", str(tmp_path), "--database-url",
               "mysql://u:s3cret-pw@db/x")
    assert done.returncode == 2
    assert "s3cret-pw" not in done.stderr and "expected postgresql://" in done.stderr


def test_an_unreachable_database_fails_cleanly_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://u:s3cret-pw@/nodb?host={tmp_path}&connect_timeout=2"
    done = run("add-user", "x", "--data-dir", str(tmp_path / "d"), "--database-url", url,
               "--password-stdin", stdin="a long enough password\n")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("auth-rpc: error:"), done.stderr
    assert "s3cret-pw" not in done.stderr and "Traceback" not in done.stderr


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("postgresql://u:pw@h:5/db?sslmode=require") == (
        "postgresql://u:***@h:5/db?sslmode=require"
    )
    assert redact_url("postgresql://u@/db?host=/tmp/x") == "postgresql://u@/db?host=/tmp/x"


def test_placeholders_are_converted_and_percent_escaped() -> None:
    assert to_pyformat("SELECT ? WHERE a LIKE 'x%'") == "SELECT %s WHERE a LIKE 'x%%'"
