"""Typed internal errors, connection reuse after errors, and the access log."""

from __future__ import annotations

import io
import logging
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from thriftpy2.thrift import TApplicationException

REQUEST_ID = re.compile(r"^internal error \(request id ([0-9a-f]{16})\)$")


def test_undeclared_exception_is_internal_error_with_only_a_request_id(
    wire: Any, server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = wire.client_of(server)
    try:
        with pytest.raises(TApplicationException) as info:
            client.boom()
        assert info.value.type == TApplicationException.INTERNAL_ERROR
        match = REQUEST_ID.match(info.value.message)
        assert match, info.value.message
        request_id = match.group(1)
        assert "secret" not in info.value.message
        # The connection stays usable.
        assert client.echo("after") == "after"
    finally:
        client.close()
    errors = [r for r in caplog.records if r.name == "auth_rpc.serving.rpc"]
    assert len(errors) == 1
    assert request_id in errors[0].getMessage()
    assert errors[0].exc_info is not None  # the traceback is for the server's log only
    assert wire.wait_for(
        lambda: any(
            request_id in r.getMessage() for r in caplog.records if r.name.endswith("access")
        )
    )
    access = [r.getMessage() for r in caplog.records if r.name == "auth_rpc.access"]
    assert any(f"request_id={request_id}" in line for line in access)
    assert any("method=boom outcome=internal_error" in line for line in access)


def test_declared_exception_reaches_the_client_typed(wire: Any, server: Any) -> None:
    client = wire.client_of(server)
    try:
        with pytest.raises(wire.echo_thrift.Oops) as info:
            client.fail("expected")
        assert info.value.message == "expected"
        assert client.add(2, 2) == 4
    finally:
        client.close()


def test_unencodable_reply_is_internal_error_and_connection_kept(wire: Any, server: Any) -> None:
    client = wire.client_of(server)
    try:
        with pytest.raises(TApplicationException) as info:
            client.bad_reply()
        assert info.value.type == TApplicationException.INTERNAL_ERROR
        assert client.echo("again") == "again"
    finally:
        client.close()


def test_unknown_method_is_answered_and_connection_kept(wire: Any, server: Any) -> None:
    sock = wire.raw_connect(server)
    try:
        unknown = wire.call_header("no_such_method") + b"\x08\x00\x01\x00\x00\x00\x05\x00"
        known = wire.encode_call("echo", wire.echo_thrift.Echo.echo_args(text="ok"))
        sock.sendall(unknown + known)
        data = b""
        while not data.endswith(b"ok\x00"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        assert b"no_such_method" in data
    finally:
        sock.close()


def test_oneway_call_gets_no_reply_and_the_next_call_works(wire: Any, server: Any) -> None:
    client = wire.client_of(server)
    try:
        client.ping()
        assert client.echo("next") == "next"
    finally:
        client.close()


def test_access_log_has_one_line_per_call(
    wire: Any, server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="auth_rpc.access")
    client = wire.client_of(server)
    try:
        for i in range(3):
            client.add(i, i)
        with pytest.raises(wire.echo_thrift.Oops):
            client.fail("x")
    finally:
        client.close()

    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "auth_rpc.access"]

    # The line is written after the reply is sent, so it may trail the client.
    assert wire.wait_for(lambda: len(access_lines()) >= 4)
    lines = access_lines()
    assert len(lines) == 4
    pattern = re.compile(
        r"^call method=(\w+) outcome=(\w+) latency_ms=\d+\.\d{3} subject=- request_id=[0-9a-f]{16}$"
    )
    parsed = [pattern.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(1), m.group(2)) for m in parsed if m] == [
        ("add", "ok"),
        ("add", "ok"),
        ("add", "ok"),
        ("fail", "Oops"),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01\x0f\x00\x63\x00\x7f\xff\xff\xff",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on a plain port
        b"\x80\x01\x00\x01\x00\x00\x00\x04ec",  # truncated, then closed
        b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01\x0b\x00\x01\xff\xff\xff\xff",
    ],
    ids=["stall", "http", "tls-hello", "truncated", "negative-string"],
)
def test_malformed_connection_logs_at_most_one_line_without_traceback(
    wire: Any, server: Any, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    sock = wire.raw_connect(server)
    try:
        sock.sendall(payload)
        sock.shutdown(1)  # no more data: truncated messages end here
        wire.read_until_closed(sock)
    finally:
        sock.close()
    assert wire.wait_for(lambda: server.connection_count == 0)
    records = [r for r in caplog.records if r.name.startswith("auth_rpc")]
    assert len(records) <= 1, [r.getMessage() for r in records]
    assert all(r.exc_info is None for r in records)


def test_reply_message_is_not_served(wire: Any, server: Any) -> None:
    sock = wire.raw_connect(server)
    try:
        reply = struct.pack("!ii", -2147418112 | 2, 4) + b"echo" + b"\0\0\0\1" + b"\0"
        sock.sendall(reply)
        assert wire.read_until_closed(sock) == b""
    finally:
        sock.close()


@pytest.fixture
def text_logging() -> Iterator[Callable[[], tuple[logging.StreamHandler[Any], io.StringIO]]]:
    """``install()``: the access logger's records then reach only a handler set up as
    ``configure_logging`` does (called in the test: pytest adds its capture handlers
    to the logger when the test begins)."""
    from auth_rpc.serving.rpc import TEXT_LOG_FORMAT

    access = logging.getLogger("auth_rpc.access")
    saved = (access.handlers[:], access.propagate, access.level)

    def install() -> tuple[logging.StreamHandler[Any], io.StringIO]:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(TEXT_LOG_FORMAT))
        access.handlers[:] = [handler]
        access.propagate = False
        access.setLevel(logging.INFO)
        return handler, stream

    try:
        yield install
    finally:
        access.handlers[:], access.propagate = saved[0], saved[1]
        access.setLevel(saved[2])


@pytest.mark.parametrize("now", [1_765_000_000.0, 1_765_000_000.999_9, 1_765_012_345.0625])
def test_direct_access_line_is_what_logging_writes(
    text_logging: Callable[[], tuple[logging.StreamHandler[Any], io.StringIO]], now: float
) -> None:
    """The access line written without a LogRecord is byte for byte logging's own."""
    from auth_rpc.serving.rpc import ACCESS_MESSAGE, _direct_handlers, log_access

    handler, stream = text_logging()
    access = logging.getLogger("auth_rpc.access")
    assert _direct_handlers(access) == [handler]  # the direct path is taken
    args = ("list_posts", "ok", 0.1234, "alice", "0a1b2c3d00000001")
    log_access(args, now=now)
    log_access(args, now=now + 1.5)  # another second: the cached time moves on
    record = access.makeRecord(access.name, logging.INFO, __file__, 1, ACCESS_MESSAGE, args, None)
    expected = []
    for created in (now, now + 1.5):
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        expected.append(handler.format(record) + "\n")
    assert stream.getvalue() == "".join(expected)


def test_access_line_goes_through_logging_when_it_cannot_be_written_directly(
    text_logging: Callable[[], tuple[logging.StreamHandler[Any], io.StringIO]],
) -> None:
    """Another formatter, a filter or another kind of handler: logging writes the line."""
    from auth_rpc.serving.rpc import _direct_handlers, log_access
    from auth_rpc.serving.runner import JsonFormatter

    handler, stream = text_logging()
    access = logging.getLogger("auth_rpc.access")
    args = ("list_posts", "ok", 0.5, "-", "r1")
    handler.setFormatter(JsonFormatter())
    assert _direct_handlers(access) is None
    log_access(args)
    assert '"request_id":"r1"' in stream.getvalue()
    handler.setFormatter(logging.Formatter("%(levelname)s %(funcName)s %(message)s"))
    assert _direct_handlers(access) is None
    handler.addFilter(lambda record: False)
    assert _direct_handlers(access) is None
    log_access(args)  # filtered out by logging, as before
    assert "funcName" not in stream.getvalue() and stream.getvalue().count("\n") == 1
    access.addHandler(logging.NullHandler())
    try:
        assert _direct_handlers(access) is None
    finally:
        access.removeHandler(access.handlers[-1])


def test_calls_write_their_access_lines_directly(
    wire: Any,
    server: Any,
    text_logging: Callable[[], tuple[logging.StreamHandler[Any], io.StringIO]],
) -> None:
    _, stream = text_logging()
    client = wire.client_of(server)
    try:
        assert client.add(1, 2) == 3
        assert client.echo("x") == "x"
    finally:
        client.close()
    assert wire.wait_for(lambda: stream.getvalue().count("\n") >= 2)
    lines = stream.getvalue().splitlines()
    line = re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO auth_rpc\.access call method=(add|echo) "
        r"outcome=ok latency_ms=\d+\.\d{3} subject=- request_id=[0-9a-f]{16}$"
    )
    assert len(lines) == 2 and all(line.match(text) for text in lines), lines
