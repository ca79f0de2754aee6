"""IntrospectionVerifier against a minimal RFC 7662 server written here (not ours)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.verify.verifiers import IntrospectionVerifier, make_verifier

from _http_stub import QuietHandler, StubServer

T0 = 1_800_000_000.0
ISS = "https://issuer.test"
AUD = "posts"
CLIENT_ID = "posts-rs"
CLIENT_SECRET = "s3cret+/=&"  # characters that RFC 6749 §2.3.1 form-encodes


class IntrospectionServer(StubServer):
    """An RFC 7662 endpoint: HTTP Basic client auth, answers from ``self.answers``."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.status = 200
        self.raw_body: bytes | None = None
        self.hits = 0
        self.connections = 0
        self.forms: list[dict[str, list[str]]] = []
        self.open_sockets: set[socket.socket] = set()
        server = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def setup(self) -> None:
                server.connections += 1
                server.open_sockets.add(self.request)
                super().setup()

            def do_POST(self) -> None:
                server.hits += 1
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                server.forms.append(form)
                if not self._client_ok():
                    self.reply(401, b'{"error": "invalid_client"}')
                elif server.status != 200:
                    self.reply(server.status, b'{"error": "server_error"}')
                elif server.raw_body is not None:
                    self.reply(200, server.raw_body)
                else:
                    answer = server.answers.get(form.get("token", [""])[0], {"active": False})
                    self.reply(200, json.dumps(answer).encode())

            def _client_ok(self) -> bool:
                scheme, _, value = self.headers.get("Authorization", "").partition(" ")
                if scheme != "Basic":
                    return False
                user, _, password = base64.b64decode(value).decode().partition(":")
                return (urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)) == (
                    CLIENT_ID,
                    CLIENT_SECRET,
                )

        super().__init__(Handler)

    @property
    def url(self) -> str:
        return f"{super().url}/introspect"

    def stop(self) -> None:
        super().stop()
        for sock in self.open_sockets:  # end kept-alive connections too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.open_sockets.clear()


def active(**over: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "active": True,
        "scope": "posts:read posts:write",
        "client_id": "cli",
        "sub": "alice",
        "exp": int(T0) + 900,
        "iat": int(T0),
        "iss": ISS,
        "aud": AUD,
        "jti": "jti-1",
        "token_type": "Bearer",
    }
    answer.update(over)
    return {k: v for k, v in answer.items() if v is not None}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[IntrospectionServer]:
    srv = IntrospectionServer().start()
    yield srv
    srv.stop()


def make(server: IntrospectionServer, clock: Clock | None = None, **kw: Any) -> Any:
    settings: dict[str, Any] = {
        "introspect_url": server.url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "issuer": ISS,
        "audience": AUD,
        "timeout_s": 1.0,
        "clock": clock or Clock(),
    }
    settings.update(kw)
    return IntrospectionVerifier(**settings)


def test_active_token_accepted(server: IntrospectionServer) -> None:
    server.answers["tok"] = active()
    v = make(server)
    p = v.verify("tok")
    assert (p.subject, p.scopes, p.expires_at, p.token_id, p.client_id) == (
        "alice", frozenset({"posts:read", "posts:write"}), int(T0) + 900, "jti-1", "cli",
    )
    assert p.issuer == ISS and p.audience == (AUD,)
    assert server.forms == [{"token": ["tok"], "token_type_hint": ["access_token"]}]
    v.close()


def test_inactive_is_rejected_and_never_cached(server: IntrospectionServer) -> None:
    v = make(server)
    for _ in range(3):
        with pytest.raises(TokenRejected, match="token not active"):
            v.verify("unknown")
    assert server.hits == 3 and len(v.cache) == 0


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (active(active="true"), "not active"),
        (active(active=1), "not active"),
        ({"sub": "alice"}, "not active"),
        (active(aud="billing"), "wrong audience"),
        (active(aud=["a", "b"]), "wrong audience"),
        (active(aud=None), "no audience"),
        (active(iss="https://evil.test"), "wrong issuer"),
        (active(exp=int(T0)), "token expired"),
        (active(nbf=int(T0) + 300), "not yet valid"),
        (active(sub=None), "no subject"),
        (active(token_type="refresh_token"), "not an access token"),
    ],
)
def test_rejections(server: IntrospectionServer, answer: dict[str, Any], reason: str) -> None:
    server.answers["tok"] = answer
    v = make(server)
    with pytest.raises(TokenRejected, match=reason):
        v.verify("tok")
    assert len(v.cache) == 0


@pytest.mark.parametrize(
    "answer",
    [active(exp="soon"), active(scope=["posts:read"]), active(aud=5), active(iss=7)],
)
def test_malformed_answers_fail_closed(server: IntrospectionServer, answer: Any) -> None:
    server.answers["tok"] = answer
    with pytest.raises(DependencyUnavailable, match="malformed"):
        make(server).verify("tok")


def test_interoperable_optional_fields(server: IntrospectionServer) -> None:
    server.answers["tok"] = active(iss=None, aud=["other", AUD], jti=None, client_id=None)
    p = make(server).verify("tok")
    assert p.audience == ("other", AUD) and p.token_id == "" and p.client_id == ""
    server.answers["tok"] = active(aud=None)
    assert make(server, require_audience=False).verify("tok").subject == "alice"
    server.answers["tok"] = active(iss=None)
    with pytest.raises(TokenRejected, match="no issuer"):
        make(server, require_issuer=True).verify("tok")


def test_cache_ttl_honoured(server: IntrospectionServer) -> None:
    server.answers["tok"] = active()
    clock = Clock()
    v = make(server, clock, cache_ttl_s=30)
    v.verify("tok")
    clock.now = T0 + 29.9
    v.verify("tok")
    assert server.hits == 1
    server.answers["tok"] = {"active": False}  # revoked at the server
    clock.now = T0 + 30
    with pytest.raises(TokenRejected, match="not active"):
        v.verify("tok")
    assert server.hits == 2


def test_cache_never_outlives_exp(server: IntrospectionServer) -> None:
    server.answers["tok"] = active(exp=int(T0) + 5)
    clock = Clock()
    v = make(server, clock, cache_ttl_s=30)
    v.verify("tok")
    clock.now = T0 + 5
    with pytest.raises(TokenRejected, match="token expired"):  # a server still saying active
        v.verify("tok")
    assert server.hits == 2


def test_answer_without_exp_cached_for_the_ttl_only(server: IntrospectionServer) -> None:
    server.answers["tok"] = active(exp=None)
    clock = Clock()
    v = make(server, clock, cache_ttl_s=10)
    assert v.verify("tok").expires_at == 0
    clock.now = T0 + 9
    v.verify("tok")
    clock.now = T0 + 10
    v.verify("tok")
    assert server.hits == 2


def test_cache_off_asks_every_time_over_one_kept_alive_connection(
    server: IntrospectionServer,
) -> None:
    server.answers["tok"] = active()
    v = make(server, cache_ttl_s=0)
    for _ in range(5):
        v.verify("tok")
    assert server.hits == 5 and server.connections == 1
    v.close()


def test_bad_client_credentials(
    server: IntrospectionServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.answers["tok"] = active()
    v = make(server, client_secret="wrong")
    with caplog.at_level(logging.ERROR, logger="auth_rpc.verify.introspect"):
        for _ in range(3):
            with pytest.raises(
                DependencyUnavailable, match="introspection client credentials rejected"
            ):
                v.verify("tok")
    records = [r for r in caplog.records if "credentials rejected" in r.getMessage()]
    assert len(records) == 1
    assert "wrong" not in records[0].getMessage()


@pytest.mark.parametrize("status", [500, 503, 429, 404, 302])
def test_server_errors_are_unavailable(server: IntrospectionServer, status: int) -> None:
    server.answers["tok"] = active()
    server.status = status
    with pytest.raises(DependencyUnavailable, match=f"HTTP {status}"):
        make(server).verify("tok")


def test_non_json_answer_is_unavailable(server: IntrospectionServer) -> None:
    server.raw_body = b"<html>oops</html>"
    with pytest.raises(DependencyUnavailable, match="malformed"):
        make(server).verify("tok")


def test_down_is_unavailable_then_recovers(server: IntrospectionServer) -> None:
    server.answers["tok"] = active()
    v = make(server, cache_ttl_s=0)
    v.verify("tok")
    server.stop()
    with pytest.raises(DependencyUnavailable, match="unreachable"):
        v.verify("tok")
    server.start()  # same port
    assert v.verify("tok").subject == "alice"


def test_a_silent_server_is_bounded_by_the_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts at the TCP level, never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/introspect"
        v = IntrospectionVerifier(
            introspect_url=url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
            issuer=ISS, audience=AUD, timeout_s=0.2,
        )
        with pytest.raises(DependencyUnavailable, match="unreachable"):
            v.verify("tok")
        v.close()
    finally:
        listener.close()


def test_oversize_token_is_refused_without_asking(server: IntrospectionServer) -> None:
    with pytest.raises(TokenRejected, match="too large"):
        make(server).verify("x" * 8193)
    assert server.hits == 0


def test_misconfiguration() -> None:
    base: dict[str, Any] = {
        "introspect_url": "https://auth.test/introspect", "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET, "issuer": ISS, "audience": AUD,
    }
    for bad in ({"client_secret": ""}, {"introspect_url": "ftp://x/"}, {"audience": ""},
                {"timeout_s": 60}):
        with pytest.raises(ValueError):
            IntrospectionVerifier(**{**base, **bad})


def test_make_verifier_reads_the_secret_file(server: IntrospectionServer, tmp_path: Any) -> None:
    server.answers["tok"] = active()
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    v = make_verifier(
        "introspect", introspect_url=server.url, client_id=CLIENT_ID,
        client_secret_file=secret_file, issuer=ISS, audience=AUD, clock=Clock(),
    )
    assert v.verify("tok").subject == "alice"
    v.close()


class _RawServer:
    """Answers every request on a connection with ``reply(conn)`` (bytes written by hand)."""

    def __init__(self, reply: Any) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.reply = reply
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/introspect"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = int(dict(
                    line.split(b": ", 1) for line in head.split(b"\r\n")[1:]
                ).get(b"Content-Length", b"0"))
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                self.requests += 1
                self.reply(conn)

    def close(self) -> None:
        self.listener.close()


def _raw_verifier(url: str, **kw: Any) -> IntrospectionVerifier:
    settings: dict[str, Any] = {
        "introspect_url": url, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "issuer": ISS, "audience": AUD, "timeout_s": 0.5, "clock": Clock(),
    }
    settings.update(kw)
    return IntrospectionVerifier(**settings)


def test_an_oversized_answer_is_refused_declared_or_not() -> None:
    big = json.dumps({**active(), "pad": "x" * 70_000}).encode()
    declared = _RawServer(lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big))
    chunked = _RawServer(lambda c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (big[:40_000], big[40_000:]))
        + b"0\r\n\r\n"))
    try:
        for srv in (declared, chunked):
            v = _raw_verifier(srv.url)
            with pytest.raises(DependencyUnavailable, match="answer too large"):
                v.verify("tok")
            v.close()
    finally:
        declared.close()
        chunked.close()


def test_a_dripping_answer_is_cut_at_the_deadline() -> None:
    # Each byte comes within the read timeout (0.5 s): only the total deadline cuts it.
    body = json.dumps(active()).encode()

    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for byte in body:
            conn.sendall(bytes([byte]))
            time.sleep(0.05)

    srv = _RawServer(drip)
    v = _raw_verifier(srv.url)
    try:
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="answer too slow"):
            v.verify("tok")
        elapsed = time.monotonic() - started
        print(f"dripping answer cut after {elapsed:.2f} s (deadline 1.0 s)")
        assert elapsed < 1.0 + 2.0  # 2 x timeout_s, and loose for a busy machine
    finally:
        v.close()
        srv.close()


def test_an_error_answer_does_not_leave_its_body_on_a_kept_connection() -> None:
    # A 500 with a body, then a good answer: the body of the first must not be read as
    # the answer to the second (the connection it came on is dropped, not reused).
    answers = [
        b"HTTP/1.1 500 Oops\r\nContent-Length: 30\r\n\r\n" + b"HTTP/1.1 200 OK\r\n\r\n{}".ljust(30),
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
            len(json.dumps(active()).encode()), json.dumps(active()).encode()),
    ]
    srv = _RawServer(lambda c: c.sendall(answers.pop(0)))
    v = _raw_verifier(srv.url, cache_ttl_s=0)
    try:
        with pytest.raises(DependencyUnavailable, match="HTTP 500"):
            v.verify("tok")
        assert v.verify("tok").subject == "alice"
    finally:
        v.close()
        srv.close()


def test_a_requests_session_given_is_used(server: IntrospectionServer) -> None:
    import requests

    server.answers["tok"] = active()
    with requests.Session() as session:
        session.trust_env = False
        v = make(server, session=session, cache_ttl_s=0)
        for _ in range(3):
            assert v.verify("tok").subject == "alice"
        assert server.hits == 3 and server.connections == 1
        v.close()
        with pytest.raises(ValueError, match="session or tls"):
            make(server, session=session, tls=ssl.create_default_context())


def test_concurrent_callers_share_the_pool(server: IntrospectionServer) -> None:
    for i in range(16):
        server.answers[f"tok{i}"] = active(jti=f"j{i}")
    # More callers than pooled connections: the extra ones get connections of their own.
    # (16: the test server's listen backlog is 5, and a dropped SYN waits 1 s.)
    v = make(server, pool_size=4, timeout_s=5.0)
    results: list[str] = []
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            results.append(v.verify(f"tok{i}").token_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    v.close()
    assert not errors and sorted(results) == sorted(f"j{i}" for i in range(16))
    assert server.hits == 16
