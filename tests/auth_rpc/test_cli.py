"""``auth-rpc``, run as a real process: admin commands, then ``serve`` until SIGTERM."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
import requests

from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.transport import open_client

READY = re.compile(
    r"^auth-rpc ready: thrift=(?P<host>[\d.]+):(?P<port>\d+) http=(?P<http>\S+) "
    r"issuer=(?P<issuer>\S+) audience=(?P<aud>\S+) "
    r"tls=(?P<tls>on|off) framed=(?P<framed>on|off)$"
)


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Served:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "auth_rpc.auth.cli",
                "serve",
                "--port",
                "0",
                "--http-port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # blocks until ready: no sleeping
        match = READY.match(line)
        if match is None:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            pytest.fail(f"no ready line: {line!r}\n{err}")
        self.port = int(match["port"])
        self.http = match["http"]
        self.issuer = match["issuer"]
        self.tls = match["tls"]
        self.framed = match["framed"]

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


def test_add_user_then_serve_then_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    added = run(
        "add-user",
        "alice",
        "--data-dir",
        str(data),
        "--password-stdin",
        stdin="a long enough password\n",
    )
    assert added.returncode == 0, added.stderr
    assert "a long enough password" not in added.stdout + added.stderr

    client_out = run("add-client", "reporting", "--data-dir", str(data), "--scope", "posts:read")
    assert client_out.returncode == 0, client_out.stderr
    secret = client_out.stdout.strip().splitlines()[-1]
    assert len(secret) >= 32 and " " not in secret

    served = Served("--data-dir", str(data))
    try:
        with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", served.port)) as client:
            pair = client.login("alice", "a long enough password")
            assert client.validate(pair.access_token).subject == "alice"
            svc = client.client_token("reporting", secret, "posts:read")
            assert client.validate(svc.access_token).client_id == "reporting"
            with pytest.raises(common_thrift.Unauthenticated):
                client.login("alice", "wrong password")
        jwks = requests.get(f"{served.http}/.well-known/jwks.json", timeout=5).json()
        key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(pair.access_token)["kid"]]
        claims = jwt.decode(
            pair.access_token, key, algorithms=["EdDSA"], audience="posts", issuer=served.issuer
        )
        assert claims["sub"] == "alice"
    finally:
        code, err = served.stop()
    assert code == 0, err
    assert "a long enough password" not in err and pair.access_token not in err
    assert (data / "keys").stat().st_mode & 0o077 == 0


def test_rotate_key_keeps_old_tokens_valid(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert (
        run(
            "add-user",
            "bob",
            "--data-dir",
            str(data),
            "--password-stdin",
            stdin="bob's long password\n",
        ).returncode
        == 0
    )
    served = Served("--data-dir", str(data))
    try:
        with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", served.port)) as client:
            old = client.login("bob", "bob's long password").access_token
            old_kid = jwt.get_unverified_header(old)["kid"]
            # Published at once, signing 8 s later (more than the 5 s in which the running
            # server re-reads its key table): no token may carry a kid its JWKS lacks.
            rotated = run("rotate-key", "--data-dir", str(data), "--activate-after", "8")
            assert rotated.returncode == 0, rotated.stderr
            assert "published now, it signs in 8 s" in rotated.stdout
            published: set[str] = set()
            deadline = time.monotonic() + 40
            new_kid = old_kid
            while new_kid == old_kid and time.monotonic() < deadline:
                threading.Event().wait(0.25)  # poll on the condition, bounded
                jwks = requests.get(f"{served.http}/.well-known/jwks.json", timeout=5).json()
                published |= {k["kid"] for k in jwks["keys"]}
                new = client.login("bob", "bob's long password").access_token
                new_kid = jwt.get_unverified_header(new)["kid"]
                assert new_kid in published or new_kid == old_kid, "signed before published"
            assert old_kid != new_kid, "the running server switched to the new key by itself"
            assert client.validate(old).subject == "bob"
            assert client.validate(new).subject == "bob"
        jwks = requests.get(f"{served.http}/.well-known/jwks.json", timeout=5).json()
        assert {old_kid, new_kid} <= {k["kid"] for k in jwks["keys"]}
    finally:
        code, err = served.stop()
    assert code == 0, err


def test_hs256_refuses_a_short_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 31)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "auth_rpc.auth.cli",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            "0",
            "--http-port",
            "0",
            "--alg",
            "HS256",
            "--hs256-secret-file",
            str(secret),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "32" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["add-user", "x", "--password-stdin"],  # no --data-dir
        ["serve"],
        ["frobnicate"],
        ["serve", "--data-dir", "d", "--proxy-protocol-from", "haproxy.example"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run(*args).returncode == 2


def test_a_password_without_a_terminal_needs_password_stdin(tmp_path: Path) -> None:
    """Without --password-stdin the password is asked on the terminal; with none (a
    script, a pipe, CI) the answer is one line naming the flag, not a traceback."""
    done = subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", "add-user", "alice",
         "--data-dir", str(tmp_path / "data")],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,  # no controlling terminal: /dev/tty cannot be opened
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "auth-rpc: error: no terminal to ask the password on: pass --password-stdin "
        "and give the password as the first line of standard input"
    ]
    assert "a long enough password" not in done.stdout + done.stderr
    assert not (tmp_path / "data").exists()  # nothing made


def test_add_user_twice_is_a_clear_error(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    assert (
        run(
            "add-user", "zed", "--data-dir", data, "--password-stdin", stdin="password number one\n"
        ).returncode
        == 0
    )
    again = run(
        "add-user", "zed", "--data-dir", data, "--password-stdin", stdin="password number two\n"
    )
    assert again.returncode == 1
    assert again.stderr.startswith("auth-rpc: error:") and "Traceback" not in again.stderr


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    served = Served("--data-dir", str(tmp_path / "d"))
    served.proc.send_signal(signal.SIGINT)
    _, err = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 0, err
    assert os.path.exists(tmp_path / "d")


def serve_refused(*args: str) -> subprocess.CompletedProcess[str]:
    """``auth-rpc serve ARGS`` that must refuse to start (exit 1, one line on stderr)."""
    done = run("serve", "--port", "0", "--http-port", "0", *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "ready" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("auth-rpc: error: "), done.stderr
    return done


def add_user(data: Path) -> None:
    added = run("add-user", "dan", "--data-dir", str(data), "--password-stdin",
                stdin="dan's long password\n")
    assert added.returncode == 0, added.stderr


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_serve_refuses_a_lost_database_unless_init(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"
    add_user(data)
    code, err = Served("--data-dir", str(data)).stop()  # made its signing key
    assert code == 0, err
    db = data / "auth.sqlite3"
    if how == "emptied":
        db.write_bytes(b"")  # : > DATA/auth.sqlite3
    else:
        db.unlink()
    refused = serve_refused("--data-dir", str(data))
    assert "missing or empty" in refused.stderr and "--init" in refused.stderr
    served = Served("--data-dir", str(data), "--init")  # afresh, on purpose
    code, err = served.stop()
    assert code == 0, err
    assert "--init" in err  # logged: what was moved aside


def test_serve_refuses_a_damaged_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    add_user(data)
    db = data / "auth.sqlite3"
    content = bytearray(db.read_bytes())
    content[4096 : 4096 + 16] = b"\xff" * 16  # a corrupt page
    db.write_bytes(bytes(content))
    refused = serve_refused("--data-dir", str(data))
    assert "disk image is malformed" in refused.stderr and str(db) in refused.stderr


def test_serve_refuses_a_data_dir_others_may_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    refused = serve_refused("--data-dir", str(data))
    assert f"data directory {data} is writable by group or others" in refused.stderr


def test_rotate_key_is_refused_on_an_hs256_deployment(tmp_path: Path) -> None:
    data, secret = tmp_path / "data", tmp_path / "secret"
    secret.write_bytes(b"k" * 32)
    hs256 = ("--data-dir", str(data), "--alg", "HS256", "--hs256-secret-file", str(secret))
    code, err = Served(*hs256).stop()
    assert code == 0, err
    rotated = run("rotate-key", "--data-dir", str(data))
    assert rotated.returncode == 1 and rotated.stdout == ""
    assert "HS256 secret" in rotated.stderr and "--hs256-secret-file" in rotated.stderr
    assert len(rotated.stderr.strip().splitlines()) == 1
    assert list((data / "keys").iterdir()) == []  # no key made
    served = Served(*hs256)
    try:
        jwks = requests.get(f"{served.http}/.well-known/jwks.json", timeout=5).json()
        assert jwks == {"keys": []}
    finally:
        code, err = served.stop()
    assert code == 0, err


@pytest.mark.parametrize("which", ["--port", "--http-port"])
def test_a_port_in_use_is_one_line_naming_the_address(tmp_path: Path, which: str) -> None:
    """Not ``[Errno 98] Address already in use``: which address, in words (issue 15)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", which: str(port)}
        done = run("serve", "--data-dir", str(tmp_path / "d"),
                   *(item for pair in ports.items() for item in pair))
    assert done.returncode == 1
    assert done.stdout == ""  # never ready
    assert done.stderr.splitlines()[-1] == (
        f"auth-rpc: error: cannot listen on 127.0.0.1:{port}: address already in use"
    ), done.stderr
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr


def test_the_ready_line_says_tls_and_framed(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    data = str(tmp_path / "d")
    for flags, expected in (
        ([], ("off", "off")),
        (["--framed"], ("off", "on")),
        (["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
          "--framed"], ("on", "on")),
    ):
        served = Served("--data-dir", data, *flags)
        try:
            assert (served.tls, served.framed) == expected, flags
            assert served.http.startswith("https://" if expected[0] == "on" else "http://")
        finally:
            code, err = served.stop()
        assert code == 0, err
