"""The Posts stores: pages, durability, concurrency, schema versions, failures.

Tests taking ``store`` or ``open_store`` run on both backends (SQLite in a
temp dir, a fresh PostgreSQL database); those of SQLite's own matters (its
file, its PRAGMAs, its query plan) take ``sqlite_store`` and run on SQLite only.
"""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from auth_rpc.errors import DependencyUnavailable
from posts_rpc.store import (
    SCHEMA_VERSION,
    PostgresPostStore,
    PostRow,
    PostStore,
    SqlitePostStore,
)

AnyStore = SqlitePostStore | PostgresPostStore


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", ["sqlite", "postgresql"], indirect=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.5

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "posts.db"


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(
    backend: str, db_path: Path, clock: Clock, request: pytest.FixtureRequest
) -> Iterator[Callable[..., AnyStore]]:
    """Open a store of ``backend`` (the same file or database each time); closed at teardown."""
    url = request.getfixturevalue("postgresql_url") if backend == "postgresql" else None
    opened: list[AnyStore] = []

    def open_(**kwargs: Any) -> AnyStore:
        s: AnyStore = (
            SqlitePostStore.open(db_path, clock=clock, **kwargs)
            if url is None
            else PostgresPostStore.open(url, clock=clock, **kwargs)
        )
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Callable[..., AnyStore]) -> AnyStore:
    return open_store()


@pytest.fixture
def sqlite_store(db_path: Path, clock: Clock) -> Iterator[SqlitePostStore]:
    s = SqlitePostStore.open(db_path, clock=clock)
    yield s
    s.close()


def _fill(store: AnyStore, n: int) -> list[PostRow]:
    return [store.create(author="alice", title=f"t{i}", body=f"b{i}") for i in range(n)]


def test_implements_the_protocol(store: AnyStore) -> None:
    assert isinstance(store, PostStore)


def test_create_returns_the_stored_row_with_millisecond_times(
    store: AnyStore, clock: Clock
) -> None:
    row = store.create(author="alice", title="Hello", body="world")
    assert row == PostRow(row.id, "alice", "Hello", "world", 1_700_000_000_500, 1_700_000_000_500)
    assert row.id > 0
    assert store.get(row.id) == row


def test_get_missing_is_none(store: AnyStore) -> None:
    assert store.get(12345) is None


def test_update_changes_title_body_and_updated_at_only(
    store: AnyStore, clock: Clock
) -> None:
    row = store.create(author="alice", title="a", body="b")
    clock.now += 2
    updated = store.update(row.id, title="c", body="d")
    assert updated == row._replace(title="c", body="d", updated_at=row.created_at + 2000)
    assert store.get(row.id) == updated
    assert store.update(row.id + 1, title="x", body="y") is None


def test_delete(store: AnyStore) -> None:
    row = store.create(author="alice", title="a", body="b")
    assert store.delete(row.id) is True
    assert store.get(row.id) is None
    assert store.delete(row.id) is False


@pytest.mark.parametrize("page_size", [1, 7, 20, 21])
def test_keyset_pages_cover_every_post_once_newest_first(
    store: AnyStore, page_size: int
) -> None:
    created = _fill(store, 41)
    seen: list[PostRow] = []
    before = 0
    while True:
        page = store.list_page(page_size, before)
        assert len(page) <= page_size
        if not page:
            break
        seen.extend(page)
        before = page[-1].id
    assert seen == sorted(created, key=lambda r: r.id, reverse=True)


def test_page_before_id_is_exclusive_and_zero_means_newest(store: AnyStore) -> None:
    rows = _fill(store, 5)
    ids = [r.id for r in rows]
    assert [r.id for r in store.list_page(10, 0)] == ids[::-1]
    assert [r.id for r in store.list_page(2, ids[3])] == [ids[2], ids[1]]
    assert store.list_page(10, ids[0]) == []


def test_pages_skip_deleted_posts(store: AnyStore) -> None:
    rows = _fill(store, 6)
    store.delete(rows[3].id)
    assert [r.id for r in store.list_page(3, 0)] == [rows[5].id, rows[4].id, rows[2].id]


def test_ids_are_never_reused_after_deleting_the_newest(store: AnyStore) -> None:
    first = store.create(author="alice", title="a", body="b")
    store.delete(first.id)
    second = store.create(author="alice", title="a", body="b")
    assert second.id > first.id


def test_posts_survive_reopening(open_store: Callable[..., AnyStore]) -> None:
    with open_store() as s:
        row = s.create(author="alice", title="durable", body="é" * 100)
        deleted = s.create(author="bob", title="gone", body="")
        s.delete(deleted.id)
    with open_store() as s:
        assert s.get(row.id) == row
        assert s.get(deleted.id) is None
        assert s.schema_version == SCHEMA_VERSION


def test_file_is_private_wal_and_fully_synchronous(
    sqlite_store: SqlitePostStore, db_path: Path
) -> None:
    sqlite_store.create(author="alice", title="a", body="b")
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()
    # synchronous is per connection: 2 is FULL.
    with sqlite_store._write() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert sqlite_store._query("PRAGMA synchronous", ()) == [(2,)]


def test_page_query_uses_the_primary_key(sqlite_store: SqlitePostStore) -> None:
    plan = " ".join(
        str(row[-1])
        for row in sqlite_store._query(
            "EXPLAIN QUERY PLAN SELECT id, author, title, body, created_at, updated_at "
            "FROM posts WHERE id < ? ORDER BY id DESC LIMIT ?",
            (10, 3),
        )
    )
    assert "INTEGER PRIMARY KEY" in plan
    assert "TEMP B-TREE" not in plan  # no sort step


def test_concurrent_creates_and_reads(store: AnyStore) -> None:
    threads_n, per_thread = 8, 25
    ids: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads_n + 2)

    def writer(n: int) -> None:
        try:
            start.wait()
            mine = [
                store.create(author=f"u{n}", title=f"{n}-{i}", body="x").id
                for i in range(per_thread)
            ]
            with lock:
                ids.extend(mine)
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            start.wait()
            for _ in range(100):
                page = store.list_page(20, 0)
                assert [r.id for r in page] == sorted((r.id for r in page), reverse=True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(threads_n)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(ids) == len(set(ids)) == threads_n * per_thread
    everything = store.list_page(1000, 0)
    assert sorted(r.id for r in everything) == sorted(ids)


def test_newer_schema_is_refused(db_path: Path) -> None:
    SqlitePostStore.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ValueError, match="newer"):
        SqlitePostStore.open(db_path)


def test_migrations_apply_in_order_and_only_once(db_path: Path) -> None:
    extra = (("CREATE TABLE extra (x INTEGER)",),)
    from posts_rpc.store import MIGRATIONS

    with SqlitePostStore.open(db_path) as s:
        s.create(author="alice", title="kept", body="")
    with SqlitePostStore.open(db_path, migrations=MIGRATIONS + extra) as s:
        assert s.schema_version == SCHEMA_VERSION + 1
        assert [r.title for r in s.list_page(5, 0)] == ["kept"]
    with SqlitePostStore.open(db_path, migrations=MIGRATIONS + extra) as s:
        assert s.schema_version == SCHEMA_VERSION + 1


def test_sqlite_failures_become_dependency_unavailable(
    sqlite_store: SqlitePostStore, db_path: Path
) -> None:
    sqlite_store.create(author="alice", title="a", body="b")
    other = sqlite3.connect(db_path)
    other.execute("DROP TABLE posts")
    other.commit()
    other.close()
    with pytest.raises(DependencyUnavailable):
        sqlite_store.create(author="alice", title="a", body="b")
    with pytest.raises(DependencyUnavailable):
        sqlite_store.list_page(5, 0)
    with pytest.raises(DependencyUnavailable):
        sqlite_store.get(1)


def test_closed_store_is_unavailable(store: AnyStore) -> None:
    store.close()
    store.close()  # idempotent
    for call in (
        lambda: store.get(1),
        lambda: store.list_page(1, 0),
        lambda: store.create(author="a", title="b", body="c"),
        lambda: store.delete(1),
    ):
        with pytest.raises(DependencyUnavailable):
            call()


def test_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DependencyUnavailable):
        SqlitePostStore.open(tmp_path / "missing-dir" / "posts.db")
