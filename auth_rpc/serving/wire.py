"""Wire limits: read one Thrift binary-protocol call, validated, before decoding it.

thriftpy2 trusts every length and element type it reads: a 17-byte call with an
unknown field declaring a ``list`` of 2^31-1 ``STOP`` elements makes its
``skip()`` loop for seconds holding the GIL, and a declared string length of
2^31-1 makes it try to allocate 2 GiB. So the server never lets thriftpy2 parse
unvalidated bytes: :class:`MessageReader` reads one whole message from the
socket while :class:`MessageScanner` checks its structure incrementally
(message header, field headers, element types, lengths, nesting) against
:class:`WireLimits`, refusing it *before* anything is allocated or looped over.
Only a complete, valid message is handed to thriftpy2's Cython codec, through a
memory transport.

The scanner walks the message once, resuming where it stopped when more bytes
arrive, so a client dripping bytes costs no rescanning; lists, sets and maps of
fixed-size elements are stepped over in one move.

Memory: each reader starts with a 16 KiB receive buffer that grows (twofold) with
the bytes actually received, and shrinks back to 16 KiB as soon as the message
that made it grow has been handled. What readers hold beyond their 16 KiB is
drawn from a :class:`BufferBudget` shared by the connections of a listener: a
message that would take more than is left is refused with
:class:`BufferBudgetExceeded`.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

__all__ = [
    "MAX_METHOD_NAME_BYTES",
    "BufferBudget",
    "BufferBudgetExceeded",
    "Message",
    "MessageReader",
    "MessageScanner",
    "MessageTimeout",
    "WireError",
    "WireLimits",
    "peek_call_header",
    "set_kernel_timeout",
]

#: Longest method name accepted in a message header.
MAX_METHOD_NAME_BYTES = 1024

_VERSION_MASK = -65536  # 0xFFFF0000 as a signed 32-bit value
_VERSION_1 = -2147418112  # 0x80010000 as a signed 32-bit value
_CALL = 1
_ONEWAY = 4

# Thrift type ids (binary protocol).
_STOP = 0
_BOOL = 2
_BYTE = 3
_DOUBLE = 4
_I16 = 6
_I32 = 8
_I64 = 10
_STRING = 11
_STRUCT = 12
_MAP = 13
_SET = 14
_LIST = 15

#: Bytes a value of each type takes (fixed-size types), or at least takes.
_FIXED_SIZE = {_BOOL: 1, _BYTE: 1, _DOUBLE: 8, _I16: 2, _I32: 4, _I64: 8}
_MIN_SIZE = {**_FIXED_SIZE, _STRING: 4, _STRUCT: 1, _MAP: 6, _SET: 5, _LIST: 5}
_VALID_TYPES = frozenset(_MIN_SIZE)

_I32_AT = struct.Struct("!i").unpack_from
_I32_I32_AT = struct.Struct("!ii").unpack_from
_BYTE_I32_AT = struct.Struct("!bi").unpack_from
_BYTE_BYTE_I32_AT = struct.Struct("!bbi").unpack_from

# Frame kinds on the scanner's stack.
_K_STRUCT = 0
_K_SEQ = 1  # list or set: [kind, element type, elements left]
_K_MAP = 2  # [kind, key type, value type, keys and values left (2 per entry)]


@dataclass(frozen=True)
class WireLimits:
    """What one incoming message may declare. Sizes in bytes.

    ``max_depth`` counts the arguments struct itself, as thriftpy2's
    ``max_depth`` does: 64 allows the arguments struct and 63 levels inside it.
    ``max_values`` bounds the fields and container elements of one message
    taken together, and so the work of validating and decoding it: thriftpy2
    steps over 4 million one-byte list elements (a 4 MiB message) in about
    0.1 s holding the GIL.
    """

    max_message_bytes: int = 4 * 1024 * 1024
    max_string_bytes: int = 1024 * 1024
    max_container_items: int = 10_000
    max_depth: int = 64
    max_values: int = 100_000

    def __post_init__(self) -> None:
        for name in (
            "max_message_bytes",
            "max_string_bytes",
            "max_container_items",
            "max_depth",
            "max_values",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_message_bytes > 0x7FFFFFFF:
            raise ValueError("max_message_bytes must fit in a signed 32-bit length")


class WireError(Exception):
    """A message was refused: it breaks the protocol or a configured limit.

    ``method`` and ``seqid`` are set when the message header was read, so that
    the refusal can be answered with a ``TApplicationException``.
    """

    def __init__(self, reason: str, *, method: str | None = None, seqid: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.method = method
        self.seqid = seqid


class BufferBudgetExceeded(WireError):
    """A message needs more buffer than the listener's :class:`BufferBudget` has left.

    The server is busy, not the message malformed: it was not read whole and
    not run, and may be sent again later.
    """


class MessageTimeout(TimeoutError):
    """A message did not arrive completely within its read deadline."""


class BufferBudget:
    """Bytes that receive buffers may hold beyond their base size, shared by readers.

    Thread-safe. Readers reserve when their buffer grows past its base size and
    release when it shrinks back or the reader is closed, so the sum of every
    buffer's growth never exceeds ``limit_bytes``. Only growth takes the lock:
    messages that fit the base buffer never touch the budget.
    """

    __slots__ = ("_lock", "_used", "limit_bytes")

    def __init__(self, limit_bytes: int) -> None:
        if not isinstance(limit_bytes, int) or limit_bytes < 1:
            raise ValueError(f"limit_bytes must be a positive integer, got {limit_bytes!r}")
        self.limit_bytes = limit_bytes
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        """Bytes reserved now."""
        return self._used

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes``; ``False`` (nothing taken) when that would exceed the limit."""
        with self._lock:
            if self._used + nbytes > self.limit_bytes:
                return False
            self._used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken by :meth:`reserve`."""
        with self._lock:
            self._used -= nbytes


class MessageScanner:
    """Validates one binary-protocol CALL or ONEWAY message, incrementally.

    Call :meth:`scan` with the buffer holding the message from offset 0 and
    the number of valid bytes in it; it returns the message length once the
    message is complete, or ``None`` with :attr:`need` set to the number of
    bytes it must see before it can go on. Raises :class:`WireError` as soon
    as the bytes seen break the protocol or a limit.
    """

    __slots__ = (
        "_budget",
        "_limit",
        "_limits",
        "_pending",
        "_stack",
        "method",
        "need",
        "pos",
        "seqid",
    )

    def __init__(self, limits: WireLimits, *, limit: int | None = None) -> None:
        self._limits = limits
        self.reset(limit)

    def reset(self, limit: int | None = None) -> None:
        """Forget the message scanned so far, to scan the next one.

        ``limit`` is the most bytes the message may take (a frame's length in
        framed mode); by default the message limit.
        """
        self._limit = self._limits.max_message_bytes if limit is None else limit
        self._stack: list[list[int]] | None = None  # None until the header is read
        self._pending = -1  # type of the value due next, or -1
        self._budget = self._limits.max_values  # fields and elements still allowed
        self.pos = 0
        self.need = 0
        self.method: str | None = None
        self.seqid: int | None = None

    def _refuse(self, reason: str) -> WireError:
        return WireError(reason, method=self.method, seqid=self.seqid)

    def _too_long(self, end: int) -> WireError:
        return self._refuse(f"message longer than {self._limit} bytes (needs at least {end})")

    def scan(self, buf: bytes | bytearray | memoryview, size: int) -> int | None:
        """Go on scanning ``buf[:size]``; the message length when complete, else ``None``.

        Raises :class:`WireError` when the message is refused.
        """
        if self._stack is None and not self._scan_header(buf, size):
            return None
        stack = self._stack
        assert stack is not None
        limits = self._limits
        limit = self._limit
        max_string = limits.max_string_bytes
        max_items = limits.max_container_items
        max_depth = limits.max_depth
        fixed = _FIXED_SIZE
        min_size = _MIN_SIZE
        valid = _VALID_TYPES
        pos = self.pos
        pending = self._pending
        budget = self._budget
        try:
            while True:
                if pending < 0:
                    if not stack:
                        return pos
                    top = stack[-1]
                    kind = top[0]
                    if kind == _K_STRUCT:
                        if pos >= size:
                            self.need = pos + 1
                            return None
                        ftype = buf[pos]
                        if ftype == _STOP:
                            pos += 1
                            stack.pop()
                            continue
                        if budget <= 0:
                            raise self._too_many()
                        # Fast path, the common case: a scalar or string field is
                        # taken with its header in one step (or not at all).
                        step = fixed.get(ftype)
                        if step is not None:
                            end = pos + 3 + step
                            if end > size:
                                if end > limit:
                                    raise self._too_long(end)
                                self.need = end
                                return None
                            pos = end
                            budget -= 1
                            continue
                        if ftype == _STRING and pos + 7 <= size:
                            (length,) = _I32_AT(buf, pos + 3)
                            if 0 <= length <= max_string:
                                end = pos + 7 + length
                                if end <= size:
                                    pos = end
                                    budget -= 1
                                    continue
                        if ftype not in valid:
                            raise self._refuse(f"invalid field type {ftype}")
                        if pos + 3 > size:
                            if pos + 3 > limit:
                                raise self._too_long(pos + 3)
                            self.need = pos + 3
                            return None
                        pos += 3
                        budget -= 1
                        pending = ftype
                    elif kind == _K_SEQ:
                        left = top[2]
                        if left == 0:
                            stack.pop()
                            continue
                        etype = top[1]
                        step = fixed.get(etype)
                        if step is not None:
                            end = pos + step * left
                            if end > size:
                                if end > limit:
                                    raise self._too_long(end)
                                self.need = end
                                return None
                            pos = end
                            top[2] = 0
                            continue
                        top[2] = left - 1
                        pending = etype
                    else:
                        left = top[3]
                        if left == 0:
                            stack.pop()
                            continue
                        ktype = top[1]
                        vtype = top[2]
                        kstep = fixed.get(ktype)
                        vstep = fixed.get(vtype)
                        if kstep is not None and vstep is not None and left % 2 == 0:
                            end = pos + (kstep + vstep) * (left // 2)
                            if end > size:
                                if end > limit:
                                    raise self._too_long(end)
                                self.need = end
                                return None
                            pos = end
                            top[3] = 0
                            continue
                        top[3] = left - 1
                        pending = ktype if left % 2 == 0 else vtype
                    # The stack frame's count was taken; fall through to the value.

                # One value of type ``pending`` at ``pos``.
                step = fixed.get(pending)
                if step is not None:
                    end = pos + step
                    if end > size:
                        if end > limit:
                            raise self._too_long(end)
                        self.need = end
                        return None
                    pos = end
                elif pending == _STRING:
                    if pos + 4 > size:
                        if pos + 4 > limit:
                            raise self._too_long(pos + 4)
                        self.need = pos + 4
                        return None
                    (length,) = _I32_AT(buf, pos)
                    if length < 0:
                        raise self._refuse(f"negative string length {length}")
                    if length > max_string:
                        raise self._refuse(
                            f"string of {length} bytes exceeds the limit of {max_string}"
                        )
                    end = pos + 4 + length
                    if end > size:
                        if end > limit:
                            raise self._too_long(end)
                        self.need = end
                        return None
                    pos = end
                elif pending == _STRUCT:
                    if len(stack) >= max_depth:
                        raise self._refuse(f"nesting deeper than {max_depth}")
                    stack.append([_K_STRUCT])
                elif pending in (_LIST, _SET):
                    if len(stack) >= max_depth:
                        raise self._refuse(f"nesting deeper than {max_depth}")
                    if pos + 5 > size:
                        if pos + 5 > limit:
                            raise self._too_long(pos + 5)
                        self.need = pos + 5
                        return None
                    etype, count = _BYTE_I32_AT(buf, pos)
                    if etype not in valid:
                        raise self._refuse(f"invalid element type {etype}")
                    self._check_count(count, max_items, min_size[etype], pos + 5)
                    budget -= count
                    if budget < 0:
                        raise self._too_many()
                    pos += 5
                    stack.append([_K_SEQ, etype, count])
                else:  # _MAP: the only other type in ``valid``
                    if len(stack) >= max_depth:
                        raise self._refuse(f"nesting deeper than {max_depth}")
                    if pos + 6 > size:
                        if pos + 6 > limit:
                            raise self._too_long(pos + 6)
                        self.need = pos + 6
                        return None
                    ktype, vtype, count = _BYTE_BYTE_I32_AT(buf, pos)
                    if ktype not in valid or vtype not in valid:
                        raise self._refuse(f"invalid map key or value type {ktype}, {vtype}")
                    self._check_count(count, max_items, min_size[ktype] + min_size[vtype], pos + 6)
                    budget -= 2 * count
                    if budget < 0:
                        raise self._too_many()
                    pos += 6
                    stack.append([_K_MAP, ktype, vtype, 2 * count])
                pending = -1
        finally:
            self.pos = pos
            self._pending = pending
            self._budget = budget

    def _too_many(self) -> WireError:
        limit = self._limits.max_values
        return self._refuse(f"more than {limit} fields and elements in one message")

    def _check_count(self, count: int, max_items: int, min_size: int, after: int) -> None:
        if count < 0:
            raise self._refuse(f"negative container size {count}")
        if count > max_items:
            raise self._refuse(f"container of {count} elements exceeds the limit of {max_items}")
        if after + count * min_size > self._limit:
            raise self._too_long(after + count * min_size)

    def _scan_header(self, buf: bytes | bytearray | memoryview, size: int) -> bool:
        """Read the message header; ``False`` when more bytes are needed."""
        if size < 8:
            self.need = 8
            return False
        version, name_len = _I32_I32_AT(buf, 0)
        if (version & _VERSION_MASK) != _VERSION_1:
            raise WireError("not a strict binary-protocol message header")
        mtype = version & 0xFF
        if mtype != _CALL and mtype != _ONEWAY:
            raise WireError(f"message type {mtype} is not a call")
        if name_len < 0 or name_len > MAX_METHOD_NAME_BYTES:
            raise WireError(f"method name length {name_len} out of range")
        end = 8 + name_len + 4
        if end > self._limit:
            raise self._too_long(end)
        if size < end:
            self.need = end
            return False
        try:
            self.method = str(buf[8 : 8 + name_len], "utf-8")
        except UnicodeDecodeError:
            raise WireError("method name is not UTF-8") from None
        (self.seqid,) = _I32_AT(buf, 8 + name_len)
        self.pos = end
        self._stack = [[_K_STRUCT]]
        return True


def peek_call_header(data: bytes | bytearray | memoryview) -> tuple[str | None, int | None]:
    """The method name and seqid at the start of ``data``, a strict call header.

    ``(None, None)`` when ``data`` does not begin with a whole, valid one.
    """
    if len(data) < 8:
        return None, None
    version, name_len = _I32_I32_AT(data, 0)
    mtype = version & 0xFF
    if (version & _VERSION_MASK) != _VERSION_1 or mtype not in (_CALL, _ONEWAY):
        return None, None
    if not 0 <= name_len <= MAX_METHOD_NAME_BYTES or len(data) < 12 + name_len:
        return None, None
    try:
        method = str(data[8 : 8 + name_len], "utf-8")
    except UnicodeDecodeError:
        return None, None
    (seqid,) = _I32_AT(data, 8 + name_len)
    return method, seqid


class Message:
    """One complete, validated call: the bytes for thriftpy2 and its header.

    ``payload`` is a view of the reader's buffer, valid until the next
    :meth:`MessageReader.read_message`; release it when done.
    """

    __slots__ = ("method", "payload", "seqid")

    def __init__(self, payload: memoryview, method: str, seqid: int) -> None:
        self.payload = payload
        self.method = method
        self.seqid = seqid


_INITIAL_BUFFER = 16 * 1024
_TIMEOUT_SLACK_S = 0.25
#: How long a buffer grown for a message is kept for the next one before it shrinks.
_SHRINK_AFTER_S = 0.05
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds


def _kernel_timeouts_possible(sock: socket.socket) -> bool:
    """Whether ``sock``'s timeouts can be the kernel's (``SO_RCVTIMEO``/``SO_SNDTIMEO``).

    Only a plain stream socket (not TLS) on a platform with both options.
    """
    return (
        type(sock) is socket.socket
        and hasattr(socket, "SO_RCVTIMEO")
        and hasattr(socket, "SO_SNDTIMEO")
        and sock.type == socket.SOCK_STREAM
    )


def set_kernel_timeout(sock: socket.socket, timeout_s: float) -> None:
    """Bound each blocking ``recv`` and ``send`` on ``sock`` by ``timeout_s`` in the kernel.

    The socket stays in blocking mode (Python timeout ``None``): a receive or
    send then costs one system call, where a Python timeout polls before
    each. A call that times out fails with ``BlockingIOError`` (``EAGAIN``)
    instead of ``TimeoutError``; a send may have sent part of its bytes.
    Raises ``OSError`` when the options cannot be set.
    """
    seconds = int(timeout_s)
    micros = min(999_999, int((timeout_s - seconds) * 1_000_000))
    if seconds <= 0 and micros <= 0:
        micros = 1  # 0 would mean "no timeout"
    value = _TIMEVAL.pack(max(0, seconds), micros)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)



class MessageReader:
    """Reads validated messages from one connected socket (plain or TLS).

    ``framed`` reads the 4-byte frame length first and checks it against the
    message limit before reading further. Between messages the reader waits at
    most ``idle_timeout_s`` for the first byte (see :meth:`set_idle_timeout`);
    once a message has begun it must be complete within ``message_timeout_s``
    however slowly its bytes arrive.

    On a plain (not TLS) socket the timeouts are the kernel's
    (:func:`set_kernel_timeout`): the socket is put in blocking mode, and a
    reply sent on it is bounded by the timeout in force (``sendall`` then
    fails with ``BlockingIOError``). Set ``kernel_timeouts=False`` to keep
    Python's socket timeouts.

    The receive buffer starts at 16 KiB and grows with the bytes received; its
    growth is reserved from ``budget`` (when given) and given back when the
    buffer shrinks to 16 KiB again: in the next :meth:`read_message` (the
    previous message has been handled by then) once no message has come for
    50 ms, or at :meth:`close`.
    """

    def __init__(
        self,
        sock: socket.socket,
        limits: WireLimits,
        *,
        framed: bool = False,
        idle_timeout_s: float = 300.0,
        message_timeout_s: float = 10.0,
        budget: BufferBudget | None = None,
        kernel_timeouts: bool = True,
    ) -> None:
        self._sock = sock
        self._kernel_timeouts = False
        if kernel_timeouts and _kernel_timeouts_possible(sock):
            try:
                sock.settimeout(None)
                set_kernel_timeout(sock, idle_timeout_s)
            except OSError:
                sock.settimeout(idle_timeout_s)
            else:
                self._kernel_timeouts = True
        self._limits = limits
        self._framed = framed
        self._idle_timeout_s = idle_timeout_s
        self._message_timeout_s = message_timeout_s
        self._scanner = MessageScanner(limits)
        self._buf = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte of the next message
        self._end = 0  # end of the bytes received
        self._timeout: float | None = idle_timeout_s if self._kernel_timeouts else None
        self._deadline = 0.0
        self._budget = budget
        self._reserved = 0  # bytes of ``budget`` this reader holds
        self._grown = False  # the buffer is bigger than _INITIAL_BUFFER

    def set_timeout(self, timeout_s: float) -> None:
        """Set the socket's timeout, for receiving and sending (skipped when already set)."""
        if timeout_s != self._timeout:
            if self._kernel_timeouts:
                set_kernel_timeout(self._sock, timeout_s)
            else:
                self._sock.settimeout(timeout_s)
            self._timeout = timeout_s

    @property
    def timeout(self) -> float | None:
        """The socket's timeout in force (``None`` before one is set)."""
        return self._timeout

    @property
    def kernel_timeouts(self) -> bool:
        """Whether the socket's timeouts are the kernel's (see :func:`set_kernel_timeout`)."""
        return self._kernel_timeouts

    def _recv_into(self, view: memoryview) -> int:
        """``recv_into`` whose timeout raises ``TimeoutError`` with either kind of timeout."""
        try:
            received: int = self._sock.recv_into(view)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError("timed out") from None
        return received

    def set_idle_timeout(self, timeout_s: float) -> None:
        """How long to wait for the first byte of each following message."""
        self._idle_timeout_s = timeout_s

    @property
    def capacity(self) -> int:
        """The receive buffer's size in bytes."""
        return len(self._buf)

    def close(self) -> None:
        """Release the buffer and its budget (the socket belongs to the caller)."""
        self._view.release()
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._grown = False
        if self._reserved:
            assert self._budget is not None
            self._budget.release(self._reserved)
            self._reserved = 0

    def read_message(self) -> Message | None:
        """The next message, or ``None`` when the peer closed between messages.

        Raises :class:`WireError` when the message is refused
        (:class:`BufferBudgetExceeded` when the server lacks the memory for it),
        :class:`MessageTimeout` when it is not complete by its deadline,
        ``TimeoutError`` when the connection stays idle past the idle timeout,
        ``ConnectionError`` when the peer closes in the middle of a message,
        and ``OSError`` on socket errors.
        """
        if self._start:
            self._compact()
        if self._end == 0:
            if self._grown:
                received = self._wait_shrinking()
            else:
                if self._timeout != self._idle_timeout_s:
                    self.set_timeout(self._idle_timeout_s)
                received = self._recv_into(self._view)
            if received == 0:
                return None
            self._end = received
        # The message has begun: it must be complete by its deadline.
        self._deadline = time.monotonic() + self._message_timeout_s
        if self._framed:
            return self._read_framed()
        scanner = self._scanner
        scanner.reset()
        while True:
            length = scanner.scan(self._buf, self._end)
            if length is not None:
                return self._take(0, length, scanner)
            self._fill(scanner.need)

    def _read_framed(self) -> Message:
        self._fill(4)
        (frame_len,) = _I32_AT(self._buf, 0)
        if frame_len <= 0 or frame_len > self._limits.max_message_bytes:
            raise WireError(f"frame length {frame_len} outside 1..{self._limits.max_message_bytes}")
        self._fill(4 + frame_len)
        scanner = self._scanner
        scanner.reset(frame_len)
        frame = self._view[4 : 4 + frame_len]
        try:
            length = scanner.scan(frame, frame_len)
        finally:
            frame.release()
        if length is None or length != frame_len:
            raise WireError(
                "message does not fill its frame exactly",
                method=scanner.method,
                seqid=scanner.seqid,
            )
        return self._take(4, frame_len, scanner)

    def _take(self, offset: int, length: int, scanner: MessageScanner) -> Message:
        end = offset + length
        payload = self._view[offset:end]  # no copy: valid until the next read
        if end == self._end:
            self._end = 0  # everything received is consumed
        else:
            self._start = end
        method, seqid = scanner.method, scanner.seqid
        assert method is not None and seqid is not None
        return Message(payload, method, seqid)

    def _compact(self) -> None:
        """Move the bytes of the next message, which came with the last one, to the start.

        A grown buffer stays while messages follow back to back; it shrinks
        once the connection waits for one (:meth:`_wait_shrinking`).
        """
        start, end = self._start, self._end
        left = end - start
        if left:
            self._buf[0:left] = self._buf[start:end]
        self._start, self._end = 0, left

    def _wait_shrinking(self) -> int:
        """``recv_into`` for the next message with a grown buffer (the last one is handled).

        The grown buffer waits ``_SHRINK_AFTER_S`` (back-to-back large calls
        reuse it instead of growing a new one each time), then goes back to
        its base size, and its budget with it, for the rest of the idle wait.
        """
        delay = min(_SHRINK_AFTER_S, self._idle_timeout_s / 2)
        self.set_timeout(delay)
        try:
            return self._recv_into(self._view)
        except TimeoutError:
            pass
        self._resize(_INITIAL_BUFFER)
        self.set_timeout(self._idle_timeout_s - delay)
        return self._recv_into(self._view)

    def _resize(self, capacity: int) -> None:
        """Move the buffered bytes to a buffer of ``capacity`` bytes.

        The growth beyond the base size is taken from (or given back to) the
        budget; raises :class:`BufferBudgetExceeded` when the budget cannot
        cover it, the buffer unchanged.
        """
        budget = self._budget
        if budget is not None:
            change = max(0, capacity - _INITIAL_BUFFER) - self._reserved
            if change > 0:
                if not budget.reserve(change):
                    method, seqid = self._header()
                    raise BufferBudgetExceeded(
                        f"receive buffers full ({budget.limit_bytes} bytes in use)",
                        method=method,
                        seqid=seqid,
                    )
            elif change < 0:
                budget.release(-change)
            self._reserved += change
        new = bytearray(capacity)
        end = self._end
        if end:
            new[:end] = self._view[:end]  # one copy (a bytearray slice would make two)
        self._view.release()
        self._buf = new
        self._view = memoryview(new)
        self._grown = capacity > _INITIAL_BUFFER

    def _header(self) -> tuple[str | None, int | None]:
        """The method name and seqid of the message being received, when already known."""
        if self._framed:  # the frame is scanned once whole: read the header in it
            head = bytes(self._buf[4 : min(self._end, 16 + MAX_METHOD_NAME_BYTES)])
            return peek_call_header(head)
        return self._scanner.method, self._scanner.seqid

    def _fill(self, need: int) -> None:
        """Receive until ``need`` bytes of the message are buffered."""
        while self._end < need:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise MessageTimeout("message not complete before its read deadline")
            if self._timeout is None or self._timeout > remaining + _TIMEOUT_SLACK_S:
                # Each recv may wait only until the message's deadline (with a
                # little slack, to spare a system call per recv).
                self.set_timeout(remaining)
            try:
                received = self._recv()
            except TimeoutError:
                raise MessageTimeout("message not complete before its read deadline") from None
            if received == 0:
                raise ConnectionError("peer closed the connection in the middle of a message")

    def _recv(self) -> int:
        """One ``recv_into`` after the buffered bytes.

        A full buffer grows twofold: memory follows the bytes actually
        received, not the size a message declares (a client declaring a 4 MiB
        frame and sending nothing gets no 4 MiB buffer).
        """
        end = self._end
        capacity = len(self._buf)
        if end == capacity:
            self._resize(max(min(2 * capacity, self._limits.max_message_bytes + 4), end + 1))
        if end == 0:
            received = self._recv_into(self._view)
        else:
            view = self._view[end:]
            try:
                received = self._recv_into(view)
            finally:
                view.release()
        self._end = end + received
        return received
