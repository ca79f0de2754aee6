"""Fixtures for the serving-layer tests: a tiny Echo service on RpcServer."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TCyMemoryBuffer

from auth_rpc.serving.rpc import RpcServer, ServerSettings, current_call
from auth_rpc.serving.transport import open_client

echo_thrift: Any = thriftpy2.load(
    str(Path(__file__).with_name("echo.thrift")), module_name="echo_serving_thrift"
)

VERSION_CALL = struct.pack("!i", -2147418112 | TMessageType.CALL)


class EchoHandler:
    """Handler of ``service Echo``; ``hold`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.identities: list[str | None] = []
        self.adds = 0  # calls of add() run

    def echo(self, text: str) -> str:
        return text

    def add(self, a: int | None, b: int | None) -> int:
        self.adds += 1
        return (a or 0) + (b or 0)  # a call may omit its arguments (the fuzz does)

    def hold(self, text: str) -> str:
        self.entered.set()
        assert self.release.wait(10), "test never released the held call"
        return text

    def boom(self) -> None:
        raise RuntimeError("secret internal detail 1234")

    def fail(self, text: str) -> str:
        raise echo_thrift.Oops(message=text)

    def ping(self) -> None:
        return None

    def whoami(self) -> str:
        ctx = current_call()
        assert ctx is not None
        self.identities.append(ctx.peer_identity)
        return ctx.peer_identity or ""

    def item(self, item: Any) -> Any:
        return item

    def bad_reply(self) -> Any:
        return 12345  # not a string: the reply cannot be encoded

    def peer(self) -> str:
        """The call's peer as ``host port`` (the client a PROXY header named, if any)."""
        ctx = current_call()
        assert ctx is not None and ctx.peer is not None
        return f"{ctx.peer[0]} {ctx.peer[1]}"


@pytest.fixture
def handler() -> EchoHandler:
    return EchoHandler()


@pytest.fixture
def make_server(handler: EchoHandler) -> Iterator[Callable[..., RpcServer]]:
    """``make_server(**ServerSettings fields)``: a started Echo server on a free port."""
    started: list[RpcServer] = []

    def make(**settings: Any) -> RpcServer:
        server = RpcServer(
            echo_thrift.Echo, handler, settings=ServerSettings(**settings), name="echo"
        ).start()
        started.append(server)
        return server

    yield make
    handler.release.set()
    for server in reversed(started):
        server.stop(grace_s=2.0)


@pytest.fixture
def server(make_server: Callable[..., RpcServer]) -> RpcServer:
    return make_server()


def client_of(server: RpcServer, **kwargs: Any) -> Any:
    return open_client(
        echo_thrift.Echo, "127.0.0.1", server.port, framed=server.settings.framed, **kwargs
    )


def encode_call(method: str, args: Any = None, *, seqid: int = 7) -> bytes:
    """The bytes of one CALL message (buffered transport, no frame)."""
    buf = TCyMemoryBuffer()
    proto = TCyBinaryProtocolFactory().get_protocol(buf)
    if args is None:
        args = getattr(echo_thrift.Echo, f"{method}_args")()
    proto.write_message_begin(method, TMessageType.CALL, seqid)
    args.write(proto)
    proto.write_message_end()
    value: bytes = buf.getvalue()
    return value


def call_header(method: str = "echo", seqid: int = 7) -> bytes:
    name = method.encode()
    return VERSION_CALL + struct.pack("!i", len(name)) + name + struct.pack("!i", seqid)


def frame(message: bytes) -> bytes:
    return struct.pack("!i", len(message)) + message


def raw_connect(server: RpcServer, timeout_s: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect_from(server: RpcServer, source: str, timeout_s: float = 5.0) -> socket.socket:
    """A connection to ``server`` from the loopback address ``source`` (127.0.0.0/8)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", server.port))
    except BaseException:
        sock.close()
        raise
    return sock


def decode_reply(data: bytes, *, framed: bool = False) -> tuple[str, int, int, Any]:
    """``(method, message type, seqid, value)`` of the first message in ``data``.

    ``value`` is the ``TApplicationException`` of an EXCEPTION message, else ``None``.
    """
    buf = TCyMemoryBuffer(data[4:] if framed else data)
    proto = TCyBinaryProtocolFactory().get_protocol(buf)
    method, mtype, seqid = proto.read_message_begin()
    value = None
    if mtype == TMessageType.EXCEPTION:
        value = TApplicationException()
        proto.read_struct(value)
    return method, mtype, seqid, value


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (``ConnectionResetError`` ends it too)."""
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll ``condition`` until true or the timeout; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        time.sleep(0.005)
    return True


class Helpers:
    """The helpers above, handed to tests as the ``wire`` fixture."""

    echo_thrift = echo_thrift
    client_of = staticmethod(client_of)
    encode_call = staticmethod(encode_call)
    call_header = staticmethod(call_header)
    frame = staticmethod(frame)
    raw_connect = staticmethod(raw_connect)
    connect_from = staticmethod(connect_from)
    decode_reply = staticmethod(decode_reply)
    read_until_closed = staticmethod(read_until_closed)
    wait_for = staticmethod(wait_for)


@pytest.fixture
def wire() -> type[Helpers]:
    return Helpers
