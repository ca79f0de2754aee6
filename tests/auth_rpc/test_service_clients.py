"""Service clients: authentication cost, name collisions, tokens bound to their client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from auth_rpc.auth.passwords import SecretHasher
from auth_rpc.auth.service import USER_CLIENT_ID, AuthService
from auth_rpc.errors import InvalidCredentials, InvalidInput, Throttled, TokenRejected

PASSWORD = "correct horse battery staple"


class CountingHasher(SecretHasher):
    def __init__(self) -> None:
        super().__init__()
        self.verifications = 0

    def verify(self, stored_hash: str | None, secret: str) -> bool:
        self.verifications += 1
        return super().verify(stored_hash, secret)


def test_client_secrets_are_checked_without_argon2(
    open_service: Callable[..., AuthService],
) -> None:
    """Introspection authenticates the resource server on every call: no argon2 on that path.

    Client secrets are 256 random bits made by the service, checked against a
    SHA-256 digest in constant time; a success is also remembered briefly
    (no database read per call).
    """
    service = open_service()
    hasher = CountingHasher()
    service._hasher = hasher  # the service's own hasher, counting
    secret = service.add_client("posts-svc", (), introspect=True)
    for _ in range(5):
        assert service.authenticate_client("posts-svc", secret) == "posts-svc"
    for _ in range(3):
        with pytest.raises(InvalidCredentials):
            service.authenticate_client("posts-svc", secret + "x")
    with pytest.raises(InvalidCredentials):
        service.authenticate_client("nobody", secret)
    assert hasher.verifications == 0
    # The memory is keyed by a digest: the secret itself is not kept.
    assert all(secret.encode() not in key for key in service._client_cache)


def test_a_correct_client_secret_gets_through_whatever_guesses_were_made(
    open_service: Callable[..., AuthService], clock: Any
) -> None:
    """Regression: five wrong secrets for a client id locked the real client out.

    The id was throttled for 60 s to 15 min, renewed by one guess whenever the
    delay ran out; once the remembered success expired (or Auth restarted),
    Posts in introspect mode refused every token it had not cached.
    Throttling now applies to the failures, never to the id.
    """
    service = open_service()
    secret = service.add_client("posts-svc", (), introspect=True)
    for _ in range(5):
        with pytest.raises(InvalidCredentials):
            service.authenticate_client("posts-svc", "a wrong guess")
    with pytest.raises(Throttled):  # further guesses are throttled...
        service.authenticate_client("posts-svc", "a wrong guess")
    service.close()
    restarted = open_service()  # nothing remembered, the streak is in the database
    with pytest.raises(Throttled):
        restarted.authenticate_client("posts-svc", "a wrong guess")
    # ...but the right secret is not.
    assert restarted.authenticate_client("posts-svc", secret) == "posts-svc"
    clock.advance(3600)
    for _ in range(20):
        with pytest.raises((InvalidCredentials, Throttled)):
            restarted.authenticate_client("posts-svc", "a wrong guess")
        assert restarted.authenticate_client("posts-svc", secret) == "posts-svc"
    restarted._client_cache.clear()
    assert restarted.authenticate_client("posts-svc", secret) == "posts-svc"


def test_a_client_registered_before_digests_is_upgraded_on_success(
    open_service: Callable[..., AuthService],
) -> None:
    service = open_service()
    hasher = CountingHasher()
    service._hasher = hasher
    secret = service.add_client("old-svc", (), introspect=True)
    with service._db.transaction() as conn:  # as written by a version before schema 3
        conn.execute("UPDATE clients SET secret_digest = NULL")
    with pytest.raises(InvalidCredentials):
        service.authenticate_client("old-svc", secret + "x")
    assert hasher.verifications == 1  # argon2, as before
    assert service.authenticate_client("old-svc", secret) == "old-svc"
    assert hasher.verifications == 2
    service._client_cache.clear()
    assert service.authenticate_client("old-svc", secret) == "old-svc"
    assert hasher.verifications == 2  # the digest was stored


def test_a_client_in_use_stays_remembered(
    open_service: Callable[..., AuthService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remembered success is extended by each use, not dropped 300 s after the first.

    A remembered client is still looked up once per use (its row, by key: no
    hashing, no throttle), so that a disable or a reset secret applies at once.
    """
    import auth_rpc.auth.service as service_module

    now = [1000.0]
    monkeypatch.setattr(service_module.time, "monotonic", lambda: now[0])
    service = open_service()
    secret = service.add_client("posts-svc", (), introspect=True)
    service.authenticate_client("posts-svc", secret)
    slow = []
    real_slow = service._authenticate_client_slow
    monkeypatch.setattr(
        service, "_authenticate_client_slow", lambda *a: slow.append(a) or real_slow(*a)
    )
    for _ in range(10):
        now[0] += service_module.CLIENT_AUTH_CACHE_TTL_S / 2
        assert service.authenticate_client("posts-svc", secret) == "posts-svc"
    assert slow == []
    service.disable("posts-svc")  # the remembered success ends with the account
    with pytest.raises(InvalidCredentials):
        service.authenticate_client("posts-svc", secret)


def test_users_and_clients_cannot_share_a_name(open_service: Callable[..., AuthService]) -> None:
    """A client token's sub is the client id: a same-named user would own its posts."""
    service = open_service()
    service.add_user("alice", PASSWORD, ["posts:read"])
    service.add_client("reporting", ["posts:read"])
    with pytest.raises(InvalidInput, match="client_id"):
        service.add_client("alice", ["posts:read"])
    with pytest.raises(InvalidInput, match="name"):
        service.add_user("reporting", PASSWORD, ["posts:read"])
    with pytest.raises(InvalidInput, match="client_id"):
        service.add_client(USER_CLIENT_ID, ["posts:read"])


def test_refresh_is_bound_to_the_client_and_a_refusal_changes_nothing(
    open_service: Callable[..., AuthService],
) -> None:
    service = open_service()
    service.add_user("alice", PASSWORD, ["posts:read"])
    service.add_client("web", ["posts:read"])
    pair = service.login("alice", PASSWORD, client_id="web")
    with pytest.raises(TokenRejected):
        service.refresh(pair.refresh_token)  # as the default (public) client
    with pytest.raises(TokenRejected):
        service.refresh(pair.refresh_token, client_id="other")
    # Not counted as a reuse: the family is intact and the token still rotates once.
    rotated = service.refresh(pair.refresh_token, client_id="web")
    assert service.validate(rotated.access_token).client_id == "web"


def test_revoke_with_a_client_only_touches_that_clients_tokens(
    open_service: Callable[..., AuthService],
) -> None:
    service = open_service()
    service.add_user("alice", PASSWORD, ["posts:read"])
    pair: Any = service.login("alice", PASSWORD)  # issued to the default client
    service.revoke(pair.access_token, client_id="web")
    service.revoke(pair.refresh_token, client_id="web")
    assert service.validate(pair.access_token).subject == "alice"
    service.revoke(pair.access_token, client_id=USER_CLIENT_ID)
    with pytest.raises(TokenRejected):
        service.validate(pair.access_token)


def test_workers_on_one_data_dir_share_the_login_throttle(
    open_service: Callable[..., AuthService],
) -> None:
    """--workers N: failures in one process count in the others (and survive a restart)."""
    from auth_rpc.errors import Throttled

    first = open_service()
    first.add_user("alice", PASSWORD, ["posts:read"])
    second = open_service()  # another worker on the same data dir
    for service in (first, second, first, second, first):
        with pytest.raises(InvalidCredentials):
            service.login("alice", "wrong password")
    for service in (first, second):
        with pytest.raises(Throttled):
            service.login("alice", PASSWORD)
    restarted = open_service()
    with pytest.raises(Throttled):
        restarted.login("alice", PASSWORD)
    # Unknown names are throttled the same way, across processes too.
    for service in (first, second, first, second, first):
        with pytest.raises(InvalidCredentials):
            service.login("nobody", "wrong password")
    with pytest.raises(Throttled):
        second.login("nobody", "wrong password")


def test_a_success_in_one_worker_ends_the_streak_in_the_others(
    open_service: Callable[..., AuthService],
) -> None:
    first = open_service()
    first.add_user("alice", PASSWORD, ["posts:read"])
    second = open_service()
    for _ in range(4):
        with pytest.raises(InvalidCredentials):
            first.login("alice", "wrong password")
    second.login("alice", PASSWORD)
    for _ in range(4):  # a fresh streak: four more failures are not yet throttled
        with pytest.raises(InvalidCredentials):
            first.login("alice", "wrong password")
