"""``auth-rpc``'s password policy, name alphabet, ``--secret-file``, ``keys`` and
``export-public-key``, and ``posts-rpc serve --verify local`` with an exported key,
all run as real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from auth_rpc.idl import auth_thrift, posts_thrift
from auth_rpc.serving.transport import open_client

AUTH_READY = re.compile(r"^auth-rpc ready: thrift=[\d.]+:(?P<port>\d+) http=(?P<http>\S+) ")
POSTS_READY = re.compile(r"^posts-rpc ready: thrift=[\d.]+:(?P<port>\d+) ")
PASSWORD = "a long enough password"


def run(*args: str, stdin: str = "", module: str = "auth_rpc.auth.cli"
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", module, *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


def ok(*args: str, stdin: str = "") -> str:
    done = run(*args, stdin=stdin)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def refused(*args: str, stdin: str = "") -> str:
    done = run(*args, stdin=stdin)
    assert done.returncode == 1, (args, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def names(data: Path) -> set[str]:
    listed = json.loads(ok("list", "--data-dir", str(data), "--json"))
    return {a["name"] for a in listed["accounts"]}


@contextlib.contextmanager
def process(args: list[str], ready: re.Pattern[str]) -> Iterator[re.Match[str]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # blocks until ready
        match = ready.match(line)
        if match is None:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"no ready line: {line!r}\n{err}")
        yield match
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


def test_password_policy(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    add = ("add-user", "--data-dir", data, "--password-stdin")
    assert "at least 8 characters" in refused(*add[:1], "u1", *add[1:], stdin="1234567\n")
    ok(*add[:1], "u1", *add[1:], stdin="12345678\n")  # no composition rules
    ok(*add[:1], "u2", *add[1:], stdin="x" * 64 + "\n")
    ok(*add[:1], "u3", *add[1:], stdin="é" * 512 + "\n")  # 1024 bytes
    assert "at most 1024 bytes" in refused(*add[:1], "u4", *add[1:], stdin="x" * 1025 + "\n")
    assert "at least 12" in refused(*add[:1], "u5", *add[1:], "--min-password-length", "12",
                                     stdin="eleven char\n")
    low = run(*add[:1], "u6", *add[1:], "--min-password-length", "4", stdin="abcd\n")
    assert low.returncode == 0 and "below the 8 characters NIST SP 800-63B" in low.stderr
    for bad in ("0", "65", "x"):
        assert run(*add[:1], "u7", *add[1:], "--min-password-length", bad,
                   stdin=PASSWORD + "\n").returncode == 2
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("password123\nCorrect Horse Battery Staple\n")
    for pw in ("PASSWORD123", "correct horse battery staple"):
        message = refused(*add[:1], "u8", *add[1:], "--password-blocklist", str(blocklist),
                          stdin=pw + "\n")
        assert "list of forbidden passwords" in message and pw not in message
    ok(*add[:1], "u8", *add[1:], "--password-blocklist", str(blocklist), stdin=PASSWORD + "\n")
    assert "No such file" in refused(*add[:1], "u9", *add[1:], "--password-blocklist",
                                     str(tmp_path / "missing"), stdin=PASSWORD + "\n")
    assert names(Path(data)) == {"u1", "u2", "u3", "u6", "u8"}  # a refusal made nothing


BAD_NAMES = ["bo b", ".alice", "_x", "@x", "a" * 65, "ålice", "a/b", "a:b", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_new_names_follow_the_alphabet(tmp_path: Path, name: str) -> None:
    data = str(tmp_path / "d")
    message = refused("add-user", name, "--data-dir", data, "--password-stdin",
                      stdin=PASSWORD + "\n")
    assert message.startswith("auth-rpc: error: username:")
    assert refused("add-client", name, "--data-dir", data).startswith(
        "auth-rpc: error: client_id:")


def test_names_in_the_alphabet_and_old_names_keep_working(tmp_path: Path) -> None:
    data = tmp_path / "d"
    ok("add-user", "alice.smith@example.com", "--data-dir", str(data), "--password-stdin",
       stdin=PASSWORD + "\n")
    ok("add-client", "svc_1-a", "--data-dir", str(data), "--secret-file", str(tmp_path / "s"))
    # A name made before the rule (by the store directly, as an older version did).
    from auth_rpc.auth.service import AuthService, AuthSettings

    with AuthService.open(AuthSettings(data_dir=data, issuer="urn:x"), create_key=False) as svc:
        svc._accounts.add_user(
            "old name", svc._hasher.hash(PASSWORD), ("posts:read",), now=int(time.time())
        )
    with process([sys.executable, "-m", "auth_rpc.auth.cli", "serve", "--data-dir", str(data),
                  "--port", "0", "--http-port", "0"], AUTH_READY) as ready:
        port = int(ready["port"])
        with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", port)) as auth:
            assert auth.login("old name", PASSWORD).access_token
            assert auth.login("alice.smith@example.com", PASSWORD).access_token
    ok("disable", "old name", "--data-dir", str(data))  # and the admin commands find it


def test_secret_file(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    path = tmp_path / "reporting.secret"
    out = ok("add-client", "reporting", "--data-dir", data, "--secret-file", str(path))
    secret = path.read_text()
    assert secret.endswith("\n") and len(secret.strip()) >= 43
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert secret.strip() not in out and str(path) in out and "(mode 0600)" in out
    # An existing file is refused, and nothing is registered.
    assert "exists" in refused("add-client", "other", "--data-dir", data, "--secret-file",
                               str(path))
    assert names(Path(data)) == {"reporting"} and path.read_text() == secret
    # Nor a symbolic link (it could point to a file others read).
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    assert "exists" in refused("add-client", "other", "--data-dir", data, "--secret-file",
                               str(link))
    assert not (tmp_path / "elsewhere").exists()
    # --force replaces it with a new 0600 file.
    path.chmod(0o644)
    ok("reset-secret", "reporting", "--data-dir", data, "--secret-file", str(path), "--force")
    assert path.read_text() != secret and os.stat(path).st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # A failure leaves no file behind.
    assert "no user or client" in refused("reset-secret", "nobody", "--data-dir", data,
                                          "--secret-file", str(tmp_path / "nobody.secret"))
    assert not (tmp_path / "nobody.secret").exists()
    assert run("add-client", "x", "--data-dir", data, "--force").returncode == 2


def test_public_key_flag_says_what_to_pass(tmp_path: Path) -> None:
    data = tmp_path / "auth"
    ok("add-user", "alice", "--data-dir", str(data), "--password-stdin", stdin=PASSWORD + "\n")
    with process([sys.executable, "-m", "auth_rpc.auth.cli", "serve", "--data-dir", str(data),
                  "--port", "0", "--http-port", "0"], AUTH_READY):
        pass  # made the first key
    private = next((data / "keys").glob("*.pem"))
    jwks = tmp_path / "jwks.json"
    ok("export-public-key", "--data-dir", str(data), "--jwks", str(jwks))
    base = ["serve", "--data-dir", str(tmp_path / "posts"), "--port", "0", "--verify", "local",
            "--issuer", "http://127.0.0.1:1"]
    done = run(*base, "--public-key", str(private), module="posts_rpc.cli")
    assert done.returncode == 1
    assert "--public-key" in done.stderr and "private key" in done.stderr
    assert "export-public-key" in done.stderr and "BEGIN" not in done.stderr
    done = run(*base, "--public-key", str(jwks), module="posts_rpc.cli")
    assert done.returncode == 1 and "--jwks-file" in done.stderr
    done = run(*base, "--jwks-file", str(private), module="posts_rpc.cli")
    assert done.returncode == 1 and "not JSON" in done.stderr


def test_keys_and_export(tmp_path: Path) -> None:
    data = tmp_path / "auth"
    ok("add-user", "alice", "--data-dir", str(data), "--password-stdin", stdin=PASSWORD + "\n")
    assert "no signing keys yet" in ok("keys", "--data-dir", str(data))
    assert "never been started" in refused("export-public-key", "--data-dir", str(data))
    with process([sys.executable, "-m", "auth_rpc.auth.cli", "serve", "--data-dir", str(data),
                  "--port", "0", "--http-port", "0"], AUTH_READY):
        pass
    first = json.loads(ok("keys", "--data-dir", str(data), "--json"))["keys"]
    assert [(k["alg"], k["state"], k["last_token_expires_at"]) for k in first] == [
        ("EdDSA", "current", None)]
    pem = ok("export-public-key", "--data-dir", str(data))
    assert pem.startswith("-----BEGIN PUBLIC KEY-----") and "PRIVATE" not in pem
    out = tmp_path / "auth-public.pem"
    ok("export-public-key", "--data-dir", str(data), "--out", str(out))
    assert out.read_text() == pem
    ok("rotate-key", "--data-dir", str(data), "--activate-after", "3600")
    listed = json.loads(ok("keys", "--data-dir", str(data), "--json"))["keys"]
    assert [k["state"] for k in listed] == ["current", "pending"]
    current, pending = listed
    assert current["last_token_expires_at"] == pending["activates_at"] + 900
    table = ok("keys", "--data-dir", str(data))
    assert current["kid"] in table and "pending" in table
    noted = run("export-public-key", "--data-dir", str(data))
    assert noted.stdout == pem and "--jwks" in noted.stderr  # warns: the PEM will stop
    jwks = tmp_path / "jwks.json"
    ok("export-public-key", "--data-dir", str(data), "--jwks", str(jwks))
    published = json.loads(jwks.read_text())
    assert {k["kid"] for k in published["keys"]} == {current["kid"], pending["kid"]}
    assert all("d" not in k for k in published["keys"])  # public members only


def _login(port: int) -> str:
    with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", port)) as auth:
        token: str = auth.login("alice", PASSWORD).access_token
        return token


def test_local_mode_with_an_exported_jwk_set_survives_a_rotation(tmp_path: Path) -> None:
    """The README walk-through: pip install, add a user, serve, export the keys (no openssl),
    a local-mode Posts service; then a rotation with the new key exported while pending."""
    data = tmp_path / "auth-data"
    jwks = tmp_path / "auth-jwks.json"
    ok("add-user", "alice", "--data-dir", str(data), "--password-stdin", stdin=PASSWORD + "\n")
    auth_cmd = [sys.executable, "-m", "auth_rpc.auth.cli", "serve", "--data-dir", str(data),
                "--port", "0", "--http-port", "0"]
    with process(auth_cmd, AUTH_READY) as auth_ready:
        port, issuer = int(auth_ready["port"]), auth_ready["http"]
        ok("export-public-key", "--data-dir", str(data), "--jwks", str(jwks))
        posts_cmd = [sys.executable, "-m", "posts_rpc.cli", "serve", "--data-dir",
                     str(tmp_path / "posts-data"), "--port", "0", "--verify", "local",
                     "--jwks-file", str(jwks), "--issuer", issuer]
        with process(posts_cmd, POSTS_READY) as posts_ready:
            # posts-client login alice && posts-client create ... (free ports, so named)
            client_env = {**os.environ, "POSTS_CLIENT_CONFIG_DIR": str(tmp_path / "client")}
            addresses = ["--auth", f"127.0.0.1:{port}",
                         "--posts", f"127.0.0.1:{posts_ready['port']}"]
            for args, stdin in (
                ([*addresses, "login", "alice", "--password-stdin"], PASSWORD + "\n"),
                (["create", "--title", "Hello", "--body", "checked locally"], ""),
            ):
                done = subprocess.run(  # the real command, fixed arguments
                    [sys.executable, "-m", "client.cli", *args], input=stdin, env=client_env,
                    capture_output=True, text=True, timeout=60, check=False,
                )
                assert done.returncode == 0, (args, done.stdout, done.stderr)
            assert done.stdout == "created post 1\n"
            # A Thrift client from here on, opened once it has a call to send (a new connection
            # must send its first within 10 s, and a login may take long on a busy machine).
            old = _login(port)
            with contextlib.closing(
                open_client(posts_thrift.Posts, "127.0.0.1", int(posts_ready["port"]))
            ) as posts:
                assert posts.list_posts(old, 10, 0).posts[0].author == "alice"
                # Rotate; the new key is exported while pending (the file is replaced: no
                # restart).
                ok("rotate-key", "--data-dir", str(data), "--activate-after", "8")
                ok("export-public-key", "--data-dir", str(data), "--jwks", str(jwks))
                old_kid = jwt.get_unverified_header(old)["kid"]
                new = old
                deadline = time.monotonic() + 60
                while jwt.get_unverified_header(new)["kid"] == old_kid:
                    assert time.monotonic() < deadline, "the new key never signed"
                    threading.Event().wait(0.25)  # poll on the condition, bounded
                    new = _login(port)
                assert posts.list_posts(new, 10, 0).posts[0].title == "Hello"
                assert posts.list_posts(old, 10, 0).posts  # the old key still verifies
