"""Two Auth service instances (separate objects, separate connection pools) on one
PostgreSQL database: what each replica does is seen at once by the other."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from auth_rpc.auth.service import AuthService, AuthSettings
from auth_rpc.errors import InvalidCredentials, Throttled, TokenRejected
from auth_rpc.verify.statuslist import StatusList

PASSWORD = "correct horse battery staple"


@pytest.fixture
def replicas(
    tmp_path: Path, postgresql_url: str, key_encryption_key_file: Path
) -> Iterator[tuple[AuthService, AuthService]]:
    # Nothing shared but the database (the signing keys sealed in it) and the
    # key-encryption key file: a data directory each, as on two machines.
    first, second = (
        AuthService.open(AuthSettings(
            data_dir=tmp_path / name, issuer="https://auth.test", audience="posts",
            database_url=postgresql_url, key_encryption_key_file=key_encryption_key_file,
        ))
        for name in ("a", "b")
    )
    first.add_user("alice", PASSWORD, ["posts:read"])
    yield first, second
    first.close()
    second.close()


def _all_at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` on threads released together; each result or exception."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_refreshes_across_replicas_give_one_success_then_revoke(
    replicas: tuple[AuthService, AuthService],
) -> None:
    first, second = replicas
    pair = first.login("alice", PASSWORD)
    results = _all_at_once(
        [lambda s=(first, second)[i % 2]: s.refresh(pair.refresh_token) for i in range(10)]
    )
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1, results
    assert all(isinstance(e, TokenRejected) for e in lost), lost
    # The reuse revoked the family: the winner's refresh token is dead too, on both.
    for service in (first, second):
        with pytest.raises(TokenRejected):
            service.refresh(won[0].refresh_token)
    # ... and so is its access token, at both replicas at once.
    for service in (first, second):
        with pytest.raises(TokenRejected):
            service.validate(won[0].access_token)


def test_a_burst_of_wrong_logins_across_replicas_checks_at_most_5_passwords(
    replicas: tuple[AuthService, AuthService], monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[int] = []
    lock = threading.Lock()
    for service in replicas:
        real = service._hasher.verify

        def spy(stored: str | None, secret: str, real: Any = real) -> bool:
            with lock:
                checked.append(1)
            return bool(real(stored, secret))

        monkeypatch.setattr(service._hasher, "verify", spy)
    results = _all_at_once(
        # Each from its own address: hashing admission (per source) refuses none.
        [
            lambda s=replicas[i % 2], i=i: s.login(
                "alice", f"wrong guess {i}", source=f"192.0.2.{i}"
            )
            for i in range(16)
        ]
    )
    assert all(isinstance(r, (InvalidCredentials, Throttled)) for r in results), results
    print(f"passwords checked: {len(checked)} of {len(results)} attempts")
    assert 1 <= len(checked) <= 5
    # The throttle holds at both replicas afterwards, even for the right password.
    for service in replicas:
        with pytest.raises(Throttled):
            service.login("alice", PASSWORD)


def test_a_revocation_at_one_replica_is_in_the_others_status_list_at_once(
    replicas: tuple[AuthService, AuthService],
) -> None:
    first, second = replicas
    pair = first.login("alice", PASSWORD)
    before = second.validate(pair.access_token)
    assert before.subject == "alice"
    claim = jwt.decode(pair.access_token, options={"verify_signature": False})["status"]
    entry = second._status_lists.entry_of(claim)

    def bit_served_by(service: AuthService) -> int:
        # The Status List Token the replica serves over HTTP (what verifiers read).
        token = service._status_lists.token(entry.list_id).token
        payload = jwt.decode(token, options={"verify_signature": False})
        return StatusList.from_json(payload["status_list"]).get(entry.idx)

    assert bit_served_by(second) == 0
    first.revoke(pair.access_token)
    assert bit_served_by(second) == 1  # at once: no waiting, no polling
    with pytest.raises(TokenRejected):
        second.validate(pair.access_token)
