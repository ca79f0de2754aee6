"""A thin layer over the DB-API for both stores' dialects: SQLite and PostgreSQL.

No ORM and no query builder on the hot path: the stores write their SQL in
SQLite's form (``?`` placeholders) and choose another statement only where the
dialects differ (``MAX(a, b)`` / ``GREATEST``, ``INSERT OR IGNORE`` / ``ON
CONFLICT DO NOTHING``, ``instr`` / ``strpos``, ``FOR UPDATE``). The way
Synapse (the Matrix homeserver) supports both engines: one statement text,
placeholders converted once per statement for PostgreSQL, per-dialect schema
files under one version sequence.

:class:`PostgresDatabase` is the PostgreSQL side of a store's ``Database``
(``auth_rpc.auth.db.Database`` is the SQLite side; the Posts store has its
own): a ``psycopg_pool`` pool of autocommit connections; :meth:`transaction`
runs ``BEGIN`` ... ``COMMIT`` (READ COMMITTED) on one connection of the pool,
joined by nested use on the same thread, and :meth:`lock` takes a
transaction-scoped advisory lock where rows that may not exist yet are
read-modified-written (where they exist, ``SELECT ... FOR UPDATE``).
The schema version is a row of ``schema_version`` (one per component, so that
the Auth and Posts schemas may share a database); migrations run under an
advisory lock, so that replicas starting together migrate once.

:class:`Listener` is one connection per process ``LISTEN``-ing to channels, on
a thread of its own: what replicas use to tell each other that something
changed (a revocation, a key, a post), inside the trust boundary.

Never logged: a database URL's password (:func:`redact_url`), statement
parameters.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from time import monotonic
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from auth_rpc.errors import DependencyUnavailable

__all__ = [
    "POSTGRESQL",
    "SQLITE",
    "Listener",
    "PostgresDatabase",
    "check_database_url",
    "is_postgresql_url",
    "redact_url",
    "to_pyformat",
]

log = logging.getLogger("auth_rpc.serving.sqlstore")

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

_UNAVAILABLE = "database unavailable"


def is_postgresql_url(url: str | None) -> bool:
    return bool(url) and urlsplit(str(url)).scheme in ("postgresql", "postgres")


def check_database_url(url: str) -> str:
    """``url`` if it is a PostgreSQL URL, else ``ValueError`` (without the URL's password)."""
    if not is_postgresql_url(url):
        raise ValueError(
            f"unsupported database URL {redact_url(url)!r}: expected postgresql://..."
        )
    return url


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: what may be logged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    query = parts.query
    return urlunsplit((parts.scheme, f"{user}:***@{netloc}", parts.path, query, ""))


_CONVERTED: dict[str, str] = {}


def to_pyformat(sql: str) -> str:
    """SQLite's ``?`` placeholders as psycopg's ``%s`` (``%`` escaped); cached."""
    converted = _CONVERTED.get(sql)
    if converted is None:
        converted = sql.replace("%", "%%").replace("?", "%s")
        if len(_CONVERTED) < 4096:
            _CONVERTED[sql] = converted
    return converted


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    value = zlib.crc32(name.encode()) | (zlib.crc32(name.encode()[::-1]) << 32)
    return value - (1 << 64) if value >= 1 << 63 else value


class PgConnection:
    """A psycopg connection that takes the stores' ``?`` statements."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(to_pyformat(sql), params or None)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cur = self.raw.cursor()
        cur.executemany(to_pyformat(sql), rows)
        return cur


class PostgresDatabase:
    """A pool of PostgreSQL connections with the SQLite store's interface.

    Every ``psycopg.Error`` raised inside :meth:`transaction` or :meth:`read`
    becomes :class:`~auth_rpc.errors.DependencyUnavailable` (logged without
    parameters); other exceptions roll the transaction back and pass through.
    """

    dialect = POSTGRESQL
    for_update = " FOR UPDATE"

    def __init__(self, pool: Any, url: str, component: str) -> None:
        import psycopg

        self._pool = pool
        self.url = url
        self.component = component
        self._local = threading.local()
        self._cursors: dict[int, Any] = {}
        self.created = False
        self.IntegrityError: type[Exception] = psycopg.IntegrityError
        self._error: type[Exception] = psycopg.Error

    @property
    def path(self) -> str:
        """Where the data is, for messages: the URL without its password."""
        return redact_url(self.url)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        component: str,
        migrations: Sequence[str],
        allow_new: bool = True,
        min_size: int = 1,
        max_size: int = 16,
        timeout_s: float = 10.0,
        application_name: str | None = None,
    ) -> PostgresDatabase:
        """Connect (a pool of up to ``max_size``), check and migrate the schema.

        ``component`` names the schema (``auth``, ``posts``) in
        ``schema_version``. With ``allow_new=False`` a database without this
        component's schema raises ``ValueError``. Raises
        DependencyUnavailable (cannot connect; the message never shows the
        password), ``ValueError`` (schema newer than ``migrations``).
        """
        import psycopg
        from psycopg_pool import ConnectionPool

        check_database_url(url)
        kwargs: dict[str, Any] = {"autocommit": True}
        if application_name:
            kwargs["application_name"] = application_name
        pool = None
        try:
            # One connection first: a wrong URL or a server down fails at once,
            # in one line, rather than after the pool's retries.
            psycopg.connect(url, connect_timeout=max(1, int(timeout_s)), **kwargs).close()
            pool = ConnectionPool(
                url,
                min_size=min_size,
                max_size=max_size,
                kwargs=kwargs,
                timeout=timeout_s,
                open=False,
                name=f"{component}-db",
            )
            pool.open(wait=True, timeout=timeout_s)
        except (psycopg.Error, OSError) as exc:
            if pool is not None:
                with _suppress_all():
                    pool.close()
            log.error("cannot connect to the database %s: %s", redact_url(url), _failure(exc))
            raise DependencyUnavailable(f"{_UNAVAILABLE}: cannot connect") from exc
        db = cls(pool, url, component)
        try:
            db._migrate(migrations, allow_new=allow_new)
        except BaseException:
            db.close()
            raise
        return db

    # -- schema ---------------------------------------------------------------

    def _migrate(self, migrations: Sequence[str], *, allow_new: bool) -> None:
        with self.transaction() as conn:
            self.lock(conn, "schema_version")
            # Only when missing: a runtime role without CREATE on the schema (a
            # schema migrated by its owner) may not even run CREATE ... IF NOT EXISTS.
            if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
                conn.execute(
                    "CREATE TABLE schema_version ("
                    "component TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL)"
                )
            row = conn.execute(
                "SELECT version FROM schema_version WHERE component = ?", (self.component,)
            ).fetchone()
            version = int(row[0]) if row else 0
            if version == 0 and not allow_new:
                raise ValueError(
                    f"the database {self.path} has no {self.component} schema (new or empty)"
                )
            if version > len(migrations):
                raise ValueError(
                    f"database schema version {version} is newer than this program "
                    f"(knows {len(migrations)}); upgrade it"
                )
            for number in range(version + 1, len(migrations) + 1):
                log.info("migrating the %s schema to version %d", self.component, number)
                conn.raw.execute(migrations[number - 1])
            if version < len(migrations):
                conn.execute(
                    "INSERT INTO schema_version (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                    (self.component, len(migrations)),
                )
            self.created = version == 0

    @property
    def schema_version(self) -> int:
        with self.read() as conn:
            row = conn.execute(
                "SELECT version FROM schema_version WHERE component = ?", (self.component,)
            ).fetchone()
        return int(row[0]) if row else 0

    # -- use --------------------------------------------------------------------

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except self._error as exc:
            log.error("database error: %s", _failure(exc))
            raise DependencyUnavailable(_UNAVAILABLE) from exc

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """``BEGIN`` ... ``COMMIT`` on a pooled connection; rolled back on any exception.

        Nested use on the same thread joins the outer transaction. Raises
        :class:`DependencyUnavailable` on any database error.
        """
        local = self._local
        current: PgConnection | None = getattr(local, "conn", None)
        depth: int = getattr(local, "depth", 0)
        if current is not None and depth:
            local.depth += 1
            try:
                yield current
            finally:
                local.depth -= 1
            return
        with self._mapped(), self._connection() as raw, raw.transaction():
            conn = PgConnection(raw)
            local.conn, local.depth = conn, 1
            try:
                yield conn
            finally:
                local.conn, local.depth = None, 0

    @contextmanager
    def read(self) -> Iterator[PgConnection]:
        """A connection for reads: the thread's transaction's, else a pooled autocommit one."""
        current: PgConnection | None = getattr(self._local, "conn", None)
        if current is not None:
            yield current
            return
        with self._mapped(), self._connection() as raw:
            yield PgConnection(raw)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        from psycopg_pool import PoolClosed, PoolTimeout

        try:
            cm = self._pool.connection()
            raw = cm.__enter__()
        except PoolTimeout as exc:
            log.error("database error: no connection free in the pool")
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        except PoolClosed as exc:
            raise DependencyUnavailable("database closed") from exc
        try:
            yield raw
        except BaseException as exc:
            if not cm.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            cm.__exit__(None, None, None)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of one statement (its own transaction) on a pooled connection.

        The hot path of a store's reads and one-statement writes: no context
        manager, and one cursor per connection kept for reuse (a new cursor
        per call cost about a third of a short query's client CPU). Raises
        :class:`DependencyUnavailable` on any database error.
        """
        from psycopg_pool import PoolClosed, PoolTimeout

        pool = self._pool
        try:
            raw = pool.getconn()
        except PoolTimeout as exc:
            log.error("database error: no connection free in the pool")
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        except PoolClosed as exc:
            raise DependencyUnavailable("database closed") from exc
        try:
            cursors = self._cursors
            cur = cursors.get(id(raw))
            if cur is None or cur.connection is not raw:
                if len(cursors) > 64:  # entries of connections the pool has replaced
                    cursors.clear()
                cur = cursors[id(raw)] = raw.cursor()
            rows: list[Any] = cur.execute(to_pyformat(sql), params).fetchall()
        except self._error as exc:
            pool.putconn(raw)  # the pool checks it and discards a broken one
            log.error("database error: %s", _failure(exc))
            raise DependencyUnavailable(_UNAVAILABLE) from exc
        except BaseException:
            pool.putconn(raw)
            raise
        pool.putconn(raw)
        return rows

    def lock(self, conn: Any, name: str) -> None:
        """Take the advisory lock ``name`` until the end of the current transaction."""
        conn.execute("SELECT pg_advisory_xact_lock(?)", (advisory_key(name),))

    def notify(self, conn: Any, channel: str, payload: str = "") -> None:
        """Send a notification on ``channel`` when the current transaction commits."""
        conn.execute("SELECT pg_notify(?, ?)", (channel, payload))

    def ping(self) -> bool:
        try:
            with self.read() as conn:
                conn.execute("SELECT 1").fetchone()
        except DependencyUnavailable:
            return False
        return True

    def close(self) -> None:
        """Close the pool; later calls raise :class:`DependencyUnavailable`. Idempotent."""
        with _suppress_all():
            self._pool.close()


class Listener:
    """One connection ``LISTEN``-ing on ``channels``, on a daemon thread of its own.

    ``callback(channel, payload)`` per notification. Once ``LISTEN`` is in
    force (the first time and after every reconnection) it calls
    ``callback(channel, None)`` for every channel: what changed before, or
    while it was away, is unknown, so the subscriber must assume everything
    did. When the connection is lost (an error, or no answer to the
    ``SELECT 1`` sent every ``heartbeat_s`` while idle), :attr:`listening`
    turns false and ``on_lost()`` is called at once (a subscriber then reads
    what it needs per request); it reconnects every ``retry_interval_s``. A
    callback that raises is logged and the others go on. Generic: the Auth and
    Posts stores each run one per process with their own channels.

    For a cache invalidated by notifications, :meth:`quiet` tells whether it
    may trust what it holds: the connection is up, has answered a round trip
    within ``max_silence_s``, and nothing has reached it that the callback has
    not been given yet (a notification waiting in the socket while the thread
    waits for the GIL counts as arrived).
    """

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        callback: Callable[[str, str | None], None],
        *,
        name: str = "listener",
        heartbeat_s: float = 1.0,
        on_lost: Callable[[], None] | None = None,
        retry_interval_s: float = 1.0,
        connect_timeout_s: int = 5,
    ) -> None:
        for channel in channels:
            if not channel.replace("_", "").isalnum():
                raise ValueError(f"bad channel name {channel!r}")
        self._url = url
        self._channels = tuple(channels)
        self._callback = callback
        self._heartbeat_s = heartbeat_s
        self._on_lost = on_lost
        self._retry_interval_s = retry_interval_s
        self._connect_timeout_s = max(1, int(connect_timeout_s))
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._conn: Any = None
        # The listening socket while LISTEN is in force (else -1); _busy while
        # the thread reads from it and until the callbacks of what it read ran.
        self._fd = -1
        self._busy = False
        self._confirmed_at = float("-inf")
        self._wake: tuple[int, int] | None = None
        #: How many times the connection was lost (for tests and logs).
        self.losses = 0
        self._thread = threading.Thread(target=self._run, name=f"pg-{name}", daemon=True)

    def start(self, *, timeout_s: float = 10.0) -> Listener:
        """Start listening; returns once ``LISTEN`` is in force (or ``timeout_s`` passed)."""
        self._wake = os.pipe()  # written by stop(): the thread's wait ends at once
        self._thread.start()
        self._ready.wait(timeout_s)
        return self

    @property
    def listening(self) -> bool:
        return self._ready.is_set()

    def wait_listening(self, timeout_s: float) -> bool:
        """Wait until ``LISTEN`` is in force (again); whether it is."""
        return self._ready.wait(timeout_s)

    def quiet(self, max_silence_s: float = 3.0) -> bool:
        """Whether every notification that reached this process was given to the callback.

        ``False`` while not listening, while the thread reads or runs
        callbacks, when unread data waits in the socket, or when the server
        last answered more than ``max_silence_s`` ago (a silently dead link).
        A caller checks this *before* reading its own state (its generation):
        then a notification that arrived before the check is either seen as
        pending here or already applied. One ``select`` with no wait.
        """
        fd = self._fd
        if fd < 0 or monotonic() - self._confirmed_at > max_silence_s:
            return False
        try:
            pending = select.select((fd,), (), (), 0)[0]
        except (OSError, ValueError):
            return False
        # _busy after the select: data consumed since the select is still in
        # the thread's hands until _busy drops, after its callbacks ran.
        return not pending and not self._busy and self._fd == fd

    def _deliver(self, channel: str, payload: str | None) -> None:
        try:
            self._callback(channel, payload)
        except Exception:  # a callback's bug must not stop the listener
            log.exception("database listener callback failed")

    def _run(self) -> None:
        import psycopg

        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=self._connect_timeout_s,
                    **_LIVENESS,
                ) as conn:
                    self._conn = conn
                    try:
                        self._listen(conn, first)
                    finally:
                        # Before the connection closes: its descriptor may be reused.
                        self._fd = -1
                        first = False
            except (psycopg.Error, OSError) as exc:
                if not self._stop.is_set():
                    log.warning("database listener lost its connection: %s", _failure(exc))
            except Exception:  # never let the thread die: reconnect
                log.exception("database listener failed")
            finally:
                self._conn = None
                self._lost()
            if self._stop.is_set():
                break
            self._stop.wait(self._retry_interval_s)

    def _lost(self) -> None:
        was = self._ready.is_set()
        self._ready.clear()
        if not was:
            return
        self.losses += 1
        if self._on_lost is not None and not self._stop.is_set():
            try:
                self._on_lost()
            except Exception:
                log.exception("database listener on_lost callback failed")

    def _listen(self, conn: Any, first: bool) -> None:
        """LISTEN, then pass notifications on until stopped or the connection fails."""
        # Notifications read while a statement runs (LISTEN, the heartbeat) go
        # through this handler too, so that none is left in psycopg's backlog.
        conn.add_notify_handler(lambda note: self._deliver(note.channel, note.payload))
        for channel in self._channels:
            conn.execute(f"LISTEN {channel}")  # checked in __init__
        if not first:
            log.info("database listener connected again")
        pgconn = conn.pgconn
        fd = conn.fileno()
        wake = self._wake
        if wake is None:  # stopped
            return
        self._confirmed_at = monotonic()
        self._fd = fd
        self._ready.set()
        # What changed before LISTEN was in force is unknown.
        self._busy = True
        try:
            for channel in self._channels:
                self._deliver(channel, None)
        finally:
            self._busy = False
        while not self._stop.is_set():
            wait = max(0.0, self._confirmed_at + self._heartbeat_s - monotonic())
            ready = select.select((fd, wake[0]), (), (), wait)[0]
            if self._stop.is_set():
                return
            if ready:
                self._busy = True
                try:
                    pgconn.consume_input()  # raises on a closed connection
                    while (note := pgconn.notifies()) is not None:
                        pgconn.notify_handler(note)  # psycopg's: decodes, calls ours
                finally:
                    self._busy = False
            if monotonic() - self._confirmed_at >= self._heartbeat_s:
                # A connection that died without a word (a partition, a proxy)
                # would otherwise look idle forever.
                self._busy = True
                try:
                    conn.execute("SELECT 1")
                finally:
                    self._busy = False
                self._confirmed_at = monotonic()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        wake, self._wake = self._wake, None
        if wake is None:
            return
        with suppress(OSError):
            os.write(wake[1], b"x")
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            for fd in wake:
                os.close(fd)


#: libpq settings of a listening connection over TCP (ignored on a unix socket):
#: a peer gone silent is noticed in about 10 s instead of TCP's minutes.
_LIVENESS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 10_000,
}


def _failure(exc: BaseException) -> str:
    """An error's class and first line, never its statement parameters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _suppress_all() -> suppress:
    return suppress(Exception)  # closing is best effort

