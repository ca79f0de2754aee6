"""The session against real in-process Auth and Posts services."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from auth_rpc.idl import common_thrift, posts_thrift
from client import (
    ConnectionLost,
    NotFound,
    Session,
    TransportError,
    Unauthenticated,
    connect_posts,
)


@pytest.fixture
def login(auth_server: Any, user: Any) -> Iterator[Callable[..., Session]]:
    """``login()``: a session of ``user``; its clients are closed at teardown."""
    sessions: list[Session] = []

    def make(**options: Any) -> Session:
        session = Session.login(
            f"127.0.0.1:{auth_server.port}", user.name, user.password, **options
        )
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


def test_posts_methods_without_the_token(login: Any, user: Any, posts_srv: Any) -> None:
    session = login()
    with session.posts(f"127.0.0.1:{posts_srv.port}") as posts:
        first = posts.create_post(title="Hello", body="first post")
        second = posts.create_post("Second", "positional arguments")
        assert isinstance(first, posts_thrift.Post)
        assert first.author == user.name

        page = posts.list_posts()  # limit 0 and before_id 0: the defaults
        assert [p.id for p in page.posts] == [second.id, first.id]
        assert page.next_before_id == 0
        one = posts.list_posts(limit=1)
        assert [p.id for p in one.posts] == [second.id]
        assert one.next_before_id == second.id
        assert [p.id for p in posts.list_posts(1, one.next_before_id).posts] == [first.id]

        assert posts.get_post(first.id).body == "first post"
        updated = posts.update_post(post_id=first.id, title="Hello again", body="edited")
        assert updated.title == "Hello again"
        posts.delete_post(first.id)
        with pytest.raises(NotFound) as caught:
            posts.get_post(post_id=first.id)
        assert type(caught.value) is common_thrift.NotFound  # the IDL's class, unchanged
        with pytest.raises(common_thrift.InvalidArgument):
            posts.create_post(title="   ", body="")
        with pytest.raises(TypeError):
            posts.get_post(1, 2)
        assert posts.connections_opened == 1  # one pooled connection served them all


def test_thin_posts_connection_takes_the_token_explicitly(
    login: Any, posts_srv: Any
) -> None:
    token = login().access_token()
    with connect_posts(port=posts_srv.port) as posts:
        created = posts.create_post(token, title="t", body="b")
        assert posts.get_post(token, created.id).id == created.id
        with pytest.raises(Unauthenticated):
            posts.list_posts("not a token")


def test_unauthenticated_renews_once_and_the_retry_succeeds(
    login: Any, posts_srv: Any, auth_calls: Any
) -> None:
    session = login()
    posts = session.posts(f"127.0.0.1:{posts_srv.port}")
    posts.create_post(title="before", body="")
    revoked = session.tokens.access_token
    session.validate()  # warm: no refresh needed
    auth_calls_before = auth_calls.count("refresh")

    session_auth = session.auth
    from client import connect_auth

    with connect_auth(session_auth.host, session_auth.port) as auth:
        auth.revoke(revoked)

    page = posts.list_posts()
    assert [p.title for p in page.posts] == ["before"]
    assert posts_srv.calls.calls("list_posts") == [
        ("list_posts", "Unauthenticated"),
        ("list_posts", "ok"),
    ]
    assert auth_calls.count("refresh") == auth_calls_before + 1
    assert session.tokens.access_token != revoked


def test_a_retry_refused_again_raises_and_there_is_no_loop(
    login: Any, make_posts: Any, auth_calls: Any
) -> None:
    # This Posts server expects another audience: it refuses every token.
    strict = make_posts(audience="some-other-service")
    session = login()
    posts = session.posts(f"127.0.0.1:{strict.port}")
    with pytest.raises(Unauthenticated):
        posts.list_posts()
    assert strict.calls.calls("list_posts") == [
        ("list_posts", "Unauthenticated"),
        ("list_posts", "Unauthenticated"),
    ]
    assert auth_calls.count("refresh") == 1
    with pytest.raises(Unauthenticated):  # writes: the same, one retry only
        posts.create_post(title="x", body="y")
    assert strict.calls.count("create_post") == 2
    assert auth_calls.count("refresh") == 2


def test_reconnects_after_a_server_restart_on_the_same_port(
    login: Any, make_posts: Any, tmp_path: Any
) -> None:
    data_dir = tmp_path / "posts"
    server = make_posts(data_dir=data_dir)
    port = server.port
    session = login()
    posts = session.posts(f"127.0.0.1:{port}")
    posts.create_post(title="one", body="")
    assert posts.connections_opened == 1

    server.stop()
    with pytest.raises(TransportError, match="cannot connect"):
        posts.list_posts()

    restarted = make_posts(data_dir=data_dir, port=port)
    assert restarted.port == port
    # A write goes out on a new connection: the dead pooled one is noticed
    # before use, so nothing is sent into it.
    posts.create_post(title="two", body="")
    assert [p.title for p in posts.list_posts().posts] == ["two", "one"]
    assert posts.connections_opened == 2
    assert restarted.calls.count("create_post") == 1


def test_a_stale_pooled_connection_is_not_used_for_a_write(
    login: Any, make_posts: Any, tmp_path: Any
) -> None:
    data_dir = tmp_path / "posts"
    server = make_posts(data_dir=data_dir)
    port = server.port
    posts = login().posts(f"127.0.0.1:{port}")
    posts.list_posts()
    server.stop()  # closes the idle pooled connection from the server side
    make_posts(data_dir=data_dir, port=port)
    created = posts.create_post(title="after restart", body="")
    assert posts.get_post(created.id).title == "after restart"


def test_a_read_whose_reply_was_lost_is_retried_once(
    login: Any, posts_srv: Any, drop_reply_proxy: Any
) -> None:
    proxy = drop_reply_proxy(posts_srv.port, drops=1)
    posts = login().posts(f"127.0.0.1:{proxy.port}")
    assert posts.list_posts().posts == []
    assert posts_srv.calls.count("list_posts") == 2
    assert posts.connections_opened == 2


def test_a_read_lost_twice_raises(
    login: Any, posts_srv: Any, drop_reply_proxy: Any
) -> None:
    proxy = drop_reply_proxy(posts_srv.port, drops=5)
    posts = login().posts(f"127.0.0.1:{proxy.port}")
    with pytest.raises(TransportError) as caught:
        posts.get_post(1)
    assert not isinstance(caught.value, ConnectionLost)
    assert posts_srv.calls.count("get_post") == 2  # once, and one retry


def test_a_write_whose_reply_was_lost_is_not_repeated(
    login: Any, posts_srv: Any, drop_reply_proxy: Any
) -> None:
    proxy = drop_reply_proxy(posts_srv.port, drops=1)
    posts = login().posts(f"127.0.0.1:{proxy.port}")
    with pytest.raises(ConnectionLost, match="may or may not"):
        posts.create_post(title="maybe", body="")
    assert posts_srv.calls.count("create_post") == 1  # at most once
    # The server did it; the caller can look.
    assert [p.title for p in posts.list_posts().posts] == ["maybe"]


def test_one_session_shared_by_eight_threads(
    login: Any, posts_srv: Any, auth_calls: Any
) -> None:
    session = login()
    posts = session.posts(f"127.0.0.1:{posts_srv.port}", max_connections=4)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    created: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            barrier.wait(timeout=10)
            for i in range(10):
                post = posts.create_post(title=f"t{n}-{i}", body="")
                assert posts.get_post(post.id).title == f"t{n}-{i}"
                posts.list_posts(limit=5)
                with lock:
                    created.append(post.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(set(created)) == 80
    assert 1 <= posts.connections_opened <= 4
    assert posts_srv.calls.count("create_post") == 80
    assert auth_calls.count("refresh") == 0
    posts.close()
    session.close()


def test_framed_transport_end_to_end(
    make_auth_server: Any, make_posts_server: Any, make_user: Any
) -> None:
    from client import Endpoint

    auth = make_auth_server(framed=True)
    make_user("frank", "frank's password", service=auth.service)
    posts_server = make_posts_server("jwks", auth=auth, framed=True)
    session = Session.login(
        Endpoint("127.0.0.1", auth.port, framed=True), "frank", "frank's password"
    )
    with session, session.posts(Endpoint("127.0.0.1", posts_server.port, framed=True)) as posts:
        created = posts.create_post(title="framed", body="")
        assert posts.get_post(created.id).title == "framed"
        assert session.validate().subject == "frank"


def test_unavailable_comes_through_unchanged(
    login: Any, auth_server: Any, posts_srv: Any
) -> None:
    session = login()
    with session.posts(f"127.0.0.1:{posts_srv.port}") as posts:
        posts.list_posts()
        auth_server.stop()  # the Posts server can no longer ask about tokens
        with pytest.raises(common_thrift.Unavailable):
            posts.list_posts()
        assert posts_srv.calls.count("list_posts") == 2  # refused, not retried
