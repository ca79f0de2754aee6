"""A reply encoded once (``Preencoded``) reaches the client exactly as the plain value would."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from auth_rpc.idl import posts_thrift
from auth_rpc.serving.rpc import Preencoded, RpcServer, ServerSettings
from auth_rpc.serving.transport import open_client

PAGE = posts_thrift.PostPage(
    posts=[
        posts_thrift.Post(
            id=i, author="alice", title=f"t{i}", body="é" * 300, created_at=1, updated_at=2
        )
        for i in range(20, 0, -1)
    ],
    next_before_id=1,
)


class Handler:
    def __init__(self) -> None:
        self.encoded = Preencoded(posts_thrift.Posts, "list_posts", PAGE)

    def list_posts(self, token: str, limit: int, before_id: int) -> Any:
        return self.encoded if token == "encoded" else PAGE

    def delete_post(self, token: str, post_id: int) -> None:
        return None


@pytest.mark.parametrize("framed", [False, True])
def test_preencoded_and_plain_replies_are_the_same(framed: bool) -> None:
    with RpcServer(posts_thrift.Posts, Handler(), settings=ServerSettings(framed=framed)) as server:
        client = open_client(posts_thrift.Posts, "127.0.0.1", server.port, framed=framed)
        with contextlib.closing(client):
            for _ in range(3):  # the same bytes, sent again and again, with each seqid
                assert client.list_posts("encoded", 20, 0) == PAGE
                assert client.list_posts("plain", 20, 0) == PAGE
            client.delete_post("t", 1)  # a void method is unaffected


def test_a_value_that_does_not_fit_fails_when_encoded() -> None:
    from thriftpy2.thrift import TDecodeException

    with pytest.raises((TypeError, ValueError, TDecodeException)):
        Preencoded(posts_thrift.Posts, "list_posts", posts_thrift.Post(id="not an int"))
