"""Fixtures of the adversarial suites: an attacker's web server that counts its visitors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from _http_stub import QuietHandler, StubServer


@dataclass
class AttackerSite:
    """An HTTP server an attacker controls; it counts every request that reaches it."""

    url: str
    key: Any  # the attacker's SigningKey (private), for signing forged tokens
    jwks: dict[str, Any]
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def attacker_site() -> Iterator[AttackerSite]:
    """A counting web server on 127.0.0.1 (port 0) serving an attacker's JWK Set and PEM."""
    from auth_rpc.auth.keys import SigningKey

    key = SigningKey.generate("EdDSA", kid="attacker-key")
    jwks = {"keys": [key.public_jwk()]}
    body = json.dumps(jwks).encode()
    pem = key.public_pem()
    seen: list[str] = []
    lock = threading.Lock()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            with lock:
                seen.append(self.path)
            self.reply(200, pem if self.path.endswith(".pem") else body, content_type=None)

        do_POST = do_GET

    with StubServer(Handler) as http:
        yield AttackerSite(url=http.url, key=key, jwks=jwks, requests=seen)


class FakeClock:
    """A clock the test moves by hand (throttle windows, token lifetimes)."""

    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ClockedAuth:
    """An Auth server whose service runs on a :class:`FakeClock`."""

    server: Any
    service: Any
    clock: FakeClock

    @property
    def port(self) -> int:
        port: int = self.server.port
        return port


@pytest.fixture
def clocked_auth(tmp_path: Any) -> Iterator[ClockedAuth]:
    """A started Auth server (Thrift and HTTP on free ports) with an injected clock."""
    from auth_rpc.auth.server import AuthServer
    from auth_rpc.auth.service import AuthService, AuthSettings
    from auth_rpc.testing import AUDIENCE, ISSUER

    clock = FakeClock()
    settings = AuthSettings(data_dir=tmp_path / "auth", issuer=ISSUER, audience=AUDIENCE)
    service = AuthService.open(settings, clock=clock)
    try:
        server = AuthServer(service, port=0, http_port=0).start()
    except BaseException:
        service.close()
        raise
    try:
        yield ClockedAuth(server=server, service=service, clock=clock)
    finally:
        server.stop(grace_s=2.0)
        service.close()
