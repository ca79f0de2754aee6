"""Fixtures for the client tests: a user, and counting the calls a server serves."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
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

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTS_CLIENT_")}
        env["POSTS_CLIENT_CONFIG_DIR"] = str(self.config_dir)
        return subprocess.run(
            [sys.executable, "-m", "client.cli", *args],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "config")
