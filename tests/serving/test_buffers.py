"""Receive buffers: shrunk once their message is handled, bounded by a shared budget.

Before: a connection kept the buffer of its largest message (4 MiB after one
4 MiB call) for as long as it stayed open, so idle connections could pin
max_connections x max_message_bytes of memory.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import pytest

from auth_rpc.serving.wire import BufferBudget, MessageReader, WireLimits

KIB = 1024


def send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """``sock.sendall(data)`` in a thread (a socket pair buffers less than ``data``)."""
    sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    sender.start()
    return sender


def test_reader_shrinks_its_buffer_once_the_large_message_is_handled(wire: Any) -> None:
    budget = BufferBudget(8 * 1024 * KIB)
    left, right = socket.socketpair()
    reader = MessageReader(right, WireLimits(), budget=budget)
    try:
        large = wire.encode_call("echo", wire.echo_thrift.Echo.echo_args(text="x" * 900 * KIB))
        small = wire.encode_call("add", wire.echo_thrift.Echo.add_args(a=1, b=2))
        # Back to back: the second large message reuses the grown buffer.
        sender = send_in_background(left, large + large)
        for _ in range(2):
            message = reader.read_message()
            assert message is not None and len(message.payload) == len(large)
            message.payload.release()
        sender.join(5)
        grown = reader.capacity
        assert grown >= len(large)
        assert budget.used_bytes == grown - 16 * KIB
        # The connection goes quiet: waiting for the next message, the buffer shrinks.
        received: list[Any] = []
        waiter = threading.Thread(target=lambda: received.append(reader.read_message()))
        waiter.start()
        assert wire.wait_for(lambda: reader.capacity == 16 * KIB)
        assert budget.used_bytes == 0
        left.sendall(small)
        waiter.join(5)
        assert received[0] is not None and received[0].method == "add"
        received[0].payload.release()
        print(f"\nreceive buffer {grown // KIB} KiB for 900 KiB messages, "
              f"{reader.capacity // KIB} KiB once idle")
    finally:
        reader.close()
        left.close()
        right.close()
    assert budget.used_bytes == 0


def test_closing_a_reader_gives_its_budget_back(wire: Any) -> None:
    budget = BufferBudget(8 * 1024 * KIB)
    left, right = socket.socketpair()
    reader = MessageReader(right, WireLimits(), budget=budget, message_timeout_s=0.5)
    try:
        large = wire.encode_call("echo", wire.echo_thrift.Echo.echo_args(text="x" * 900 * KIB))
        sender = send_in_background(left, large[: 600 * KIB])  # the rest never comes
        with pytest.raises(TimeoutError):
            reader.read_message()
        sender.join(5)
        assert budget.used_bytes > 0
    finally:
        reader.close()
        left.close()
        right.close()
    assert budget.used_bytes == 0


def test_server_gives_back_a_large_message_buffer_between_calls(
    wire: Any, make_server: Any
) -> None:
    server = make_server()
    client = wire.client_of(server)
    try:
        text = "y" * 1000 * KIB
        assert client.echo(text) == text
        # Idle now: what the call needed is given back (not kept for the idle timeout).
        assert wire.wait_for(lambda: server.buffered_bytes == 0), server.buffered_bytes
        assert client.add(1, 1) == 2
    finally:
        client.close()


def big_echo(wire: Any, size: int, seqid: int) -> bytes:
    return wire.encode_call(
        "echo", wire.echo_thrift.Echo.echo_args(text="z" * size), seqid=seqid
    )


@pytest.mark.parametrize("framed", [False, True], ids=["buffered", "framed"])
def test_budget_refuses_a_message_that_does_not_fit_until_the_other_is_done(
    wire: Any, make_server: Any, framed: bool
) -> None:
    server = make_server(max_buffered_bytes=1024 * KIB, framed=framed)

    def encode(message: bytes) -> bytes:
        return wire.frame(message) if framed else message

    first = wire.raw_connect(server)
    second = wire.raw_connect(server)
    try:
        # ``first`` is halfway through a 800 KiB message: its buffer holds most of the budget.
        message = encode(big_echo(wire, 800 * KIB, seqid=1))
        first.sendall(message[: 700 * KIB])
        assert wire.wait_for(lambda: server.buffered_bytes > 512 * KIB)
        held = server.buffered_bytes

        # ``second`` sends 400 KiB: more than is left. Answered "server busy", unrun.
        started = time.monotonic()
        second.sendall(encode(big_echo(wire, 400 * KIB, seqid=2)))
        second.settimeout(10)
        answer = wire.read_until_closed(second)
        method, mtype, seqid, error = wire.decode_reply(answer, framed=framed)
        print(f"\nbudget 1024 KiB, {held // KIB} KiB held: a 400 KiB message refused in "
              f"{time.monotonic() - started:.3f} s: {error.message!r}")
        assert (method, mtype, seqid) == ("echo", 3, 2)  # EXCEPTION, the request's own seqid
        from auth_rpc.serving.rpc import is_server_busy

        assert is_server_busy(error)

        # ``first`` is served whole, then everything is given back.
        first.sendall(message[700 * KIB :])
        first.settimeout(10)
        reply = b""
        while len(reply) < 800 * KIB:
            chunk = first.recv(1 << 20)
            assert chunk
            reply += chunk
        assert wire.decode_reply(reply, framed=framed)[:3] == ("echo", 2, 1)
        assert wire.wait_for(lambda: server.buffered_bytes == 0), server.buffered_bytes
    finally:
        first.close()
        second.close()
    # With the budget free again, the same 400 KiB message is served.
    client = wire.client_of(server)
    try:
        assert client.echo("w" * 400 * KIB) == "w" * 400 * KIB
    finally:
        client.close()


def test_session_sees_a_budget_refusal_as_not_sent(wire: Any, make_server: Any) -> None:
    from client.session import ConnectionLost, Session, Tokens, TransportError

    server = make_server(max_buffered_bytes=256 * KIB)
    tokens = Tokens("not-a-real-token", "", time.time() + 3600, 3600.0)
    with Session("127.0.0.1:1", tokens) as session:
        client = session.client(
            wire.echo_thrift.Echo, f"127.0.0.1:{server.port}", token_arg="text"
        )
        item = wire.echo_thrift.Item(id=1, name="n" * 600 * KIB)
        with pytest.raises(TransportError) as info:
            client.item(item)
        assert not isinstance(info.value, ConnectionLost), info.value
        assert "server busy" in str(info.value)
        assert client.connections_opened == 2  # not sent: retried once
        assert wire.wait_for(lambda: server.buffered_bytes == 0)
        assert client.item(wire.echo_thrift.Item(id=2, name="small")).id == 2


def test_framed_header_of_a_refused_message_is_read_from_its_frame(wire: Any) -> None:
    from auth_rpc.serving.wire import peek_call_header

    message = wire.call_header("echo", seqid=77) + b"\0"
    assert peek_call_header(message) == ("echo", 77)
    assert peek_call_header(message[:10]) == (None, None)
    assert peek_call_header(struct.pack("!i", 5) + b"hello") == (None, None)
