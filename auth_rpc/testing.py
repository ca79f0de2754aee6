"""pytest plugin: in-process Auth and Posts servers and a token factory.

Loaded automatically (``pytest11`` entry point) once the package is installed;
every fixture is function-scoped and starts its servers on free ports
(``port=0``) in background threads with a temporary data directory, waits for
them without sleeping (the listening socket is bound before ``start()``
returns), and stops and joins them at teardown.

Fixtures:

``auth_server``
    A started :class:`auth_rpc.auth.server.AuthServer` (EdDSA, issuer
    :data:`ISSUER`, audience :data:`AUDIENCE`); ``.service``, ``.port``,
    ``.http_url``, ``.jwks_url``, ``.introspect_url``.
``make_auth_server``
    ``make_auth_server(alg=..., framed=..., access_ttl_s=..., settings=...)``
    for more, or differently configured, Auth servers.
``make_user`` / ``make_client``
    Create a user (``make_user(name, password, scopes=...)``) or a service
    client (``make_client(client_id, scopes=...) -> secret``) in
    ``auth_server`` (or ``service=``).
``auth_client``
    A thriftpy2 client of ``auth_server``.
``token_factory``
    A :class:`TokenFactory` that mints access tokens signed with
    ``auth_server``'s current key (or any other key) with chosen subject,
    scopes, lifetime, audience, issuer, headers and claims.
``serve_thrift``
    ``serve_thrift(service, handler, **settings)`` serves *your* Thrift
    service in-process and returns the started
    :class:`auth_rpc.serving.rpc.RpcServer`.
``posts_server`` / ``make_posts_server``
    The Posts service verifying tokens of ``auth_server`` (``jwks`` mode by
    default; ``make_posts_server(mode="local"|"jwks"|"introspect"|"thrift",
    cache_ttl_s=..., auth=...)``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from auth_rpc.auth.keys import SigningKey
    from auth_rpc.auth.server import AuthServer
    from auth_rpc.auth.service import AuthService
    from auth_rpc.serving.rpc import RpcServer

__all__ = ["AUDIENCE", "ISSUER", "TokenFactory"]

#: The issuer and audience of the fixtures' Auth service.
ISSUER = "http://auth.test"
AUDIENCE = "posts"

DEFAULT_SCOPES = ("posts:read", "posts:write")


@dataclass
class TokenFactory:
    """Mints RFC 9068 access tokens for tests.

    ``key`` defaults to the Auth service's current signing key, so tokens pass
    every verifier configured for that service; pass another
    :class:`auth_rpc.auth.keys.SigningKey` (``TokenFactory.new_key("RS256")``) to
    make tokens from a foreign issuer.
    """

    key: SigningKey
    issuer: str = ISSUER
    audience: str = AUDIENCE
    clock: Callable[[], float] = time.time
    minted: list[str] = field(default_factory=list, repr=False)

    @staticmethod
    def new_key(alg: str = "EdDSA", *, kid: str | None = None) -> SigningKey:
        from auth_rpc.auth.keys import SigningKey

        return SigningKey.generate(alg, kid=kid)

    @staticmethod
    def kid_of(token: str) -> str:
        """The ``kid`` header of ``token`` (unverified)."""
        import jwt

        kid: str = jwt.get_unverified_header(token)["kid"]
        return kid

    def mint(
        self,
        subject: str = "alice",
        scopes: Iterable[str] | str = DEFAULT_SCOPES,
        *,
        ttl_s: int = 300,
        key: SigningKey | None = None,
        issuer: str | None = None,
        audience: str | list[str] | None = None,
        client_id: str = "test-client",
        now: float | None = None,
        jti: str | None = None,
        headers: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A signed access token; ``claims={"exp": None}`` removes a claim.

        ``now`` shifts the issue time (``now=time.time() - 3600`` with
        ``ttl_s=60`` gives an expired token).
        """
        from auth_rpc.auth.tokens import mint_access_token

        token = mint_access_token(
            key or self.key,
            issuer=self.issuer if issuer is None else issuer,
            audience=self.audience if audience is None else audience,
            subject=subject,
            scopes=scopes,
            client_id=client_id,
            ttl_s=ttl_s,
            now=self.clock() if now is None else now,
            jti=jti,
            headers=headers,
            claims=claims,
        )
        self.minted.append(token)
        return token

    def expired(self, subject: str = "alice", scopes: Iterable[str] | str = DEFAULT_SCOPES) -> str:
        """A token that expired an hour ago (well past any leeway)."""
        return self.mint(subject, scopes, ttl_s=60, now=self.clock() - 3600)


def _auth_settings(data_dir: Path, **overrides: Any) -> Any:
    from auth_rpc.auth.service import AuthSettings

    settings = AuthSettings(data_dir=data_dir, issuer=ISSUER, audience=AUDIENCE)
    return replace(settings, **overrides)


@pytest.fixture
def make_auth_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., AuthServer]]:
    """Start Auth servers: ``make_auth_server(alg=..., framed=..., **auth_settings)``."""
    from auth_rpc.auth.server import AuthServer
    from auth_rpc.auth.service import AuthService
    from auth_rpc.serving.rpc import ServerSettings

    started: list[tuple[AuthServer, AuthService]] = []

    def make(
        *,
        data_dir: Path | None = None,
        framed: bool = False,
        settings: ServerSettings | None = None,
        port: int = 0,
        http_port: int = 0,
        **auth_settings: Any,
    ) -> AuthServer:
        directory = data_dir or tmp_path_factory.mktemp("auth-data")
        service = AuthService.open(_auth_settings(directory, **auth_settings))
        server_settings = settings or ServerSettings(framed=framed)
        server = AuthServer(
            service, port=port, http_port=http_port, settings=server_settings
        ).start()
        started.append((server, service))
        return server

    yield make
    for server, service in reversed(started):
        server.stop(grace_s=2.0)
        service.close()


@pytest.fixture
def auth_server(make_auth_server: Callable[..., AuthServer]) -> AuthServer:
    """A started Auth service (Thrift and HTTP) on free ports with a fresh data dir."""
    return make_auth_server()


@pytest.fixture
def make_user(auth_server: AuthServer) -> Callable[..., None]:
    """``make_user(name, password, scopes="posts:read posts:write", service=None)``."""

    def make(
        name: str,
        password: str,
        scopes: Iterable[str] | str = DEFAULT_SCOPES,
        *,
        service: AuthService | None = None,
    ) -> None:
        scope_list = scopes.split() if isinstance(scopes, str) else list(scopes)
        (service or auth_server.service).add_user(name, password, scope_list)

    return make


@pytest.fixture
def make_client(auth_server: AuthServer) -> Callable[..., str]:
    """``make_client(client_id, scopes="posts:read", service=None) -> secret``."""

    def make(
        client_id: str,
        scopes: Iterable[str] | str = ("posts:read",),
        *,
        service: AuthService | None = None,
    ) -> str:
        scope_list = scopes.split() if isinstance(scopes, str) else list(scopes)
        secret: str = (service or auth_server.service).add_client(client_id, scope_list)
        return secret

    return make


@pytest.fixture
def auth_client(auth_server: AuthServer) -> Iterator[Any]:
    """A thriftpy2 client of ``auth_server``'s Thrift port."""
    from auth_rpc.idl import auth_thrift
    from auth_rpc.serving.transport import open_client

    client = open_client(auth_thrift.Auth, "127.0.0.1", auth_server.port)
    yield client
    client.close()


@pytest.fixture
def token_factory(auth_server: AuthServer) -> TokenFactory:
    """Mints tokens signed with ``auth_server``'s current signing key."""
    return TokenFactory(key=auth_server.service.signing_key())


@pytest.fixture
def serve_thrift() -> Iterator[Callable[..., RpcServer]]:
    """``serve_thrift(service, handler, **ServerSettings fields)``: your service, in-process."""
    from auth_rpc.serving.rpc import RpcServer, ServerSettings

    started: list[RpcServer] = []

    def serve(service: Any, handler: object, **settings: Any) -> RpcServer:
        server = RpcServer(service, handler, settings=ServerSettings(**settings)).start()
        started.append(server)
        return server

    yield serve
    for server in reversed(started):
        server.stop(grace_s=2.0)


def _verifier_settings(mode: str, auth: AuthServer, **overrides: Any) -> dict[str, Any]:
    service = auth.service
    settings: dict[str, Any] = {"issuer": service.issuer, "audience": service.audience}
    if mode == "local":
        key = service.signing_key()
        if key.symmetric:
            settings.update(hs256_secret=key.private_key, algorithms=["HS256"])
        else:
            settings.update(public_key_pem=key.public_pem(), algorithms=[key.alg])
    elif mode == "jwks":
        settings["jwks_url"] = auth.jwks_url
    elif mode == "introspect":
        client_id = overrides.pop("client_id", "posts-service")
        settings.update(
            introspect_url=auth.introspect_url,
            client_id=client_id,
            client_secret=overrides.pop("client_secret", None)
            or service.add_client(client_id, ["introspect"]),
        )
    elif mode == "thrift":
        settings.update(host="127.0.0.1", port=auth.port)
    else:
        raise ValueError(f"unknown verification mode {mode!r}")
    settings.update(overrides)
    return settings


@pytest.fixture
def make_posts_server(
    auth_server: AuthServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Any]]:
    """Start Posts servers checking ``auth_server``'s tokens.

    ``make_posts_server(mode="jwks", auth=None, data_dir=None, framed=False,
    **verifier_settings)``: ``mode`` is ``local`` (the Auth service's current
    public key or HS256 secret), ``jwks``, ``introspect`` (a client
    ``posts-service`` is registered) or ``thrift``; ``verifier_settings`` go to
    the verifier (``cache_ttl_s=0``, ``timeout_s=...``). The server's
    ``.verifier`` is closed at teardown.
    """
    from auth_rpc.serving.rpc import ServerSettings
    from auth_rpc.verify.verifiers import make_verifier
    from posts_rpc.server import PostsServer

    started: list[Any] = []

    def make(
        mode: str = "jwks",
        *,
        auth: AuthServer | None = None,
        data_dir: Path | None = None,
        framed: bool = False,
        settings: ServerSettings | None = None,
        port: int = 0,
        **verifier_settings: Any,
    ) -> Any:
        verifier = make_verifier(
            mode, **_verifier_settings(mode, auth or auth_server, **verifier_settings)
        )
        try:
            server = PostsServer(
                verifier=verifier,
                data_dir=data_dir or tmp_path_factory.mktemp("posts-data"),
                port=port,
                settings=settings or ServerSettings(framed=framed),
            ).start()
        except BaseException:
            verifier.close()
            raise
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.stop(grace_s=2.0)
        server.verifier.close()


@pytest.fixture
def posts_server(make_posts_server: Callable[..., Any]) -> Any:
    """A started Posts service verifying ``auth_server``'s tokens in ``jwks`` mode."""
    return make_posts_server("jwks")


@pytest.fixture
def make_session(auth_server: AuthServer) -> Iterator[Callable[..., Any]]:
    """``make_session(username="alice", scopes=..., password=None)``: a logged-in Session.

    The user is created in ``auth_server`` first (with a random password when
    none is given). Sessions are logged out at teardown.
    """
    import secrets

    from client import Session

    sessions: list[Any] = []

    def make(
        username: str = "alice",
        scopes: Iterable[str] | str = DEFAULT_SCOPES,
        *,
        password: str | None = None,
        **options: Any,
    ) -> Any:
        password = password or secrets.token_urlsafe(16)
        scope_list = scopes.split() if isinstance(scopes, str) else list(scopes)
        auth_server.service.add_user(username, password, scope_list)
        session = Session.login(f"127.0.0.1:{auth_server.port}", username, password, **options)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        with contextlib.suppress(Exception):  # the test may have logged out or stopped Auth
            session.logout()
        session.close()


@pytest.fixture
def posts_session(make_session: Callable[..., Any], posts_server: Any) -> Any:
    """A Posts client of ``posts_server`` logged in as ``alice`` (read and write).

    Call the Posts methods without the token: ``posts_session.list_posts(limit=10)``.
    """
    return make_session("alice").posts(f"127.0.0.1:{posts_server.port}")
