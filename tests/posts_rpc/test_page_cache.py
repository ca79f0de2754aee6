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
    cached = [page for view in posts_server.store._views for page in view.pages.values()]
    assert cached and cached[0] == page  # kept, and reused while nothing changes

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
