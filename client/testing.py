"""pytest plugin, client side: logged-in :class:`client.Session` objects.

Loaded automatically (its own ``pytest11`` entry point) once the package is
installed, next to :mod:`auth_rpc.testing` (``auth_server``) and
:mod:`posts_rpc.testing` (``posts_server``), whose fixtures these use by name.

Fixtures:

``make_session``
    ``make_session(username="alice", scopes=POSTS_SCOPES, *, password=None,
    **options)``: creates the user in ``auth_server`` (with a random password
    when none is given) and returns a :class:`client.Session` logged in to it;
    ``session.client(service, "host:port")`` calls any Thrift service with
    the token attached. Sessions are logged out and closed at teardown.
``posts_session``
    A Posts client of ``posts_server`` logged in as ``alice`` (read and
    write): ``posts_session.list_posts(limit=10)``.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from auth_rpc.auth.server import AuthServer
    from client.session import Session, TokenClient

__all__ = ["POSTS_SCOPES"]

#: The scopes ``make_session`` grants unless told: those of a Posts user.
POSTS_SCOPES = ("posts:read", "posts:write")


@pytest.fixture
def make_session(auth_server: AuthServer) -> Iterator[Callable[..., Session]]:
    """``make_session(username="alice", scopes=None, password=None)``: a logged-in Session.

    The user is created in ``auth_server`` first (with a random password when
    none is given), with ``scopes``, or without them :data:`POSTS_SCOPES` where
    the Auth service's default audience is ``posts`` (the example service) and
    no scope otherwise. Sessions are logged out at teardown.
    """
    from auth_rpc.testing import default_scopes
    from client.session import Session

    sessions: list[Session] = []

    def make(
        username: str = "alice",
        scopes: Iterable[str] | str | None = None,
        *,
        password: str | None = None,
        **options: Any,
    ) -> Session:
        password = password or secrets.token_urlsafe(16)
        if scopes is None:
            scopes = default_scopes(auth_server.service)
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
def posts_session(make_session: Callable[..., Session], posts_server: Any) -> TokenClient:
    """A Posts client of ``posts_server`` logged in as ``alice`` (read and write).

    Call the Posts methods without the token: ``posts_session.list_posts(limit=10)``.
    """
    return make_session("alice").posts(f"127.0.0.1:{posts_server.port}")
