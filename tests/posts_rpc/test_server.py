"""PostsServer: store ownership, storage failures, concurrency, the bench-only switch."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.idl import common_thrift, posts_thrift
from auth_rpc.serving.transport import open_client
from auth_rpc.verify.verifiers import LocalVerifier
from posts_rpc.server import DB_FILE_NAME, PostsServer
from posts_rpc.store import SqlitePostStore

Mint = Callable[..., str]


def test_data_dir_is_made_private_and_holds_the_database(
    tmp_path: Path, verifier: LocalVerifier
) -> None:
    data_dir = tmp_path / "a" / "b"
    with PostsServer(data_dir=data_dir, verifier=verifier) as server:
        assert server.port > 0
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / DB_FILE_NAME).stat().st_mode) == 0o600


def test_stop_closes_the_store_it_opened_but_not_a_given_one(
    tmp_path: Path, verifier: LocalVerifier
) -> None:
    server = PostsServer(data_dir=tmp_path / "own", verifier=verifier).start()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(Exception, match="closed"):
        server.store.get(1)

    store = SqlitePostStore.open(tmp_path / "given.db")
    with PostsServer(store=store, verifier=verifier):
        pass
    assert store.get(1) is None  # still open
    store.close()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"data_dir": "x", "store": object()}],
    ids=["neither-store-nor-dir", "both"],
)
def test_store_arguments_are_checked(kwargs: dict[str, Any], verifier: LocalVerifier) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PostsServer(verifier=verifier, **kwargs)


def test_a_verifier_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="verifier"):
        PostsServer(data_dir=tmp_path, verifier=None)


def test_storage_failure_is_unavailable(
    client: Any,
    mint: Mint,
    posts_server: PostsServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    post = client.create_post(mint(), "before", "")
    other = sqlite3.connect(tmp_path / "posts" / DB_FILE_NAME)
    other.execute("DROP TABLE posts")
    other.commit()
    other.close()
    token = mint()
    for call in (
        lambda: client.create_post(token, "t", "b"),
        lambda: client.get_post(token, post.id),
        lambda: client.list_posts(token, 0, 0),
        lambda: client.update_post(token, post.id, "t", "b"),
        lambda: client.delete_post(token, post.id),
    ):
        with pytest.raises(common_thrift.Unavailable) as info:
            call()
        assert "sqlite" not in info.value.message.lower()  # nothing internal leaks
    # The operator's log says SQLite's own words (the client is told only "unavailable").
    said = [r.getMessage() for r in caplog.records if r.name.startswith("posts_rpc")]
    assert "post database error: OperationalError: no such table: posts" in said, said


def test_concurrent_clients(connect: Callable[[], Any], mint: Mint) -> None:
    token = mint()
    errors: list[BaseException] = []
    ids: list[int] = []
    lock = threading.Lock()
    clients = [connect() for _ in range(4)]

    def work(client: Any) -> None:
        try:
            mine = [client.create_post(token, "c", "x" * 500).id for _ in range(15)]
            with lock:
                ids.extend(mine)
            client.list_posts(token, 100, 0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(set(ids)) == 60
    page = clients[0].list_posts(token, 100, 0)
    assert [p.id for p in page.posts] == sorted(ids, reverse=True)


def test_bench_only_switch_accepts_any_nonempty_token(tmp_path: Path) -> None:
    # Reachable only from Python, never from `posts-rpc serve` (see test_cli).
    server = PostsServer(
        data_dir=tmp_path, verifier=None, _unsafe_skip_auth_for_benchmarks=True
    ).start()
    client = open_client(posts_thrift.Posts, "127.0.0.1", server.port)
    try:
        post = client.create_post("anything", "bench", "")
        assert post.author == "benchmark"
        with pytest.raises(common_thrift.Unauthenticated):
            client.get_post("", post.id)  # an empty token is still refused
    finally:
        client.close()
        server.stop()
