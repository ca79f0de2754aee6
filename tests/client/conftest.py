"""Fixtures for the client tests: a user, and counting the calls a server serves."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

USERNAME = "alice"
PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class User:
    name: str
    password: str


@pytest.fixture
def user(make_user: Callable[..., None]) -> User:
    """A user of ``auth_server`` with ``posts:read posts:write``."""
    make_user(USERNAME, PASSWORD)
    return User(USERNAME, PASSWORD)


class CallCounter:
    """Counts the calls a real service object serves, by wrapping its methods.

    The count is taken inside the server before the reply is sent, so a test
    reads it as soon as the client call returns (the access log is written
    after the reply, too late to count on).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[tuple[str, str]] = []

    def wrap(self, obj: object, *names: str) -> CallCounter:
        for name in names:
            original = getattr(obj, name)

            def wrapper(
                *args: Any, _original: Any = original, _name: str = name, **kwargs: Any
            ) -> Any:
                try:
                    result = _original(*args, **kwargs)
                except Exception as exc:
                    self._record(_name, type(exc).__name__)
                    raise
                self._record(_name, "ok")
                return result

            setattr(obj, name, wrapper)
        return self

    def _record(self, name: str, outcome: str) -> None:
        with self._lock:
            self._calls.append((name, outcome))

    def calls(self, method: str | None = None) -> list[tuple[str, str]]:
        with self._lock:
            return [c for c in self._calls if method is None or c[0] == method]

    def count(self, method: str) -> int:
        return len(self.calls(method))


AUTH_METHODS = ("login", "refresh", "client_token", "validate", "revoke")


def count_auth_calls(server: Any) -> CallCounter:
    """Count the calls ``server`` (an AuthServer) serves from now on."""
    return CallCounter().wrap(server.service, *AUTH_METHODS)


@pytest.fixture
def counting() -> Callable[..., CallCounter]:
    """``counting(auth_server)``: count another Auth server's calls."""
    return count_auth_calls


@pytest.fixture
def auth_calls(auth_server: Any) -> CallCounter:
    """The calls ``auth_server`` serves, counted."""
    return count_auth_calls(auth_server)


@pytest.fixture
def unused_port() -> int:
    """A port nothing listens on (bound, then closed; nothing else binds in these tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Cli:
    """Runs ``posts-client`` as a subprocess with its own configuration directory."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.token_file = config_dir / "tokens.json"

    def run(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``posts-client ARGS``; ``env`` adds variables (``POSTS_CLIENT_AUTH``, ...)."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("POSTS_CLIENT_")}
        environ["POSTS_CLIENT_CONFIG_DIR"] = str(self.config_dir)
        environ.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "client.cli", *args],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=60,
            env=environ,
            check=False,
        )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "config")


POSTS_METHODS = ("create_post", "get_post", "list_posts", "update_post", "delete_post")


@pytest.fixture
def make_posts(make_posts_server: Callable[..., Any]) -> Callable[..., Any]:
    """Real Posts servers that ask ``auth_server`` about each token (``thrift`` mode).

    ``make_posts(port=0, data_dir=None, audience="posts")``; the verifier's
    cache is off, so a revocation counts at once. The handler's calls are
    counted: ``server.calls`` (a :class:`CallCounter`).
    """

    def make(*, port: int = 0, data_dir: Path | None = None, **verifier_settings: Any) -> Any:
        server = make_posts_server(
            "thrift", port=port, data_dir=data_dir, cache_ttl_s=0, **verifier_settings
        )
        server.calls = CallCounter().wrap(server.handler, *POSTS_METHODS)
        return server

    return make


@pytest.fixture
def posts_srv(make_posts: Callable[..., Any]) -> Any:
    """A started Posts server trusting ``auth_server``."""
    return make_posts()


class DropReplyProxy:
    """A TCP relay that loses the reply on its first ``drops`` connections.

    A network fault, not a fake server: requests go to the real server, which
    acts on them; on a dropping connection the relay reads the server's reply
    and then closes the client's connection instead of passing it on.
    """

    def __init__(self, upstream_port: int, *, drops: int = 1) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._drops = drops
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.connections = 0
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self.connections += 1
                drop = self.connections <= self._drops
                self._sockets += [client, upstream]
            for source, sink, dropping in ((client, upstream, False), (upstream, client, drop)):
                thread = threading.Thread(
                    target=self._pump, args=(source, sink, dropping), daemon=True
                )
                self._threads.append(thread)
                thread.start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, dropping: bool) -> None:
        try:
            while data := source.recv(65536):
                if dropping:  # the server answered: lose the answer
                    sink.shutdown(socket.SHUT_RDWR)
                    source.shutdown(socket.SHUT_RDWR)
                    return
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accept.join(10)
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        for sock in sockets:
            sock.close()


@pytest.fixture
def drop_reply_proxy() -> Iterator[Callable[..., DropReplyProxy]]:
    """``drop_reply_proxy(upstream_port, drops=1)``: a relay that loses replies."""
    proxies: list[DropReplyProxy] = []

    def make(upstream_port: int, *, drops: int = 1) -> DropReplyProxy:
        proxy = DropReplyProxy(upstream_port, drops=drops)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
