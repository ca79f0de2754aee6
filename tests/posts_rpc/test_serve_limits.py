"""The Thrift limits of a real ``posts-rpc serve``: memory after large calls, limit flags.

Before: a connection kept the receive buffer of its largest message for as long
as it stayed open (the 300 s idle timeout): after one ~4 MiB call each (a bogus
token; no credentials needed), 48 idle connections took the server's RSS from
44 to 358 MiB (+6.5 MiB each; ~13 GiB possible at 2,048 connections; measured
here 47 to 382 MiB), and posts-rpc accepted 4 MiB messages although its
largest call is about 70 KiB.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

READY = re.compile(r"^posts-rpc ready: thrift=127\.0\.0\.1:(\d+) ")
CONNECTIONS = 48
MIB = 1024 * 1024
#: In the reply to a call with the token "bogus": the Unauthenticated exception's message.
REFUSED_TOKEN = b"malformed token"

_CALL = -2147418112 | 1  # strict binary header, CALL
_STRING, _LIST, _I32 = 11, 15, 8


def list_posts_call(token: str, *, padding: int = 0, seqid: int = 1) -> bytes:
    """A ``list_posts`` call; ``padding`` bytes ride in an unknown list<string> field (id 99).

    The server validates and skips the unknown field, then refuses the token.
    """
    name = b"list_posts"
    body = struct.pack("!bhi", _STRING, 1, len(token)) + token.encode()
    body += struct.pack("!bhi", _I32, 2, 1)
    if padding:
        chunk = 1000 * 1000  # under the 1 MiB string limit
        sizes = [chunk] * (padding // chunk) + ([padding % chunk] if padding % chunk else [])
        body += struct.pack("!bh", _LIST, 99) + struct.pack("!bi", _STRING, len(sizes))
        body += b"".join(struct.pack("!i", size) + b"p" * size for size in sizes)
    body += b"\0"
    return struct.pack("!ii", _CALL, len(name)) + name + struct.pack("!i", seqid) + body


def read_reply(sock: socket.socket) -> bytes:
    """One reply (the server's answers here are small): what arrives until a pause."""
    sock.settimeout(30)
    data = sock.recv(65536)
    assert data, "connection closed without a reply"
    return data


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        time.sleep(0.05)
    return True


@pytest.fixture
def serve(tmp_path: Path, hs256_secret: bytes) -> Iterator[Callable[..., tuple[int, int]]]:
    """``serve(*flags)``: a real ``posts-rpc serve`` (local mode); returns (pid, port)."""
    secret = tmp_path / "hs256.secret"
    secret.write_bytes(hs256_secret)
    secret.chmod(0o600)
    procs: list[subprocess.Popen[str]] = []

    def start(*extra: str) -> tuple[int, int]:
        cmd = [
            sys.executable, "-m", "posts_rpc.cli", "serve",
            "--data-dir", str(tmp_path / f"data{len(procs)}"), "--host", "127.0.0.1",
            "--port", "0", "--verify", "local", "--hs256-secret-file", str(secret),
            "--issuer", "https://auth.posts.test", "--status-list", "off",
            "--log-level", "WARNING", *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        procs.append(proc)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(60), "no ready line within 60 s"
        match = READY.match(proc.stdout.readline())
        assert match
        return proc.pid, int(match.group(1))

    yield start
    for proc in procs:
        proc.terminate()
        with proc:  # waits, closes the pipe
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def connect_all(port: int, socks: list[socket.socket]) -> None:
    """Open the connections (into ``socks``, for the caller to close), one small call each."""
    for _ in range(CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(list_posts_call("bogus"))
        assert REFUSED_TOKEN in read_reply(sock)


def test_idle_connections_give_back_the_buffer_of_a_large_call(
    serve: Callable[..., tuple[int, int]],
) -> None:
    # The size of Auth's largest message: what a posts-rpc before this fix accepted.
    pid, port = serve("--max-message-bytes", str(4 * MIB))
    socks: list[socket.socket] = []
    try:
        connect_all(port, socks)
        before = rss_mib(pid)
        large = list_posts_call("bogus", padding=4 * MIB - 4096)
        assert 4 * MIB - 8192 < len(large) <= 4 * MIB
        for sock in socks:  # one ~4 MiB call on each connection, then it sits idle
            sock.sendall(large)
            assert REFUSED_TOKEN in read_reply(sock)
        bound = before + 40  # before the fix: +335 MiB (+7.0 MiB per connection)
        # Idle buffers shrink 50 ms after their call: give them a moment (polled).
        wait_until(lambda: rss_mib(pid) < before + 16, 10)
        after = rss_mib(pid)
        print(
            f"\nposts-rpc RSS with {CONNECTIONS} connections: {before:.0f} MiB, "
            f"{after:.0f} MiB after one {len(large) / MIB:.2f} MiB call each "
            f"(+{(after - before) / CONNECTIONS:.2f} MiB per connection)"
        )
        assert after < bound
        # Still served.
        socks[0].sendall(list_posts_call("bogus"))
        assert REFUSED_TOKEN in read_reply(socks[0])
    finally:
        for sock in socks:
            sock.close()


def test_posts_refuses_a_message_bigger_than_its_largest_call_by_default(
    serve: Callable[..., tuple[int, int]],
) -> None:
    pid, port = serve()
    socks: list[socket.socket] = []
    try:
        connect_all(port, socks)
        before = rss_mib(pid)
        largest = list_posts_call("bogus", padding=70 * 1024)  # about a create_post's size
        socks[0].sendall(largest)
        assert REFUSED_TOKEN in read_reply(socks[0])
        for sock in socks:
            # Refused (and closed) perhaps before all of it was sent.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(list_posts_call("bogus", padding=4 * MIB - 4096))
            reply = read_reply(sock)
            assert b"message refused: message longer than 262144 bytes" in reply, reply
        after = rss_mib(pid)
        print(f"\nposts-rpc (256 KiB limit): RSS {before:.0f} MiB before, {after:.0f} MiB after "
              f"{CONNECTIONS} refused 4 MiB calls")
        assert after < before + 32
    finally:
        for sock in socks:
            sock.close()


def test_serve_flags_set_the_thrift_connection_limits(
    serve: Callable[..., tuple[int, int]],
) -> None:
    """``--max-connections-per-peer`` and ``--idle-timeout`` (new flags) reach the listener."""
    _, port = serve("--max-connections-per-peer", "2", "--idle-timeout", "0.5")
    socks: list[socket.socket] = []
    try:
        for _ in range(2):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            socks[-1].sendall(list_posts_call("bogus"))
            assert REFUSED_TOKEN in read_reply(socks[-1])
        started = time.monotonic()
        third = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(third)
        third.sendall(list_posts_call("bogus"))
        assert b"server busy: too many connections from this address" in read_reply(third)
        socks[0].settimeout(10)
        assert socks[0].recv(100) == b""  # closed after the idle timeout
        idle_s = time.monotonic() - started
        print(f"\nidle connection closed after {idle_s:.2f} s (--idle-timeout 0.5)")
        assert 0.3 < idle_s < 5
    finally:
        for sock in socks:
            sock.close()


def test_auth_serve_takes_the_same_thrift_limits() -> None:
    from auth_rpc.auth import cli as auth_cli

    flags = ["--max-connections-per-peer", "3", "--idle-timeout", "7.5"]
    args = auth_cli._parser().parse_args(
        ["serve", "--data-dir", "unused", *flags, "--max-message-bytes", "1000"]
    )
    assert (args.max_connections_per_peer, args.idle_timeout, args.max_message_bytes) == (
        3, 7.5, 1000,
    )
    defaults = auth_cli._parser().parse_args(["serve", "--data-dir", "unused"])
    assert (defaults.max_connections_per_peer, defaults.idle_timeout) == (64, 300.0)
    assert defaults.max_message_bytes == 4 * MIB  # Auth keeps 4 MiB; Posts has 256 KiB
