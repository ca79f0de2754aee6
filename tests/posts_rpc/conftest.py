"""Fixtures for the Posts service tests: a real verifier, tokens minted here, a server on port 0.

Tokens are RFC 9068 access tokens minted with ``jwt.encode`` (header ``typ``
``at+jwt`` and ``kid``; claims ``iss``, ``sub``, ``aud``, ``exp``, ``iat``,
``jti``, ``scope``, ``client_id``) and checked by a real
:class:`auth_rpc.verify.verifiers.LocalVerifier` holding the same HS256 secret.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from auth_rpc.idl import posts_thrift
from auth_rpc.serving.transport import open_client
from auth_rpc.verify.verifiers import LocalVerifier
from posts_rpc.server import PostsServer

ISSUER = "https://auth.posts.test"
AUDIENCE = "posts"
READ_WRITE = "posts:read posts:write"


class Clock:
    """A settable clock (unix seconds) for the store's timestamps."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def issuer_audience() -> tuple[str, str]:
    """The issuer and audience the fixtures' tokens and verifier use."""
    return ISSUER, AUDIENCE


@pytest.fixture
def hs256_secret() -> bytes:
    # Printable: a secret file loses a trailing newline, which random bytes may end with.
    return secrets.token_urlsafe(32).encode("ascii")


@pytest.fixture
def mint(hs256_secret: bytes) -> Callable[..., str]:
    """``mint(sub="alice", scope=READ_WRITE, *, ttl_s=300, age_s=0, key=..., alg=..., **claims)``.

    ``age_s`` moves ``iat`` (and so ``exp``) into the past; ``claims`` override
    or (with value ``None``) remove claims; ``headers`` override the header.
    """

    def _mint(
        sub: str = "alice",
        scope: str = READ_WRITE,
        *,
        ttl_s: int = 300,
        age_s: int = 0,
        key: Any = None,
        alg: str = "HS256",
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        iat = int(time.time()) - age_s
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "sub": sub,
            "aud": AUDIENCE,
            "exp": iat + ttl_s,
            "iat": iat,
            "jti": uuid.uuid4().hex,
            "scope": scope,
            "client_id": "posts-tests",
        }
        for name, value in claims.items():
            if value is None:
                payload.pop(name, None)
            else:
                payload[name] = value
        header = {"typ": "at+jwt", "kid": "test-key"}
        header.update(headers or {})
        return jwt.encode(
            payload, hs256_secret if key is None else key, algorithm=alg, headers=header
        )

    return _mint


@pytest.fixture
def verifier(hs256_secret: bytes) -> Iterator[LocalVerifier]:
    # Tokens minted here carry no Token Status List entry.
    v = LocalVerifier(
        hs256_secret=hs256_secret, issuer=ISSUER, audience=AUDIENCE, status_list="off"
    )
    yield v
    v.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def posts_server(tmp_path: Path, verifier: LocalVerifier, clock: Clock) -> Iterator[PostsServer]:
    server = PostsServer(data_dir=tmp_path / "posts", verifier=verifier, clock=clock).start()
    yield server
    server.stop(grace_s=5)


@pytest.fixture
def connect(posts_server: PostsServer) -> Iterator[Callable[[], Any]]:
    """Open a client of ``posts_server`` (closed at teardown)."""
    clients: list[Any] = []

    def _connect() -> Any:
        client = open_client(posts_thrift.Posts, "127.0.0.1", posts_server.port, timeout_s=10)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()


@pytest.fixture
def client(connect: Callable[[], Any]) -> Any:
    """A client of ``posts_server``."""
    return connect()
