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


#: The modules whose tests run on both backends: the Auth stores' behaviour
#: (the others test SQLite-specific things, the CLI or the verifiers).
BOTH_BACKENDS = {
    "test_service.py",
    "test_service_clients.py",
    "test_tokens.py",
    "test_status_lists.py",
    "test_accounts.py",
    "test_audiences.py",
    "test_introspect_permission.py",
}


#: Tests of SQLite's own matters (its file, its modes, its failures, its
#: migrations from old versions, processes sharing its file): SQLite only.
SQLITE_ONLY = {
    "test_key_file_and_data_dir_modes",
    "test_database_failure_is_dependency_unavailable",
    "test_a_database_failure_during_login_is_not_a_guess",
    "test_loose_file_modes_are_tightened_on_open",
    "test_processes_sharing_the_database_never_share_an_entry",
    "test_migration_from_v3_keeps_existing_accounts_on_the_default",
    "test_clients_registered_before_keep_it_only_with_the_introspect_scope",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (
        "backend" in metafunc.fixturenames
        and metafunc.definition.path.name in BOTH_BACKENDS
        and metafunc.definition.originalname not in SQLITE_ONLY
    ):
        metafunc.parametrize("backend", ["sqlite", "postgresql"], indirect=True)



@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` (the data directory) or ``postgresql`` (a fresh database)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """The ``--database-url`` of the services: ``None`` on SQLite."""
    if backend == "sqlite":
        return None
    url: str = request.getfixturevalue("postgresql_url")
    return url


@pytest.fixture
def kek_file(database_url: str | None, request: pytest.FixtureRequest) -> Path | None:
    """On PostgreSQL, the key-encryption key file of the services (``None`` on SQLite)."""
    if database_url is None:
        return None
    path: Path = request.getfixturevalue("key_encryption_key_file")
    return path


@pytest.fixture
def open_service(
    data_dir: Path, clock: FakeClock, database_url: str | None, kek_file: Path | None
) -> Iterator[Callable[..., AuthService]]:
    """Open AuthServices on ``data_dir`` (settings overridable); all closed at teardown."""
    opened: list[AuthService] = []

    def open_(create_key: bool = True, **overrides: Any) -> AuthService:
        fields: dict[str, Any] = {
            "data_dir": data_dir, "issuer": ISSUER, "audience": AUDIENCE,
            "database_url": database_url, "key_encryption_key_file": kek_file,
        }
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
