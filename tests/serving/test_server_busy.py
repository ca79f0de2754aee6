"""A connection refused at a cap is answered "server busy": clients tell it from a lost one.

Before: the listener closed a connection over its cap without a word, so a
client that had sent its request saw the connection drop after sending and
``client.Session`` raised ``ConnectionLost`` ("the server may have done it")
although the server never read the request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from auth_rpc.serving.rpc import RpcServer
from client.session import ConnectionLost, Session, Tokens, TransportError


@pytest.fixture
def session() -> Iterator[Session]:
    """A session holding a token that is never due (no Auth service is asked)."""
    tokens = Tokens("not-a-real-token", "", time.time() + 3600, 3600.0)
    with Session("127.0.0.1:1", tokens) as s:
        yield s


def echo_client(session: Session, server: RpcServer, wire: Any) -> Any:
    # Echo has no token argument of its own: echo(text) takes the token's place,
    # and add(a, b), the call under test, is called as it is (not safe to repeat).
    return session.client(wire.echo_thrift.Echo, f"127.0.0.1:{server.port}", token_arg="text")


class HeldCall:
    """One connection of the server kept in a call (``hold``) until released."""

    def __init__(self, wire: Any, server: RpcServer, handler: Any) -> None:
        self.client = wire.client_of(server)
        self.handler = handler
        self.thread = threading.Thread(target=self.client.hold, args=("held",), daemon=True)
        self.thread.start()
        assert handler.entered.wait(5)

    def release(self) -> None:
        self.handler.release.set()
        self.thread.join(5)
        self.client.close()


def test_session_sees_a_refusal_at_the_cap_as_not_sent(
    wire: Any, make_server: Any, handler: Any, session: Session
) -> None:
    server = make_server(max_connections=1)
    held = HeldCall(wire, server, handler)
    try:
        client = echo_client(session, server, wire)
        with pytest.raises(TransportError) as info:
            client.add(1, 2)
        assert not isinstance(info.value, ConnectionLost), info.value
        assert "server busy" in str(info.value)
        from auth_rpc.serving.rpc import is_server_busy

        assert is_server_busy(info.value.__cause__)
        assert handler.adds == 0  # never run
        assert client.connections_opened == 2  # not sent: retried once, on a new connection
        print(f"\nrefused at the cap: {type(info.value).__name__}: {info.value}")
    finally:
        held.release()
    assert client.add(1, 2) == 3  # room again


def test_session_sees_a_refusal_over_the_per_peer_cap_as_not_sent(
    wire: Any, make_server: Any, handler: Any, session: Session
) -> None:
    server = make_server(max_connections_per_peer=2)
    idle = [wire.raw_connect(server) for _ in range(2)]
    try:
        assert wire.wait_for(lambda: server.connection_count == 2)
        client = echo_client(session, server, wire)
        with pytest.raises(TransportError) as info:
            client.add(1, 2)
        assert not isinstance(info.value, ConnectionLost), info.value
        assert "too many connections from this address" in str(info.value)
        assert handler.adds == 0
    finally:
        for sock in idle:
            sock.close()
    assert wire.wait_for(lambda: server.connection_count == 0)
    assert client.add(1, 2) == 3


def test_pooled_connection_evicted_while_idle_is_replaced_without_an_error(
    wire: Any, make_server: Any, handler: Any, session: Session
) -> None:
    server = make_server(max_connections=2)
    client = echo_client(session, server, wire)
    assert client.add(1, 1) == 2  # its pooled connection is now the oldest idle one
    # The reply is sent before the server marks the connection idle again: on a
    # busy machine the newcomers below could arrive in between, and the one idle
    # connection then (the first newcomer) would be the one evicted.
    assert wire.wait_for(lambda: not any(c.busy for c in server._connections))
    others = [wire.client_of(server), wire.client_of(server)]
    try:
        for other in others:
            assert other.echo("x") == "x"  # the second one evicted the pooled connection
        assert wire.wait_for(lambda: server.connection_count == 2)
        # The pool sees the closed connection before using it: a new one, no error.
        assert client.add(2, 2) == 4
        assert client.connections_opened == 2
        assert handler.adds == 2
    finally:
        for other in others:
            other.close()


@pytest.mark.parametrize("framed", [False, True], ids=["buffered", "framed"])
def test_apache_thrift_client_gets_a_clean_server_busy_error(
    wire: Any, make_server: Any, handler: Any, framed: bool
) -> None:
    """A client of Apache Thrift's own library decodes the answer: no hang, no reset."""
    pytest.importorskip("thrift", reason="the thrift Python library is in the test extra")
    from thrift.protocol import TBinaryProtocol
    from thrift.Thrift import TApplicationException, TMessageType, TType
    from thrift.transport import TSocket, TTransport

    server = make_server(max_connections=1, framed=framed)
    held = HeldCall(wire, server, handler)
    sock = TSocket.TSocket("127.0.0.1", server.port)
    sock.setTimeout(5000)
    trans = TTransport.TFramedTransport(sock) if framed else TTransport.TBufferedTransport(sock)
    try:
        trans.open()
        proto = TBinaryProtocol.TBinaryProtocol(trans)
        proto.writeMessageBegin("add", TMessageType.CALL, 9)
        proto.writeStructBegin("add_args")
        proto.writeFieldBegin("a", TType.I64, 1)
        proto.writeI64(1)
        proto.writeFieldEnd()
        proto.writeFieldStop()
        proto.writeStructEnd()
        proto.writeMessageEnd()
        trans.flush()
        started = time.monotonic()
        _, mtype, seqid = proto.readMessageBegin()
        assert mtype == TMessageType.EXCEPTION
        error = TApplicationException()
        error.read(proto)
        proto.readMessageEnd()
        print(f"\nApache Thrift ({'framed' if framed else 'buffered'}): seqid {seqid}, "
              f"type {error.type}, {error.message!r} after {time.monotonic() - started:.3f} s")
        assert error.type == TApplicationException.UNKNOWN
        assert error.message.startswith("server busy")
        assert seqid in (9, 0)  # the request's own when it had arrived by the accept
        assert handler.adds == 0
    finally:
        trans.close()
        held.release()
