"""pytest plugin, Posts side: the Posts example service in-process, trusting ``auth_server``.

Loaded automatically (its own ``pytest11`` entry point) once the package is
installed, next to :mod:`auth_rpc.testing`, whose fixtures these build on:
the Posts service checks ``auth_server``'s tokens with a verifier from the
``make_verifier`` fixture (so a Posts server follows an overridden
``auth_server``: its issuer, audience and keys). Servers start on free ports
with a temporary data directory and are stopped at teardown, then their
verifiers closed.

Fixtures:

``make_posts_server``
    ``make_posts_server(mode="jwks", *, auth=None, data_dir=None, database_url=None,
    framed=False, settings=None, port=0, metrics=False, **verifier_settings)``: ``mode`` is one of
    :data:`auth_rpc.testing.VERIFIER_MODES`; ``verifier_settings`` go to
    ``make_verifier`` (``cache_ttl_s=0``, ``audience=...``, ``timeout_s=...``,
    ``clock=...``); in ``introspect`` mode the service client is
    ``posts-service`` unless ``client_id=`` says otherwise. With
    ``metrics=True`` the server counts (``server.metrics.render()`` is the
    exposition ``posts-rpc serve --metrics-port`` serves).
``posts_server``
    A started Posts service verifying ``auth_server``'s tokens in ``jwks`` mode.

Tokens for it: ``token_factory.mint("alice", POSTS_SCOPES)`` (the factory
gives no scopes unless asked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from posts_rpc.guard import SCOPE_READ, SCOPE_WRITE

if TYPE_CHECKING:
    from auth_rpc.auth.server import AuthServer
    from auth_rpc.serving.rpc import ServerSettings
    from auth_rpc.verify.principal import TokenVerifier
    from posts_rpc.server import PostsServer

__all__ = ["POSTS_INTROSPECT_CLIENT_ID", "POSTS_SCOPES"]

#: A Posts user's scopes: read and write (``posts:admin`` moderates).
POSTS_SCOPES = (SCOPE_READ, SCOPE_WRITE)

#: The service client a Posts server introspects as (``make_posts_server("introspect")``).
POSTS_INTROSPECT_CLIENT_ID = "posts-service"


@pytest.fixture
def make_posts_server(
    make_verifier: Callable[..., TokenVerifier], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., PostsServer]]:
    """Start Posts servers checking ``auth_server``'s (or ``auth=``'s) tokens.

    ``make_posts_server(mode="jwks", *, auth=None, data_dir=None, database_url=None,
    framed=False, settings=None, port=0, metrics=False, **verifier_settings)`` (``database_url``:
    the posts in that PostgreSQL database, e.g. ``postgresql_url``'s, instead of a
    fresh data directory); the verifier comes from
    ``make_verifier(mode, auth=auth, **verifier_settings)`` and is closed at
    teardown after the server has stopped.
    """
    from auth_rpc.serving.metrics import ServiceMetrics
    from auth_rpc.serving.rpc import ServerSettings
    from posts_rpc.server import PostsServer

    started: list[PostsServer] = []

    def make(
        mode: str = "jwks",
        *,
        auth: AuthServer | None = None,
        data_dir: Path | None = None,
        database_url: str | None = None,
        framed: bool = False,
        settings: ServerSettings | None = None,
        port: int = 0,
        metrics: bool = False,
        **verifier_settings: Any,
    ) -> PostsServer:
        verifier_settings.setdefault("client_id", POSTS_INTROSPECT_CLIENT_ID)
        verifier = make_verifier(mode, auth=auth, **verifier_settings)
        server = PostsServer(
            verifier=verifier,
            data_dir=None if database_url else data_dir or tmp_path_factory.mktemp("posts-data"),
            database_url=database_url,
            port=port,
            settings=settings or ServerSettings(framed=framed),
            metrics=ServiceMetrics() if metrics else None,
        ).start()
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.stop(grace_s=2.0)


@pytest.fixture
def posts_server(make_posts_server: Callable[..., PostsServer]) -> PostsServer:
    """A started Posts service verifying ``auth_server``'s tokens in ``jwks`` mode."""
    return make_posts_server("jwks")
