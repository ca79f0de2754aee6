"""Concurrency: one refresh token presented by 10 clients at once.

Ten threads, each with its own Thrift connection, are released together by a
``threading.Barrier`` and all call ``Auth.refresh`` with the same refresh
token. Exactly one may succeed (rotation is one transaction); the other nine
get ``Unauthenticated``. Because those nine present a token that is already
used, RFC 9700 section 4.14.2 reuse detection revokes the whole family: the
winner's new refresh token and new access token are refused afterwards too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest

from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.transport import open_client

PASSWORD = "a password long enough"
CLIENTS = 10
ROUNDS = 5


def race(port: int, refresh_token: str) -> list[tuple[str, Any]]:
    """Ten simultaneous refreshes; the outcome of each: ("ok", pair) or (error name, exc)."""
    clients = [open_client(auth_thrift.Auth, "127.0.0.1", port) for _ in range(CLIENTS)]
    barrier = threading.Barrier(CLIENTS)
    results: list[tuple[str, Any]] = [("not run", None)] * CLIENTS

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = ("ok", clients[i].refresh(refresh_token))
        except Exception as exc:  # recorded and asserted on by the test
            results[i] = (type(exc).__name__, exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"refresh-{i}")
               for i in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        for c in clients:
            c.close()
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_ten_concurrent_refreshes_one_success_then_family_revoked(
    auth_server: Any, make_user: Callable[..., None], round_no: int
) -> None:
    make_user("alice", PASSWORD)
    with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", auth_server.port)) as c:
        pair = c.login("alice", PASSWORD)
        results = race(auth_server.port, pair.refresh_token)
        kinds = sorted(kind for kind, _ in results)
        winners = [value for kind, value in results if kind == "ok"]
        print(f"\n[refresh-race] round {round_no}: {len(winners)} success, "
              f"{kinds.count('Unauthenticated')} Unauthenticated, others "
              f"{[k for k in kinds if k not in ('ok', 'Unauthenticated')]}")
        assert len(winners) == 1, kinds
        assert kinds.count("Unauthenticated") == CLIENTS - 1, kinds
        new = winners[0]
        assert new.refresh_token and new.refresh_token != pair.refresh_token
        # The losers presented a used token: the family is revoked, winner included.
        with pytest.raises(common_thrift.Unauthenticated):
            c.refresh(new.refresh_token)
        with pytest.raises(common_thrift.Unauthenticated):
            c.validate(new.access_token)
        with pytest.raises(common_thrift.Unauthenticated):
            c.validate(pair.access_token)
        with pytest.raises(common_thrift.Unauthenticated):
            c.refresh(pair.refresh_token)
        # Other sessions of the same user are not affected.
        other = c.login("alice", PASSWORD)
        assert c.validate(other.access_token).subject == "alice"
        assert c.refresh(other.refresh_token).access_token
