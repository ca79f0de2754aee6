"""Auth replicas on one PostgreSQL database tell each other what changed (LISTEN/NOTIFY):
what a replica remembers is dropped when another changes it, and while the notifications
cannot arrive, it reads the database per request instead."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from auth_rpc.auth.service import AuthService, AuthSettings
from auth_rpc.errors import InvalidCredentials, Throttled, TokenRejected

PASSWORD = "correct horse battery staple"


@pytest.fixture
def pair(
    tmp_path: Path, postgresql_url: str, key_encryption_key_file: Path
) -> Iterator[tuple[AuthService, AuthService]]:
    services = [
        AuthService.open(AuthSettings(
            data_dir=tmp_path / name, issuer="https://auth.test", audience="posts",
            database_url=postgresql_url, key_encryption_key_file=key_encryption_key_file,
        ))
        for name in ("a", "b")
    ]
    for service in services:
        assert service._changes is not None and service._changes.live
    yield services[0], services[1]
    for service in services:
        service.close()


def _until(condition: Callable[[], bool], *, timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held (polled with a deadline)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.0005)
    return time.monotonic() - start


class _Reads:
    """Counts the client rows a service reads (a wrapper around the real store)."""

    def __init__(self, service: AuthService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = service._accounts.get_client

        def counted(client_id: str) -> Any:
            self.count += 1
            return real(client_id)

        monkeypatch.setattr(service._accounts, "get_client", counted)


def _refused(service: AuthService, client_id: str, secret: str) -> bool:
    try:
        service.authenticate_client(client_id, secret)
    except (InvalidCredentials, Throttled):  # refusals count: the 6th is throttled
        return True
    return False


def test_a_client_disabled_at_one_replica_is_refused_by_the_other(
    pair: tuple[AuthService, AuthService], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = pair
    secret = first.add_client("resource", ["posts:read"], introspect=True)
    reads = _Reads(second, monkeypatch)
    second.authorize_introspection("resource", secret)
    before = reads.count
    for _ in range(20):  # remembered: no database read while notifications arrive
        second.authorize_introspection("resource", secret)
    assert reads.count == before

    changes = second._changes
    assert changes is not None
    notified, refused = [], []
    for _ in range(10):
        received = changes.received
        first.disable("resource")  # returns once committed
        done = time.monotonic()
        notified.append(
            _until(lambda r=received: changes.received > r, timeout_s=5, what="the notification")
        )
        _until(lambda: _refused(second, "resource", secret), timeout_s=5, what="the refusal")
        refused.append(time.monotonic() - done)
        first.enable("resource")
        _until(lambda: second.authenticate_client("resource", secret) == "resource",
               timeout_s=5, what="enabled again")
    print(
        "client disabled at A (10 rounds): B notified after median "
        f"{statistics.median(notified) * 1000:.2f} ms (max {max(notified) * 1000:.2f}); "
        f"its next call refused after median {statistics.median(refused) * 1000:.2f} ms "
        f"(max {max(refused) * 1000:.2f})"
    )
    assert max(refused) < 2.0  # loose: a notification takes about a millisecond here


@pytest.mark.parametrize("change", ["reset-secret", "remove", "set-scope"])
def test_every_client_change_at_one_replica_reaches_the_other(
    pair: tuple[AuthService, AuthService], change: str
) -> None:
    first, second = pair
    secret = first.add_client("svc", ["posts:read", "posts:write"])
    assert second.client_token("svc", secret).scope == "posts:read posts:write"
    if change == "reset-secret":
        first.reset_client_secret("svc")
        _until(lambda: _refused(second, "svc", secret), timeout_s=5, what="the old secret refused")
    elif change == "remove":
        first.remove("svc")
        _until(lambda: _refused(second, "svc", secret), timeout_s=5, what="the removed client")
    else:
        first.set_scopes("svc", ["posts:read"])
        _until(
            lambda: second.client_token("svc", secret).scope == "posts:read",
            timeout_s=5, what="the new scopes",
        )


def test_a_key_rotation_at_one_replica_is_seen_by_notification(
    pair: tuple[AuthService, AuthService],
) -> None:
    first, second = pair
    latencies = []
    for _ in range(5):
        kid = first.rotate_key(activate_after_s=0)
        done = time.monotonic()
        # The ring itself (no call that would re-read the key table): only the
        # notification can have brought the new key.
        _until(lambda k=kid: second._keys._ring.signer_at(time.time()).kid == k,  # type: ignore[union-attr]
               timeout_s=5, what="the new signer")
        latencies.append(time.monotonic() - done)
    print(
        f"key rotation at A signing at B after: median {statistics.median(latencies) * 1000:.2f}"
        f" ms, max {max(latencies) * 1000:.2f} ms (5 rounds)"
    )
    assert max(latencies) < 2.0


def _drop_listeners(url: str) -> int:
    """Terminate every server connection that is LISTEN-ing (what a network cut does)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
        ).fetchall()
    return len(rows)


def test_a_lost_listener_falls_back_to_reading_per_request_then_recovers(
    pair: tuple[AuthService, AuthService], postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = pair
    secret = first.add_client("resource", ["posts:read"])
    second.authenticate_client("resource", secret)
    changes = second._changes
    assert changes is not None
    listener = changes._listener
    assert listener is not None
    assert _drop_listeners(postgresql_url) >= 2
    _until(lambda: not changes.live, timeout_s=5, what="the loss to be noticed")
    # Not live: remembered authentications are checked against the database
    # on every call, so a change is seen at once even without notifications.
    reads = _Reads(second, monkeypatch)
    second.authenticate_client("resource", secret)
    assert reads.count == 1
    first.disable("resource")
    if not changes.live:  # (it may be back already on a fast machine)
        assert _refused(second, "resource", secret)
    # The key table too: read per use.
    kid = first.rotate_key(activate_after_s=0)
    assert second.signing_key().kid == kid
    # It reconnects by itself, and everything remembered was dropped meanwhile.
    waited = _until(lambda: changes.live, timeout_s=10, what="the listener to reconnect")
    print(f"listener back after {waited:.2f} s (losses: {listener.losses})")
    assert listener.losses >= 1
    first.enable("resource")
    second.authenticate_client("resource", secret)
    first.disable("resource")
    _until(lambda: _refused(second, "resource", secret), timeout_s=5, what="notified again")


def test_revocations_and_disabled_users_are_read_per_request(
    pair: tuple[AuthService, AuthService],
) -> None:
    """What is not remembered at all: no notification needed, seen by the next call."""
    first, second = pair
    first.add_user("alice", PASSWORD, ["posts:read"])
    tokens = second.login("alice", PASSWORD)
    first.revoke(tokens.access_token)
    with pytest.raises(TokenRejected):
        second.validate(tokens.access_token)
    other = second.login("alice", PASSWORD)
    first.disable("alice")
    with pytest.raises(InvalidCredentials):
        second.login("alice", PASSWORD)
    with pytest.raises(TokenRejected):
        second.refresh(other.refresh_token)
    with pytest.raises(TokenRejected):
        second.validate(other.access_token)
