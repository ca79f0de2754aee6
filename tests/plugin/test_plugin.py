"""The pytest plugin, used as a user of the package would: only its fixtures."""

from __future__ import annotations

from typing import Any

import pytest

from auth_rpc.idl import common_thrift, posts_thrift
from auth_rpc.testing import TokenFactory


def test_posts_session_calls_without_passing_the_token(posts_session: Any) -> None:
    created = posts_session.create_post(title="From the plugin", body="hello")
    assert posts_session.list_posts(limit=5).posts[0].id == created.id


def test_token_factory_tokens_pass_the_posts_server(
    token_factory: TokenFactory, posts_server: Any
) -> None:
    from client import connect_posts

    with connect_posts("127.0.0.1", posts_server.port) as posts:
        assert posts.list_posts(token_factory.mint("zoe", ["posts:read"]), 1, 0).posts == []
        with pytest.raises(common_thrift.PermissionDenied):
            posts.create_post(token_factory.mint("zoe", ["posts:read"]), "t", "b")
        with pytest.raises(common_thrift.Unauthenticated):
            posts.list_posts(token_factory.expired("zoe", ["posts:read"]), 1, 0)
        # A key the JWK Set never listed: refused, as Unavailable (retryable) while the
        # verifier's refetch cooldown lasts, as Unauthenticated once a fresh fetch lacks it.
        with pytest.raises((common_thrift.Unauthenticated, common_thrift.Unavailable)):
            foreign_key = TokenFactory.new_key("ES256")
            posts.list_posts(token_factory.mint("zoe", ["posts:read"], key=foreign_key), 1, 0)


def test_make_posts_server_on_a_shared_postgresql(
    token_factory: TokenFactory, make_posts_server: Any, postgresql_url: str
) -> None:
    import time

    from client import connect_posts

    one = make_posts_server("jwks", database_url=postgresql_url)
    two = make_posts_server("jwks", database_url=postgresql_url)
    token = token_factory.mint("zoe", ["posts:read", "posts:write"])
    with connect_posts("127.0.0.1", one.port) as p1, connect_posts("127.0.0.1", two.port) as p2:
        post = p1.create_post(token, "shared", "")
        assert p2.get_post(token, post.id) == post  # get_post is never cached
        deadline = time.monotonic() + 10  # a list page: once the notification arrived
        while [p.id for p in p2.list_posts(token, 5, 0).posts] != [post.id]:
            assert time.monotonic() < deadline
            time.sleep(0.005)


def test_serve_thrift_serves_your_own_service(serve_thrift: Any) -> None:
    """Users test their own Thrift services with the same hardened server."""
    from auth_rpc.serving.transport import open_client

    class Echo:
        def list_posts(self, token: str, limit: int, before_id: int) -> Any:
            return posts_thrift.PostPage(posts=[], next_before_id=limit)

    server = serve_thrift(posts_thrift.Posts, Echo())
    client = open_client(posts_thrift.Posts, "127.0.0.1", server.port)
    try:
        assert client.list_posts("t", 7, 0).next_before_id == 7
    finally:
        client.close()
