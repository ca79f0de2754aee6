"""Where posts live: the :class:`PostStore` interface, its SQLite and PostgreSQL stores.

The interface is deliberately small and free of SQLite specifics:
:class:`SqlitePostStore` (one data directory, the default) and
:class:`PostgresPostStore` (``--database-url``: several Posts replicas on one
database) implement it with the same statements. Every method raises only
:class:`~auth_rpc.errors.DependencyUnavailable` when the storage fails; ids are
assigned by the store, never reused, and increase with time of creation, which
is what keyset pagination (``list_page``) relies on.

:class:`SqlitePostStore`:

- WAL mode and ``synchronous=FULL``: a ``create``/``update``/``delete`` that
  returned has reached the disk, so a post acknowledged to a caller survives a
  crash or a power loss;
- the schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS`
  lists the migrations in order and :meth:`SqlitePostStore.open` applies the
  missing ones in one transaction (append new ones, never edit a shipped one);
- thread safe: one writer connection behind a lock (SQLite has one writer at a
  time anyway) and a pool of reader connections, so that reads never wait for
  a write's ``fsync`` (WAL readers see the last committed state);
- the read path is the benchmarked one (``list_posts`` of 20): one indexed
  keyset query on the primary key (``WHERE id < ? ORDER BY id DESC LIMIT ?``),
  a statement SQLite has already prepared (the connection's statement cache),
  and rows built as :class:`PostRow` named tuples: a frozen dataclass costs
  about 1-2 µs per row to construct, a named tuple a fifth of that, and it is
  just as immutable.

:class:`PostgresPostStore` (see its docstring): the same statements through
:class:`~auth_rpc.serving.sqlstore.PostgresDatabase` (a pool of autocommit
connections, each write one statement, so its own transaction), the schema of
:mod:`posts_rpc.schema_postgresql` under the same version numbers, and a page
cache invalidated by ``LISTEN``/``NOTIFY`` instead of the WAL index.
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar, runtime_checkable

from auth_rpc.errors import DependencyUnavailable, storage_failure
from auth_rpc.serving.private_files import check_private_stat
from auth_rpc.serving.sqlstore import Listener, PostgresDatabase
from posts_rpc.schema_postgresql import CHANGES_CHANNEL, PG_MIGRATIONS

T = TypeVar("T")

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PostRow",
    "PostStore",
    "PostgresPostStore",
    "SqlitePostStore",
]

log = logging.getLogger("posts_rpc.store")

#: Ordered migrations; the n-th (1-based) brings the schema to version n.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: posts. AUTOINCREMENT: an id is never reused, even after the newest
    # post was deleted (a client holding a cursor or an old id never sees a
    # different post under it).
    (
        """
        CREATE TABLE posts (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            author     TEXT NOT NULL,
            title      TEXT NOT NULL,
            body       TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        )
        """,
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
assert len(PG_MIGRATIONS) == SCHEMA_VERSION, "one version sequence for both dialects"

#: Larger than every id SQLite can assign: ``before_id=0`` means "from the newest".
_NO_UPPER_BOUND = 2**63 - 1

# Literal statements (no string building): each is prepared once per connection
# and reused from its statement cache.
_SQL_INSERT = (
    "INSERT INTO posts (author, title, body, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
    "RETURNING id, author, title, body, created_at, updated_at"
)
_SQL_GET = "SELECT id, author, title, body, created_at, updated_at FROM posts WHERE id = ?"
_SQL_PAGE = (
    "SELECT id, author, title, body, created_at, updated_at FROM posts "
    "WHERE id < ? ORDER BY id DESC LIMIT ?"
)
_SQL_UPDATE = (
    "UPDATE posts SET title = ?, body = ?, updated_at = ? WHERE id = ? "
    "RETURNING id, author, title, body, created_at, updated_at"
)
_SQL_DELETE = "DELETE FROM posts WHERE id = ?"
_SQL_DELETE_RETURNING = "DELETE FROM posts WHERE id = ? RETURNING id"

_UNAVAILABLE = "post storage unavailable"


class PostRow(NamedTuple):
    """One stored post. Times are unix milliseconds.

    The field order is that of the IDL's ``Post`` struct.
    """

    id: int
    author: str
    title: str
    body: str
    created_at: int
    updated_at: int


@runtime_checkable
class PostStore(Protocol):
    """Storage of posts. Every method raises ``DependencyUnavailable`` on a storage failure.

    Inputs are validated by the caller (the handler); the store trusts them.
    """

    def create(self, *, author: str, title: str, body: str) -> PostRow:
        """Store a new post (durably, before returning) and return it with its new id."""
        ...

    def get(self, post_id: int) -> PostRow | None:
        """The post with id ``post_id``, or ``None``."""
        ...

    def list_page(self, limit: int, before_id: int) -> list[PostRow]:
        """Up to ``limit`` posts with ``id < before_id``, newest (highest id) first.

        ``before_id=0`` means from the newest post.
        """
        ...

    def update(self, post_id: int, *, title: str, body: str) -> PostRow | None:
        """Replace title and body (durably) and return the post, or ``None`` if it is gone."""
        ...

    def delete(self, post_id: int) -> bool:
        """Delete the post (durably); ``False`` if there was none."""
        ...

    def list_page_view(
        self, limit: int, before_id: int, build: Callable[[list[PostRow]], T]
    ) -> T:
        """``build(list_page(limit, before_id))``, possibly reused.

        A store that can tell cheaply that no post changed since (in any
        process) may return what ``build`` made before for the same
        arguments; one that cannot simply calls ``build`` every time. The
        caller must never mutate the result. Raises ``DependencyUnavailable``.
        """
        ...

    def close(self) -> None:
        """Release the storage; later calls raise ``DependencyUnavailable``. Idempotent."""
        ...


class SqlitePostStore:
    """A :class:`PostStore` in one SQLite file (see the module docstring).

    Use :meth:`open`. ``clock`` returns unix seconds (``time.time``); tests pass
    their own.
    """

    def __init__(
        self,
        path: Path,
        writer: sqlite3.Connection,
        *,
        clock: Callable[[], float],
        busy_timeout_s: float,
        max_idle_readers: int,
    ) -> None:
        self.path = path
        self._writer: sqlite3.Connection | None = writer
        self._write_lock = threading.Lock()
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._max_idle_readers = max_idle_readers
        # Idle reader connections. list.pop()/append() are atomic under the GIL,
        # so taking and returning a reader needs no lock.
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        self._views: list[_PageView] = []
        self._shm: mmap.mmap | None = None
        self._wal_index: _WalIndex | None = None
        self._pages: dict[tuple[int, int], Any] = {}
        self._pages_marker: object = None

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
        max_idle_readers: int = 16,
        migrations: tuple[tuple[str, ...], ...] = MIGRATIONS,
    ) -> SqlitePostStore:
        """Open (creating with mode 0600) the database at ``path`` and migrate it.

        Raises :class:`DependencyUnavailable` if SQLite or the file system
        fails, ``ValueError`` if the file's schema is newer than ``migrations``.
        """
        path = Path(path)
        try:
            # Create the file ourselves so that it (and the -wal and -shm files,
            # which SQLite creates with its mode) is readable by the owner only.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                check_private_stat(os.fstat(fd), path, "post database")
            finally:
                os.close(fd)
            writer = _connect(path, busy_timeout_s)
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot open the post database: %s", storage_failure(exc))
            raise DependencyUnavailable(f"{_UNAVAILABLE}: {storage_failure(exc)}") from exc
        store = cls(
            path,
            writer,
            clock=clock,
            busy_timeout_s=busy_timeout_s,
            max_idle_readers=max_idle_readers,
        )
        try:
            with store._write() as conn:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("SQLite refused WAL mode (journal_mode=%s)", mode)
            store._migrate(migrations)
            if str(mode).lower() == "wal":
                store._wal_index = _WalIndex.acquire(path)
                store._shm = store._wal_index.header if store._wal_index else None
        except BaseException:
            store.close()
            raise
        return store

    # -- PostStore -----------------------------------------------------------

    def create(self, *, author: str, title: str, body: str) -> PostRow:
        now_ms = self._now_ms()
        with self._write() as conn:
            # fetchall() runs the statement to its end, so that it is reset and
            # its (autocommit) transaction committed before the lock is released.
            rows = conn.execute(_SQL_INSERT, (author, title, body, now_ms, now_ms)).fetchall()
        return PostRow._make(rows[0])

    def get(self, post_id: int) -> PostRow | None:
        rows = self._query(_SQL_GET, (post_id,))
        return PostRow._make(rows[0]) if rows else None

    def list_page(self, limit: int, before_id: int) -> list[PostRow]:
        make = PostRow._make
        return [make(row) for row in self._query(_SQL_PAGE, (before_id or _NO_UPPER_BOUND, limit))]

    def update(self, post_id: int, *, title: str, body: str) -> PostRow | None:
        now_ms = self._now_ms()
        with self._write() as conn:
            rows = conn.execute(_SQL_UPDATE, (title, body, now_ms, post_id)).fetchall()
        return PostRow._make(rows[0]) if rows else None

    def delete(self, post_id: int) -> bool:
        with self._write() as conn:
            deleted: int = conn.execute(_SQL_DELETE, (post_id,)).rowcount
        return deleted > 0

    def list_page_view(
        self, limit: int, before_id: int, build: Callable[[list[PostRow]], T]
    ) -> T:
        # A page is reused only while the database is unchanged. The change
        # marker is the WAL-index header that every SQLite connection, in any
        # process, updates on each commit (sqlite.org/walformat.html, "The
        # WAL-Index Header": iChange "incremented each transaction", mxFrame,
        # salts and checksums), read from the shared memory file without a
        # system call. Without it (no WAL), PRAGMA data_version on the view's
        # own connection serves the same purpose, at the cost of a query.
        if self._closed:
            raise DependencyUnavailable("post storage closed")
        shm = self._shm
        key = (limit, before_id)
        if shm is not None:
            marker: object = shm[:_WAL_INDEX_HEADER_BYTES]
            if marker != self._pages_marker:
                self._pages = {}
                self._pages_marker = marker
            pages = self._pages
            page = pages.get(key)
            if page is None:
                page = build(self.list_page(limit, before_id))
                if marker == self._pages_marker:
                    if len(pages) >= _MAX_PAGES:
                        pages.clear()
                    pages[key] = page
            return page  # what build returned for key
        return self._list_page_view_by_pragma(key, build)

    def _list_page_view_by_pragma(
        self, key: tuple[int, int], build: Callable[[list[PostRow]], T]
    ) -> T:
        try:
            view = self._views.pop()
        except IndexError:
            view = _PageView(self._take_reader())
        limit, before_id = key
        try:
            conn = view.conn
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != view.version:
                view.pages.clear()
                view.version = version
            page = view.pages.get(key)
            if page is None:
                make = PostRow._make
                rows = conn.execute(_SQL_PAGE, (before_id or _NO_UPPER_BOUND, limit)).fetchall()
                page = build([make(row) for row in rows])
                if len(view.pages) >= _MAX_PAGES:
                    view.pages.clear()
                view.pages[key] = page
        except sqlite3.Error as exc:
            view.conn.close()  # a connection in an unknown state is not reused
            log.error("post database error: %s", storage_failure(exc))
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        except BaseException:
            view.conn.close()
            raise
        if len(self._views) < self._max_idle_readers and not self._closed:
            self._views.append(view)
        else:
            view.conn.close()
        return page  # what build returned for this key

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
            writer, self._writer = self._writer, None
        self._shm = None
        readers, self._readers = self._readers, []
        views, self._views = self._views, []
        readers += [view.conn for view in views]
        for conn in [*readers, *([writer] if writer is not None else [])]:
            try:
                conn.close()
            except sqlite3.Error:  # pragma: no cover - nothing useful to do
                log.warning("error while closing the post database")
        # Last: releasing the WAL index may close descriptors of the -shm file,
        # which drops this process's POSIX locks on it (see _WalIndex).
        wal_index, self._wal_index = self._wal_index, None
        if wal_index is not None:
            wal_index.release()

    # -- extras (not part of the Protocol) -----------------------------------

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return int(self._query("PRAGMA user_version", ())[0][0])

    def __enter__(self) -> SqlitePostStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """The writer connection, under the write lock; each statement commits itself.

        A single statement in autocommit mode is its own transaction; with
        ``synchronous=FULL`` it is on disk when ``execute`` returns.
        """
        with self._write_lock:
            conn = self._writer
            if conn is None:
                raise DependencyUnavailable("post storage closed")
            try:
                yield conn
            except sqlite3.Error as exc:
                log.error("post database error: %s", storage_failure(exc))
                raise DependencyUnavailable(_UNAVAILABLE) from exc

    def _query(self, sql: str, params: tuple[int, ...]) -> list[Any]:
        """All rows of one read-only statement, run on a pooled reader connection.

        The hot path of every read: no context manager, no lock.
        """
        conn = self._take_reader()
        try:
            rows: list[Any] = conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            conn.close()  # a reader in an unknown state is not reused
            log.error("post database error: %s", storage_failure(exc))
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        except BaseException:
            conn.close()
            raise
        self._return_reader(conn)
        return rows

    def _take_reader(self) -> sqlite3.Connection:
        if self._closed:
            raise DependencyUnavailable("post storage closed")
        try:
            return self._readers.pop()
        except IndexError:
            pass
        try:
            return _connect(self.path, self._busy_timeout_s)
        except sqlite3.Error as exc:
            log.error("cannot open a post database reader: %s", storage_failure(exc))
            raise DependencyUnavailable(_UNAVAILABLE) from exc

    def _return_reader(self, conn: sqlite3.Connection) -> None:
        if self._closed or len(self._readers) >= self._max_idle_readers:
            conn.close()
            return
        self._readers.append(conn)
        if self._closed:  # close() ran meanwhile and may have missed it
            self._drain_readers()

    def _drain_readers(self) -> None:
        while True:
            try:
                conn = self._readers.pop()
            except IndexError:
                return
            conn.close()

    def _migrate(self, migrations: tuple[tuple[str, ...], ...]) -> None:
        with self._write() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > len(migrations):
                    raise ValueError(
                        f"post database schema version {version} is newer than this "
                        f"program (knows {len(migrations)}); upgrade posts-rpc"
                    )
                for number in range(version + 1, len(migrations) + 1):
                    log.info("migrating the post database schema to version %d", number)
                    for statement in migrations[number - 1]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number}")
            except BaseException:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


class PostgresPostStore:
    """A :class:`PostStore` on PostgreSQL, shared by every Posts replica.

    Use :meth:`open`. The statements are the SQLite store's (``?`` converted
    once each); every write is one autocommit statement (``INSERT``/``UPDATE``
    ... ``RETURNING``, ``DELETE``), durable when it returns (PostgreSQL's
    ``synchronous_commit``). Ids come from an identity sequence: never given
    twice; two replicas' concurrent creates may commit in the other order than
    their ids (keyset pages are still exact for what is committed).

    The page cache (``list_page_view``): a trigger of the ``posts`` table
    notifies ``posts_changed`` in the transaction of every change, delivered
    at its commit to every replica's :class:`~auth_rpc.serving.sqlstore.Listener`,
    whose callback bumps :attr:`generation`; a write made here bumps it too
    when it returns. A page is built under the generation read *before* its
    query and served again only while the generation is unchanged, so that a
    query that began before a commit and ended after its notification is
    never kept as fresh. Before reading the generation a call asks
    ``Listener.quiet()``: a notification that reached the socket but waits for
    the listener thread (the GIL) counts as arrived. While the listener is
    not in force (connection lost, server silent for ``max_silence_s``) no
    page is reused or kept; when it is back, everything is invalidated. No
    query per call: checking costs one ``select`` with no wait.
    """

    def __init__(
        self,
        db: PostgresDatabase,
        *,
        clock: Callable[[], float],
        cache: bool,
        max_silence_s: float,
        heartbeat_s: float,
    ) -> None:
        self._db = db
        self._clock = clock
        self._closed = False
        self._max_silence_s = max_silence_s
        #: Bumped by every change notified (and every write made here).
        self.generation = 0
        self._bump_lock = threading.Lock()
        self._pages: tuple[int, dict[tuple[int, int], Any]] = (-1, {})
        self._listener: Listener | None = (
            Listener(db.url, (CHANGES_CHANNEL,), self._changed, name="posts-pages",
                     heartbeat_s=heartbeat_s)
            if cache else None
        )

    @classmethod
    def open(
        cls,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        migrations: tuple[str, ...] = PG_MIGRATIONS,
        cache: bool = True,
        max_connections: int = 16,
        max_silence_s: float = 3.0,
        heartbeat_s: float = 1.0,
    ) -> PostgresPostStore:
        """Connect to the database at ``url`` (``postgresql://...``) and migrate it.

        ``cache=False`` never reuses a page (and opens no listening
        connection). Raises :class:`DependencyUnavailable` if the database
        cannot be reached (the message never shows the URL's password),
        ``ValueError`` for a URL that is not PostgreSQL's or a schema newer
        than ``migrations``.
        """
        db = PostgresDatabase.open(
            url, component="posts", migrations=migrations, max_size=max_connections,
            application_name="posts-rpc",
        )
        store = cls(db, clock=clock, cache=cache, max_silence_s=max_silence_s,
                    heartbeat_s=heartbeat_s)
        if store._listener is not None:
            store._listener.start()
            if not store._listener.listening:
                log.warning("cannot LISTEN for post changes yet: pages are not cached until then")
        return store

    # -- PostStore -----------------------------------------------------------

    def create(self, *, author: str, title: str, body: str) -> PostRow:
        now_ms = self._now_ms()
        rows = self._write(_SQL_INSERT, (author, title, body, now_ms, now_ms))
        return PostRow._make(rows[0])

    def get(self, post_id: int) -> PostRow | None:
        rows = self._query(_SQL_GET, (post_id,))
        return PostRow._make(rows[0]) if rows else None

    def list_page(self, limit: int, before_id: int) -> list[PostRow]:
        make = PostRow._make
        return [make(row) for row in self._query(_SQL_PAGE, (before_id or _NO_UPPER_BOUND, limit))]

    def update(self, post_id: int, *, title: str, body: str) -> PostRow | None:
        rows = self._write(_SQL_UPDATE, (title, body, self._now_ms(), post_id))
        return PostRow._make(rows[0]) if rows else None

    def delete(self, post_id: int) -> bool:
        if self._closed:
            raise DependencyUnavailable("post storage closed")
        # RETURNING id: the number of rows deleted without a cursor's rowcount.
        return bool(self._write(_SQL_DELETE_RETURNING, (post_id,)))

    def list_page_view(
        self, limit: int, before_id: int, build: Callable[[list[PostRow]], T]
    ) -> T:
        if self._closed:
            raise DependencyUnavailable("post storage closed")
        listener = self._listener
        # The order matters (see the class docstring): quiet() first, then the
        # generation, then the query.
        if listener is None or not listener.quiet(self._max_silence_s):
            return build(self.list_page(limit, before_id))
        generation = self.generation
        # One attribute, read and replaced at once: a dict is never seen
        # under another generation's label.
        label, pages = self._pages
        if label != generation:
            pages = {}
            self._pages = (generation, pages)
        key = (limit, before_id)
        page = pages.get(key)
        if page is None:
            page = build(self.list_page(limit, before_id))
            if len(pages) >= _MAX_PAGES:
                pages.clear()
            pages[key] = page  # kept under the generation read before the query
        return page  # what build returned for key

    def close(self) -> None:
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        self._db.close()

    # -- extras (not part of the Protocol) -----------------------------------

    @property
    def schema_version(self) -> int:
        """The schema version of the Posts schema in the database."""
        return self._db.schema_version

    @property
    def listener(self) -> Listener | None:
        """The connection listening for changes (``None`` without a cache)."""
        return self._listener

    def __enter__(self) -> PostgresPostStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------

    def _changed(self, channel: str, payload: str | None) -> None:
        """The listener's callback: a change was committed (or may have been: ``None``)."""
        self._bump()

    def _bump(self) -> None:
        # Under a lock: two bumps at once must not leave it incremented once.
        with self._bump_lock:
            self.generation += 1

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _write(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        if self._closed:
            raise DependencyUnavailable("post storage closed")
        try:
            return self._db.fetchall(sql, params)  # autocommit: the statement is its transaction
        finally:
            # Read-your-writes here, before this write's notification arrives
            # (and after a failure: it may have committed).
            self._bump()

    def _query(self, sql: str, params: tuple[int, ...]) -> list[Any]:
        if self._closed:
            raise DependencyUnavailable("post storage closed")
        return self._db.fetchall(sql, params)


_MAX_PAGES = 256
_WAL_INDEX_HEADER_BYTES = 48  # one copy of the WalIndexHdr


class _WalIndex:
    """The start of a database's WAL index (``-shm``), mapped read-only, once per process.

    Why the care: SQLite holds a shared POSIX lock on the ``-shm`` file for as
    long as a connection is open; the next process to open the database takes
    that lock as the sign that the file is in use and must not be truncated.
    POSIX drops *all* of a process's locks on a file when the process closes
    *any* descriptor of it, and CPython's ``mmap`` keeps a duplicate descriptor
    that it closes on ``mmap.close()``. Opening the file, mapping it and
    closing the file - the obvious code - therefore silently dropped SQLite's
    lock: the next ``sqlite3`` reader, or a restarted worker, truncated the
    file and this process died of SIGBUS on its next read of the mapping.

    So both descriptors (the file's and the mapping's) stay open while any
    store of this process uses the database, shared by all of them and
    counted; they are closed only when the last store releases the index,
    after it has closed its own connections. Keyed by ``(st_dev, st_ino)`` so
    that two paths of one file share one entry.
    """

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _open: ClassVar[dict[tuple[int, int], _WalIndex]] = {}

    def __init__(self, key: tuple[int, int]) -> None:
        self._key = key
        self._files: list[Any] = []
        self._users = 0
        self.header: mmap.mmap | None = None

    @classmethod
    def acquire(cls, path: Path) -> _WalIndex | None:
        """The shared index of the database at ``path`` (counted); ``None`` if there is no file.

        ``header`` is ``None`` when the file cannot be mapped (the page cache
        then checks ``PRAGMA data_version``); the descriptor is kept all the same.
        """
        try:
            file = open(f"{path}-shm", "rb")  # noqa: SIM115 - closed by release()
        except OSError:
            log.info("no shared WAL index to watch; pages are checked with PRAGMA data_version")
            return None
        with cls._lock:
            try:
                st = os.fstat(file.fileno())
            except OSError:
                st = None
            key = (st.st_dev, st.st_ino) if st is not None else (-1, id(file))
            index = cls._open.get(key)
            if index is None:
                index = cls._open[key] = cls(key)
                if st is not None and st.st_size >= _WAL_INDEX_HEADER_BYTES:
                    with suppress(OSError, ValueError):
                        index.header = mmap.mmap(
                            file.fileno(), _WAL_INDEX_HEADER_BYTES, access=mmap.ACCESS_READ
                        )
                if index.header is None:
                    log.info(
                        "shared WAL index not mapped; pages are checked with PRAGMA data_version"
                    )
            # Never closed before release(): closing it would drop the locks.
            index._files.append(file)
            index._users += 1
            return index

    def release(self) -> None:
        """One store no longer uses the index; the last one unmaps and closes it."""
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            del self._open[self._key]
            files, self._files = self._files, []
        if self.header is not None:
            self.header.close()
        for file in files:
            file.close()


class _PageView:
    """A reader connection and the pages built from it at ``version``."""

    __slots__ = ("conn", "pages", "version")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.version: int | None = None
        self.pages: dict[tuple[int, int], Any] = {}


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection in autocommit mode with the durability settings; raises ``sqlite3.Error``."""
    conn = sqlite3.connect(
        str(path),
        timeout=busy_timeout_s,
        isolation_level=None,  # autocommit: every statement is its own transaction
        check_same_thread=False,  # guarded by the write lock, or owned by one call (readers)
        cached_statements=32,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        # Per connection: a committed transaction is on disk before COMMIT returns.
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn
