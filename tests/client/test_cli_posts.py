"""``posts-client`` create / list / get / update / delete as subprocesses, and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from client import RateLimited, Unauthenticated, connect_auth

EXIT_UNAUTHENTICATED = 3
EXIT_FORBIDDEN = 4
EXIT_NOT_FOUND = 5
EXIT_INVALID = 6
EXIT_UNAVAILABLE = 7
EXIT_RATE_LIMITED = 8


@pytest.fixture
def logged_in(cli: Any, auth_server: Any, user: Any, posts_srv: Any) -> Any:
    """``cli`` with ``user`` logged in; the addresses are saved by login."""
    result = cli.run(
        "--auth", f"127.0.0.1:{auth_server.port}", "--posts", f"127.0.0.1:{posts_srv.port}",
        "login", user.name, "--password-stdin", input=user.password + "\n",
    )
    assert result.returncode == 0, result.stderr
    return cli


def _ok(result: Any) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return str(result.stdout)


def _fails(result: Any, code: int, prefix: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"posts-client: error: {prefix}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback


def test_create_list_get_update_delete(logged_in: Any, user: Any, tmp_path: Path) -> None:
    cli = logged_in
    created = json.loads(_ok(cli.run("create", "--title", "Hello", "--body", "first", "--json")))
    assert created["title"] == "Hello" and created["author"] == user.name
    first = created["id"]

    body_file = tmp_path / "body.txt"
    body_file.write_text("from a file\nsecond line\n")
    assert _ok(cli.run("create", "--title", "From file", "--body-file", str(body_file))) == (
        f"created post {first + 1}\n"
    )
    _ok(cli.run("create", "--title", "From stdin", "--body-file", "-", input="piped body"))

    listing = json.loads(_ok(cli.run("list", "--json")))
    assert [p["title"] for p in listing["posts"]] == ["From stdin", "From file", "Hello"]
    assert listing["next_before_id"] == 0
    assert set(listing["posts"][0]) == {
        "id", "author", "title", "body", "created", "updated", "created_at", "updated_at",
    }

    page = cli.run("list", "--limit", "2", "--json")
    page_data = json.loads(_ok(page))
    assert len(page_data["posts"]) == 2
    assert page_data["next_before_id"] == first + 1
    older = json.loads(_ok(cli.run("list", "--before", str(first + 1), "--json")))
    assert [p["id"] for p in older["posts"]] == [first]

    table = _ok(cli.run("list", "--limit", "2")).splitlines()
    assert table[0].split() == ["ID", "AUTHOR", "UPDATED", "(UTC)", "TITLE"]
    assert table[1].split()[0] == str(first + 2) and table[1].endswith("From stdin")
    assert len(table) == 3

    got = json.loads(_ok(cli.run("get", str(first + 1), "--json")))
    assert got["body"] == "from a file\nsecond line\n"
    text = _ok(cli.run("get", str(first + 1)))
    assert "title:    From file" in text and text.endswith("second line\n\n")

    updated = json.loads(_ok(cli.run("update", str(first), "--title", "Renamed", "--json")))
    assert updated["title"] == "Renamed" and updated["body"] == "first"  # body kept
    _ok(cli.run("update", str(first), "--title", "T", "--body", "B"))
    assert json.loads(_ok(cli.run("get", str(first), "--json")))["body"] == "B"

    assert _ok(cli.run("delete", str(first))) == f"deleted post {first}\n"
    _fails(cli.run("get", str(first)), EXIT_NOT_FOUND, f"not found: post {first}\n")
    _fails(cli.run("delete", str(first)), EXIT_NOT_FOUND, f"not found: post {first}\n")


def test_empty_list(logged_in: Any) -> None:
    assert _ok(logged_in.run("list")) == "(no posts)\n"
    assert json.loads(_ok(logged_in.run("list", "--json"))) == {"posts": [], "next_before_id": 0}


def test_someone_elses_post_is_forbidden(
    logged_in: Any, make_user: Any, auth_server: Any, posts_srv: Any, tmp_path: Path
) -> None:
    from client import Session

    make_user("mallory", "mallory's password")
    session = Session.login(f"127.0.0.1:{auth_server.port}", "mallory", "mallory's password")
    with session, session.posts(f"127.0.0.1:{posts_srv.port}") as posts:
        theirs = posts.create_post(title="not yours", body="")
    _fails(logged_in.run("delete", str(theirs.id)), EXIT_FORBIDDEN, "permission denied:")
    _fails(
        logged_in.run("update", str(theirs.id), "--title", "mine now"),
        EXIT_FORBIDDEN, "permission denied:",
    )


def test_invalid_arguments_exit_6(logged_in: Any, tmp_path: Path) -> None:
    _fails(
        logged_in.run("create", "--title", "   ", "--body", "x"), EXIT_INVALID, "invalid argument:"
    )
    _fails(
        logged_in.run("create", "--title", "t" * 201, "--body", "x"), EXIT_INVALID,
        "invalid argument: title",
    )
    _fails(
        logged_in.run("create", "--title", "t", "--body-file", str(tmp_path / "missing.txt")),
        EXIT_INVALID, "cannot read",
    )


def test_not_logged_in_exits_3(cli: Any, posts_srv: Any) -> None:
    _fails(cli.run("--posts", f"127.0.0.1:{posts_srv.port}", "list"), EXIT_UNAUTHENTICATED,
           "not logged in")


def test_logout_then_commands_exit_3(logged_in: Any, auth_server: Any) -> None:
    saved = json.loads(logged_in.token_file.read_text())
    _ok(logged_in.run("logout"))
    _fails(logged_in.run("list"), EXIT_UNAUTHENTICATED, "not logged in")
    _fails(logged_in.run("whoami"), EXIT_UNAUTHENTICATED, "not logged in")
    with connect_auth(port=auth_server.port) as auth, pytest.raises(Unauthenticated):
        auth.validate(saved["access_token"])


def test_unreachable_posts_exits_7(logged_in: Any, unused_port: int) -> None:
    _fails(
        logged_in.run("--posts", f"127.0.0.1:{unused_port}", "list"),
        EXIT_UNAVAILABLE, "unavailable: cannot connect to",
    )


def test_rate_limited_login_exits_8(cli: Any, auth_server: Any, user: Any) -> None:
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
    result = cli.run(
        "--auth", f"127.0.0.1:{auth_server.port}", "login", user.name, "--password-stdin",
        input=user.password + "\n",
    )
    _fails(result, EXIT_RATE_LIMITED, "rate limited:")
    assert "retry after" in result.stderr


def test_posts_refusing_every_token_exits_3_after_one_retry(
    logged_in: Any, make_posts: Any, auth_calls: Any
) -> None:
    strict = make_posts(audience="another-service")
    _fails(
        logged_in.run("--posts", f"127.0.0.1:{strict.port}", "list"),
        EXIT_UNAUTHENTICATED, "unauthenticated:",
    )
    assert strict.calls.count("list_posts") == 2
    assert auth_calls.count("refresh") == 1


def test_posts_unable_to_check_tokens_exits_7(logged_in: Any, auth_server: Any) -> None:
    auth_server.stop()
    _fails(logged_in.run("list"), EXIT_UNAVAILABLE, "unavailable:")


def test_a_create_whose_reply_was_lost_has_its_own_exit_code(
    cli: Any, auth_server: Any, user: Any, posts_srv: Any, drop_reply_proxy: Any
) -> None:
    """Regression: "not sent" and "may have been done" both exited 7, so a script
    retrying on 7 made duplicates. Now 7 means not done, 9 means look first."""
    proxy = drop_reply_proxy(posts_srv.port, drops=1)
    login = cli.run(
        "--auth", f"127.0.0.1:{auth_server.port}", "--posts", f"127.0.0.1:{proxy.port}",
        "login", user.name, "--password-stdin", input=user.password + "\n",
    )
    assert login.returncode == 0, login.stderr
    _fails(cli.run("create", "--title", "maybe", "--body", ""), 9, "connection lost:")
    assert posts_srv.calls.count("create_post") == 1  # sent once, and done
