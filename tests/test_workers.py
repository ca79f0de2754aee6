"""``--workers N``: pre-forked processes sharing the listening sockets, supervised."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from auth_rpc.idl import auth_thrift, posts_thrift
from auth_rpc.keys import SigningKey
from auth_rpc.testing import TokenFactory
from auth_rpc.transport import open_client


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _wait_for(condition: object, what: str, timeout_s: float = 30.0) -> None:
    """Poll a condition with a deadline (a process table changes asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.05)


@contextlib.contextmanager
def serve(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_posts_workers_share_the_socket_restart_and_stop(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    factory = TokenFactory(key=SigningKey.hs256(secret.read_bytes()), issuer="urn:t")
    with serve(
        "posts_rpc.cli", "serve", "--data-dir", str(tmp_path / "posts"), "--port", "0",
        "--verify", "local", "--hs256-secret-file", str(secret), "--issuer", "urn:t",
        "--workers", "2",
    ) as (proc, ready):
        port = int(re.search(r"thrift=[\d.]+:(\d+)", ready)[1])  # type: ignore[index]
        assert "workers=2" in ready
        _wait_for(lambda: len(_children(proc.pid)) == 2, "two workers")
        clients = [open_client(posts_thrift.Posts, "127.0.0.1", port) for _ in range(8)]
        try:
            token = factory.mint("alice")
            ids = {c.create_post(token, f"post {i}", "").id for i, c in enumerate(clients)}
            assert len(ids) == 8, "every worker writes the one shared store"
            assert len(clients[0].list_posts(token, 100, 0).posts) == 8
        finally:
            for c in clients:
                c.close()

        victim = sorted(_children(proc.pid))[0]
        os.kill(victim, signal.SIGKILL)
        _wait_for(
            lambda: victim not in _children(proc.pid) and len(_children(proc.pid)) == 2,
            "a replacement worker",
        )
        with contextlib.closing(open_client(posts_thrift.Posts, "127.0.0.1", port)) as c:
            assert len(c.list_posts(token, 100, 0).posts) == 8

        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_auth_workers_serve_thrift_and_http(tmp_path: Path) -> None:
    data = tmp_path / "auth"
    subprocess.run(
        [sys.executable, "-m", "auth_rpc.cli", "add-user", "alice", "--data-dir", str(data),
         "--password-stdin"],
        input="a long password\n", text=True, check=True, capture_output=True,
    )
    with serve(
        "auth_rpc.cli", "serve", "--data-dir", str(data), "--port", "0", "--http-port", "0",
        "--workers", "2",
    ) as (proc, ready):
        match = re.search(r"thrift=[\d.]+:(\d+) http=(\S+)", ready)
        assert match, ready
        _wait_for(lambda: len(_children(proc.pid)) == 2, "two workers")
        kids = set()
        for _ in range(4):
            with contextlib.closing(
                open_client(auth_thrift.Auth, "127.0.0.1", int(match[1]))
            ) as c:
                pair = c.login("alice", "a long password")
                kids.add(TokenFactory.kid_of(pair.access_token))
                assert c.validate(pair.access_token).subject == "alice"
        assert len(kids) == 1, "every worker signs with the one key made before forking"
        assert requests.get(f"{match[2]}/healthz", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
