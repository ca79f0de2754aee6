"""One Auth service, two services: a token for ``notes`` is not a token for ``posts``.

In each verification mode, against a real Auth service in-process (Thrift and
HTTP on 127.0.0.1, ephemeral ports): tokens are obtained as a program would
(``Auth.login`` with its ``audience``, ``/token`` with ``resource``), and
verifiers built by the plugin's ``make_verifier`` for each audience
accept their own and refuse the other's; the Posts service (audience
``posts``) refuses a ``notes`` token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import requests

from auth_rpc.errors import TokenRejected
from auth_rpc.idl import auth_thrift, common_thrift, posts_thrift
from auth_rpc.serving.transport import open_client
from auth_rpc.testing import TokenFactory
from auth_rpc.verify import TokenVerifier

MODES = ["local", "jwks", "introspect", "thrift"]
POSTS, NOTES = "posts", "notes"
PASSWORD = "a password long enough"
TIMEOUT = 10


@pytest.fixture
def auth(auth_server: Any) -> Any:
    """The Auth server (default audience posts) with a user and a client of both services."""
    service = auth_server.service
    service.add_user("nina", PASSWORD, "posts:read notes:read", audiences=[POSTS, NOTES])
    auth_server.notes_secret = service.add_client("notes-svc", "notes:read", audiences=[NOTES])
    auth_server.introspect_secret = service.add_client("rs", (), audiences=[POSTS], introspect=True)
    return auth_server


@pytest.fixture
def verifiers(
    auth: Any, make_verifier: Callable[..., TokenVerifier]
) -> Callable[[str, str], TokenVerifier]:
    """``verifier(mode, audience)``: the plugin's verifier of ``auth``'s tokens for
    ``audience``, without a cache (introspecting as the client ``rs``)."""

    def build(mode: str, audience: str) -> TokenVerifier:
        return make_verifier(
            mode, audience=audience, cache_ttl_s=0, client_id="rs",
            client_secret=auth.introspect_secret,
        )

    return build


def login(auth: Any, audience: str | None = None) -> str:
    with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", auth.port)) as client:
        token: str = client.login("nina", PASSWORD, audience).access_token
    return token


def client_token(auth: Any, resource: str) -> str:
    r = requests.post(
        auth.http_url + "/token",
        data={"grant_type": "client_credentials", "resource": resource},
        auth=("notes-svc", auth.notes_secret),
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as exc:
        verifier.verify(token)
    return exc.value.message


@pytest.mark.parametrize("mode", MODES)
def test_each_audience_is_accepted_only_by_its_own_service(
    mode: str, auth: Any, verifiers: Callable[[str, str], TokenVerifier]
) -> None:
    for_posts, for_notes = verifiers(mode, POSTS), verifiers(mode, NOTES)
    tokens = {
        POSTS: [login(auth), login(auth, POSTS)],
        NOTES: [login(auth, NOTES), client_token(auth, NOTES)],
    }
    for token in tokens[NOTES]:
        assert jwt.decode(token, options={"verify_signature": False})["aud"] == NOTES
        assert for_notes.verify(token).audience == (NOTES,)
        assert refused(for_posts, token) == "wrong audience"
    for token in tokens[POSTS]:
        assert for_posts.verify(token).audience == (POSTS,)
        assert refused(for_notes, token) == "wrong audience"


@pytest.mark.parametrize("mode", ["introspect", "thrift"])
def test_a_token_of_an_audience_no_account_may_use_is_refused_by_the_auth_service(
    mode: str, auth: Any, verifiers: Callable[[str, str], TokenVerifier]
) -> None:
    """Signed with the Auth service's own key, but for "wiki": Auth does not vouch for it."""
    factory = TokenFactory.for_auth_server(auth)
    wiki = factory.mint("nina", "wiki:read", audience="wiki")
    expected = "token not active" if mode == "introspect" else "wrong audience"
    assert refused(verifiers(mode, "wiki"), wiki) == expected
    # Once an account may use "wiki", Auth knows the audience and vouches for its tokens.
    auth.service.add_client("wiki-svc", "wiki:read", audiences=["wiki"])
    assert verifiers(mode, "wiki").verify(wiki).audience == ("wiki",)
    assert refused(verifiers(mode, POSTS), wiki) == "wrong audience"


@pytest.mark.parametrize("mode", MODES)
def test_posts_refuses_a_notes_token(mode: str, auth: Any, make_posts_server: Any) -> None:
    server = make_posts_server(mode, cache_ttl_s=0)
    notes, posts = login(auth, NOTES), login(auth)
    with contextlib.closing(open_client(posts_thrift.Posts, "127.0.0.1", server.port)) as client:
        with pytest.raises(common_thrift.Unauthenticated):
            client.list_posts(notes, 0, 0)
        assert client.list_posts(posts, 0, 0).posts == []
