"""Cached pages of list_posts never hide a change, whichever process made it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from posts_rpc.server import DB_FILE_NAME, PostsServer
from posts_rpc.store import SqlitePostStore


def test_a_page_is_reused_until_the_store_changes(
    posts_server: PostsServer, client: Any, mint: Callable[..., str]
) -> None:
    token = mint()
    first = client.create_post(token, "one", "")
    page = client.list_posts(token, 10, 0)
    assert [p.id for p in page.posts] == [first.id]
    assert client.list_posts(token, 10, 0) == page
    store = posts_server.store
    assert isinstance(store, SqlitePostStore)
    assert [p.value for p in store._pages.values()] == [page]  # kept, reused while unchanged

    second = client.create_post(token, "two", "")
    assert [p.id for p in client.list_posts(token, 10, 0).posts] == [second.id, first.id]
    client.update_post(token, first.id, "one, edited", "")
    assert client.list_posts(token, 10, 0).posts[1].title == "one, edited"
    client.delete_post(token, second.id)
    assert [p.id for p in client.list_posts(token, 10, 0).posts] == [first.id]


def test_a_write_by_another_process_is_seen_at_once(
    posts_server: PostsServer, client: Any, mint: Callable[..., str], tmp_path: Path
) -> None:
    """Another worker (another connection to the same file) writes: the cache is bypassed."""
    token = mint()
    client.create_post(token, "mine", "")
    assert len(client.list_posts(token, 10, 0).posts) == 1
    db = next(Path(tmp_path).rglob(DB_FILE_NAME))
    other = SqlitePostStore.open(db)
    try:
        other.create(author="bob", title="from the other worker", body="")
        titles = [p.title for p in client.list_posts(token, 10, 0).posts]
        assert titles == ["from the other worker", "mine"]
    finally:
        other.close()


def test_the_wal_index_is_watched_and_the_pragma_fallback_works(
    posts_server: PostsServer, client: Any, mint: Callable[..., str], tmp_path: Path
) -> None:
    store = posts_server.store
    assert isinstance(store, SqlitePostStore)
    assert store._shm is not None, "WAL mode: changes are read from the shared WAL index"
    token = mint()
    client.create_post(token, "one", "")
    assert len(client.list_posts(token, 10, 0).posts) == 1
    store._shm = None  # as without WAL: PRAGMA data_version per reader connection
    assert len(client.list_posts(token, 10, 0).posts) == 1
    other = SqlitePostStore.open(next(Path(tmp_path).rglob(DB_FILE_NAME)))
    try:
        other.create(author="bob", title="two", body="")
        assert [p.title for p in client.list_posts(token, 10, 0).posts] == ["two", "one"]
    finally:
        other.close()
