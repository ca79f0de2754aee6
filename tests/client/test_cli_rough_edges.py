"""Issue 15, items 8 and 9: ``posts-client``'s rough edges, through the real command.

Each test runs ``posts-client`` as a subprocess (``python -m client.cli``, the
module of the console script) against real Auth and Posts servers started
in-process on free ports, or calls its ``main(argv)`` (the console script's
entry point) for usage errors, which need no server.

- ``login`` takes the Auth address as every command does: ``--auth``, else
  ``$POSTS_CLIENT_AUTH``, else the address saved by the last login, else the
  default; its help says so.
- A refusal or failure names the server that gave it (``Auth service at
  H:P`` / ``Posts service at H:P``), including a failed token renewal during a
  Posts command (the Auth service's).
- A usage error prints the usage of its command; ``get 0`` and ``get -1`` get
  one message; ``list --limit`` is 1..100.
- ``--json`` goes before or after the command, on every command, and JSON
  times are RFC 3339 fields beside the older number fields (whose units stay
  those of the IDL: milliseconds for posts, seconds for ``expires_at``).
- ``retry after N s`` in whole seconds; a server requiring a client
  certificate gets "pass --tls-cert/--tls-key".
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.serving.rpc import ServerSettings, TLSServerConfig
from client import RateLimited, Session, Unauthenticated, connect_auth
from client.cli import main

EXIT_USAGE = 2
EXIT_UNAUTHENTICATED = 3
EXIT_FORBIDDEN = 4
EXIT_UNAVAILABLE = 7
EXIT_RATE_LIMITED = 8

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _instant(text: str) -> float:
    """Unix seconds of an RFC 3339 UTC time as ``posts-client --json`` writes it."""
    assert RFC3339_MS.match(text), text
    return datetime.fromisoformat(text[:-1] + "+00:00").timestamp()


def _ok(result: Any) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return str(result.stdout)


def _json(result: Any) -> Any:
    return json.loads(_ok(result))


def _error(result: Any, code: int) -> str:
    """The one error line of a failed command, without the ``posts-client: error: `` prefix."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("posts-client: error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    return str(result.stderr[len("posts-client: error: "):-1])


def _login(cli: Any, user: Any, *options: str, env: dict[str, str] | None = None) -> Any:
    return cli.run(*options, "login", user.name, "--password-stdin",
                   input=user.password + "\n", env=env)


# --------------------------------------------------------------------------- item 8


def test_login_again_uses_the_saved_auth_address(
    cli: Any, auth_server: Any, user: Any, posts_srv: Any
) -> None:
    auth = f"127.0.0.1:{auth_server.port}"
    posts = f"127.0.0.1:{posts_srv.port}"
    _ok(_login(cli, user, "--auth", auth, "--posts", posts))
    first = json.loads(cli.token_file.read_text())

    # No --auth, no environment: the address of the last login (it used to be 127.0.0.1:9090).
    again = _login(cli, user)
    assert _ok(again).startswith(f"logged in as {user.name} at {auth} ")
    saved = json.loads(cli.token_file.read_text())
    assert (saved["auth"], saved["posts"]) == (auth, posts)
    assert saved["refresh_token"] != first["refresh_token"]
    with connect_auth(port=auth_server.port) as client, pytest.raises(Unauthenticated):
        client.refresh(first["refresh_token"])  # the replaced login was revoked
    assert _json(cli.run("list", "--json")) == {"posts": [], "next_before_id": 0}


def test_login_takes_the_flag_then_the_environment_then_the_saved_address(
    cli: Any, auth_server: Any, user: Any, unused_port: int
) -> None:
    auth = f"127.0.0.1:{auth_server.port}"
    nowhere = f"127.0.0.1:{unused_port}"
    _ok(_login(cli, user, "--auth", auth))

    # The environment comes before the saved address ...
    refused = _login(cli, user, env={"POSTS_CLIENT_AUTH": nowhere})
    assert _error(refused, EXIT_UNAVAILABLE).startswith(f"unavailable: cannot connect to {nowhere}")
    # ... and the flag before the environment.
    flagged = _login(cli, user, "--auth", auth, env={"POSTS_CLIENT_AUTH": nowhere})
    assert _ok(flagged).startswith(f"logged in as {user.name} at {auth} ")


def test_the_help_says_login_uses_the_saved_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], env={}) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--auth HOST:PORT Auth service (default: $POSTS_CLIENT_AUTH, else the address " \
        "saved by the last login, else 127.0.0.1:9090; login too)" in text


def test_a_wrong_password_names_the_auth_service(cli: Any, auth_server: Any, user: Any) -> None:
    result = cli.run(
        "--auth", f"127.0.0.1:{auth_server.port}", "login", user.name, "--password-stdin",
        input="not the password\n",
    )
    assert _error(result, EXIT_UNAUTHENTICATED) == (
        f"unauthenticated: invalid username or password (Auth service at "
        f"127.0.0.1:{auth_server.port})"
    )


@pytest.fixture
def logged_in(cli: Any, auth_server: Any, user: Any, posts_srv: Any) -> Any:
    _ok(_login(cli, user, "--auth", f"127.0.0.1:{auth_server.port}",
               "--posts", f"127.0.0.1:{posts_srv.port}"))
    return cli


def test_a_refusal_by_posts_names_the_posts_service(
    logged_in: Any, make_user: Any, auth_server: Any, posts_srv: Any
) -> None:
    make_user("mallory", "mallory's password")
    session = Session.login(f"127.0.0.1:{auth_server.port}", "mallory", "mallory's password")
    with session, session.posts(f"127.0.0.1:{posts_srv.port}") as posts:
        theirs = posts.create_post(title="not yours", body="")
    message = _error(logged_in.run("delete", str(theirs.id)), EXIT_FORBIDDEN)
    assert message.startswith("permission denied: ")
    assert message.endswith(f" (Posts service at 127.0.0.1:{posts_srv.port})")


def test_a_failed_renewal_names_the_auth_service(
    logged_in: Any, auth_server: Any, posts_srv: Any
) -> None:
    """Posts refuses the revoked access token; the renewal is refused by the Auth service."""
    saved = json.loads(logged_in.token_file.read_text())
    with connect_auth(port=auth_server.port) as auth:
        auth.revoke(saved["refresh_token"])
        auth.revoke(saved["access_token"])
    message = _error(logged_in.run("list"), EXIT_UNAUTHENTICATED)
    assert message.startswith("unauthenticated: ")
    assert message.endswith(
        f"(Auth service at 127.0.0.1:{auth_server.port}; run: posts-client login USERNAME)"
    ), message
    assert posts_srv.calls.count("list_posts") == 1  # refused once, never retried


def test_posts_unable_to_check_tokens_names_the_posts_service(
    logged_in: Any, auth_server: Any, posts_srv: Any
) -> None:
    auth_server.stop()  # Posts (thrift mode) cannot ask about the token
    message = _error(logged_in.run("list"), EXIT_UNAVAILABLE)
    assert message.startswith("unavailable: ")
    assert message.endswith(f" (Posts service at 127.0.0.1:{posts_srv.port})"), message


def test_rate_limited_in_whole_seconds_naming_the_server(
    cli: Any, auth_server: Any, user: Any
) -> None:
    with connect_auth(port=auth_server.port) as auth:
        for _ in range(10):
            try:
                auth.login(user.name, "wrong guess")
            except Unauthenticated:
                continue
            except RateLimited:
                break
        else:
            pytest.fail("the Auth service never throttled")
    message = _error(_login(cli, user, "--auth", f"127.0.0.1:{auth_server.port}"),
                     EXIT_RATE_LIMITED)
    match = re.fullmatch(
        rf"rate limited: .+ \(Auth service at 127\.0\.0\.1:{auth_server.port}; "
        r"retry after (\d+) s\)", message,
    )
    assert match, message  # "retry after 59 s", not "59.295 s"
    assert 1 <= int(match[1]) <= 15 * 60


def test_a_missing_client_certificate_says_which_flags_to_pass(
    cli: Any, make_auth_server: Any, make_user: Any, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    server_cert.private_key_pem.write_to_path(tmp_path / "server.key")
    client_cert = ca.issue_cert("posts-client.example")
    client_cert.cert_chain_pems[0].write_to_path(tmp_path / "client.pem")
    client_cert.private_key_pem.write_to_path(tmp_path / "client.key")
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    server = make_auth_server(settings=ServerSettings(tls=TLSServerConfig(
        str(tmp_path / "server.pem"), str(tmp_path / "server.key"),
        client_ca_file=str(tmp_path / "ca.pem"),
    )))
    make_user("erin", "erin's password", service=server.service)
    address = f"127.0.0.1:{server.port}"

    def login(*options: str) -> Any:
        return cli.run("--auth", address, *options, "login", "erin", "--password-stdin",
                       input="erin's password\n")

    missing = _error(login("--tls-ca", str(tmp_path / "ca.pem")), EXIT_UNAVAILABLE)
    assert missing.startswith("unavailable: ")
    assert "pass --tls-cert/--tls-key" in missing, missing
    # A server certificate that fails verification is another matter: no such advice.
    untrusted = _error(login("--tls-ca", str(tmp_path / "other-ca.pem")), EXIT_UNAVAILABLE)
    assert "certificate verification failed" in untrusted
    assert "--tls-cert" not in untrusted
    assert not cli.token_file.exists()

    _ok(login("--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "client.pem"),
              "--tls-key", str(tmp_path / "client.key")))
    assert _json(cli.run("whoami", "--json"))["subject"] == "erin"  # the saved TLS files


# --------------------------------------------------------------------------- item 9


@pytest.mark.parametrize(
    ("args", "usage", "message"),
    [
        (["get", "abc"], "usage: posts-client get ", "argument ID: not a whole number: 'abc'"),
        (["get", "1", "--bogus"], "usage: posts-client get ", "unrecognized arguments: --bogus"),
        (["list", "--limit", "0"], "usage: posts-client list ", "must be from 1 to 100"),
        (["list", "--limit", "101"], "usage: posts-client list ", "must be from 1 to 100"),
        (["list", "--limit", "-1"], "usage: posts-client list ", "must be from 1 to 100"),
        (["create", "--title", "t"], "usage: posts-client create ", "one of the arguments"),
        (["update", "1"], "usage: posts-client update ", "give --title, --body or --body-file"),
        (["delete"], "usage: posts-client delete ", "the following arguments are required: ID"),
        (["login"], "usage: posts-client login ", "required: username"),
        (["whoami", "extra"], "usage: posts-client whoami ", "unrecognized arguments: extra"),
    ],
)
def test_a_usage_error_prints_the_usage_of_its_command(
    args: list[str], usage: str, message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(args, env={"POSTS_CLIENT_CONFIG_DIR": str(tmp_path)}) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(usage), captured.err
    assert "usage: posts-client [-h]" not in captured.err  # not the top-level usage
    assert message in captured.err and "Traceback" not in captured.err


def test_get_0_and_get_minus_1_get_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    errors = []
    for post_id in ("0", "-1", str(2**63)):
        assert main(["get", post_id], env={"POSTS_CLIENT_CONFIG_DIR": str(tmp_path)}) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] == errors[2]
    assert errors[0].endswith(
        "posts-client get: error: argument ID: must be a whole number from 1 to "
        f"{2**63 - 1}\n"
    )


def test_json_before_or_after_the_command_on_every_command(
    cli: Any, auth_server: Any, user: Any, posts_srv: Any
) -> None:
    auth = f"127.0.0.1:{auth_server.port}"
    posts = f"127.0.0.1:{posts_srv.port}"
    login = _json(cli.run("--json", "--auth", auth, "--posts", posts, "login", user.name,
                          "--password-stdin", input=user.password + "\n"))
    assert set(login) == {"subject", "scopes", "expires", "auth", "posts"}
    assert (login["subject"], login["auth"], login["posts"]) == (user.name, auth, posts)
    assert sorted(login["scopes"]) == ["posts:read", "posts:write"]
    relogin = _json(cli.run("login", user.name, "--password-stdin", "--json",
                            input=user.password + "\n"))
    assert relogin["subject"] == user.name

    first = _json(cli.run("--json", "create", "--title", "one", "--body", "1"))
    second = _json(cli.run("create", "--title", "two", "--body", "2", "--json"))
    assert (first["title"], second["title"]) == ("one", "two")
    for before, after in (
        (["--json", "list"], ["list", "--json"]),
        (["--json", "get", str(first["id"])], ["get", str(first["id"]), "--json"]),
        (["--json", "whoami"], ["whoami", "--json"]),
    ):
        assert _json(cli.run(*before)) == _json(cli.run(*after)), before
    updated = _json(cli.run("--json", "update", str(first["id"]), "--title", "uno"))
    assert updated["title"] == "uno" and updated["body"] == "1"

    assert _json(cli.run("--json", "delete", str(first["id"]))) == {"deleted": first["id"]}
    assert _json(cli.run("delete", str(second["id"]), "--json")) == {"deleted": second["id"]}
    assert _json(cli.run("logout", "--json")) == {"logged_out": True, "subject": user.name}
    assert _json(cli.run("--json", "logout")) == {"logged_out": False, "subject": None}


def test_json_times_are_rfc3339_beside_the_number_fields(logged_in: Any, user: Any) -> None:
    before = time.time()
    post = _json(logged_in.run("create", "--title", "when", "--body", "now", "--json"))
    # created/updated: RFC 3339, UTC, milliseconds; created_at/updated_at: unix milliseconds.
    for text, number in ((post["created"], post["created_at"]),
                         (post["updated"], post["updated_at"])):
        assert round(_instant(text) * 1000) == number
        assert before - 60 <= number / 1000 <= time.time() + 60
    listed = _json(logged_in.run("list", "--limit", "1", "--json"))["posts"]
    assert listed == [post]
    assert _json(logged_in.run("list", "--limit", "100", "--json"))["posts"] == [post]

    # whoami: expires (RFC 3339) and expires_at (unix seconds, as Principal.expires_at).
    who = _json(logged_in.run("whoami", "--json"))
    assert _instant(who["expires"]) == who["expires_at"]
    assert who["expires"].endswith(".000Z")
    assert before + 800 < who["expires_at"] < time.time() + 901  # 15 minutes, in seconds
    login = _json(_login(logged_in, user, "--json"))
    assert abs(_instant(login["expires"]) - time.time() - 900) < 60
