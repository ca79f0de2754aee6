"""HAProxy in front of Thrift replicas: the configuration in the repository and its
Thrift-level health check, which takes a hung replica out of rotation (a TCP check
would not: a stopped process's kernel still completes the handshake)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.idl import common_thrift, posts_thrift
from auth_rpc.serving.haproxy import (
    DEPLOY_LISTENERS,
    HEALTH_CHECK_METHOD,
    find_haproxy,
    health_check_reply,
    health_check_request,
    render_config,
)
from auth_rpc.serving.rpc import RpcServer
from auth_rpc.serving.transport import open_client

from _http_stub import QuietHandler, StubServer

ROOT = Path(__file__).resolve().parents[2]


def test_the_repository_config_is_the_one_the_tests_run() -> None:
    assert (ROOT / "deploy" / "haproxy.cfg").read_text() == render_config(DEPLOY_LISTENERS)


def test_the_repository_config_is_valid(tmp_path: Path) -> None:
    program = find_haproxy()
    if program is None:
        pytest.skip("HAProxy is not installed; apt-get install haproxy")
    env = {"PATH": os.environ.get("PATH", ""), "HAPROXY_STATS_SOCKET": str(tmp_path / "s")}
    port = iter(range(20001, 20100))  # never bound: `haproxy -c` only parses
    for listener in DEPLOY_LISTENERS:
        env[listener.bind_var] = f"127.0.0.1:{next(port)}"
        for n in range(1, listener.servers + 1):
            env[listener.server_var(n)] = f"127.0.0.1:{next(port)}"
    check = subprocess.run([program, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
                           env=env, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


class _Nothing:
    """A handler with no methods: the check's method is unknown to every service."""


@pytest.mark.parametrize("framed", [False, True])
def test_a_live_thrift_server_answers_the_check_without_running_anything(
    framed: bool, serve_thrift: Callable[..., RpcServer]
) -> None:
    assert HEALTH_CHECK_METHOD not in posts_thrift.Posts.thrift_services
    server = serve_thrift(posts_thrift.Posts, _Nothing(), framed=framed)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for _ in range(2):  # the connection stays usable
            sock.sendall(health_check_request(framed=framed))
            reply = b""
            while health_check_reply() not in reply:
                chunk = sock.recv(4096)
                assert chunk, f"connection closed after {reply!r}"
                reply += chunk


@contextlib.contextmanager
def _http_server() -> Iterator[int]:
    class Hello(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

    # HAProxy's check resets the connection: expected, no traceback.
    with StubServer(Hello, quiet_errors=True) as http:
        yield http.port


def test_a_listener_that_does_not_speak_thrift_is_down(
    make_haproxy: Callable[..., Any], serve_thrift: Callable[..., RpcServer]
) -> None:
    """A socket that accepts but never answers (what a hung process looks like to TCP),
    an HTTP server, and a framed server checked as unframed all fail the check."""
    live = serve_thrift(posts_thrift.Posts, _Nothing())
    framed = serve_thrift(posts_thrift.Posts, _Nothing(), framed=True)
    with socket.socket() as mute, _http_server() as http_port:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        servers = [("127.0.0.1", live.port), mute.getsockname(), ("127.0.0.1", http_port),
                   ("127.0.0.1", framed.port)]
        proxy = make_haproxy({"posts": servers}, start=False)
        proxy.start({"posts": servers}, wait_up=False)
        proxy.wait_until(
            lambda s: [s[("posts", f"posts{n}")][0] for n in range(1, 5)]
            == ["UP", "DOWN", "DOWN", "DOWN"],
            deadline=time.monotonic() + 30, what="posts1 UP, the others DOWN")
        print("\n", proxy.states())


def _call_through(proxy: Any) -> None:
    """One call on a fresh connection through the balancer, answered by a replica."""
    client = open_client(posts_thrift.Posts, "127.0.0.1", proxy.port("posts"), timeout_s=5)
    try:
        with pytest.raises(common_thrift.Unauthenticated):
            client.list_posts("", 0, 0)  # no token: the declared error, from a live replica
    finally:
        client.close()


def test_a_hung_replica_is_taken_out_of_rotation_and_comes_back(
    spawn: Callable[..., Any], make_haproxy: Callable[..., Any], tmp_path: Path
) -> None:
    args = ["--data-dir", str(tmp_path / "posts"), "--verify", "jwks", "--issuer",
            "http://127.0.0.1:9", "--jwks-url", "http://127.0.0.1:9/.well-known/jwks.json"]
    one, two = spawn("posts", *args), spawn("posts", *args)
    proxy = make_haproxy({"posts": [one.addr, two.addr]})
    for _ in range(4):
        _call_through(proxy)

    one.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        proxy.wait_until(lambda s: s[("posts", "posts1")][0] == "DOWN",
                         deadline=stopped + 30, what="the stopped replica DOWN")
        down_s = time.monotonic() - stopped
        assert proxy.states()[("posts", "posts2")][0] == "UP"
        # Every new connection now reaches the live replica: none hangs.
        started = time.monotonic()
        for _ in range(20):
            _call_through(proxy)
        calls_s = time.monotonic() - started
    finally:
        one.signal(signal.SIGCONT)
    resumed = time.monotonic()
    proxy.wait_until(lambda s: s[("posts", "posts1")][0] == "UP",
                     deadline=resumed + 30, what="the resumed replica UP")
    up_s = time.monotonic() - resumed
    print(f"\nhung replica DOWN after {down_s:.2f} s; 20 calls meanwhile in {calls_s:.2f} s; "
          f"UP again {up_s:.2f} s after SIGCONT")
    for _ in range(4):
        _call_through(proxy)


def test_behind_haproxy_the_auth_service_sees_each_client_not_haproxy(
    make_auth_server: Callable[..., Any], make_haproxy: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Thrift listeners get the PROXY protocol from HAProxy (``send-proxy-v2``), so the
    Auth service admits password hashing per client: before, every login through the
    balancer came from HAProxy's address and all clients shared one source's allowance
    (2 hashes running or waiting per replica; the excess refused with ``RateLimited``)."""
    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.thrift import TClient
    from thriftpy2.transport import TCyBufferedTransportFactory, TSocket

    from auth_rpc.idl import auth_thrift
    from auth_rpc.serving.rpc import ServerSettings

    auth = make_auth_server(settings=ServerSettings(proxy_protocol_from=("127.0.0.1",)))
    auth.service.add_user("alice", "alice's long password", ["posts:read"])
    sources: list[str | None] = []
    real_login = auth.service.login

    def spy(*args: Any, source: str | None = None, **kwargs: Any) -> Any:
        sources.append(source)
        return real_login(*args, source=source, **kwargs)

    monkeypatch.setattr(auth.service, "login", spy)
    # Ready once HAProxy's health check, which now begins with a LOCAL header, passed.
    proxy = make_haproxy({"auth": [("127.0.0.1", auth.port)]}, proxy_protocol=["auth"])
    assert "send-proxy-v2" in proxy.config_path.read_text()
    for client_address in ("127.0.0.2", "127.0.0.3"):
        sock = socket.create_connection(("127.0.0.1", proxy.port("auth")), timeout=30,
                                        source_address=(client_address, 0))
        trans = TCyBufferedTransportFactory().get_transport(TSocket(sock=sock))
        client = TClient(auth_thrift.Auth, TCyBinaryProtocolFactory().get_protocol(trans))
        try:
            assert client.login("alice", "alice's long password").access_token
        finally:
            client.close()
    assert sources == ["127.0.0.2", "127.0.0.3"]
