"""PostgresPostStore's own matters, on a real PostgreSQL: replicas (two stores, two pools,
one database) and the page cache invalidated by LISTEN/NOTIFY, schema versions, failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from auth_rpc.errors import DependencyUnavailable
from posts_rpc.schema_postgresql import PG_MIGRATIONS
from posts_rpc.store import SCHEMA_VERSION, PostgresPostStore, PostRow


@pytest.fixture
def open_pg(postgresql_url: str) -> Iterator[Callable[..., PostgresPostStore]]:
    """Open a store (a replica: its own pool and listener) on one database; closed at teardown."""
    opened: list[PostgresPostStore] = []

    def open_(**kwargs: Any) -> PostgresPostStore:
        # No heartbeat during a test unless asked for: while one runs (a round trip every
        # second) a call does not use the cache, which would make counting builds racy.
        kwargs.setdefault("heartbeat_s", 600.0)
        kwargs.setdefault("max_silence_s", 1200.0)
        store = PostgresPostStore.open(postgresql_url, **kwargs)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


class Pages:
    """A page builder that counts its builds (a build = a query: the cache missed)."""

    def __init__(self) -> None:
        self.builds = 0

    def __call__(self, rows: list[PostRow]) -> list[PostRow]:
        self.builds += 1
        return rows

    def titles(self, store: PostgresPostStore, limit: int = 10) -> list[str]:
        return [row.title for row in store.list_page_view(limit, 0, self)]


def _poll(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _until_notified(store: PostgresPostStore, condition: Callable[[], bool]) -> None:
    """Poll until ``condition`` holds and the store's listener is done with what it read.

    The listener thread bumps the generation inside its callback and is done with the
    notification a moment later; until then a call does not keep the page it builds
    (``quiet()`` is false), which a test counting builds would see as a cache miss.
    """
    listener = store.listener
    assert listener is not None
    _poll(lambda: condition() and listener.quiet(), timeout_s=10, what="the notification")


def test_a_page_is_reused_until_a_change_and_only_then(
    open_pg: Callable[..., PostgresPostStore],
) -> None:
    store = open_pg()
    assert store.listener is not None and store.listener.listening
    pages = Pages()
    generation = store.generation
    store.create(author="alice", title="one", body="")
    assert store.generation >= generation + 1  # at once, not only by its notification
    # and again when its own notification arrives
    _until_notified(store, lambda: store.generation == generation + 2)
    assert pages.titles(store) == ["one"]
    assert pages.titles(store) == ["one"]
    assert pages.titles(store) == ["one"]
    assert pages.builds == 1, "reused while nothing changed"
    store.create(author="alice", title="two", body="")
    assert pages.titles(store) == ["two", "one"]  # the writer's own next call
    assert pages.builds == 2


def test_a_write_at_one_replica_is_read_at_another_once_notified(
    open_pg: Callable[..., PostgresPostStore],
) -> None:
    """PostgreSQL delivers a notification to the other listeners right after the commit,
    not before it acknowledges it: b's next call after the delivery sees the write, and a
    call of b that raced the delivery (and may have missed it) is not kept as fresh."""
    a, b = open_pg(), open_pg()
    pages = Pages()
    first = a.create(author="alice", title="first", body="")
    assert pages.titles(b) == ["first"]
    assert pages.titles(b) == ["first"]  # cached at b
    rounds, at_once, delays = 50, 0, []
    for i in range(rounds):
        generation = b.generation
        a.create(author="alice", title=f"new {i}", body="")
        written = time.monotonic()
        at_once += pages.titles(b, 1) == [f"new {i}"]  # b's very next call, racing
        _poll(lambda g=generation: b.generation > g, timeout_s=10, what="the notification")
        delays.append(time.monotonic() - written)
        _until_notified(b, lambda: True)  # the reuse counted below starts once it is done
        assert pages.titles(b, 1) == [f"new {i}"], i  # the next call after the delivery
        builds = pages.builds
        assert pages.titles(b, 1) == [f"new {i}"], i
        assert pages.builds == builds, "reused until the next change"
    delays.sort()
    print(f"\nwrite at a seen by b's very next call {at_once} of {rounds} times; "
          f"notification at b after the write returned: median {delays[rounds // 2] * 1e3:.2f} "
          f"ms, max {delays[-1] * 1e3:.2f} ms")
    generation = b.generation
    a.update(first.id, title="edited", body="")
    _poll(lambda: b.generation > generation, timeout_s=10, what="the notification")
    assert pages.titles(b, 100)[-1] == "edited"
    generation = b.generation
    a.delete(first.id)
    _poll(lambda: b.generation > generation, timeout_s=10, what="the notification")
    assert "edited" not in pages.titles(b, 100)


def test_a_change_made_outside_the_service_invalidates_too(
    open_pg: Callable[..., PostgresPostStore], postgresql_url: str
) -> None:
    """The notification comes from a trigger: psql (an administrator) is seen as well."""
    store = open_pg()
    pages = Pages()
    store.create(author="alice", title="spam", body="")
    assert pages.titles(store) == ["spam"]
    with psycopg.connect(postgresql_url, autocommit=True) as conn:
        conn.execute("DELETE FROM posts WHERE title = 'spam'")
    _poll(lambda: pages.titles(store) == [], timeout_s=10, what="the deletion seen")
    store.create(author="alice", title="kept", body="")
    assert pages.titles(store) == ["kept"]
    with psycopg.connect(postgresql_url, autocommit=True) as conn:
        conn.execute("TRUNCATE posts")
    _poll(lambda: pages.titles(store) == [], timeout_s=10, what="the truncation seen")


def test_a_read_that_races_a_write_is_never_kept_as_fresh(
    open_pg: Callable[..., PostgresPostStore],
) -> None:
    """Readers at b hammer one page while a writes: once each write's notification reached
    b, b's next read has it (a page built from a query that began before the commit and
    ended after the notification is not kept)."""
    a, b = open_pg(), open_pg()
    a.create(author="alice", title="0", body="")
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        pages = Pages()
        try:
            while not stop.is_set():
                pages.titles(b, 1)
        except BaseException as exc:  # judged below
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        check = Pages()
        for i in range(1, 101):
            generation = b.generation
            a.create(author="alice", title=str(i), body="")
            _poll(lambda g=generation: b.generation > g, timeout_s=10, what="the notification")
            assert check.titles(b, 1) == [str(i)], i
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert not errors


def test_while_the_listener_is_lost_nothing_is_cached_then_everything_is_invalidated(
    open_pg: Callable[..., PostgresPostStore], postgresql_url: str
) -> None:
    a, b = open_pg(), open_pg()
    listener = b.listener
    assert listener is not None
    pages = Pages()
    generation = b.generation
    a.create(author="alice", title="before", body="")
    _until_notified(b, lambda: b.generation > generation)
    assert pages.titles(b) == ["before"]
    assert pages.titles(b) == ["before"]
    assert pages.builds == 1
    generation = b.generation
    # Cut b's listening connection (its backend is the one LISTENing).
    with psycopg.connect(postgresql_url, autocommit=True) as admin:
        killed = admin.execute(
            # The listeners: the pools' connections are named posts-rpc, this one is excluded.
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name <> 'posts-rpc' AND backend_type = 'client backend'"
        ).fetchone()
    assert killed is not None and killed[0] == 2  # a's and b's listeners
    _poll(lambda: not listener.listening, timeout_s=10, what="the loss noticed")
    # While it is lost a change made meanwhile is seen, and no page is kept.
    a.create(author="alice", title="meanwhile", body="")
    builds = pages.builds
    for _ in range(3):
        assert pages.titles(b) == ["meanwhile", "before"]
    assert pages.builds == builds + 3, "not cached while the listener is lost"
    # Back: everything invalidated once, then pages are reused again.
    _poll(lambda: listener.listening and listener.quiet(), timeout_s=30, what="the listener back")
    assert b.generation > generation
    assert pages.titles(b) == ["meanwhile", "before"]
    builds = pages.builds
    assert pages.titles(b) == ["meanwhile", "before"]
    assert pages.builds == builds
    generation = b.generation
    a.create(author="alice", title="after", body="")
    _poll(lambda: b.generation > generation, timeout_s=10, what="the notification")
    assert pages.titles(b)[0] == "after"


def test_a_silent_listener_stops_the_cache(open_pg: Callable[..., PostgresPostStore]) -> None:
    """No answer from the server for max_silence_s (a dead link): pages are not reused."""
    store = open_pg(max_silence_s=0.2, heartbeat_s=60.0)
    pages = Pages()
    generation = store.generation
    store.create(author="alice", title="one", body="")
    _poll(lambda: store.generation == generation + 2, timeout_s=10, what="the notification")
    assert pages.titles(store) == ["one"]
    listener = store.listener
    assert listener is not None
    _poll(lambda: not listener.quiet(0.2), timeout_s=10, what="silence past max_silence_s")
    builds = pages.builds
    pages.titles(store)
    pages.titles(store)
    assert pages.builds == builds + 2


def test_the_heartbeat_keeps_a_quiet_listener_trusted(
    open_pg: Callable[..., PostgresPostStore],
) -> None:
    """With no notification at all, the heartbeat's answers keep quiet() true past
    max_silence_s (without them it would turn false, as in the test above)."""
    store = open_pg(heartbeat_s=0.1, max_silence_s=0.5)
    listener = store.listener
    assert listener is not None
    start = time.monotonic()
    _poll(lambda: time.monotonic() > start + 1.5 and listener.quiet(0.5), timeout_s=10,
          what="a heartbeat answered after max_silence_s")


def test_without_the_cache_no_listener(open_pg: Callable[..., PostgresPostStore]) -> None:
    store = open_pg(cache=False)
    assert store.listener is None
    pages = Pages()
    store.create(author="alice", title="one", body="")
    pages.titles(store)
    pages.titles(store)
    assert pages.builds == 2


def test_replicas_creating_at_once_get_distinct_ids_and_lose_nothing(
    open_pg: Callable[..., PostgresPostStore],
) -> None:
    stores = [open_pg(), open_pg()]
    ids: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def writer(n: int) -> None:
        start.wait()
        mine = [stores[n % 2].create(author="u", title=f"{n}-{i}", body="").id for i in range(30)]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ids) == len(set(ids)) == 180
    assert sorted(r.id for r in stores[1].list_page(1000, 0)) == sorted(ids)


def test_schema_shares_the_database_with_auth_and_bigint_times(
    open_pg: Callable[..., PostgresPostStore], postgresql_url: str
) -> None:
    from auth_rpc.auth.db import open_database

    store = open_pg()
    auth = open_database(None, database_url=postgresql_url)  # type: ignore[arg-type]
    try:
        with psycopg.connect(postgresql_url) as conn:
            versions = dict(conn.execute("SELECT component, version FROM schema_version"))
            types = dict(conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'posts'"
            ))
        assert versions["posts"] == SCHEMA_VERSION == len(PG_MIGRATIONS)
        assert "auth" in versions
        assert types["id"] == types["created_at"] == types["updated_at"] == "bigint"
        # Times past 2038 (and any millisecond time) fit.
        row = store.create(author="alice", title="t", body="")
        assert row.created_at > 2**31
    finally:
        auth.close()


def test_newer_schema_is_refused_and_migrations_apply_once(
    open_pg: Callable[..., PostgresPostStore], postgresql_url: str
) -> None:
    extra = (*PG_MIGRATIONS, "CREATE TABLE posts_extra (x BIGINT)")
    with open_pg() as s:
        s.create(author="alice", title="kept", body="")
    with open_pg(migrations=extra) as s:
        assert s.schema_version == SCHEMA_VERSION + 1
        assert [r.title for r in s.list_page(5, 0)] == ["kept"]
    with open_pg(migrations=extra) as s:  # not applied twice (it would fail)
        assert s.schema_version == SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="newer"):
        open_pg()


def test_a_server_gone_is_dependency_unavailable(
    open_pg: Callable[..., PostgresPostStore], postgresql_url: str
) -> None:
    store = open_pg(cache=False)
    store.create(author="alice", title="a", body="b")
    with psycopg.connect(postgresql_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE posts RENAME TO posts_moved")
    try:
        for call in (
            lambda: store.create(author="alice", title="a", body="b"),
            lambda: store.list_page(5, 0),
            lambda: store.get(1),
            lambda: store.delete(1),
        ):
            with pytest.raises(DependencyUnavailable):
                call()
    finally:
        with psycopg.connect(postgresql_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE posts_moved RENAME TO posts")
    assert store.get(1) is not None


def test_an_unreachable_database_is_one_clear_error(tmp_path: Any) -> None:
    url = f"postgresql://nobody:hunter2@/posts?host={tmp_path}"
    with pytest.raises(DependencyUnavailable) as caught:
        PostgresPostStore.open(url)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ValueError, match="postgresql://"):
        PostgresPostStore.open("mysql://x/y")


def test_a_runtime_role_with_only_the_documented_grants_serves(
    postgresql_url: str,
) -> None:
    """docs/deploy.md: an owner role migrates once; the replicas run as a role with
    USAGE on the schema and SELECT, INSERT, UPDATE, DELETE on its tables only."""
    parts = urlsplit(postgresql_url)
    dbname = parts.path.lstrip("/")
    suffix = dbname.replace("test_", "")
    owner, app = f"posts_owner_{suffix}", f"posts_app_{suffix}"
    with psycopg.connect(postgresql_url, autocommit=True) as su:
        su.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        su.execute(f"CREATE ROLE {owner} LOGIN")
        su.execute(f"CREATE ROLE {app} LOGIN")
        su.execute(f"CREATE SCHEMA posts AUTHORIZATION {owner}")
        for role in (owner, app):
            su.execute(f"ALTER ROLE {role} IN DATABASE {dbname} SET search_path = posts")
    owner_url = f"postgresql://{owner}@/{dbname}?{parts.query}"
    app_url = f"postgresql://{app}@/{dbname}?{parts.query}"
    try:
        PostgresPostStore.open(owner_url, cache=False).close()  # the migration, as the owner
        with psycopg.connect(owner_url, autocommit=True) as conn:
            conn.execute(f"GRANT USAGE ON SCHEMA posts TO {app}")
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA posts "
                         f"TO {app}")
        a = PostgresPostStore.open(app_url)
        b = PostgresPostStore.open(app_url)
        try:
            pages = Pages()
            assert pages.titles(b) == []
            generation = b.generation
            row = a.create(author="alice", title="least privilege", body="")
            _poll(lambda: b.generation > generation, timeout_s=10, what="the notification")
            assert pages.titles(b) == ["least privilege"]
            assert a.update(row.id, title="still", body="") is not None
            assert a.delete(row.id) is True
            assert a.schema_version == SCHEMA_VERSION
        finally:
            a.close()
            b.close()
        # The runtime role cannot change the schema (nor make tables beside it).
        with psycopg.connect(app_url, autocommit=True) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege
        ):
            conn.execute("DROP TABLE posts")
    finally:
        with psycopg.connect(postgresql_url, autocommit=True) as su:
            su.execute("DROP SCHEMA IF EXISTS posts CASCADE")
            for role in (app, owner):
                su.execute(f"DROP OWNED BY {role}")
                su.execute(f"DROP ROLE {role}")
