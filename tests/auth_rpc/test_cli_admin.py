"""``auth-rpc`` account administration, run as real processes against a running ``serve``.

``list``, ``disable``, ``enable``, ``remove``, ``set-password``, ``set-scope``,
``set-audience`` and ``reset-secret`` act on the data directory while
``auth-rpc serve`` runs on it: the running service must obey at once (no
restart, no cache hiding a change), and a disabled or removed account's
refresh and access tokens must be refused from the next call.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.transport import open_client

READY = re.compile(r"^auth-rpc ready: thrift=[\d.]+:(?P<port>\d+) http=(?P<http>\S+) ")
PASSWORD = "alice's long password"


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(*args: str, stdin: str = "") -> str:
    done = run(*args, stdin=stdin)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def failed(*args: str, stdin: str = "", code: int = 1) -> str:
    done = run(*args, stdin=stdin)
    assert done.returncode == code, (args, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("auth-rpc: error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[-1]


@contextlib.contextmanager
def serving(data: Path) -> Iterator[tuple[int, str]]:
    """``auth-rpc serve`` on ``data`` in its own process: (thrift port, http url)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "auth_rpc.auth.cli", "serve", "--data-dir", str(data),
         "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # blocks until ready: no sleeping
        match = READY.match(line)
        assert match is not None, f"no ready line: {line!r}"
        yield int(match["port"]), match["http"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert PASSWORD not in err


@contextlib.contextmanager
def auth_client(port: int) -> Iterator[object]:
    with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", port)) as client:
        yield client


def accounts(data: Path) -> dict[str, dict[str, object]]:
    listed = json.loads(ok("list", "--data-dir", str(data), "--json"))
    return {a["name"]: a for a in listed["accounts"]}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    ok("add-user", "alice", "--data-dir", str(data), "--password-stdin", stdin=PASSWORD + "\n")
    ok("add-client", "reporting", "--data-dir", str(data), "--scope", "posts:read",
       "--secret-file", str(tmp_path / "reporting.secret"))
    return data


def secret_of(data: Path) -> str:
    return (data.parent / "reporting.secret").read_text().strip()


def test_list_shows_users_and_clients(data: Path) -> None:
    ok("add-client", "introspector", "--data-dir", str(data), "--scope", "",
       "--introspect", "--audience", "posts", "--audience", "notes")
    listed = accounts(data)
    assert set(listed) == {"alice", "reporting", "introspector"}
    alice = listed["alice"]
    assert alice["kind"] == "user" and alice["enabled"] is True
    assert alice["scopes"] == ["posts:read", "posts:write"] and alice["audiences"] is None
    assert isinstance(alice["created_at"], int) and alice["disabled_at"] is None
    assert listed["introspector"]["introspect"] is True
    assert listed["introspector"]["audiences"] == ["posts", "notes"]
    assert listed["reporting"]["introspect"] is False
    table = ok("list", "--data-dir", str(data)).splitlines()
    assert table[0].split() == ["NAME", "KIND", "STATUS", "CREATED", "(UTC)", "SCOPES",
                                "AUDIENCES"]
    assert any(line.split()[:3] == ["alice", "user", "enabled"] for line in table)
    assert any(line.split()[:2] == ["introspector", "client+introspect"] for line in table)
    # Nothing secret is ever listed.
    assert secret_of(data) not in json.dumps(listed) + "\n".join(table)


def test_disable_takes_effect_at_once_in_the_running_service(data: Path) -> None:
    secret = secret_of(data)
    with serving(data) as (port, http), auth_client(port) as auth:
        pair = auth.login("alice", PASSWORD)
        second = auth.login("alice", PASSWORD)
        assert auth.validate(pair.access_token).subject == "alice"
        client_tok = auth.client_token("reporting", secret, "")  # now remembered by the service
        assert auth.validate(client_tok.access_token).subject == "reporting"

        out = ok("disable", "alice", "--data-dir", str(data))
        assert out.strip() == (
            "user 'alice' disabled; 2 refresh token families and 2 access tokens revoked"
        )
        for token in (pair.access_token, second.access_token):  # their Status List bits
            with pytest.raises(common_thrift.Unauthenticated, match="revoked"):
                auth.validate(token)
        with pytest.raises(common_thrift.Unauthenticated):
            auth.refresh(second.refresh_token, "")
        with pytest.raises(common_thrift.Unauthenticated) as refused:
            auth.login("alice", PASSWORD)
        assert refused.value.message == "invalid username or password"  # the same as a bad one
        answer = requests.post(f"{http}/token", data={
            "grant_type": "password", "username": "alice", "password": PASSWORD,
        }, timeout=10)
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
        assert accounts(data)["alice"]["enabled"] is False

        # The client's authentication was remembered: the disable still wins at once.
        ok("disable", "reporting", "--data-dir", str(data))
        with pytest.raises(common_thrift.Unauthenticated):
            auth.client_token("reporting", secret, "")
        with pytest.raises(common_thrift.Unauthenticated, match="revoked"):
            auth.validate(client_tok.access_token)
        answer = requests.post(f"{http}/token", data={"grant_type": "client_credentials"},
                               auth=("reporting", secret), timeout=10)
        assert answer.status_code == 401

        assert ok("enable", "alice", "--data-dir", str(data)).strip() == "user 'alice' enabled"
        ok("enable", "reporting", "--data-dir", str(data))
        again = auth.login("alice", PASSWORD)
        assert auth.validate(again.access_token).subject == "alice"
        assert auth.client_token("reporting", secret, "").access_token
        with pytest.raises(common_thrift.Unauthenticated):  # revoked tokens stay revoked
            auth.validate(pair.access_token)
        with pytest.raises(common_thrift.Unauthenticated):
            auth.refresh(second.refresh_token, "")


def test_remove_revokes_and_frees_nothing_else(data: Path) -> None:
    with serving(data) as (port, _), auth_client(port) as auth:
        pair = auth.login("alice", PASSWORD)
        out = ok("remove", "alice", "--data-dir", str(data))
        assert out.startswith("user 'alice' removed; 1 refresh token family and 1 access token")
        with pytest.raises(common_thrift.Unauthenticated):
            auth.validate(pair.access_token)
        with pytest.raises(common_thrift.Unauthenticated):
            auth.refresh(pair.refresh_token, "")
        with pytest.raises(common_thrift.Unauthenticated):
            auth.login("alice", PASSWORD)
        assert set(accounts(data)) == {"reporting"}
    assert "no user or client named 'alice'" in failed("remove", "alice", "--data-dir", str(data))
    assert "no user or client" in failed("disable", "nobody", "--data-dir", str(data))
    assert "no user or client" in failed("enable", "nobody", "--data-dir", str(data))


def test_set_password_ends_sessions_and_follows_the_policy(data: Path) -> None:
    with serving(data) as (port, _), auth_client(port) as auth:
        pair = auth.login("alice", PASSWORD)
        refused = failed("set-password", "alice", "--data-dir", str(data), "--password-stdin",
                         stdin="short\n")
        assert "at least 8 characters" in refused
        assert auth.validate(pair.access_token).subject == "alice"  # a refusal changes nothing
        out = ok("set-password", "alice", "--data-dir", str(data), "--password-stdin",
                 stdin="a brand new passphrase\n")
        assert "a brand new passphrase" not in out
        assert "1 refresh token family and 1 access token revoked" in out
        with pytest.raises(common_thrift.Unauthenticated):
            auth.login("alice", PASSWORD)
        with pytest.raises(common_thrift.Unauthenticated):
            auth.validate(pair.access_token)
        with pytest.raises(common_thrift.Unauthenticated):
            auth.refresh(pair.refresh_token, "")
        assert auth.login("alice", "a brand new passphrase").access_token
    refused = failed("set-password", "reporting", "--data-dir", str(data), "--password-stdin",
                     stdin="a long enough password\n")
    assert "is a client" in refused and "reset-secret" in refused
    # No way to give it on the command line.
    assert run("set-password", "alice", "a brand new passphrase", "--data-dir",
               str(data)).returncode == 2


def test_set_scope_and_audience_apply_to_the_next_grant(data: Path) -> None:
    secret = secret_of(data)
    with serving(data) as (port, _), auth_client(port) as auth:
        old = auth.login("alice", PASSWORD)
        assert old.scope == "posts:read posts:write"
        out = ok("set-scope", "alice", "posts:read", "--data-dir", str(data))
        assert out.strip() == "scope of user 'alice' set to 'posts:read'"
        assert auth.login("alice", PASSWORD).scope == "posts:read"
        assert auth.refresh(old.refresh_token, "").scope == "posts:read"  # a refresh narrows

        with pytest.raises(common_thrift.InvalidArgument):
            auth.login("alice", PASSWORD, "notes")
        ok("set-audience", "alice", "posts", "notes", "--data-dir", str(data))
        notes = auth.login("alice", PASSWORD, "notes")
        assert auth.validate(notes.access_token).audience == "notes"
        ok("set-audience", "alice", "--default", "--data-dir", str(data))
        with pytest.raises(common_thrift.InvalidArgument):
            auth.login("alice", PASSWORD, "notes")
        assert auth.login("alice", PASSWORD).access_token

        auth.client_token("reporting", secret, "posts:read")  # remembered by the service
        ok("set-scope", "reporting", "posts:read posts:write", "--data-dir", str(data))
        assert auth.client_token("reporting", secret, "posts:write").scope == "posts:write"
    assert accounts(data)["reporting"]["scopes"] == ["posts:read", "posts:write"]
    assert "scope" in failed("set-scope", "alice", "bad\x01scope", "--data-dir", str(data))
    assert "audience" in failed("set-audience", "alice", "no spaces", "--data-dir", str(data))
    assert run("set-audience", "alice", "--data-dir", str(data)).returncode == 2
    assert run("set-audience", "alice", "notes", "--default", "--data-dir",
               str(data)).returncode == 2


def test_reset_secret_refuses_the_old_secret_at_once(data: Path, tmp_path: Path) -> None:
    old = secret_of(data)
    new_file = tmp_path / "new.secret"
    with serving(data) as (port, http), auth_client(port) as auth:
        token = auth.client_token("reporting", old, "").access_token  # remembered
        out = ok("reset-secret", "reporting", "--data-dir", str(data),
                 "--secret-file", str(new_file))
        assert "the old one is refused from now on" in out and "1 access token revoked" in out
        new = new_file.read_text().strip()
        assert new != old and new not in out and os.stat(new_file).st_mode & 0o777 == 0o600
        with pytest.raises(common_thrift.Unauthenticated):
            auth.client_token("reporting", old, "")
        answer = requests.post(f"{http}/revoke", data={"token": token},
                               auth=("reporting", old), timeout=10)
        assert answer.status_code == 401
        with pytest.raises(common_thrift.Unauthenticated):
            auth.validate(token)
        assert auth.client_token("reporting", new, "").access_token
        # Without --secret-file the secret is the last line of standard output, as add-client.
        printed = ok("reset-secret", "reporting", "--data-dir", str(data)).splitlines()
        assert printed[-1] != new and len(printed[-1]) >= 43
        assert auth.client_token("reporting", printed[-1], "").access_token
    assert "is a user" in failed("reset-secret", "alice", "--data-dir", str(data))
    assert "no user or client" in failed("reset-secret", "nobody", "--data-dir", str(data))


@pytest.mark.parametrize(
    "command",
    [
        ["list"],
        ["keys"],
        ["disable", "alice"],
        ["enable", "alice"],
        ["remove", "alice"],
        ["set-scope", "alice", "posts:read"],
        ["set-audience", "alice", "notes"],
        ["set-password", "alice", "--password-stdin"],
        ["reset-secret", "reporting", "--secret-file", "SECRET"],
        ["export-public-key"],
        ["rotate-key"],
    ],
    ids=lambda command: command[0],
)
@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_a_mistyped_data_dir_is_refused_and_left_alone(
    command: list[str], exists: bool, tmp_path: Path
) -> None:
    """Only add-user, add-client and serve make a new data directory: any other command
    on one without a database names the path and creates nothing (``list`` used to make
    an empty database there and show an empty table, as if every account were gone)."""
    typo = tmp_path / "auth-dta"
    if exists:
        typo.mkdir(mode=0o700)
    argv = [str(tmp_path / "secret") if arg == "SECRET" else arg for arg in command]
    message = failed(*argv, "--data-dir", str(typo), stdin=PASSWORD + "\n")
    assert f"no Auth database in {typo}" in message and "--data-dir" in message
    assert not exists or list(typo.iterdir()) == []
    assert exists or not typo.exists()
    assert not (tmp_path / "secret").exists()
