"""Load generators: client processes making ``list_posts`` calls in a closed loop.

Each client is its own process (``multiprocessing`` with ``spawn``), pinned to
the clients' CPU, with ONE persistent connection: a thriftpy2 client (Cython
codec, ``TCP_NODELAY``) or a ``requests.Session`` for the HTTP peer. The pool
of client processes lives for the whole run; the orchestrator drives it with
two messages per measurement:

1. ``prepare``: connect, make one checked call (20 posts back, or the error is
   reported), and get the tokens ready -- one token reused (warm), or a pool
   of distinct tokens minted here before the window (cold; cached per pool
   across rounds, since every round starts a fresh server);
2. ``go``: at ``t0`` (``time.monotonic()``, one clock for every process)
   start calling; from ``t_measure`` record the latency of every call that
   completes before ``t_end``; at ``t_end`` stop, close the connection, and
   send back the latencies (ns).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import multiprocessing
import multiprocessing.connection
import os
import socket
import struct
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ClientPool", "PhaseResult", "Target", "TokenSpec"]


@dataclass(frozen=True)
class TokenSpec:
    """How a client gets its tokens.

    ``fixed`` set: that token on every call (warm). Otherwise a pool of
    ``count`` distinct tokens (distinct ``jti``), minted with ``key``/``alg``
    /``kid`` and the claims in ``claims``; ``tag`` names the pool (a pool is
    minted once per client process and reused in later rounds).
    """

    fixed: str | None = None
    alg: str = "HS256"
    key: Any = None  # bytes secret or PEM private key
    kid: str = ""
    claims: dict[str, Any] = field(default_factory=dict)
    count: int = 0
    tag: str = ""


@dataclass(frozen=True)
class Target:
    """What to call: ``kind`` is ``thrift`` (``host``/``port``) or ``http`` (``url``)."""

    kind: str
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""
    limit: int = 20


@dataclass
class PhaseResult:
    """What one client measured in one window."""

    latencies_ns: list[int]
    errors: int = 0
    first_error: str = ""
    pool_wrapped: bool = False


# -- the client process ----------------------------------------------------------


class _Connection(Protocol):
    def payload(self, token: str) -> Any: ...

    def call(self, payload: Any) -> None: ...

    def check(self, token: str) -> int: ...

    def close(self) -> None: ...


def _list_posts_request(token: str, limit: int) -> bytes:
    """``list_posts(token, limit, 0)`` as the binary protocol encodes it (strict, seqid 0)."""
    name = b"list_posts"
    raw = token.encode("utf-8")
    return b"".join((
        struct.pack("!iI", -2147418111, len(name)), name, b"\x00\x00\x00\x00",  # CALL, seqid 0
        b"\x0b\x00\x01", struct.pack("!I", len(raw)), raw,  # 1: string token
        b"\x08\x00\x02", struct.pack("!i", limit),  # 2: i32 limit
        b"\x0a\x00\x03", b"\x00" * 8,  # 3: i64 before_id = 0
        b"\x00",  # end of the arguments
    ))


class _ThriftConnection:
    """One persistent Thrift connection making lean ``list_posts`` calls.

    :meth:`call` sends a pre-encoded request and reads the reply with the
    Cython codec, checking that it is a success (result field 0) and skipping
    the posts without building Python objects: about half the client CPU of
    thriftpy2's ``TClient``, so that eight clients sharing one CPU can load
    the server harder. :meth:`check` decodes a reply in full (the first call
    of every connection) and returns the number of posts.
    """

    def __init__(self, target: Target) -> None:
        from thriftpy2.protocol import TCyBinaryProtocolFactory
        from thriftpy2.protocol.binary import TBinaryProtocol
        from thriftpy2.thrift import TApplicationException, TMessageType, TType
        from thriftpy2.transport import TCyBufferedTransportFactory, TMemoryBuffer, TSocket

        from auth_rpc.idl import posts_thrift

        self._posts = posts_thrift.Posts
        self._limit = target.limit
        self._app_error = TApplicationException
        self._exception_type = TMessageType.EXCEPTION
        self._struct = TType.STRUCT
        # The hand-made request must be byte for byte what thriftpy2 sends.
        buf = TMemoryBuffer()
        proto = TBinaryProtocol(buf)
        proto.write_message_begin("list_posts", TMessageType.CALL, 0)
        self._posts.list_posts_args(token="t", limit=target.limit, before_id=0).write(proto)
        proto.write_message_end()
        if buf.getvalue() != _list_posts_request("t", target.limit):
            raise RuntimeError("bench: the pre-encoded list_posts request is wrong")
        sock = socket.create_connection((target.host, target.port), timeout=5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(30.0)
        self._trans = TCyBufferedTransportFactory().get_transport(TSocket(sock=sock))
        self._proto = TCyBinaryProtocolFactory().get_protocol(self._trans)

    def payload(self, token: str) -> bytes:
        return _list_posts_request(token, self._limit)

    def _send(self, request: bytes) -> None:
        self._trans.write(request)
        self._trans.flush()
        _, mtype, _ = self._proto.read_message_begin()
        if mtype == self._exception_type:
            error = self._app_error()
            error.read(self._proto)
            raise error

    def call(self, payload: bytes) -> None:
        self._send(payload)
        trans = self._trans
        field = trans.read(3)  # type, id of the result's first field
        self._proto.skip(self._struct)
        trans.read(1)  # the result's end
        if field != b"\x0c\x00\x00":  # not 0: success, but a declared exception
            raise RuntimeError(f"declared exception (result field {field[1:]!r})")

    def check(self, token: str) -> int:
        self._send(self.payload(token))
        result = self._posts.list_posts_result()
        self._proto.read_struct(result)
        if result.success is None:
            raise RuntimeError(f"no result: {result!r}"[:300])
        return len(result.success.posts)

    def close(self) -> None:
        self._trans.close()


class _HttpConnection:
    """One persistent HTTP connection (``requests.Session``) for the peer."""

    def __init__(self, target: Target) -> None:
        import requests

        self._session = requests.Session()
        self._url = f"{target.url}?limit={target.limit}"

    def payload(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def call(self, payload: dict[str, str]) -> None:
        self.check_reply(self._session.get(self._url, headers=payload, timeout=30))

    @staticmethod
    def check_reply(reply: Any) -> int:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}")
        return len(reply.json()["posts"])

    def check(self, token: str) -> int:
        return self.check_reply(
            self._session.get(self._url, headers=self.payload(token), timeout=30)
        )

    def close(self) -> None:
        self._session.close()


def _connect(target: Target) -> _Connection:
    if target.kind == "thrift":
        return _ThriftConnection(target)
    if target.kind == "http":
        return _HttpConnection(target)
    raise ValueError(f"unknown target kind {target.kind!r}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mint_pool(spec: TokenSpec, worker: int) -> list[str]:
    """``spec.count`` distinct tokens (distinct ``jti``), as ``bench.data.mint`` makes them.

    HS256 and EdDSA are assembled here (JSON, base64url, one HMAC or Ed25519
    signature): about three times faster than ``jwt.encode``, which matters
    for pools of tens of thousands. Other algorithms go through PyJWT.
    """
    from bench.data import AUDIENCE, AUTHOR, ISSUER, SCOPE, mint

    now = int(time.time())
    key: Any = spec.key
    if spec.alg != "HS256" and isinstance(key, (str, bytes)):
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(key.encode() if isinstance(key, str) else key, None)
    if spec.alg not in ("HS256", "EdDSA"):
        return [
            mint(key, spec.alg, kid=spec.kid, jti=f"{spec.tag}-{worker}-{n}", now=now,
                 **spec.claims)
            for n in range(spec.count)
        ]
    header: dict[str, str] = {"alg": spec.alg, "typ": "at+jwt"}
    if spec.kid:
        header["kid"] = spec.kid
    head = _b64(json.dumps(header, separators=(",", ":")).encode())
    claims = {
        "iss": spec.claims.get("issuer", ISSUER), "sub": spec.claims.get("subject", AUTHOR),
        "aud": spec.claims.get("audience", AUDIENCE), "exp": now + 3600, "iat": now,
        "nbf": now, "jti": "", "scope": spec.claims.get("scope", SCOPE),
        "client_id": spec.claims.get("client_id", "bench"),
    }
    if spec.alg == "HS256":
        secret = key.encode() if isinstance(key, str) else key

        def sign(data: bytes) -> bytes:
            return hmac.new(secret, data, hashlib.sha256).digest()
    else:
        sign = key.sign
    tokens = []
    for n in range(spec.count):
        claims["jti"] = f"{spec.tag}-{worker}-{n}"
        signing_input = f"{head}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
        tokens.append(f"{signing_input}.{_b64(sign(signing_input.encode()))}")
    return tokens


def _run_phase(
    call: Callable[[Any], None],
    tokens: list[Any],
    t0: float,
    t_measure: float,
    t_end: float,
) -> PhaseResult:
    t_m = int(t_measure * 1e9)
    t_e = int(t_end * 1e9)
    lat = array("q")
    clock = time.monotonic_ns
    errors = 0
    first_error = ""
    wrapped = False
    n = len(tokens)
    i = 0
    delay = t0 - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    while True:
        start = clock()
        if start >= t_e:
            break
        token = tokens[i]
        i += 1
        if i == n:
            i = 0
            wrapped = n > 1
        try:
            call(token)
        except Exception as exc:
            errors += 1
            if not first_error:
                first_error = f"{type(exc).__name__}: {exc}"[:300]
            if errors > 1000:  # the server is gone or refuses everything
                break
            continue
        end = clock()
        if end >= t_m and end < t_e:
            lat.append(end - start)
    return PhaseResult(lat.tolist(), errors, first_error, wrapped)


def _worker_main(
    conn: multiprocessing.connection.Connection, index: int, cpus: set[int] | None
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    pools: dict[str, list[str]] = {}
    conn_: _Connection | None = None
    payloads: list[Any] = []
    try:
        while True:
            msg = conn.recv()
            op = msg["op"]
            seq = msg.get("seq")
            try:
                if op == "exit":
                    return
                if op == "affinity":
                    os.sched_setaffinity(0, msg["cpus"])
                    conn.send({"ok": True, "seq": seq})
                elif op == "prepare":
                    spec: TokenSpec = msg["tokens"]
                    if spec.fixed is not None:
                        tokens = [spec.fixed]
                    else:
                        if spec.tag not in pools:
                            pools[spec.tag] = _mint_pool(spec, index)
                        tokens = pools[spec.tag]
                    if conn_ is not None:
                        conn_.close()
                    conn_ = _connect(msg["target"])
                    payloads = [conn_.payload(t) for t in tokens]
                    # A checked call, fully decoded, with the last token (used last if ever).
                    got = conn_.check(tokens[-1])
                    if got != msg["target"].limit:
                        raise RuntimeError(f"expected {msg['target'].limit} posts, got {got}")
                    conn.send({"ok": True, "seq": seq})
                elif op == "go":
                    assert conn_ is not None, "go before prepare"
                    result = _run_phase(
                        conn_.call, payloads, msg["t0"], msg["t_measure"], msg["t_end"]
                    )
                    conn_.close()
                    conn_ = None
                    payloads = []
                    conn.send({"ok": True, "seq": seq, "result": result})
                else:
                    raise ValueError(f"unknown op {op!r}")
            except Exception as exc:
                if conn_ is not None:
                    with contextlib.suppress(Exception):
                        conn_.close()
                    conn_ = None
                conn.send({"ok": False, "seq": seq, "error": f"{type(exc).__name__}: {exc}"[:500]})
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return


# -- the orchestrator's side ---------------------------------------------------------


class ClientPool:
    """``size`` client processes pinned to ``cpus`` (``None``: unpinned)."""

    def __init__(self, size: int, *, cpus: set[int] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[Any] = []
        self._running = (0, 0.0)
        self._seq = 0
        try:
            for index in range(size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(child, index, cpus),
                    name=f"bench-client-{index}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        return [int(proc.pid) for proc in self._procs]

    def _send(self, indexes: range, messages: list[dict[str, Any]]) -> None:
        self._seq += 1
        for i, message in zip(indexes, messages, strict=True):
            self._conns[i].send({**message, "seq": self._seq})

    def _collect(self, indexes: range, timeout_s: float) -> list[Any]:
        """Every client's reply (all are read, so none is left for the next request).

        Replies to an earlier, abandoned request (another sequence number) are
        skipped. Raises ``RuntimeError`` naming the first client that failed,
        exited or did not answer within ``timeout_s``.
        """
        replies = []
        problems: list[str] = []
        deadline = time.monotonic() + timeout_s
        for i in indexes:
            conn = self._conns[i]
            reply: dict[str, Any] | None = None
            try:
                while reply is None or reply.get("seq") != self._seq:
                    if not conn.poll(max(0.0, deadline - time.monotonic())):
                        break
                    reply = conn.recv()
            except (EOFError, OSError):
                problems.append(f"client {i} has exited")
                continue
            if reply is None or reply.get("seq") != self._seq:
                problems.append(f"client {i} did not answer within {timeout_s:.0f} s")
            elif not reply.get("ok"):
                problems.append(f"client {i}: {reply.get('error')}")
            else:
                replies.append(reply)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise RuntimeError(problems[0] + more)
        return replies

    def _ask(self, indexes: range, messages: list[dict[str, Any]], timeout_s: float) -> list[Any]:
        self._send(indexes, messages)
        return self._collect(indexes, timeout_s)

    def set_affinity(self, cpus: set[int]) -> None:
        self._ask(range(self.size), [{"op": "affinity", "cpus": cpus}] * self.size, 10.0)

    def prepare(self, n: int, target: Target, tokens: TokenSpec, timeout_s: float = 120.0) -> None:
        """Connect clients ``0..n-1`` and get their tokens ready; raises ``RuntimeError``.

        One client after the other: each makes its checked call alone, so a
        warm token is cached by the first, and the set-up never sends the
        server a burst of concurrent first calls (the window does that).
        """
        message = {"op": "prepare", "target": target, "tokens": tokens}
        for i in range(n):
            self._ask(range(i, i + 1), [message], timeout_s)

    def go(self, n: int, t0: float, t_measure: float, t_end: float) -> None:
        """Start clients ``0..n-1`` (prepared): they call from ``t0`` until ``t_end``."""
        msg = {"op": "go", "t0": t0, "t_measure": t_measure, "t_end": t_end}
        self._send(range(n), [msg] * n)
        self._running = (n, t_end)

    def results(self) -> list[PhaseResult]:
        """The results of the clients started by :meth:`go`, after ``t_end``."""
        n, t_end = self._running
        timeout = max(0.0, t_end - time.monotonic()) + 60.0
        return [reply["result"] for reply in self._collect(range(n), timeout)]

    def close(self) -> None:
        """Ask every client to exit; terminate those that do not within 5 s."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send({"op": "exit"})
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._procs.clear()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
