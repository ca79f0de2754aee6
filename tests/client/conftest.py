"""Fixtures for the client tests: a user, and counting the calls a server serves."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

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


_CALL = re.compile(r"\bmethod=(\w+) outcome=(\w+)")


class CallLog:
    """The calls servers in this process served, read from the ``auth_rpc.access`` log."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    def calls(self, method: str | None = None) -> list[tuple[str, str]]:
        found = []
        for record in self._caplog.records:
            if record.name != "auth_rpc.access":
                continue
            match = _CALL.search(record.getMessage())
            if match and (method is None or match.group(1) == method):
                found.append((match.group(1), match.group(2)))
        return found

    def count(self, method: str) -> int:
        return len(self.calls(method))

    def clear(self) -> None:
        self._caplog.clear()


@pytest.fixture
def call_log(caplog: pytest.LogCaptureFixture) -> CallLog:
    caplog.set_level(logging.INFO, logger="auth_rpc.access")
    return CallLog(caplog)


@pytest.fixture
def unused_port() -> int:
    """A port nothing listens on (bound, then closed; nothing else binds in these tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
