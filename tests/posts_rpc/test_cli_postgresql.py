"""``posts-rpc serve --database-url`` (and ``POSTS_RPC_DATABASE_URL``): real processes on a
real PostgreSQL, two of them sharing its posts."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.idl import common_thrift, posts_thrift
from auth_rpc.serving.transport import open_client
from posts_rpc import cli

READY = re.compile(r"^posts-rpc ready: thrift=127\.0\.0\.1:(\d+) ")


@pytest.fixture
def secret_file(tmp_path: Path, hs256_secret: bytes) -> Path:
    path = tmp_path / "hs256.secret"
    path.write_bytes(hs256_secret)
    path.chmod(0o600)
    return path


@pytest.fixture
def serve(
    secret_file: Path, issuer_audience: tuple[str, str]
) -> Iterator[Callable[..., tuple[subprocess.Popen[str], int]]]:
    procs: list[subprocess.Popen[str]] = []
    issuer, audience = issuer_audience

    def _serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "posts_rpc.cli", "serve", "--host", "127.0.0.1",
             "--port", "0", "--verify", "local", "--hs256-secret-file", str(secret_file),
             "--issuer", issuer, "--audience", audience, "--status-list", "off",
             "--log-level", "WARNING", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until ready (or the process ends)
        match = READY.match(line)
        if match is None:
            proc.kill()
            raise AssertionError(f"not ready: {line!r} {proc.communicate(timeout=30)[1]}")
        return proc, int(match.group(1))

    yield _serve
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _client(port: int) -> Any:
    return open_client(posts_thrift.Posts, "127.0.0.1", port, timeout_s=10)


def test_two_services_share_the_posts_of_one_database(
    serve: Callable[..., tuple[subprocess.Popen[str], int]], postgresql_url: str,
    mint: Callable[..., str], tmp_path: Path,
) -> None:
    # One by the flag (with --workers 2), one by the environment variable, no --data-dir.
    one, port_one = serve("--database-url", postgresql_url, "--workers", "2")
    two, port_two = serve(env={cli.DATABASE_URL_ENV: postgresql_url})
    token = mint()
    c1, c2 = _client(port_one), _client(port_two)
    try:
        assert c2.list_posts(token, 0, 0).posts == []  # a page cached at two
        post = c1.create_post(token, "written at one", "")
        deadline = time.monotonic() + 10  # the notification reaches two just after
        while [p.id for p in c2.list_posts(token, 0, 0).posts] != [post.id]:
            assert time.monotonic() < deadline, "two never saw the post"
            time.sleep(0.005)
        assert c2.get_post(token, post.id) == post
        c2.delete_post(token, post.id)
        with pytest.raises(common_thrift.NotFound):  # deleted at two, gone at one
            c1.get_post(token, post.id)
    finally:
        c1.close()
        c2.close()
    assert not (tmp_path / "data").exists()  # nothing written beside the database
    for proc in (one, two):
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "give --data-dir DIR or --database-url URL"),
        (["--database-url", "mysql://u:hunter2@h/db"], {}, "expected postgresql://"),
        ([], {cli.DATABASE_URL_ENV: "sqlite:///x.db"}, "expected postgresql://"),
    ],
)
def test_usage_errors(
    args: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--port", "0", "--issuer", "https://i.test", "--verify", "thrift",
                  "--auth-addr", "h:1", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "hunter2" not in err


def test_an_unreachable_database_is_one_error_line_without_the_password(
    tmp_path: Path, secret_file: Path,
) -> None:
    url = f"postgresql://posts:hunter2@/posts?host={tmp_path}"
    for workers in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-m", "posts_rpc.cli", "serve", "--database-url", url,
             "--port", "0", "--verify", "local", "--hs256-secret-file", str(secret_file),
             "--issuer", "https://i.test", "--status-list", "off", "--workers", workers],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert done.stdout == ""
        assert "hunter2" not in done.stderr
        assert "posts-rpc: error:" in done.stderr


def _migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "posts_rpc.cli", "migrate", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_migrate_moves_a_sqlite_data_dir_to_postgresql(
    serve: Callable[..., tuple[subprocess.Popen[str], int]], postgresql_url: str,
    mint: Callable[..., str], tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    old, port = serve("--data-dir", str(data))
    token, bob = mint(), mint(sub="bob")
    with contextlib.closing(_client(port)) as client:
        posts = [client.create_post(token, f"post {i}", "body " * i) for i in range(5)]
        posts.append(client.create_post(bob, "bob's", ""))
        newest = client.create_post(token, "deleted before the move", "")
        client.delete_post(token, newest.id)  # its id must not be given again
    old.terminate()
    assert old.communicate(timeout=30) is not None and old.returncode == 0

    done = _migrate("--data-dir", str(data), "--database-url", postgresql_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("6 posts copied from "), done.stdout
    # Into a database that holds posts: refused, nothing changed.
    again = _migrate("--data-dir", str(data), "--database-url", postgresql_url)
    assert again.returncode == 1 and "already holds 6 posts" in again.stderr, again.stderr

    new, port = serve("--database-url", postgresql_url)
    with contextlib.closing(_client(port)) as client:
        assert client.list_posts(token, 100, 0).posts == sorted(
            posts, key=lambda p: p.id, reverse=True
        )  # ids, authors, titles, bodies and times as they were
        with pytest.raises(common_thrift.PermissionDenied):
            client.delete_post(token, posts[-1].id)  # still bob's
        fresh = client.create_post(token, "after the move", "")
        assert fresh.id == newest.id + 1  # past every id SQLite ever gave
    new.terminate()
    assert new.communicate(timeout=30) is not None and new.returncode == 0


def test_migrate_usage_and_a_missing_database(tmp_path: Path, postgresql_url: str) -> None:
    done = _migrate("--data-dir", str(tmp_path))
    assert done.returncode == 2 and "migrate needs --database-url" in done.stderr
    done = _migrate("--data-dir", str(tmp_path / "none"), "--database-url", postgresql_url)
    assert done.returncode == 1, done.stderr
    assert "no post database at" in done.stderr and "Traceback" not in done.stderr
