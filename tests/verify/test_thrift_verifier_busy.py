"""ThriftVerifier and a full Auth listener: a pooled connection closed to make room.

A listener at its connection cap closes its longest-idle connection for a
newcomer and tells it "server busy". The verifier's next call on that pooled
connection reads that answer: it must retry on a fresh connection (validate
is safe to repeat), not fail the caller with DependencyUnavailable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from thriftpy2.thrift import TApplicationException

from auth_rpc.idl import auth_thrift
from auth_rpc.serving.rpc import RpcServer, is_server_busy
from auth_rpc.serving.transport import open_client
from auth_rpc.verify.verifiers import ThriftVerifier


class AuthStub:
    def __init__(self) -> None:
        self.calls = 0

    def validate(self, token: str) -> Any:
        self.calls += 1
        return auth_thrift.Principal(
            subject="alice", scopes=["posts:read"], expires_at=int(time.time()) + 900,
            token_id=f"jti-{token}", client_id="cli", issuer="https://issuer.test",
            audience="posts",
        )  # fmt: skip


def test_pooled_connection_evicted_while_idle_is_retried_on_a_fresh_one(
    serve_thrift: Callable[..., RpcServer],
) -> None:
    stub = AuthStub()
    server = serve_thrift(auth_thrift.Auth, stub, max_connections=1)
    verifier = ThriftVerifier(
        host="127.0.0.1", port=server.port, issuer="https://issuer.test", audience="posts",
        timeout_s=2.0,
    )  # fmt: skip
    newcomer = None
    try:
        assert verifier.verify("one").subject == "alice"  # its connection now idles in the pool
        # Served: the pooled one, idle, made room. Right after its reply the pooled
        # connection is still "in a call" for a moment (seen with both cores busy), and
        # then the newcomer is refused as not sent: try again, as a client would.
        deadline = time.monotonic() + 5
        while True:
            newcomer = open_client(auth_thrift.Auth, "127.0.0.1", server.port)
            try:
                principal = newcomer.validate("new")
                break
            except TApplicationException as exc:
                newcomer.close()
                newcomer = None
                assert is_server_busy(exc) and time.monotonic() < deadline, exc
                time.sleep(0.005)
        assert principal.token_id == "jti-new"
        deadline = time.monotonic() + 5
        while server.connection_count != 1 and time.monotonic() < deadline:
            time.sleep(0.005)  # the pooled connection's thread is ending
        assert server.connection_count == 1
        # Free the slot, so that the retry's fresh connection is served whatever the
        # newcomer's thread is doing (with both cores busy, it was not yet idle, hence
        # not evictable, when the retry arrived: "server busy" twice).
        newcomer.close()
        newcomer = None
        deadline = time.monotonic() + 5
        while server.connection_count != 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        # The pooled connection holds the "server busy" answer: retried on a fresh one.
        assert verifier.verify("two").token_id == "jti-two"
        assert stub.calls == 3
        assert verifier.pool.opened == 2
    finally:
        verifier.close()
        if newcomer is not None:
            newcomer.close()
