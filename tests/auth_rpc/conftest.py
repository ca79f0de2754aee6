"""Local fixtures of the Auth core tests: a settable clock and a service on a temp dir."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.auth.service import AuthService, AuthSettings

ISSUER = "https://auth.test"
AUDIENCE = "posts"
PASSWORD = "correct horse battery staple"
USER_SCOPES = ("posts:read", "posts:write")


class FakeClock:
    """A clock the test moves by hand (seconds since the epoch)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time())) if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def open_service(data_dir: Path, clock: FakeClock) -> Iterator[Callable[..., AuthService]]:
    """Open AuthServices on ``data_dir`` (settings overridable); all closed at teardown."""
    opened: list[AuthService] = []

    def open_(create_key: bool = True, **overrides: Any) -> AuthService:
        fields: dict[str, Any] = {"data_dir": data_dir, "issuer": ISSUER, "audience": AUDIENCE}
        fields.update(overrides)
        service = AuthService.open(AuthSettings(**fields), clock=clock, create_key=create_key)
        opened.append(service)
        return service

    yield open_
    for service in opened:
        service.close()


@pytest.fixture
def service(open_service: Callable[..., AuthService]) -> AuthService:
    return open_service()


@pytest.fixture
def alice(service: AuthService) -> str:
    service.add_user("alice", PASSWORD, USER_SCOPES)
    return "alice"
