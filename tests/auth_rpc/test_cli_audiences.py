"""``auth-rpc add-user/add-client --audience``, run as real processes, then used by the service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from auth_rpc.auth.service import AuthService, AuthSettings
from auth_rpc.errors import InvalidCredentials, InvalidInput

PASSWORD = "a long enough password"


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def aud(token: str) -> object:
    return jwt.decode(token, options={"verify_signature": False})["aud"]


def open_service(data: Path) -> AuthService:
    return AuthService.open(AuthSettings(data_dir=data, issuer="https://auth.test"))


def test_add_user_and_add_client_with_audiences(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    nina = run(
        "add-user", "nina", "--data-dir", data, "--password-stdin",
        "--audience", "notes", "--audience", "posts", "--audience", "notes",
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert nina.returncode == 0, nina.stderr
    assert nina.stdout.strip() == (
        "user 'nina' created with scope 'posts:read posts:write' for audiences 'notes', 'posts'"
    )
    alice = run("add-user", "alice", "--data-dir", data, "--password-stdin", stdin=PASSWORD + "\n")
    assert alice.returncode == 0, alice.stderr
    assert alice.stdout.strip() == "user 'alice' created with scope 'posts:read posts:write'"
    client = run(
        "add-client", "notes-svc", "--data-dir", data, "--scope", "notes:read",
        "--audience", "https://notes.example.com",
    )  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert "for audiences 'https://notes.example.com'; its secret:" in client.stdout
    secret = client.stdout.strip().splitlines()[-1]

    service = open_service(tmp_path / "data")  # serve's default audience: posts
    try:
        assert aud(service.login("nina", PASSWORD, audience="notes").access_token) == "notes"
        assert aud(service.login("nina", PASSWORD).access_token) == "posts"
        assert aud(service.login("alice", PASSWORD).access_token) == "posts"
        with pytest.raises(InvalidInput, match=r"^audience: "):
            service.login("alice", PASSWORD, audience="notes")
        uri = "https://notes.example.com"
        assert aud(service.client_token("notes-svc", secret, audience=uri).access_token) == uri
        with pytest.raises(InvalidInput, match=r"^audience: "):
            service.client_token("notes-svc", secret)  # not allowed the default
    finally:
        service.close()


@pytest.mark.parametrize("bad", ["has space", "", "-dash-first", "x" * 129, "caf\u00e9", "a#b"])
def test_a_bad_audience_name_is_refused_naming_the_rule(tmp_path: Path, bad: str) -> None:
    data = str(tmp_path / "data")
    rule = (
        "auth-rpc: error: audience: an audience name must be 1..128 characters of ASCII "
        "letters, digits and . _ ~ : / -, starting with a letter or a digit"
    )
    user = run(
        "add-user", "una", "--data-dir", data, "--password-stdin", "--audience", "ok",
        f"--audience={bad}", stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert user.returncode == 1
    assert user.stderr.strip() == rule and "Traceback" not in user.stderr
    client = run("add-client", "uno", "--data-dir", data, f"--audience={bad}")
    assert client.returncode == 1
    assert client.stderr.strip() == rule
    service = open_service(tmp_path / "data")
    try:  # nothing was made: the names are still free
        with pytest.raises(InvalidCredentials):
            service.login("una", PASSWORD)
        service.add_client("uno", "posts:read")
    finally:
        service.close()


def test_audience_is_listed_in_the_help() -> None:
    for command in ("add-user", "add-client"):
        out = " ".join(run(command, "--help").stdout.split())
        assert "--audience AUDIENCE" in out and "(repeat for several;" in out
