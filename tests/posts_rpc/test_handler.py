"""The Posts handler over real Thrift (RpcServer on port 0, open_client): fields, owners, pages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auth_rpc.idl import common_thrift, posts_thrift
from auth_rpc.serving.transport import open_client
from auth_rpc.verify.verifiers import LocalVerifier
from posts_rpc.server import PostsServer

Mint = Callable[..., str]

InvalidArgument = common_thrift.InvalidArgument
NotFound = common_thrift.NotFound
PermissionDenied = common_thrift.PermissionDenied


def _invalid(field: str, call: Callable[[], Any]) -> None:
    with pytest.raises(InvalidArgument) as info:
        call()
    assert info.value.message.startswith(f"{field}:"), info.value.message


# -- create / get -----------------------------------------------------------


def test_create_and_get(client: Any, mint: Mint, clock: Any) -> None:
    token = mint("alice")
    post = client.create_post(token, "  Hello, world  ", "first post\nwith lines")
    assert post.id > 0
    assert post.author == "alice"
    assert post.title == "Hello, world"  # trimmed
    assert post.body == "first post\nwith lines"
    assert post.created_at == post.updated_at == int(clock.now * 1000)
    assert client.get_post(mint("bob", "posts:read"), post.id) == post


def test_unicode_round_trip(client: Any, mint: Mint) -> None:
    title, body = "Grüße — 你好 🎉", "ünïcödé " * 100 + "𝄞"
    post = client.create_post(mint(), title, body)
    got = client.get_post(mint(), post.id)
    assert (got.title, got.body) == (title, body)


def test_get_missing_post_is_not_found(client: Any, mint: Mint) -> None:
    with pytest.raises(NotFound):
        client.get_post(mint(), 987654321)


@pytest.mark.parametrize(
    "title",
    [None, "", "   ", "\t\n ", "x" * 201, "a\nb", "a\x00b", "tab\there", "bell\x07",
     "c1\x85inside"],
)
def test_create_refuses_bad_titles(client: Any, mint: Mint, title: Any) -> None:
    _invalid("title", lambda: client.create_post(mint(), title, "body"))


def test_title_of_200_characters_after_trimming_is_accepted(client: Any, mint: Mint) -> None:
    title = "é" * 200
    post = client.create_post(mint(), f"   {title} \t", "")
    assert post.title == title


@pytest.mark.parametrize("body", [None, "a\x00b", "x" * 65_537, "é" * 32_768 + "a"])
def test_create_refuses_bad_bodies(client: Any, mint: Mint, body: Any) -> None:
    _invalid("body", lambda: client.create_post(mint(), "title", body))


@pytest.mark.parametrize("body", ["", "x" * 65_536, "é" * 32_768, "🎉" * 16_384, "tab\tnew\nline"])
def test_create_accepts_bodies_up_to_64_kib_of_utf8(client: Any, mint: Mint, body: str) -> None:
    post = client.create_post(mint(), "title", body)
    assert client.get_post(mint(), post.id).body == body


@pytest.mark.parametrize("post_id", [None, 0, -1, -(2**63)])
def test_refuses_bad_post_ids(client: Any, mint: Mint, post_id: Any) -> None:
    token = mint()
    _invalid("post_id", lambda: client.get_post(token, post_id))
    _invalid("post_id", lambda: client.update_post(token, post_id, "t", "b"))
    _invalid("post_id", lambda: client.delete_post(token, post_id))


def test_nothing_is_written_on_invalid_input(
    client: Any, mint: Mint, posts_server: PostsServer
) -> None:
    with pytest.raises(InvalidArgument):
        client.create_post(mint(), "ok", None)
    assert posts_server.store.list_page(10, 0) == []


# -- list ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "before_id", "field"),
    [(None, 0, "limit"), (-1, 0, "limit"), (101, 0, "limit"), (2**31 - 1, 0, "limit"),
     (10, None, "before_id"), (10, -1, "before_id")],
)
def test_list_refuses_bad_arguments(
    client: Any, mint: Mint, limit: Any, before_id: Any, field: str
) -> None:
    _invalid(field, lambda: client.list_posts(mint(), limit, before_id))


def _walk(client: Any, token: str, limit: int) -> tuple[list[int], list[int]]:
    """Every post id, page by page; and the page sizes."""
    ids: list[int] = []
    sizes: list[int] = []
    before = 0
    while True:
        page = client.list_posts(token, limit, before)
        ids.extend(p.id for p in page.posts)
        sizes.append(len(page.posts))
        if page.next_before_id == 0:
            return ids, sizes
        assert page.next_before_id == page.posts[-1].id
        before = page.next_before_id


@pytest.mark.parametrize(
    ("count", "limit", "sizes"),
    [(0, 5, [0]), (5, 5, [5]), (6, 5, [5, 1]), (10, 5, [5, 5]), (11, 0, [11]),
     (25, 0, [20, 5]), (40, 0, [20, 20]), (3, 100, [3]), (3, 1, [1, 1, 1])],
)
def test_pages_are_exact(
    client: Any, mint: Mint, posts_server: PostsServer, count: int, limit: int, sizes: list[int]
) -> None:
    created = [
        posts_server.store.create(author="alice", title=f"p{i}", body="").id
        for i in range(count)
    ]
    ids, got_sizes = _walk(client, mint("reader", "posts:read"), limit)
    assert ids == created[::-1]  # newest first, each once
    assert got_sizes == sizes  # no empty trailing page: next_before_id is exact


def test_list_returns_whole_posts(client: Any, mint: Mint) -> None:
    post = client.create_post(mint(), "whole", "body " * 300)
    page = client.list_posts(mint(), 0, 0)
    assert page.posts == [post]
    assert page.next_before_id == 0


def test_list_from_a_cursor_past_the_end(client: Any, mint: Mint) -> None:
    client.create_post(mint(), "one", "")
    page = client.list_posts(mint(), 10, 2**63 - 1)
    assert len(page.posts) == 1
    assert client.list_posts(mint(), 10, 1).posts == []


# -- update / delete: ownership ----------------------------------------------


def test_author_updates_own_post(client: Any, mint: Mint, clock: Any) -> None:
    post = client.create_post(mint("alice"), "v1", "one")
    clock.advance(1.5)
    updated = client.update_post(mint("alice", "posts:write"), post.id, " v2 ", "two")
    assert updated.id == post.id
    assert (updated.title, updated.body, updated.author) == ("v2", "two", "alice")
    assert updated.created_at == post.created_at
    assert updated.updated_at == post.created_at + 1500
    assert client.get_post(mint(), post.id) == updated


def test_author_deletes_own_post(client: Any, mint: Mint) -> None:
    post = client.create_post(mint("alice"), "bye", "")
    assert client.delete_post(mint("alice", "posts:write"), post.id) is None
    with pytest.raises(NotFound):
        client.get_post(mint(), post.id)
    with pytest.raises(NotFound):
        client.delete_post(mint("alice"), post.id)


def test_others_cannot_update_or_delete(client: Any, mint: Mint) -> None:
    post = client.create_post(mint("alice"), "mine", "body")
    bob = mint("bob", "posts:read posts:write")
    with pytest.raises(PermissionDenied):
        client.update_post(bob, post.id, "stolen", "x")
    with pytest.raises(PermissionDenied):
        client.delete_post(bob, post.id)
    assert client.get_post(mint(), post.id) == post


@pytest.mark.parametrize(
    "scope", ["posts:admin", "posts:admin posts:write", "posts:admin posts:read"]
)
def test_admin_updates_and_deletes_any_post(client: Any, mint: Mint, scope: str) -> None:
    post = client.create_post(mint("alice"), "mine", "body")
    admin = mint("root", scope)
    updated = client.update_post(admin, post.id, "moderated", "")
    assert (updated.title, updated.author) == ("moderated", "alice")  # the author stays
    client.delete_post(admin, post.id)
    with pytest.raises(NotFound):
        client.get_post(mint(), post.id)


def test_admin_only_token_can_change_its_own_posts(client: Any, mint: Mint) -> None:
    post = client.create_post(mint("root"), "mine", "")
    root = mint("root", "posts:admin")
    assert client.update_post(root, post.id, "still mine", "").title == "still mine"
    client.delete_post(root, post.id)


def test_missing_post_is_not_found_for_owner_and_stranger(client: Any, mint: Mint) -> None:
    for token in (mint("alice"), mint("admin", "posts:admin")):
        with pytest.raises(NotFound):
            client.update_post(token, 424242, "t", "b")
        with pytest.raises(NotFound):
            client.delete_post(token, 424242)


def test_update_validates_fields_before_looking_at_the_post(client: Any, mint: Mint) -> None:
    post = client.create_post(mint("alice"), "t", "b")
    bob = mint("bob")
    _invalid("title", lambda: client.update_post(bob, post.id, " ", "b"))
    _invalid("body", lambda: client.update_post(bob, post.id, "t", None))
    _invalid("title", lambda: client.update_post(mint("alice"), 424242, None, "b"))
    assert client.get_post(mint(), post.id) == post


# -- other key types, connection reuse ------------------------------------------


def test_ed25519_tokens(tmp_path: Any, mint: Mint, issuer_audience: tuple[str, str]) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    issuer, audience = issuer_audience
    verifier = LocalVerifier(
        public_key_pem=pem, issuer=issuer, audience=audience, status_list="off"
    )
    with PostsServer(data_dir=tmp_path, verifier=verifier) as server:
        client = open_client(posts_thrift.Posts, "127.0.0.1", server.port)
        try:
            token = mint("alice", key=key, alg="EdDSA")
            post = client.create_post(token, "signed", "with Ed25519")
            assert client.get_post(token, post.id) == post
            with pytest.raises(common_thrift.Unauthenticated):
                client.get_post(mint("alice"), post.id)  # HS256 token: wrong key and alg
        finally:
            client.close()
    verifier.close()


def test_many_calls_on_one_connection(client: Any, mint: Mint) -> None:
    token = mint()
    ids = [client.create_post(token, f"n{i}", "").id for i in range(50)]
    assert ids == sorted(ids)
    assert [p.id for p in client.list_posts(token, 100, 0).posts] == ids[::-1]


def test_unknown_token_type_is_not_accepted(client: Any, mint: Mint, hs256_secret: bytes) -> None:
    # An ID-token-looking JWT (typ JWT) signed with the right key is not an access token.
    token = mint(headers={"typ": "JWT"})
    with pytest.raises(common_thrift.Unauthenticated):
        client.get_post(token, 1)
    assert jwt.get_unverified_header(token)["typ"] == "JWT"
