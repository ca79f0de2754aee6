"""Wire limits: hostile declared sizes and types are refused before any work.

Regression guard for the thriftpy2 0.7.1 skip() stall: an unknown field
declaring a list of 2^31-1 STOP elements made the server loop ~6 s holding the
GIL, stalling every other connection.
"""

from __future__ import annotations

import statistics
import struct
import threading
import time
from typing import Any

import pytest
from thriftpy2.thrift import TApplicationException

from auth_rpc.serving.wire import MessageScanner, WireError, WireLimits

I32_MAX = 2**31 - 1

# Thrift type ids.
STOP, BOOL, BYTE, DOUBLE, I16, I32, I64, STRING, STRUCT, MAP, SET, LIST = (
    0, 2, 3, 4, 6, 8, 10, 11, 12, 13, 14, 15,
)  # fmt: skip

#: How long another connection's call may wait while a hostile message is
#: refused. Unbounded work under the GIL (what the wire limits prevent) stalled
#: others for seconds; on an idle machine the figure is a few ms, and with both
#: cores busy with other work 0.24 s was seen: the bound is loose on purpose
#: (the printed figures are the measurement).
BYSTANDER_BOUND_S = 1.0


def field(ftype: int, fid: int = 99) -> bytes:
    return struct.pack("!bh", ftype, fid)


def list_header(etype: int, count: int) -> bytes:
    return struct.pack("!bi", etype, count)


def map_header(ktype: int, vtype: int, count: int) -> bytes:
    return struct.pack("!bbi", ktype, vtype, count)


def string(value: bytes) -> bytes:
    return struct.pack("!i", len(value)) + value


def nested_lists(depth: int) -> bytes:
    """An unknown field nesting ``depth`` levels in total, the args struct included."""
    lists = depth - 1
    return field(LIST) + list_header(LIST, 1) * (lists - 1) + list_header(I32, 0)


def call(body: bytes, method: str = "echo") -> bytes:
    name = method.encode()
    return struct.pack("!ii", -2147418112 | 1, len(name)) + name + struct.pack("!i", 7) + body


# -- the scanner on its own ------------------------------------------------


def scan_all(data: bytes, limits: WireLimits | None = None, *, step: int = 0) -> int | None:
    """Scan ``data`` at once, or revealing it ``step`` bytes at a time."""
    scanner = MessageScanner(limits or WireLimits())
    if not step:
        return scanner.scan(data, len(data))
    size = 0
    while True:
        size = min(len(data), size + step)
        result = scanner.scan(data, size)
        if result is not None or size == len(data):
            return result
        assert scanner.need > size


def test_valid_calls_are_accepted_whole_and_byte_by_byte(wire: Any) -> None:
    echo = wire.echo_thrift
    item = echo.Item(id=5, name="n", tags=["a", "bb", ""], counts={"x": 1, "y": -2})
    messages = [
        wire.encode_call("echo", echo.Echo.echo_args(text="hello")),
        wire.encode_call("add", echo.Echo.add_args(a=1, b=-2)),
        wire.encode_call("item", echo.Echo.item_args(item=item)),
        wire.encode_call("boom"),
        call(field(DOUBLE) + b"\0" * 8 + field(BOOL, 3) + b"\1" + field(BYTE, 4) + b"\7" + b"\0"),
        call(field(SET) + list_header(I16, 3) + b"\0\1" * 3 + b"\0"),
        call(field(MAP) + map_header(STRING, LIST, 1) + string(b"k") + list_header(I64, 0) + b"\0"),
        call(field(LIST) + list_header(STRUCT, 2) + b"\0" + field(I32, 1) + b"\0\0\0\1\0" + b"\0"),
        call(nested_lists(64) + b"\0"),
    ]
    for message in messages:
        assert scan_all(message) == len(message)
        assert scan_all(message, step=1) == len(message)
        assert scan_all(message, step=7) == len(message)
        # A message followed by the next one: only the first is taken.
        assert scan_all(message + message) == len(message)


def test_incomplete_call_asks_for_more(wire: Any) -> None:
    message = wire.encode_call("echo", wire.echo_thrift.Echo.echo_args(text="x" * 100))
    scanner = MessageScanner(WireLimits())
    assert scanner.scan(message, 30) is None
    assert scanner.need == len(message) - 1  # the string, before the STOP byte
    assert scanner.scan(message, len(message)) == len(message)


HOSTILE = {
    # The 17-byte stall and its variants.
    "list_of_stop_2^31-1": call(field(LIST) + list_header(STOP, I32_MAX)),
    "list_of_i32_2^31-1": call(field(LIST) + list_header(I32, I32_MAX)),
    "set_of_string_2^31-1": call(field(SET) + list_header(STRING, I32_MAX)),
    "map_2^31-1": call(field(MAP) + map_header(I32, I32, I32_MAX)),
    "map_unknown_key_type": call(field(MAP) + map_header(1, I32, 5)),
    "map_unknown_value_type": call(field(MAP) + map_header(I32, 99, 5)),
    "list_unknown_element_type": call(field(LIST) + list_header(99, 5)),
    "list_element_type_stop_empty": call(field(LIST) + list_header(STOP, 0)),
    "unknown_field_type": call(field(7)),
    "container_over_limit": call(field(LIST) + list_header(BYTE, 10_001)),
    "string_2^31-1": call(field(STRING) + struct.pack("!i", I32_MAX)),
    "string_over_limit": call(field(STRING) + struct.pack("!i", 1024 * 1024 + 1)),
    "negative_string_length": call(field(STRING, 1) + struct.pack("!i", -1)),
    "negative_list_size": call(field(LIST) + list_header(I32, -5)),
    "negative_map_size": call(field(MAP) + map_header(I32, I32, -(2**31))),
    "nesting_65": call(nested_lists(65)),
    "nested_structs_65": call((field(STRUCT)) * 64),
    "method_name_2^31-1": struct.pack("!ii", -2147418112 | 1, I32_MAX),
    "negative_method_name_length": struct.pack("!ii", -2147418112 | 1, -1),
    "not_strict_header": struct.pack("!i", 4) + b"echo" + b"\1" + b"\0" * 4,
    "reply_message_type": struct.pack("!ii", -2147418112 | 2, 0) + b"\0" * 4,
    "bad_version": struct.pack("!ii", -2147352576 | 1, 0) + b"\0" * 4,
    "list_longer_than_message_limit": call(field(LIST) + list_header(I64, 9_999)),
    "values_over_limit": call(
        b"".join(
            field(LIST, 10 + i) + list_header(BYTE, 10_000) + b"\1" * 10_000 for i in range(11)
        )
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_scanner_refuses_before_waiting_for_data(name: str) -> None:
    limits = WireLimits(max_message_bytes=64 * 1024)
    with pytest.raises(WireError) as info:
        scan_all(HOSTILE[name], limits)
    assert info.value.reason
    # Refused from the bytes shown, never by waiting for the declared payload.


def test_message_over_the_limit_is_refused_at_the_header_of_what_overflows() -> None:
    limits = WireLimits(max_message_bytes=1000, max_string_bytes=800)
    body = field(STRING, 1) + string(b"a" * 500) + field(STRING, 2) + struct.pack("!i", 600)
    with pytest.raises(WireError, match="longer than 1000"):
        scan_all(call(body), limits)


def test_depth_limit_matches_thriftpy2_budget() -> None:
    assert scan_all(call(nested_lists(64) + b"\0")) is not None
    with pytest.raises(WireError, match="nesting"):
        scan_all(call(nested_lists(65) + b"\0"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_message_bytes": 0},
        {"max_string_bytes": -1},
        {"max_container_items": 0},
        {"max_depth": 0},
        {"max_message_bytes": 2**31},
    ],
)
def test_limits_must_be_positive(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        WireLimits(**kwargs)


# -- against a live server ---------------------------------------------------


class Bystander:
    """A normal client calling in a loop on its own connection, timing every call."""

    def __init__(self, wire: Any, server: Any) -> None:
        self.client = wire.client_of(server)
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._warm = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert self.client.add(1, 2) == 3
                self.latencies.append(time.perf_counter() - started)
                if len(self.latencies) >= 20:
                    self._warm.set()
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)
            self._warm.set()

    def __enter__(self) -> Bystander:
        self._thread.start()
        assert self._warm.wait(5)
        self.latencies.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        # A few more calls after the attack was dealt with.
        end = len(self.latencies) + 20
        deadline = time.monotonic() + 5
        while len(self.latencies) < end and time.monotonic() < deadline and not self.errors:
            time.sleep(0.001)
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def attack(wire: Any, server: Any, payload: bytes) -> tuple[float, bytes]:
    """Send ``payload``; seconds until the server closed, and what it answered."""
    sock = wire.raw_connect(server)
    try:
        started = time.perf_counter()
        sock.sendall(payload)
        answer = wire.read_until_closed(sock)
        return time.perf_counter() - started, answer
    finally:
        sock.close()


def check_answer(wire: Any, answer: bytes, framed: bool) -> None:
    """Either nothing (closed) or one TApplicationException(PROTOCOL_ERROR)."""
    if not answer:
        return
    if framed:
        (length,) = struct.unpack_from("!i", answer)
        assert length == len(answer) - 4
        answer = answer[4:]
    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.transport import TCyMemoryBuffer

    proto = TCyBinaryProtocolFactory().get_protocol(TCyMemoryBuffer(answer))
    _name, mtype, _seqid = proto.read_message_begin()
    assert mtype == 3  # EXCEPTION
    exc = TApplicationException()
    exc.read(proto)
    assert exc.type == TApplicationException.PROTOCOL_ERROR
    assert exc.message.startswith("message refused: ")


LIVE = [
    "values_over_limit",
    "list_of_stop_2^31-1",
    "list_of_i32_2^31-1",
    "set_of_string_2^31-1",
    "map_2^31-1",
    "map_unknown_key_type",
    "list_unknown_element_type",
    "string_2^31-1",
    "negative_string_length",
    "negative_list_size",
    "nesting_65",
    "method_name_2^31-1",
]


@pytest.mark.parametrize("framed", [False, True], ids=["buffered", "framed"])
@pytest.mark.parametrize("name", LIVE)
def test_hostile_call_is_refused_fast_while_others_are_served(
    wire: Any, make_server: Any, name: str, framed: bool
) -> None:
    server = make_server(framed=framed)
    payload = HOSTILE[name]
    if framed:
        payload = wire.frame(payload)
    with Bystander(wire, server) as bystander:
        elapsed, answer = attack(wire, server, payload)
    assert not bystander.errors, bystander.errors
    check_answer(wire, answer, framed)
    worst = max(bystander.latencies)
    median = statistics.median(bystander.latencies)
    print(
        f"\n{name} ({'framed' if framed else 'buffered'}): refused in {elapsed * 1000:.2f} ms; "
        f"other connection: {len(bystander.latencies)} calls, median "
        f"{median * 1000:.3f} ms, max {worst * 1000:.3f} ms"
    )
    assert elapsed < 1.0
    assert worst < BYSTANDER_BOUND_S
    # The server still answers on a fresh connection.
    client = wire.client_of(server)
    try:
        assert client.echo("still here") == "still here"
    finally:
        client.close()


@pytest.mark.parametrize(
    "frame_length",
    [4 * 1024 * 1024 + 1, I32_MAX, -1, -(2**31), 0],
    ids=["limit+1", "2^31-1", "-1", "-2^31", "0"],
)
def test_framed_length_outside_limits_is_refused(
    wire: Any, make_server: Any, frame_length: int
) -> None:
    server = make_server(framed=True)
    with Bystander(wire, server) as bystander:
        elapsed, answer = attack(wire, server, struct.pack("!i", frame_length) + b"\x80\x01")
    assert not bystander.errors
    assert answer == b""  # no header read yet: closed without an answer
    print(
        f"\nframe length {frame_length}: closed in {elapsed * 1000:.2f} ms; other connection "
        f"max {max(bystander.latencies) * 1000:.3f} ms"
    )
    assert elapsed < 1.0
    assert max(bystander.latencies) < BYSTANDER_BOUND_S


def test_frame_must_hold_exactly_one_message(wire: Any, make_server: Any) -> None:
    server = make_server(framed=True)
    message = wire.encode_call("echo", wire.echo_thrift.Echo.echo_args(text="x"))
    _, answer = attack(wire, server, wire.frame(message + b"\0\0"))
    check_answer(wire, answer, framed=True)
    assert answer


def test_buffered_message_over_the_limit_is_refused(wire: Any, make_server: Any) -> None:
    server = make_server(max_message_bytes=64 * 1024, max_string_bytes=32 * 1024)
    chunk = b"a" * 30_000
    body = b"".join(field(STRING, 10 + i) + string(chunk) for i in range(3)) + b"\0"
    elapsed, answer = attack(wire, server, call(body))
    check_answer(wire, answer, framed=False)
    assert answer and elapsed < 1.0


def test_string_that_is_not_utf8_is_refused_and_connection_kept(wire: Any, server: Any) -> None:
    sock = wire.raw_connect(server)
    try:
        good = wire.encode_call("echo", wire.echo_thrift.Echo.echo_args(text="ok"))
        bad = call(field(STRING, 1) + string(b"\xff\xfe") + b"\0")
        sock.sendall(bad + good)
        data = b""
        while data.count(b"echo") < 2:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        assert b"message refused: undecodable arguments" in data
        assert data.endswith(b"\x0b\x00\x00\x00\x00\x00\x02ok\x00")
    finally:
        sock.close()


def test_limits_at_their_maximum_are_served(wire: Any, make_server: Any) -> None:
    server = make_server(max_string_bytes=200_000)
    client = wire.client_of(server)
    try:
        text = "z" * 200_000
        assert client.echo(text) == text
        item = wire.echo_thrift.Item(id=1, name="n", tags=["t"] * 10_000, counts={})
        assert client.item(item).tags == item.tags
    finally:
        client.close()


def test_pipelined_calls_are_answered_in_order(wire: Any, server: Any) -> None:
    sock = wire.raw_connect(server)
    try:
        messages = b"".join(
            wire.encode_call("echo", wire.echo_thrift.Echo.echo_args(text=f"m{i}"), seqid=i)
            for i in range(20)
        )
        sock.sendall(messages)
        data = b""
        while data.count(b"echo") < 20:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        positions = [data.index(f"m{i}\x00".encode()) for i in range(20)]
        assert positions == sorted(positions)
    finally:
        sock.close()


@pytest.mark.parametrize("framed", [False, True], ids=["buffered", "framed"])
def test_reader_memory_follows_bytes_received_not_sizes_declared(framed: bool) -> None:
    import socket

    from auth_rpc.serving.wire import MessageReader, MessageTimeout

    # Within the limits, but the bytes never come: no buffer of the declared size.
    declared = call(field(STRING, 1) + struct.pack("!i", 1024 * 1024))
    if framed:
        declared = struct.pack("!i", 4 * 1024 * 1024) + declared
    ours, theirs = socket.socketpair()
    try:
        reader = MessageReader(ours, WireLimits(), framed=framed, message_timeout_s=0.2)
        theirs.sendall(declared + b"x" * 1000)
        with pytest.raises(MessageTimeout):
            reader.read_message()
        assert len(reader._buf) <= 32 * 1024
        reader.close()
    finally:
        ours.close()
        theirs.close()


def test_value_budget_counts_fields_and_elements_once_across_resumptions() -> None:
    limits = WireLimits(max_values=5)
    ok = call(
        field(I32, 1) + b"\0\0\0\1" + field(LIST, 2) + list_header(I16, 3) + b"\0" * 6 + b"\0"
    )
    assert scan_all(ok, limits) == len(ok)  # 2 fields + 3 elements
    assert scan_all(ok, limits, step=1) == len(ok)
    over = call(
        field(I32, 1) + b"\0\0\0\1" + field(LIST, 2) + list_header(I16, 4) + b"\0" * 8 + b"\0"
    )
    with pytest.raises(WireError, match="more than 5"):
        scan_all(over, limits)


def test_large_valid_message_of_small_values_is_served_in_linear_time(
    wire: Any, server: Any
) -> None:
    # Regression: growing the receive buffer by a few bytes per recv was quadratic
    # (99,000 small fields took 9 s).
    fields = b"".join(field(I32, 100 + i % 30_000) + b"\0\0\0\1" for i in range(90_000))
    payload = call(fields + field(STRING, 1) + string(b"done") + b"\0")
    with Bystander(wire, server) as bystander:
        sock = wire.raw_connect(server)
        try:
            started = time.perf_counter()
            sock.sendall(payload)
            answer = b""
            while not answer.endswith(b"done\0"):
                chunk = sock.recv(65536)
                assert chunk
                answer += chunk
            elapsed = time.perf_counter() - started
        finally:
            sock.close()
    worst = max(bystander.latencies)
    print(
        f"\n90,000 fields ({len(payload)} B) served in {elapsed * 1000:.1f} ms; "
        f"other connection max {worst * 1000:.1f} ms"
    )
    assert elapsed < 2.0
    assert worst < BYSTANDER_BOUND_S
