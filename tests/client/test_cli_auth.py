"""``posts-client`` login / whoami / logout as a subprocess against a real Auth service."""

from __future__ import annotations

import io
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.serving.rpc import ServerSettings, TLSServerConfig
from client import Unauthenticated, connect_auth

EXIT_UNAUTHENTICATED = 3
EXIT_INVALID = 6
EXIT_UNAVAILABLE = 7


def _login(cli: Any, auth_server: Any, user: Any, *extra: str) -> Any:
    return cli.run(
        "--auth", f"127.0.0.1:{auth_server.port}", *extra,
        "login", user.name, "--password-stdin", input=user.password + "\n",
    )


def test_login_saves_a_0600_token_file_and_whoami_reads_it(
    cli: Any, auth_server: Any, user: Any
) -> None:
    result = _login(cli, auth_server, user)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"logged in as {user.name} at 127.0.0.1:{auth_server.port}")
    assert user.password not in result.stdout + result.stderr

    path = cli.token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    saved = json.loads(path.read_text())
    assert saved["auth"] == f"127.0.0.1:{auth_server.port}"
    assert saved["refresh_token"] and saved["access_token"]
    assert saved["access_token"] not in result.stdout + result.stderr

    whoami = cli.run("whoami", "--json")  # the saved address: no --auth needed
    assert whoami.returncode == 0, whoami.stderr
    info = json.loads(whoami.stdout)
    assert info["subject"] == user.name
    assert sorted(info["scopes"]) == ["posts:read", "posts:write"]
    assert info["expires_at"] > time.time() + 800

    text = cli.run("whoami")
    assert text.returncode == 0
    assert f"subject:  {user.name}" in text.stdout
    assert saved["access_token"] not in text.stdout + text.stderr


def test_wrong_password_exits_3_with_one_line(cli: Any, auth_server: Any, user: Any) -> None:
    result = cli.run(
        "--auth", f"127.0.0.1:{auth_server.port}", "login", user.name, "--password-stdin",
        input="not the password\n",
    )
    assert result.returncode == EXIT_UNAUTHENTICATED
    assert result.stderr.startswith("posts-client: error: unauthenticated:")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not cli.token_file.exists()


def test_no_password_on_stdin_is_invalid(cli: Any, auth_server: Any, user: Any) -> None:
    result = cli.run(
        "--auth", f"127.0.0.1:{auth_server.port}", "login", user.name, "--password-stdin",
        input="",
    )
    assert result.returncode == EXIT_INVALID
    assert result.stderr == "posts-client: error: no password on standard input\n"


def test_logout_revokes_and_deletes_then_whoami_exits_3(
    cli: Any, auth_server: Any, user: Any
) -> None:
    assert _login(cli, auth_server, user).returncode == 0
    saved = json.loads(cli.token_file.read_text())

    result = cli.run("logout")
    assert result.returncode == 0, result.stderr
    assert not cli.token_file.exists()
    with connect_auth(port=auth_server.port) as auth:
        with pytest.raises(Unauthenticated):
            auth.refresh(saved["refresh_token"])
        with pytest.raises(Unauthenticated):
            auth.validate(saved["access_token"])

    whoami = cli.run("whoami")
    assert whoami.returncode == EXIT_UNAUTHENTICATED
    assert whoami.stderr.startswith("posts-client: error: not logged in")
    again = cli.run("logout")
    assert again.returncode == 0


def test_a_token_near_expiry_is_refreshed_and_saved_at_once(
    cli: Any, auth_server: Any, user: Any, auth_calls: Any
) -> None:
    assert _login(cli, auth_server, user).returncode == 0
    before = json.loads(cli.token_file.read_text())
    before["expires_at"] = time.time() + 10  # as if it were issued 14 min 50 s ago
    cli.token_file.write_text(json.dumps(before))  # keeps mode 0600

    result = cli.run("whoami", "--json")
    assert result.returncode == 0, result.stderr
    after = json.loads(cli.token_file.read_text())
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] != before["refresh_token"]  # rotated, and saved
    assert after["expires_at"] > time.time() + 800
    assert stat.S_IMODE(cli.token_file.stat().st_mode) == 0o600
    assert auth_calls.count("refresh") == 1

    # The old refresh token is spent; the saved one works on the next run.
    assert cli.run("whoami").returncode == 0


def test_a_revoked_access_token_is_renewed_once(
    cli: Any, auth_server: Any, user: Any, auth_calls: Any
) -> None:
    assert _login(cli, auth_server, user).returncode == 0
    saved = json.loads(cli.token_file.read_text())
    with connect_auth(port=auth_server.port) as auth:
        auth.revoke(saved["access_token"])
    result = cli.run("whoami")
    assert result.returncode == 0, result.stderr
    assert auth_calls.count("refresh") == 1
    assert json.loads(cli.token_file.read_text())["access_token"] != saved["access_token"]


def test_a_revoked_login_exits_3(cli: Any, auth_server: Any, user: Any) -> None:
    assert _login(cli, auth_server, user).returncode == 0
    saved = json.loads(cli.token_file.read_text())
    with connect_auth(port=auth_server.port) as auth:
        auth.revoke(saved["refresh_token"])
        auth.revoke(saved["access_token"])
    result = cli.run("whoami")
    assert result.returncode == EXIT_UNAUTHENTICATED
    assert "run: posts-client login USERNAME" in result.stderr
    assert "Traceback" not in result.stderr


def test_tokens_are_only_sent_to_the_auth_service_they_came_from(
    cli: Any, auth_server: Any, user: Any, unused_port: int
) -> None:
    assert _login(cli, auth_server, user).returncode == 0
    result = cli.run("--auth", f"127.0.0.1:{unused_port}", "whoami")
    assert result.returncode == EXIT_UNAUTHENTICATED
    assert f"not logged in at 127.0.0.1:{unused_port}" in result.stderr


def test_unreachable_auth_exits_7(cli: Any, user: Any, unused_port: int) -> None:
    result = cli.run(
        "--auth", f"127.0.0.1:{unused_port}", "login", user.name, "--password-stdin",
        input=user.password + "\n",
    )
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stderr.startswith("posts-client: error: unavailable: cannot connect to")
    assert result.stderr.count("\n") == 1


def test_tls_failure_exits_7_and_a_good_ca_logs_in(
    cli: Any, make_auth_server: Any, make_user: Any, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    server = make_auth_server(
        settings=ServerSettings(
            tls=TLSServerConfig(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
        )
    )
    make_user("erin", "erin's password", service=server.service)
    address = f"127.0.0.1:{server.port}"

    bad = cli.run(
        "--auth", address, "--tls-ca", str(tmp_path / "other-ca.pem"),
        "login", "erin", "--password-stdin", input="erin's password\n",
    )
    assert bad.returncode == EXIT_UNAVAILABLE
    assert "certificate verification failed" in bad.stderr

    good = cli.run(
        "--auth", address, "--tls-ca", str(tmp_path / "ca.pem"),
        "login", "erin", "--password-stdin", input="erin's password\n",
    )
    assert good.returncode == 0, good.stderr
    assert cli.run("whoami").returncode == 0  # the TLS settings were saved too


@pytest.mark.parametrize(
    "args",
    [
        ["--auth", "nonsense", "whoami"],
        ["get", "abc"],
        ["get", "0"],
        ["list", "--limit", "-1"],
        ["create", "--title", "t"],
        ["update", "1"],
        ["frobnicate"],
        [],
        ["--tls-cert", "x.pem", "whoami"],
        ["--tls-ca", "/no/such/ca.pem", "whoami"],
    ],
)
def test_usage_errors_exit_2(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (main() is the console script's entry point): no server needed.
    from client.cli import main

    code = main(args, env={"POSTS_CLIENT_CONFIG_DIR": str(tmp_path)})
    assert code == 2
    err = capsys.readouterr().err
    assert "usage: posts-client" in err and "Traceback" not in err


def test_environment_sets_the_addresses(tmp_path: Path, unused_port: int) -> None:
    from client.cli import main

    env = {
        "POSTS_CLIENT_CONFIG_DIR": str(tmp_path),
        "POSTS_CLIENT_AUTH": f"127.0.0.1:{unused_port}",
    }
    stdin = io.StringIO("password\n")
    stderr = io.StringIO()
    code = main(["login", "alice", "--password-stdin"], env=env, stdin=stdin, stderr=stderr)
    assert code == EXIT_UNAVAILABLE
    assert f"cannot connect to 127.0.0.1:{unused_port}" in stderr.getvalue()
    assert main(["whoami"], env={**env, "POSTS_CLIENT_AUTH": "bad"}) == 2


def test_a_group_readable_token_file_is_refused(cli: Any, auth_server: Any, user: Any) -> None:
    assert _login(cli, auth_server, user).returncode == 0
    os.chmod(cli.token_file, 0o644)
    result = cli.run("whoami")
    assert result.returncode == 1
    assert "too open" in result.stderr
