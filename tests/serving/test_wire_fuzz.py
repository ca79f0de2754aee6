"""Property-based fuzz of raw frames against a live server.

Random bytes, truncated messages, huge and negative lengths, invalid types and
deep nesting: every connection must end (answered or closed) promptly, and
afterwards the server answers a normal call with its connection count, thread
count and file descriptors back where they were.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth_rpc.serving.rpc import RpcServer, ServerSettings

TYPES = st.one_of(
    st.sampled_from([2, 3, 4, 6, 8, 10, 11, 12, 13, 14, 15]),  # valid
    st.sampled_from([0, 1, 5, 7, 9, 16, 17, 99, 127, -1, -128]),  # invalid
)
LENGTHS = st.one_of(
    st.integers(0, 8),
    st.sampled_from(
        [-1, -(2**31), 2**31 - 1, 2**30, 10_000, 10_001, 1 << 20, (1 << 20) + 1, 4 << 20]
    ),
)


def _string(length: int, data: bytes) -> bytes:
    return struct.pack("!i", length) + data


def _seq(etype: int, count: int, items: list[bytes]) -> bytes:
    return struct.pack("!bi", etype, count) + b"".join(items)


def _map(ktype: int, vtype: int, count: int, items: list[bytes]) -> bytes:
    return struct.pack("!bbi", ktype, vtype, count) + b"".join(items)


def _struct(fields: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(struct.pack("!bh", t, fid) + v for t, fid, v in fields) + b"\0"


LEAVES = st.one_of(
    st.binary(min_size=1, max_size=8),  # a scalar (or garbage)
    st.builds(_string, LENGTHS, st.binary(max_size=12)),
)
VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.builds(_seq, TYPES, LENGTHS, st.lists(children, max_size=4)),
        st.builds(_map, TYPES, TYPES, LENGTHS, st.lists(children, max_size=4)),
        st.builds(
            _struct,
            st.lists(st.tuples(TYPES, st.integers(-5, 5), children), max_size=4),
        ),
    ),
    max_leaves=20,
)
BODIES = st.one_of(
    st.builds(_struct, st.lists(st.tuples(TYPES, st.integers(-3, 5), VALUES), max_size=6)),
    # Deep nesting of lists or structs.
    st.builds(
        lambda d: b"\x0f\x00\x63" + b"\x0f\x00\x00\x00\x01" * d + b"\x08\0\0\0\0",
        st.integers(50, 300),
    ),
    st.builds(lambda d: b"\x0c\x00\x01" * d + b"\0" * d, st.integers(50, 300)),
)
VERSIONS = st.one_of(
    st.just(-2147418112 | 1),  # strict CALL
    st.sampled_from([-2147418112 | 2, -2147418112 | 4, -2147418112 | 9, 4, 0, -1]),
)


def _message(version: int, name: bytes, name_len: int | None, seqid: int, body: bytes) -> bytes:
    length = len(name) if name_len is None else name_len
    return struct.pack("!ii", version, length) + name + struct.pack("!i", seqid) + body


MESSAGES = st.builds(
    _message,
    VERSIONS,
    st.sampled_from([b"echo", b"add", b"item", b"nope", b"", b"\xff\xfe"]),
    st.one_of(st.none(), LENGTHS),
    st.integers(-(2**31), 2**31 - 1),
    BODIES,
)


@st.composite
def payloads(draw: st.DrawFn, framed: bool) -> bytes:
    kind = draw(st.sampled_from(["random", "message", "truncated"]))
    if kind == "random":
        data = draw(st.binary(max_size=256))
    else:
        data = draw(MESSAGES)
        if kind == "truncated" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
    if framed and kind != "random":
        length = draw(
            st.one_of(st.just(len(data)), LENGTHS, st.integers(-4, 4).map(lambda d: len(data) + d))
        )
        data = struct.pack("!i", length) + data
    return data


def send_and_wait_for_close(port: int, payload: bytes) -> float:
    """Send ``payload``, end our side, and read until the server closes; seconds taken."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
    return time.monotonic() - started


@pytest.mark.parametrize("framed", [False, True], ids=["buffered", "framed"])
def test_fuzzed_frames_never_hang_or_leak(
    wire: Any, handler: Any, framed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="auth_rpc")
    threads_before = threading.active_count()
    fds_before = len(os.listdir("/proc/self/fd"))
    server = RpcServer(
        wire.echo_thrift.Echo,
        handler,
        settings=ServerSettings(framed=framed, message_read_timeout_s=5.0),
    ).start()
    slowest: list[float] = [0.0]
    try:

        @settings(
            max_examples=100,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(payload=payloads(framed))
        def one_connection(payload: bytes) -> None:
            elapsed = send_and_wait_for_close(server.port, payload)
            slowest[0] = max(slowest[0], elapsed)
            assert elapsed < 2.0

        started = time.monotonic()
        one_connection()
        took = time.monotonic() - started
        client = wire.client_of(server)
        try:
            assert client.echo("after the fuzz") == "after the fuzz"
        finally:
            client.close()
        assert wire.wait_for(lambda: server.connection_count == 0)
        print(
            f"\nfuzz ({'framed' if framed else 'buffered'}): 100 examples in {took:.2f} s, "
            f"slowest connection {slowest[0] * 1000:.1f} ms"
        )
    finally:
        server.stop(grace_s=2.0)
    # Malformed input is expected, not a failure: no traceback was logged.
    crashes = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not crashes, crashes
    assert wire.wait_for(lambda: threading.active_count() == threads_before)
    assert wire.wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)
